"""Shared test set-up: highest matmul precision, torch threads, non-degenerate random weights."""

import gc
import os
from pathlib import Path

import jax
import numpy as np
import pytest

# Parity tests compare float32 results; keep XLA from lowering matmul precision anywhere.
jax.config.update("jax_default_matmul_precision", "highest")
# CLI tests call predmaps.cli.main in this process: keep it from pointing JAX's process-wide
# persistent cache at ~/.cache (tests of the cache run the CLI in a subprocess with their own dir).
os.environ["PREDMAPS_COMPILE_CACHE"] = "off"

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _cores() -> int:
    """The cores this process may run on (sched_getaffinity is Linux's; elsewhere all of them)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: a worker per core, as many as memory holds. One process running the suite peaked at
    4.8 GB resident (2-core VM, 2026-12-07); 6 GiB each leaves the rest of the machine room."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return max(1, min(_cores(), memory // (6 << 30)))


def pytest_configure(config):
    """Under CI (the CI variable set, as .ci/run does) a missing [torch] extra stops the run: the
    parity tests would otherwise skip, and a failed install would pass as green."""
    # Under pytest-xdist each worker takes its share of the cores for torch's OpenMP threads, set before
    # torch is imported: two workers with a thread per core each spun against each other (10% of the time
    # of two test files run side by side on the 2-core VM, 2026-12-07). XLA's pool is left as it is:
    # pinning each of the two to its own core used the cores no better there.
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _cores() // int(workers))))
    if os.environ.get("CI"):
        try:
            import open_clip  # noqa: F401
            import timm  # noqa: F401
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError as e:
            raise pytest.UsageError(f"CI is set but the [torch] extra is not importable ({e}); install it with "
                                    "pip install -e '.[torch,test]' (parity tests would skip, not fail)") from None


# Re-draws every weight of a timm model at unit fan-in scale, in place. timm's own init is nearly
# degenerate for testing (zero or tiny heads, LayerScale 1e-5, near-uniform attention): differences
# between implementations could hide in it. The benchmark draws its parity inputs the same way.
from bench.models import redraw_ as randomize_timm_  # noqa: E402


@pytest.fixture
def hub_repo(tmp_path, monkeypatch):
    """Offline huggingface_hub (HF_HUB_OFFLINE, a temporary cache); returns lay_out(repo_id, folder),
    which puts the folder's files into the cache as a download leaves them (refs/main, a snapshot)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub_cache"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    commit = "0123456789abcdef0123456789abcdef01234567"

    def lay_out(repo_id: str, folder: Path) -> None:
        repo = cache / ("models--" + repo_id.replace("/", "--"))
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(commit)
        snap = repo / "snapshots" / commit
        snap.mkdir(parents=True)
        for f in Path(folder).iterdir():
            (snap / f.name).write_bytes(f.read_bytes())

    return lay_out


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_code():
    """Drop JAX's compiled executables after each test file. Each XLA:CPU executable holds ~3.4 memory
    maps (measured 2026-12-07); the whole suite in one process compiled enough of them to pass Linux's
    vm.max_map_count (65530), where XLA aborted or segfaulted in whichever test compiled next."""
    yield
    jax.clear_caches()
    gc.collect()


def rel_err(a, b) -> float:
    """||a - b|| / ||b||, in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def cuda_lowering(fn, *args) -> str:
    """StableHLO of fn lowered for CUDA on this (GPU-less) machine. jax >= 0.11 asks the device for
    its compute capability when lowering Pallas to Triton; give it an H100's."""
    try:
        from jax._src.pallas.triton import gpu_info
    except ImportError:  # jax 0.10: the lowering does not ask
        gpu_info = None
    saved = getattr(gpu_info, "get_gpu_info", None)
    if saved is not None:
        gpu_info.get_gpu_info = lambda: gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100)
    try:
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    finally:
        if saved is not None:
            gpu_info.get_gpu_info = saved


@pytest.fixture(scope="module")
def torch_one_thread():
    torch = pytest.importorskip("torch")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
