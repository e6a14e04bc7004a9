"""Hugging Face `transformers` vision checkpoints: convert.load against transformers itself.

Every model is a tiny random-weight transformers model (depth 2, width 32), written with
`save_pretrained` (config.json + model.safetensors) beside a processor's preprocessor_config.json;
transformers' own forward is the reference, at tolerance 1e-5 (float32, two implementations of the
same arithmetic). Preprocessing is compared bit for bit with transformers' PIL image processors on the
photos shipped in predmaps/assets/photos and on images sized to hit the crop's rounding and padding.
"""

from __future__ import annotations

import json
import os
import pathlib
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import convert  # noqa: E402
from convert import hf_vision  # noqa: E402
from jaxvit import preprocess  # noqa: E402
from jaxvit.config import ConfigError  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")
TOL = 1e-5
ROOT = pathlib.Path(__file__).resolve().parents[1]
PHOTOS = sorted((ROOT / "predmaps" / "assets" / "photos").glob("*.jpg"))
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
             patch_size=8)


@pytest.fixture(autouse=True)
def _offline_hub(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))


def _randomize(model, seed=0):
    """Unit-scale random weights (transformers' init is near-degenerate), LayerNorm scales around 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 and "embedding" not in name and "token" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
            elif "norm" in name and name.endswith("weight") or "lambda" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 if p.ndim >= 2 else 0.1))
    return model.eval()


def _save(model, processor, out: pathlib.Path) -> pathlib.Path:
    model.save_pretrained(out)
    if processor is not None:
        processor.save_pretrained(out)
    return out


def _x(size, seed=1):
    return np.random.default_rng(seed).standard_normal((2, size, size, 3)).astype(np.float32)


def _run_hf(fn, x):
    with torch.no_grad():
        return fn(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()


def _run_ours(path, x):
    model, params = convert.load(path)
    out = model.apply({"params": params}, x)
    return model, out


def _vit_processor(size=32):
    return transformers.ViTImageProcessorPil(size={"height": size, "width": size})


CASES = {
    # name: (build the transformers model, the reference output, which jaxvit output, processor, input size)
    "ViTForImageClassification": (lambda: transformers.ViTForImageClassification(
        transformers.ViTConfig(**SMALL, num_labels=5)), lambda m: lambda t: m(t).logits, "logits", _vit_processor),
    "ViTModel": (lambda: transformers.ViTModel(transformers.ViTConfig(**SMALL)),  # with its pooler, left out
                 lambda m: lambda t: m(t).last_hidden_state[:, 0], "pre_logits", _vit_processor),
    "DeiTForImageClassificationWithTeacher": (
        lambda: transformers.DeiTForImageClassificationWithTeacher(transformers.DeiTConfig(**SMALL, num_labels=5)),
        lambda m: lambda t: m(t).logits, "logits", _vit_processor),
    "DeiTForImageClassification": (
        lambda: transformers.DeiTForImageClassification(transformers.DeiTConfig(**SMALL, num_labels=5)),
        lambda m: lambda t: m(t).logits, "logits", _vit_processor),
    "Dinov2Model": (lambda: transformers.Dinov2Model(transformers.Dinov2Config(
        **{k: v for k, v in SMALL.items() if k != "intermediate_size"}, mlp_ratio=2)),
        lambda m: lambda t: m(t).pooler_output, "pre_logits", _vit_processor),
    "CLIPVisionModel": (lambda: transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**SMALL)),
                        lambda m: lambda t: m(t).pooler_output, "pre_logits", _vit_processor),
    "CLIPVisionModelWithProjection": (
        lambda: transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**SMALL, projection_dim=24)),
        lambda m: lambda t: m(t).image_embeds, "logits", _vit_processor),
    "CLIPModel": (lambda: transformers.CLIPModel(transformers.CLIPConfig(
        vision_config=SMALL, text_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                              intermediate_size=64, vocab_size=99), projection_dim=24)),
        lambda m: lambda t: m.visual_projection(m.vision_model(pixel_values=t).pooler_output), "logits",
        _vit_processor),
}


@pytest.mark.parametrize("name", list(CASES))
def test_transformers_vision_models_match_transformers(name, tmp_path):
    build, reference, output, processor = CASES[name]
    hf = _randomize(build())
    path = _save(hf, processor(), tmp_path / name)
    x = _x(32)
    model, out = _run_ours(path, x)
    np.testing.assert_allclose(np.asarray(getattr(out, output)), _run_hf(reference(hf), x), atol=TOL, rtol=0)
    assert model.config.img_size == (32, 32) and model.config.crop_mode == "hf_squash"
    if name == "ViTForImageClassification":  # its labels come from config.json's id2label
        assert model.config.num_classes == 5 and model.config.label_names is None  # LABEL_0...: placeholders


@pytest.mark.parametrize("registers", [0, 3])
def test_dinov2_at_the_processor_size_resamples_as_transformers(registers, tmp_path):
    # DINOv2 is stored at 518 px and run at the processor's 224: transformers resamples the position
    # embeddings on every call (plain bicubic; antialiased with registers); convert.load resamples them
    # once to the processor's size. With registers, which have no position rows, the stored class-token
    # row is folded into the token.
    size = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, image_size=56, patch_size=8)
    hf = _randomize(transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
        **size, num_register_tokens=registers)) if registers else
        transformers.Dinov2Model(transformers.Dinov2Config(**size)))
    processor = transformers.BitImageProcessorPil(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32})
    path = _save(hf, processor, tmp_path / "dinov2")
    x = _x(32)
    model, out = _run_ours(path, x)
    np.testing.assert_allclose(np.asarray(out.pre_logits), _run_hf(lambda t: hf(t).pooler_output, x), atol=TOL,
                               rtol=0)
    assert model.config.img_size == (32, 32) and model.config.crop_mode == "hf_shortest"
    assert model.config.reg_tokens == registers and model.config.no_embed_class == bool(registers)


def test_labels_from_id2label_and_pytorch_model_bin(tmp_path):
    cfg = transformers.ViTConfig(**SMALL, num_labels=3, id2label={0: "cat", 1: "dog", 2: "fox"},
                                 label2id={"cat": 0, "dog": 1, "fox": 2})
    hf = _randomize(transformers.ViTForImageClassification(cfg))
    path = _save(hf, _vit_processor(), tmp_path / "vit")
    torch.save(hf.state_dict(), path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()
    x = _x(32)
    model, out = _run_ours(path, x)
    np.testing.assert_allclose(np.asarray(out.logits), _run_hf(lambda t: hf(t).logits, x), atol=TOL, rtol=0)
    assert model.config.label_names == ("cat", "dog", "fox")


def test_hub_repo_id_reads_the_cache_offline(tmp_path, hub_repo):
    hf = _randomize(transformers.ViTForImageClassification(transformers.ViTConfig(**SMALL, num_labels=5)))
    folder = _save(hf, _vit_processor(), tmp_path / "vit")
    hub_repo("someone/tiny-vit", folder)
    model, params = convert.load("someone/tiny-vit")
    ref_model, ref_params = convert.load(folder)
    assert model.config == ref_model.config.replace(name="someone/tiny-vit")
    for a, b in zip(*(jax_leaves(p) for p in (params, ref_params))):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(convert.HubUnavailableError, match="HF_HUB_OFFLINE is set and it is not in the local cache"):
        convert.load("someone/not-cached")


def jax_leaves(tree):
    import jax

    return [np.asarray(v) for v in jax.tree_util.tree_leaves(tree)]


def test_unsupported_transformers_models_are_refused_by_name(tmp_path):
    small = {k: v for k, v in SMALL.items() if k != "intermediate_size"}
    cases = [
        (transformers.Dinov2Model(transformers.Dinov2Config(**small, use_swiglu_ffn=True)),
         "DINOv2 with a SwiGLU MLP"),
        (transformers.BeitModel(transformers.BeitConfig(**SMALL)), r"model_type 'beit' \(relative position bias\)"),
        (transformers.SwinModel(transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                                                        num_heads=[2, 2], window_size=2)),
         r"model_type 'swin' \(shifted-window attention\)"),
    ]
    for model, message in cases:
        path = _save(model, None, tmp_path / type(model).__name__)
        with pytest.raises(convert.UnsupportedModelError, match=message) as e:
            convert.load(path)
        assert "supported Hugging Face classes: ViTModel" in str(e.value)


def _dinov2_classifier(registers: int):
    small = dict({k: v for k, v in SMALL.items() if k != "intermediate_size"}, mlp_ratio=2, num_labels=5)
    if registers:
        return _randomize(transformers.Dinov2WithRegistersForImageClassification(
            transformers.Dinov2WithRegistersConfig(**small, num_register_tokens=registers)))
    return _randomize(transformers.Dinov2ForImageClassification(transformers.Dinov2Config(**small)))


def _layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


@pytest.mark.parametrize("registers", [0, 3])
def test_dinov2_classifiers_match_transformers_and_decode_every_token(registers, tmp_path):
    # Dinov2(WithRegisters)ForImageClassification reads [class token, mean of the patch tokens (registers
    # excluded)] after the final LayerNorm. Logits: transformers is the reference (TOL, float32). Per-token
    # prediction nu(t) = W[:D] norm(t) + W[D:] norm(t) + b (the head on [t, t]): a numpy computation from
    # transformers' own weights and tokens, at TOL, through both the lean and the materialised prediction map.
    from predmaps import explain

    hf = _dinov2_classifier(registers)
    path = _save(hf, _vit_processor(), tmp_path / "dinov2_cls")
    x = _x(32)
    model, out = _run_ours(path, x)
    assert model.config.head_input == "token_and_patch_mean" and model.config.reg_tokens == registers
    np.testing.assert_allclose(np.asarray(out.logits), _run_hf(lambda t: hf(t).logits, x), atol=TOL, rtol=0)

    with torch.no_grad():
        hidden = hf.base_model(torch.from_numpy(x).permute(0, 3, 1, 2), output_hidden_states=True).hidden_states
    tokens = hidden[-1].numpy()[:, 1 + registers:]  # the last block's patch tokens, before the final norm
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    ln = _layer_norm(tokens, sd[f"{hf.base_model_prefix}.layernorm.weight"],
                     sd[f"{hf.base_model_prefix}.layernorm.bias"], hf.config.layer_norm_eps)
    w, b, d = sd["classifier.weight"], sd["classifier.bias"], tokens.shape[-1]
    nu = ln @ w[:, :d].T + ln @ w[:, d:].T + b  # (B, N, C)
    expected = np.moveaxis(nu, -1, 1).reshape(2, 5, 4, 4)
    for lean in (True, False):
        ex = explain(model, convert.load(path)[1], x, method="prediction_map", target="all", scores="logits",
                     lean=lean)
        np.testing.assert_allclose(np.asarray(ex.maps), expected, atol=TOL, rtol=0)


def test_dinov2_classifier_explains_with_predicatt_and_refuses_lrp_and_timm(tmp_path, capsys):
    from convert.__main__ import main
    from predmaps import explain

    path = _save(_dinov2_classifier(0), _vit_processor(), tmp_path / "dinov2_cls")
    model, params = convert.load(path)
    x = _x(32)
    ex = explain(model, params, x, method="predicatt", target="top2")
    # Equal up to float32 rounding: explain's jit fuses the same forward differently from a plain apply.
    np.testing.assert_allclose(np.asarray(ex.logits), np.asarray(model.apply({"params": params}, x).logits),
                               atol=TOL, rtol=0)
    assert ex.maps.shape == (2, 2, 4, 4) and np.isfinite(np.asarray(ex.maps)).all()
    for method in ("transattr", "lrp", "partial_lrp"):
        with pytest.raises(ValueError, match=f"^{method} does not support head_input='token_and_patch_mean'"):
            explain(model, params, x, method=method)
    with pytest.raises(ValueError, match="timm has no head like this model's"):
        convert.save_timm(params, model.config, tmp_path / "timm")
    assert not (tmp_path / "timm").exists()
    assert main([str(path), "--to-timm", str(tmp_path / "timm2"), "--out", str(tmp_path / "ours")]) == 2
    assert "cannot be exported to timm" in capsys.readouterr().err
    assert not (tmp_path / "timm2").exists() and not (tmp_path / "ours").exists()


def test_transformers_loading_is_strict(tmp_path):
    hf = _randomize(transformers.ViTForImageClassification(transformers.ViTConfig(**SMALL, num_labels=5)))
    from safetensors.numpy import load_file

    saved = _save(hf, None, tmp_path / "saved")  # the names of files on the hub (transformers 4's)
    sd, config = load_file(str(saved / "model.safetensors")), json.loads((saved / "config.json").read_text())
    extra = dict(sd, **{"vit.encoder.layer.0.attention.attention.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(convert.CheckpointMismatchError,
                       match=r"unexpected keys \['vit.encoder.layer.0.attention.attention.extra.weight'\]"):
        convert.load(_folder(tmp_path / "a", extra, config))
    # a missing tensor is named as the file names it (read off the same tensor of another block)
    missing = {k: v for k, v in sd.items() if k != "vit.encoder.layer.1.output.dense.bias"}
    with pytest.raises(convert.CheckpointMismatchError, match=r"missing keys \['vit.encoder.layer.1.output.dense.bias'\]"):
        convert.load(_folder(tmp_path / "b", missing, config))
    with pytest.raises(convert.CheckpointMismatchError,
                       match=r"block 0's attention has only part.*missing keys \['vit.encoder.layer.0.attention.attention.key.weight'\]"):
        convert.load(_folder(tmp_path / "c", {k: v for k, v in sd.items()
                                              if k != "vit.encoder.layer.0.attention.attention.key.weight"}, config))
    # transformers 5's module names (q_proj, k_proj, v_proj): the missing one in that naming
    v5 = {re.sub(r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.",
                 lambda m: f"layers.{m.group(1)}.attention.{m.group(2)[0]}_proj.", k): v for k, v in sd.items()}
    with pytest.raises(convert.CheckpointMismatchError, match=r"missing keys \['vit.layers.1.attention.v_proj.bias'\]"):
        convert.load(_folder(tmp_path / "c5", {k: v for k, v in v5.items() if k != "vit.layers.1.attention.v_proj.bias"},
                             config))
    # a block more than config.json's num_hidden_layers, or one fewer: both refused, named as the file names them
    # (a whole block's query, key and value in one name)
    one_more = dict(sd, **{k.replace("layer.1.", "layer.2."): v for k, v in sd.items() if "layer.1." in k})
    with pytest.raises(convert.CheckpointMismatchError, match=r"2 layers\): unexpected keys \['vit.encoder.layer.2."
                                                              r"attention.attention.key.bias', "):
        convert.load(_folder(tmp_path / "e", one_more, config))
    with pytest.raises(convert.CheckpointMismatchError, match=r"2 layers\): missing keys \['vit.encoder.layer.1."
                                                              r"attention.attention.\{query,key,value\}.bias', "):
        convert.load(_folder(tmp_path / "f", {k: v for k, v in sd.items() if "layer.1." not in k}, config))
    with pytest.raises(convert.CheckpointMismatchError, match=r"missing keys \['vit.layers.1.attention.\{q,k,v\}_proj"):
        convert.load(_folder(tmp_path / "f5", {k: v for k, v in v5.items() if "layers.1." not in k}, config))
    bare = _folder(tmp_path / "d", sd, None)
    with pytest.raises(ValueError, match="need their config.json"):
        convert.load(bare / "model.safetensors")


def test_defaults_for_what_config_json_leaves_out_are_transformers():
    """save_pretrained leaves out what equals the config class's default, so hf_vision's table of them must be
    transformers' own: each entry against a default-constructed config of its family (the reference)."""
    classes = {"vit": transformers.ViTConfig, "deit": transformers.DeiTConfig, "dinov2": transformers.Dinov2Config,
               "dinov2_with_registers": transformers.Dinov2WithRegistersConfig, "clip": transformers.CLIPVisionConfig}
    assert set(classes) == set(hf_vision._DEFAULTS)
    for family, cls in classes.items():
        theirs = cls()
        for name, ours in hf_vision._DEFAULTS[family].items():
            assert getattr(theirs, name, None) == ours, (family, name)


def test_a_config_json_of_other_sizes_is_refused(tmp_path):
    """config.json gives the weights their heads, eps and activation, so one of another model (other width, MLP,
    patch or grid) is refused naming the setting, not applied to these tensors."""
    from safetensors.numpy import load_file

    hf = _randomize(transformers.ViTForImageClassification(transformers.ViTConfig(**SMALL, num_labels=5)))
    saved = _save(hf, None, tmp_path / "saved")
    sd, config = load_file(str(saved / "model.safetensors")), json.loads((saved / "config.json").read_text())
    for i, (key, value, named) in enumerate((("hidden_size", 64, "hidden_size 64 in config.json, 32 in the tensors"),
                                             ("intermediate_size", 128, "intermediate size 128 in config.json"),
                                             ("patch_size", 4, "patch_size 4 in config.json"),
                                             ("image_size", 64, r"patch grid \(image_size / patch_size\) 8"))):
        with pytest.raises(convert.CheckpointMismatchError, match=f"does not match its config.json.*{named}"):
            convert.load(_folder(tmp_path / str(i), sd, dict(config, **{key: value})))
    # left out, a setting is transformers' default (hidden_size 768): these 32-wide tensors are not that model
    with pytest.raises(convert.CheckpointMismatchError, match="hidden_size 768 in config.json, 32 in the tensors"):
        convert.load(_folder(tmp_path / "default", sd, {k: v for k, v in config.items() if k != "hidden_size"}))


@pytest.mark.parametrize("name", ["ViTForImageClassification", "DeiTForImageClassificationWithTeacher",
                                  "DeiTForImageClassification", "Dinov2Model", "CLIPVisionModelWithProjection",
                                  "CLIPModel"])
def test_each_missing_tensor_is_refused_by_its_own_name(name, tmp_path):
    """Every image-tower tensor of a transformers file, removed alone, is refused with exactly its name in the
    file's own scheme. The config is read off the tensors, so before these were checked against config.json's
    class, a missing position embedding, patch bias or CLIP projection loaded a different model without a word,
    and a missing final-norm weight or block bias was reported as other, unexpected keys in timm's names."""
    from safetensors.numpy import load_file

    saved = _save(_randomize(CASES[name][0]()), None, tmp_path / "saved")
    sd, config = load_file(str(saved / "model.safetensors")), json.loads((saved / "config.json").read_text())
    dropped = re.compile(r"mask_token|pooler\.|^text_model\.|^text_projection|^logit_scale")  # read by no ViT
    keys = [k for k in sd if not dropped.search(k)]
    assert len(keys) > 30
    for i, key in enumerate(keys):
        with pytest.raises(convert.CheckpointMismatchError, match=rf"missing keys \[{re.escape(repr(key))}\]"):
            convert.load(_folder(tmp_path / str(i), {k: v for k, v in sd.items() if k != key}, config))


def _folder(path: pathlib.Path, sd, config) -> pathlib.Path:
    from safetensors.numpy import save_file

    path.mkdir()
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(path / "model.safetensors"))
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    return path


# ---------------------------------------------------------------------------------------------
# Preprocessing, bit for bit.

PROCESSORS = {
    "ViTImageProcessor": lambda: transformers.ViTImageProcessorPil(),
    "DeiTImageProcessor": lambda: transformers.DeiTImageProcessorPil(),
    "CLIPImageProcessor": lambda: transformers.CLIPImageProcessorPil(),  # OpenAI CLIP's settings
    "BitImageProcessor (DINOv2)": lambda: transformers.BitImageProcessorPil(
        size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]),
    "CLIPImageProcessor, crop larger than the resize": lambda: transformers.CLIPImageProcessorPil(
        size={"shortest_edge": 200}, crop_size={"height": 224, "width": 224}),
}


def _test_images():
    from PIL import Image

    rng = np.random.default_rng(0)
    odd = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in
           ((301, 257), (257, 301), (225, 480), (99, 150))]  # odd crop margins, both orientations, upscaling
    return [Image.open(p).convert("RGB") for p in PHOTOS] + odd


@pytest.mark.parametrize("name", list(PROCESSORS))
def test_preprocessing_is_bit_equal_to_the_image_processor(name):
    processor = PROCESSORS[name]()
    settings = hf_vision.preprocess_settings(json.loads(processor.to_json_string()), "vit")
    images = _test_images()
    assert len(PHOTOS) >= 3
    for img in images:
        ref = processor(images=img, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        ours = preprocess.eval_transform(img, **settings)
        assert ours.dtype == ref.dtype == np.float32 and ours.shape == ref.shape, (name, img.size)
        assert np.array_equal(ours, ref), (name, img.size, np.abs(ours - ref).max())


@pytest.mark.parametrize("make", [
    # Margins of 27 and 11 resized pixels: (margin) // 2 and torchvision's round-half-to-even differ by one.
    lambda: transformers.CLIPImageProcessorPil(size={"shortest_edge": 60}, crop_size={"height": 49, "width": 49},
                                               resample=0, do_normalize=False),
    lambda: transformers.DeiTImageProcessorPil(size={"height": 70, "width": 70}, crop_size={"height": 43, "width": 43},
                                               resample=0, do_normalize=False)])
def test_crop_box_is_where_the_processor_crops(make):
    # Each pixel's red and green values are its column and row; nearest resampling keeps them, so the
    # processor's first output pixel names the source pixel it came from: inside the box's first
    # resized pixel (an offset rounded the other way would be a whole resized pixel, >= 2 px, off).
    from PIL import Image

    h, w = 201, 157
    rows, cols = np.mgrid[0:h, 0:w]
    img = Image.fromarray(np.stack([cols, rows, np.zeros_like(cols)], -1).astype(np.uint8))
    processor = make()
    first = np.rint(processor(images=img, return_tensors="np")["pixel_values"][0][:2, 0, 0] * 255)
    settings = hf_vision.preprocess_settings(json.loads(processor.to_json_string()), "vit")
    left, top, right, bottom = preprocess.eval_crop_box((h, w), img_size=settings["img_size"],
                                                        crop_pct=settings["crop_pct"], crop_mode=settings["crop_mode"])
    ch, cw = settings["img_size"]
    sx, sy = (right - left) / cw, (bottom - top) / ch
    assert min(sx, sy) >= 2
    assert left <= first[0] < left + sx and top <= first[1] < top + sy, (first, (left, top), (sx, sy))


def test_processor_settings_that_cannot_be_reproduced_are_refused():
    base = json.loads(transformers.CLIPImageProcessorPil().to_json_string())
    for change, message in (({"do_resize": False}, "do_resize false"), ({"rescale_factor": 0.5}, "rescale_factor 1/255"),
                            ({"image_processor_type": "SiglipImageProcessor"}, "image_processor_type"),
                            ({"size": {"longest_edge": 100}}, "size {'longest_edge': 100} is not supported")):
        with pytest.raises(ConfigError, match=message):
            hf_vision.preprocess_settings(dict(base, **change), "clip")


def test_export_to_timm_rebuilds_the_same_network(tmp_path):
    # A transformers CLIP tower exported with convert.save_timm: timm rebuilds it from the export alone
    # (a stock CLIP architecture with model_args) and computes what transformers computes.
    timm = pytest.importorskip("timm")
    hf = _randomize(transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**SMALL,
                                                                                             projection_dim=24)))
    model, params = convert.load(_save(hf, _vit_processor(), tmp_path / "clip"))
    out = convert.save_timm(params, model.config, tmp_path / "timm")
    rebuilt = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = _x(32)
    np.testing.assert_allclose(_run_hf(rebuilt, x), _run_hf(lambda t: hf(t).image_embeds, x), atol=TOL, rtol=0)
    again, again_params = convert.load(out)
    assert again.config == model.config
    for a, b in zip(jax_leaves(params), jax_leaves(again_params)):
        np.testing.assert_array_equal(a, b)


def test_older_feature_extractor_configs_read_as_their_processors():
    # google/vit-base-patch16-224 and openai/clip-vit-base-patch16 ship feature-extractor configs with
    # integer sizes (their preprocessor_config.json, as on the hub): the same transforms as the processors'.
    vit = {"do_normalize": True, "do_resize": True, "feature_extractor_type": "ViTFeatureExtractor",
           "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 2, "size": 224}
    clip = {"crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
            "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224}
    for cfg, processor in ((vit, transformers.ViTImageProcessorPil(size={"height": 224, "width": 224})),
                           (clip, transformers.CLIPImageProcessorPil())):
        ours = hf_vision.preprocess_settings(cfg, "vit")
        assert ours == hf_vision.preprocess_settings(json.loads(processor.to_json_string()), "vit")
        img = _test_images()[-2]
        ref = processor(images=img, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        assert np.array_equal(preprocess.eval_transform(img, **ours), ref)


def test_command_line_converts_a_transformers_folder_into_a_jaxvit_checkpoint(tmp_path, capsys):
    # python -m convert: the jaxvit checkpoint keeps transformers' eval transform (its crop modes) and params.
    import jaxvit
    from convert.__main__ import main

    hf = _randomize(transformers.DeiTForImageClassificationWithTeacher(transformers.DeiTConfig(**SMALL, num_labels=5)))
    processor = transformers.DeiTImageProcessorPil(size={"height": 40, "width": 40},
                                                   crop_size={"height": 32, "width": 32})
    folder = _save(hf, processor, tmp_path / "deit")
    assert main([str(folder), "--out", str(tmp_path / "ckpt")]) == 0
    model, params = jaxvit.load(tmp_path / "ckpt")
    direct_model, direct_params = convert.load(folder)
    assert model.config == direct_model.config and model.config.crop_mode == "hf_squash"
    for a, b in zip(jax_leaves(params), jax_leaves(direct_params)):
        np.testing.assert_array_equal(a, b)
    assert main([str(folder), "--model-name", "vit_tiny_patch16_224", "--out", str(tmp_path / "other")]) == 2
    assert "model_name 'vit_tiny_patch16_224' does not apply to a Hugging Face transformers checkpoint" in \
        capsys.readouterr().err


def test_one_tensor_under_two_names_is_refused(tmp_path):
    # transformers 4's file names and transformers 5's module names both map onto timm's: a checkpoint
    # holding both for one tensor is refused, not silently resolved either way.
    from safetensors.numpy import load_file

    hf = _randomize(transformers.ViTForImageClassification(transformers.ViTConfig(**SMALL, num_labels=5)))
    saved = _save(hf, None, tmp_path / "saved")
    sd = load_file(str(saved / "model.safetensors"))
    sd["vit.layers.0.mlp.fc1.weight"] = sd["vit.encoder.layer.0.intermediate.dense.weight"]
    with pytest.raises(convert.CheckpointMismatchError, match="two tensors for blocks.0.mlp.fc1.weight"):
        convert.load(_folder(tmp_path / "both", sd, json.loads((saved / "config.json").read_text())))


def test_safetensors_checkpoints_load_without_torch(tmp_path):
    # torch, timm, transformers and open_clip made unimportable in a fresh interpreter: a transformers
    # folder with model.safetensors still loads and computes the same logits.
    import subprocess
    import sys

    hf = _randomize(transformers.ViTForImageClassification(transformers.ViTConfig(**SMALL, num_labels=5)))
    folder = _save(hf, _vit_processor(), tmp_path / "vit")
    x = _x(32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "ref.npy", _run_hf(lambda t: hf(t).logits, x))
    code = f"""
import sys
for name in ("torch", "timm", "transformers", "open_clip"):
    sys.modules[name] = None
import numpy as np, convert
model, params = convert.load({str(folder)!r})
x, ref = np.load({str(tmp_path / 'x.npy')!r}), np.load({str(tmp_path / 'ref.npy')!r})
np.testing.assert_allclose(np.asarray(model.apply({{"params": params}}, x).logits), ref, atol={TOL}, rtol=0)
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_a_hostile_layer_count_is_refused_before_any_work(tmp_path):
    """num_hidden_layers sizes the list of tensors the class must have: a config.json saying 10**9 is refused by
    jaxvit's limit on depth at once (listing its keys would take the memory of the machine)."""
    from safetensors.numpy import load_file

    hf = _randomize(transformers.ViTForImageClassification(transformers.ViTConfig(**SMALL, num_labels=5)))
    saved = _save(hf, None, tmp_path / "saved")
    sd, config = load_file(str(saved / "model.safetensors")), json.loads((saved / "config.json").read_text())
    with pytest.raises(ConfigError, match=r"num_hidden_layers must be an integer from 1 to 256; got 1000000000"):
        convert.load(_folder(tmp_path / "deep", sd, dict(config, num_hidden_layers=10 ** 9)))
