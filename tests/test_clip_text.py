"""CLIP's text tower in JAX (jaxvit.clip_text, convert.clip_text) computes what open_clip's `encode_text` and
transformers' `get_text_features` compute, on checkpoints of random weights the tests build; its tokenizer
gives the same ids as open_clip's and transformers' CLIPTokenizerFast.

Tolerance: max |ours - torch| <= 1e-5 in float32 at the highest matmul precision (conftest) on features up to
~6 in size: two layers of float32 rounding (measured 1.4e-6 at most), while a wrong pooling position, a missed
causal mask, the other GELU or a dropped bias moves the features by 1e-2 or more (asserted where cheap to show).
"""

import json
import re
import shutil

import numpy as np
import pytest

from convert.clip_text import load_clip_text
from convert.errors import CheckpointMismatchError, UnsupportedModelError
from jaxvit.clip_text import CLIPText, CLIPTextConfig
from jaxvit.clip_tokenizer import CLIPTokenizer

TOL = 1e-5
PROMPTS = ["a photo of a cat", "A DOG!!", "naïve café — “quoted” &amp; it's", "日本語のテキスト 🐶 ½",
           "tabs\tand\n newlines,,, (brackets) [x] 3.14159", "Mr. O'Neil's 1st-class e-mail: a@b.com",
           "ﬁne ＦＵＬＬＷＩＤＴＨ text <end_of_text> <|endoftext|>", "word " * 90]


def _ids(rng, vocab, n, t, eot):
    """(n, t) ids below eot, each row ending at a random length with eot then 0-padding (open_clip's layout)."""
    ids = rng.randint(1, eot - 1, size=(n, t))
    for row, end in zip(ids, rng.randint(2, t, size=n)):
        row[end] = eot
        row[end + 1:] = 0
    return ids


def _randomize(module, torch, seed=0):
    """Every float tensor redrawn (LayerNorms and biases too: their defaults of 1 and 0 would hide a swap)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = 1.0 if p.ndim < 2 else p.shape[-1] ** -0.5
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if name.endswith(("ln_1.weight", "ln_2.weight",
                    "ln_final.weight", "layer_norm1.weight", "layer_norm2.weight", "final_layer_norm.weight")) else 0))
    return module


def _safetensors_dir(tmp_path, state_dict, name):
    from safetensors.numpy import save_file

    tmp_path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().numpy().copy() for k, v in state_dict.items()}, str(tmp_path / name))
    return tmp_path


# --- open_clip ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("quick_gelu", [True, False])
def test_open_clip_encode_text_parity_through_a_folder(tmp_path, quick_gelu):
    torch = pytest.importorskip("torch")
    open_clip = pytest.importorskip("open_clip")
    model_cfg = {"embed_dim": 24, "quick_gelu": quick_gelu,
                 "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
                 "text_cfg": {"context_length": 16, "vocab_size": 300, "width": 32, "heads": 4, "layers": 2}}
    model = open_clip.model.CLIP(embed_dim=24, vision_cfg=model_cfg["vision_cfg"], text_cfg=model_cfg["text_cfg"],
                                 quick_gelu=quick_gelu)
    _randomize(model.eval(), torch)
    folder = _safetensors_dir(tmp_path, model.state_dict(), "open_clip_model.safetensors")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    ids = _ids(np.random.RandomState(0), 300, 5, 16, eot=299)
    with torch.no_grad():
        want = model.encode_text(torch.as_tensor(ids)).numpy()
    jmodel, params, _ = load_clip_text(folder, tokenizer=False)
    assert jmodel.config.act == ("quick_gelu" if quick_gelu else "gelu")
    got = np.asarray(jmodel.apply({"params": params}, ids).features)
    assert np.abs(got - want).max() <= TOL
    # The other activation is told apart by far more than the tolerance.
    other = CLIPText(CLIPTextConfig(**{**jmodel.config.to_dict(), "act": "gelu" if quick_gelu else "quick_gelu"}))
    assert np.abs(np.asarray(other.apply({"params": params}, ids).features) - want).max() > 100 * TOL


def test_open_clip_siglip_style_tower_parity(tmp_path):
    """Bidirectional attention, last-token pooling and a projection with bias (open_clip's SigLIP text tower),
    read from open_clip_config.json."""
    torch = pytest.importorskip("torch")
    open_clip = pytest.importorskip("open_clip")
    text_cfg = {"context_length": 12, "vocab_size": 200, "width": 32, "heads": 2, "layers": 2, "no_causal_mask": True,
                "proj_bias": True, "pool_type": "last", "norm_kwargs": {"eps": 1e-6}}
    tower = open_clip.model._build_text_tower(16, open_clip.model.CLIPTextCfg(**text_cfg))
    _randomize(tower.eval(), torch, seed=1)
    # CustomTextCLIP's layout: the text tower under `text.`
    folder = _safetensors_dir(tmp_path, {f"text.{k}": v for k, v in tower.state_dict().items()},
                              "open_clip_model.safetensors")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"embed_dim": 16, "text_cfg": text_cfg}}))
    ids = np.random.RandomState(1).randint(0, 200, size=(4, 12))
    with torch.no_grad():
        want = tower(torch.as_tensor(ids)).numpy()
    jmodel, params, _ = load_clip_text(folder, tokenizer=False)
    cfg = jmodel.config
    assert (cfg.causal, cfg.pool, cfg.proj_bias, cfg.eps, cfg.act) == (False, "last", True, 1e-6, "gelu")
    assert np.abs(np.asarray(jmodel.apply({"params": params}, ids).features) - want).max() <= TOL
    # Without its config a causal mask would be applied: far outside the tolerance.
    causal = CLIPText(CLIPTextConfig(**{**cfg.to_dict(), "causal": True}))
    assert np.abs(np.asarray(causal.apply({"params": params}, ids).features) - want).max() > 100 * TOL
    # A tower open_clip tokenises with a transformers tokenizer (SigLIP's) is refused when asked for
    # our tokenizer, by name, and loads when the caller brings none.
    text_cfg["hf_tokenizer_name"] = "timm/ViT-B-16-SigLIP"
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"embed_dim": 16, "text_cfg": text_cfg}}))
    with pytest.raises(UnsupportedModelError, match="timm/ViT-B-16-SigLIP tokenizer.*pass tokenizer="):
        load_clip_text(folder)
    assert load_clip_text(folder, tokenizer=False)[2] is None


def test_open_clip_state_dict_is_read_strictly():
    torch = pytest.importorskip("torch")
    open_clip = pytest.importorskip("open_clip")
    tower = open_clip.model._build_text_tower(16, open_clip.model.CLIPTextCfg(
        context_length=8, vocab_size=100, width=32, heads=2, layers=2))
    sd = dict(tower.state_dict())
    sd["visual.conv1.weight"] = torch.zeros(1)  # the image tower's keys are left to the image reader
    sd["logit_scale"] = torch.zeros(())
    load_clip_text(sd, quick_gelu=True, heads=2, tokenizer=False)
    with pytest.raises(ValueError, match="quick_gelu=True"):  # the tensors do not say the activation
        load_clip_text(sd, heads=2, tokenizer=False)
    with pytest.raises(ValueError, match="heads="):  # nor, below OpenAI's 64 per head, the head count
        load_clip_text(sd, quick_gelu=True, tokenizer=False)
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys \['transformer.resblocks.0.ls_1.gamma'\]"):
        load_clip_text({**sd, "transformer.resblocks.0.ls_1.gamma": torch.ones(32)}, quick_gelu=True, heads=2,
                       tokenizer=False)
    missing = {k: v for k, v in sd.items() if k != "transformer.resblocks.1.mlp.c_proj.bias"}
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \['transformer.resblocks.1.mlp.c_proj.bias'\]"):
        load_clip_text(missing, quick_gelu=True, heads=2, tokenizer=False)


def test_open_clip_text_cfg_beyond_clip_is_refused_by_name(tmp_path):
    pytest.importorskip("torch")
    open_clip = pytest.importorskip("open_clip")
    tower = open_clip.model._build_text_tower(16, open_clip.model.CLIPTextCfg(
        context_length=8, vocab_size=100, width=32, heads=2, layers=1))
    folder = _safetensors_dir(tmp_path, tower.state_dict(), "open_clip_model.safetensors")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"text_cfg": {"qk_norm": True}}}))
    with pytest.raises(UnsupportedModelError, match="qk_norm"):
        load_clip_text(folder, tokenizer=False)


OPEN_CLIP_KINDS = ["CLIP", "CustomTextCLIP", "no-config"]


def _saved_open_clip(kind):
    """(state dict, open_clip_config.json) of a random open_clip model with a two-block text tower: a CLIP, a
    CustomTextCLIP's SigLIP-style tower under `text.` (projection with bias), or a CLIP's without its config."""
    pytest.importorskip("torch")
    open_clip = pytest.importorskip("open_clip")
    text_cfg = {"context_length": 16, "vocab_size": 300, "width": 32, "heads": 4, "layers": 2}
    if kind == "CustomTextCLIP":
        text_cfg.update(no_causal_mask=True, proj_bias=True, pool_type="last")
        model_cfg = {"embed_dim": 16, "text_cfg": text_cfg}
        sd = {f"text.{k}": v for k, v in open_clip.model._build_text_tower(
            16, open_clip.model.CLIPTextCfg(**text_cfg)).state_dict().items()}
    else:
        model_cfg = {"embed_dim": 24, "quick_gelu": True, "text_cfg": text_cfg,
                     "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8}}
        sd = open_clip.model.CLIP(**model_cfg).state_dict()
    return {k: v.numpy().copy() for k, v in sd.items()}, None if kind == "no-config" else {"model_cfg": model_cfg}


def _load_open_clip(sd, config, folder):
    """load_clip_text of the state dict: from a folder with its open_clip_config.json, else as a dict."""
    from safetensors.numpy import save_file

    if config is None:
        return load_clip_text(sd, quick_gelu=True, heads=4, tokenizer=False)
    folder.mkdir(exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    save_file(sd, str(folder / "open_clip_model.safetensors"))
    return load_clip_text(folder, tokenizer=False)


@pytest.mark.parametrize("kind", OPEN_CLIP_KINDS)
def test_each_missing_open_clip_text_tensor_is_refused_by_its_own_name(kind, tmp_path):
    """Every text-tower tensor of an open_clip checkpoint, removed alone, is refused with exactly its name as the file
    names it, nothing else named. The sizes are read off the tensors, so before they were checked against the
    model, a missing projection (or a Linear projection's bias) loaded a model without one, a missing positional
    embedding or first c_fc weight failed as a KeyError, and a missing token embedding as "no CLIP text tower".
    Without open_clip_config.json, nothing says whether the tower has a projection: `text_projection` alone is
    optional there."""
    sd, config = _saved_open_clip(kind)
    _load_open_clip(sd, config, tmp_path / "whole")
    keys = [k for k in sd if not re.match(r"visual\.|logit_scale$", k) and not (kind == "no-config" and
                                                                                k == "text_projection")]
    assert len(keys) >= 28
    for key in keys:
        with pytest.raises(CheckpointMismatchError, match=rf"missing keys \[{re.escape(repr(key))}\](\.|$)"):
            _load_open_clip({k: v for k, v in sd.items() if k != key}, config, tmp_path / "ckpt")


@pytest.mark.parametrize("kind", OPEN_CLIP_KINDS)
def test_an_open_clip_text_block_more_or_fewer_than_config_is_named(kind, tmp_path):
    """A text block beyond text_cfg's layers is refused naming its tensors as unexpected, a block fewer naming the
    last one's as missing, and a projection the config says the model has not (proj_type "none") as unexpected:
    the depth and the projection were read off the tensors, so each loaded another model than the config's.
    Without open_clip_config.json the tensors are the only description: a gap in the blocks is named."""
    sd, config = _saved_open_clip(kind)
    prefix = "text." if kind == "CustomTextCLIP" else ""
    block = re.compile(rf"^{prefix}transformer\.resblocks\.(\d+)\.")
    if config is None:
        with pytest.raises(CheckpointMismatchError, match=r"missing keys \['transformer.resblocks.0.attn.in_proj_bias"):
            _load_open_clip({k: v for k, v in sd.items() if not k.startswith("transformer.resblocks.0.")}, None, None)
        return
    more = {**sd, **{block.sub(rf"{prefix}transformer.resblocks.2.", k): v for k, v in sd.items()
                     if block.match(k) and block.match(k).group(1) == "1"}}
    with pytest.raises(CheckpointMismatchError, match=rf"\(2 layers\): unexpected keys \['{prefix}transformer\."
                                                      r"resblocks\.2\.[^;]*$"):
        _load_open_clip(more, config, tmp_path / "ckpt")
    fewer = {k: v for k, v in sd.items() if not (block.match(k) and block.match(k).group(1) == "1")}
    with pytest.raises(CheckpointMismatchError, match=rf"\(2 layers\): missing keys \['{prefix}transformer\."
                                                      r"resblocks\.1\.[^;]*$"):
        _load_open_clip(fewer, config, tmp_path / "ckpt")
    config["model_cfg"]["text_cfg"]["proj_type"] = "none"
    projection = sorted(k for k in sd if k.startswith(prefix + "text_projection"))
    with pytest.raises(CheckpointMismatchError, match=rf"\(2 layers\): unexpected keys {re.escape(repr(projection))}"):
        _load_open_clip(sd, config, tmp_path / "ckpt")


def test_open_clip_defaults_for_what_text_cfg_leaves_out_are_open_clips():
    """open_clip builds what text_cfg leaves out with its CLIPTextCfg's defaults, so clip_text's table of them must be
    open_clip's own: each entry against the dataclass's default (the reference)."""
    import dataclasses

    open_clip = pytest.importorskip("open_clip")
    from convert.clip_text.openclip import DEFAULTS as _OPEN_CLIP_DEFAULTS

    theirs = {f.name: f.default for f in dataclasses.fields(open_clip.model.CLIPTextCfg)}
    for name, ours in _OPEN_CLIP_DEFAULTS.items():
        assert theirs.get(name, dataclasses.MISSING) == ours, name


@pytest.mark.parametrize("kind", OPEN_CLIP_KINDS)
def test_an_open_clip_config_of_other_sizes_is_refused(kind, tmp_path):
    """open_clip_config.json gives the text tower its heads, eps and activation, so one whose sizes (text_cfg's width,
    vocab_size, context_length, mlp_ratio; model_cfg's embed_dim) the tensors have not is refused naming the setting,
    its value and the tensors': it may be another model's. Before, the sizes were read off the tensors and the
    config's never compared: each loaded, with the other model's heads. A size text_cfg leaves out is open_clip's
    default (width 512 here). Without open_clip_config.json nothing says the sizes but the tensors: nothing to
    compare, the tower loads."""
    sd, config = _saved_open_clip(kind)
    if config is None:
        assert _load_open_clip(sd, None, None)[0].config.width == 32
        return
    text_cfg = config["model_cfg"]["text_cfg"]  # width 32, vocab_size 300, context_length 16, open_clip's mlp_ratio 4
    named = {"width": "width 64 in open_clip_config.json, 32 in the tensors",
             "vocab_size": "vocab_size 600 in open_clip_config.json, 300 in the tensors",
             "context_length": "context_length 32 in open_clip_config.json, 16 in the tensors",
             "mlp_ratio": r"MLP width \(width \* mlp_ratio\) 256 in open_clip_config.json, 128 in the tensors",
             "embed_dim": f"embed_dim {2 * config['model_cfg']['embed_dim']} in open_clip_config.json, "
                          f"{config['model_cfg']['embed_dim']} in the tensors"}
    for setting, message in named.items():
        edited = json.loads(json.dumps(config))
        cfg = edited["model_cfg"] if setting == "embed_dim" else edited["model_cfg"]["text_cfg"]
        cfg[setting] = 2 * cfg.get(setting, 4)
        with pytest.raises(CheckpointMismatchError, match=rf"does not match its open_clip_config.json: (.*; )?{message}"
                                                          r"[.;].*Is open_clip_config.json another model's\?"):
            _load_open_clip(sd, edited, tmp_path / "ckpt")
    del text_cfg["width"]
    with pytest.raises(CheckpointMismatchError, match="width 512 in open_clip_config.json, 32 in the tensors"):
        _load_open_clip(sd, config, tmp_path / "ckpt")


def test_open_clip_heads_text_cfg_leaves_out_are_open_clips_default(tmp_path):
    """A text_cfg without heads is built by open_clip with CLIPTextCfg's 8, whatever the width; it was read as OpenAI's
    width // 64 (1 head for this 64-wide tower, far from open_clip's output; a narrower one was refused as "without
    its open_clip_config.json", which it had)."""
    torch = pytest.importorskip("torch")
    open_clip = pytest.importorskip("open_clip")
    text_cfg = {"context_length": 8, "vocab_size": 100, "width": 64, "layers": 1}
    tower = open_clip.model._build_text_tower(16, open_clip.model.CLIPTextCfg(**text_cfg))
    _randomize(tower.eval(), torch, seed=2)
    folder = _safetensors_dir(tmp_path, tower.state_dict(), "open_clip_model.safetensors")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"embed_dim": 16, "text_cfg": text_cfg}}))
    ids = _ids(np.random.RandomState(2), 100, 3, 8, eot=99)
    with torch.no_grad():
        want = tower(torch.as_tensor(ids)).numpy()
    jmodel, params, _ = load_clip_text(folder, tokenizer=False)
    assert jmodel.config.heads == 8 == tower.transformer.resblocks[0].attn.num_heads
    assert np.abs(np.asarray(jmodel.apply({"params": params}, ids).features) - want).max() <= TOL


# --- transformers ------------------------------------------------------------------------------------------

def _hf_text_config(**kw):
    return {**dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=16), **kw}


@pytest.mark.parametrize("eos", [299, 2], ids=["eos-token", "legacy-eos-2-argmax"])
def test_transformers_clip_model_get_text_features_parity(tmp_path, eos):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPConfig(text_config=_hf_text_config(eos_token_id=eos, hidden_act="quick_gelu"),
                                     vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                                        num_attention_heads=2, image_size=16, patch_size=8),
                                     projection_dim=24)
    model = _randomize(transformers.CLIPModel(config).eval(), torch)
    model.save_pretrained(tmp_path)
    rng = np.random.RandomState(2)
    ids = rng.randint(3, 298, size=(4, 16))
    ids[:, 10] = 299  # eos; in row 0 a larger id before it: the two poolings pick different tokens
    ids[0, 5] = 299 if eos == 2 else 298
    with torch.no_grad():
        want = model.get_text_features(input_ids=torch.as_tensor(ids))
    want = getattr(want, "pooler_output", want).numpy()
    jmodel, params, _ = load_clip_text(tmp_path, tokenizer=False)
    assert jmodel.config.pool == ("argmax" if eos == 2 else "eos")
    got = np.asarray(jmodel.apply({"params": params}, ids).features)
    assert np.abs(got - want).max() <= TOL
    # Shorter inputs use the first position embeddings, as transformers does.
    with torch.no_grad():
        want_short = model.get_text_features(input_ids=torch.as_tensor(ids[:, :12]))
    want_short = getattr(want_short, "pooler_output", want_short).numpy()
    assert np.abs(np.asarray(jmodel.apply({"params": params}, ids[:, :12]).features) - want_short).max() <= TOL


def test_transformers_text_models_with_and_without_projection(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPTextConfig(**_hf_text_config(hidden_act="gelu", projection_dim=24))
    ids = np.random.RandomState(3).randint(3, 299, size=(3, 16))
    for cls, out in ((transformers.CLIPTextModelWithProjection, "text_embeds"),
                     (transformers.CLIPTextModel, "pooler_output")):
        model = _randomize(cls(config).eval(), torch)
        model.save_pretrained(tmp_path / cls.__name__)
        with torch.no_grad():
            want = getattr(model(input_ids=torch.as_tensor(ids)), out).numpy()
        jmodel, params, _ = load_clip_text(tmp_path / cls.__name__, tokenizer=False)
        assert jmodel.config.embed_dim == (24 if out == "text_embeds" else 0)
        assert np.abs(np.asarray(jmodel.apply({"params": params}, ids).features) - want).max() <= TOL


def test_transformers_siglip_get_text_features_parity(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.SiglipConfig(text_config=_hf_text_config(), vision_config=dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8))
    model = _randomize(transformers.SiglipModel(config).eval(), torch)
    model.save_pretrained(tmp_path)
    ids = np.random.RandomState(4).randint(0, 300, size=(3, 16))
    with torch.no_grad():
        want = model.get_text_features(input_ids=torch.as_tensor(ids))
    want = getattr(want, "pooler_output", want).numpy()
    jmodel, params, _ = load_clip_text(tmp_path, tokenizer=False)
    assert (jmodel.config.pool, jmodel.config.causal, jmodel.config.act) == ("last", False, "gelu_tanh")
    assert np.abs(np.asarray(jmodel.apply({"params": params}, ids).features) - want).max() <= TOL


def test_transformers_siglip_prompts_through_its_folders_tokenizer_json(tmp_path):
    """SigLIP's tokenizer appends </s> and pads to the context length (last-token pooling needs it): any
    tokenizer.json with such a post-processor (here a small word-level one, made here) is read as
    transformers' PreTrainedTokenizerFast reads it, and the prompts' features equal get_text_features."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from jaxvit.clip_text import TextTower

    words = ["<pad>", "</s>", "<unk>", "a", "photo", "of", "dog", "cat", "two", "cats", "!"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    config = transformers.SiglipConfig(text_config=_hf_text_config(vocab_size=11, max_position_embeddings=8),
                                       vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                                          num_attention_heads=2, image_size=16, patch_size=8))
    model = _randomize(transformers.SiglipModel(config).eval(), torch)
    model.save_pretrained(tmp_path)
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>", "eos_token": "</s>"}))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), pad_token="<pad>")
    prompts = ["a photo of a dog", "two cats !", "a photo of a cat a photo of a dog"]  # the last one truncated
    ids = fast(prompts, padding="max_length", max_length=8, truncation=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = model.get_text_features(input_ids=ids)
    want = getattr(want, "pooler_output", want).numpy()
    jmodel, params, jtok = load_clip_text(tmp_path)
    with pytest.warns(UserWarning, match="truncated"):
        np.testing.assert_array_equal(jtok(prompts), ids.numpy())
    with pytest.warns(UserWarning, match="truncated"):
        got = np.asarray(TextTower(jmodel, params, jtok).encode(prompts))
    assert np.abs(got - want).max() <= TOL


def test_transformers_missing_and_unexpected_keys_are_named(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**_hf_text_config()))
    sd = {k: v for k, v in model.state_dict().items()}
    sd["text_model.encoder.layers.0.extra.weight"] = torch.zeros(2)
    folder = _safetensors_dir(tmp_path, sd, "model.safetensors")
    model.config.to_json_file(folder / "config.json")
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys \['text_model.encoder.layers.0.extra.weight'\]"):
        load_clip_text(folder, tokenizer=False)
    sd = {k: v for k, v in model.state_dict().items() if k != "text_model.encoder.layers.1.mlp.fc2.bias"}
    _safetensors_dir(tmp_path, sd, "model.safetensors")
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \['text_model.encoder.layers.1.mlp.fc2.bias'\]"):
        load_clip_text(folder, tokenizer=False)


HF_CLASSES = ["CLIPModel", "CLIPTextModel", "CLIPTextModelWithProjection", "SiglipModel", "SiglipTextModel"]
# Tensors no text tower reads: the image tower's, the logit scale and bias.
NOT_TEXT = re.compile(r"^(vision_model\.|visual_projection\.|logit_)")


def _saved_hf(name, folder):
    """(state dict, config.json) of a random two-layer transformers model of class `name`, as save_pretrained
    writes them (transformers 5 writes CLIPTextModel and SiglipTextModel without the `text_model.` prefix)."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from safetensors.numpy import load_file

    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                  patch_size=8)
    if name == "SiglipModel":
        config = transformers.SiglipConfig(text_config=_hf_text_config(), vision_config=vision)
    elif name == "CLIPModel":
        config = transformers.CLIPConfig(text_config=_hf_text_config(), vision_config=vision, projection_dim=24)
    else:
        config = getattr(transformers, name.replace("Model", "Config").replace("WithProjection", ""))(
            **_hf_text_config(), **({"projection_dim": 24} if name.startswith("CLIP") else {}))
    getattr(transformers, name)(config).save_pretrained(folder)
    return load_file(str(folder / "model.safetensors")), json.loads((folder / "config.json").read_text())


@pytest.mark.parametrize("name", HF_CLASSES)
def test_each_missing_transformers_text_tensor_is_refused_by_its_own_name(name, tmp_path):
    """Every text-tower tensor of a transformers file, removed alone, is refused with exactly its name as the file
    names it, nothing else named. The sizes are read off the tensors, so before they were checked against
    config.json's class a missing CLIP projection loaded a model without one, a missing token or position
    embedding or first MLP weight failed as a KeyError or "no CLIP text tower", a missing SigLIP head weight or
    bias named the other as unexpected, and a prefix-less CLIPTextModel's keys were named with the prefix."""
    from safetensors.numpy import save_file

    sd, config = _saved_hf(name, tmp_path / "saved")
    keys = [k for k in sd if not NOT_TEXT.search(k)]
    assert len(keys) >= 36 and (name in ("CLIPTextModel", "SiglipTextModel")) != keys[0].startswith("text_model.")
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    for key in keys:
        save_file({k: v for k, v in sd.items() if k != key}, str(folder / "model.safetensors"))
        with pytest.raises(CheckpointMismatchError, match=rf"missing keys \[{re.escape(repr(key))}\](\.|$)"):
            load_clip_text(folder, tokenizer=False)


@pytest.mark.parametrize("name", HF_CLASSES)
def test_a_transformers_text_layer_more_or_fewer_than_config_is_named(name, tmp_path):
    """A text layer beyond config.json's num_hidden_layers is refused naming its tensors as unexpected, a layer
    fewer naming the last one's as missing, and a projection its class has not as unexpected: the depth and the
    projection were read off the tensors, so each loaded another model than config.json's."""
    from safetensors.numpy import save_file

    sd, config = _saved_hf(name, tmp_path / "saved")
    last = re.compile(r"(^|\.)encoder\.layers\.1\.")  # _hf_text_config: two layers
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    layer = r"(text_model\.)?encoder\.layers\.{}\."
    save_file({**sd, **{last.sub(r"\1encoder.layers.2.", k): v for k, v in sd.items() if last.search(k)}},
              str(folder / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError, match=r"2 layers\): unexpected keys \['" + layer.format(2) + r"[^;]*$"):
        load_clip_text(folder, tokenizer=False)
    save_file({k: v for k, v in sd.items() if not last.search(k)}, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError, match=r"2 layers\): missing keys \['" + layer.format(1) + r"[^;]*$"):
        load_clip_text(folder, tokenizer=False)
    if name == "CLIPTextModel":
        save_file({**sd, "text_projection.weight": np.zeros((24, 32), np.float32)}, str(folder / "model.safetensors"))
        with pytest.raises(CheckpointMismatchError, match=r"2 layers\): unexpected keys \['text_projection.weight'\]"):
            load_clip_text(folder, tokenizer=False)


def test_transformers_defaults_for_what_config_json_leaves_out_are_transformers():
    """save_pretrained leaves out what equals the config class's default, so clip_text's table of them must be
    transformers' own: each entry against a default-constructed text config of its family (the reference); a
    CLIPModel's projection_dim is CLIPConfig's, and SigLIP's projection_size left out is its hidden_size."""
    transformers = pytest.importorskip("transformers")
    from convert.clip_text.hf import DEFAULTS as _HF_DEFAULTS

    classes = {"clip": transformers.CLIPTextConfig, "siglip": transformers.SiglipTextConfig}
    assert set(classes) == set(_HF_DEFAULTS)
    for family, cls in classes.items():
        theirs = cls()
        for name, ours in _HF_DEFAULTS[family].items():
            want = theirs.hidden_size if (family, name, ours) == ("siglip", "projection_size", None) else ours
            assert getattr(theirs, name, None) == want, (family, name)
    assert transformers.CLIPConfig().projection_dim == _HF_DEFAULTS["clip"]["projection_dim"]


@pytest.mark.parametrize("name", HF_CLASSES)
def test_a_transformers_config_json_of_other_sizes_is_refused(name, tmp_path):
    """config.json gives the text tower its heads, eps and activation, so one whose sizes (width, MLP, vocabulary,
    positions, projection) the tensors have not is refused naming the setting, its value and the tensors': it may
    be another model's. Before, the sizes were read off the tensors and config.json's were never compared: each
    loaded, with the other model's heads. A CLIPModel's projection is its own projection_dim, not its
    text_config's (which transformers does not read either)."""
    sd, config = _saved_hf(name, tmp_path / "saved")
    text = "text_config" if "text_config" in config else None
    sizes = ["hidden_size", "intermediate_size", "vocab_size", "max_position_embeddings"]
    sizes += {"CLIPModel": ["projection_dim"], "CLIPTextModelWithProjection": ["projection_dim"]}.get(name, [])
    sizes += ["projection_size"] if name.startswith("Siglip") else []
    folder = tmp_path / "ckpt"
    shutil.copytree(tmp_path / "saved", folder)
    for setting in sizes:
        top = setting == "projection_dim" or text is None  # CLIPModel's projection_dim is the model's own
        have = (config if top else config[text])[setting]
        other = json.loads(json.dumps(config))
        (other if top else other[text])[setting] = 2 * have
        (folder / "config.json").write_text(json.dumps(other))
        with pytest.raises(CheckpointMismatchError, match=rf"does not match its config.json \({name}\): {setting} "
                                                          rf"{2 * have} in config.json, {have} in the tensors\. "
                                                          r"Is config.json another model's\?"):
            load_clip_text(folder, tokenizer=False)
    if name == "CLIPModel":  # its text_config's projection_dim is no size of the model
        config["text_config"]["projection_dim"] = 7
        (folder / "config.json").write_text(json.dumps(config))
        assert load_clip_text(folder, tokenizer=False)[0].config.embed_dim == 24


@pytest.mark.parametrize("name", ["CLIPModel", "SiglipTextModel"])
def test_a_transformers_size_config_json_leaves_out_is_transformers_default(name, tmp_path):
    """A size config.json leaves out is its class's default (save_pretrained writes only what differs from it):
    position embeddings of transformers' default count (CLIP 77, SigLIP 64) load without max_position_embeddings,
    others are refused naming the default. Before, any count loaded."""
    from safetensors.numpy import save_file

    from convert.clip_text.hf import DEFAULTS as _HF_DEFAULTS

    sd, config = _saved_hf(name, tmp_path / "saved")
    text = config.get("text_config", config)
    del text["max_position_embeddings"]
    default = _HF_DEFAULTS["siglip" if name.startswith("Siglip") else "clip"]["max_position_embeddings"]
    folder = tmp_path / "ckpt"
    shutil.copytree(tmp_path / "saved", folder)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointMismatchError, match=rf"max_position_embeddings {default} in config.json, 16 in "
                                                      "the tensors"):
        load_clip_text(folder, tokenizer=False)
    key = next(k for k in sd if k.endswith("position_embedding.weight") and not k.startswith("vision_model."))
    save_file({**sd, key: np.zeros((default, sd[key].shape[1]), np.float32)}, str(folder / "model.safetensors"))
    assert load_clip_text(folder, tokenizer=False)[0].config.context_length == default


def _clip_tokenizer_fast(tmp_path, transformers, open_clip):
    """transformers' CLIPTokenizerFast from vocab.json + merges.txt made of open_clip's copy of OpenAI's BPE
    file, as transformers' CLIP repos hold them (transformers converts them to its tokenizer.json itself)."""
    import gzip
    import os

    from open_clip.tokenizer import bytes_to_unicode  # the reference's own byte table, not ours

    merges = gzip.open(os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")).read()
    merges = merges.decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (tmp_path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return transformers.CLIPTokenizerFast(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))


# --- tokenizer ---------------------------------------------------------------------------------------------

def test_bundled_bpe_tokenizer_gives_openai_clip_ids():
    """Hand reference, no torch: OpenAI CLIP's ids for "a photo of a cat" (sot 49406, eot 49407, 0-padded)."""
    ids = CLIPTokenizer.from_bpe()(["a photo of a cat"])
    assert ids.shape == (1, 77) and ids.dtype == np.int32
    assert ids[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 0]
    assert not ids[0, 7:].any()


def test_bpe_tokenizer_matches_open_clip_and_warns_on_truncation():
    open_clip = pytest.importorskip("open_clip")
    import os

    tok = CLIPTokenizer.from_bpe(os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz"))
    with pytest.warns(UserWarning, match="1 prompt.*truncated"):
        got = tok(PROMPTS)
    np.testing.assert_array_equal(got, open_clip.tokenize(PROMPTS).numpy())
    assert got[-1, -1] == 49407  # a truncated prompt keeps its end token


def test_tokenizer_json_matches_clip_tokenizer_fast(tmp_path):
    transformers = pytest.importorskip("transformers")
    open_clip = pytest.importorskip("open_clip")
    fast = _clip_tokenizer_fast(tmp_path, transformers, open_clip)
    fast.save_pretrained(tmp_path / "saved")
    want = fast(PROMPTS, padding="max_length", max_length=77, truncation=True)["input_ids"]
    with pytest.warns(UserWarning, match="truncated"):
        got = CLIPTokenizer.from_tokenizer_json(tmp_path / "saved")(PROMPTS)
    np.testing.assert_array_equal(got, np.asarray(want))


def test_tokenizer_refuses_bad_input():
    tok = CLIPTokenizer.from_bpe()
    with pytest.raises(TypeError, match="list of strings"):
        tok([1, 2])
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        CLIPTokenizer.from_tokenizer_json("/nonexistent-folder")


def test_export_open_clip_is_open_clips_layout_and_inverts_the_reader():
    torch = pytest.importorskip("torch")
    open_clip = pytest.importorskip("open_clip")
    from convert.clip_text import export_open_clip

    tower = open_clip.model._build_text_tower(16, open_clip.model.CLIPTextCfg(
        context_length=8, vocab_size=100, width=32, heads=2, layers=2), quick_gelu=True)
    _randomize(tower, torch, seed=5)
    jmodel, params, _ = load_clip_text(tower.state_dict(), quick_gelu=True, heads=2, tokenizer=False)
    exported = export_open_clip(params, jmodel.config)
    fresh = open_clip.model._build_text_tower(16, open_clip.model.CLIPTextCfg(
        context_length=8, vocab_size=100, width=32, heads=2, layers=2), quick_gelu=True)
    fresh.load_state_dict({k: torch.as_tensor(v) for k, v in exported.items()}, strict=True)
    for k, v in tower.state_dict().items():
        np.testing.assert_array_equal(exported[k], v.numpy())


# --- both towers and the checkpoint's own tokenizer, end to end (convert.load_clip) ----------------------------

PROMPTS_SHORT = ["a photo of a dog", "Two CATS, sleeping!", "naïve café ½"]

def _images(torch, n=2, size=16):
    x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(7))
    return x, x.permute(0, 2, 3, 1).numpy()


def test_load_clip_open_clip_folder_gives_encode_image_and_encode_text(tmp_path):
    """open_clip.tokenize + encode_text/encode_image vs load_clip's tokenizer (the bundled BPE) and towers."""
    torch = pytest.importorskip("torch")
    open_clip = pytest.importorskip("open_clip")
    import convert

    model_cfg = {"embed_dim": 24, "quick_gelu": True,
                 "vision_cfg": {"image_size": 16, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
    model = _randomize(open_clip.model.CLIP(**model_cfg).eval(), torch)
    folder = _safetensors_dir(tmp_path, model.state_dict(), "open_clip_model.safetensors")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    clip = convert.load_clip(folder)
    x, xj = _images(torch)
    with torch.no_grad():
        want_text = model.encode_text(open_clip.tokenize(PROMPTS_SHORT)).numpy()
        want_image = model.encode_image(x).numpy()
    assert np.abs(np.asarray(clip.text_tower.encode(PROMPTS_SHORT)) - want_text).max() <= TOL
    got_image = clip.image_model.apply({"params": clip.image_params}, xj).logits
    assert np.abs(np.asarray(got_image) - want_image).max() <= TOL


def test_load_clip_transformers_folder_gives_image_and_text_features(tmp_path):
    """CLIPTokenizerFast + get_text_features/get_image_features vs load_clip's tokenizer (the folder's
    tokenizer.json) and towers."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    open_clip = pytest.importorskip("open_clip")
    import convert

    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                           image_size=16, patch_size=8), projection_dim=24)
    model = _randomize(transformers.CLIPModel(config).eval(), torch)
    model.save_pretrained(tmp_path / "clip")
    fast = _clip_tokenizer_fast(tmp_path, transformers, open_clip)
    fast.save_pretrained(tmp_path / "clip")
    # As transformers' CLIP folders hold it: the image size convert.load builds the image tower for.
    transformers.CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}
                                    ).save_pretrained(tmp_path / "clip")
    clip = convert.load_clip(tmp_path / "clip")
    x, xj = _images(torch)
    batch = fast(PROMPTS_SHORT, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        want_text = model.get_text_features(input_ids=batch["input_ids"])
        want_image = model.get_image_features(pixel_values=x)
    want_text = getattr(want_text, "pooler_output", want_text).numpy()
    want_image = getattr(want_image, "pooler_output", want_image).numpy()
    # The folder's tokenizer.json (and its pad token, from tokenizer_config.json) gives CLIPTokenizerFast's ids.
    np.testing.assert_array_equal(clip.tokenizer(PROMPTS_SHORT), batch["input_ids"].numpy())
    assert np.abs(np.asarray(clip.text_tower.encode(PROMPTS_SHORT)) - want_text).max() <= TOL
    got_image = clip.image_model.apply({"params": clip.image_params}, xj).logits
    assert np.abs(np.asarray(got_image) - want_image).max() <= TOL


def test_heads_and_quick_gelu_that_contradict_the_checkpoints_config_are_refused(tmp_path):
    """`heads=` and `quick_gelu=` say what a config-less open_clip state dict cannot; where the checkpoint's config
    says them (open_clip_config.json, its default 8 heads where text_cfg is silent; transformers' config.json), a
    different value is refused naming both, as convert.load refuses a num_heads config.json contradicts; the same
    value is accepted. Before, open_clip's were obeyed over the config and transformers' ignored without a word."""
    sd, config = _saved_open_clip("CLIP")  # text_cfg: 4 heads; model_cfg: quick_gelu
    folder = tmp_path / "oc"
    _load_open_clip(sd, config, folder)
    assert load_clip_text(folder, heads=4, quick_gelu=True, tokenizer=False)[0].config.heads == 4
    with pytest.raises(ValueError, match=r"heads=2 contradicts the checkpoint's open_clip config \(4 heads\)"):
        load_clip_text(folder, heads=2, tokenizer=False)
    with pytest.raises(ValueError, match=r"quick_gelu=False contradicts the checkpoint's open_clip config"):
        load_clip_text(folder, quick_gelu=False, tokenizer=False)
    silent = {"model_cfg": dict(config["model_cfg"], text_cfg={k: v for k, v in config["model_cfg"]["text_cfg"].items()
                                                               if k != "heads"})}
    (folder / "open_clip_config.json").write_text(json.dumps(silent))
    with pytest.raises(ValueError, match=r"heads=4 contradicts .*\(8 heads, open_clip default where text_cfg is"):
        load_clip_text(folder, heads=4, tokenizer=False)
    hf = tmp_path / "hf"
    _saved_hf("CLIPTextModel", hf)
    said = load_clip_text(hf, tokenizer=False)[0].config
    assert load_clip_text(hf, heads=said.heads, tokenizer=False)[0].config.heads == said.heads
    with pytest.raises(ValueError, match=rf"heads={said.heads + 1} contradicts .*config.json \(heads {said.heads}\)"):
        load_clip_text(hf, heads=said.heads + 1, tokenizer=False)
    with pytest.raises(ValueError, match=r"quick_gelu=False contradicts .*config.json \(quick_gelu True\)"):
        load_clip_text(hf, quick_gelu=False, tokenizer=False)


def test_a_hostile_text_layer_count_is_refused_before_any_work(tmp_path):
    """The layer count sizes the list of tensors a text tower must have: 10**9 in config.json or open_clip_config.json
    is refused by jaxvit's limit on depth at once (listing its keys would take the memory of the machine)."""
    from safetensors.numpy import save_file

    sd, config = _saved_hf("CLIPTextModel", tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(dict(config, num_hidden_layers=10 ** 9)))
    with pytest.raises(ValueError, match=r"num_hidden_layers must be an integer from 1 to 256; got 1000000000"):
        load_clip_text(tmp_path / "hf", tokenizer=False)
    sd, config = _saved_open_clip("CLIP")
    config["model_cfg"]["text_cfg"]["layers"] = 10 ** 9
    folder = tmp_path / "oc"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    save_file(sd, str(folder / "open_clip_model.safetensors"))
    with pytest.raises(ValueError, match=r"text_cfg's layers must be an integer from 1 to 256; got 1000000000"):
        load_clip_text(folder, tokenizer=False)
