"""jaxvit without torch: config validation and JSON, labels, input errors, unused outputs cost nothing."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import SHARED_DATA
from jaxvit import ViT, ViTConfig, get_config, labels

SMALL = ViTConfig(name="small", img_size=(32, 32), patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_dim=64,
                  num_classes=10)


def test_imagenet_labels_are_readable_and_in_synset_order():
    names, wnids = labels.imagenet_names(), labels.imagenet_wnids()
    assert len(names) == len(wnids) == 1000
    assert list(wnids) == sorted(wnids)  # class index = rank of the wnid, as timm and torchvision
    assert names[281] == "tabby cat" and wnids[281] == "n02123045"
    assert labels.wnid_to_index("n01440764") == 0
    assert get_config("vit_base_patch16_224.augreg2_in21k_ft_in1k").class_name(281) == "tabby cat"
    with pytest.raises(KeyError, match="not an ImageNet-1k WordNet id"):
        labels.wnid_to_index("n99999999")


def test_shared_sample_file_names_map_to_their_classes():
    folder = SHARED_DATA / "imagenet-sample"
    if not folder.is_dir():
        pytest.skip("../shared/data/imagenet-sample is absent")
    for path in sorted(folder.glob("*.JPEG"))[:10]:
        wnid = path.name.split("_")[0]
        index = labels.wnid_to_index(wnid)
        assert labels.imagenet_wnids()[index] == wnid


def test_config_json_round_trip_and_validation():
    cfg = get_config("deit_base_distilled_patch16_224")
    assert ViTConfig.from_json(cfg.to_json()) == cfg
    assert '"imagenet-1k"' in cfg.to_json()  # 1000 names stored by reference, not inline
    assert cfg.num_prefix_tokens == 2 and cfg.grid_size == (14, 14)
    with pytest.raises(ValueError, match="attention-pool heads 'map'/'prr' are not implemented"):
        ViTConfig(global_pool="map")
    with pytest.raises(ValueError, match="unsupported activation 'swiglu'"):
        ViTConfig(act="swiglu")
    with pytest.raises(ValueError, match="global_pool='token' needs a class token"):
        ViTConfig(class_token=False)
    assert "head_input" not in cfg.to_dict()  # the default is left out: configs written before it read the same
    two = SMALL.replace(head_input="token_and_patch_mean")
    assert ViTConfig.from_json(two.to_json()) == two
    with pytest.raises(ValueError, match="unsupported head_input 'patch_mean'"):
        ViTConfig(head_input="patch_mean")
    with pytest.raises(ValueError, match="head_input='token_and_patch_mean' .* needs class_token=True, global_pool"):
        ViTConfig(head_input="token_and_patch_mean", distilled=True)
    assert "posemb" not in cfg.to_dict()  # likewise
    sincos = SMALL.replace(posemb="sincos2d", no_embed_class=True)
    assert ViTConfig.from_json(sincos.to_json()) == sincos
    with pytest.raises(ValueError, match="unsupported posemb 'rope'"):
        ViTConfig(posemb="rope")
    for bad in (dict(), dict(no_embed_class=True, pos_embed=False), dict(no_embed_class=True, embed_dim=6, num_heads=1)):
        with pytest.raises(ValueError, match="posemb='sincos2d' .* needs pos_embed=True, no_embed_class=True and "
                                             "embed_dim a multiple of 4 from 8"):
            ViTConfig(posemb="sincos2d", **bad)
    with pytest.raises(ValueError, match="unknown ViTConfig fields \\['rope'\\]"):
        ViTConfig.from_dict({**dataclasses.asdict(SMALL), "rope": True})
    with pytest.raises(KeyError, match="unknown pretrained tag 'nope' for vit_base_patch16_224; known tags"):
        get_config("vit_base_patch16_224.nope")



def test_config_fields_are_normalised_and_typos_named():
    """img_size takes an int as timm does; lists (from JSON or a user) become tuples, so a config
    stays hashable (it is a static jit argument); a misspelt override names the field."""
    cfg = ViTConfig(img_size=224, mean=[0.1, 0.2, 0.3], std=[1, 1, 1])
    assert cfg.img_size == (224, 224) and cfg.mean == (0.1, 0.2, 0.3) and cfg.std == (1, 1, 1)
    assert ViTConfig(img_size=[64, 32]).img_size == (64, 32) and ViTConfig(img_size=[64, 32]).grid_size == (4, 2)
    hash(cfg)
    assert get_config("vit_base_patch16_224", img_size=384).img_size == (384, 384)
    # A new head (the docstring's own example): the tag's 1000 ImageNet names no longer apply.
    ten = get_config("vit_base_patch16_224", num_classes=10)
    assert ten.num_classes == 10 and ten.label_names is None
    assert get_config("vit_base_patch16_224", num_classes=1000).class_name(281) == "tabby cat"
    assert get_config("vit_base_patch16_224", num_classes=2, label_names=("no", "yes")).class_name(1) == "yes"
    for bad in (0, (224,), (224, -1), "224", True, (224.0, 224.0)):
        with pytest.raises(ValueError, match="img_size must be a positive integer or \\(height, width\\); got"):
            ViTConfig(img_size=bad)
    with pytest.raises(TypeError, match="get_config: 'deph' is not a ViTConfig field \\(did you mean 'depth'\\?\\)"):
        get_config("vit_base_patch16_224", deph=2)
    # The config's own size when it is not a patch multiple (SigLIP so400m 384 / 14), else multiples.
    so400m = get_config("vit_so400m_patch14_siglip_gap_384")
    assert so400m.patch_grid(384, 384) == (27, 27) and so400m.patch_grid(392, 378) == (28, 27)
    with pytest.raises(ValueError, match="image size 380x384 is not a multiple of the patch size 14"):
        so400m.patch_grid(380, 384)


@pytest.fixture(scope="module")
def small_params():
    return ViT(SMALL).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]


def test_input_errors_name_the_problem(small_params):
    model = ViT(SMALL)
    with pytest.raises(ValueError, match=r"images must be \(B, H, W, 3\) channels-last; got shape \(1, 3, 32, 32\)"):
        model.apply({"params": small_params}, jnp.zeros((1, 3, 32, 32)))
    with pytest.raises(ValueError, match="image size 36x32 is not a multiple of the patch size 8"):
        model.apply({"params": small_params}, jnp.zeros((1, 36, 32, 3)))



def test_module_options_are_checked_where_the_module_is_built():
    """A wrong attention, kernels or dtype fails at ViT(...) (so at convert.load), not at the
    first apply deep inside a jitted function."""
    with pytest.raises(ValueError, match=r"unknown attention implementation 'flash'; choose from \('fused', "):
        ViT(SMALL, attention="flash")
    with pytest.raises(ValueError, match="unknown kernels 'triton'; choose from"):
        ViT(SMALL, kernels="triton")
    with pytest.raises(ValueError, match="ViT dtype must be a float dtype"):
        ViT(SMALL, dtype=jnp.int8)
    with pytest.raises(TypeError, match="ViT\\(config=...\\) takes a jaxvit.ViTConfig; got dict"):
        ViT(dataclasses.asdict(SMALL))
    assert ViT(SMALL).clone(attention="materialized").attention == "materialized"


def test_other_resolutions_resample_position_embeddings(small_params):
    out = ViT(SMALL).apply({"params": small_params}, jnp.zeros((2, 48, 40, 3)))
    assert out.tokens.shape == (2, 3, 1 + 6 * 5, 32) and out.attn_cls.shape == (2, 2, 2, 31)


def test_ignored_outputs_are_not_computed(small_params):
    """Under jit, a caller that reads only the logits gets no stacked (B, L+1, T, D) tokens and
    no attention rows: XLA's dead-code elimination drops them."""
    model = ViT(SMALL)
    x = jnp.zeros((2, 32, 32, 3))
    logits_only = jax.jit(lambda p, x: model.apply({"params": p}, x).logits).lower(small_params, x).compile()
    everything = jax.jit(lambda p, x: model.apply({"params": p}, x)).lower(small_params, x).compile()
    stacked = "f32[2,3,17,32]"  # tokens: B=2, L+1=3, T=17, D=32
    assert stacked in everything.as_text()
    assert stacked not in logits_only.as_text()
    assert "f32[2,2,2,17]" not in logits_only.as_text()  # attn_cls


MANY = SMALL.replace(distilled=True, layer_scale=True, qk_norm=True, reg_tokens=2, scale_attn_norm=True,
                    scale_mlp_norm=True, pre_norm=True)


def test_intermediates_are_sown_only_when_asked_and_add_no_ops():
    """The default apply returns only the ViTOutput and its jaxpr is the text of one with `sow`
    made a no-op (no op feeds only a sown value); asked with mutable=[INTERMEDIATES] the output is
    bitwise the same and the sown values are the model's own: block inputs are the output tokens,
    mid + mlp_out the next block's input, probs' row 0 the class-token attention row."""
    import flax.linen as nn

    from jaxvit.model import INTERMEDIATES
    model = ViT(MANY, attention="materialized")
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    params = model.init(jax.random.key(0), x)["params"]
    plain = model.apply({"params": params}, x)
    assert type(plain).__name__ == "ViTOutput"
    out, state = model.apply({"params": params}, x, mutable=[INTERMEDIATES])
    for a, b in ((plain.logits, out.logits), (plain.tokens, out.tokens), (plain.attn_cls, out.attn_cls)):
        np.testing.assert_array_equal(a, b)
    sown = state[INTERMEDIATES]
    for i in range(MANY.depth):
        s = sown[f"blocks_{i}"]
        np.testing.assert_array_equal(s["x"][0], out.tokens[:, i])
        np.testing.assert_array_equal(s["mid"][0] + s["mlp_out"][0], out.tokens[:, i + 1])
        np.testing.assert_array_equal(s["attn"]["probs"][0][:, :, 0], out.attn_cls[:, i])
        assert s["attn"]["q"][0].shape == (2, 1 + 1 + 2 + 16, 2, 16)  # (B, T, H, dh): cls, dist, 2 registers
    assert {"images", "patches", "posemb", "head_in", "logits_cls", "logits_dist"} <= set(sown)

    default = str(jax.make_jaxpr(lambda p, x: model.apply({"params": p}, x))(params, x))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nn.Module, "sow", lambda self, *a, **k: False)
        without_sow = str(jax.make_jaxpr(lambda p, x: model.apply({"params": p}, x))(params, x))
    assert default == without_sow


def test_precision_reaches_every_matmul(small_params):
    """`precision=HIGHEST` is on every dot of the forward (LRP divides by pre-activations, so one
    TF32 matmul on GPU would move its maps); the default leaves every dot as a plain jnp.matmul
    records it (here the test session's jax_default_matmul_precision)."""
    x = jnp.zeros((2, 32, 32, 3))
    plain = jax.make_jaxpr(jnp.matmul)(jnp.zeros((2, 3)), jnp.zeros((3, 4))).eqns[0].params["precision"]

    def dots(model):
        jaxpr = jax.make_jaxpr(lambda p, x: model.apply({"params": p}, x))(small_params, x)
        return [e.params["precision"] for e in jaxpr.eqns if e.primitive.name == "dot_general"]

    for attention in ("fused", "materialized"):
        highest = dots(ViT(SMALL, attention=attention, precision=jax.lax.Precision.HIGHEST))
        assert len(highest) >= 1 + SMALL.depth * 6 + 1  # patches, per block qkv q.k p.v proj fc1 fc2, head
        assert all(p == (jax.lax.Precision.HIGHEST,) * 2 for p in highest), highest
        default = dots(ViT(SMALL, attention=attention))
        assert all(p == plain for p in default), default
    with jax.default_matmul_precision("default"):
        plain = jax.make_jaxpr(jnp.matmul)(jnp.zeros((2, 3)), jnp.zeros((3, 4))).eqns[0].params["precision"]
        assert plain != (jax.lax.Precision.HIGHEST,) * 2  # the check above can tell the two apart
        assert all(p == plain for p in dots(ViT(SMALL)))


def test_cast_params_changes_no_output_bit_and_only_block_dense_leaves(small_params):
    """bf16 block weights stored cast give the same bits as float32 ones cast per call (flax's Dense
    casts kernel and bias to the compute dtype), and only qkv/proj/fc1/fc2 inside blocks change."""
    from jaxvit import cast_params

    # unit-scale random weights: the init's zero head would make the logits comparison vacuous
    leaves, treedef = jax.tree_util.tree_flatten(small_params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree_util.tree_unflatten(treedef, [jax.random.normal(k, l.shape) * 0.3 for k, l in zip(keys, leaves)])
    cast = cast_params(params, jnp.bfloat16)
    changed = {jax.tree_util.keystr(p) for p, l in jax.tree_util.tree_leaves_with_path(cast) if l.dtype == jnp.bfloat16}
    assert changed == {f"['blocks_{i}']['{m}']['{n}']['{w}']" for i in range(SMALL.depth)
                       for m, n in (("attn", "qkv"), ("attn", "proj"), ("mlp", "fc1"), ("mlp", "fc2"))
                       for w in ("kernel", "bias")}
    x = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
    model = ViT(SMALL, dtype=jnp.bfloat16)
    a = model.apply({"params": params}, x)
    b = model.apply({"params": cast}, x)
    for name in ("logits", "tokens", "attn_cls"):
        np.testing.assert_array_equal(np.asarray(getattr(a, name), np.float32), np.asarray(getattr(b, name), np.float32))


@pytest.mark.filterwarnings("ignore:jaxvit. cuDNN fused attention failed:RuntimeWarning")  # forced on CPU
def test_separate_qkv_gemms_compute_the_same_attention(small_params, monkeypatch):
    """On GPU in half precision q, k, v come from one GEMM per kernel slice (no slice copies before
    cuDNN). Forced here on CPU (cuDNN then falls back to the exact kernel): two more dots per
    block, and every output matches the single-GEMM path (same products, other GEMM blocking)."""
    import jaxvit.model as jm

    leaves, treedef = jax.tree_util.tree_flatten(small_params)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    params = jax.tree_util.tree_unflatten(treedef, [jax.random.normal(k, l.shape) * 0.3 for k, l in zip(keys, leaves)])
    x = jax.random.normal(jax.random.key(4), (2, 32, 32, 3))
    for dtype, tol in ((jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)):
        fn = jax.jit(lambda p, x, model=ViT(SMALL, dtype=dtype): model.apply({"params": p}, x))
        one, dots_one = fn(params, x), fn.lower(params, x).as_text().count("dot_general")
        with monkeypatch.context() as m:
            m.setattr(jm, "_cudnn_attention", lambda dt: True)
            fn = jax.jit(lambda p, x, model=ViT(SMALL, dtype=dtype): model.apply({"params": p}, x))
            three, dots_three = fn(params, x), fn.lower(params, x).as_text().count("dot_general")
        assert dots_three == dots_one + 2 * SMALL.depth
        for name in ("logits", "tokens", "attn_cls"):
            a, b = np.asarray(getattr(one, name), np.float32), np.asarray(getattr(three, name), np.float32)
            assert np.linalg.norm(a - b) <= tol * np.linalg.norm(a), (dtype, name)


def test_cudnn_attention_fallback_warns_once_naming_the_failure(small_params, monkeypatch):
    """Where cuDNN attention is tried (GPU, half precision) and fails, the exact kernel runs and one
    warning names the exception, however often the model is traced; on CPU nothing is tried or said."""
    import warnings

    import jaxvit.model as jm

    def failing(*a, **k):
        raise RuntimeError("cuDNN is not available\nsecond line")

    monkeypatch.setattr(jax.nn, "dot_product_attention", failing)
    monkeypatch.setattr(jm, "_CUDNN_FALLBACKS_WARNED", set())
    x = jax.random.normal(jax.random.key(4), (1, 32, 32, 3))
    model = ViT(SMALL, dtype=jnp.bfloat16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet = model.apply({"params": small_params}, x)  # CPU: cuDNN is never tried
        assert not [w for w in caught if "cuDNN" in str(w.message)]
        monkeypatch.setattr(jm, "_cudnn_attention", lambda dt: True)  # as on a GPU
        outs = [model.apply({"params": small_params}, jnp.concatenate([x] * batch))
                for batch in (1, 2)]  # two traces, SMALL.depth blocks each: one warning
    caught = [w for w in caught if "cuDNN" in str(w.message)]
    assert [str(w.message) for w in caught] == [
        "jaxvit: cuDNN fused attention failed (RuntimeError: cuDNN is not available); using jaxvit's own "
        "attention kernel (the same maps, slower)"]
    assert caught[0].category is RuntimeWarning
    np.testing.assert_array_equal(np.asarray(outs[0].logits, np.float32), np.asarray(quiet.logits, np.float32))


def test_half_precision_layer_norm_matches_the_two_pass_form_to_bf16_rounding():
    """bf16 LayerNorm takes both statistics from one pass (E[x^2] - mean^2). On rows whose mean is
    up to 40 standard deviations from zero, where that form cancels most, its output still equals
    the float32 two-pass result up to one bf16 step. float32 output keeps the two-pass form."""
    from jaxvit.model import LayerNorm

    x = (jax.random.normal(jax.random.key(0), (64, 768)) * jnp.linspace(0.5, 3.0, 64)[:, None]
         + jnp.linspace(-20.0, 20.0, 64)[:, None])
    params = {"scale": jax.random.uniform(jax.random.key(1), (768,), minval=0.5, maxval=1.5),
              "bias": jax.random.normal(jax.random.key(2), (768,)) * 0.1}
    x16 = x.astype(jnp.bfloat16)
    x32 = x16.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    two_pass = (x32 - mean) * jax.lax.rsqrt(jnp.square(x32 - mean).mean(-1, keepdims=True) + 1e-6)
    two_pass = two_pass * params["scale"] + params["bias"]
    got = LayerNorm(1e-6, jnp.bfloat16).apply({"params": params}, x16)
    assert got.dtype == jnp.bfloat16
    # one bf16 step (8 significant bits) of the terms that make each value: the scaled, normalised
    # x and the bias (a sum near zero keeps the absolute error of its terms)
    step = 2.0 ** -7 * (jnp.abs(two_pass - params["bias"]) + jnp.abs(params["bias"]))
    assert bool(jnp.all(jnp.abs(got.astype(jnp.float32) - two_pass) <= step))
    got32 = LayerNorm(1e-6, jnp.float32).apply({"params": params}, x32)
    np.testing.assert_array_equal(np.asarray(got32), np.asarray(two_pass))


def test_reprs_are_short_config_fields_outputs_shapes():
    # print(model) listed all 1000 label names; an output's repr printed every value of its arrays.
    cfg = get_config("vit_base_patch16_224.augreg2_in21k_ft_in1k")
    text = repr(cfg)
    assert len(text) < 400 and "<1000 names: 'tench', 'goldfish', 'great white shark', ...>" in text, text
    assert "name='vit_base_patch16_224.augreg2_in21k_ft_in1k'" in text
    assert "embed_dim=32, depth=2" in repr(SMALL) and "embed_dim" not in text  # the fields not at their default
    assert "'tabby cat'" not in repr(ViT(cfg))
    assert repr(ViTConfig()) == "ViTConfig(name='')"
    model = ViT(SMALL)
    params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    out = model.apply({"params": params}, jnp.ones((2, 32, 32, 3)))
    assert repr(out) == ("ViTOutput(logits=float32[2,10], pre_logits=float32[2,32], tokens=float32[2,3,17,32], "
                         "attn_cls=float32[2,2,2,17], attn=None)")
    import predmaps

    ex = predmaps.explain(model, params, jnp.ones((2, 32, 32, 3)), target="top3")
    assert repr(ex) == ("Explanation(maps=float32[2,3,4,4], classes=int32[2,3], logits=float32[2,10], "
                        "head_weights=float32[2,3,2,2], weighted_attention=float32[2,3,4,4], "
                        "prediction_map=float32[2,3,4,4], method='predicatt', layer=2)")


def test_packages_ship_py_typed_and_the_public_types():
    # PEP 561: a type checker reads the packages' annotations only if py.typed is installed with them.
    import tomllib
    import typing
    from pathlib import Path

    import jaxvit
    import predmaps

    root = Path(__file__).resolve().parents[1]
    data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for package in ("jaxvit", "predmaps", "convert"):
        assert "py.typed" in data[package] and (root / package / "py.typed").is_file(), package
    hints = typing.get_type_hints(predmaps.explain)
    assert hints["params"] is jaxvit.Params and hints["target"] == predmaps.Target
    assert str in typing.get_args(predmaps.Target) and int in typing.get_args(predmaps.Target)
