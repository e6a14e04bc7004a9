"""open_clip checkpoints: the image tower as a timm-layout state dict and a jaxvit config.

Key mapping (open_clip's VisionTransformer under `visual.`, as timm converts OpenAI CLIP):
  class_embedding (D,) -> cls_token (1, 1, D);   positional_embedding (T, D) -> pos_embed (1, T, D)
  conv1 -> patch_embed.proj (no bias);  ln_pre -> norm_pre;  ln_post -> norm (fc_norm when
  final_ln_after_pool with average pooling);  proj (D, E) -> head, transposed, bias zero
  transformer.resblocks.{i}: ln_1 -> norm1, attn.in_proj_* -> attn.qkv, attn.out_proj -> attn.proj,
  ln_2 -> norm2, mlp.c_fc -> mlp.fc1, mlp.c_proj -> mlp.fc2, ls_{1,2}.gamma -> ls{1,2}.gamma
The text tower (every key outside `visual.`: token_embedding, positional_embedding, transformer.*,
ln_final, text_projection, logit_scale, logit_bias; `text.*` for CustomTextCLIP) is split off
untouched by `split_towers`, for a text-tower reader; the image reader never looks at it.
The architecture comes from open_clip_config.json's `model_cfg` (a hub repo or folder), or from an
open_clip model name (`model_name="ViT-B-16-quickgelu"`, resolved by an installed open_clip).
Refused by name: timm-trunk towers (`visual.trunk`), attentional pooling (CoCa), input patchnorm,
non-learnable position embeddings, other norm or activation arguments.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from convert.errors import CheckpointMismatchError, UnsupportedModelError, key_mismatch, other_sizes
from convert.timm_vit import infer_config
from jaxvit.config import INT_LIMITS, ConfigError, ViTConfig, check_int, is_real

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# vision_cfg entries that change the architecture beyond what jaxvit implements (refused when set).
_REFUSED_VISION = {"timm_model_name": "a timm trunk", "attentional_pool": "attentional pooling (CoCa)",
                   "input_patchnorm": "input patchnorm",
                   "act_kwargs": "activation arguments", "norm_kwargs": "norm arguments",
                   "pos_embed_type": "non-learnable position embeddings", "block_type": "another block type",
                   "qk_norm": "q/k normalisation", "scaled_cosine_attn": "scaled cosine attention",
                   "scale_heads": "head scaling", "scale_attn_inner": "an inner attention norm",
                   "scale_attn": "an attention-output norm", "scale_fc": "an MLP norm"}
# Read, or without effect on a plain VisionTransformer's inference (the timm_* ones need timm_model_name).
_KNOWN_VISION = {"image_size", "layers", "width", "patch_size", "head_width", "mlp_ratio", "ls_init_value",
                 "pool_type", "final_ln_after_pool", "no_ln_pre", "patch_dropout", "output_tokens",
                 "global_average_pool", "embed_cls", "output_dim", "attn_pooler_queries", "attn_pooler_heads", "timm_model_pretrained",
                 "timm_pool", "timm_proj", "timm_proj_bias", "timm_drop", "timm_drop_path"}


# open_clip's CLIPVisionCfg defaults, for what vision_cfg leaves out (open_clip_config.json spells only what differs).
VISION_DEFAULTS = dict(layers=12, width=768, head_width=64, mlp_ratio=4.0, patch_size=16, image_size=224)


def looks_like_open_clip(state_dict: Mapping[str, Any]) -> bool:
    return "visual.conv1.weight" in state_dict or any(k.startswith("visual.trunk.") for k in state_dict)


# The text side of an open_clip CLIP (CustomTextCLIP: under `text.`), and its logit scale and bias.
TEXT_KEYS = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection", "attn_mask",
             "logit_scale", "logit_bias", "text.")


def split_towers(state_dict: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
    """(image tower tensors with `visual.` removed, the text side: `TEXT_KEYS`). A key of neither is
    refused (CheckpointMismatchError naming it): nothing is dropped unseen."""
    visual = {k[len("visual."):]: v for k, v in state_dict.items() if k.startswith("visual.")}
    text = {k: v for k, v in state_dict.items() if k.startswith(TEXT_KEYS)}
    neither = [k for k in state_dict if not k.startswith(("visual.",) + TEXT_KEYS)]
    if neither:
        raise key_mismatch("open_clip checkpoint has keys of neither tower", unexpected=neither,
                           advice="They belong to neither the image tower (visual.*) nor the text tower")
    return visual, text


def model_cfg_of(open_clip_config: Mapping[str, Any] | None, model_name: str | None) -> dict | None:
    """The `model_cfg` of open_clip_config.json, else of an open_clip model name (needs open_clip)."""
    if open_clip_config is not None:
        cfg = open_clip_config.get("model_cfg")
        if not isinstance(cfg, Mapping):
            raise ConfigError("open_clip_config.json has no model_cfg object")
        return dict(cfg)
    if model_name is None:
        return None
    try:
        import open_clip
    except ImportError:
        raise ValueError(f"resolving the open_clip model name {model_name!r} needs open_clip (pip install "
                         "open_clip_torch); or load the folder or hub repo holding open_clip_config.json") from None
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise ValueError(f"open_clip has no model named {model_name!r} (open_clip.list_models() lists them)")
    return dict(cfg)


def to_timm(visual: Mapping[str, np.ndarray], *, fc_norm: bool = False) -> dict[str, np.ndarray]:
    """An open_clip image tower's tensors (`split_towers`' first half) as a timm state dict."""
    if any(k.startswith("trunk.") for k in visual):
        raise UnsupportedModelError("this open_clip image tower is a timm trunk (visual.trunk.*), which this reader "
                                    "does not map; supported: open_clip's own VisionTransformer")
    for part, what in (("attn_pool.", "attentional pooling (CoCa)"), ("patchnorm_pre_ln.", "input patchnorm")):
        if any(k.startswith(part) for k in visual):
            raise UnsupportedModelError(f"open_clip image towers with {what} are not supported by jaxvit")
    out: dict[str, np.ndarray] = {}
    for key, value in visual.items():
        m = re.match(r"transformer\.resblocks\.(\d+)\.(.*)$", key)
        if m:
            name = _BLOCK.get(m.group(2))
            out[f"blocks.{m.group(1)}.{name}" if name else f"visual.{key}"] = value
        elif key == "class_embedding":
            out["cls_token"] = value.reshape(1, 1, -1)
        elif key == "positional_embedding":
            out["pos_embed"] = value[None]
        elif key == "proj":
            out["head.weight"] = value.T
            out["head.bias"] = np.zeros(value.shape[1], value.dtype)  # CLIP's projection has no bias
        elif key.startswith("ln_post."):
            out[("fc_norm." if fc_norm else "norm.") + key[len("ln_post."):]] = value
        else:
            out[_TOP.get(key, f"visual.{key}")] = value
    return out


_BLOCK = {f"{src}.{p}": f"{dst}.{p}" for p in ("weight", "bias") for src, dst in (
    ("ln_1", "norm1"), ("ln_2", "norm2"), ("attn.out_proj", "attn.proj"), ("mlp.c_fc", "mlp.fc1"),
    ("mlp.c_proj", "mlp.fc2"))}
_BLOCK.update({"attn.in_proj_weight": "attn.qkv.weight", "attn.in_proj_bias": "attn.qkv.bias",
               "ls_1.gamma": "ls1.gamma", "ls_2.gamma": "ls2.gamma"})
_TOP = {"conv1.weight": "patch_embed.proj.weight", "ln_pre.weight": "norm_pre.weight", "ln_pre.bias": "norm_pre.bias"}
_BLOCK_SOURCE = {dst: src for src, dst in _BLOCK.items()}
_TOP_SOURCE = {**{dst: src for src, dst in _TOP.items()}, "cls_token": "class_embedding", "pos_embed": "positional_embedding",
               "head.weight": "proj", **{f"{n}.{p}": f"ln_post.{p}" for n in ("norm", "fc_norm") for p in ("weight", "bias")}}


def source_name(timm_key: str) -> str:
    """The open_clip name of a key of `to_timm`'s output (for errors: a missing tensor named as the file names it)."""
    m = re.match(r"blocks\.(\d+)\.(.*)$", timm_key)
    if m and m.group(2) in _BLOCK_SOURCE:
        return f"visual.transformer.resblocks.{m.group(1)}.{_BLOCK_SOURCE[m.group(2)]}"
    return "visual." + _TOP_SOURCE[timm_key] if timm_key in _TOP_SOURCE else timm_key


def vision_settings(model_cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """What the image tower's config fixes beyond tensor shapes: heads' width, activation, pooling."""
    if model_cfg is None:
        raise ValueError("an open_clip state dict does not say its activation (OpenAI's QuickGELU or GELU): load "
                         "the folder or hub repo with its open_clip_config.json, or pass model_name, an open_clip "
                         "model name such as 'ViT-B-16' or 'ViT-B-16-quickgelu'")
    vision = model_cfg.get("vision_cfg") or {}
    if not isinstance(vision, Mapping):
        raise ConfigError("open_clip model_cfg's vision_cfg must be an object")
    for key, why in _REFUSED_VISION.items():
        if vision.get(key) and not (key == "pos_embed_type" and vision[key] == "learnable") \
                and not (key == "block_type" and vision[key] == "default"):
            raise UnsupportedModelError(f"open_clip vision_cfg {key}={vision[key]!r}"
                                        f"{f' ({why})' if why else ''} is not supported by jaxvit")
    unknown = sorted(set(vision) - _KNOWN_VISION - set(_REFUSED_VISION))
    if unknown:
        raise UnsupportedModelError(f"open_clip vision_cfg {unknown} is not supported by jaxvit; it reads "
                                    f"{', '.join(sorted(_KNOWN_VISION))}")
    pool = vision.get("pool_type", "avg" if vision.get("global_average_pool") else "tok")
    if pool not in ("tok", "avg"):
        raise UnsupportedModelError(f"open_clip pool_type {pool!r} is not supported by jaxvit (supported: tok, avg)")
    return dict(head_width=vision.get("head_width", VISION_DEFAULTS["head_width"]),
                act="quick_gelu" if model_cfg.get("quick_gelu") else "gelu", pool="avg" if pool == "avg" else "token",
                fc_norm=bool(vision.get("final_ln_after_pool")) and pool == "avg")


def config_of(state_dict: Mapping[str, np.ndarray], settings: Mapping[str, Any], *, name: str = "",
              preprocess_cfg: Mapping[str, Any] | None = None, num_heads: int | None = None) -> ViTConfig:
    """The jaxvit config of `to_timm`'s state dict (checked by `check_tensors`): sizes from the tensors, the rest
    from `settings`."""
    width = state_dict["blocks.0.attn.qkv.weight"].shape[1]
    head_width = settings["head_width"]
    if not isinstance(head_width, int) or isinstance(head_width, bool) or head_width < 1 or width % head_width:
        raise ConfigError(f"open_clip head_width {head_width!r} does not divide the width {width}")
    heads = width // head_width
    if num_heads is not None and num_heads != heads:
        raise ValueError(f"num_heads {num_heads!r} contradicts the open_clip config ({heads} heads of width "
                         f"{head_width}): leave num_heads out")
    cfg = infer_config(state_dict, num_heads=heads)
    pre = dict(preprocess_cfg or {})
    mode = pre.get("resize_mode", "shortest")
    if mode not in ("shortest", "squash"):
        raise ConfigError(f"open_clip resize_mode {mode!r} is not supported (supported: shortest, squash)")
    return cfg.replace(name=name, act=settings["act"], norm_eps=1e-5, global_pool=settings["pool"],
                       fc_norm=settings["fc_norm"], final_norm=True,
                       mean=tuple(pre.get("mean", OPENAI_MEAN)), std=tuple(pre.get("std", OPENAI_STD)),
                       interpolation=pre.get("interpolation", "bicubic"), crop_pct=1.0,
                       crop_mode="center" if mode == "shortest" else "squash")


def check_tensors(timm_sd: Mapping[str, np.ndarray], visual: Mapping[str, np.ndarray], model_cfg: Mapping[str, Any],
                  source: str = "open_clip_config.json"):
    """Refuses an image tower without every tensor its vision_cfg gives it, or with blocks beyond its `layers`,
    naming the keys as the file does. First: the sizes and options are read off the tensors, which would take a
    missing one for an option the model lacks (no projection, no bias, fewer blocks) and load another model. Then
    refuses tensors of other sizes than the config's (`source`: where it came from, for the message)."""
    vision = model_cfg.get("vision_cfg") or {}
    setting = lambda name: vision.get(name, VISION_DEFAULTS[name])  # noqa: E731
    depth = setting("layers")
    check_int("open_clip vision_cfg layers", depth, *INT_LIMITS["depth"])  # bounded: required keys listed per block
    block = [f"{part}.{p}" for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
             for p in ("weight", "bias")] + (["ls1.gamma", "ls2.gamma"] if vision.get("ls_init_value") else [])
    final = "fc_norm" if "fc_norm.weight" in timm_sd or "fc_norm.bias" in timm_sd else "norm"
    required = [f"blocks.{i}.{k}" for i in range(depth) for k in block] + [
        "cls_token", "pos_embed", "patch_embed.proj.weight", "head.weight", f"{final}.weight", f"{final}.bias"] + (
        [] if vision.get("no_ln_pre") else ["norm_pre.weight", "norm_pre.bias"])
    missing = [source_name(k) for k in required if k not in timm_sd]
    extra = [f"visual.{k}" for k in visual if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))
             and int(m.group(1)) >= depth]
    if missing or extra:
        raise key_mismatch(f"open_clip image tower does not match its model config ({depth} layers)", missing=missing,
                           unexpected=extra, advice="A tower of this config has exactly these tensors: is the file "
                                                    "incomplete, or the config another model's?")
    # the config gives the tensors their heads (width / head_width) and activation: its sizes must be theirs
    width, patch, image, ratio = setting("width"), setting("patch_size"), setting("image_size"), setting("mlp_ratio")
    image = image[0] if isinstance(image, (list, tuple)) and len(image) == 2 and image[0] == image[1] else image
    got_width = timm_sd["blocks.0.attn.qkv.weight"].shape[1]
    got_patch = timm_sd["patch_embed.proj.weight"].shape[-1]
    rows = timm_sd["pos_embed"].shape[1] - 1
    wrong = other_sizes((
        ("width", width, got_width), ("MLP width (width x mlp_ratio)",
                                      int(width * ratio) if isinstance(width, int) and is_real(ratio) else None,
                                      timm_sd["blocks.0.mlp.fc1.weight"].shape[0]),
        ("patch_size", patch, got_patch),
        ("patch grid (image_size / patch_size)", image // patch if isinstance(image, int) and isinstance(patch, int)
         and patch > 0 else None, round(rows ** 0.5)),
        ("embed_dim", model_cfg.get("embed_dim"), timm_sd["head.weight"].shape[0])), source)
    if wrong:
        raise CheckpointMismatchError(f"open_clip image tower does not match its model config: {wrong}")


def load_state(state_dict: Mapping[str, np.ndarray], open_clip_config: Mapping[str, Any] | None, *, name: str = "",
               model_name: str | None = None, num_heads: int | None = None
               ) -> tuple[dict[str, np.ndarray], ViTConfig]:
    """(timm state dict, config) of an open_clip checkpoint's image tower; the text tower is left aside."""
    model_cfg = model_cfg_of(open_clip_config, model_name)
    settings = vision_settings(model_cfg)
    visual, _text = split_towers(state_dict)
    sd = to_timm(visual, fc_norm=settings["fc_norm"])
    check_tensors(sd, visual, model_cfg, "open_clip_config.json" if open_clip_config is not None
                  else f"open_clip's {model_name} config")
    pre = (open_clip_config or {}).get("preprocess_cfg")
    config = config_of(sd, settings, name=model_name or name, preprocess_cfg=pre if isinstance(pre, Mapping) else None,
                       num_heads=num_heads)
    return sd, config
