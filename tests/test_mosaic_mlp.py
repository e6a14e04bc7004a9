"""bench/mosaic_mlp.py, the probe's fc1 + exact GELU as one Mosaic GPU (Hopper wgmma) kernel: it computes
jaxvit's dense_act reference (run in jax's Mosaic GPU interpreter), lowers for CUDA to one Mosaic
GPU call per fc1, and the probe's variants put it in the model where they say."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench import mosaic_mlp
from bench.probe_variants import MOSAIC_VARIANTS, build_variant, config_for, jaxvit_model, random_params
from conftest import cuda_lowering


def _operands(rows=300, k=768, n=512, seed=1):
    """Rows not a multiple of any tile's (the padded last block), K = 768 (12 steps: more than any tile's
    stages, so pipeline buffers are reused), N = 512 (several column blocks)."""
    kx, kw, kb = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (rows, k)).astype(jnp.bfloat16)
    w = (jax.random.normal(kw, (k, n)) * k ** -0.5).astype(jnp.bfloat16)
    b = (jax.random.normal(kb, (n,)) * 0.5).astype(jnp.bfloat16)
    return x, w, b


def _bitwise_share(got, want) -> float:
    return float(np.mean(np.asarray(got, np.float32) == np.asarray(want, np.float32)))


# The kernel and the reference both round one float32 value to bf16; they differ where float32 accumulation
# order moves that value across a rounding boundary (measured: 0.02-0.03% of outputs). The tanh GELU, the
# nearest wrong function, misses on far more (checked below), so 99.9% equal tells them apart.
EQUAL_SHARE = 0.999


def test_the_equality_bar_tells_exact_from_tanh_gelu():
    from jaxvit.kernels import dense_act_reference

    x, w, b = _operands()
    erf, tanh = dense_act_reference(x, w, b, "gelu"), dense_act_reference(x, w, b, "gelu_tanh")
    assert _bitwise_share(tanh, erf) < EQUAL_SHARE
    assert _bitwise_share(mosaic_mlp.reference(x, w, b), erf) == 1.0


@pytest.mark.parametrize("tile", sorted(mosaic_mlp.TILES))
def test_kernel_equals_the_reference_in_the_interpreter(tile):
    x, w, b = _operands()
    got = mosaic_mlp.dense_gelu(x, w, b, mosaic_mlp.TILES[tile], interpret=True)
    assert got.shape == (300, 512) and got.dtype == jnp.bfloat16
    assert _bitwise_share(got, mosaic_mlp.reference(x, w, b)) >= EQUAL_SHARE
    # leading axes as the model passes them, (B, T, D)
    got3 = mosaic_mlp.dense_gelu(x.reshape(3, 100, -1), w, b, mosaic_mlp.TILES[tile], interpret=True)
    np.testing.assert_array_equal(np.asarray(got3, np.float32).reshape(300, 512), np.asarray(got, np.float32))


def test_kernel_lowers_for_cuda_to_one_mosaic_gpu_call():
    x, w, b = _operands(rows=200, k=128, n=256)
    for tile in mosaic_mlp.TILES.values():
        if mosaic_mlp.supported(128, 256, jnp.bfloat16, tile):
            hlo = cuda_lowering(functools.partial(mosaic_mlp.dense_gelu, tile=tile), x, w, b)
            assert hlo.count("custom_call @mosaic_gpu") == 1, tile
    # elsewhere it is the reference itself
    np.testing.assert_array_equal(np.asarray(mosaic_mlp.dense_gelu(x, w, b), np.float32),
                                  np.asarray(mosaic_mlp.reference(x, w, b), np.float32))


def test_kernel_refuses_what_it_cannot_tile():
    x, w, b = _operands(rows=8, k=96, n=256)
    with pytest.raises(ValueError, match="K a multiple of 64"):
        mosaic_mlp.dense_gelu(x, w, b)
    x, w, b = _operands(rows=8, k=128, n=256)
    with pytest.raises(ValueError, match="bfloat16"):
        mosaic_mlp.dense_gelu(x.astype(jnp.float16), w, b)
    with pytest.raises(ValueError, match="do not chain"):
        mosaic_mlp.dense_gelu(x, w, b[:128])


def _variant(name, batch=2):
    cfg = config_for("tiny")  # D = 64, mlp_dim = 128: every 128-wide tile fits, 64x256 does not (Triton's then)
    params32 = random_params(jaxvit_model(cfg), cfg.img_size[0])
    x = jax.random.normal(jax.random.key(5), (batch,) + cfg.img_size + (3,))
    return cfg, x, build_variant(name, cfg, jnp.bfloat16, params32)


@pytest.mark.parametrize("name", sorted(MOSAIC_VARIANTS))
def test_probe_variants_lower_each_fc1_to_the_mosaic_kernel(name):
    cfg, x, (fn, params, ctx) = _variant(name)
    with ctx():
        hlo = cuda_lowering(fn, params, x)
    fits = mosaic_mlp.supported(cfg.embed_dim, cfg.mlp_dim, jnp.bfloat16, mosaic_mlp.TILES[MOSAIC_VARIANTS[name]])
    # the headline's two explanations each trace the forward (XLA's CSE shares it): 2 fc1 per block; where the
    # tile does not fit, fc1 stays the Triton kernel it replaces
    assert hlo.count("custom_call @mosaic_gpu") == (2 * cfg.depth if fits else 0)
    assert (hlo.count("custom_call @__gpu$xla.gpu.triton") > 0) == (not fits or name == "headline_mosaic_stack")
    # the context puts jaxvit back
    import jaxvit.kernels
    import jaxvit.model

    assert jaxvit.model.pallas_kernels.dense_act is jaxvit.kernels.dense_act


def test_probe_variant_runs_the_kernel_inside_the_model(monkeypatch):
    """The tiny model's headline with fc1 + GELU in the interpreted kernel: its maps are the bf16 headline's
    within the benchmark's bf16 parity tolerance (the kernel rounds fc1 + GELU once where XLA rounds twice)."""
    from bench.models import BF16_TOL

    cfg, x, (fn, params, ctx) = _variant("headline", batch=2)
    want = np.asarray(fn(params, x)["maps"], np.float32)
    calls = []

    def interpreted(*args, **kw):
        calls.append(args[0].shape)
        return kernel(*args, **kw, interpret=True)

    kernel = mosaic_mlp.dense_gelu
    monkeypatch.setattr(mosaic_mlp, "dense_gelu", interpreted)
    _, _, (fn, params, ctx) = _variant("headline_mosaic_mlp", batch=2)
    with ctx():
        got = np.asarray(fn(params, x)["maps"], np.float32)
    assert len(calls) == 2 * cfg.depth  # traced twice, as above
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < BF16_TOL
