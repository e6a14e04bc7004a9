"""Shared test set-up: highest matmul precision, torch threads, non-degenerate random weights."""

from pathlib import Path

import jax
import numpy as np
import pytest

# Parity tests compare float32 results; keep XLA from lowering matmul precision anywhere.
jax.config.update("jax_default_matmul_precision", "highest")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def randomize_timm_(model, seed: int = 0):
    """Re-draw every weight of a timm model at unit scale, in place; returns the model in eval mode.

    timm's own init is nearly degenerate for testing (zero or tiny heads, LayerScale 1e-5,
    near-uniform attention): differences between implementations could hide in it. Fan-in
    scaled weights give peaked attention, distinct heads and spread-out logits.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            elif name.startswith(("pos_embed", "cls_token", "reg_token", "dist_token")):
                p.copy_(torch.randn(p.shape, generator=gen))
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * p[0].numel() ** -0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


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
