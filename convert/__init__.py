"""Checkpoint formats: timm, Google .npz, Hugging Face transformers and open_clip weights in, jaxvit
params out, and back to timm. The format is read from the weights' keys (google_npz, hf_vision,
openclip, timm_vit); this module only dispatches.

    import convert
    model, params = convert.load("vit_base_patch16_224.orig_in21k_ft_in1k")   # hub (cached)
    model, params = convert.load("model.safetensors", model_name="vit_small_patch16_224")
    model, params = convert.load(timm_module)                                 # nn.Module
    model, params = convert.load("ViT-B_16.npz")                              # Google's JAX checkpoint
    model, params = convert.load("google/vit-base-patch16-224")               # transformers (hub cache)
    out = model.apply({"params": params}, images)                             # (B, H, W, 3)
    convert.save_timm(params, model.config, "out_dir")                         # timm again
    model, params, tokenizer = convert.load_text("folder_or_owner/name")        # a text classifier
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxvit
from convert import google_npz, hf_vision, openclip
from convert.hf_text import load_text  # BERT / RoBERTa / DistilBERT classifiers (issue 28)
from convert.sources import WEIGHT_FILES, HubUnavailableError, config_file_of, is_file_name, read_source_files
from convert.errors import CheckpointMismatchError, UnsupportedModelError
from convert.timm_vit import (TIMM_ARGS, adapt_config, check_model_args, config_from_timm_module, infer_config,
                              params_from_state_dict, resize_params, resolve_config, state_dict_from_params, timm_config)
from jaxvit.config import ConfigError, UnknownModelError, ViTConfig, is_real
from convert.clip_text import CLIP, load_clip_text  # noqa: E402  (CLIP's text tower)

__all__ = ["CLIP", "CheckpointMismatchError", "HubUnavailableError", "UnknownModelError", "UnsupportedModelError",
           "export_state_dict", "load", "load_clip", "load_clip_text", "load_config", "load_text", "save_timm"]


def _is_torch_module(obj) -> bool:
    return type(obj).__module__.startswith(("timm.", "torch.")) and hasattr(obj, "state_dict")


def _hub_data_settings(hub_config: dict | None) -> dict:
    if not hub_config or not isinstance(hub_config.get("pretrained_cfg"), dict):
        return {}
    pcfg = hub_config["pretrained_cfg"]
    out: dict[str, Any] = {}
    for key in ("mean", "std"):
        if pcfg.get(key) is not None:  # ViTConfig checks the values: finite numbers, std positive
            value = pcfg[key]
            out[key] = tuple(float(x) if is_real(x) else x for x in value) if isinstance(value, list) else value
    for key in ("interpolation", "crop_mode"):
        if pcfg.get(key):
            out[key] = pcfg[key]
    if pcfg.get("crop_pct"):
        out["crop_pct"] = float(pcfg["crop_pct"]) if is_real(pcfg["crop_pct"]) else pcfg["crop_pct"]
    return out


# A timm model name: architecture, optionally .tag (letters, digits, '_' and '-'); no path, no hub prefix.
_MODEL_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_-]+)?")


def _hub_model_name(hub_config: dict | None) -> str | None:
    if not hub_config or "architecture" not in hub_config:
        return None
    tag = (hub_config.get("pretrained_cfg") or {}).get("tag")
    name = f"{hub_config['architecture']}.{tag}" if tag else hub_config["architecture"]
    if not isinstance(name, str) or not _MODEL_NAME.fullmatch(name):
        raise ConfigError(f"architecture {name!r} is no timm model name (letters, digits and '_', then "
                          "optionally '.tag')")
    return name


def load_config(source: Any, state_dict: dict, *, model_name: str | None = None,
                hub_config: dict | None = None, num_heads: int | None = None,
                config_file: str | None = None) -> ViTConfig:
    """The config for a state dict: from the model name (timm when installed, else the bundled
    table), else the checkpoint's timm config.json, else the tensor shapes; then corrected by
    what the checkpoint holds (classes, registers, stored grid). A config.json (`hub_config`, read
    from `config_file`, named in errors) is data: its fields are checked (ConfigError naming the
    file and the field), and its `model_args` are refused beyond `timm_vit.MODEL_ARGS`."""
    where = config_file or f"{source}'s config.json"
    with _naming(where) if hub_config is not None else contextlib.nullcontext():  # no file to blame without one
        if hub_config is not None and not isinstance(hub_config, dict):
            raise ConfigError(f"a timm config.json is a JSON object; got a {type(hub_config).__name__}")
        # A model_name given by the caller replaces the checkpoint's config.json, arguments too (not
        # its data settings).
        used = hub_config if model_name is None else None
        # timm's save_for_hf records the create_model arguments a model was built with (an activation,
        # pooling or input size other than its architecture's): part of the model, as timm's local-dir
        # loading reads them; checked against the allow-list before anything is built.
        model_args = (used or {}).get("model_args")
        if model_args is not None:
            check_model_args(model_args)
        if used and "jaxvit_config" in used:  # written by save_timm; its architecture is not resolved
            config = ViTConfig.from_dict(used["jaxvit_config"])
        elif (name := model_name or _hub_model_name(used)) is not None:
            config = _named_config(name, model_args, hub_config)
        else:
            config = None
        settings = _hub_data_settings(hub_config)
    if config is None:
        with _naming(source):  # sizes read from the tensors
            config = infer_config(state_dict, num_heads=num_heads)
    if settings:
        with _naming(where):
            config = config.replace(**settings)
    with _naming(source):
        return adapt_config(config, state_dict)


@contextlib.contextmanager
def _naming(where: Any):
    """ConfigErrors raised inside say where the config came from."""
    try:
        yield
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _named_config(name: str, model_args: dict | None, hub_config: dict | None) -> ViTConfig:
    try:
        return resolve_config(name, model_args=model_args)
    except KeyError as unknown:
        # A tag newer than timm / the bundled table. The architecture fixes the shapes, and the
        # checkpoint's own timm config.json the data settings (applied below); without that file
        # nothing says how the tag normalises its inputs, so the unknown name stands.
        arch = name.partition(".")[0]
        if arch == name:
            raise
        if hub_config is None:
            raise UnknownModelError(
                f"{unknown}. Weights of a tag this table lacks load from a directory that also holds the "
                f"tag's timm config.json, or pass the architecture alone (model_name={arch!r}) to use its "
                "default tag's data settings") from None
        return resolve_config(arch, model_args=model_args).replace(name=name)


def load(source: Any, *, model_name: str | None = None, dtype=jnp.float32, attention: str = "fused",
         img_size: tuple[int, int] | None = None, num_heads: int | None = None) -> tuple[jaxvit.ViT, jaxvit.Params]:
    """Load timm ViT weights as (jaxvit module, params pytree).

    `source`: a timm `nn.Module`; a state dict (torch tensors or numpy arrays); a `.safetensors`
    file (no torch needed), `.pth`/`.bin` file (torch) or Google `.npz`; a directory holding
    `model.safetensors` (and timm's or transformers' `config.json`, transformers'
    `preprocessor_config.json`), open_clip's weights and `open_clip_config.json`, or a jaxvit checkpoint;
    or a hub name (`vit_base_patch16_224.augreg2_in21k_ft_in1k`, `timm/...`, `hf-hub:timm/...`, a
    transformers or open_clip repo id such as `google/vit-base-patch16-224`) fetched through
    huggingface_hub's cache (HF_HUB_OFFLINE honoured). The weights' keys say which format they are in.
    `model_name`: the timm name the weights belong to, when the source does not say (for a Google .npz
    also big_vision's "B/16"; for an open_clip state dict its open_clip name). A name that is
    no known architecture raises `UnknownModelError` (a KeyError) before any hub access; a tag newer
    than timm (or the bundled table) loads when the weights come with their timm `config.json`.
    `dtype`: compute dtype of the module (params stay float32). `img_size`: resample the stored
    position embeddings to this size now, as timm does when a model is built for another size
    (inputs of any multiple of the patch size work either way); it must be a multiple of the patch
    size. `num_heads`: the head count of a state dict without a name (shapes do not tell it).

    Strict: every tensor is consumed and every parameter filled, else `CheckpointMismatchError`.
    """
    refusal = _model_name_refusal(source, model_name)
    if refusal:
        raise ValueError(refusal)
    resize, source_name = None, None
    if _is_torch_module(source):
        config = config_from_timm_module(source, name=model_name)
        state_dict = {k: v for k, v in source.state_dict().items()}
        from convert.timm_vit import clean_state_dict

        state_dict = clean_state_dict(state_dict)
    elif isinstance(source, (str, os.PathLike)) and _is_jaxvit_checkpoint(Path(source)):
        model, params = jaxvit.load(source, dtype=dtype, attention=attention)
        config = model.config
        if img_size is not None:
            params, config = resize_params(params, config, img_size)
        return jaxvit.ViT(config, dtype=dtype, attention=attention), jax.tree_util.tree_map(jnp.asarray, params)
    else:
        hf_hub_id = None
        if _is_hub_model_name(source):
            model_name = model_name or source.removeprefix("hf-hub:")
            try:
                hf_hub_id = resolve_config(model_name).hf_hub_id
            except KeyError as unknown:
                # An unknown architecture has no hub repo to try: say so now (UnknownModelError), not
                # as a hub/cache failure after the hub's retries. A known architecture with a tag we
                # lack, or any hf-hub: repo, is still looked up on the hub as before.
                if not source.startswith("hf-hub:") and not _is_known_architecture(model_name):
                    raise unknown from None
                hf_hub_id = None
        state_dict, sides, where = read_source_files(source, hf_hub_id=hf_hub_id)
        state_dict, config, resize, source_name = _interpret(source, state_dict, sides, where, model_name, num_heads)
    params = params_from_state_dict(state_dict, config, source_name)
    if img_size is None and resize is not None and tuple(resize[0]) != config.img_size:
        # transformers' processor input size: position embeddings resampled to it as transformers does
        params, config = resize_params(params, config, *resize)
    if img_size is not None:
        params, config = resize_params(params, config, img_size)
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32) if a.dtype != np.float32 else jnp.asarray(a),
                                    params)
    return jaxvit.ViT(config, dtype=dtype, attention=attention), params


def _interpret(source: Any, state_dict: dict, sides: dict, where: str, model_name: str | None,
               num_heads: int | None) -> tuple[dict, ViTConfig, tuple[tuple[int, int], dict] | None, Any]:
    """(timm-layout state dict, config, None or (input size, resampling) to resample to, None or a function naming
    a timm key as the file names it), by what the weights' keys are: a Google .npz, Hugging Face transformers,
    open_clip, else timm. (The .npz reader names what it misses itself.)"""
    hub_config = sides.get("config.json")
    name = where[len("hub:"):] if where.startswith("hub:") else ""
    with _naming(source):
        if google_npz.is_google_vit(state_dict):
            sd, heads, _ = google_npz.to_timm(state_dict)
            if model_name is None or google_npz.parse_variant(model_name) is not None:
                return sd, google_npz.config_of(sd, heads, variant=model_name, num_heads=num_heads), None, None
            config = load_config(source, sd, model_name=model_name, num_heads=num_heads)
            if config.num_heads != heads:
                raise CheckpointMismatchError(f"checkpoint does not match {model_name}: its attention kernels have "
                                              f"{heads} heads, {config.num_heads} expected")
            return sd, config, None, None
        if hf_vision.looks_like_hf(state_dict) or hf_vision.is_hf_config(hub_config):
            return (*hf_vision.load_state(state_dict, hub_config, sides.get("preprocessor_config.json"), name=name,
                                          model_name=model_name, num_heads=num_heads),
                    hf_vision.source_namer(state_dict, hub_config))
        # an image tower whose conv1 is missing is still open_clip's beside its config (and is refused, naming it)
        if openclip.looks_like_open_clip(state_dict) or (sides.get("open_clip_config.json") is not None
                                                          and any(k.startswith("visual.") for k in state_dict)):
            sd, config = openclip.load_state(state_dict, sides.get("open_clip_config.json"), name=name,
                                             model_name=model_name, num_heads=num_heads)
            return sd, config, None, openclip.source_name
    config = load_config(source, state_dict, model_name=model_name, hub_config=hub_config, num_heads=num_heads,
                         config_file=config_file_of(where))
    return state_dict, config, None, None


def _is_known_architecture(name: str) -> bool:
    """Whether `name`'s architecture resolves (timm, else the bundled table); a non-ViT timm
    architecture raises UnsupportedModelError."""
    try:
        resolve_config(name.partition(".")[0])
    except KeyError:
        return False
    return True


def _is_hub_model_name(source: Any) -> bool:
    """A timm model name (no repo path, no existing or file-like path): looked up on the hub."""
    return (isinstance(source, str) and "/" not in source and not os.path.lexists(source)  # a broken link is a file
            and not is_file_name(source))


def _is_jaxvit_checkpoint(path: Path) -> bool:
    """A jaxvit checkpoint folder or its params.msgpack. A folder whose config.json is timm's beside
    timm weights is a timm export (one written into a jaxvit checkpoint's folder), read as such."""
    if path.is_dir():
        if not (path / jaxvit.checkpoint.PARAMS_FILE).exists():
            return False
        if not any((path / f).exists() for f in WEIGHT_FILES):
            return True
        try:
            stored = json.loads((path / jaxvit.checkpoint.CONFIG_FILE).read_text())
        except (OSError, ValueError):  # jaxvit.load says what is wrong with it
            return True
        return not jaxvit.checkpoint.is_timm_config(stored)
    return path.suffix == ".msgpack" and path.exists()


def _model_name_refusal(source: Any, model_name: str | None, option: str = "model_name") -> str | None:
    """Why `model_name` (spelled `option`) cannot apply to `source`, or None. It names the weights
    of a state dict, a .safetensors/.pth file, or a folder or hub repo without timm's config.json
    (and overrides that config); a jaxvit checkpoint's own config ignores it, and a timm name as the
    source is the model's name already (another one would fetch that model's weights instead)."""
    if model_name is None:
        return None
    if isinstance(source, (str, os.PathLike)) and _is_jaxvit_checkpoint(Path(source)):
        what = f"{source} is a jaxvit checkpoint, whose config.json names its model"
    elif _is_hub_model_name(source) and model_name != source.removeprefix("hf-hub:"):
        what = f"the source {source!r} is a model name already"
    else:
        return None
    return (f"{option} only applies to a bare weights file (.safetensors/.pth, a state dict, or a folder or hub "
            f"repo without timm's config.json); {what}: leave {option} out")


def export_state_dict(params: jaxvit.Params) -> dict[str, np.ndarray]:
    """jaxvit params -> timm state dict (numpy, timm names and layouts). Exact inverse of `load`."""
    return state_dict_from_params(jax.tree_util.tree_map(np.asarray, params))


def timm_export_refusal(config: ViTConfig) -> str | None:
    """Why timm cannot hold `config`'s network, or None: timm has no head reading the class token and the
    patch-token mean (DINOv2's transformers classifiers), and no fixed sincos2d position embedding."""
    if config.posemb == "sincos2d":
        return ("timm's VisionTransformer has no fixed sincos2d position embedding (big_vision's, computed for each "
                "input's grid), so this model cannot be exported to timm; save it as a jaxvit checkpoint "
                "(jaxvit.save, or --out) instead")
    if config.head_input == "token":
        return None
    return (f"timm has no head like this model's (head_input={config.head_input!r}: the class token and the "
            "patch-token mean concatenated, as transformers' Dinov2ForImageClassification), so it cannot be "
            "exported to timm; save it as a jaxvit checkpoint (jaxvit.save, or --out) instead")


def save_timm(params: jaxvit.Params, config: ViTConfig, out_dir: str | os.PathLike) -> Path:
    """Write `model.safetensors` + timm's `config.json` into `out_dir`, the layout of a timm hub repo:
    `timm.create_model("local-dir:" + out_dir, pretrained=True)` (built at the stored size and shape,
    from config.json's `model_args`; a network with no timm name, like the digit ViT, under a stock timm
    architecture that those arguments turn into it) and `convert.load(out_dir)` both read it. Params that do not fit
    the config (or arguments in another order: `jaxvit.save` takes (path, config, params)) are refused
    before writing."""
    from safetensors.numpy import save as to_safetensors

    from jaxvit import safe_write

    from jaxvit.checkpoint import check_params

    check_params(config, params, "convert.save_timm(params, config, out_dir)")
    refusal = timm_export_refusal(config)
    if refusal:
        raise ValueError(refusal)
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"convert.save_timm(params, config, out_dir): out_dir must be a directory path; got "
                        f"{type(out_dir).__name__}")
    out = safe_write.make_dir(out_dir)  # files renamed into place: a planted symlink is replaced, never written through
    safe_write.write_bytes(out / "model.safetensors", to_safetensors(export_state_dict(params)))
    arch, model_args = _timm_architecture(config)
    tag = config.name.partition(".")[2] if arch == config.name.partition(".")[0] else ""
    hub_config = {
        "architecture": arch,
        "num_classes": config.num_classes,
        "num_features": config.embed_dim,
        "global_pool": config.global_pool,
        "model_args": model_args,
        "pretrained_cfg": {
            "tag": tag or None, "input_size": [config.in_chans, *config.img_size],
            "interpolation": config.interpolation, "crop_pct": config.crop_pct, "crop_mode": config.crop_mode,
            "mean": list(config.mean), "std": list(config.std), "num_classes": config.num_classes,
        },
        "jaxvit_config": config.to_dict(),
    }
    safe_write.write_text(out / "config.json", json.dumps(hub_config, indent=1), durable=True)
    return out




# Stock timm architectures that can stand in for a model of jaxvit's own (no timm name, e.g. the digit
# ViT): with every size argument given, they differ only in what model_args cannot say (patch bias,
# LayerNorm eps, the distillation token).
_STAND_INS = ("vit_base_patch16_224", "vit_base_patch16_clip_224", "deit_base_distilled_patch16_224")
# What a ViTConfig says beyond the network itself.
_DATA_FIELDS = {"name", "mean", "std", "interpolation", "crop_pct", "crop_mode", "label_names", "hf_hub_id"}


def _timm_architecture(config: ViTConfig) -> tuple[str, dict]:
    """The architecture and `model_args` that config.json gives timm to rebuild `config`: its own
    architecture where timm (or the bundled table) knows it; for a model with no timm name, the first
    stand-in that timm, given the arguments, builds into the same network (checked on the meta device,
    so only where timm is installed). Failing both, the config's own name: timm cannot rebuild that
    export by name, `convert.load` still can."""
    own = config.name.partition(".")[0]
    if own:
        try:
            return own, _timm_model_args(config, resolve_config(own))
        except (KeyError, ValueError):  # no timm architecture of that name
            pass
    network = {k: v for k, v in config.to_dict().items() if k not in _DATA_FIELDS}
    for arch in _STAND_INS:
        try:
            args = _timm_model_args(config, timm_config(arch))
            built = timm_config(arch, model_args=args)
        except ImportError:  # no timm to check a stand-in with
            break
        except ValueError:  # arguments it cannot take, or a network jaxvit refuses
            continue
        if {k: v for k, v in built.to_dict().items() if k not in _DATA_FIELDS} == network:
            return arch, args
    return own or "vit", _timm_model_args(config, None)


def _timm_model_args(config: ViTConfig, default: ViTConfig | None) -> dict:
    """The `timm.create_model` arguments that rebuild `config` from an architecture whose config is
    `default` (None: no timm architecture, every argument): what timm reads as config.json's
    `model_args`. Always the size and classes (timm would build its default ones and resample the
    position embeddings), and whatever else differs from the architecture's default."""
    args = {"img_size": list(config.img_size), "num_classes": config.num_classes}
    for field in TIMM_ARGS:
        value = getattr(config, field)
        if field not in args and (default is None or getattr(default, field) != value):
            args[field] = value
    if "global_pool" in args:  # timm derives fc_norm from the pooling when it is not given
        args["fc_norm"] = config.fc_norm
    if default is None or config.pos_embed != default.pos_embed:
        args["pos_embed"] = "learn" if config.pos_embed else "none"
    if default is None or config.act != default.act:
        args["act_layer"] = config.act  # jaxvit's names are timm's get_act_layer names
    if config.layer_scale != (default.layer_scale if default else False):
        args["init_values"] = 1e-5 if config.layer_scale else None  # any value: the stored gammas replace it
    ratio = config.mlp_dim / config.embed_dim
    # timm's Block builds int(dim * mlp_ratio) features; a ratio that does not give them back is left out.
    exact = int(config.embed_dim * ratio) == config.mlp_dim
    if exact and (default is None or ratio != default.mlp_dim / default.embed_dim):
        args["mlp_ratio"] = ratio
    return args


def load_clip(source: Any, *, image_source: Any = None, model_name: str | None = None,
              quick_gelu: bool | None = None, heads: int | None = None, tokenizer: Any = None,
              dtype=jnp.float32) -> CLIP:
    """A CLIP checkpoint's image tower (`convert.load`), text tower and tokenizer (`load_clip_text`) in one call.

    `image_source`: where the image tower comes from when not from `source` (e.g. a timm name such as
    `vit_base_patch16_clip_224.openai`, whose hub repo holds no text tower); `model_name` is passed to
    `convert.load` with it. The towers must share the embedding size.
    """
    text_model, text_params, tok = load_clip_text(source, quick_gelu=quick_gelu, heads=heads, tokenizer=tokenizer,
                                                  dtype=dtype)
    image_model, image_params = load(source if image_source is None else image_source, model_name=model_name,
                                     dtype=dtype)
    e_img, e_txt = image_model.config.num_classes, text_model.config.embed_dim
    if e_img != e_txt:
        raise CheckpointMismatchError(f"the image tower embeds into {e_img} dimensions and the text tower into {e_txt}: "
                                      "both must come from the same CLIP model")
    return CLIP(image_model, image_params, text_model, text_params, tok)
