"""ViT configuration: what a timm VisionTransformer checkpoint is, as a frozen dataclass.

A config describes the architecture (enough to rebuild the module and check every
parameter shape) and the data the checkpoint expects (normalisation, eval transform,
label names). `get_config(name)` resolves timm model names, pretrained tags included,
from the bundled table `data/timm_vit_configs.json` (generated from timm by
`python -m convert.registry`); `convert` prefers a live timm when it is installed.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import numbers
from importlib import resources
from typing import Any

ACTIVATIONS = ("gelu", "quick_gelu", "gelu_tanh")
GLOBAL_POOLS = ("token", "avg", "avgmax", "max")
# What the head reads after the final norm: the class token, or (DINOv2's classifiers) the class token and the
# mean of the patch tokens concatenated, a head of 2 * embed_dim inputs.
HEAD_INPUTS = ("token", "token_and_patch_mean")
# "learn": a stored (resampled) position embedding, timm's; "sincos2d": big_vision's fixed 2-D sine-cosine one,
# computed for the input's own grid and added to the patch tokens only (`jaxvit.posemb.sincos2d`)
POSEMBS = ("learn", "sincos2d")


class UnknownModelError(KeyError, ValueError):
    """A model name that is no known timm ViT architecture or pretrained tag.

    A KeyError (a failed look-up, what `get_config` always raised) and a ValueError (bad input);
    printed without KeyError's quotes, so a CLI can show the message as it is.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def unknown_model_error(name: str, why: str, candidates=()) -> UnknownModelError:
    """The one message for an unknown architecture, from the bundled table or from timm: close
    matches, where the known names are listed, and how to load a file instead."""
    arch = name.partition(".")[0]
    close = difflib.get_close_matches(arch, sorted(set(candidates) | set(_bundled_table()["architectures"])), n=5)
    hint = f" Close names: {', '.join(close)}." if close else ""
    return UnknownModelError(
        f"unknown model name {name!r}: {why}.{hint} Known names: jaxvit.list_models() (the "
        f"{len(_bundled_table()['architectures'])} timm ViT architectures jaxvit implements, with their pretrained "
        "tags), or timm.list_models('vit_*') when timm is installed. To load weights from a file instead: "
        "convert.load('path/to/model.safetensors', model_name='<known name>').")


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


class ConfigError(ValueError):
    """A ViTConfig field of the wrong type or out of range (the loaders add the file it came from)."""


# Inclusive integer ranges of the architecture fields: 4x to 60x beyond every timm ViT (the largest in
# jaxvit's table: 48 blocks, width 1664, 896 px, 115,217 classes), yet small enough that a crafted
# config cannot make model construction run for minutes (depth=1000000 did).
INT_LIMITS = {
    "patch_size": (1, 1024), "in_chans": (1, 64), "embed_dim": (1, 16384), "depth": (1, 256),
    "num_heads": (1, 1024), "head_dim": (1, 4096), "mlp_dim": (1, 131072), "reg_tokens": (0, 256),
    "num_classes": (0, 1 << 20),
}
IMG_SIZE_LIMIT = 8192  # pixels per side
MAX_PATCHES = 1 << 16  # patch tokens at the config's own img_size (timm's largest: 64 x 64)
BOOL_FIELDS = ("qkv_bias", "qk_norm", "scale_attn_norm", "scale_mlp_norm", "proj_bias", "patch_bias", "layer_scale",
               "class_token", "distilled", "no_embed_class", "pos_embed", "pre_norm", "final_norm", "fc_norm",
               "pool_include_prefix")


def is_real(x) -> bool:
    """A finite number (a bool is none)."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _got(value) -> str:
    return f"got {value!r} ({type(value).__name__})"


def check_int(field: str, value, lo: int, hi: int) -> None:
    """Refuse `value` unless it is an integer (a bool is not) in lo..hi, naming `field`."""
    if not _is_int(value) or not lo <= value <= hi:
        raise ConfigError(f"{field} must be an integer from {lo} to {hi}; {_got(value)}")


def check_fields(cfg: "ViTConfig") -> None:
    """Every field's type and range, and the sizes that must agree, before anything uses them: the one
    check of a config from any source (a checkpoint's config.json, timm's model_args, keyword arguments)."""
    for field, (lo, hi) in INT_LIMITS.items():
        value = getattr(cfg, field)
        if not (field == "head_dim" and value is None):
            check_int(field, value, lo, hi)
    size = cfg.img_size
    pair = (size, size) if _is_int(size) else size
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2
            and all(_is_int(s) and 1 <= s <= IMG_SIZE_LIMIT for s in pair)):
        raise ConfigError(f"img_size must be a positive integer or (height, width); {_got(size)}: each side from 1 "
                          f"to {IMG_SIZE_LIMIT}")
    if cfg.patch_size > min(pair):
        raise ConfigError(f"patch_size {cfg.patch_size} is larger than img_size {tuple(pair)}")
    patches = (pair[0] // cfg.patch_size) * (pair[1] // cfg.patch_size)
    if patches > MAX_PATCHES:
        raise ConfigError(f"img_size {tuple(pair)} / patch_size {cfg.patch_size} gives {patches} patch tokens; "
                          f"at most {MAX_PATCHES}")
    if cfg.head_dim is None and cfg.embed_dim % cfg.num_heads:
        raise ConfigError(f"embed_dim {cfg.embed_dim} is not divisible by num_heads {cfg.num_heads} (give head_dim "
                          "for heads of another width)")
    for field in BOOL_FIELDS:
        value = getattr(cfg, field)
        if not isinstance(value, bool):
            raise ConfigError(f"{field} must be true or false; {_got(value)}")
    if cfg.act not in ACTIVATIONS:
        raise ConfigError(f"unsupported activation {cfg.act!r}; jaxvit supports {ACTIVATIONS}")
    if not isinstance(cfg.global_pool, str) or cfg.global_pool not in GLOBAL_POOLS:
        raise ConfigError(f"unsupported global_pool {cfg.global_pool!r}; jaxvit supports {GLOBAL_POOLS} "
                          "(attention-pool heads 'map'/'prr' are not implemented)")
    if not isinstance(cfg.head_input, str) or cfg.head_input not in HEAD_INPUTS:
        raise ConfigError(f"unsupported head_input {cfg.head_input!r}; jaxvit supports {HEAD_INPUTS}")
    if not isinstance(cfg.posemb, str) or cfg.posemb not in POSEMBS:
        raise ConfigError(f"unsupported posemb {cfg.posemb!r}; jaxvit supports {POSEMBS}")
    if cfg.posemb == "sincos2d" and not (cfg.pos_embed and cfg.no_embed_class and cfg.embed_dim % 4 == 0
                                         and cfg.embed_dim >= 8):
        raise ConfigError("posemb='sincos2d' (big_vision's) covers the patch tokens only and splits the width in "
                          f"four: it needs pos_embed=True, no_embed_class=True and embed_dim a multiple of 4 from 8; got "
                          f"pos_embed={cfg.pos_embed!r}, no_embed_class={cfg.no_embed_class!r}, "
                          f"embed_dim={cfg.embed_dim!r}")
    if not is_real(cfg.norm_eps) or not 0 < cfg.norm_eps <= 1:
        raise ConfigError(f"norm_eps must be a number in (0, 1]; {_got(cfg.norm_eps)}")
    for field in ("mean", "std"):
        value = getattr(cfg, field)
        if not (isinstance(value, (tuple, list)) and 1 <= len(value) <= INT_LIMITS["in_chans"][1]
                and all(is_real(v) and (field == "mean" or v > 0) for v in value)):
            what = "positive numbers" if field == "std" else "finite numbers"
            raise ConfigError(f"{field} must be a list of {what}, one per channel; {_got(value)}")
    if not is_real(cfg.crop_pct) or not 0 < cfg.crop_pct <= 16:
        raise ConfigError(f"crop_pct must be a number in (0, 16]; {_got(cfg.crop_pct)}")
    for field in ("name", "interpolation", "crop_mode"):
        if not isinstance(getattr(cfg, field), str):
            raise ConfigError(f"{field} must be a string; {_got(getattr(cfg, field))}")
    if cfg.hf_hub_id is not None and not isinstance(cfg.hf_hub_id, str):
        raise ConfigError(f"hf_hub_id must be a string or null; {_got(cfg.hf_hub_id)}")
    names = cfg.label_names
    if names is not None and not (isinstance(names, (tuple, list)) and all(isinstance(n, str) for n in names)):
        raise ConfigError(f"label_names must be a list of strings (one per class) or null; {_got(names)[:80]}")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Architecture and data settings of a timm `VisionTransformer`.

    Token layout (the sequence every block sees, length T = P + N):
    position 0 is the class token (when `class_token`), then the DeiT distillation token
    (when `distilled`), then `reg_tokens` register tokens, then the N = gh * gw patch
    tokens in row-major order. P = `num_prefix_tokens`.
    """

    name: str = ""
    # Architecture.
    img_size: tuple[int, int] = (224, 224)
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    head_dim: int | None = None  # None: embed_dim // num_heads
    mlp_dim: int = 3072
    qkv_bias: bool = True
    qk_norm: bool = False
    scale_attn_norm: bool = False  # LayerNorm on the attention output before `proj`
    scale_mlp_norm: bool = False  # LayerNorm between the MLP activation and `fc2`
    proj_bias: bool = True  # bias of attn.proj, mlp.fc1 and mlp.fc2
    patch_bias: bool = True  # timm drops it when pre_norm is on (CLIP)
    layer_scale: bool = False  # LayerScale gammas (timm `init_values`)
    class_token: bool = True
    reg_tokens: int = 0
    distilled: bool = False  # DeiT distillation token and `head_dist`
    no_embed_class: bool = False  # position embeddings cover the patch tokens only
    pos_embed: bool = True
    posemb: str = "learn"  # POSEMBS: stored ("learn") or big_vision's fixed "sincos2d" (no parameter)
    pre_norm: bool = False  # `norm_pre` after the embeddings (CLIP)
    final_norm: bool = True  # `norm` before pooling
    fc_norm: bool = False  # `fc_norm` after pooling (replaces `norm`)
    global_pool: str = "token"
    pool_include_prefix: bool = False
    head_input: str = "token"  # HEAD_INPUTS; "token_and_patch_mean": DINOv2's classifiers (transformers)
    act: str = "gelu"
    norm_eps: float = 1e-6
    num_classes: int = 1000
    # Data.
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    interpolation: str = "bicubic"
    crop_pct: float = 0.9
    crop_mode: str = "center"
    label_names: tuple[str, ...] | None = None
    hf_hub_id: str | None = None

    def __post_init__(self):
        # Checked before anything is derived or allocated: a config may come from a crafted file.
        check_fields(self)
        # timm takes img_size=224 for (224, 224), and JSON gives lists; a config is a static jit
        # argument, so every field must be hashable.
        size = (self.img_size, self.img_size) if _is_int(self.img_size) else self.img_size
        object.__setattr__(self, "img_size", (int(size[0]), int(size[1])))
        for key in ("mean", "std", "label_names"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, key, tuple(value))
        if self.global_pool == "token" and not self.class_token:
            raise ConfigError("global_pool='token' needs a class token")
        if self.distilled and (not self.class_token or self.global_pool != "token"):
            raise ConfigError("a distilled (DeiT) model reads the class and distillation tokens: "
                              "it needs class_token=True and global_pool='token'")
        if self.head_input != "token" and (not self.class_token or self.global_pool != "token" or self.distilled
                                           or self.fc_norm):
            raise ConfigError(f"head_input={self.head_input!r} reads the class token and the patch tokens after the "
                              "final norm: it needs class_token=True, global_pool='token', no distillation token and "
                              "no fc_norm")
        if self.label_names is not None and len(self.label_names) != self.num_classes:
            raise ConfigError(f"{len(self.label_names)} label names for {self.num_classes} classes")

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.embed_dim // self.num_heads

    @property
    def num_prefix_tokens(self) -> int:
        """P: class token + distillation token + register tokens."""
        return int(self.class_token) + int(self.distilled) + self.reg_tokens

    @property
    def grid_size(self) -> tuple[int, int]:
        """(gh, gw) of the training resolution, the grid of the stored position embeddings."""
        return self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size

    def patch_grid(self, height: int, width: int) -> tuple[int, int]:
        """(gh, gw) of the patch tokens of an input image `height` x `width`.

        Any multiple of the patch size (position embeddings are resampled to it). The config's own
        img_size is accepted even when it is not one (SigLIP so400m: 384 / 14): as timm's strided
        conv does, the last height % p rows and width % p columns are not seen. Other sizes raise
        ValueError, as timm does with dynamic_img_size.
        """
        p = self.patch_size
        if (height % p or width % p) and (height, width) != self.img_size:
            lower = (max(height // p, 1) * p, max(width // p, 1) * p)
            raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {p} (nor this "
                             f"model's img_size {self.img_size[0]}x{self.img_size[1]}): resize or crop to "
                             f"e.g. {lower[0]}x{lower[1]}")
        return height // p, width // p

    def grid_extent(self, height: int | None = None, width: int | None = None) -> tuple[float, float]:
        """The fraction of an input's height and width that its patch grid covers, from the top-left.

        (1.0, 1.0) for every patch multiple; for the config's own img_size when it is none, the
        pixels timm's strided conv sees (SigLIP so400m at 384 / 14: 378 / 384). Default: img_size.
        Pass it to `predmaps.upsample` / `predmaps.viz.overlay` so maps sit on the pixels they came from.
        """
        height, width = (self.img_size if height is None else (height, width if width is not None else height))
        gh, gw = self.patch_grid(height, width)
        return gh * self.patch_size / height, gw * self.patch_size / width

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid_size
        return gh * gw

    def class_name(self, index: int) -> str:
        if self.label_names is None:
            return str(int(index))
        return self.label_names[int(index)]

    def __repr__(self) -> str:
        # The fields that differ from the defaults; label names as their count and first few (a model's
        # repr, and so print(model), listed all 1000 ImageNet names).
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name != "name" and value == f.default:
                continue
            if f.name == "label_names":
                head = ", ".join(map(repr, value[:3]))
                parts.append(f"label_names=<{len(value)} names: {head}{', ...' if len(value) > 3 else ''}>")
            else:
                parts.append(f"{f.name}={value!r}")
        return f"ViTConfig({', '.join(parts)})"

    def replace(self, **changes) -> "ViTConfig":
        return dataclasses.replace(self, **changes)

    # JSON round trip: tuples become lists; the 1000 ImageNet names are stored by name.
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for field, default in (("head_input", "token"), ("posemb", "learn")):
            if d[field] == default:  # written only when set: older configs, their files and hashes stay as they were
                del d[field]
        if self.label_names is not None:
            from jaxvit import labels

            if tuple(self.label_names) == labels.imagenet_names():
                d["label_names"] = labels.IMAGENET_1K
            else:
                d["label_names"] = list(self.label_names)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ViTConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"a ViTConfig is a JSON object of fields; got a {type(d).__name__}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ConfigError(f"unknown ViTConfig fields {unknown}; is this file from a newer jaxvit?")
        d = dict(d)  # lists become tuples in __post_init__
        names = d.get("label_names")
        if isinstance(names, str):
            from jaxvit import labels

            try:
                d["label_names"] = labels.named_label_set(names)
            except KeyError as e:
                raise ConfigError(f"label_names: {e.args[0]}") from None
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "ViTConfig":
        return cls.from_dict(json.loads(text))


@functools.lru_cache(maxsize=1)
def _bundled_table() -> dict[str, Any]:
    text = resources.files("jaxvit").joinpath("data/timm_vit_configs.json").read_text()
    return json.loads(text)


def list_models() -> list[str]:
    """Every timm model name (architecture and architecture.tag) in the bundled table."""
    table = _bundled_table()
    return sorted(set(table["architectures"]) | set(table["pretrained"]))


def get_config(name: str, **overrides) -> ViTConfig:
    """Config of a timm model name, e.g. `vit_base_patch16_224.orig_in21k_ft_in1k`.

    Without a tag, the architecture's default tag (timm's first listed) supplies the data
    settings. `overrides` replace fields (e.g. `num_classes=10`, `img_size=(384, 384)`); a
    `num_classes` that differs from the tag's drops its label names unless `label_names` is given.
    Raises `UnknownModelError` (a KeyError) naming close matches when the name is unknown.
    """
    fields = {f.name for f in dataclasses.fields(ViTConfig)}
    for key in sorted(set(overrides) - fields):
        close = difflib.get_close_matches(key, sorted(fields), n=3)
        raise TypeError(f"get_config: {key!r} is not a ViTConfig field"
                        + (f" (did you mean {', '.join(map(repr, close))}?)" if close else ""))
    table = _bundled_table()
    arch, _, tag = name.partition(".")
    if arch not in table["architectures"]:
        raise unknown_model_error(name, "not a supported timm ViT in jaxvit's bundled table (install timm, "
                                        "pip install 'predmaps[torch]', to resolve any timm ViT)")
    arch_cfg = dict(table["architectures"][arch])
    if not tag:
        tag = arch_cfg.pop("default_tag", None) or ""
    else:
        arch_cfg.pop("default_tag", None)
    full = f"{arch}.{tag}" if tag else arch
    data_cfg = {}
    if tag:
        if full not in table["pretrained"]:
            tags = sorted(k.partition(".")[2] for k in table["pretrained"] if k.startswith(arch + "."))
            raise UnknownModelError(f"unknown pretrained tag {tag!r} for {arch}; known tags: {tags or 'none'}")
        data_cfg = dict(table["pretrained"][full])
    merged = {**arch_cfg, **data_cfg, "name": full, **overrides}
    if "num_classes" in overrides and "label_names" not in overrides:  # a new head: the tag's names do not apply
        names = merged.get("label_names")
        if isinstance(names, str):  # a named set, e.g. "imagenet-1k"
            from jaxvit import labels

            names = labels.named_label_set(names)
        if names is not None and len(names) != merged["num_classes"]:
            merged["label_names"] = None
    return ViTConfig.from_dict(merged)
