"""bf16 compute (`convert.load(..., dtype=jnp.bfloat16)`) against float32 on a small random model:
the maps agree to bf16 rounding, and the LRP methods, which recompute in float32 (README), give the
float32 maps from the uncast params and from bf16-cast params those of the rounded weights."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import convert
import jaxvit
import predmaps
from conftest import rel_err
from jaxvit import ViTConfig
from test_pipeline import random_params

# Measured here (jax 0.10.2, CPU): bf16 vs float32 maps differ by 0.4-1.0% relative, GradCAM the most
# (bf16 keeps 8 significant bits, 0.4% per rounding); 3% leaves room for other XLA versions and stays
# well below the distance between any two of the maps compared (asserted).
BF16_TOL = 3e-2
# The attention path (PredicAtt with its factors A~ and Psi) and the gradient path (GradCAM).
METHODS = ("predicatt", "gradcam")
TARGET = [[0, 3], [1, 2], [4, 0]]  # fixed classes: a bf16 top class may differ from float32's


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    cfg = ViTConfig(name="tiny-bf16", img_size=(32, 32), patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_dim=64,
                    num_classes=5)
    path = jaxvit.save(tmp_path_factory.mktemp("ckpt") / "tiny", cfg, random_params(cfg, seed=7))
    f32, params = convert.load(str(path))
    bf16, params_bf16 = convert.load(str(path), dtype=jnp.bfloat16)
    x = np.random.default_rng(0).standard_normal((3, 32, 32, 3)).astype(np.float32)
    return f32, bf16, params, params_bf16, x


def _maps(model, params, x, method):
    ex = predmaps.explain(model, params, x, method=method, target=TARGET)
    parts = [ex.maps] + ([ex.weighted_attention, ex.prediction_map] if method == "predicatt" else [])
    return [np.asarray(a, np.float32) for a in parts]


def test_bf16_maps_agree_with_float32(loaded):
    f32, bf16, params, params_bf16, x = loaded
    assert bf16.dtype == jnp.bfloat16 and jax.tree_util.tree_leaves(params_bf16)[0].dtype == jnp.float32
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params_bf16)):
        np.testing.assert_array_equal(a, b)  # README: the params stay float32
    out = bf16.apply({"params": params}, x)
    assert out.logits.dtype == jnp.float32  # README: float32 logits in bf16
    assert rel_err(out.logits, f32.apply({"params": params}, x).logits) <= BF16_TOL
    want = {m: _maps(f32, params, x, m) for m in METHODS}
    for m in METHODS:
        for i, (got, ref) in enumerate(zip(_maps(bf16, params, x, m), want[m])):
            assert rel_err(got, ref) > 1e-4, (m, i)  # bf16 did compute in bf16
            assert rel_err(got, ref) <= BF16_TOL, (m, i)
    # Every two of the maps compared lie further apart than the tolerance.
    maps = want["predicatt"] + want["gradcam"]
    assert min(rel_err(a, b) for i, a in enumerate(maps) for b in maps[i + 1:]) > 3 * BF16_TOL


@functools.partial(jax.jit, static_argnums=0)
def _lrp_maps(model, params, x):
    return [predmaps.explain_fn(model, method=m)(params, x, predmaps.make_targets(TARGET, 3, 5)).maps
            for m in ("transattr", "lrp", "partial_lrp")]


def test_lrp_methods_recompute_in_float32(loaded):
    """A bf16 model's LRP maps are the float32 model's, bit for bit; from bf16-cast params they are
    those of the float32 model with the rounded weights, 1.6% away here (pass the uncast params, as
    the README says)."""
    f32, bf16, params, _, x = loaded
    want = _lrp_maps(f32, params, x)
    for got, ref in zip(_lrp_maps(bf16, params, x), want):
        assert got.dtype == jnp.float32
        np.testing.assert_array_equal(got, ref)
    cast = jaxvit.cast_params(params, jnp.bfloat16)
    rounded = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), cast)
    for got, ref, exact in zip(_lrp_maps(bf16, cast, x), _lrp_maps(f32, rounded, x), want):
        # float32 rounding only (XLA fuses the bf16 -> f32 conversion into other ops): 3e-7 measured,
        # against 1.6e-2 that the weights' rounding makes.
        assert rel_err(got, ref) <= 1e-5
        assert rel_err(got, exact) > 1e-3
