"""timm ViT <-> jaxvit: configs from timm modules, and strict tensor mapping both ways.

Key mapping (timm state dict -> jaxvit params path):
  blocks.{i}.X        -> blocks_{i}/X
  *.weight (2-D)      -> */kernel, transposed (Linear is (out, in); Dense is (in, out))
  *.weight (4-D)      -> */kernel, OIHW -> HWIO (the patch-embedding conv)
  *.weight (1-D)      -> */scale (LayerNorm)
  patch_embed.proj.*  -> patch_embed/*
  everything else keeps its name (bias, gamma, cls_token, reg_token, dist_token, pos_embed).
Nothing is renamed beyond that, so a missed or extra tensor shows up by name.

This module never imports torch at import time: safetensors checkpoints convert without it.
One module past 600 lines on purpose: the key mapping both ways and the config read from a state
dict, a timm module or a timm name are one contract with timm, checked together (tests/test_convert.py).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import numpy as np

from jaxvit import labels
from jaxvit.checkpoint import param_shapes
from jaxvit.config import (ACTIVATIONS, GLOBAL_POOLS, IMG_SIZE_LIMIT, INT_LIMITS, ConfigError, UnknownModelError,
                           ViTConfig, check_int, get_config, is_real, unknown_model_error)
from jaxvit.posemb import grid_from_length, resample_abs_pos_embed

from convert.errors import UnsupportedModelError, key_mismatch


# ---------------------------------------------------------------------------------------------
# Names and layouts.

def _timm_to_path(key: str, ndim: int) -> tuple[str, ...]:
    parts = key.split(".")
    if parts[0] == "blocks":
        parts = [f"blocks_{parts[1]}"] + parts[2:]
    if parts[:2] == ["patch_embed", "proj"]:
        parts = ["patch_embed"] + parts[2:]
    if parts[-1] == "weight":
        parts[-1] = "scale" if ndim == 1 else "kernel"
    return tuple(parts)


def _path_to_timm(path: tuple[str, ...]) -> str:
    parts = list(path)
    if parts[0].startswith("blocks_"):
        parts = ["blocks", parts[0][len("blocks_"):]] + parts[1:]
    if parts[0] == "patch_embed":
        parts = ["patch_embed", "proj"] + parts[1:]
    if parts[-1] in ("kernel", "scale"):
        parts[-1] = "weight"
    return ".".join(parts)


def _to_jax_layout(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel":
        if value.ndim == 2:
            return value.T
        if value.ndim == 4:
            return value.transpose(2, 3, 1, 0)
    return value


def _to_timm_layout(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel":
        if value.ndim == 2:
            return value.T
        if value.ndim == 4:
            return value.transpose(3, 2, 0, 1)
    return value


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return tree


# ---------------------------------------------------------------------------------------------
# State dicts.

def clean_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Unwrap training-checkpoint containers ('model', 'state_dict', 'module.' prefix) into numpy."""
    for wrapper in ("model", "state_dict", "model_ema"):
        if wrapper in state_dict and isinstance(state_dict[wrapper], Mapping):
            state_dict = state_dict[wrapper]
            break
    out = {}
    for k, v in state_dict.items():
        if k.startswith("module."):
            k = k[len("module."):]
        out[k] = _numpy(v)
    return out


def _numpy(v) -> np.ndarray:
    if isinstance(v, np.ndarray):
        return v
    if type(v).__module__.startswith("torch"):
        v = v.detach().cpu()
        if str(v.dtype) == "torch.bfloat16":
            import ml_dtypes

            return v.view(dtype=__import__("torch").int16).numpy().view(ml_dtypes.bfloat16)
        return v.numpy()
    return np.asarray(v)


def params_from_state_dict(state_dict: Mapping[str, Any], config: ViTConfig,
                           source_name: Callable[[str], str] | None = None) -> dict:
    """Strictly map a timm state dict onto jaxvit params of `config`.

    Every tensor must be consumed and every parameter filled with the right shape; otherwise
    `CheckpointMismatchError` names the keys: timm names, or the checkpoint's own through `source_name`
    (timm key -> its name in the file) where the state dict was converted from another format.
    """
    sd = clean_state_dict(state_dict)
    want = {tuple(str(getattr(k, "key", k)) for k in path): leaf.shape
            for path, leaf in _tree_items(param_shapes(config))}
    got: dict[tuple[str, ...], np.ndarray] = {}
    unexpected, misshapen = [], {}  # misshapen: {timm key: shapes}
    for key, value in sd.items():
        path = _timm_to_path(key, value.ndim)
        if path not in want:
            unexpected.append(key)
            continue
        value = _to_jax_layout(path, value)
        if tuple(value.shape) != tuple(want[path]):
            misshapen[key] = (f"{tuple(_to_timm_layout(path, value).shape)} in the checkpoint, "
                              f"{tuple(_to_timm_layout(path, np.empty(want[path])).shape)} expected")
            continue
        got[path] = np.ascontiguousarray(value)
    missing = [_path_to_timm(p) for p in want if p not in got and _path_to_timm(p) not in misshapen]
    if unexpected or missing or misshapen:
        name = source_name or (lambda key: key)
        raise key_mismatch(f"checkpoint does not match {config.name or 'the ViT config'}",
                           missing=[name(k) for k in missing], unexpected=unexpected,
                           misshapen=[f"{name(k)}: {shapes}" for k, shapes in misshapen.items()],
                           advice="Check model_name (architecture and tag) against the checkpoint.")
    return _unflatten(got)


def state_dict_from_params(params: Mapping) -> dict[str, np.ndarray]:
    """jaxvit params -> a timm state dict (numpy arrays, timm names and layouts)."""
    out = {}
    for path, value in _flatten(params).items():
        value = np.asarray(value)
        out[_path_to_timm(path)] = np.ascontiguousarray(_to_timm_layout(path, value))
    return out


def _tree_items(tree):
    import jax

    return jax.tree_util.tree_flatten_with_path(tree)[0]


# ---------------------------------------------------------------------------------------------
# Configs.

def adapt_config(config: ViTConfig, state_dict: Mapping[str, np.ndarray]) -> ViTConfig:
    """Fill what the checkpoint itself says: classes, register tokens, stored grid size."""
    changes: dict[str, Any] = {}
    if "head.weight" in state_dict:
        n = int(state_dict["head.weight"].shape[0])
        if n != config.num_classes:
            changes["num_classes"] = n
            if config.label_names is not None:
                changes["label_names"] = labels.imagenet_names() if n == 1000 else None
    elif "head.bias" not in state_dict and config.num_classes:
        changes["num_classes"] = 0
        changes["label_names"] = None
    if "reg_token" in state_dict:
        changes["reg_tokens"] = int(state_dict["reg_token"].shape[1])
    if "pos_embed" in state_dict and config.pos_embed:
        cfg = config.replace(**{k: v for k, v in changes.items() if k == "reg_tokens"})
        prefix = 0 if cfg.no_embed_class else cfg.num_prefix_tokens
        n = int(state_dict["pos_embed"].shape[1]) - prefix
        if n != cfg.num_patches and n > 0:
            gh, gw = _stored_grid(n)
            changes["img_size"] = (gh * cfg.patch_size, gw * cfg.patch_size)
    return config.replace(**changes) if changes else config


def _stored_grid(rows: int) -> tuple[int, int]:
    """The patch grid of a checkpoint's position rows where nothing says its input size: square."""
    try:
        return grid_from_length(rows)
    except ValueError:
        raise ValueError(
            f"the checkpoint's {rows} position rows are no square grid and nothing says its input size: pass the "
            "timm module itself (timm.create_model(name, img_size=(H, W)) with the weights loaded), or load the "
            "folder timm's save_for_hf writes (config.json's model_args give img_size)") from None


def _as_pair(size):
    """An int as (size, size) and any sequence as a tuple; anything else unchanged."""
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        return size, size
    return tuple(size) if isinstance(size, (list, tuple)) else size


def check_img_size(img_size, patch_size: int) -> tuple[int, int]:
    """`img_size` (an int for a square, as timm takes it, or (height, width)) as (height, width),
    refused unless both are positive multiples of the patch size: the patch grid (and the position
    embeddings resampled to it) must cover the image exactly."""
    size = _as_pair(img_size)
    try:
        h, w = (int(s) for s in size)
        ok = (h, w) == tuple(size) and h > 0 and w > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"img_size must be an integer or (height, width), positive integers; got {img_size!r}")
    if h % patch_size or w % patch_size:
        lower = (max(h // patch_size, 1) * patch_size, max(w // patch_size, 1) * patch_size)
        upper = (-(-h // patch_size) * patch_size, -(-w // patch_size) * patch_size)
        raise ValueError(f"img_size {(h, w)} is not a multiple of the patch size {patch_size}: "
                         f"use e.g. {lower} or {upper}")
    return h, w


# timm's `_create_vision_transformer` gives these families' checkpoint filter plain bilinear
# resampling (their pretrained weights resize better so); every other ViT gets antialiased bicubic.
_RADIO_ALIGN_CORNERS = ("base_patch16_radio_v3", "huge_patch16_radio_v3")


def checkpoint_resampling(name: str) -> dict:
    """How timm's checkpoint filter resamples the position embeddings of architecture `name`:
    keyword arguments of `jaxvit.posemb.resample_abs_pos_embed`."""
    arch = name.partition(".")[0]
    if "flexi" in arch:
        return dict(interpolation="bilinear", antialias=False)
    if "radio" in arch:
        return dict(interpolation="bilinear", antialias=False,
                    align_corners=any(n in arch for n in _RADIO_ALIGN_CORNERS))
    return dict(interpolation="bicubic", antialias=True)


def resize_params(params: dict, config: ViTConfig, img_size: tuple[int, int],
                  resampling: dict | None = None) -> tuple[dict, ViTConfig]:
    """Resample the stored position embeddings to `img_size`, as timm's checkpoint filter does
    (`checkpoint_resampling` of the config's name), or as `resampling` says (keyword arguments of
    `jaxvit.posemb.resample_abs_pos_embed`).

    `img_size` must be positive multiples of the patch size (else ValueError), or the config's own."""
    if _as_pair(img_size) == config.img_size:
        return params, config  # the native size, even when not a multiple (ViTConfig.patch_grid)
    img_size = check_img_size(img_size, config.patch_size)
    new = config.replace(img_size=img_size)
    if img_size == tuple(config.img_size) or not config.pos_embed or config.posemb != "learn":
        return params, new  # nothing stored to resample (sincos2d rows are computed for any grid)
    prefix = 0 if config.no_embed_class else config.num_prefix_tokens
    pe = resample_abs_pos_embed(params["pos_embed"], new.grid_size, config.grid_size, prefix,
                                **(resampling or checkpoint_resampling(config.name)))
    params = dict(params, pos_embed=np.asarray(pe))
    return params, new


def infer_config(state_dict: Mapping[str, np.ndarray], num_heads: int | None = None) -> ViTConfig:
    """A config from tensor shapes alone, for checkpoints without a model name.

    Shapes fix everything but the head count, which must come from `num_heads` (or q_norm).
    """
    sd = state_dict
    if "patch_embed.proj.weight" not in sd or "blocks.0.attn.qkv.weight" not in sd:
        raise UnsupportedModelError(
            "this state dict is not a timm VisionTransformer (no patch_embed.proj.weight / blocks.0.attn.qkv.weight)")
    d, c_in, p, _ = sd["patch_embed.proj.weight"].shape
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    width = sd["blocks.0.attn.qkv.weight"].shape[0] // 3  # heads x head_dim
    if "blocks.0.attn.q_norm.weight" in sd:
        # q_norm normalises one head's features, so its length is the head dim.
        from_norm = width // sd["blocks.0.attn.q_norm.weight"].shape[0]
        if num_heads is not None and num_heads != from_norm:
            raise ValueError(f"num_heads {num_heads!r} contradicts the checkpoint: its q_norm weights give "
                             f"{from_norm} heads (attention width {width}); leave num_heads out for this checkpoint")
        num_heads = from_norm
    if num_heads is None:
        raise ValueError("the number of attention heads cannot be read from tensor shapes: pass model_name "
                         "(a timm name such as 'vit_small_patch16_224') or num_heads")
    # Checked here: a head count that does not split the width would only surface as wrong qkv shapes.
    if isinstance(num_heads, bool) or not isinstance(num_heads, (int, np.integer)) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive integer, got {num_heads!r}")
    if width % num_heads:
        what = f"embed_dim {d}" if width == d else f"the attention width {width} (qkv rows / 3)"
        raise ValueError(f"{what} is not divisible by num_heads {num_heads}: pass the model's head count, or "
                         "model_name (a timm name such as 'vit_small_patch16_224')")
    if "blocks.0.mlp.fc1.weight" not in sd:  # the MLP width is read from it (a KeyError here named nothing)
        raise key_mismatch("the checkpoint does not hold a whole ViT", missing=["blocks.0.mlp.fc1.weight"])
    fc_norm = "fc_norm.weight" in sd
    distilled = "dist_token" in sd
    cfg = ViTConfig(
        patch_size=int(p), in_chans=int(c_in), embed_dim=int(d), depth=depth, num_heads=int(num_heads),
        head_dim=width // num_heads,
        mlp_dim=int(sd["blocks.0.mlp.fc1.weight"].shape[0]),
        qkv_bias="blocks.0.attn.qkv.bias" in sd, qk_norm="blocks.0.attn.q_norm.weight" in sd,
        scale_attn_norm="blocks.0.attn.norm.weight" in sd, scale_mlp_norm="blocks.0.mlp.norm.weight" in sd,
        proj_bias="blocks.0.attn.proj.bias" in sd, patch_bias="patch_embed.proj.bias" in sd,
        layer_scale="blocks.0.ls1.gamma" in sd, class_token="cls_token" in sd,
        reg_tokens=int(sd["reg_token"].shape[1]) if "reg_token" in sd else 0, distilled=distilled,
        pos_embed="pos_embed" in sd, pre_norm="norm_pre.weight" in sd,
        final_norm="norm.weight" in sd or fc_norm, fc_norm=fc_norm,
        global_pool="avg" if fc_norm or "cls_token" not in sd else "token",
        num_classes=int(sd["head.weight"].shape[0]) if "head.weight" in sd else 0,
    )
    if cfg.head_dim * cfg.num_heads == cfg.embed_dim:
        cfg = cfg.replace(head_dim=None)
    if cfg.pos_embed:
        # The stored grid is square in every timm checkpoint; the row count says whether the
        # prefix tokens have position rows (no_embed_class=False) or not.
        n, prefix = sd["pos_embed"].shape[1], cfg.num_prefix_tokens
        no_embed_class = prefix > 0 and not _is_square(n - prefix) and _is_square(n)
        gh, gw = _stored_grid(n if no_embed_class else n - prefix)
        cfg = cfg.replace(img_size=(gh * p, gw * p), no_embed_class=no_embed_class)
    return cfg


def _is_square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n


def _ln_eps(module) -> float:
    return float(getattr(module, "eps", 1e-6))


def config_from_timm_module(model, name: str | None = None) -> ViTConfig:
    """Describe a timm `VisionTransformer` module as a `ViTConfig`, refusing what jaxvit lacks.

    Works on modules built on the meta device (no weights needed).
    """
    import torch.nn as tnn
    from timm.layers import LayerNorm as TimmLayerNorm, LayerNormFp32, LayerScale, Mlp
    from timm.layers.attention import Attention
    from timm.models.vision_transformer import Block, VisionTransformer

    arch = name or getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__

    def refuse(what: str):
        raise UnsupportedModelError(f"{arch}: {what} is not supported by jaxvit (it implements timm's plain "
                                    "VisionTransformer and DeiT distilled models)")

    cls_name = type(model).__name__
    if not isinstance(model, VisionTransformer) or cls_name not in ("VisionTransformer", "VisionTransformerDistilled"):
        refuse(f"model class {cls_name}")
    if getattr(model, "attn_pool", None) is not None:
        refuse(f"attention-pool head (global_pool={model.global_pool!r})")
    if model.global_pool not in ("token", "avg", "avgmax", "max"):
        refuse(f"global_pool={model.global_pool!r}")
    pe = model.patch_embed
    if type(pe).__name__ != "PatchEmbed":
        refuse(f"patch embedding {type(pe).__name__} (hybrid CNN stems)")
    if not isinstance(pe.norm, tnn.Identity):
        refuse(f"patch embedding with a {type(pe.norm).__name__}")
    if getattr(pe, "dynamic_img_pad", False):
        refuse("dynamic image padding")
    conv = pe.proj
    if tuple(conv.kernel_size) != tuple(conv.stride) or conv.kernel_size[0] != conv.kernel_size[1] or any(conv.padding):
        refuse(f"patch conv with kernel {conv.kernel_size}, stride {conv.stride}, padding {conv.padding}")
    blk = model.blocks[0]
    if type(blk) is not Block:
        refuse(f"block type {type(blk).__name__} (e.g. rotary embeddings, parallel or post-norm blocks)")
    attn, mlp = blk.attn, blk.mlp
    if type(attn) is not Attention or getattr(attn, "gate", None) is not None:
        refuse(f"attention layer {type(attn).__name__}{' (gated)' if getattr(attn, 'gate', None) is not None else ''}")
    if type(mlp) is not Mlp:
        refuse(f"MLP {type(mlp).__name__} (e.g. SwiGLU / GLU)")
    norms = [blk.norm1, blk.norm2, model.norm, model.fc_norm, model.norm_pre, attn.q_norm, attn.norm, mlp.norm]
    # Exact classes: subclasses of nn.LayerNorm such as timm's LayerNormAct add an activation after it.
    plain = (tnn.Identity, tnn.LayerNorm, TimmLayerNorm, LayerNormFp32)
    for n in norms:
        if type(n) not in plain or (isinstance(n, tnn.LayerNorm) and not n.elementwise_affine):
            refuse(f"normalisation layer {type(n).__name__}")
    act = type(mlp.act).__name__
    if act == "GELU":
        act = "gelu_tanh" if getattr(mlp.act, "approximate", "none") == "tanh" else "gelu"
    elif act == "QuickGELU":
        act = "quick_gelu"
    elif act == "GELUTanh":
        act = "gelu_tanh"
    else:
        refuse(f"activation {act}")
    if isinstance(blk.ls1, LayerScale) != isinstance(blk.ls2, LayerScale) or not isinstance(
            blk.ls1, (LayerScale, tnn.Identity)):
        refuse("mixed LayerScale")
    distilled = cls_name == "VisionTransformerDistilled"
    if distilled and (getattr(model, "num_reg_tokens", 0) or model.no_embed_class):
        refuse("a distilled DeiT with register tokens or no_embed_class (timm's own forward ignores them)")
    has_head = isinstance(model.head, tnn.Linear)
    fc_norm = isinstance(model.fc_norm, tnn.LayerNorm)
    cfg = dict(
        name=arch,
        img_size=tuple(int(s) for s in pe.img_size),
        patch_size=int(conv.kernel_size[0]),
        in_chans=int(conv.in_channels),
        embed_dim=int(model.embed_dim),
        depth=len(model.blocks),
        num_heads=int(attn.num_heads),
        head_dim=None if attn.head_dim * attn.num_heads == model.embed_dim else int(attn.head_dim),
        mlp_dim=int(mlp.fc1.out_features),
        qkv_bias=attn.qkv.bias is not None,
        qk_norm=isinstance(attn.q_norm, tnn.LayerNorm),
        scale_attn_norm=isinstance(attn.norm, tnn.LayerNorm),
        scale_mlp_norm=isinstance(mlp.norm, tnn.LayerNorm),
        proj_bias=attn.proj.bias is not None,
        patch_bias=conv.bias is not None,
        layer_scale=isinstance(blk.ls1, LayerScale),
        class_token=model.cls_token is not None,
        reg_tokens=int(getattr(model, "num_reg_tokens", 0)),
        distilled=distilled,
        no_embed_class=bool(model.no_embed_class),
        pos_embed=model.pos_embed is not None,
        pre_norm=isinstance(model.norm_pre, tnn.LayerNorm),
        final_norm=isinstance(model.norm, tnn.LayerNorm) or fc_norm,
        fc_norm=fc_norm,
        global_pool=model.global_pool,
        pool_include_prefix=bool(getattr(model, "pool_include_prefix", False)),
        act=act,
        norm_eps=_ln_eps(blk.norm1),
        num_classes=int(model.head.out_features) if has_head else 0,
    )
    if mlp.fc1.bias is None or mlp.fc2.bias is None:
        if cfg["proj_bias"]:
            refuse("MLP without bias but attention projection with bias")
    pcfg = getattr(model, "pretrained_cfg", None) or {}
    cfg.update(_data_settings(pcfg, cfg["num_classes"]))
    tag = pcfg.get("tag")
    if tag and not _shaped_like(arch, cfg):
        # timm keeps the default tag's pretrained_cfg on a module built with other shapes (depth=2, a
        # random test model): its weights cannot be that tag's, so the name and hub id do not say so.
        tag = None
        cfg.pop("hf_hub_id", None)
    if name is None and tag:
        cfg["name"] = f"{arch}.{tag}"
    return ViTConfig(**cfg)


# The fields that fix a ViT's weight shapes (apart from the head and the position grid, which
# timm's pretrained loading adapts: num_classes, img_size).
_WEIGHT_SHAPE_FIELDS = ("patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_dim", "class_token",
                        "reg_tokens")


def _shaped_like(arch: str, cfg: dict) -> bool:
    """Whether `cfg` has the weight shapes of timm's `arch` as the bundled table knows it (True when
    it does not know it: nothing to say otherwise)."""
    try:
        default = get_config(arch)
    except KeyError:
        return True
    return all(getattr(default, f) == cfg[f] for f in _WEIGHT_SHAPE_FIELDS)


def _data_settings(pcfg: Mapping, num_classes: int) -> dict:
    out: dict[str, Any] = {}
    for key in ("mean", "std"):
        if pcfg.get(key) is not None:
            out[key] = tuple(float(x) for x in pcfg[key])
    for key in ("interpolation", "crop_mode", "hf_hub_id"):
        if pcfg.get(key):
            out[key] = pcfg[key]
    if pcfg.get("crop_pct"):
        out["crop_pct"] = float(pcfg["crop_pct"])
    in1k = num_classes == 1000 and (pcfg.get("num_classes") in (None, 1000))
    out["label_names"] = labels.imagenet_names() if in1k else None
    return out


def timm_config(name: str, *, model_args: Mapping[str, Any] | None = None, **overrides) -> ViTConfig:
    """Config of a timm model name through an installed timm (meta device: no weights, no download),
    built with `timm.create_model`'s keyword arguments `model_args` where given."""
    if model_args is not None:
        check_model_args(model_args)
    import timm
    import torch

    arch = name.partition(".")[0]
    if not timm.is_model(arch):
        raise unknown_model_error(name, f"timm {timm.__version__} has no architecture {arch!r}",
                                  timm.list_models(module=["vision_transformer", "deit"]))
    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
    except RuntimeError as e:  # an unknown pretrained tag of a known architecture
        raise UnknownModelError(f"unknown model name {name!r}: {e}") from None
    if model_args:
        try:
            with torch.device("meta"):
                model = timm.create_model(name, pretrained=False, **model_args)
        except (TypeError, ValueError, AssertionError, RuntimeError) as e:
            raise ValueError(f"config.json's model_args {dict(model_args)} do not build {name} in timm "
                             f"{timm.__version__}: {e}") from None
    cfg = config_from_timm_module(model)  # named arch.tag from the resolved pretrained cfg
    return cfg.replace(**overrides) if overrides else cfg


# The timm.create_model arguments a checkpoint's config.json (`model_args`) may give: VisionTransformer's
# architecture arguments that jaxvit implements (what save_timm writes), dynamic_img_size (jaxvit takes
# any patch multiple anyway) and the training-only dropout rates (identities in eval). Nothing else reaches
# timm: create_model's checkpoint_path, pretrained, pretrained_cfg(_overlay) or cache_dir read files or
# weights, and the layer arguments (norm_layer, block_fn, embed_layer, ...) choose code.
_INT_ARGS = ("patch_size", "in_chans", "num_classes", "embed_dim", "depth", "num_heads", "reg_tokens")
_BOOL_ARGS = ("qkv_bias", "qk_norm", "scale_attn_norm", "scale_mlp_norm", "proj_bias", "class_token", "no_embed_class",
              "pre_norm", "final_norm", "pool_include_prefix", "dynamic_img_size")
_CHOICE_ARGS = {"global_pool": GLOBAL_POOLS, "act_layer": ACTIVATIONS, "pos_embed": ("learn", "none")}
_RATE_ARGS = ("drop_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate")
MODEL_ARGS = ("img_size", "mlp_ratio", "init_values", "fc_norm") + _INT_ARGS + _BOOL_ARGS + tuple(_CHOICE_ARGS) \
    + _RATE_ARGS


def check_model_args(model_args: Any) -> None:
    """Refuse, before timm builds anything, `model_args` beyond the allow-list MODEL_ARGS or of the wrong
    type or range (ConfigError naming the argument): a checkpoint's configuration is data, never a way
    to make timm load a file, fetch weights or build a million blocks."""
    if not isinstance(model_args, Mapping):
        raise ConfigError(f"model_args must be a mapping of timm.create_model arguments; got a "
                          f"{type(model_args).__name__}")
    for key, value in model_args.items():
        if key not in MODEL_ARGS:
            raise ConfigError(f"model_args {key!r} is refused: a checkpoint may give only these timm.create_model "
                              f"arguments: {', '.join(sorted(MODEL_ARGS))}")
        what = f"model_args {key}"
        if key in _INT_ARGS:
            check_int(what, value, *INT_LIMITS[key])
        elif key == "img_size":
            pair = value if isinstance(value, (list, tuple)) and len(value) == 2 else (value, value)
            try:
                for side in pair:
                    check_int(what, side, 1, IMG_SIZE_LIMIT)
            except ConfigError:
                raise ConfigError(f"{what} must be an integer or [height, width], each from 1 to {IMG_SIZE_LIMIT}; "
                                  f"got {value!r}") from None
        elif key in _BOOL_ARGS or key == "fc_norm":
            if not (isinstance(value, bool) or (key == "fc_norm" and value is None)):
                raise ConfigError(f"{what} must be true or false; got {value!r}")
        elif key in _CHOICE_ARGS:
            if not isinstance(value, str) or value not in _CHOICE_ARGS[key]:
                raise ConfigError(f"{what} must be one of {', '.join(_CHOICE_ARGS[key])}; got {value!r}")
        elif key == "mlp_ratio":
            if not is_real(value) or not 0 < value <= 64:
                raise ConfigError(f"{what} must be a number in (0, 64]; got {value!r}")
        elif key == "init_values":
            if value is not None and not is_real(value):
                raise ConfigError(f"{what} must be a finite number or null; got {value!r}")
        elif not is_real(value) or not 0 <= value < 1:  # a dropout rate
            raise ConfigError(f"{what} must be a number in [0, 1); got {value!r}")


# ViTConfig fields that are timm VisionTransformer arguments of the same name and meaning.
TIMM_ARGS = ("img_size", "patch_size", "in_chans", "num_classes", "global_pool", "embed_dim", "depth", "num_heads",
             "qkv_bias", "qk_norm", "scale_attn_norm", "scale_mlp_norm", "proj_bias", "class_token", "reg_tokens",
             "no_embed_class", "pre_norm", "final_norm", "fc_norm", "pool_include_prefix")


def resolve_config(name: str, *, model_args: Mapping[str, Any] | None = None, **overrides) -> ViTConfig:
    """jaxvit's bundled table (generated from timm, checked against it in the tests) where it has the
    name; timm's own definition, imported only then, for a name the table lacks or `model_args` beyond
    the input size and classes. `model_args`: the `timm.create_model` arguments a checkpoint's
    config.json records (timm's `save_for_hf` writes them: an activation, pooling or input size other
    than the architecture's); without timm, what it would have to decide is refused, not ignored.
    Either way only the arguments of `check_model_args`' allow-list are accepted, checked before
    anything is built. Importing timm and torch costs seconds, which every safetensors load of a known
    name paid."""
    if model_args is not None:
        check_model_args(model_args)
    try:
        cfg = get_config(name, **overrides)
    except KeyError:
        if not _timm_installed():
            raise
        return timm_config(name, model_args=model_args, **overrides)
    changes, other = {}, []
    for key, value in (model_args or {}).items():
        if key == "img_size":
            changes["img_size"] = check_img_size(value, cfg.patch_size)
        elif key == "num_classes":
            changes["num_classes"] = int(value)
        elif not ((key == "act_layer" and value == cfg.act)
                  or (key in TIMM_ARGS and value == getattr(cfg, key))):
            other.append(key)  # a value other than the architecture's: what it builds is timm's to say
    if other:
        if _timm_installed():
            return timm_config(name, model_args=model_args, **overrides)
        raise ValueError(f"config.json's model_args change {sorted(other)} of {name}; install timm to read "
                         "this checkpoint (pip install 'predmaps[torch]')")
    return get_config(name, **{**overrides, **changes}) if changes else cfg  # labels follow the classes


def _timm_installed() -> bool:
    """Whether timm (and torch) can be imported, asked without importing them."""
    import importlib.util

    try:
        return all(importlib.util.find_spec(m) is not None for m in ("timm", "torch"))
    except (ImportError, ValueError):  # an import hook refusing them; a module without a spec
        return False
