"""jaxvit.fp8 (issue 29): e4m3 quantisation against hand-computed values, an fp8 Dense and qkv against a numpy
reference that quantises the same way (ml_dtypes' e4m3), the GEMMs that go through e4m3 in the model's
jaxpr, the default jaxpr untouched, refusals, and explainers on an fp8 model."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxvit import ViT, ViTConfig, fp8
from jaxvit.model import QKV

SMALL = ViTConfig(name="small", img_size=(32, 32), patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_dim=64,
                  num_classes=10)
BF16 = jnp.bfloat16


def test_scale_is_the_power_of_two_at_or_above_amax_over_448():
    for amax, want in ((448.0, 1.0), (449.0, 2.0), (896.0, 2.0), (1.0, 2.0 ** -8), (0.0, 1.0), (-3.5, 2.0 ** -7)):
        x = jnp.array([amax, amax / 3], jnp.float32)
        assert float(fp8.scale_of(x)) == want, amax  # 1/448 = 2^-8.8 -> 2^-8; 3.5/448 = 2^-7 exactly
    assert float(jnp.finfo(fp8.E4M3).max) == fp8.E4M3_MAX


def test_quantize_rounds_to_nearest_even_and_saturates():
    """e4m3fn: 3 mantissa bits, max 448, smallest subnormal 2^-9; by hand at scale 1."""
    x = jnp.array([0.3, 1.0625, 1.1875, 232.0, 240.0, 500.0, -1000.0, 2.0 ** -9, 2.0 ** -10, 3 * 2.0 ** -10])
    want = [0.3125,  # 0.3 between 0.28125 and 0.3125 (steps of 2^-5 in [0.25, 0.5))
            1.0, 1.25,  # ties (steps of 1/8 in [1, 2)) go to the even mantissa: 1.000, 1.010
            224.0, 240.0,  # 232 ties between 224 (1.110b) and 240 (1.111b): even
            448.0, -448.0,  # clamped, not NaN
            2.0 ** -9, 0.0, 2.0 ** -8]  # subnormals: 2^-10 ties to 0, 3*2^-10 ties to 2*2^-9
    q = fp8.quantize(x, jnp.float32(1.0))
    assert q.dtype == fp8.E4M3
    np.testing.assert_array_equal(np.asarray(q.astype(jnp.float32)), want)
    # with a scale: x / s rounds, dequantize multiplies back exactly in bf16
    s = jnp.float32(2.0 ** -4)
    d = fp8.dequantize(fp8.quantize(jnp.array([0.3 / 16, -20.0]), s), s, BF16)
    assert d.dtype == BF16
    np.testing.assert_array_equal(np.asarray(d.astype(jnp.float32)), [0.3125 / 16, -20.0])  # -320 is e4m3's


def _ref_fake_quant(x):
    """numpy + ml_dtypes: the power-of-two scale, x / s rounded to e4m3, times s (float64)."""
    x = np.asarray(x, np.float64)
    amax = np.abs(x).max()
    s = 2.0 ** np.ceil(np.log2(amax / 448.0)) if amax > 0 else 1.0
    return np.clip(x / s, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float64) * s


def _bf16_tol(ref, bias):
    # the fp8 GEMM's output and the bias add are each rounded to bf16 (2^-9 relative, of at most
    # |x_q @ w_q| + |b|); float32 accumulation order adds ~1e-7: four bf16 half-ulps bound it
    return 4 * 2.0 ** -9 * (np.abs(ref) + np.abs(bias)) + 1e-6


def test_fp8_dense_matches_a_numpy_reference_that_quantises_the_same_way():
    import flax.linen as nn

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, 5, 48)) * rng.uniform(0.1, 3, 48)).astype(np.float32)  # uneven columns
    layer = nn.Dense(24, dtype=BF16, dot_general=fp8.dense_dot_general("fp8", BF16))
    params = {"kernel": jnp.asarray(rng.standard_normal((48, 24)) * 48 ** -0.5, jnp.float32),
              "bias": jnp.asarray(rng.standard_normal(24) * 0.1, jnp.float32)}
    got = np.asarray(layer.apply({"params": params}, jnp.asarray(x, BF16)).astype(jnp.float32), np.float64)
    xb = np.asarray(jnp.asarray(x, BF16).astype(jnp.float32))  # the layer's input, as bf16
    kb = np.asarray(params["kernel"].astype(BF16).astype(jnp.float32))
    bb = np.asarray(params["bias"].astype(BF16).astype(jnp.float32))
    ref = _ref_fake_quant(xb) @ _ref_fake_quant(kb) + bb
    tol = _bf16_tol(ref - bb, bb)
    assert (np.abs(got - ref) <= tol).all(), np.abs(got - ref).max()
    # the tolerance tells fp8 from plain bf16: bf16 GEMMs miss the fp8 reference by far more than it
    plain = nn.Dense(24, dtype=BF16).apply({"params": params}, jnp.asarray(x, BF16)).astype(jnp.float32)
    assert (np.abs(np.asarray(plain) - ref) > tol).mean() > 0.5


def test_fp8_qkv_quantises_once_and_slices_for_separate_gemms():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 5, 32)), BF16)
    params = {"kernel": jnp.asarray(rng.standard_normal((32, 96)) * 32 ** -0.5, jnp.float32),
              "bias": jnp.asarray(rng.standard_normal(96) * 0.1, jnp.float32)}
    xb = np.asarray(x.astype(jnp.float32), np.float64)
    kb = np.asarray(params["kernel"].astype(BF16).astype(jnp.float32), np.float64)
    bb = np.asarray(params["bias"].astype(BF16).astype(jnp.float32), np.float64)
    ref = (_ref_fake_quant(xb) @ _ref_fake_quant(kb)).reshape(2, 5, 3, 2, 16)
    b3 = bb.reshape(3, 2, 16)
    for separate in (False, True):
        q, k, v = QKV(2, 16, dtype=BF16, separate=separate, gemm="fp8").apply({"params": params}, x)
        for i, got in enumerate((q, k, v)):
            got = np.asarray(got.astype(jnp.float32), np.float64)
            assert (np.abs(got - (ref[:, :, i] + b3[i])) <= _bf16_tol(ref[:, :, i], b3[i])).all(), (separate, i)


def _fp8_fed_dots(jaxpr):
    """(dots whose both operands come from fake_quant, the other dots, their precisions) of a top-level jaxpr."""
    producer = {}
    for e in jaxpr.eqns:
        for v in e.outvars:
            producer[v] = e

    def from_e4m3(var):
        while var in producer:
            e = producer[var]
            if e.primitive.name == "custom_jvp_call":
                return "float8_e4m3fn" in str(e.params["call_jaxpr"])
            if e.primitive.name not in ("reshape", "slice", "squeeze", "transpose", "broadcast_in_dim"):
                return False
            var = e.invars[0]
        return False

    fed, other, prec = 0, 0, []
    for e in jaxpr.eqns:
        if e.primitive.name == "dot_general":
            if all(from_e4m3(v) for v in e.invars):
                fed += 1
                prec.append(e.params["precision"])
            else:
                assert not any(from_e4m3(v) for v in e.invars), "a dot with one fp8 operand"
                other += 1
    return fed, other, prec


@pytest.mark.parametrize("attention", ["fused", "materialized"])
def test_fp8_model_quantises_exactly_qkv_proj_fc1_fc2(attention):
    """Each block's four GEMMs take both operands through e4m3; patch embedding, attention and head do not."""
    x = jnp.zeros((2, 32, 32, 3))
    params = ViT(SMALL).init(jax.random.key(0), x)["params"]
    for gemm, want in (("fp8", jax.lax.Precision.HIGHEST), ("fp8_fast", jax.lax.Precision.DEFAULT)):
        model = ViT(SMALL, dtype=BF16, attention=attention, gemm=gemm)
        jaxpr = jax.make_jaxpr(lambda p, x: model.apply({"params": p}, x))(params, x).jaxpr
        fed, other, prec = _fp8_fed_dots(jaxpr)
        assert fed == 4 * SMALL.depth
        assert other >= 1 + 1 + (2 * SMALL.depth if attention == "materialized" else 0)  # patches, head, q.k p.v
        assert all(p == (want, want) for p in prec), prec
        assert str(jaxpr).count("new_dtype=float8_e4m3fn") == 2 * 4 * SMALL.depth


def test_default_and_float32_models_have_the_jaxpr_without_fp8(monkeypatch):
    """The default model never calls the fp8 code (its jaxpr text is the same with that code made to fail),
    and gemm='fp8' at float32 (predmaps' LRP re-runs models in float32) is the float32 model itself."""
    x = jnp.zeros((2, 32, 32, 3))
    params = ViT(SMALL).init(jax.random.key(0), x)["params"]

    def text(model):
        return str(jax.make_jaxpr(lambda p, x: model.apply({"params": p}, x))(params, x))

    before = {dt: text(ViT(SMALL, dtype=dt)) for dt in (jnp.float32, BF16)}
    fp8_f32 = text(ViT(SMALL, gemm="fp8"))

    def fail(*a, **k):
        raise AssertionError("fp8 code reached by a model that does not quantise")

    monkeypatch.setattr(fp8, "fake_quant", fail)
    monkeypatch.setattr(fp8, "matmul", fail)
    for dt, want in before.items():
        assert text(ViT(SMALL, dtype=dt)) == want
        assert "float8" not in want
    assert fp8_f32 == before[jnp.float32]


def test_gemm_option_refused_where_it_cannot_hold():
    with pytest.raises(ValueError, match=r"unknown gemm 'int8'; choose from \('dtype', 'fp8', 'fp8_fast'\)"):
        ViT(SMALL, dtype=BF16, gemm="int8")
    for kernels in ("pallas", "pallas_mlp"):
        with pytest.raises(ValueError, match="gemm='fp8' quantises fc1, which kernels with 'mlp' run as a Pallas"):
            ViT(SMALL, dtype=BF16, gemm="fp8", kernels=kernels)
    ViT(SMALL, dtype=BF16, gemm="fp8", kernels="pallas_layernorm_head")  # no GEMM of its own: allowed
    with pytest.raises(ValueError, match="jaxvit.fp8 computes Dense's x @ kernel only"):
        fp8.dense_dot_general("fp8", BF16)(jnp.ones((2, 3)), jnp.ones((2, 4)), (((0,), (0,)), ((), ())))


def test_explainers_run_unchanged_on_an_fp8_model():
    """PredicAtt and a gradient method (straight-through gradients: finite, nonzero). LRP clones any model
    to float32, where gemm='fp8' is the float32 model itself (the jaxpr test above)."""
    import predmaps

    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 32, 32, 3)), jnp.float32)
    init = ViT(SMALL).init(jax.random.key(0), x)["params"]
    leaves, treedef = jax.tree_util.tree_flatten(init)
    params = jax.tree_util.tree_unflatten(treedef, [  # unit fan-in weights: the init's zero head explains nothing
        jnp.asarray(rng.standard_normal(a.shape) * (a.shape[0] ** -0.5 if a.ndim >= 2 else 0.1), a.dtype)
        for a in leaves])
    m8, m16 = ViT(SMALL, dtype=BF16, gemm="fp8"), ViT(SMALL, dtype=BF16)
    for method in ("predicatt", "generic_attention"):
        e8 = predmaps.explain(m8, params, x, method=method, target="top")
        e16 = predmaps.explain(m16, params, x, method=method, target="top")
        a, b = np.asarray(e8.maps, np.float64), np.asarray(e16.maps, np.float64)
        assert np.isfinite(a).all() and np.abs(a).max() > 0, method
        # the same maps up to fp8 noise (generic attention measured 0.03 here); gradients through JAX's own
        # rule for the e4m3 convert (tangents rounded to e4m3 unscaled) missed the bf16 maps entirely (1.0)
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 0.5, method
