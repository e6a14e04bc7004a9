"""CLIP text towers from open_clip and transformers checkpoints onto `jaxvit.clip_text.CLIPText`.

Key mapping (open_clip, optionally under `text.` for CustomTextCLIP such as SigLIP; transformers under
`text_model.`, or at the top level where transformers 5 saved a CLIPTextModel / SiglipTextModel):
  token_embedding.weight            | embeddings.token_embedding.weight     -> token_embedding
  positional_embedding              | embeddings.position_embedding.weight  -> positional_embedding
  transformer.resblocks.{i}.        | encoder.layers.{i}.
    ln_1, ln_2                      |   layer_norm1, layer_norm2            -> ln_1, ln_2
    attn.in_proj_weight/bias        |   self_attn.{q,k,v}_proj (stacked)    -> in_proj
    attn.out_proj, mlp.c_fc, c_proj |   self_attn.out_proj, mlp.fc1, fc2    -> out_proj, c_fc, c_proj
  ln_final                          | final_layer_norm                      -> ln_final
  text_projection (D, E) or Linear  | text_projection (CLIP) / head (SigLIP) -> text_projection
Every other key must belong to the image tower (`visual.*`, `vision_model.*`, `visual_projection.*`) or be
one of the scalars/buffers named in `_IGNORED`; anything else is an unexpected key, named. Before the sizes are
read off the tensors, the text tensors are checked against the model the config describes (its layers, whether
it projects), so that a missing or extra one is named rather than read as another model.
What the tensors cannot say (heads, activation, eps, pooling) comes from the checkpoint's config
(transformers' config.json, open_clip's open_clip_config.json) or from the caller, so the sizes read off the
tensors must be the config's (its library's defaults where it is silent): another model's config is refused, naming
the setting. A bare open_clip state dict has no config: nothing but its tensors says its sizes.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import jax.numpy as jnp
import numpy as np

from convert.sources import download, is_file_name, read_file, read_json
from convert.errors import CheckpointMismatchError, UnsupportedModelError, key_mismatch, other_sizes
from convert.timm_vit import clean_state_dict
from jaxvit.clip_text import CLIPText, CLIPTextConfig, TextTower
from jaxvit.clip_tokenizer import CLIPTokenizer
from jaxvit.config import is_real

OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
HF_FILES = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# Scalars and buffers that are no part of the text tower's computation.
_IGNORED = {"attn_mask", "logit_scale", "logit_bias", "text_model.embeddings.position_ids", "embeddings.position_ids",
            "text.attn_mask"}
# open_clip text_cfg entries that change the computation beyond what CLIPText implements (refused when set).
_REFUSED_TEXT_CFG = ("hf_model_name", "ls_init_value", "embed_cls", "use_pad_mask", "qk_norm", "block_type",
                     "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc")
# What open_clip builds where open_clip_config.json's text_cfg leaves a setting out (its CLIPTextCfg's defaults), by
# open_clip's names: what the tensors cannot say (heads, pooling, causal mask), and what they must agree with (a
# text_cfg of another model would set another model's heads on these weights).
_OPEN_CLIP_DEFAULTS = dict(context_length=77, vocab_size=49408, width=512, heads=8, layers=12, mlp_ratio=4.0,
                           pool_type="argmax", eos_id=2, no_causal_mask=False, proj_type="linear", proj_bias=False)
_VISION_PREFIXES = ("visual.", "vision_model.", "visual_projection.")
_HF_ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
_HF_TYPES = {"clip": "clip", "clip_text_model": "clip", "siglip": "siglip", "siglip_text_model": "siglip"}
# What each family's config.json leaves out of its text tower when it equals transformers' default (save_pretrained
# writes only what differs), by transformers' names: what the tensors cannot say (heads, eps, activation, eos), and
# what they must agree with (a config.json of another model would set another model's heads on these weights).
# CLIPModel's projection_dim is its own (CLIPConfig's, the same default); SigLIP's projection_size None: hidden_size.
_HF_DEFAULTS = {
    "clip": dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                 eos_token_id=49407, projection_dim=512),
    "siglip": dict(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=64, hidden_act="gelu_pytorch_tanh",
                   layer_norm_eps=1e-6, eos_token_id=49407, projection_size=None)}


# --- open_clip -------------------------------------------------------------------------------------------

# An open_clip text tower's tensors outside its blocks, and each block's.
_OPEN_CLIP_TOP = ("token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias")
_OPEN_CLIP_BLOCK = ("ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
                    "attn.out_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                    "mlp.c_proj.weight", "mlp.c_proj.bias")


def _open_clip_prefix(sd: Mapping[str, Any]) -> str | None:
    """The prefix of an open_clip text tower's tensors: "" (CLIP) or `text.` (CustomTextCLIP, e.g. SigLIP); None
    where the state dict holds none (any of its tensors will do: a missing one is named by `_check_open_clip`)."""
    for prefix in ("", "text."):
        if any(k.startswith(tuple(prefix + t for t in (*_OPEN_CLIP_TOP, "transformer.resblocks."))) for k in sd):
            return prefix
    if any(k.startswith("text.transformer.") and not k.startswith("text.transformer.resblocks.") for k in sd):
        raise UnsupportedModelError("this open_clip checkpoint's text tower is a transformers model (hf_model_name, "
                                    "`text.transformer.*`); supported: CLIP's own text transformer (OpenAI, open_clip "
                                    "ViT-*, SigLIP)")
    return None


def _open_clip_settings(text_cfg: Mapping[str, Any]):
    """name -> text_cfg's setting, else open_clip's default."""
    return lambda name: text_cfg.get(name, _OPEN_CLIP_DEFAULTS[name])


def open_clip_config(sd: Mapping[str, np.ndarray], *, text_cfg: Mapping[str, Any] | None = None,
                     embed_dim: int | None = None, quick_gelu: bool | None = None, heads: int | None = None,
                     name: str = "") -> CLIPTextConfig:
    """The text tower's config: sizes from the tensors; heads, activation, eps and pooling from open_clip's
    `text_cfg` (open_clip_config.json's model_cfg) or the arguments. `quick_gelu` must be said somewhere:
    the tensors of OpenAI's (QuickGELU) and LAION's (GELU) checkpoints look the same. `embed_dim`: model_cfg's;
    given, the tensors must be exactly those of the model text_cfg describes (`_check_open_clip`), of its sizes
    (width, vocab_size, context_length, mlp_ratio, embed_dim), open_clip's defaults where it is silent. Without it
    (no open_clip_config.json) nothing says the sizes but the tensors: there is nothing to compare them with."""
    prefix = _open_clip_prefix(sd)
    if prefix is None:
        raise CheckpointMismatchError("no open_clip text tower: the checkpoint has no token_embedding.weight, "
                                      "positional_embedding, transformer.resblocks.* or ln_final.*")
    text_cfg = dict(text_cfg or {})
    setting = _open_clip_settings(text_cfg)
    unsupported = {k: v for k, v in text_cfg.items() if k in _REFUSED_TEXT_CFG and v}
    if setting("proj_type") not in ("linear", "none"):
        unsupported["proj_type"] = text_cfg["proj_type"]
    if unsupported:
        raise UnsupportedModelError(f"open_clip text_cfg {unsupported} is not supported; supported: CLIP's text "
                                    "transformer (argmax/eos/last pooling, causal or not, linear projection)")
    _check_open_clip(sd, prefix, text_cfg, embed_dim, name)
    vocab, width = sd[prefix + "token_embedding.weight"].shape
    layers = len({m.group(1) for k in sd if (m := re.match(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.", k))})
    if quick_gelu is None:
        quick_gelu = text_cfg.get("quick_gelu")
    act_kwargs = text_cfg.get("act_kwargs") or {}
    if quick_gelu is None and not act_kwargs:
        raise ValueError("an open_clip checkpoint does not say its activation: pass quick_gelu=True for OpenAI's "
                         "weights and open_clip's *-quickgelu models, quick_gelu=False for the others (or load it "
                         "from a folder with its open_clip_config.json)")
    act = "quick_gelu" if quick_gelu else ("gelu_tanh" if act_kwargs.get("approximate") == "tanh" else "gelu")
    proj = sd.get(prefix + "text_projection", sd.get(prefix + "text_projection.weight"))
    pool = setting("pool_type")
    if pool not in ("argmax", "eos", "last"):
        raise UnsupportedModelError(f"open_clip text pool_type {pool!r} is not supported; supported: argmax, eos, last")
    context = int(sd[prefix + "positional_embedding"].shape[0])
    mlp = int(sd[f"{prefix}transformer.resblocks.0.mlp.c_fc.weight"].shape[0])
    embed = 0 if proj is None else int(proj.shape[1] if proj.ndim == 2 and prefix + "text_projection" in sd
                                       else proj.shape[0])
    if embed_dim is not None:  # open_clip_config.json's model, whose heads, eps and activation these weights get
        said, ratio = setting("width"), setting("mlp_ratio")
        sizes = [("width", said, width), ("vocab_size", setting("vocab_size"), vocab),
                 ("context_length", setting("context_length"), context),
                 ("MLP width (width * mlp_ratio)", int(said * ratio) if is_real(said) and is_real(ratio) else None,
                  mlp)] + ([("embed_dim", embed_dim, embed)] if embed else [])
        if wrong := other_sizes(sizes, "open_clip_config.json"):
            raise CheckpointMismatchError(f"{name or 'the checkpoint'} does not match its open_clip_config.json: "
                                          f"{wrong}")
    # open_clip builds text_cfg's heads (8 where it is silent); without a config, OpenAI's rule, 64 wide each
    heads = heads or (setting("heads") if embed_dim is not None else text_cfg.get("heads") or _openai_heads(width))
    return CLIPTextConfig(
        vocab_size=int(vocab), context_length=context, width=int(width), heads=int(heads), layers=layers, mlp_dim=mlp,
        embed_dim=embed, act=act, eps=float((text_cfg.get("norm_kwargs") or {}).get("eps", 1e-5)),
        causal=not setting("no_causal_mask"), pool=pool, eos_token_id=int(setting("eos_id")),
        proj_bias=prefix + "text_projection.bias" in sd, name=name)


def _check_open_clip(sd: Mapping[str, np.ndarray], prefix: str, text_cfg: Mapping[str, Any], embed_dim: int | None,
                     name: str) -> None:
    """Refuses a state dict without exactly the text tensors of its open_clip model, naming them as the file does.
    Before the sizes are read off the tensors, which takes a missing projection for a model without one and counts
    a missing or extra block into the depth. The model: open_clip_config.json's where `embed_dim` is given (open_clip's
    defaults where text_cfg leaves a setting out), else what the tensors imply (every block up to the last found, a
    Linear projection's weight with its bias)."""
    blocks = re.compile(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")
    found = {int(m.group(1)) for k in sd if (m := blocks.match(k))}
    configured = embed_dim is not None
    setting = _open_clip_settings(text_cfg)
    depth = setting("layers") if configured else max(found, default=0) + 1
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
        raise ValueError(f"open_clip_config.json: text_cfg's layers must be a positive integer; got {depth!r}")
    if configured and (not isinstance(embed_dim, int) or isinstance(embed_dim, bool) or embed_dim < 0):
        raise ValueError(f"open_clip_config.json: embed_dim must be a non-negative integer; got {embed_dim!r}")
    linear = ["text_projection.weight", "text_projection.bias"]  # open_clip makes it a Linear only with a bias
    if configured:
        projects, bias = embed_dim > 0 and setting("proj_type") != "none", setting("proj_bias")
    else:  # nothing but the file says whether the model projects, nor which of open_clip's two forms it has
        bias = any(prefix + k in sd for k in linear)
        projects = bias or prefix + "text_projection" in sd
    proj = (linear if bias else ["text_projection"]) if projects else []
    required = [*_OPEN_CLIP_TOP, *proj] + [f"transformer.resblocks.{i}.{t}" for i in range(depth)
                                           for t in _OPEN_CLIP_BLOCK]
    missing = [prefix + k for k in required if prefix + k not in sd]
    unexpected = [k for k in sd if (m := blocks.match(k)) and int(m.group(1)) >= depth]
    unexpected += [prefix + k for k in ("text_projection", *linear) if k not in proj and prefix + k in sd]
    if not (missing or unexpected):
        return
    if configured:
        what = f"its open_clip_config.json ({depth} layers)"
        advice = "A model of this configuration has exactly these tensors: is the file incomplete, or " \
                 "open_clip_config.json another model's?"
    else:
        what, advice = "an open_clip text tower", "Is the file incomplete?"
    raise key_mismatch(f"{name or 'the checkpoint'} does not match {what}", missing=missing, unexpected=unexpected,
                       advice=advice)


def _openai_heads(width: int) -> int:
    if width < 64:
        raise ValueError(f"an open_clip text tower of width {width} without its open_clip_config.json does not say its "
                         "head count (OpenAI's rule, width // 64, gives none): pass heads=")
    return width // 64


def params_from_open_clip(sd: Mapping[str, np.ndarray], cfg: CLIPTextConfig) -> dict:
    """The text tower's params from an open_clip state dict (the whole model's or the text tower's)."""
    prefix = _open_clip_prefix(sd) or ""
    taken: dict[str, np.ndarray] = {}
    missing: list[str] = []

    def take(key: str):
        full = prefix + key
        if full not in sd:
            missing.append(full)
            return None
        taken[full] = sd[full]
        return np.asarray(sd[full])

    params: dict[str, Any] = {"token_embedding": take("token_embedding.weight"),
                              "positional_embedding": take("positional_embedding")}
    for i in range(cfg.layers):
        b = f"transformer.resblocks.{i}."
        params[f"resblocks_{i}"] = {
            "ln_1": _ln(take, b + "ln_1"), "ln_2": _ln(take, b + "ln_2"),
            "in_proj": {"kernel": _t(take(b + "attn.in_proj_weight")), "bias": take(b + "attn.in_proj_bias")},
            "out_proj": _linear(take, b + "attn.out_proj"), "c_fc": _linear(take, b + "mlp.c_fc"),
            "c_proj": _linear(take, b + "mlp.c_proj")}
    params["ln_final"] = _ln(take, "ln_final")
    if cfg.embed_dim:
        if prefix + "text_projection" in sd:  # nn.Parameter (D, E): x @ text_projection
            params["text_projection"] = {"kernel": take("text_projection")}
        else:  # nn.Linear (SigLIP)
            params["text_projection"] = _linear(take, "text_projection", bias=cfg.proj_bias)
    _check(sd, taken, missing)
    return params


def export_open_clip(params, cfg: CLIPTextConfig) -> dict[str, np.ndarray]:
    """The text tower's params as an open_clip state dict (open_clip's names and layouts, text keys only): the
    inverse of `params_from_open_clip`, which open_clip's TextTransformer loads with strict=True."""
    p = {k: v for k, v in params.items()}
    sd = {"token_embedding.weight": p["token_embedding"], "positional_embedding": p["positional_embedding"],
          "ln_final.weight": p["ln_final"]["scale"], "ln_final.bias": p["ln_final"]["bias"]}
    names = {"ln_1": "ln_1", "ln_2": "ln_2", "in_proj": "attn.in_proj_", "out_proj": "attn.out_proj",
             "c_fc": "mlp.c_fc", "c_proj": "mlp.c_proj"}
    for i in range(cfg.layers):
        for ours, theirs in names.items():
            block, key = p[f"resblocks_{i}"][ours], f"transformer.resblocks.{i}.{theirs}"
            sep = "" if ours == "in_proj" else "."
            if ours.startswith("ln_"):
                sd[f"{key}.weight"], sd[f"{key}.bias"] = block["scale"], block["bias"]
            else:
                sd[f"{key}{sep}weight"], sd[f"{key}{sep}bias"] = np.asarray(block["kernel"]).T, block["bias"]
    if cfg.embed_dim:
        proj = p["text_projection"]
        if cfg.proj_bias:
            sd["text_projection.weight"], sd["text_projection.bias"] = np.asarray(proj["kernel"]).T, proj["bias"]
        else:
            sd["text_projection"] = proj["kernel"]
    return {k: np.array(v, np.float32, order="C") for k, v in sd.items()}  # writable C-order copies (safetensors)


# --- transformers ----------------------------------------------------------------------------------------

def hf_family(config: Mapping[str, Any]) -> str:
    model_type = config.get("model_type")
    if model_type not in _HF_TYPES:
        raise UnsupportedModelError(f"transformers model_type {model_type!r} has no supported text tower; supported: "
                                    f"{', '.join(_HF_TYPES)}")
    return _HF_TYPES[model_type]


def _hf_text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The text tower's settings in config.json: text_config of CLIPModel/SiglipModel, else the top level of
    CLIPTextModel* / SiglipTextModel."""
    text = config.get("text_config") if "text_config" in config else config
    if not isinstance(text, Mapping):
        raise ValueError("config.json: text_config must be a JSON object")
    return text


def _hf_settings(config: Mapping[str, Any]):
    """name -> the text tower's setting in config.json (`_hf_text_config`), else transformers' default."""
    family, text = hf_family(config), _hf_text_config(config)
    return lambda name: text.get(name, _HF_DEFAULTS[family][name])


def _hf_class(config: Mapping[str, Any]) -> str | None:
    """The class config.json names (its one architecture), if any."""
    archs = config.get("architectures")
    return archs[0] if isinstance(archs, list) and len(archs) == 1 and isinstance(archs[0], str) else None


def _hf_prefix(sd: Mapping[str, Any]) -> str | None:
    """The prefix of a transformers text tower's tensors: `text_model.`, or none ("") where transformers 5 saved
    CLIPTextModel / SiglipTextModel without it; None where the state dict holds no such tower."""
    if any(k.startswith("text_model.") for k in sd):
        return "text_model."
    if any(k.startswith(("embeddings.token_embedding.", "embeddings.position_embedding.", "encoder.layers.",
                         "final_layer_norm.")) for k in sd):
        return ""
    return None


# A transformers text layer's tensors, each a .weight and a .bias.
_HF_LAYER = ("layer_norm1", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
             "layer_norm2", "mlp.fc1", "mlp.fc2")


def _check_hf_class(sd: Mapping[str, np.ndarray], config: Mapping[str, Any], *, prefix: str = "text_model.",
                   name: str = "the checkpoint") -> None:
    """Refuses a state dict without exactly the text tensors of config.json's class, naming them as the file does.
    Called before `hf_config` reads the sizes off the tensors, which takes a missing projection for a class
    without one and counts a missing or extra layer into the depth."""
    family = hf_family(config)
    depth = _hf_settings(config)("num_hidden_layers")
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
        raise ValueError(f"config.json: num_hidden_layers must be a positive integer; got {depth!r}")
    arch = _hf_class(config)
    required = [prefix + k for k in ("embeddings.token_embedding.weight", "embeddings.position_embedding.weight",
                                     "final_layer_norm.weight", "final_layer_norm.bias")]
    required += [f"{prefix}encoder.layers.{i}.{t}.{p}" for i in range(depth) for t in _HF_LAYER
                 for p in ("weight", "bias")]
    unexpected = [k for k in sd if (m := re.match(re.escape(prefix) + r"encoder\.layers\.(\d+)\.", k))
                  and int(m.group(1)) >= depth]
    if arch:  # CLIPModel and CLIPTextModelWithProjection project the pooled token, CLIPTextModel does not
        projected = arch in ("CLIPModel", "CLIPTextModelWithProjection")
    else:  # config.json names no class: a CLIPModel's text tower projects, a text model's as its file says
        projected = config.get("model_type") == "clip" or "text_projection.weight" in sd
    if family == "siglip":  # SiglipTextModel always ends in its head (SiglipModel's text projection)
        required += [prefix + "head.weight", prefix + "head.bias"]
    elif projected:
        required.append("text_projection.weight")
    elif "text_projection.weight" in sd:
        unexpected.append("text_projection.weight")
    missing = [k for k in required if k not in sd]
    if missing or unexpected:
        raise key_mismatch(f"{name} does not match its config.json ({arch or config.get('model_type')}, {depth} "
                           "layers)", missing=missing, unexpected=unexpected,
                           advice="A model of this class has exactly these tensors: is the file incomplete, or "
                                  "config.json another model's?")


def hf_config(sd: Mapping[str, np.ndarray], config: Mapping[str, Any], *, prefix: str = "text_model.",
              name: str = "") -> CLIPTextConfig:
    """Sizes from the tensors (`_check_hf_class` first: the tensors of its class), which must be config.json's,
    the rest from config.json, with transformers' defaults for what it leaves out. `prefix`: the text tower's
    (`_hf_prefix`)."""
    family = hf_family(config)
    setting = _hf_settings(config)
    vocab, width = sd[prefix + "embeddings.token_embedding.weight"].shape
    layers = len({m.group(1) for k in sd if (m := re.match(re.escape(prefix) + r"encoder\.layers\.(\d+)\.", k))})
    hidden_act = setting("hidden_act")
    if hidden_act not in _HF_ACTS:
        raise UnsupportedModelError(f"config.json: hidden_act {hidden_act!r} is not supported; supported: "
                                    f"{', '.join(_HF_ACTS)}")
    proj = sd.get("text_projection.weight", sd.get(prefix + "head.weight"))
    context = int(sd[prefix + "embeddings.position_embedding.weight"].shape[0])
    mlp = int(sd[prefix + "encoder.layers.0.mlp.fc1.weight"].shape[0])
    embed = 0 if proj is None else int(proj.shape[0])
    sizes = [(k, setting(k), got) for k, got in (("hidden_size", width), ("intermediate_size", mlp),
                                                 ("vocab_size", vocab), ("max_position_embeddings", context))]
    # A CLIPModel projects into its own projection_dim (its text_config's is unused), SigLIP's head into
    # projection_size.
    if embed:
        sizes.append(("projection_dim", config.get("projection_dim", _HF_DEFAULTS["clip"]["projection_dim"]), embed)
                     if family == "clip" else ("projection_size", setting("projection_size") or setting("hidden_size"),
                                               embed))
    if wrong := other_sizes(sizes):
        raise CheckpointMismatchError(f"{name or 'the checkpoint'} does not match its config.json "
                                      f"({_hf_class(config) or config.get('model_type')}): {wrong}")
    eos = setting("eos_token_id")
    return CLIPTextConfig(
        vocab_size=int(vocab), context_length=context, width=int(width), heads=int(setting("num_attention_heads")),
        layers=layers, mlp_dim=mlp, embed_dim=embed, act=_HF_ACTS[hidden_act],
        eps=float(setting("layer_norm_eps")), causal=family == "clip",
        # transformers' CLIP pools at argmax(ids) when eos_token_id is the legacy 2, else at the first eos.
        pool=("argmax" if eos == 2 else "eos") if family == "clip" else "last", eos_token_id=int(eos),
        proj_bias=prefix + "head.bias" in sd, name=name)


def params_from_hf(sd: Mapping[str, np.ndarray], cfg: CLIPTextConfig, *, prefix: str = "text_model.") -> dict:
    """The text tower's params from a transformers CLIPModel / CLIPTextModel(WithProjection) / SigLIP state dict,
    its text tower's tensors under `prefix`."""
    taken: dict[str, np.ndarray] = {}
    missing: list[str] = []

    def take(key: str):
        if key not in sd:
            missing.append(key)
            return None
        taken[key] = sd[key]
        return np.asarray(sd[key])

    e = prefix + "embeddings."
    params: dict[str, Any] = {"token_embedding": take(e + "token_embedding.weight"),
                              "positional_embedding": take(e + "position_embedding.weight")}
    for i in range(cfg.layers):
        b = f"{prefix}encoder.layers.{i}."
        q, k, v = (_linear(take, f"{b}self_attn.{n}_proj") for n in "qkv")
        qkv = None if any(p["kernel"] is None or p["bias"] is None for p in (q, k, v)) else {
            "kernel": np.concatenate([q["kernel"], k["kernel"], v["kernel"]], axis=1),
            "bias": np.concatenate([q["bias"], k["bias"], v["bias"]])}
        params[f"resblocks_{i}"] = {
            "ln_1": _ln(take, b + "layer_norm1"), "ln_2": _ln(take, b + "layer_norm2"), "in_proj": qkv,
            "out_proj": _linear(take, b + "self_attn.out_proj"), "c_fc": _linear(take, b + "mlp.fc1"),
            "c_proj": _linear(take, b + "mlp.fc2")}
    params["ln_final"] = _ln(take, prefix + "final_layer_norm")
    if cfg.embed_dim:
        head = prefix + "head" if cfg.proj_bias else "text_projection"
        params["text_projection"] = _linear(take, head, bias=cfg.proj_bias)
    _check(sd, taken, missing)
    return params


# --- shared ----------------------------------------------------------------------------------------------

def _t(w):
    return None if w is None else w.T


def _ln(take, key):
    return {"scale": take(key + ".weight"), "bias": take(key + ".bias")}


def _linear(take, key, bias: bool = True):
    out = {"kernel": _t(take(key + ".weight"))}
    if bias:
        out["bias"] = take(key + ".bias")
    return out


def _check(sd, taken, missing) -> None:
    """Strict: every text key consumed, every parameter found; image-tower keys are left for the image reader."""
    unexpected = [k for k in sd if k not in taken and k not in _IGNORED and not k.startswith(_VISION_PREFIXES)]
    if missing or unexpected:
        raise key_mismatch("the CLIP text tower does not match the checkpoint", missing=missing, unexpected=unexpected)


def check_shapes(params, cfg: CLIPTextConfig) -> dict:
    """The params as float32 jax arrays, each the shape the config's module declares (else named)."""
    import jax

    expected = jax.eval_shape(lambda: CLIPText(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
    flat_e = {"/".join(str(p.key) for p in path): v.shape
              for path, v in jax.tree_util.tree_flatten_with_path(expected)[0]}
    flat_p = {"/".join(str(p.key) for p in path): v for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    wrong = [f"{k}: {tuple(flat_p[k].shape)} vs {tuple(s)}" for k, s in flat_e.items()
             if k in flat_p and tuple(flat_p[k].shape) != tuple(s)]
    if wrong or set(flat_e) != set(flat_p):
        raise CheckpointMismatchError("CLIP text tower tensors of the wrong shape (checkpoint vs config): "
                                      + "; ".join(wrong[:5] + sorted(set(flat_e) ^ set(flat_p))[:5]))
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params)


# --- loading ---------------------------------------------------------------------------------------------

def load_clip_text(source: Any, *, quick_gelu: bool | None = None, heads: int | None = None,
                   tokenizer: Any = None, dtype=jnp.float32) -> tuple[CLIPText, dict, CLIPTokenizer | None]:
    """A CLIP text tower as (module, params, tokenizer).

    `source`: an open_clip or transformers state dict (the whole CLIP model's or the text tower's); a
    weights file (.safetensors without torch; .bin/.pth need torch); a folder holding a transformers CLIP /
    SigLIP checkpoint (config.json + model.safetensors, tokenizer.json) or an open_clip one
    (open_clip_model.safetensors + open_clip_config.json); or a hub repo id, read through huggingface_hub's
    cache (HF_HUB_OFFLINE honoured). `quick_gelu`, `heads`: what an open_clip checkpoint without its
    open_clip_config.json does not say. `tokenizer`: a CLIPTokenizer, a tokenizer.json (or its folder) or
    CLIP BPE merges file, or False (none: the caller brings token ids); default: the checkpoint folder's tokenizer.json, else (CLIP's 49,408-token
    vocabulary) OpenAI's BPE as open_clip tokenises. Strict: missing or unexpected keys are named.
    """
    sd, folder, where = _read(source)
    if (prefix := _hf_prefix(sd)) is not None:
        config = read_json(folder / "config.json") if folder else None
        if not isinstance(config, dict):
            raise ValueError(f"{where}: transformers CLIP weights need their config.json (heads, activation, eos "
                             "token) beside them: load the checkpoint's folder")
        _check_hf_class(sd, config, prefix=prefix, name=where)
        cfg = hf_config(sd, config, prefix=prefix, name=where)
        params = params_from_hf(sd, cfg, prefix=prefix)
    elif _open_clip_prefix(sd) is not None:
        oc = read_json(folder / "open_clip_config.json") if folder else None
        model_cfg = (oc or {}).get("model_cfg") or {}
        text_cfg = dict(model_cfg.get("text_cfg") or {})
        if oc is not None:  # open_clip's own default: GELU unless the model config says quick_gelu
            text_cfg["quick_gelu"] = bool(model_cfg.get("quick_gelu", False))
        if tokenizer is None and (text_cfg.get("hf_tokenizer_name") or text_cfg.get("tokenizer_kwargs")):
            raise UnsupportedModelError(
                f"{where}: open_clip tokenises this model with {text_cfg.get('hf_tokenizer_name') or 'its'} tokenizer "
                f"and text cleaning {text_cfg.get('tokenizer_kwargs')}, which predmaps does not reproduce: load the "
                "transformers version of the checkpoint (its tokenizer.json), or pass tokenizer=")
        cfg = open_clip_config(sd, text_cfg=text_cfg, embed_dim=model_cfg.get("embed_dim"), quick_gelu=quick_gelu,
                               heads=heads, name=where)
        params = params_from_open_clip(sd, cfg)
    else:
        raise CheckpointMismatchError(f"{where} holds no CLIP text tower: expected open_clip's token_embedding.weight "
                                      "or transformers' text_model.embeddings.token_embedding.weight")
    params = check_shapes(params, cfg)
    return CLIPText(cfg, dtype=dtype), params, _tokenizer(tokenizer, folder, cfg, where)


def _tokenizer(tokenizer, folder: Path | None, cfg: CLIPTextConfig, where: str) -> CLIPTokenizer | None:
    n = cfg.context_length
    if tokenizer is False:  # the caller brings token ids
        return None
    if isinstance(tokenizer, CLIPTokenizer):
        return tokenizer
    if tokenizer is not None:
        path = Path(tokenizer)
        if path.is_dir() or path.suffix == ".json":
            return CLIPTokenizer.from_tokenizer_json(path, context_length=n)
        return CLIPTokenizer.from_bpe(path, context_length=n)
    if folder is not None and (folder / "tokenizer.json").is_file():
        return CLIPTokenizer.from_tokenizer_json(folder, context_length=n)
    if cfg.vocab_size == 49408 and cfg.pool == "argmax":  # OpenAI's vocabulary, as open_clip tokenises it
        return CLIPTokenizer.from_bpe(context_length=n)
    raise ValueError(f"{where}: no tokenizer.json beside the checkpoint and a vocabulary of {cfg.vocab_size} tokens "
                     "(not CLIP's 49,408): pass tokenizer= (the checkpoint's tokenizer.json)")


def _read(source: Any) -> tuple[dict[str, np.ndarray], Path | None, str]:
    """(state dict, the folder its config and tokenizer files are in or None, a description)."""
    if isinstance(source, Mapping):
        return clean_state_dict(source), None, "state dict"
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"cannot load a CLIP text tower from a {type(source).__name__}: pass a state dict, a file, "
                        "a folder or a hub repo id")
    path = Path(source)
    if path.is_file():
        return read_file(path), path.parent, str(path)
    if not path.is_dir():
        repo_id = str(source).removeprefix("hf-hub:")
        # A hub repo id is owner/name; anything else that does not exist is a missing local path.
        if os.path.lexists(path) or is_file_name(str(source)) or "/" not in repo_id:
            raise FileNotFoundError(f"CLIP checkpoint {source} does not exist (a folder, a weights file or a hub "
                                    "repo id such as openai/clip-vit-base-patch16)")
        path = _hub_folder(repo_id)  # HubUnavailableError when offline and not cached
    config = read_json(path / "config.json")
    hf_first = isinstance(config, dict) and config.get("model_type") in _HF_TYPES
    order = HF_FILES + OPEN_CLIP_FILES if hf_first or not (path / OPEN_CLIP_FILES[0]).exists() else OPEN_CLIP_FILES
    for name in order + HF_FILES:
        if (path / name).is_file():
            return read_file(path / name), path, str(path / name)
    raise FileNotFoundError(f"{path} holds none of {HF_FILES + OPEN_CLIP_FILES}")


def _hub_folder(repo_id: str) -> Path:
    """The huggingface_hub cache folder holding a repo's weights and JSON files (`sources.download`, as
    `convert.load` fetches them) and its tokenizer files. HF_HUB_OFFLINE honoured; a hub that does not answer
    is asked once, without huggingface_hub's retries, and then the tokenizer files come from the cache alone."""
    from huggingface_hub import constants, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, OfflineModeIsEnabled

    from convert.sources import _hub_answers

    weights = download(repo_id, model_name=repo_id)[0]
    cache_only = bool(constants.HF_HUB_OFFLINE)
    for name in TOKENIZER_FILES:
        try:
            hf_hub_download(repo_id, name, local_files_only=True)
            continue
        except (LocalEntryNotFoundError, EntryNotFoundError, OfflineModeIsEnabled):  # not cached
            pass
        cache_only = cache_only or not _hub_answers(hf_hub_url(repo_id, name))
        if not cache_only:
            try:
                hf_hub_download(repo_id, name)
            except EntryNotFoundError:  # the repo has no such file
                pass
    return weights.parent


class CLIP(NamedTuple):
    """Both towers of a CLIP checkpoint and its tokenizer (`load_clip`)."""

    image_model: Any  # jaxvit.ViT whose head is CLIP's image projection
    image_params: Any
    text_model: CLIPText
    text_params: Any
    tokenizer: CLIPTokenizer | None

    @property
    def text_tower(self) -> TextTower:
        return TextTower(self.text_model, self.text_params, self.tokenizer)
