"""Google's JAX ViT checkpoints (`.npz`) as timm-layout state dicts, strictly.

Two layouts, told apart by their keys:
  google-research/vision_transformer (ViT-B_16.npz, the AugReg family), optionally under `opt/target/`:
    embedding/kernel (p, p, C, D)          Transformer/posembed_input/pos_embedding (1, T, D)   cls (1, 1, D)
    Transformer/encoderblock_{i}/LayerNorm_0, MultiHeadDotProductAttention_1/{query,key,value,out},
        LayerNorm_2, MlpBlock_3/Dense_{0,1}
    Transformer/encoder_norm               head/kernel (D, C)
  big_vision (`params/` or, for a two-tower model's image tower, `params/img/`):
    the same, but pos_embedding at the top, MultiHeadDotProductAttention_0, LayerNorm_1 and MlpBlock_0
    in each block, and scanned blocks (`Transformer/encoderblock/...` with the depth as leading axis)
    where the model was trained with scan.
Attention kernels keep their heads ((D, H, dh)), so the file fixes every size; the head count comes
back with the state dict. What jaxvit lacks (a MAP attention-pool head, a `pre_logits` tanh
representation layer, a hybrid CNN stem) is refused by name; a two-tower file's other tower
(`params/txt/...`, the logit scale `t` and bias `b`) is set aside, not read.
"""

from __future__ import annotations

import os
import zipfile
from typing import Mapping

import numpy as np

from convert.errors import CheckpointMismatchError, UnsupportedModelError, key_mismatch
from convert.timm_vit import infer_config
from jaxvit.config import ViTConfig

# The big_vision "B/16" variant names: (width, depth, mlp_dim, heads), as big_vision's ViT defines them.
VARIANTS = {
    "Ti": (192, 12, 768, 3), "S": (384, 12, 1536, 6), "M": (512, 12, 2048, 8), "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16), "So400m": (1152, 27, 4304, 16), "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16), "G": (1664, 48, 8192, 16), "e": (1792, 56, 15360, 16),
}
_PREFIXES = ("opt/target/", "params/img/", "params/", "")


def _is_other_tower(key: str) -> bool:
    """A two-tower big_vision file's text tower, logit scale or bias: set aside, not read."""
    return key.startswith("params/txt/") or key in ("params/t", "params/b")


def is_npz(path: str | os.PathLike) -> bool:
    """Whether a file is a numpy .npz archive (a zip of .npy members), whatever its name."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except OSError:
        return False
    return bool(names) and all(n.endswith(".npy") for n in names)


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of an .npz file; object arrays (pickles) are refused, never unpickled."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise ValueError(f"{path} holds pickled objects, not arrays: a checkpoint is data, so it is refused") from None
        raise ValueError(f"cannot read {path} as an .npz archive: {e}") from None


# Arrays only a Google ViT has, under one of `_PREFIXES` (any one: an incomplete file is still named as one)
_MARKERS = ("embedding/kernel", "Transformer/encoder_norm/scale", "Transformer/encoderblock_0/LayerNorm_0/scale",
            "Transformer/encoderblock/LayerNorm_0/scale")


def _prefix(arrays: Mapping[str, np.ndarray]) -> str | None:
    return next((p for p in _PREFIXES if any(p + m in arrays for m in _MARKERS)), None)


def is_google_vit(arrays: Mapping[str, np.ndarray]) -> bool:
    return _prefix(arrays) is not None


def parse_variant(name: str) -> tuple[int, int, int, int, int] | None:
    """big_vision's "B/16" -> (width, depth, mlp_dim, heads, patch); None for any other name."""
    variant, sep, patch = name.partition("/")
    if not sep or variant not in VARIANTS or not patch.isdigit():
        return None
    return (*VARIANTS[variant], int(patch))


def to_timm(arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int, str]:
    """(timm state dict, head count, layout name) of a Google ViT .npz's arrays. A big_vision file without a
    position embedding is a posemb='sincos2d' model (fixed, not stored): `config_of` says so.

    Every array is consumed or refused: unexpected ones raise CheckpointMismatchError naming them,
    missing ones CheckpointMismatchError naming the .npz key."""
    prefix = _prefix(arrays)
    if prefix is None:
        raise UnsupportedModelError("this .npz is no Google ViT checkpoint: it has no embedding/kernel (keys "
                                    f"{sorted(arrays)[:5]}...)")
    big_vision = prefix.startswith("params/")
    w = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
    outside = sorted(k for k in arrays if not k.startswith(prefix) and not _is_other_tower(k))
    for part, what in (("MAPHead_0/", "a MAP attention-pool head (big_vision pool_type='map', SigLIP)"),
                       ("pre_logits/", "a pre_logits representation layer (dense + tanh before the head)"),
                       ("conv_root/", "a hybrid ResNet stem (R50+ViT)"), ("block1/", "a hybrid ResNet stem (R50+ViT)")):
        if any(k.startswith(part) for k in w):
            raise UnsupportedModelError(
                f"this Google ViT checkpoint has {what}, which jaxvit does not implement; supported: plain ViTs "
                "with a class-token or global-average-pool linear head, or no head")
    used: set[str] = set()

    def take(key: str, idx: int | None = None) -> np.ndarray:
        if key not in w:
            raise key_mismatch("Google ViT checkpoint does not match a plain ViT", missing=[prefix + key], noun="arrays")
        used.add(key)
        value = np.asarray(w[key])
        return value[idx] if idx is not None else value

    # Both codebases' flax modules always have the conv's and the attention's biases and the encoder norm; a class
    # token, a stored position embedding (big_vision) and a head are options. Optional or not, an array is only
    # looked for where its absence cannot be an option, so a missing one is named, not read as another model.
    sd: dict[str, np.ndarray] = {}
    kernel = take("embedding/kernel")
    sd["patch_embed.proj.weight"] = kernel.transpose(3, 2, 0, 1)
    sd["patch_embed.proj.bias"] = take("embedding/bias")
    pos = "pos_embedding" if "pos_embedding" in w else "Transformer/posembed_input/pos_embedding"
    if pos in w:
        sd["pos_embed"] = take(pos)
    elif not big_vision:  # the original layout always stores one: a file without it is incomplete
        take(pos)
    rows = sd["pos_embed"].shape[1] if "pos_embed" in sd else 0
    if "cls" in w or rows > 1 and not _square(rows) and _square(rows - 1):  # a square grid's rows + a class token's
        sd["cls_token"] = take("cls")
    sd["norm.weight"] = take("Transformer/encoder_norm/scale")
    sd["norm.bias"] = take("Transformer/encoder_norm/bias")
    if "head/kernel" in w or "head/bias" in w:
        sd["head.weight"] = take("head/kernel").T
        sd["head.bias"] = take("head/bias")

    stacked = [k for k in sorted(w) if k.startswith("Transformer/encoderblock/")]
    scanned = bool(stacked)
    if scanned:  # every stacked array has the depth as its leading axis
        depth = int(np.shape(w[stacked[0]])[0])
    else:
        depth = len({k.split("/")[1] for k in w if k.startswith("Transformer/encoderblock_")})
    first = "Transformer/encoderblock/" if scanned else "Transformer/encoderblock_0/"
    if any(k.startswith(first + m) for k in w for m in ("MultiHeadDotProductAttention_0/", "MlpBlock_0/",
                                                          "LayerNorm_1/")):  # big_vision's module names
        mha, mlp, ln2 = "MultiHeadDotProductAttention_0", "MlpBlock_0", "LayerNorm_1"
    else:
        mha, mlp, ln2 = "MultiHeadDotProductAttention_1", "MlpBlock_3", "LayerNorm_2"
    heads = 0
    for i in range(depth):
        src, idx = ("Transformer/encoderblock/", i) if scanned else (f"Transformer/encoderblock_{i}/", None)
        dst = f"blocks.{i}."
        for ln, name in (("LayerNorm_0", "norm1"), (ln2, "norm2")):
            sd[f"{dst}{name}.weight"] = take(f"{src}{ln}/scale", idx)
            sd[f"{dst}{name}.bias"] = take(f"{src}{ln}/bias", idx)
        q, k, v = (take(f"{src}{mha}/{n}/kernel", idx) for n in ("query", "key", "value"))
        if q.ndim != 3:
            raise CheckpointMismatchError(f"{prefix}{src}{mha}/query/kernel has shape {q.shape}; a Google ViT keeps "
                                          "its heads: (width, heads, head_dim)")
        heads = q.shape[1]
        sd[f"{dst}attn.qkv.weight"] = np.concatenate([t.reshape(t.shape[0], -1).T for t in (q, k, v)])
        sd[f"{dst}attn.qkv.bias"] = np.concatenate(
            [take(f"{src}{mha}/{n}/bias", idx).reshape(-1) for n in ("query", "key", "value")])
        out = take(f"{src}{mha}/out/kernel", idx)
        sd[f"{dst}attn.proj.weight"] = out.reshape(-1, out.shape[-1]).T
        sd[f"{dst}attn.proj.bias"] = take(f"{src}{mha}/out/bias", idx)
        for r in (0, 1):
            sd[f"{dst}mlp.fc{r + 1}.weight"] = take(f"{src}{mlp}/Dense_{r}/kernel", idx).T
            sd[f"{dst}mlp.fc{r + 1}.bias"] = take(f"{src}{mlp}/Dense_{r}/bias", idx)
    unexpected = [f"{prefix}{k}" for k in set(w) - used] + outside
    if unexpected:
        raise key_mismatch("Google ViT checkpoint does not match a plain ViT", unexpected=unexpected, noun="arrays",
                           advice="jaxvit reads plain ViTs (patch embedding, class token, position embedding, blocks, "
                                  "encoder_norm, head)")
    return {k: np.ascontiguousarray(v) for k, v in sd.items()}, heads, "big_vision" if big_vision else \
        "vision_transformer"


def _square(n: int) -> bool:
    return int(round(n ** 0.5)) ** 2 == n


def config_of(state_dict: Mapping[str, np.ndarray], heads: int, *, variant: str | None = None,
              num_heads: int | None = None) -> ViTConfig:
    """The config of `to_timm`'s state dict without a timm name: every size from the file, GELU in
    flax's default tanh form (as the JAX models compute it), timm's default data settings. `variant`,
    big_vision's "B/16", is checked against the file."""
    if num_heads is not None and num_heads != heads:
        raise ValueError(f"num_heads {num_heads!r} contradicts the checkpoint, whose attention kernels have {heads} "
                         "heads: leave num_heads out for a Google .npz")
    config = infer_config(state_dict, num_heads=heads).replace(act="gelu_tanh", name=variant or "")
    if "pos_embed" not in state_dict:  # big_vision's sincos2d: added to the patch tokens before the class token joins
        config = config.replace(pos_embed=True, posemb="sincos2d", no_embed_class=True)
    if variant is not None:
        width, depth, mlp_dim, want_heads, patch = parse_variant(variant)
        want = dict(embed_dim=width, depth=depth, mlp_dim=mlp_dim, num_heads=want_heads, patch_size=patch)
        wrong = {k: (getattr(config, k), v) for k, v in want.items() if getattr(config, k) != v}
        if wrong:
            raise CheckpointMismatchError(f"checkpoint does not match {variant}: " + ", ".join(
                f"{k} {got} in the file, {exp} expected" for k, (got, exp) in wrong.items()))
    return config
