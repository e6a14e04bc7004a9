"""jaxvit's own checkpoint: a directory with `config.json` and `params.msgpack`.

msgpack (flax.serialization) rather than orbax: a converted ViT is one small pytree that is
read whole on every host, so one portable file with no extra dependency, no async machinery
and no directory-of-shards layout is the better fit. The config travels beside it as
readable JSON, so the pair is self-describing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import serialization

from jaxvit import fp8, safe_write
from jaxvit.config import ViTConfig
from jaxvit.model import ViT

CONFIG_FILE = "config.json"
PARAMS_FILE = "params.msgpack"
# What params.msgpack may hold: jaxvit writes float32; the others are what a converted tree may carry.
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(jnp.bfloat16), np.dtype(np.float16), np.dtype(np.float64))


def save(path: str | os.PathLike, config: ViTConfig, params: Mapping[str, Any]) -> Path:
    """Write `config.json` + `params.msgpack` into directory `path` (created); returns it.

    Each file is written to a temporary name and renamed, so a crash leaves no half file.
    Params that do not fit the config (or arguments in another order) are refused before writing.
    """
    check_params(config, params, "jaxvit.save(path, config, params)")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"jaxvit.save(path, config, params): path must be a directory path; got {type(path).__name__}")
    path = safe_write.make_dir(path)
    host = _to_numpy(params)
    for name, data in ((CONFIG_FILE, config.to_json().encode()), (PARAMS_FILE, serialization.msgpack_serialize(host))):
        safe_write.write_bytes(path / name, data)  # renamed into place: never through a planted symlink
    return path


def load(path: str | os.PathLike, *, dtype=jnp.float32, attention: str = "fused") -> tuple[ViT, dict]:
    """Read a checkpoint written by `save` (or `python -m convert`): returns (model, params).

    `path` is the directory, or its `params.msgpack` / `config.json`. `dtype` is the compute
    dtype of the returned module; params are returned as stored (float32 numpy arrays).
    """
    path = Path(path)
    if path.is_file():
        path = path.parent
    cfg_file, params_file = path / CONFIG_FILE, path / PARAMS_FILE
    missing = [str(f) for f in (cfg_file, params_file) if not f.exists()]
    if missing:
        raise FileNotFoundError(
            f"not a jaxvit checkpoint: missing {', '.join(missing)}. Write one with "
            "`python -m convert SOURCE --out DIR`, or load timm weights directly with `convert.load(SOURCE)`.")
    redo = f"re-create the checkpoint with `python -m convert SOURCE --out {path}`"
    try:
        stored = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_file} is damaged (not valid JSON: {e}): {redo}") from None
    if is_timm_config(stored):
        # A timm export (`python -m convert --to-timm`) written over, or into, a jaxvit checkpoint.
        raise ValueError(f"{cfg_file} is timm's config.json of a timm export, not a jaxvit config: load the folder "
                         f"with convert.load({str(path)!r}), or {redo}")
    if not isinstance(stored, dict):
        raise ValueError(f"{cfg_file} holds a JSON {type(stored).__name__}, not a jaxvit config: {redo}")
    try:
        config = ViTConfig.from_dict(stored)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg_file}: {e}") from None
    import msgpack

    try:
        params = serialization.msgpack_restore(params_file.read_bytes())
    except (ValueError, TypeError, msgpack.UnpackException) as e:  # truncated or foreign bytes, a bad dtype name
        raise ValueError(f"{params_file} is damaged ({e}; e.g. an interrupted copy): {redo}") from None
    if not isinstance(params, Mapping):
        raise ValueError(f"{params_file} holds a {type(params).__name__}, not jaxvit params: {redo}")
    _check_dtypes(params, params_file, redo)
    _check_shapes(config, params, f"params in {params_file}")
    return ViT(config, dtype=dtype, attention=attention), params


def is_timm_config(stored: Any) -> bool:
    """Whether a parsed config.json is timm's (a hub repo's, or `convert.save_timm`'s) rather than jaxvit's."""
    # Keys of timm's layout that no ViTConfig has (num_classes and global_pool are in both).
    return isinstance(stored, Mapping) and bool({"architecture", "pretrained_cfg"} & set(stored))


def param_shapes(config: ViTConfig) -> dict:
    """The params pytree of `config` as ShapeDtypeStructs, without allocating anything."""
    import jax

    model = ViT(config)
    images = jax.ShapeDtypeStruct((1, config.img_size[0], config.img_size[1], config.in_chans), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)["params"]


def check_params(config: ViTConfig, params: Any, call: str) -> None:
    """Refuse, before anything is written, what `call` (e.g. "jaxvit.save(path, config, params)")
    cannot save: a config that is no ViTConfig, params that are no pytree of arrays (arguments in
    another order: jaxvit.save and convert.save_timm differ), params of another config."""
    if not isinstance(config, ViTConfig):
        raise TypeError(f"{call}: config must be a jaxvit.ViTConfig; got {type(config).__name__} (check the "
                        "argument order)")
    if not isinstance(params, Mapping):  # a dict, or flax's FrozenDict
        raise TypeError(f"{call}: params must be the params pytree (a dict of arrays); got {type(params).__name__} "
                        "(check the argument order)")
    _check_shapes(config, params, f"{call}: params")


def _check_dtypes(params: Mapping, params_file: Path, redo: str) -> None:
    """Refuse leaves that are no floating-point array (strings, objects, integers, scalars): params are numbers."""
    import jax

    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        dtype = getattr(leaf, "dtype", None)
        if not isinstance(leaf, np.ndarray) or dtype not in FLOAT_DTYPES:
            what = f"an array of dtype {dtype}" if isinstance(leaf, np.ndarray) else f"a {type(leaf).__name__}"
            raise ValueError(f"{params_file} holds {what} at {jax.tree_util.keystr(path)}: jaxvit params are "
                             f"floating-point arrays ({', '.join(map(str, FLOAT_DTYPES))}); {redo}")


def _check_shapes(config: ViTConfig, params: dict, what: str) -> None:
    import jax

    want = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_flatten_with_path(param_shapes(config))[0]}
    have = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    problems = [f"missing {k}" for k in sorted(set(want) - set(have))]
    problems += [f"unexpected {k}" for k in sorted(set(have) - set(want))]
    problems += [f"{k}: shape {have[k]} != expected {want[k]}" for k in sorted(set(want) & set(have))
                 if tuple(have[k]) != tuple(want[k])]
    if problems:
        fp8_leaves = tuple(f"[{k!r}]" for k in (fp8.KERNEL_E4M3, fp8.KERNEL_SCALE, fp8.INPUT_SCALE))
        hint = (". The e4m3 weights and input scales of jaxvit.fp8.prequantize / calibrate are not saved: save the "
                "params from before them, and prequantize / calibrate again after loading"
                if any(k.endswith(fp8_leaves) for k in set(have) - set(want)) else "")
        raise ValueError(f"{what} do not match the config {config.name!r}: " + "; ".join(problems[:20]) + hint)


def _to_numpy(tree):
    import jax

    from flax.core import unfreeze

    return jax.tree_util.tree_map(lambda a: np.asarray(a), unfreeze(tree))  # msgpack packs no FrozenDict
