"""Timing a device call: wall time after warm-up, synchronised, shared by bench.runner, bench.bounds
and bench.gpu_probe (its own module so that none of them imports another for it)."""

from __future__ import annotations

import time


def time_calls(call, sync, warmup: int, repeats: int):
    """Median-able wall times of call() after warm-up, device synchronised; returns (last output, times)."""
    out = None
    for _ in range(warmup):
        out = call()
        sync(out)
    times = []
    for _ in range(repeats):
        del out
        t0 = time.perf_counter()
        out = call()
        sync(out)
        times.append(time.perf_counter() - t0)
    return out, times
