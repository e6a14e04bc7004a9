"""transformers' CLIP and SigLIP text towers (`text_model.*`, or unprefixed where transformers 5 saved a
CLIPTextModel / SiglipTextModel) onto `jaxvit.clip_text.CLIPText`. The mapping: `convert.clip_text`."""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from convert.clip_text.common import check_consumed, layer_norm, linear
from convert.errors import CheckpointMismatchError, UnsupportedModelError, key_mismatch, other_sizes
from jaxvit.clip_text import CLIPTextConfig
from jaxvit.config import INT_LIMITS, check_int

_HF_ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
HF_TYPES = {"clip": "clip", "clip_text_model": "clip", "siglip": "siglip", "siglip_text_model": "siglip"}
# What each family's config.json leaves out of its text tower when it equals transformers' default (save_pretrained
# writes only what differs), by transformers' names: what the tensors cannot say (heads, eps, activation, eos), and
# what they must agree with (a config.json of another model would set another model's heads on these weights).
# CLIPModel's projection_dim is its own (CLIPConfig's, the same default); SigLIP's projection_size None: hidden_size.
DEFAULTS = {
    "clip": dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                 eos_token_id=49407, projection_dim=512),
    "siglip": dict(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=64, hidden_act="gelu_pytorch_tanh",
                   layer_norm_eps=1e-6, eos_token_id=49407, projection_size=None)}


def hf_family(config: Mapping[str, Any]) -> str:
    model_type = config.get("model_type")
    if model_type not in HF_TYPES:
        raise UnsupportedModelError(f"transformers model_type {model_type!r} has no supported text tower; supported: "
                                    f"{', '.join(HF_TYPES)}")
    return HF_TYPES[model_type]


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
    return lambda name: text.get(name, DEFAULTS[family][name])


def _hf_class(config: Mapping[str, Any]) -> str | None:
    """The class config.json names (its one architecture), if any."""
    archs = config.get("architectures")
    return archs[0] if isinstance(archs, list) and len(archs) == 1 and isinstance(archs[0], str) else None


def hf_prefix(sd: Mapping[str, Any]) -> str | None:
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


def check_hf_class(sd: Mapping[str, np.ndarray], config: Mapping[str, Any], *, prefix: str = "text_model.",
                   name: str = "the checkpoint") -> None:
    """Refuses a state dict without exactly the text tensors of config.json's class, naming them as the file does.
    Called before `hf_config` reads the sizes off the tensors, which takes a missing projection for a class
    without one and counts a missing or extra layer into the depth."""
    family = hf_family(config)
    depth = _hf_settings(config)("num_hidden_layers")
    check_int("config.json: num_hidden_layers", depth, *INT_LIMITS["depth"])  # bounded: keys listed per layer
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
    """Sizes from the tensors (`check_hf_class` first: the tensors of its class), which must be config.json's,
    the rest from config.json, with transformers' defaults for what it leaves out. `prefix`: the text tower's
    (`hf_prefix`)."""
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
        sizes.append(("projection_dim", config.get("projection_dim", DEFAULTS["clip"]["projection_dim"]), embed)
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
        q, k, v = (linear(take, f"{b}self_attn.{n}_proj") for n in "qkv")
        qkv = None if any(p["kernel"] is None or p["bias"] is None for p in (q, k, v)) else {
            "kernel": np.concatenate([q["kernel"], k["kernel"], v["kernel"]], axis=1),
            "bias": np.concatenate([q["bias"], k["bias"], v["bias"]])}
        params[f"resblocks_{i}"] = {
            "ln_1": layer_norm(take, b + "layer_norm1"), "ln_2": layer_norm(take, b + "layer_norm2"), "in_proj": qkv,
            "out_proj": linear(take, b + "self_attn.out_proj"), "c_fc": linear(take, b + "mlp.fc1"),
            "c_proj": linear(take, b + "mlp.fc2")}
    params["ln_final"] = layer_norm(take, prefix + "final_layer_norm")
    if cfg.embed_dim:
        head = prefix + "head" if cfg.proj_bias else "text_projection"
        params["text_projection"] = linear(take, head, bias=cfg.proj_bias)
    check_consumed(sd, taken, missing)
    return params
