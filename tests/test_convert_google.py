"""Google's JAX ViT checkpoints (.npz): read by convert.load, checked against timm reading the same file.

The files are written here from random timm models in the layouts of google-research/vision_transformer
and big_vision; timm's own `.npz` loader (`model.load_pretrained(path)`) reading them is the independent
check that they are in the real layout, and its outputs the reference. Tolerance 1e-5 (float32, two
implementations of the same arithmetic: ~1e-6 apart in practice).
"""

from __future__ import annotations

import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

import convert  # noqa: E402
import jaxvit  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")
TOL = 1e-5


def _random_timm(seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, num_classes=5)
    args.update(kw)
    arch = args.pop("arch", "vit_base_patch16_224")
    model = timm.create_model(arch, pretrained=False, **args).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def _google_arrays(model, *, big_vision=False, scanned=False, prefix=""):
    """The model's weights as a Google .npz would hold them (written from the layout, not by convert)."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    heads = model.blocks[0].attn.num_heads
    d = sd["patch_embed.proj.weight"].shape[0]
    w = {"embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
         "embedding/bias": sd["patch_embed.proj.bias"],
         "Transformer/encoder_norm/scale": sd["norm.weight"], "Transformer/encoder_norm/bias": sd["norm.bias"],
         "head/kernel": sd["head.weight"].T, "head/bias": sd["head.bias"]}
    if "cls_token" in sd:
        w["cls"] = sd["cls_token"]
    w["pos_embedding" if big_vision else "Transformer/posembed_input/pos_embedding"] = sd["pos_embed"]
    mha, mlp, ln2 = ("MultiHeadDotProductAttention_0", "MlpBlock_0", "LayerNorm_1") if big_vision else \
        ("MultiHeadDotProductAttention_1", "MlpBlock_3", "LayerNorm_2")
    blocks = []
    for i in range(len(model.blocks)):
        b = f"blocks.{i}."
        qkv_w, qkv_b = sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]
        blk = {"LayerNorm_0/scale": sd[b + "norm1.weight"], "LayerNorm_0/bias": sd[b + "norm1.bias"],
               f"{ln2}/scale": sd[b + "norm2.weight"], f"{ln2}/bias": sd[b + "norm2.bias"],
               f"{mha}/out/kernel": sd[b + "attn.proj.weight"].T.reshape(heads, d // heads, d),
               f"{mha}/out/bias": sd[b + "attn.proj.bias"]}
        for j, n in enumerate(("query", "key", "value")):
            blk[f"{mha}/{n}/kernel"] = qkv_w[j * d:(j + 1) * d].T.reshape(d, heads, d // heads)
            blk[f"{mha}/{n}/bias"] = qkv_b[j * d:(j + 1) * d].reshape(heads, d // heads)
        for r in (0, 1):
            blk[f"{mlp}/Dense_{r}/kernel"] = sd[b + f"mlp.fc{r + 1}.weight"].T
            blk[f"{mlp}/Dense_{r}/bias"] = sd[b + f"mlp.fc{r + 1}.bias"]
        blocks.append(blk)
    if scanned:
        for k in blocks[0]:
            w[f"Transformer/encoderblock/{k}"] = np.stack([blk[k] for blk in blocks])
    else:
        for i, blk in enumerate(blocks):
            w.update({f"Transformer/encoderblock_{i}/{k}": v for k, v in blk.items()})
    return {prefix + k: v for k, v in w.items()}


def _reference(model_args, path, x):
    """timm's model of the same architecture, its weights read from the .npz by timm's own loader."""
    ref = _random_timm(seed=123, **model_args)  # other weights: everything must come from the file
    ref.load_pretrained(str(path))
    with torch.no_grad():
        return ref(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()


def _ours(path, x, **kw):
    model, params = convert.load(path, **kw)
    return np.asarray(model.apply({"params": params}, x).logits), model


def _images(size, seed=1):
    return np.random.default_rng(seed).standard_normal((2, size, size, 3)).astype(np.float32)


@pytest.mark.parametrize("layout", ["vision_transformer", "opt_target"])
def test_vision_transformer_npz_matches_timm(layout, tmp_path):
    # Without a name, every size comes from the file and the MLP runs flax's default GELU (tanh form),
    # as the JAX models compute it: timm built with act_layer='gelu_tanh' is the same network.
    args = dict(act_layer="gelu_tanh")
    model = _random_timm(**args)
    path = tmp_path / "ViT-tiny.npz"
    np.savez(path, **_google_arrays(model, prefix="opt/target/" if layout == "opt_target" else ""))
    x = _images(32)
    ours, jmodel = _ours(path, x)
    np.testing.assert_allclose(ours, _reference(args, path, x), atol=TOL, rtol=0)
    cfg = jmodel.config
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.patch_size, cfg.num_classes) == (48, 2, 4, 8, 5)
    assert cfg.act == "gelu_tanh" and cfg.img_size == (32, 32)


@pytest.mark.parametrize("scanned", [False, True])
def test_big_vision_gap_npz_matches_timm(scanned, tmp_path):
    # big_vision: params/ prefix, its module names, pos_embedding at the top, global average pooling
    # (the SigLIP-style 'gap' ViTs: encoder_norm before the pool), blocks scanned or not.
    args = dict(act_layer="gelu_tanh", class_token=False, global_pool="avg", fc_norm=False)
    model = _random_timm(**args)
    path = tmp_path / "bv.npz"
    np.savez(path, **_google_arrays(model, big_vision=True, scanned=scanned, prefix="params/"))
    x = _images(32)
    ours, jmodel = _ours(path, x)
    np.testing.assert_allclose(ours, _reference(args, path, x), atol=TOL, rtol=0)
    assert jmodel.config.global_pool == "avg" and not jmodel.config.class_token


def test_sincos2d_values_by_hand():
    """big_vision's posemb_sincos_2d at grid (2, 3), width 8: quarters sin(col w), cos(col w), sin(row w),
    cos(row w), w = 10000^(-k / (quarter - 1)) = (1, 1e-4); tokens row-major."""
    from jaxvit.posemb import sincos2d

    pe = sincos2d((2, 3), 8)
    assert pe.shape == (1, 6, 8) and pe.dtype == np.float32
    row, col = 1, 2  # token 5
    want = [np.sin(col), np.sin(col * 1e-4), np.cos(col), np.cos(col * 1e-4),
            np.sin(row), np.sin(row * 1e-4), np.cos(row), np.cos(row * 1e-4)]
    np.testing.assert_allclose(pe[0, 5], want, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(pe[0, 0], [0, 0, 1, 1, 0, 0, 1, 1])


@pytest.mark.parametrize("class_token", [False, True])
def test_big_vision_sincos2d_npz_matches_timm(class_token, tmp_path):
    """A big_vision file without a position embedding is a posemb='sincos2d' model (the plain ViT baselines): fixed
    sine-cosine rows added to the patch tokens before the class token joins, computed for each input's grid, so
    a larger input gets the larger grid's rows, not resampled ones. Reference: timm with no_embed_class and its
    pos_embed set to those rows, at each size."""
    from jaxvit.posemb import sincos2d

    args = dict(act_layer="gelu_tanh", class_token=class_token, no_embed_class=True,
                **({} if class_token else dict(global_pool="avg", fc_norm=False)))
    model = _random_timm(**args)
    arrays = _google_arrays(model, big_vision=True, prefix="params/")
    del arrays["params/pos_embedding"]
    path = tmp_path / "bv_sincos.npz"
    np.savez(path, **arrays)
    for size in (32, 48):
        ref = _random_timm(seed=123, img_size=size, **args)
        ref.load_state_dict({k: v for k, v in model.state_dict().items() if k != "pos_embed"}, strict=False)
        with torch.no_grad():
            ref.pos_embed.copy_(torch.from_numpy(sincos2d((size // 8, size // 8), 48)))
            want = ref(torch.from_numpy(_images(size)).permute(0, 3, 1, 2)).numpy()
        ours, jmodel = _ours(path, _images(size))
        np.testing.assert_allclose(ours, want, atol=TOL, rtol=0)
    cfg = jmodel.config
    assert (cfg.posemb, cfg.no_embed_class, cfg.class_token) == ("sincos2d", True, class_token)
    assert "pos_embed" not in convert.load(path)[1]  # nothing stored: the rows are computed
    assert convert.load(path, img_size=48)[0].config.img_size == (48, 48)  # nothing to resample either
    jaxvit.save(tmp_path / "ck", cfg, convert.load(path)[1])  # a jaxvit checkpoint keeps posemb
    m2, p2 = jaxvit.load(tmp_path / "ck")
    assert m2.config == cfg
    np.testing.assert_array_equal(np.asarray(m2.apply({"params": p2}, _images(48)).logits), ours)
    with pytest.raises(ValueError, match="no fixed sincos2d position embedding.*jaxvit checkpoint"):
        convert.save_timm(convert.load(path)[1], cfg, tmp_path / "timm_out")


def test_timm_name_and_big_vision_variant_set_the_architecture(tmp_path):
    # A timm name gives timm's network (exact GELU) and data settings; "Ti/16" is big_vision's name for
    # the same sizes, with flax's GELU. Each is checked against timm reading the file.
    x = _images(64)
    for name, act in (("vit_tiny_patch16_224", "gelu"), ("Ti/16", "gelu_tanh")):
        args = dict(arch="vit_tiny_patch16_224", img_size=64, patch_size=16, embed_dim=192, depth=12, num_heads=3,
                    act_layer=act)
        model = _random_timm(seed=2, **args)
        path = tmp_path / f"{act}.npz"
        np.savez(path, **_google_arrays(model))
        ours, jmodel = _ours(path, x, model_name=name)
        np.testing.assert_allclose(ours, _reference(args, path, x), atol=TOL, rtol=0)
        assert jmodel.config.act == act and jmodel.config.name.startswith(name)
    with pytest.raises(convert.CheckpointMismatchError, match=r"does not match S/16: embed_dim 192 in the file, 384"):
        convert.load(path, model_name="S/16")


def test_npz_is_recognised_by_content_not_name(tmp_path):
    model = _random_timm(act_layer="gelu_tanh")
    path = tmp_path / "weights.data"  # np.savez to a file object keeps any name
    with open(path, "wb") as f:
        np.savez(f, **_google_arrays(model))
    x = _images(32)
    ours, _ = _ours(path, x)
    torch_x = torch.from_numpy(x).permute(0, 3, 1, 2)
    with torch.no_grad():
        np.testing.assert_allclose(ours, model(torch_x).numpy(), atol=TOL, rtol=0)


@pytest.mark.parametrize("layout", [dict(), dict(big_vision=True, prefix="params/"),
                                    dict(big_vision=True, scanned=True, prefix="params/")])
def test_each_missing_array_is_refused_by_its_own_name(layout, tmp_path):
    """Every array of a Google ViT .npz, removed alone, is refused with exactly its name; except big_vision's
    position embedding, whose absence is the sincos2d option. The config is read off the arrays, so before,
    a missing conv bias loaded a model without one, a missing attention bias or encoder-norm scale was reported
    as other, unexpected arrays, a missing class token as a position grid error, and a missing embedding kernel
    as 'not a timm VisionTransformer'."""
    arrays = _google_arrays(_random_timm(), **layout)
    keys = [k for k in arrays if k != "params/pos_embedding"]
    assert len(keys) > 20
    for i, key in enumerate(keys):
        path = tmp_path / f"{i}.npz"
        np.savez(path, **{k: v for k, v in arrays.items() if k != key})
        with pytest.raises(convert.CheckpointMismatchError, match=rf"missing arrays \[{re.escape(repr(key))}\]"):
            convert.load(path)


def test_npz_loading_is_strict_and_refuses_what_jaxvit_lacks(tmp_path):
    arrays = _google_arrays(_random_timm())

    def load(extra=None, drop=None, **kw):
        w = dict(arrays, **(extra or {}))
        w.pop(drop, None)
        path = tmp_path / "x.npz"
        np.savez(path, **w)
        return convert.load(path, **kw)

    with pytest.raises(convert.CheckpointMismatchError, match=r"unexpected arrays \['Transformer/extra/kernel'\]"):
        load({"Transformer/extra/kernel": np.zeros(3, np.float32)})
    with pytest.raises(convert.CheckpointMismatchError,
                       match=r"missing arrays \['Transformer/encoderblock_1/MlpBlock_3/Dense_0/bias'\]"):
        load(drop="Transformer/encoderblock_1/MlpBlock_3/Dense_0/bias")
    # A two-tower file: the image tower under params/img/ is read, the text tower and logit scale are set
    # aside, and anything else is named.
    two_tower = {**{f"params/img/{k}": v for k, v in arrays.items()}, "params/txt/Embed_0/embedding": np.zeros(2),
                 "params/t": np.zeros(1)}
    np.savez(tmp_path / "two.npz", **two_tower)
    assert convert.load(tmp_path / "two.npz")[0].config.embed_dim == 48
    np.savez(tmp_path / "two.npz", **two_tower, **{"stray/kernel": np.zeros(1)})
    with pytest.raises(convert.CheckpointMismatchError, match=r"unexpected arrays \['stray/kernel'\]"):
        convert.load(tmp_path / "two.npz")
    with pytest.raises(convert.UnsupportedModelError, match="MAP attention-pool head.*supported: plain ViTs"):
        load({"MAPHead_0/probe": np.zeros((1, 1, 48), np.float32)})
    # the original layout always stores its position embedding (big_vision's sincos2d files are another layout)
    with pytest.raises(convert.CheckpointMismatchError, match=r"missing arrays \['Transformer/posembed_input/pos_emb"):
        load(drop="Transformer/posembed_input/pos_embedding")
    with pytest.raises(convert.UnsupportedModelError, match="pre_logits representation layer"):
        load({"pre_logits/kernel": np.zeros((48, 48), np.float32)})
    with pytest.raises(convert.CheckpointMismatchError, match="its attention kernels have 4 heads, 3 expected"):
        load(model_name="vit_tiny_patch16_224")
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, embedding=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="holds pickled objects"):
        convert.load(pickled)
