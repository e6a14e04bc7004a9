"""Shared test set-up: highest matmul precision, torch threads, non-degenerate random weights."""

import importlib.util
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


def pytest_configure(config):
    """Under CI (the CI variable set, as .ci/run does) a missing [torch] extra stops the run: the
    parity tests would otherwise skip, and a failed install would pass as green."""
    if os.environ.get("CI"):
        try:
            import timm  # noqa: F401
            import torch  # noqa: F401
            if importlib.util.find_spec("transformers") is None:  # the text parity reference (found, not imported: seconds)
                raise ImportError("No module named 'transformers'")
        except ImportError as e:
            raise pytest.UsageError(f"CI is set but the [torch] extra is not importable ({e}); install it with "
                                    "pip install -e '.[torch,test]' (parity tests would skip, not fail)") from None


# Re-draws every weight of a timm model at unit fan-in scale, in place. timm's own init is nearly
# degenerate for testing (zero or tiny heads, LayerScale 1e-5, near-uniform attention): differences
# between implementations could hide in it. The benchmark draws its parity inputs the same way.
from bench.models import redraw_ as randomize_timm_  # noqa: E402


def rel_err(a, b) -> float:
    """||a - b|| / ||b||, in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def torch_one_thread():
    torch = pytest.importorskip("torch")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
