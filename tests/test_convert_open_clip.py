"""open_clip checkpoints (the image tower): convert.load against open_clip's own encode_image.

Tiny random-weight open_clip CLIP models (depth 2, width 32) are saved as open_clip hub repos hold
them (open_clip_model.safetensors + open_clip_config.json); open_clip's forward is the reference at
tolerance 1e-5 (float32, two implementations of the same arithmetic). The eval transform is compared
bit for bit with open_clip's `image_transform` on the shipped photos.
"""

from __future__ import annotations

import json
import pathlib
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

import convert  # noqa: E402
from convert import openclip  # noqa: E402
from jaxvit import preprocess  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")
TOL = 1e-5
ROOT = pathlib.Path(__file__).resolve().parents[1]
TEXT_CFG = dict(context_length=16, vocab_size=99, width=32, heads=4, layers=1)


def _model_cfg(**vision):
    return dict(embed_dim=24, quick_gelu=vision.pop("quick_gelu", True),
                vision_cfg=dict(image_size=32, layers=2, width=32, patch_size=8, head_width=8, **vision),
                text_cfg=TEXT_CFG)


def _random_clip(model_cfg, seed=0):
    torch.manual_seed(seed)
    model = open_clip.CLIP(**model_cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name and name.endswith("weight") or name.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _save(model, model_cfg, out: pathlib.Path, preprocess_cfg=None) -> pathlib.Path:
    from safetensors.torch import save_file

    out.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))
    cfg = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg or {
        "mean": list(openclip.OPENAI_MEAN), "std": list(openclip.OPENAI_STD)}}
    (out / "open_clip_config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize("vision", [
    {},  # OpenAI's layout: class token, QuickGELU
    {"quick_gelu": False, "ls_init_value": 0.1},  # GELU, LayerScale
    {"pool_type": "avg"},  # mean of the patch tokens after ln_post
    {"pool_type": "avg", "final_ln_after_pool": True},  # ln_post after the pool
    {"no_ln_pre": True},
])
def test_open_clip_image_tower_matches_encode_image(vision, tmp_path):
    model_cfg = _model_cfg(**vision)
    oc = _random_clip(model_cfg)
    path = _save(oc, model_cfg, tmp_path / "oc")
    x = np.random.default_rng(1).standard_normal((2, 32, 32, 3)).astype(np.float32)
    model, params = convert.load(path)
    ours = np.asarray(model.apply({"params": params}, x).logits)
    with torch.no_grad():
        ref = oc.encode_image(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)
    assert model.config.act == ("quick_gelu" if vision.get("quick_gelu", True) else "gelu")


def test_open_clip_hub_repo_reads_the_cache_offline(tmp_path, hub_repo):
    # open_clip repos hold open_clip_model.safetensors and open_clip_config.json, no config.json.
    model_cfg = _model_cfg()
    folder = _save(_random_clip(model_cfg), model_cfg, tmp_path / "oc")
    hub_repo("laion/tiny-clip", folder)
    model, params = convert.load("laion/tiny-clip")
    ref_model, ref_params = convert.load(folder)
    assert model.config == ref_model.config.replace(name="laion/tiny-clip")
    x = np.random.default_rng(1).standard_normal((1, 32, 32, 3)).astype(np.float32)
    np.testing.assert_array_equal(model.apply({"params": params}, x).logits,
                                  ref_model.apply({"params": ref_params}, x).logits)


def test_towers_split_cleanly():
    model_cfg = _model_cfg()
    sd = {k: v.numpy() for k, v in _random_clip(model_cfg).state_dict().items()}
    visual, text = openclip.split_towers(sd)
    assert visual and all(not k.startswith("visual.") for k in text)
    assert {"token_embedding.weight", "text_projection", "logit_scale", "ln_final.weight"} <= set(text)
    assert len(visual) + len(text) == len(sd)


def test_open_clip_refusals_name_what_is_missing(tmp_path):
    model_cfg = _model_cfg()
    oc = _random_clip(model_cfg)
    path = _save(oc, model_cfg, tmp_path / "oc")
    bare = tmp_path / "bare.safetensors"
    bare.write_bytes((path / "open_clip_model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="does not say its activation.*open_clip_config.json.*model_name"):
        convert.load(bare)
    for key, value, message in (("attentional_pool", True, "attentional pooling"),
                                ("timm_model_name", "vit_base_patch16_224", "a timm trunk"),
                                ("pool_type", "last", "pool_type 'last'")):
        cfg = json.loads((path / "open_clip_config.json").read_text())
        cfg["model_cfg"]["vision_cfg"][key] = value
        (path / "open_clip_config.json").write_text(json.dumps(cfg))
        with pytest.raises(convert.UnsupportedModelError, match=message):
            convert.load(path)
        cfg["model_cfg"]["vision_cfg"].pop(key)
        (path / "open_clip_config.json").write_text(json.dumps(cfg))
    sd = dict(oc.state_dict())
    sd["visual.extra"] = torch.zeros(2)
    with pytest.raises(convert.CheckpointMismatchError, match=r"unexpected keys \['visual.extra'\]"):
        convert.load(_resave(sd, path, tmp_path / "extra"))
    # A missing or misshapen image-tower tensor is named as the file names it (not by the timm name it maps to)
    for i, (key, why) in enumerate((("visual.transformer.resblocks.1.mlp.c_fc.weight", "missing keys"),
                                    ("visual.transformer.resblocks.0.ln_2.bias", "missing keys"),
                                    ("visual.positional_embedding", "missing keys"), ("visual.class_embedding", "missing keys"),
                                    ("visual.ln_post.weight", "missing keys"),
                                    ("visual.transformer.resblocks.1.attn.out_proj.bias", "wrong shapes"))):
        sd = {k: v for k, v in oc.state_dict().items() if k != key}
        if why == "wrong shapes":
            sd[key] = torch.zeros(3)
        with pytest.raises(convert.CheckpointMismatchError, match=rf"{why} \['{re.escape(key)}[':]"):
            convert.load(_resave(sd, path, tmp_path / f"missing{i}"))


@pytest.mark.parametrize("vision", [{}, {"ls_init_value": 0.1}, {"no_ln_pre": True},
                                    {"pool_type": "avg", "final_ln_after_pool": True}])
def test_each_missing_image_tower_tensor_is_refused_by_its_own_name(vision, tmp_path):
    """Every image-tower tensor, removed alone, is refused with exactly its open_clip name, and a block beyond
    vision_cfg's layers is refused naming its tensors. The config is read off the tensors, so before these were
    checked against the model config, a missing projection loaded a tower without one (another model's outputs),
    a missing conv1 was taken for a timm file, and a missing bias or ln weight was reported as other keys."""
    model_cfg = _model_cfg(**vision)
    oc = _random_clip(model_cfg)
    path = _save(oc, model_cfg, tmp_path / "oc")
    sd = dict(oc.state_dict())
    keys = [k for k in sd if k.startswith("visual.")]
    assert len(keys) > 20
    for i, key in enumerate(keys):
        with pytest.raises(convert.CheckpointMismatchError, match=rf"missing keys \[{re.escape(repr(key))}\]"):
            convert.load(_resave({k: v for k, v in sd.items() if k != key}, path, tmp_path / str(i)))
    more = dict(sd, **{k.replace("resblocks.1.", "resblocks.2."): v.clone() for k, v in sd.items()
                       if k.startswith("visual.transformer.resblocks.1.")})
    with pytest.raises(convert.CheckpointMismatchError,
                       match=r"\(2 layers\): unexpected keys \['visual.transformer.resblocks.2.attn.in_proj_bias'"):
        convert.load(_resave(more, path, tmp_path / "more"))


def test_vision_defaults_are_open_clips():
    """What vision_cfg leaves out is open_clip's CLIPVisionCfg default: the table against the dataclass itself."""
    import dataclasses

    from open_clip.model import CLIPVisionCfg

    defaults = {f.name: f.default for f in dataclasses.fields(CLIPVisionCfg)}
    assert {k: defaults[k] for k in openclip.VISION_DEFAULTS} == openclip.VISION_DEFAULTS


def test_a_model_config_of_other_sizes_is_refused(tmp_path):
    """The model config gives the tensors their heads (width / head_width) and activation, so one of another
    model (width, MLP, patch, grid, embed_dim) is refused naming the setting; a setting it leaves out is open_clip's
    default (width 768), which these 32-wide tensors are not."""
    model_cfg = _model_cfg()
    oc = _random_clip(model_cfg)
    path = _save(oc, model_cfg, tmp_path / "oc")
    for i, (change, named) in enumerate(((dict(width=64), "width 64 in open_clip_config.json, 32 in the tensors"),
                                         (dict(mlp_ratio=2.0), r"MLP width \(width x mlp_ratio\) 64 in open_clip_config.json, 128"),
                                         (dict(patch_size=4), "patch_size 4 in open_clip_config.json, 8"),
                                         (dict(image_size=64), r"patch grid \(image_size / patch_size\) 8 in open_clip_config.json, 4"),
                                         (dict(embed_dim=12), "embed_dim 12 in open_clip_config.json, 24"),
                                         (dict(width=None), "width 768 in open_clip_config.json, 32"))):
        cfg = json.loads((path / "open_clip_config.json").read_text())
        for key, value in change.items():
            where = cfg["model_cfg"] if key == "embed_dim" else cfg["model_cfg"]["vision_cfg"]
            if value is None:
                where.pop(key)
            else:
                where[key] = value
        other = tmp_path / f"cfg{i}"
        other.mkdir()
        (other / "open_clip_model.safetensors").write_bytes((path / "open_clip_model.safetensors").read_bytes())
        (other / "open_clip_config.json").write_text(json.dumps(cfg))
        with pytest.raises(convert.CheckpointMismatchError, match=f"does not match its model config: .*{named}"):
            convert.load(other)


def _resave(sd, like: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    from safetensors.torch import save_file

    out.mkdir()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "open_clip_model.safetensors"))
    (out / "open_clip_config.json").write_text((like / "open_clip_config.json").read_text())
    return out


@pytest.mark.parametrize("resize_mode", ["shortest", "squash"])
def test_eval_transform_is_bit_equal_to_open_clip(resize_mode, tmp_path):
    from PIL import Image

    model_cfg = _model_cfg()
    pre = {"mean": [0.1, 0.2, 0.3], "std": [0.3, 0.2, 0.1], "interpolation": "bicubic", "resize_mode": resize_mode}
    model, _ = convert.load(_save(_random_clip(model_cfg), model_cfg, tmp_path / "oc", pre))
    ref_transform = open_clip.image_transform(32, is_train=False, mean=pre["mean"], std=pre["std"],
                                              resize_mode=resize_mode, interpolation="bicubic")
    ours_transform = preprocess.eval_transform_for(model.config)
    for photo in sorted((ROOT / "predmaps" / "assets" / "photos").glob("*.jpg")):
        img = Image.open(photo).convert("RGB")
        ref = ref_transform(img).permute(1, 2, 0).numpy()
        assert np.array_equal(ours_transform(img), ref), (photo.name, resize_mode)


def test_keys_of_neither_tower_are_named():
    sd = {k: v.numpy() for k, v in _random_clip(_model_cfg()).state_dict().items()}
    with pytest.raises(convert.CheckpointMismatchError, match=r"unexpected keys \['stray'\]"):
        openclip.split_towers(dict(sd, stray=np.zeros(1)))


def test_a_bare_state_dict_with_an_open_clip_model_name(tmp_path):
    # Without open_clip_config.json the architecture comes from an open_clip model name, resolved by
    # open_clip's own registry (a tiny config registered here under a name of its own).
    model_cfg = _model_cfg(quick_gelu=False)
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "cfgs" / "predmaps-test-tiny.json").write_text(json.dumps(model_cfg))
    open_clip.add_model_config(tmp_path / "cfgs")
    oc = _random_clip(model_cfg)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in oc.state_dict().items()}, str(tmp_path / "weights.safetensors"))
    model, params = convert.load(tmp_path / "weights.safetensors", model_name="predmaps-test-tiny")
    x = np.random.default_rng(1).standard_normal((2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        ref = oc.encode_image(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(np.asarray(model.apply({"params": params}, x).logits), ref, atol=TOL, rtol=0)
    assert model.config.name == "predmaps-test-tiny" and model.config.act == "gelu"
    with pytest.raises(ValueError, match="open_clip has no model named 'no-such-clip'"):
        convert.load(tmp_path / "weights.safetensors", model_name="no-such-clip")


def test_a_hostile_layer_count_is_refused_before_any_work(tmp_path):
    """vision_cfg's layers sizes the list of tensors the tower must have: 10**9 is refused by jaxvit's limit on
    depth at once (listing its keys would take the memory of the machine)."""
    from jaxvit.config import ConfigError

    model_cfg = _model_cfg()
    path = _save(_random_clip(model_cfg), model_cfg, tmp_path / "oc")
    cfg = json.loads((path / "open_clip_config.json").read_text())
    cfg["model_cfg"]["vision_cfg"]["layers"] = 10 ** 9
    (path / "open_clip_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"vision_cfg layers must be an integer from 1 to 256; got 1000000000"):
        convert.load(path)
