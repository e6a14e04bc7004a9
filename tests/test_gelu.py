"""jaxvit.gelu (issue 29): tanh GELU against its formula in numpy, fc1 + bias + GELU in the model's jaxpr in the
form XLA:GPU's gemm rewriter folds into a cuBLASLt BIAS_GELU epilogue, the default and float32 jaxprs untouched,
refusals."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from jaxvit import ViT, ViTConfig, gelu

SMALL = ViTConfig(name="small", img_size=(32, 32), patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_dim=64,
                  num_classes=10)
BF16 = jnp.bfloat16


def test_tanh_gelu_is_the_tanh_formula_not_the_erf_one():
    """float32 against numpy float64 (torch's documented GELU(approximate='tanh')): within float32 rounding (1e-6),
    while exact GELU differs from it by up to ~5e-4 around |x| ~ 2, so the reference tells the two apart."""
    x = np.linspace(-6, 6, 2401)
    want = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    exact = 0.5 * x * (1 + erf(x / math.sqrt(2)))
    got = np.asarray(gelu.tanh_gelu(jnp.asarray(x, jnp.float32)), np.float64)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert np.abs(want - exact).max() > 1e-4


def _eqns(jaxpr):
    """Every equation, sub-jaxprs (pjit, custom_jvp) included."""
    for e in jaxpr.eqns:
        yield e
        for p in e.params.values():
            for sub in (p if isinstance(p, (list, tuple)) else [p]):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _eqns(inner)


def epilogue_gelus(jaxpr) -> int:
    """How many GELUs read a dense layer's output (dot, optional reshape, + bias) as gemm_rewriter.cc's
    approximate-GELU matcher wants it: q = mul(y, mul(0.5, add(1, tanh(mul(c, add(y, mul(0.044715, mul(y,
    mul(y, y))))))))), c ~ sqrt(2/pi), every operand order, y used by those four ops only (a fifth use makes
    XLA keep y as a second output, BIAS_GELU_AUX)."""
    import jax.extend.core as jc

    eqns = list(_eqns(jaxpr))
    producer = {id(v): e for e in eqns for v in e.outvars}
    users = {}
    for e in eqns:
        for v in e.invars:
            if not isinstance(v, jc.Literal) and e not in users.setdefault(id(v), []):
                users[id(v)].append(e)  # one entry per using op, as XLA counts users (mul(y, y) is one)

    def op(v, name):
        e = None if isinstance(v, jc.Literal) else producer.get(id(v))
        return e if e is not None and e.primitive.name == name else None

    def lit(v, value, rtol):
        return isinstance(v, jc.Literal) and abs(float(v.val) - value) <= rtol * abs(value)

    def split(e, value, rtol=2 ** -8):  # (the non-constant operand) of a binary op with a constant, either order
        a, b = e.invars
        return b if lit(a, value, rtol) else a if lit(b, value, rtol) else None

    def is_gemm_out(y):
        add = op(y, "add")
        if add is None:
            return False
        return any((op(v, "dot_general") or (op(v, "reshape") and op(producer[id(v)].invars[0], "dot_general")))
                   for v in add.invars)

    found = 0
    for t in (e for e in eqns if e.primitive.name == "tanh"):
        m = op(t.invars[0], "mul")
        inner = m and split(m, math.sqrt(2 / math.pi))
        add = inner is not None and op(inner, "add")
        if not add:
            continue
        for y, k in (add.invars, add.invars[::-1]):
            cube_scaled = op(k, "mul")
            cube = cube_scaled and split(cube_scaled, 0.044715)
            mj = cube is not None and op(cube, "mul")
            if not mj or y not in mj.invars:
                continue
            other = mj.invars[1] if mj.invars[0] is y else mj.invars[0]
            sq = op(other, "mul")
            if not sq or list(sq.invars) != [y, y] or not is_gemm_out(y):
                continue
            one = [u for u in users.get(id(t.outvars[0]), []) if u.primitive.name == "add"]
            half = [u for a in one if split(a, 1.0, 0) is not None for u in users.get(id(a.outvars[0]), [])
                    if u.primitive.name == "mul" and split(u, 0.5, 0) is not None]
            final = [u for h in half for u in users.get(id(h.outvars[0]), [])
                     if u.primitive.name == "mul" and y in u.invars]
            if final and len(users[id(y)]) == 4:
                found += 1
    return found


def _jaxpr(model, params, x):
    return jax.make_jaxpr(lambda p, x: model.apply({"params": p}, x))(params, x).jaxpr


@pytest.mark.parametrize("gemm", ["dtype", "fp8"])
def test_tanh_option_spells_fc1_bias_gelu_as_the_rewriter_matches_it(gemm):
    """One matching fc1 + bias + GELU per block in bf16 (also under fp8 GEMMs, whose fc1 is a 2-D dot reshaped);
    none in the default model (exact erf GELU)."""
    x = jnp.zeros((2, 32, 32, 3))
    params = ViT(SMALL).init(jax.random.key(0), x)["params"]
    tanh = _jaxpr(ViT(SMALL, dtype=BF16, gelu="tanh", gemm=gemm), params, x)
    assert epilogue_gelus(tanh) == SMALL.depth
    assert "erf" not in str(tanh)
    default = _jaxpr(ViT(SMALL, dtype=BF16, gemm=gemm), params, x)
    assert epilogue_gelus(default) == 0 and "tanh" not in str(default) and "erf" in str(default)


def test_default_and_float32_models_keep_exact_gelu():
    """gelu='tanh' at float32 (also predmaps' LRP, which re-runs any model in float32) is the float32 model
    itself, jaxpr text for text; the default is 'erf'."""
    x = jnp.zeros((2, 32, 32, 3))
    params = ViT(SMALL).init(jax.random.key(0), x)["params"]
    f32 = str(_jaxpr(ViT(SMALL), params, x))
    assert str(_jaxpr(ViT(SMALL, gelu="tanh"), params, x)) == f32
    assert str(_jaxpr(ViT(SMALL, dtype=BF16, gelu="tanh").clone(dtype=jnp.float32), params, x)) == f32
    assert ViT(SMALL).gelu == "erf"


def _images_and_unit_params(seed, batch):
    """Normal images and unit-fan-in random weights (the init's zero head explains nothing)."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((batch, 32, 32, 3)), jnp.float32)
    leaves, treedef = jax.tree_util.tree_flatten(ViT(SMALL).init(jax.random.key(0), x)["params"])
    return x, jax.tree_util.tree_unflatten(treedef, [
        jnp.asarray(rng.standard_normal(a.shape) * (a.shape[0] ** -0.5 if a.ndim >= 2 else 0.1), a.dtype)
        for a in leaves])


def test_tanh_option_moves_a_bf16_forward_by_less_than_bf16_itself():
    """Logits of a random unit-fan-in model: tanh vs erf in bf16 differ by less than bf16 differs from float32
    (bench/NOTES.md has the measured sizes); a wrong GELU (e.g. ReLU-like) would exceed it."""
    x, params = _images_and_unit_params(3, 4)

    def logits(model):
        with jax.default_matmul_precision("highest"):
            return np.asarray(model.apply({"params": params}, x).logits, np.float64)

    f32, erf16, tanh16 = logits(ViT(SMALL)), logits(ViT(SMALL, dtype=BF16)), logits(ViT(SMALL, dtype=BF16, gelu="tanh"))
    rel = lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b)  # noqa: E731
    assert 0 < rel(tanh16, erf16) < 2 * rel(erf16, f32)


def test_gelu_option_refused_where_it_cannot_hold():
    with pytest.raises(ValueError, match=r"unknown gelu 'exact'; choose from \('erf', 'tanh'\)"):
        ViT(SMALL, dtype=BF16, gelu="exact")
    for kernels in ("pallas", "pallas_mlp"):
        with pytest.raises(ValueError, match="gelu='tanh' computes fc1's GELU in the GEMM's epilogue"):
            ViT(SMALL, dtype=BF16, gelu="tanh", kernels=kernels)
    ViT(SMALL, dtype=BF16, gelu="tanh", kernels="pallas_layernorm_head")


@pytest.mark.slow
def test_gelu_numerics_variants_swap_the_function_and_put_it_back():
    """bench.gelu_numerics' float32-math variants: the tanh formula where the option puts it, nothing else
    changed (close to the spelled variant, far from zero difference in float32), and the library restored."""
    from bench.fp8_numerics import deviations, outputs
    from bench.gelu_numerics import fp32_tanh_outputs, tanh_f32_outputs

    x, params = _images_and_unit_params(4, 2)
    spelled, active = gelu.tanh_gelu, gelu.active
    m32 = ViT(SMALL)
    classes = np.zeros(2, int)
    base = outputs(m32, params, x, classes)
    # the approximation alone in float32: nonzero, and under 1e-2 (tanh vs erf GELU differ by at most ~5e-4)
    d = deviations(fp32_tanh_outputs(m32, params, x, classes), base)["logits"]["rel_l2"]
    assert 0 < d < 1e-2
    t16 = tanh_f32_outputs(ViT(SMALL, dtype=BF16, gelu="tanh"), params, x, classes)
    assert deviations(t16, base)["logits"]["rel_l2"] < 5e-2  # bf16 model: within bf16's own distance
    assert gelu.tanh_gelu is spelled and gelu.active is active
