"""Hugging Face `transformers` vision checkpoints as timm-layout state dicts and jaxvit configs.

Supported (config.json `model_type`, class in `architectures`):
  vit     ViTModel, ViTForImageClassification
  deit    DeiTModel, DeiTForImageClassification, DeiTForImageClassificationWithTeacher
  dinov2  Dinov2Model, Dinov2ForImageClassification;  dinov2_with_registers  Dinov2WithRegistersModel,
          Dinov2WithRegistersForImageClassification (head_input='token_and_patch_mean': the classifier reads
          the class token and the mean of the patch tokens, registers excluded, concatenated)
  clip / clip_vision_model   CLIPVisionModel, CLIPVisionModelWithProjection, CLIPModel (its vision half)
Key mapping (prefix `vit.` / `deit.` / `dinov2.` / none; CLIP under `vision_model.`):
  embeddings.cls_token / class_embedding        -> cls_token
  embeddings.distillation_token                 -> dist_token (WithTeacher) or reg_token (*)
  embeddings.position_embeddings / position_embedding.weight -> pos_embed
  embeddings.patch_embeddings.projection / patch_embedding   -> patch_embed.proj
  encoder.layer(s).{i} (transformers 5 modules: layers.{i}, q/k/v/o_proj): query, key, value / q_proj, k_proj, v_proj (concatenated) -> blocks.{i}.attn.qkv;
     attention.output.dense / out_proj -> attn.proj; layernorm_before, norm1, layer_norm1 -> norm1;
     layernorm_after, norm2, layer_norm2 -> norm2; intermediate.dense / mlp.fc1 -> mlp.fc1;
     output.dense / mlp.fc2 -> mlp.fc2; layer_scale{1,2}.lambda1 -> ls{1,2}.gamma
  pre_layrnorm -> norm_pre; layernorm / post_layernorm -> norm
  classifier / cls_classifier -> head (DINOv2: its (C, 2D) weight as is, class-token half first);
  distillation_classifier -> head_dist;
  visual_projection -> head (bias zero: CLIP's projection has none), as timm's CLIP towers hold it.
(*) DeiTForImageClassification's distillation token, which no head reads, is exactly a register token.
Left out by name: `embeddings.mask_token` (masked-image training only), ViTModel's `pooler` (dense +
tanh, not on any classification path), `position_ids` (a buffer), and a CLIPModel's text tower
(`text_model.*`, `text_projection`, `logit_scale`: `split_clip` hands them over untouched).
Refused by name: every other model_type (Swin, BEiT's relative position bias, SigLIP's MAP head, ...),
and DINOv2's SwiGLU MLP. DINOv2's registers have no position rows: the class token's row is
folded into it, as timm does.

The eval transform comes from preprocessor_config.json (ViTImageProcessor, DeiTImageProcessor,
CLIPImageProcessor, BitImageProcessor): `preprocess_settings` maps it onto the config's
img_size / interpolation / crop_pct / crop_mode ('hf_squash', 'hf_shortest': Hugging Face's resize and
centre crop, bit-equal to the slow (PIL) processors) / mean / std.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from convert.errors import CheckpointMismatchError, UnsupportedModelError, key_mismatch, other_sizes, sibling_name
from convert.timm_vit import infer_config
from jaxvit.config import INT_LIMITS, ConfigError, ViTConfig, check_int, is_real

# transformers' interpolate_pos_encoding: plain bicubic (ViT, DeiT, DINOv2), antialiased for DINOv2 with registers.
POS_RESAMPLING = dict(interpolation="bicubic", antialias=False)
_ANTIALIASED = dict(interpolation="bicubic", antialias=True)
SUPPORTED = ("ViTModel", "ViTForImageClassification", "DeiTModel", "DeiTForImageClassification",
             "DeiTForImageClassificationWithTeacher", "Dinov2Model", "Dinov2ForImageClassification",
             "Dinov2WithRegistersModel", "Dinov2WithRegistersForImageClassification", "CLIPVisionModel",
             "CLIPVisionModelWithProjection", "CLIPModel")
_MODEL_TYPES = ("vit", "deit", "dinov2", "dinov2_with_registers", "clip", "clip_vision_model")
_REFUSED_TYPES = {"swin": "shifted-window attention", "swinv2": "shifted-window attention",
                  "beit": "relative position bias", "data2vec-vision": "relative position bias",
                  "siglip": "a MAP attention-pool head", "siglip_vision_model": "a MAP attention-pool head",
                  "vit_mae": "a masked-autoencoder decoder", "vit-hybrid": "a hybrid CNN stem",
                  "convnext": "no transformer", "levit": "a hybrid convolutional transformer"}
_REFUSED_CLASSES = {
    "ViTForMaskedImageModeling": "a masked-image decoder", "DeiTForMaskedImageModeling": "a masked-image decoder",
}
# What each family's config.json leaves out when it equals transformers' default (save_pretrained writes only the
# differences), by transformers' names: what the tensors cannot say (heads, eps, activation), and what they must
# agree with (a config.json of another model would set another model's heads on these weights).
_VIT_DEFAULTS = dict(num_attention_heads=12, layer_norm_eps=1e-12, hidden_act="gelu", num_hidden_layers=12,
                     qkv_bias=True, hidden_size=768, intermediate_size=3072, patch_size=16, image_size=224)
_DINOV2_DEFAULTS = dict(_VIT_DEFAULTS, layer_norm_eps=1e-6, intermediate_size=None, mlp_ratio=4, patch_size=14)
_DEFAULTS = {"vit": _VIT_DEFAULTS, "deit": _VIT_DEFAULTS, "dinov2": _DINOV2_DEFAULTS,
             "dinov2_with_registers": dict(_DINOV2_DEFAULTS, patch_size=16, num_register_tokens=4),
             "clip": dict(_VIT_DEFAULTS, layer_norm_eps=1e-5, hidden_act="quick_gelu", qkv_bias=None, patch_size=32)}
_ACTS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
         "gelu_fast": "gelu_tanh"}
_DROPPED = re.compile(r"(^|\.)(embeddings\.mask_token|pooler\.dense\.(weight|bias)|embeddings\.position_ids)$")


def supported_message() -> str:
    return f"supported Hugging Face classes: {', '.join(SUPPORTED)}"


def is_hf_config(config: Any) -> bool:
    return isinstance(config, Mapping) and "model_type" in config


def looks_like_hf(state_dict: Mapping[str, Any]) -> bool:
    """Whether a state dict's keys are a transformers vision model's (no config needed to tell)."""
    return any(k.endswith("embeddings.patch_embeddings.projection.weight")
               or k.endswith("embeddings.patch_embedding.weight") for k in state_dict)


def split_clip(state_dict: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
    """(everything but the text side, a CLIPModel's text side: text_model.*, text_projection, logit_scale).
    Keys of neither tower stay with the vision side, so the strict mapping names them."""
    text = {k: v for k, v in state_dict.items()
            if k.startswith("text_model.") or k in ("text_projection.weight", "logit_scale")}
    return {k: v for k, v in state_dict.items() if k not in text}, text


def family(config: Mapping[str, Any]) -> tuple[str, str]:
    """(model_type, class) of a transformers config.json, refusing what jaxvit does not implement."""
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    if arch in _REFUSED_CLASSES:
        raise UnsupportedModelError(f"{arch}: {_REFUSED_CLASSES[arch]}, is not supported by jaxvit; "
                                    f"{supported_message()}")
    if model_type not in _MODEL_TYPES:
        why = f" ({_REFUSED_TYPES[model_type]})" if model_type in _REFUSED_TYPES else ""
        raise UnsupportedModelError(f"Hugging Face model_type {model_type!r}{why} is not supported by jaxvit; "
                                    f"{supported_message()}")
    if arch is not None and arch not in SUPPORTED:
        raise UnsupportedModelError(f"{arch} is not supported by jaxvit; {supported_message()}")
    return ("clip" if model_type.startswith("clip") else model_type), arch or ""


def to_timm(state_dict: Mapping[str, np.ndarray], config: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A transformers vision state dict (of `config`'s family) as a timm VisionTransformer state dict.

    Keys it cannot place are kept under their own names, so the strict mapping names them."""
    model_type, arch = family(config)
    if model_type == "clip":
        return _clip_to_timm(split_clip(state_dict)[0])
    if model_type.startswith("dinov2") and any(".mlp.weights_in." in k for k in state_dict):
        raise UnsupportedModelError("DINOv2 with a SwiGLU MLP (use_swiglu_ffn, the giant models) is not supported "
                                    f"by jaxvit; {supported_message()}")
    teacher = _is_teacher(arch, state_dict)
    out = _Placed()
    qkv: dict[tuple[int, str, str], tuple[np.ndarray, str, bool]] = {}
    for key, value in state_dict.items():
        if _DROPPED.search(key):
            continue
        k = re.sub(r"^(vit|deit|dinov2|dinov2_with_registers)\.", "", key)
        m = re.match(r"(?:encoder\.layer|layers)\.(\d+)\.(.*)$", k)
        if m:
            i, rest = int(m.group(1)), m.group(2)
            a = re.match(r"attention\.(?:attention\.(query|key|value)|([qkv])_proj)\.(weight|bias)$", rest)
            if a:
                g = 1 if a.group(1) else 2  # the name's span in the key: "{}" there is the key of q, k or v
                at = len(key) - len(rest)
                qkv[(i, a.group(1) or _QKV[a.group(2)], a.group(3))] = (
                    value, key[:at + a.start(g)] + "{}" + key[at + a.end(g):], g == 2)
                continue
            name = _BLOCK.get(rest)
            out[f"blocks.{i}.{name}" if name else key] = value
            continue
        if k == "embeddings.distillation_token":
            out["dist_token" if teacher else "reg_token"] = value
            continue
        if k == "embeddings.register_tokens":
            out["reg_token"] = value
            continue
        out[_TOP.get(k, key)] = value
    _merge_qkv(qkv, out, ("query", "key", "value"))
    out = dict(out)
    if model_type == "dinov2_with_registers" and "cls_token" in out and "pos_embed" in out:
        # Its registers have no position rows: the class token's row is folded into the token (a constant
        # sum), leaving rows for the patches only (no_embed_class), as timm converts DINOv2 with registers.
        out["cls_token"] = out["cls_token"] + out["pos_embed"][:, :1]
        out["pos_embed"] = out["pos_embed"][:, 1:]
    return out


def _is_teacher(arch: str, state_dict: Mapping[str, Any]) -> bool:
    """Whether a DeiT file has a teacher's head (its distillation token is then timm's dist_token, not an extra token)."""
    return arch == "DeiTForImageClassificationWithTeacher" or "distillation_classifier.weight" in state_dict


class _Placed(dict):
    """A state dict that refuses a second tensor for a place already filled (two names for one tensor)."""

    def __setitem__(self, key, value):
        if key in self:
            raise CheckpointMismatchError(f"the checkpoint holds two tensors for {key}: keys of two naming schemes?")
        super().__setitem__(key, value)


_QKV = {"q": "query", "k": "key", "v": "value"}
# Saved files (the hub's) keep transformers 4's names; transformers 5 modules' own state dicts name the
# blocks `layers.{i}` with q_proj / k_proj / v_proj / o_proj and mlp.fc1 / fc2: both are read.
_BLOCK = {f"{src}.{p}": f"{dst}.{p}" for p in ("weight", "bias") for src, dst in (
    ("attention.output.dense", "attn.proj"), ("attention.o_proj", "attn.proj"), ("layernorm_before", "norm1"),
    ("layernorm_after", "norm2"),
    ("intermediate.dense", "mlp.fc1"), ("output.dense", "mlp.fc2"), ("norm1", "norm1"), ("norm2", "norm2"),
    ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"))}
_BLOCK.update({"layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma"})
_TOP = {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed", "embeddings.patch_embeddings.projection.weight":
        "patch_embed.proj.weight", "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias", "classifier.weight": "head.weight",
        "classifier.bias": "head.bias", "cls_classifier.weight": "head.weight", "cls_classifier.bias": "head.bias",
        "distillation_classifier.weight": "head_dist.weight", "distillation_classifier.bias": "head_dist.bias"}


def _merge_qkv(parts: Mapping[tuple[int, str, str], tuple[np.ndarray, str, bool]], out: dict,
               names: tuple[str, str, str]) -> None:
    """q, k and v of every block, stacked as timm's one qkv Linear (rows q, then k, then v). `parts`: (block,
    name, weight or bias) -> (tensor, its key with the name as "{}", whether the key spells the name q/k/v)."""
    for i, kind in sorted({(i, kind) for i, _, kind in parts}):
        have = [parts.get((i, n, kind)) for n in names]
        if any(p is None for p in have):
            _, template, short = next(p for p in have if p is not None)
            raise key_mismatch(f"block {i}'s attention has only part of its query, key and value",
                               missing=[template.format(n[0] if short else n) for n, p in zip(names, have) if p is None],
                               advice="The file is incomplete; download it again.")
        out[f"blocks.{i}.attn.qkv.{kind}"] = np.concatenate([p[0] for p in have])


def _clip_to_timm(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = _Placed()
    qkv: dict[tuple[int, str, str], tuple[np.ndarray, str, bool]] = {}
    for key, value in state_dict.items():
        if _DROPPED.search(key):
            continue
        k = key.removeprefix("vision_model.")
        m = re.match(r"encoder\.layers\.(\d+)\.(.*)$", k)
        if m:
            i, rest = int(m.group(1)), m.group(2)
            a = re.match(r"self_attn\.([qkv])_proj\.(weight|bias)$", rest)
            if a:
                at = len(key) - len(rest)
                qkv[(i, a.group(1), a.group(2))] = (value, key[:at + a.start(1)] + "{}" + key[at + a.end(1):], False)
                continue
            name = _CLIP_BLOCK.get(rest)
            out[f"blocks.{i}.{name}" if name else key] = value
        elif k == "embeddings.class_embedding":
            out["cls_token"] = value.reshape(1, 1, -1)
        elif k == "embeddings.position_embedding.weight":
            out["pos_embed"] = value[None]
        elif key == "visual_projection.weight":
            out["head.weight"] = value
            out["head.bias"] = np.zeros(value.shape[0], value.dtype)  # CLIP's projection has no bias
        else:
            out[_CLIP_TOP.get(k, key)] = value
    _merge_qkv(qkv, out, ("q", "k", "v"))
    return dict(out)


_CLIP_BLOCK = {f"{src}.{p}": f"{dst}.{p}" for p in ("weight", "bias") for src, dst in (
    ("self_attn.out_proj", "attn.proj"), ("layer_norm1", "norm1"), ("layer_norm2", "norm2"),
    ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"))}
_CLIP_TOP = {"embeddings.patch_embedding.weight": "patch_embed.proj.weight", "pre_layrnorm.weight": "norm_pre.weight",
             "pre_layrnorm.bias": "norm_pre.bias", "post_layernorm.weight": "norm.weight",
             "post_layernorm.bias": "norm.bias"}


def source_namer(state_dict: Mapping[str, np.ndarray], config: Mapping[str, Any]):
    """timm key -> its name in this transformers file, for errors: a missing block tensor named as the file
    names the same tensor of another block (whichever transformers naming the file uses), one outside the
    blocks by the reader's own table under the prefix the file's other tensors carry (`vit.`, `vision_model.`)."""
    def timm_names_of(key: str) -> list[str]:
        try:
            return list(to_timm({key: state_dict[key]}, config))
        except (CheckpointMismatchError, UnsupportedModelError):  # q alone: its k and v are elsewhere
            return []

    top = _top_sources(state_dict, config)
    image_keys = list(split_clip(state_dict)[0])

    def name(timm_key: str) -> str:
        qkv = re.fullmatch(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", timm_key)
        for key in image_keys if qkv else ():  # a whole block's q, k, v: another block's, renumbered
            m = _SOURCE_QUERY.search(key)
            if m and m.group("kind") == qkv.group(2):
                q = "long" if m.group("long") else "short"
                names = "{query,key,value}" if q == "long" else "{q,k,v}"
                return f"{key[:m.start('i')]}{qkv.group(1)}{key[m.end('i'):m.start(q)]}{names}{key[m.end(q):]}"
        return top.get(timm_key) or sibling_name(timm_key, state_dict, timm_names_of)

    return name


# A block's tensor in any of the files' namings (transformers 4 files, 5 modules, CLIP), and a block's query.
_SOURCE_BLOCK = re.compile(r"(?:^|\.)(?:encoder\.layers?|layers)\.(\d+)\.")
_SOURCE_QUERY = re.compile(r"(?:^|\.)(?:encoder\.layers?|layers)\.(?P<i>\d+)\.(?:attention\.attention\.(?P<long>query)|"
                           r"(?:attention|self_attn)\.(?P<short>q)_proj)\.(?P<kind>weight|bias)$")


# A transformers model's base-model prefix, read off its tensors (the classifier and CLIP's projection sit outside it).
_BASE = re.compile(r"^((?:vit|deit|dinov2|dinov2_with_registers|vision_model)\.)?"
                   r"(?:embeddings|encoder|layernorm|pre_layrnorm|post_layernorm)\.")
_UNPREFIXED = ("classifier.", "cls_classifier.", "distillation_classifier.", "visual_projection.")


def _top_sources(state_dict: Mapping[str, np.ndarray], config: Mapping[str, Any]) -> dict[str, str]:
    """timm key -> this file's name of each tensor outside the blocks: `_TOP` / `_CLIP_TOP` inverted, one name each
    (DeiT with a teacher's head is `cls_classifier`)."""
    model_type, arch = family(config)
    prefix = next((m.group(1) or "" for k in state_dict if (m := _BASE.match(k))), "")
    if model_type == "clip":
        table = {**{dst: src for src, dst in _CLIP_TOP.items()}, "cls_token": "embeddings.class_embedding",
                 "pos_embed": "embeddings.position_embedding.weight", "head.weight": "visual_projection.weight"}
    else:
        drop = "classifier." if _is_teacher(arch, state_dict) else "cls_classifier."
        table = {dst: src for src, dst in _TOP.items() if not src.startswith(drop)}
        # DeiT's distillation token is timm's dist_token beside a teacher's head, an extra token (reg_token) without
        table.update({"dist_token": "embeddings.distillation_token", "reg_token": "embeddings.distillation_token"
                      if model_type == "deit" else "embeddings.register_tokens"})
    return {dst: src if src.startswith(_UNPREFIXED) else prefix + src for dst, src in table.items()}


def load_state(state_dict: Mapping[str, np.ndarray], config: Any, preprocessor: Mapping[str, Any] | None, *,
               name: str = "", model_name: str | None = None, num_heads: int | None = None
               ) -> tuple[dict[str, np.ndarray], ViTConfig, tuple[tuple[int, int], dict]]:
    """(timm state dict, config at the stored grid, (the processor's input size, how transformers resamples
    position embeddings to it)) of a transformers checkpoint; the caller resamples them so."""
    if not is_hf_config(config):
        raise ValueError("these are Hugging Face transformers weights, which need their config.json (with its "
                         "model_type) beside them: load the folder or hub repo they came in")
    if model_name is not None:
        raise ValueError(f"model_name {model_name!r} does not apply to a Hugging Face transformers checkpoint: its "
                         "config.json names the architecture; leave model_name out")
    sd = to_timm(state_dict, config)
    # Before the sizes and options are read off the tensors, which would take a missing tensor for an option the
    # model does not have (no final norm, no bias, fewer blocks): config.json's class says which it has.
    required, depth = _required(state_dict, config)
    missing = [k for k in required if k not in sd]
    extra = [k for k in split_clip(state_dict)[0] if (m := _SOURCE_BLOCK.search(k)) and int(m.group(1)) >= depth]
    if missing or extra:
        namer = source_namer(state_dict, config)
        raise key_mismatch(f"checkpoint does not match its config.json ({'/'.join(filter(None, family(config)))}, "
                           f"{depth} layers)", missing=[namer(k) for k in missing], unexpected=extra,
                           advice="A model of this class has exactly these tensors: is the file incomplete, or "
                                  "config.json another model's?")
    cfg = config_of(sd, config, name=name, num_heads=num_heads)
    settings = preprocess_settings(preprocessor, family(config)[0])
    input_size = settings.pop("img_size")
    resampling = _ANTIALIASED if family(config)[0] == "dinov2_with_registers" else POS_RESAMPLING
    return sd, cfg.replace(**settings), (input_size, resampling)


def _required(state_dict: Mapping[str, np.ndarray], config: Mapping[str, Any]) -> tuple[list[str], int]:
    """(the timm keys every model of config.json's class has, its number of blocks), transformers' defaults where
    config.json leaves a setting out (it writes only what differs from them). `state_dict`: the file's."""
    model_type, arch = family(config)
    setting = _settings(config)
    depth = setting("num_hidden_layers")
    check_int("num_hidden_layers", depth, *INT_LIMITS["depth"])  # bounded: the required keys are listed per block
    block = ["norm1", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"] + (["attn.qkv"] if model_type == "clip" or
                                                                       setting("qkv_bias") else [])
    keys = [f"blocks.{i}.{part}.{p}" for i in range(depth) for part in block for p in ("weight", "bias")]
    keys += [f"blocks.{i}.attn.qkv.weight" for i in range(depth)]
    if model_type.startswith("dinov2"):
        keys += [f"blocks.{i}.ls{j}.gamma" for i in range(depth) for j in (1, 2)]
    keys += ["cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight", "norm.bias"]
    if model_type == "clip":
        keys += ["norm_pre.weight", "norm_pre.bias"] + (["head.weight"] if arch in (
            "CLIPVisionModelWithProjection", "CLIPModel") else [])
        return keys, depth
    keys.append("patch_embed.proj.bias")
    teacher = _is_teacher(arch, state_dict)
    if model_type == "deit":
        keys.append("dist_token" if teacher else "reg_token")
    if model_type == "dinov2_with_registers" and setting("num_register_tokens"):
        keys.append("reg_token")
    labels = config.get("id2label")
    if arch.endswith(("ForImageClassification", "ForImageClassificationWithTeacher")) and (
            len(labels) if isinstance(labels, Mapping) else config.get("num_labels", 2)):  # 0 labels: no classifier
        keys += ["head.weight", "head.bias"] + (["head_dist.weight", "head_dist.bias"] if teacher else [])
    return keys, depth


def config_of(state_dict: Mapping[str, np.ndarray], config: Mapping[str, Any], *, name: str = "",
              num_heads: int | None = None) -> ViTConfig:
    """The jaxvit config of a timm-layout state dict from `to_timm`: sizes from the tensors, heads,
    LayerNorm eps and activation from config.json (transformers' defaults where it leaves them out),
    label names from id2label."""
    model_type, arch = family(config)
    setting = _settings(config)
    heads = setting("num_attention_heads")
    if num_heads is not None and num_heads != heads:
        raise ValueError(f"num_heads {num_heads!r} contradicts config.json's num_attention_heads {heads}: leave "
                         "num_heads out for a Hugging Face checkpoint")
    eps = setting("layer_norm_eps")
    hidden_act = setting("hidden_act")
    if hidden_act not in _ACTS:
        raise ConfigError(f"hidden_act {hidden_act!r} is not supported by jaxvit; supported: {', '.join(_ACTS)}")
    if not isinstance(heads, int) or isinstance(heads, bool) or heads < 1:
        raise ConfigError(f"num_attention_heads must be a positive integer; got {heads!r}")
    out = infer_config(state_dict, num_heads=heads).replace(norm_eps=eps, act=_ACTS[hidden_act], name=name)
    _check_sizes(out, setting, f"{model_type}/{arch}" if arch else model_type)
    head = state_dict.get("head.weight")
    if model_type.startswith("dinov2") and head is not None and head.ndim == 2 and head.shape[1] == 2 * out.embed_dim:
        out = out.replace(head_input="token_and_patch_mean")  # Dinov2(WithRegisters)ForImageClassification
    if out.num_classes and model_type != "clip":
        out = out.replace(label_names=_label_names(config, out.num_classes))
    return out


def _settings(config: Mapping[str, Any]):
    """name -> the image tower's setting in config.json (CLIPModel's vision_config), else transformers' default."""
    model_type, _ = family(config)
    cfg = config.get("vision_config") if model_type == "clip" and isinstance(config.get("vision_config"), Mapping) \
        else config
    return lambda name: cfg.get(name, _DEFAULTS[model_type][name])


def _check_sizes(cfg: ViTConfig, setting, what: str) -> None:
    """Refuses tensors of other sizes than config.json's (whose heads, eps and activation they are given)."""
    hidden, patch, image = setting("hidden_size"), setting("patch_size"), setting("image_size")
    mlp = setting("intermediate_size")
    if mlp is None and is_real(setting("mlp_ratio")) and is_real(hidden):  # DINOv2: int(hidden_size * mlp_ratio)
        mlp = int(hidden * setting("mlp_ratio"))
    grid = image // patch if isinstance(image, int) and isinstance(patch, int) and patch > 0 else None
    wrong = other_sizes((("hidden_size", hidden, cfg.embed_dim), ("intermediate size", mlp, cfg.mlp_dim),
                         ("patch_size", patch, cfg.patch_size),
                         ("patch grid (image_size / patch_size)", grid, cfg.img_size[0] // cfg.patch_size)))
    if wrong:
        raise CheckpointMismatchError(f"checkpoint does not match its config.json ({what}): {wrong}")


def _label_names(config: Mapping[str, Any], n: int) -> tuple[str, ...] | None:
    """id2label as a tuple, unless absent, incomplete or transformers' placeholders (LABEL_0, ...)."""
    id2label = config.get("id2label")
    if not isinstance(id2label, Mapping):
        return None
    try:
        names = tuple(id2label[str(i)] if str(i) in id2label else id2label[i] for i in range(n))
    except KeyError:
        return None
    if not all(isinstance(s, str) for s in names) or all(s == f"LABEL_{i}" for i, s in enumerate(names)):
        return None
    return names


# Where preprocessor_config.json is absent: each family's usual processor (DINOv2: what its checkpoints ship).
_PROCESSOR_DEFAULTS = {
    "vit": {"image_processor_type": "ViTImageProcessor", "size": {"height": 224, "width": 224}, "resample": 2,
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
    "deit": {"image_processor_type": "DeiTImageProcessor", "size": {"height": 256, "width": 256}, "resample": 3,
             "do_center_crop": True, "crop_size": {"height": 224, "width": 224},
             "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]},
    "dinov2": {"image_processor_type": "BitImageProcessor", "size": {"shortest_edge": 256}, "resample": 3,
               "do_center_crop": True, "crop_size": {"height": 224, "width": 224},
               "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]},
    "clip": {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 224}, "resample": 3,
             "do_center_crop": True, "crop_size": {"height": 224, "width": 224},
             "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]},
}
_PROCESSOR_DEFAULTS["dinov2_with_registers"] = _PROCESSOR_DEFAULTS["dinov2"]
_SQUARE_BY_DEFAULT = ("ViTImageProcessor", "DeiTImageProcessor")  # an int `size` means (size, size) for these
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def preprocess_settings(pre: Mapping[str, Any] | None, model_type: str) -> dict[str, Any]:
    """A transformers preprocessor_config.json as ViTConfig fields (img_size = the processor's output
    size): resize to `size` ({height, width}: 'hf_squash'; {shortest_edge}: 'hf_shortest'), optional centre
    crop to `crop_size`, x / 255, (x - mean) / std. crop_pct is crop / resize (1.0 without a crop).
    Anything else (no resize, another rescale factor, a shortest edge with a longest-edge limit) is refused."""
    if pre is None:
        pre = _PROCESSOR_DEFAULTS[model_type]
    where = "preprocessor_config.json"
    # Older repos (google/vit-*, openai/clip-*) name a feature extractor, the same transform under its old name.
    given = pre.get("image_processor_type") or pre.get("feature_extractor_type")
    kind = (str(given).removesuffix("Fast").removesuffix("Pil").replace("FeatureExtractor", "ImageProcessor")
            if given else _PROCESSOR_DEFAULTS[model_type]["image_processor_type"])
    known = ("ViTImageProcessor", "DeiTImageProcessor", "CLIPImageProcessor", "BitImageProcessor")
    if kind not in known:
        raise ConfigError(f"{where}: image_processor_type {given!r} is not supported; supported: {', '.join(known)} "
                          "(and their FeatureExtractor, Fast and Pil names)")
    if pre.get("do_resize", True) is not True:
        raise ConfigError(f"{where}: do_resize false gives inputs of any size; jaxvit needs a fixed input size")
    factor = pre.get("rescale_factor", 1 / 255)
    if pre.get("do_rescale", True) is not True or not is_real(factor) or abs(factor * 255 - 1) > 1e-12:
        raise ConfigError(f"{where}: only do_rescale with rescale_factor 1/255 is supported; got do_rescale="
                          f"{pre.get('do_rescale', True)!r}, rescale_factor={factor!r}")
    resample = pre.get("resample", 2 if kind in _SQUARE_BY_DEFAULT else 3)
    if resample not in _RESAMPLE:
        raise ConfigError(f"{where}: resample {resample!r} is no PIL filter (0-5)")
    size = pre.get("size")
    if isinstance(size, int) and not isinstance(size, bool):
        size = {"height": size, "width": size} if kind in _SQUARE_BY_DEFAULT else {"shortest_edge": size}
    if not isinstance(size, Mapping):
        raise ConfigError(f"{where}: size must be {{'height', 'width'}} or {{'shortest_edge'}}; got {size!r}")
    if set(size) == {"height", "width"}:
        resize, mode = (size["height"], size["width"]), "hf_squash"
    elif set(size) == {"shortest_edge"} or (set(size) == {"shortest_edge", "longest_edge"}
                                            and size.get("longest_edge") is None):
        resize, mode = (size["shortest_edge"],) * 2, "hf_shortest"
    else:
        raise ConfigError(f"{where}: size {dict(size)} is not supported; supported: {{'height', 'width'}} or "
                          "{'shortest_edge'}")
    crop = resize
    if pre.get("do_center_crop", False):
        cs = pre.get("crop_size", {"height": 224, "width": 224})
        cs = {"height": cs, "width": cs} if isinstance(cs, int) and not isinstance(cs, bool) else cs
        if not (isinstance(cs, Mapping) and set(cs) == {"height", "width"}):
            raise ConfigError(f"{where}: crop_size must be {{'height', 'width'}}; got {cs!r}")
        crop = (cs["height"], cs["width"])
    for v in (*resize, *crop):
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 8192:
            raise ConfigError(f"{where}: sizes must be integers from 1 to 8192; got resize {resize}, crop {crop}")
    # One crop_pct must give both sides back: crop / crop_pct, rounded, is the resize per side.
    crop_pct = crop[0] / resize[0]
    if mode == "hf_shortest" and crop[0] != crop[1] or round(crop[1] / crop_pct) != resize[1]:
        raise ConfigError(f"{where}: a resize to {resize} with a crop to {crop} is not supported (the crop must have "
                          "the resize's aspect ratio, and be square after a shortest-edge resize)")
    mean, std = pre.get("image_mean"), pre.get("image_std")
    if pre.get("do_normalize", True) is not True:
        mean, std = [0.0] * 3, [1.0] * 3
    return dict(img_size=crop, interpolation=_RESAMPLE[resample], crop_pct=crop_pct, crop_mode=mode,
                mean=tuple(mean) if isinstance(mean, list) else mean, std=tuple(std) if isinstance(std, list) else std)
