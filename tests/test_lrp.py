"""LRP baselines (predmaps.lrp): parity with Chefer et al.'s own code, forward parity with
jaxvit, conservation, batching, targets, jit.

The live parity test imports Chefer's `baselines/ViT/ViT_LRP.py`, `ViT_orig_LRP.py` and
`ViT_explanation_generator.py` (hila-chefer/Transformer-Explainability) at test time from a
local mirror (tests/chefer_code.py; nothing of it is copied into this repository) and skips when no
mirror is there; tests/test_lrp_reference.py compares with maps stored from that code in every run.
Set CHEFER_REPO to a checkout or a bare git directory of that repository to point elsewhere.
Both sides run in float64 there, so the comparison is exact up to rounding (~1e-12): any
difference of rule, order or normalisation shows as 1e-2 or worse (e.g. a missing halving of
the q relevance: 0.17; no re-normalisation at the residual adds: 1.2). In float32 the rules'
divisions by small pre-activations amplify rounding differences (transattr ~1e-6..4e-5,
last_layer up to 2e-4, full ~1e-3 relative), which a second, looser check covers.

Compilation dominates the run time: methods are compiled together (`_all`) and shapes reused.
"""

import functools
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import chefer_code
from conftest import randomize_timm_, rel_err

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

import convert  # noqa: E402
from jaxvit import ViT  # noqa: E402
from predmaps import lrp  # noqa: E402
from predmaps.targets import make_targets  # noqa: E402

SIZE, NUM_CLASSES = 48, 10


def _timm(name="vit_tiny_patch16_224", seed=0, **kwargs):
    kwargs = {"depth": 2, "img_size": SIZE, "num_classes": NUM_CLASSES, **kwargs}
    return randomize_timm_(timm.create_model(name, pretrained=False, **kwargs), seed=seed)


def _images(n, size=SIZE, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _nhwc(x):
    return x.permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def tiny():
    tm = _timm()
    model, params = convert.load(tm)
    return tm, model, params


@functools.partial(jax.jit, static_argnums=0, static_argnames=("rule",))
def _all(model, params, images, targets, start_layer=0, rule=None):
    """Every method in one compilation (each method's own jit is inlined); rule None: the
    defaults. `start_layer` is traced: one compilation serves both."""
    kw = {} if rule is None else {"rule": rule}
    full = lrp.full_lrp(model, params, images, targets, **kw)
    logits, acts = lrp.forward(model, params, images)
    return {"transattr": lrp.transattr(model, params, images, targets, start_layer, **kw)["maps"],
            "full": full["maps"], "full_pixels": full["pixel_maps"],
            "partial": lrp.partial_lrp(model, params, images, targets, **kw)["maps"],
            "classes": full["classes"], "logits": full["logits"], "forward_logits": logits,
            "forward_tokens": jnp.stack([blk["x"] for blk in acts["blocks"]] + [acts["tokens"]], axis=1)}


METHODS = ("transattr", "full", "partial")


# ----------------------------------------------------------------------------- Chefer's code

@pytest.fixture(scope="module")
def chefer(tmp_path_factory, torch_one_thread):
    repo = chefer_code.default_repo()
    if not repo.exists():
        pytest.skip(f"Chefer's Transformer-Explainability not found at {repo} (set CHEFER_REPO); "
                    "tests/test_lrp_reference.py compares with its stored maps")
    try:
        return chefer_code.load(repo, tmp_path_factory.mktemp("chefer"))
    except (subprocess.CalledProcessError, OSError) as e:
        pytest.skip(f"cannot read Chefer's code from {repo}: {e}")


def _chefer_model(module, tm, dtype):
    return chefer_code.build_model(module, tm.state_dict(), img_size=SIZE, patch_size=16, embed_dim=tm.embed_dim,
                                   depth=len(tm.blocks), num_heads=tm.blocks[0].attn.num_heads,
                                   num_classes=NUM_CLASSES, dtype=dtype)


def _ours(maps, method):
    if method == "grad":  # Chefer's name for transformer attribution in both of its model files
        return np.asarray(maps["transattr"])
    if method == "full":
        pix = np.asarray(maps["full_pixels"])
        return pix.reshape(pix.shape[:2] + (-1,))
    return np.asarray(maps["partial"])


CLASSES = np.array([[3, 7, 1], [0, 5, 9], [8, 2, 4]])  # 3 images x 3 classes


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["ours", "orig"])
def test_matches_chefer_float64(chefer, tiny, rule):
    """Every method, both of Chefer's rule sets (ViT_LRP = 'ours', ViT_orig_LRP = 'orig'), three
    images x three given classes, start_layer 0 and 1: equal to Chefer's maps in float64."""
    tm, model, params = tiny
    ref_model = _chefer_model(chefer["ViT_LRP" if rule == "ours" else "ViT_orig_LRP"], tm, torch.float64)
    x = _images(3).double()
    with jax.enable_x64(True):
        targets = make_targets(CLASSES, 3, NUM_CLASSES)
        by_start = [_all(model, params, _nhwc(x), targets, start, rule=rule) for start in (0, 1)]
        if rule == "orig":  # Chefer's is_ablation variant of "last_layer": relevance x gradient
            ablation = np.asarray(lrp.partial_lrp(model, params, _nhwc(x), targets, rule=rule, grad=True)["maps"])
    assert by_start[0]["transattr"].dtype == jnp.float64
    cases = [("grad", 0), ("grad", 1), ("full", 0), ("last_layer", 0)]
    for method, start in cases:
        ours = _ours(by_start[start], method)
        for i in range(3):
            for j in range(3):
                want = chefer_code.maps(chefer, ref_model, x[i:i + 1], int(CLASSES[i, j]), method, start_layer=start)
                assert rel_err(ours[i, j], want) <= 1e-9, (method, start, i, j)
    if rule == "orig":
        for i in range(3):
            for j in range(3):
                want = chefer_code.maps(chefer, ref_model, x[i:i + 1], int(CLASSES[i, j]), "last_layer", is_ablation=True)
                assert rel_err(ablation[i, j], want) <= 1e-9, ("last_layer ablation", i, j)


def test_matches_chefer_float32(chefer, tiny):
    """The float32 path users run, with the default rules (those of Chefer's evaluation scripts:
    'ours' for transattr from start_layer 1, 'orig' for full and partial LRP), against Chefer's
    float32 code: rounding differences only (amplified by divisions by small pre-activations)."""
    tm, model, params = tiny
    refs = {"ours": _chefer_model(chefer["ViT_LRP"], tm, torch.float32),
            "orig": _chefer_model(chefer["ViT_orig_LRP"], tm, torch.float32)}
    x = _images(1)
    want_cls = int(np.argmax(tm(x).detach().numpy()))
    maps = _all(model, params, _nhwc(x), make_targets([want_cls], 1, NUM_CLASSES), 1)
    for rule, method, start in [("ours", "grad", 1), ("orig", "full", 0), ("orig", "last_layer", 0)]:
        want = chefer_code.maps(chefer, refs[rule], x, None, method, start_layer=start)
        assert rel_err(_ours(maps, method)[0, 0], want) <= 5e-3, (rule, method)


# ----------------------------------------------------------------------------- forward


VARIANTS = [
    # Distillation token and two heads, LayerScale, qk_norm, the attention and MLP scale norms,
    # norm_pre, quick-GELU, no patch bias.
    ("deit_tiny_distilled_patch16_224", {"depth": 1, "init_values": 1.0, "qk_norm": True, "scale_attn_norm": True,
                                         "scale_mlp_norm": True, "pre_norm": True, "act_layer": "quick_gelu"}, 32, 32),
    # Two registers after the class token, position embeddings on the patches only, resampled
    # from the 2x2 grid the model was built for to the 3x3 grid of 48-pixel images.
    ("vit_tiny_patch16_224", {"depth": 1, "reg_tokens": 2, "no_embed_class": True}, 32, 48),
    # A native size that is no multiple of the patch (SigLIP so400m's 384 / 14): the remainder
    # pixels are dropped, as by the model; full LRP's pixel maps cover the 56x56 that is seen.
    ("vit_tiny_patch16_224", {"depth": 1, "patch_size": 8}, 60, 60),
]  # one block each: compilation time grows with depth


@pytest.mark.parametrize("name,kwargs,size,image_size", VARIANTS,
                         ids=["distilled-many-options", "registers-no-embed-class-resampled", "native-non-multiple"])
def test_forward_matches_timm_and_methods_run(name, kwargs, size, image_size):
    """LRP's forward (the activations every rule reads) equals timm's own forward of the same weights, not
    jaxvit's: a bug the LRP forward shared with jaxvit's model would show. Tolerance 1e-5 relative, as
    tests/test_jaxvit_parity.py: float32 rounding of matmul order, erf and softmax (~1e-6 per block)."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    from bench.torch_reference import forward_with_internals

    tm = _timm(name, img_size=size, **kwargs)
    model, params = convert.load(tm)
    images = _images(2, image_size)
    ref_model = tm
    if image_size != size:  # timm resamples the position embeddings when built at the size it runs at
        ref_model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES,
                                      **{**kwargs, "depth": len(tm.blocks), "img_size": image_size})
        ref_model.load_state_dict(checkpoint_filter_fn(tm.state_dict(), ref_model))
    with torch.no_grad():
        ref = forward_with_internals(ref_model, images)
    x = _nhwc(images)
    maps = _all(model, params, x, make_targets("top2", 2, NUM_CLASSES), 0)
    assert rel_err(maps["forward_logits"], ref["logits"].numpy()) <= 1e-5
    assert len(ref["tokens"]) == model.config.depth + 1
    for i, want in enumerate(ref["tokens"]):
        assert rel_err(maps["forward_tokens"][:, i], want.numpy()) <= 1e-5, f"tokens {i}"
    p = model.config.patch_size
    n = (image_size // p) ** 2
    for key in METHODS:
        assert maps[key].shape == (2, 2, n)
        assert np.isfinite(np.asarray(maps[key])).all()
    seen = image_size // p * p
    assert maps["full_pixels"].shape == (2, 2, seen, seen)
    np.testing.assert_array_equal(maps["classes"], np.argsort(-ref["logits"].numpy(), -1)[:, :2])


def test_attention_grads_match_perturbation_hook(tiny):
    """d(logit_c)/d(attention) from our forward equals the jaxvit module's perturbation hook."""
    _, model, params = tiny
    x = _nhwc(_images(2))
    mat = model.clone(attention="materialized")
    _, state = jax.eval_shape(lambda: mat.apply({"params": params}, x, return_attn=True, mutable=["perturbations"]))
    zeros = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), state["perturbations"])

    @jax.jit
    def run(params, x):
        ours = lrp.attention_relevance(model, params, x, make_targets("top", 2, NUM_CLASSES))
        onehot = jax.nn.one_hot(ours["classes"][:, 0], NUM_CLASSES)
        picked = lambda pert: jnp.sum(
            onehot * mat.apply({"params": params, "perturbations": pert}, x, return_attn=True).logits)
        return ours, jax.grad(picked)(zeros)

    ours, hook = run(params, x)
    assert ours["cams"].shape == ours["grads"].shape == (2, 1, 2, 3, 10, 10)
    for i in range(model.config.depth):
        assert rel_err(ours["grads"][:, 0, i], jax.tree_util.tree_leaves(hook[f"blocks_{i}"])[0]) <= 1e-5


# ----------------------------------------------------------------------------- rules


def test_linear_and_add_rules_conserve():
    rng = np.random.default_rng(0)
    linear, add = jax.jit(lrp._linear, static_argnums=(3, 4)), jax.jit(lrp._add, static_argnums=3)
    w = jnp.asarray(rng.normal(size=(16, 8)))
    r = jnp.asarray(rng.normal(size=(4, 8)))
    x_pos = jnp.asarray(np.abs(rng.normal(size=(4, 16))))
    x_mixed = jnp.asarray(rng.normal(size=(4, 16)))
    for rule in lrp.RULES:  # all-positive inputs: both rules conserve, per row
        np.testing.assert_allclose(linear(x_pos, w, r, rule, 1.0).sum(-1), r.sum(-1), rtol=1e-5)
    # 'ours' shares one denominator between the two positive parts: conserves for any input.
    np.testing.assert_allclose(linear(x_mixed, w, r, "ours", 1.0).sum(-1), r.sum(-1), rtol=1e-4)
    # Add, 'ours': the branches share the incoming sum per image, in the ratio |a| : |b|.
    x0, x1, ra = (jnp.asarray(rng.normal(size=(3, 5, 6))) for _ in range(3))
    a, b = add(x0, x1, ra, "ours")
    np.testing.assert_allclose(a.sum((1, 2)) + b.sum((1, 2)), ra.sum((1, 2)), rtol=1e-4)
    za, zb = (np.asarray(v * lrp._sd(ra, x0 + x1)).sum((1, 2)) for v in (x0, x1))
    np.testing.assert_allclose(np.asarray(a.sum((1, 2)) / b.sum((1, 2))), np.abs(za) / np.abs(zb), rtol=1e-4)
    a, b = add(x0, x1, ra, "orig")  # the plain z-rule
    np.testing.assert_allclose(a + b, ra * ((x0 + x1) / (x0 + x1 + 1e-9)), rtol=1e-4)


def test_relevance_conserved_through_network(tiny):
    """Under Chefer's 2021b rules every layer conserves the total: one-hot in, 1 at the tokens;
    the z^B rule conserves from the patch tokens to the pixels."""
    _, model, params = tiny

    @jax.jit
    def run(params, x):
        logits, acts = lrp.forward(model, params, x)
        r = jax.nn.one_hot(jnp.argmax(logits, -1), NUM_CLASSES)
        out = lrp.relprop(model, params, acts, r, rule="ours", to_input=True)
        r_emb, _ = lrp._add(acts["patches"], acts["pos_embed"], out["tokens"], "ours")
        return out["tokens"].sum((1, 2)), out["pixels"].sum((1, 2)), r_emb[:, 1:].sum((1, 2))

    tokens, pixels, patches = run(params, _nhwc(_images(2)))
    np.testing.assert_allclose(tokens, 1.0, atol=1e-3)
    # The patch tokens' share of the residual add with the position embedding reaches the pixels.
    np.testing.assert_allclose(pixels, patches, rtol=1e-3)


# ----------------------------------------------------------------------------- batching, targets, jit


def test_batch_and_k_targets_equal_single_calls(tiny):
    """B images x K classes at once == one image and one class at a time, exactly (float64:
    in float32 the batched matmuls round differently, which the LRP divisions amplify)."""
    _, model, params = tiny
    x = _nhwc(_images(3))
    with jax.enable_x64(True):
        x = x.astype(np.float64)
        many = _all(model, params, x, make_targets(CLASSES, 3, NUM_CLASSES), 0, rule="ours")
        singles = [[_all(model, params, x[i:i + 1], make_targets([int(CLASSES[i, k])], 1, NUM_CLASSES), 0, rule="ours")
                    for k in range(3)] for i in range(3)]
    np.testing.assert_array_equal(many["classes"], CLASSES)
    assert many["full_pixels"].shape == (3, 3, SIZE, SIZE)
    pooled = np.asarray(many["full_pixels"]).reshape(3, 3, 3, 16, 3, 16).sum((3, 5)).reshape(3, 3, 9)
    assert rel_err(many["full"], pooled) <= 1e-12
    for key in METHODS:
        assert many[key].shape == (3, 3, 9)
        for i in range(3):
            for k in range(3):
                assert rel_err(many[key][i, k], singles[i][k][key][0, 0]) <= 1e-9, (key, i, k)


@pytest.mark.slow
def test_large_batches_run_in_sub_batches_with_the_same_maps(tiny, monkeypatch):
    """A batch larger than one pass's memory budget runs as sub-batches under lax.map (here 5 images in
    3 passes of 2, the last padded): every output equals one-image calls (float64, 1e-9), with
    per-example target classes split along with the images and shared ones broadcast."""
    _, model, params = tiny
    x = _nhwc(_images(5, seed=4))
    per_example = np.array([[3, 7], [0, 5], [8, 2], [1, 9], [6, 4]])
    with jax.enable_x64(True):
        x = x.astype(np.float64)
        assert lrp._sub_batch(model.config, x, 2) >= 5  # the default budget: one pass
        monkeypatch.setattr(lrp, "_PASS_BYTES", 2 * lrp._PASS_BYTES // lrp._sub_batch(model.config, x, 2) + 1)
        assert lrp._sub_batch(model.config, x, 2) == 2
        for target in (per_example, [3, 7]):
            targets = make_targets(target, 5, NUM_CLASSES)
            many = _all(model, params, x, targets, 1, rule="ours")
            relevance = lrp.attention_relevance(model, params, x, targets)
            for i in range(5):
                one = make_targets(per_example[i:i + 1] if target is per_example else target, 1, NUM_CLASSES)
                single = _all(model, params, x[i:i + 1], one, 1, rule="ours")
                single_relevance = lrp.attention_relevance(model, params, x[i:i + 1], one)
                for key in METHODS + ("classes", "logits", "full_pixels"):
                    assert many[key].shape[0] == 5
                    assert rel_err(many[key][i], single[key][0]) <= 1e-9, (key, i)
                for key in ("cams", "grads", "classes"):
                    assert rel_err(relevance[key][i], single_relevance[key][0]) <= 1e-9, (key, i)
            np.testing.assert_array_equal(many["classes"], np.broadcast_to(np.asarray(target), (5, 2)))


def test_jit_compiles_once_and_traced_start_layer(tiny):
    """`jax.jit(transattr, static_argnums=0)`: one compilation for two batches of the same shape
    and for every start_layer (traced)."""
    _, model, params = tiny
    fn = jax.jit(lrp.transattr, static_argnums=0)
    targets = make_targets([4], 1, NUM_CLASSES)
    a, b = _nhwc(_images(1, seed=2)), _nhwc(_images(1, seed=3))
    out_a, out_b = fn(model, params, a, targets, 0), fn(model, params, b, targets, 1)
    assert fn._cache_size() == 1
    assert rel_err(out_a["maps"], _all(model, params, a, targets, 0)["transattr"]) <= 1e-6
    assert rel_err(out_b["maps"], _all(model, params, b, targets, 1)["transattr"]) <= 1e-6


def test_refuses_models_without_class_token(tiny):
    _, model, params = tiny
    no_cls = ViT(model.config.replace(class_token=False, global_pool="avg"))
    x = _nhwc(_images(1))
    targets = make_targets("top", 1, NUM_CLASSES)
    for fn in (lrp.transattr, lrp.full_lrp, lrp.partial_lrp, lrp.attention_relevance):
        with pytest.raises(ValueError, match="class token"):
            fn(no_cls, params, x, targets)
    # The explicit forward too: it reads token 0 out, so a pooled model's logits came out wrong
    # (0.9 relative) without an error.
    with pytest.raises(ValueError, match="class token"):
        lrp.forward(no_cls, params, x)
    with pytest.raises(ValueError, match="global_pool='avg'"):
        lrp.forward(ViT(model.config.replace(global_pool="avg")), params, x)
    with pytest.raises(ValueError, match="start_layer"):
        lrp.transattr(model, params, x, targets, 2)
    with pytest.raises(ValueError, match="rule"):
        lrp.full_lrp(model, params, x, targets, rule="z")
    with pytest.raises(ValueError, match="channels-last"):
        lrp.partial_lrp(model, params, x.transpose(0, 3, 1, 2), targets)
