"""Measuring one call: wall-time summary, parity against the fp32 reference, resident-set growth
(CPU), and JAX's device memory peak in a fresh subprocess (see bench/run.py)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

from bench.models import (BF16_TOL, FP8_DTYPES, FP8_TOL, FP32_TOL, MiB, REPO, TF32_TOL, build_timm, jax_compile,
                          load_jax, make_images)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def rss_supported() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        _status_kb("VmHWM")
        return True
    except OSError:
        return False


def rss_overhead(call) -> int:
    """Peak resident-set growth during call() (reset VmHWM, read VmRSS, call, read VmHWM)."""
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kb("VmRSS")
    out = call()
    peak = _status_kb("VmHWM")
    del out
    return max(0, peak - before) * 1024


def _summary(times: list[float], batch: int) -> dict:
    med = statistics.median(times)
    return {"median_ms": med * 1e3, "min_ms": min(times) * 1e3, "max_ms": max(times) * 1e3, "repeats": len(times),
            "throughput": batch / med, "times_ms": [round(t * 1e3, 4) for t in times]}


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    nb = float(np.linalg.norm(b))
    return float(np.linalg.norm(a - b) / nb) if nb > 0 else float(np.linalg.norm(a - b))


def parity(out: dict, ref: dict, dtype: str, fp32_precision: str, torch_err: float | None = None) -> dict:
    """Compare an output with the fp32 reference. Returns dict(status, rel_err, tol, note)."""
    key = "maps" if "maps" in ref else "logits"
    if key not in out:
        return {"status": "FAIL", "rel_err": None, "tol": None, "note": f"no {key} in the output"}
    a, b = out[key], ref[key]
    if a.shape != b.shape:
        return {"status": "FAIL", "rel_err": None, "tol": None, "note": f"shape {a.shape} != reference {b.shape}"}
    keep = np.ones(a.shape[0], bool)
    if key == "maps" and "classes" in ref and "classes" in out:
        keep = (np.asarray(out["classes"]) == np.asarray(ref["classes"])).all(axis=1)
    if key == "logits":
        keep = a.argmax(-1) == b.argmax(-1)
    mism = int((~keep).sum())
    if dtype == "fp32":
        tol = FP32_TOL if fp32_precision == "highest" else TF32_TOL
        err = rel_err(a, b)
        ok = err <= tol and mism == 0
        note = f"predicted class differs on {mism} image(s)" if mism else ""
        return {"status": "PASS" if ok else "FAIL", "rel_err": err, "tol": tol, "class_mismatch": mism, "note": note}
    tol = FP8_TOL if dtype in FP8_DTYPES else BF16_TOL if torch_err is None else max(BF16_TOL, 2 * torch_err)
    if not keep.any():
        return {"status": "FAIL", "rel_err": None, "tol": tol, "class_mismatch": mism,
                "note": "predicted class differs from fp32 on every image"}
    err = rel_err(a[keep], b[keep])
    note = f"{mism} image(s) with another predicted class than fp32 left out" if mism else ""
    return {"status": "PASS" if err <= tol else "FAIL", "rel_err": err, "tol": tol, "class_mismatch": mism,
            "note": note}


# ------------------------------------------------------------------------------------------ JAX memory child


def _enable_compile_cache(path: str) -> None:
    import jax

    for name, value in (("jax_compilation_cache_dir", path), ("jax_persistent_cache_min_compile_time_secs", 0.0),
                        ("jax_persistent_cache_min_entry_size_bytes", -1)):
        try:
            jax.config.update(name, value)
        except Exception:
            pass


def call_memory(stats, call, balloon) -> dict:
    """Memory overhead of `call()`: peak bytes in use during it minus bytes in use before.

    stats() -> {"bytes_in_use", "peak_bytes_in_use"} of the device; call() runs and synchronises and
    drops its output; balloon(n) allocates n bytes on the device and returns the holder. The
    allocator's peak cannot be reset, so a call whose peak stays under an earlier one (the first
    call's library workspaces, loading the executable) reads only as an upper bound. Read 1 is the
    first call, read 2 the second (the steady state torch's rows measure too). Where read 2 is not
    exact, read 3 first raises bytes in use just past the earlier peak with a balloon: every byte
    the call then allocates lifts the peak, so read 3 is exact and is the one reported.
    """

    def read():
        s0 = stats()
        call()
        s1 = stats()
        return {"before": s0["bytes_in_use"], "peak_before": s0["peak_bytes_in_use"],
                "peak_after": s1["peak_bytes_in_use"], "overhead": s1["peak_bytes_in_use"] - s0["bytes_in_use"],
                "exact": s1["peak_bytes_in_use"] > s0["peak_bytes_in_use"]}

    first, second = read(), read()
    if second["exact"]:
        return dict(second, first_call=first, read="second call")
    s = stats()
    holder = balloon(s["peak_bytes_in_use"] - s["bytes_in_use"] + MiB)
    try:
        third = read()
    finally:
        del holder
    if not third["exact"]:  # the balloon did not lift bytes in use past the peak: keep the bound
        return dict(second, first_call=first, balloon_call=third, read="second call (upper bound)")
    return dict(third, first_call=first, second_call=second, read="third call, over a balloon at the earlier peak")


def memory_child(spec: dict) -> dict:
    """In a fresh process: one JAX case per batch size, ascending; the call's memory overhead read by
    `call_memory` (exact, or marked an upper bound)."""
    import jax
    import jax.numpy as jnp

    if spec.get("cache_dir"):
        _enable_compile_cache(spec["cache_dir"])
    tmodel, size = build_timm(spec["model"], spec["seed"])
    model, params = load_jax(tmodel, spec["dtype"], spec.get("bf16_weights", "cast"), spec.get("kernels", "xla"),
                             spec.get("kernel_tiles", ""), spec.get("gelu", "erf"))
    del tmodel
    dev = jax.devices()[0]
    if dev.memory_stats() is None:
        return {str(b): {"error": f"no memory_stats() on {dev.platform}"} for b in spec["batches"]}
    res = {}
    for batch in sorted(spec["batches"]):
        x = jax.device_put(make_images(batch, size).transpose(0, 2, 3, 1))
        try:
            compiled, csecs, _ = jax_compile(model, params, x, spec["method"], spec["dtype"], spec["fp32_precision"])
            jax.block_until_ready(x)

            def call():
                jax.block_until_ready(compiled(params, x))

            def balloon(n):
                return jax.block_until_ready(jnp.zeros((max(int(n), 1),), jnp.uint8, device=dev))

            res[str(batch)] = dict(call_memory(dev.memory_stats, call, balloon), compile_s=csecs)
        except Exception as e:  # OOM and the like: reported, not fatal
            res[str(batch)] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    return res


def run_memory_child(spec: dict) -> dict:
    cmd = [sys.executable, "-m", "bench", "--_memory-child", json.dumps(spec)]
    try:
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        return {str(b): {"error": "memory subprocess timed out"} for b in spec["batches"]}
    for line in p.stdout.splitlines():
        if line.startswith("MEMCHILD "):
            return json.loads(line[len("MEMCHILD "):])
    return {str(b): {"error": f"memory subprocess failed (rc {p.returncode}): {p.stderr[-400:]}"}
            for b in spec["batches"]}
