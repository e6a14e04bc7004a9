"""jaxvit.kernels: the Pallas LayerNorm, GEMM+activation and GEMM+logsumexp kernels compute what their
XLA references compute (run in the Pallas interpreter here), lower to Triton kernels for CUDA, and
ViT(kernels=...) uses them only where it says."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import cuda_lowering
from jaxvit import ViT, ViTConfig, kernels
from jaxvit.model import _gelu_erf

# D = 96 is not a power of two (the kernels pad rows to 128 lanes and mask); 2 x 37 rows are not a
# multiple of any tile's rows (the last block is masked).
SMALL = ViTConfig(name="small", img_size=(32, 32), patch_size=8, embed_dim=96, depth=2, num_heads=2, mlp_dim=192,
                  num_classes=10)
SMALL_TILES = kernels.Tiles(kernels.LayerNormConfig(4, 4), kernels.DenseConfig(16, 64, 32, 4, 2),
                            kernels.DenseConfig(16, 4, 32, 4, 2))  # head: 10 classes in blocks of 4, padded


def _triton_calls(hlo: str) -> int:
    return hlo.count("custom_call @__gpu$xla.gpu.triton")


def _random(key, shape, scale=1.0, dtype=jnp.float32):
    return (scale * jax.random.normal(jax.random.key(key), shape)).astype(dtype)


def test_erf_from_exp_matches_lax_erf():
    # A&S 7.1.26 is within 1.5e-7 in exact arithmetic; float32 evaluation measured 5.2e-7.
    x = jnp.linspace(-9.0, 9.0, 400_001, dtype=jnp.float32)
    assert float(jnp.abs(kernels._erf(x) - jax.lax.erf(x)).max()) < 1e-6
    # and 'gelu' is the exact erf GELU jaxvit computes (float32, before any rounding)
    np.testing.assert_allclose(kernels._activate(x, "gelu"), _gelu_erf(x), rtol=0, atol=2e-6)
    np.testing.assert_allclose(kernels._activate(x, "gelu_tanh"), jax.nn.gelu(x, approximate=True), atol=2e-6)
    np.testing.assert_allclose(kernels._activate(x, "quick_gelu"), x * jax.nn.sigmoid(1.702 * x), atol=2e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_layer_norm_kernel_equals_reference(dtype):
    x = _random(0, (2, 37, 96), 3.0, dtype) + 1.5  # an offset mean, as residual streams have
    scale, bias = _random(1, (96,)), _random(2, (96,))
    config = kernels.LayerNormConfig(block_rows=8)
    got = kernels.layer_norm(x, scale, bias, 1e-6, config=config, interpret=True)
    want = kernels.layer_norm_reference(x, scale, bias, 1e-6, dtype)
    assert got.dtype == want.dtype == dtype and got.shape == x.shape
    # same float32 math in another summation order: bf16 outputs differ by at most one rounding step
    # (2^-8 relative), float32 outputs by float32 sum rounding
    tol = dict(rtol=2 ** -7, atol=2 ** -7) if dtype == jnp.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), **tol)


@pytest.mark.parametrize("act", kernels.ACTIVATIONS)
def test_dense_act_kernel_equals_reference(act):
    x = _random(3, (2, 37, 64), 1.0, jnp.bfloat16)
    w = _random(4, (64, 128), 64 ** -0.5, jnp.bfloat16)
    b = _random(5, (128,), 0.5, jnp.bfloat16)
    config = kernels.DenseConfig(block_m=16, block_n=32, block_k=16, num_warps=4, num_stages=2)
    got = kernels.dense_act(x, w, b, act, config, interpret=True)
    want = kernels.dense_act_reference(x, w, b, act)
    assert got.shape == (2, 37, 128) and got.dtype == jnp.bfloat16
    # float32 accumulation in another order, one bf16 rounding each: within one rounding step
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=2 ** -7, atol=2 ** -7)
    # the reference is the float64 truth up to bf16 rounding
    y64 = np.asarray(x, np.float64) @ np.asarray(w, np.float64) + np.asarray(b, np.float64)
    truth = np.asarray(kernels._activate(jnp.asarray(y64, jnp.float32), act), np.float64)
    np.testing.assert_allclose(np.asarray(want, np.float64), truth, rtol=2 ** -7, atol=1e-3)


def test_dense_logsumexp_kernel_equals_reference():
    # 100 classes in blocks of 32: the last block padded with -inf logits; 74 rows in blocks of 16
    x = _random(13, (2, 37, 64), 1.0, jnp.bfloat16)
    w = _random(14, (64, 100), 0.5, jnp.bfloat16)
    b = _random(15, (100,), 2.0)
    config = kernels.DenseConfig(block_m=16, block_n=32, block_k=32, num_warps=4, num_stages=2)
    got = kernels.dense_logsumexp(x, w, b, config, interpret=True)
    want = kernels.dense_logsumexp_reference(x, w, b)
    assert got.shape == (2, 37) and got.dtype == jnp.float32
    # float32 throughout: the online merge of blocks against one logsumexp, float32 rounding only
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    y64 = np.asarray(x, np.float64) @ np.asarray(w, np.float64) + np.asarray(b, np.float64)
    truth = np.log(np.exp(y64 - y64.max(-1, keepdims=True)).sum(-1)) + y64.max(-1)
    np.testing.assert_allclose(got, truth, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of block_k"):
        kernels.dense_logsumexp(x, w, b, kernels.DenseConfig(block_k=48))
    with pytest.raises(ValueError, match="do not chain"):
        kernels.dense_logsumexp(x, w, b[:10])


def test_kernels_differentiate_and_vmap_like_their_references():
    x = _random(6, (3, 40, 64), 1.0, jnp.bfloat16)
    w, b = _random(7, (64, 64), 0.125, jnp.bfloat16), _random(8, (64,), 0.5, jnp.bfloat16)
    config = kernels.DenseConfig(block_m=16, block_n=32, block_k=32, num_warps=4, num_stages=2)
    loss = lambda f: lambda x, w, b: f(x, w, b).astype(jnp.float32).sum()
    got = jax.jit(jax.grad(loss(functools.partial(kernels.dense_act, act="gelu", config=config, interpret=True)),
                           argnums=(0, 1, 2)))(x, w, b)
    want = jax.jit(jax.grad(loss(functools.partial(kernels.dense_act_reference, act="gelu")),
                            argnums=(0, 1, 2)))(x, w, b)
    # the backward is the reference's own vjp, so only XLA's bf16 rounding of its fusions can differ
    for g, r in zip(got, want):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32), rtol=2 ** -7, atol=1e-3)
    s, c = _random(9, (64,)), _random(10, (64,))
    vm = jax.vmap(lambda v: kernels.layer_norm(v, s, c, 1e-6, interpret=True))(x)
    np.testing.assert_allclose(np.asarray(vm, np.float32),
                               np.asarray(kernels.layer_norm_reference(x, s, c, 1e-6, jnp.bfloat16), np.float32),
                               rtol=2 ** -7, atol=2 ** -7)


def test_kernels_reject_what_they_cannot_compute():
    x = jnp.zeros((4, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="multiples of block_k, block_n"):
        kernels.dense_act(x, jnp.zeros((64, 100), jnp.bfloat16), jnp.zeros((100,)), "gelu")
    with pytest.raises(ValueError, match="half precision"):
        kernels.dense_act(x.astype(jnp.float32), jnp.zeros((64, 128)), jnp.zeros((128,)), "gelu")
    with pytest.raises(ValueError, match="do not chain"):
        kernels.dense_act(x, jnp.zeros((32, 128), jnp.bfloat16), jnp.zeros((128,)), "gelu")
    with pytest.raises(ValueError, match="unsupported activation"):
        kernels.dense_act(x, jnp.zeros((64, 128), jnp.bfloat16), jnp.zeros((128,)), "relu6")
    with pytest.raises(ValueError, match=r"layer_norm: scale \(32,\) and bias \(32,\) must be \(D,\)"):
        kernels.layer_norm(x, jnp.ones(32), jnp.zeros(32), 1e-6)


def test_kernels_lower_to_triton_for_cuda():
    x = jnp.zeros((2, 197, 768), jnp.bfloat16)
    # rows a multiple of the tile (b256's 50432 = 394 x 128) and not: unmasked and masked loads
    for rows in (x, x[:, :128]):
        hlo = cuda_lowering(lambda x, w, b: kernels.dense_act(x, w, b, "gelu", kernels.DenseConfig(128, 256, 64, 8, 3)),
                             rows, jnp.zeros((768, 3072), jnp.bfloat16), jnp.zeros((3072,), jnp.bfloat16))
        assert _triton_calls(hlo) == 1 and "num_warps = 8" in hlo
        hlo = cuda_lowering(lambda x, w, b: kernels.dense_logsumexp(x, w, b), rows,
                             jnp.zeros((768, 1000), jnp.bfloat16), jnp.zeros((1000,)))
        assert _triton_calls(hlo) == 1
    hlo = cuda_lowering(lambda x, s, b: kernels.layer_norm(x, s, b, 1e-6), x, jnp.ones((768,)), jnp.zeros((768,)))
    assert _triton_calls(hlo) == 1
    # on the CPU the same call is the XLA reference: no custom call
    assert "custom_call" not in jax.jit(lambda x: kernels.layer_norm(x, jnp.ones(768), jnp.zeros(768), 1e-6)).lower(
        x).as_text()


def _model_params(model, images):
    params = model.init(jax.random.key(0), images)["params"]
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    # unit fan-in weights and unit-ish LayerNorm scales (the init's zero head would tie every class)
    leaves = [jax.random.normal(k, l.shape) * (l.shape[0] ** -0.5 if l.ndim > 1 else 0.3) + (l.ndim == 1)
              for k, l in zip(keys, leaves)]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def test_vit_kernels_option_same_params_same_outputs():
    images = _random(11, (3, 32, 32, 3))
    xla = ViT(SMALL, dtype=jnp.bfloat16)
    params = _model_params(xla, images)
    want = xla.apply({"params": params}, images)
    for impl in ("pallas", "pallas_layernorm", "pallas_mlp", "pallas_head", "pallas_layernorm_head"):
        model = xla.clone(kernels=impl, kernel_tiles=SMALL_TILES)
        shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), images))["params"]
        assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(params)
        got = model.apply({"params": params}, images)
        # bf16 compute: one rounding step apart where the fused kernels round once instead of twice
        np.testing.assert_allclose(got.logits, want.logits, rtol=0.05, atol=0.05)
        np.testing.assert_allclose(got.attn_cls, want.attn_cls, rtol=0.05, atol=0.01)
    with pytest.raises(ValueError, match="unknown kernels 'triton'"):
        xla.clone(kernels="triton").apply({"params": params}, images)


def test_vit_kernels_option_lowers_each_layer_norm_and_fc1_to_triton():
    images = jnp.zeros((2, 32, 32, 3))
    params = _model_params(ViT(SMALL), images)
    count = lambda impl, dtype: _triton_calls(cuda_lowering(
        lambda p, x: ViT(SMALL, dtype=dtype, kernels=impl, kernel_tiles=SMALL_TILES).apply({"params": p}, x).logits,
        params, images))
    depth = SMALL.depth
    assert count("xla", jnp.bfloat16) == 0
    assert count("pallas_layernorm", jnp.bfloat16) == 2 * depth + 1  # norm1, norm2 per block, the final norm
    assert count("pallas_mlp", jnp.bfloat16) == depth
    assert count("pallas", jnp.bfloat16) == 3 * depth + 1
    assert count("pallas_head", jnp.bfloat16) == 0  # the head kernel is predmaps', below
    assert count("pallas_layernorm_head", jnp.bfloat16) == 2 * depth + 1
    assert count("pallas", jnp.float32) == 0  # float32 compute keeps XLA's kernels


def test_headline_lowers_the_prediction_map_normaliser_to_triton():
    """PredicAtt_L + PredicAtt_{L-1} with kernels='pallas_head': one normaliser kernel per layer. (Each of
    the two explanations traces its own forward; XLA's CSE merges them after this lowering.)"""
    from bench.models import HEADLINE, jax_function

    images = jnp.zeros((2, 32, 32, 3))
    params = _model_params(ViT(SMALL), images)
    # per explanation with every kernel: the forward's (3 per block, the final norm), then the final norm
    # again on the layer's patch tokens (the head's input) and the normaliser
    every = 3 * SMALL.depth + 1 + 1 + 1
    norms_and_head = 2 * SMALL.depth + 1 + 1 + 1  # the same without the fc1 kernels
    for impl, calls in (("xla", 0), ("pallas_head", 2), ("pallas", 2 * every), ("pallas_layernorm_head", 2 * norms_and_head)):
        model = ViT(SMALL, dtype=jnp.bfloat16, kernels=impl, kernel_tiles=SMALL_TILES)
        assert _triton_calls(cuda_lowering(jax_function(model, HEADLINE), params, images)) == calls, impl


def test_tiles_text_round_trip_and_errors():
    tiles = kernels.Tiles(kernels.LayerNormConfig(16, 8), kernels.DenseConfig(128, 256, 64, 8, 3))
    assert str(tiles) == "layer_norm=16,8;dense=128,256,64,8,3;head=128,128,64,4,4"
    assert kernels.Tiles.parse(str(tiles)) == tiles
    assert kernels.Tiles.parse("dense=64,64") == kernels.Tiles(dense=kernels.DenseConfig(64, 64))
    assert kernels.Tiles.parse("head=64,128").head == kernels.DenseConfig(64, 128)
    with pytest.raises(ValueError, match="unknown kernel 'gemm'"):
        kernels.Tiles.parse("gemm=1,2")
    with pytest.raises(ValueError, match="layer_norm takes up to 2 integers"):
        kernels.Tiles.parse("layer_norm=1,2,3")


def test_vit_runs_the_kernels_themselves_inside_the_model(monkeypatch):
    """The Pallas kernels (in the interpreter) inside the bf16 model: forward, PredicAtt and GradCAM
    (its gradient flows through the kernels' custom vjp) agree with kernels='xla'."""
    from predmaps import explain

    calls = {"layer_norm": 0, "dense_act": 0, "dense_logsumexp": 0}
    for name in calls:
        original = getattr(kernels, name)

        def interpreted(*args, _original=original, _name=name, **kw):
            calls[_name] += 1
            return _original(*args, **kw, interpret=True)

        monkeypatch.setattr(kernels, name, interpreted)
    images = _random(12, (2, 32, 32, 3))
    xla = ViT(SMALL, dtype=jnp.bfloat16)
    params = _model_params(xla, images)
    model = xla.clone(kernels="pallas", kernel_tiles=SMALL_TILES)
    for method in ("predicatt", "gradcam"):
        want = explain(xla, params, images, method=method)
        got = explain(model, params, images, method=method)
        np.testing.assert_array_equal(got.classes, want.classes)
        # bf16 noise relative to the maps' scale (measured 0.2% PredicAtt, 0.8% GradCAM; 5% allowed)
        scale = float(jnp.abs(want.maps).max())
        np.testing.assert_allclose(got.maps, want.maps, rtol=0, atol=0.05 * scale)
    assert calls["layer_norm"] >= 2 * SMALL.depth and calls["dense_act"] >= SMALL.depth
    assert calls["dense_logsumexp"] >= 1
