"""Several processes, one job: joining the JAX cluster, gathering host values, and the agreements
that make every process fail, stop or finish at the same step (none is left waiting in a
collective another never reaches).

Several hosts: call `init_distributed()`
(or `predmaps run --distributed on|auto`) before anything touches JAX; the inputs are cut
into shards of `shard_size` images, shard j belongs to process j % P, each process feeds its
slice with `jax.make_array_from_process_local_data` and writes its own shards. All processes
run the same number of steps (idle ones feed masked batches), agreed once at the start.
"""

from __future__ import annotations

import json
import os
from collections import deque

import numpy as np

from predmaps import results as _results


def _cluster_detected() -> bool:
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True

    def n(var):
        try:
            return int(env.get(var, "1") or 1)
        except ValueError:
            return 1

    if "SLURM_PROCID" in env and "SLURM_JOB_ID" in env and max(n("SLURM_NTASKS"), n("SLURM_STEP_NUM_TASKS")) > 1:
        return True
    if "OMPI_MCA_orte_hnp_uri" in env and n("OMPI_COMM_WORLD_SIZE") > 1:
        return True
    return "," in env.get("TPU_WORKER_HOSTNAMES", "") or "," in env.get("TPU_PROCESS_ADDRESSES", "")


def init_distributed(mode: str = "auto", coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> bool:
    """Join a multi-process JAX job: `jax.distributed.initialize`, before any other JAX call.

    mode "on": always (arguments, else JAX's cluster detection: SLURM, Open MPI, TPU pods, ...);
    "auto": when arguments are given or such a cluster is detected (JAX_COORDINATOR_ADDRESS,
    a SLURM or mpirun job of more than one task, a multi-host TPU slice); "off": never.
    On CPU, cross-process collectives use gloo. Returns whether JAX is now distributed."""
    import jax

    if jax.distributed.is_initialized():
        return True
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"distributed mode must be auto, on or off; got {mode!r}")
    if mode == "off" or (mode == "auto" and coordinator is None and num_processes is None
                         and not _cluster_detected()):
        return False
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    return True


def _allgather(values: np.ndarray) -> np.ndarray:
    """(P, ...) every process's `values` (same shape everywhere)."""
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return np.asarray(values)[None]
    return np.asarray(multihost_utils.process_allgather(np.asarray(values)))


def _allgather_json(obj) -> list:
    """Every process's JSON-able `obj`, in process order."""
    data = np.frombuffer(_results.dumps(obj), np.uint8)
    sizes = _allgather(np.array([data.size], np.int64))[:, 0]
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:data.size] = data
    return [json.loads(bytes(row[:n]).decode("utf-8", "surrogateescape"))
            for row, n in zip(_allgather(padded), sizes)]


class OtherProcessError(RuntimeError):
    """Another process of a multi-process job failed where this one did not (its own message says why)."""


class _agreement:
    """`with _agreement(P) as a: ...; a.share(x)` then `a.result()`: every process learns whether
    any failed inside the block (one collective), so all raise together instead of some waiting
    forever in a collective the failed ones never reach. `result()` re-raises this process's own
    error, or raises for another's, else returns every process's shared value (P,)."""

    def __init__(self, pcount: int):
        self.pcount, self.error, self.value = pcount, None, 0

    def __enter__(self):
        return self

    def share(self, value: int):
        self.value = int(value)

    def __exit__(self, kind, error, tb):
        self.error = error
        return isinstance(error, Exception)  # held until result(); KeyboardInterrupt etc. go through

    def result(self) -> np.ndarray:
        if self.pcount == 1:
            if self.error is not None:
                raise self.error
            return np.array([self.value])
        flags = _allgather(np.array([self.error is not None, self.value], np.int64))
        if self.error is not None:
            raise self.error
        if flags[:, 0].any():
            raise OtherProcessError(f"process(es) {np.nonzero(flags[:, 0])[0].tolist()} could not start this job "
                                    "(see their messages)")
        return flags[:, 1]


def _compile_together(engine) -> None:
    """Compile the step. Multi-process, every process then learns whether all did (one collective):
    a process whose compilation failed (too little memory on its host, say) would otherwise leave the
    others waiting in a first step it never runs. It raises its own error, the others OtherProcessError."""
    if engine.compiled is None:
        with _agreement(engine.nproc) as compiled:
            engine.compile()
        compiled.result()


def _stop_together(engine, inflight: deque, blank: tuple, total_steps: int, stats) -> None:
    """This process stops early: run blank steps flagged as its last, keeping one in flight as every
    process does, until a flagged step finishes; then finish the one in flight after it. Every
    process has then run the same steps (see `stream._stream`; engine: its `_Engine`, stats: its `_Stats`)."""
    import jax

    me = jax.process_index() + 1
    while True:
        while len(inflight) < 2 and stats.steps < total_steps:
            inflight.append((engine.dispatch(*blank, stop=me), None))
            stats.steps += 1
        if not inflight:
            return
        out, _ = inflight.popleft()
        if engine.stopped(out):
            for out, _ in inflight:
                engine.stopped(out)  # waits for it
            inflight.clear()
            return
