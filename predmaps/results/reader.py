"""Reading a job's results: `read_results` (every complete shard, in input order) and
`iter_results` (one shard at a time).
"""

from __future__ import annotations

import dataclasses
import hashlib
import numbers
import os
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np

from predmaps.results.manifest import read_manifest


@dataclasses.dataclass
class Results:
    """Explanations of the complete shards of a job (or of one shard, from `iter_results`).

    Attributes:
      index: (N,) int64 input position; names, paths: (N,) str; labels: (N,) int32 (-1: none).
      pred: (N,) int32 predicted class; score: (N,) float32 its softmax probability.
      maps: {combo key: (N, K, gh, gw)} e.g. "predicatt/L12/top"; upsampled when asked.
      classes: {combo key: (N, K) int32} the class of each map.
      combos: the manifest's combos, each {key, method, layer, target, k}.
      errors: [(index, name, path, reason)] of the inputs that could not be read (complete shards).
      complete: every shard of the job is present (`read_results`; the one-shard parts that
        `iter_results` yields say False).
      manifest: the job's header (model identity, spec, inputs, ...).
    """

    index: np.ndarray
    names: np.ndarray
    paths: np.ndarray
    labels: np.ndarray
    pred: np.ndarray
    score: np.ndarray
    maps: dict[str, np.ndarray]
    classes: dict[str, np.ndarray]
    combos: list[dict]
    errors: list[tuple]
    complete: bool
    manifest: dict

    def __len__(self) -> int:
        return len(self.index)

    def key(self, method: str | None = None, layer: int | None = None, target: str | None = None) -> str:
        """The combo key for (method, layer, target); None means 'the only one'. Negative layers
        count from the end, as in `explain`."""
        depth = self.manifest["model"].get("depth")
        index = layer
        if layer is not None and depth is not None:
            if not -(depth + 1) <= layer <= depth:  # a bare modulo would wrap -6 to a 4-block model's L
                raise KeyError(f"layer {layer} out of range: this model has layers 0..{depth} "
                               f"(or -{depth + 1}..-1 from the end)")
            index = layer % (depth + 1)
        hits = [c for c in self.combos if (method is None or c["method"] == method)
                and (index is None or c["layer"] == index) and (target is None or c["target"] == target)]
        if len(hits) != 1:
            raise KeyError(f"{len(hits)} maps match method={method!r} layer={layer!r} target={target!r}; "
                           f"this job has {[c['key'] for c in self.combos]}")
        return hits[0]["key"]

    def map(self, method: str | None = None, layer: int | None = None, target: str | None = None) -> np.ndarray:
        return self.maps[self.key(method, layer, target)]

    def crop_boxes(self, config=None) -> np.ndarray:
        """(N, 4) float64 (left, top, right, bottom) of each input's model view, in its own pixels: the
        centre crop of the model's eval transform (`jaxvit.preprocess.eval_crop_box`), read from
        `paths` (image headers only). `predmaps.viz.show(path, map, config)` draws a map there.
        config: the model's config; needed only for jobs written before the manifest recorded the
        transform."""
        from PIL import Image

        from jaxvit import preprocess

        settings = self.manifest.get("eval_transform")
        if config is not None:
            settings = preprocess.eval_settings(config)
        if settings is None:
            raise ValueError("this job's manifest predates the eval transform it records: pass the model's "
                             "config, crop_boxes(model.config)")
        boxes = np.zeros((len(self.paths), 4))
        for i, path in enumerate(self.paths):
            with Image.open(path) as img:  # reads the header: the size, not the pixels
                boxes[i] = preprocess.eval_crop_box((img.height, img.width), img_size=settings["img_size"],
                                                    crop_pct=settings["crop_pct"], crop_mode=settings["crop_mode"])
        return boxes


def _select_keys(combos: list[dict], keys) -> list[dict]:
    if keys is None:
        return combos
    keys = [keys] if isinstance(keys, str) else list(keys)
    known = {c["key"]: c for c in combos}
    missing = [k for k in keys if k not in known]
    if missing:
        raise KeyError(f"no maps {missing} in these results; they hold {list(known)}")
    return [known[k] for k in keys]


def _read_shard(out: Path, rec: dict, combos: list[dict], dtype, size, normalize: bool, verify: bool,
                extent=1.0) -> dict:
    path = out / rec["file"]
    if verify:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != rec["sha256"]:
            raise ValueError(f"{path}: sha256 {digest} differs from the manifest's {rec['sha256']}: corrupt shard. "
                             "Delete it and run the same job again: that redoes only the missing shards")
    try:
        with np.load(path, allow_pickle=False) as z:
            part = {k: z[k] for k in ("index", "name", "path", "label", "pred", "score")}
            maps = {c["key"]: z[f"maps_{c['id']}"] for c in combos}
            part["classes"] = {c["key"]: z[f"classes_{c['id']}"] for c in combos}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        # A damaged file of the right size passes the resume check (size only): name it and the fix.
        raise ValueError(f"{path}: unreadable shard ({type(e).__name__}: {e}). Delete it and run the same job "
                         "again: that redoes only the missing shards") from e
    part["maps"] = {}
    for c in combos:
        m = maps[c["key"]]
        if size is not None or normalize:
            from predmaps.explain import upsample as _upsample

            # as stored (float16 stays float16) unless a dtype is asked for
            m = np.asarray(_upsample(m, size or m.shape[-2:], normalize=normalize, extent=extent)).astype(m.dtype)
        part["maps"][c["key"]] = m.astype(dtype) if dtype is not None else m
    return part


def _assemble(parts: list[dict], combos: list[dict], errors: list, complete: bool, header: dict,
              size: tuple[int, int] | None) -> Results:
    def cat(key, dtype):
        return np.concatenate([p[key] for p in parts]) if parts else np.zeros((0,), dtype)

    def cat_dict(key, c, dtype):
        if parts:
            return np.concatenate([p[key][c["key"]] for p in parts])
        if key == "maps":
            return np.zeros((0, c["k"], *(size or header["grid"])), dtype)
        return np.zeros((0, c["k"]), dtype)

    return Results(index=cat("index", np.int64), names=cat("name", str), paths=cat("path", str),
                   labels=cat("label", np.int32), pred=cat("pred", np.int32), score=cat("score", np.float32),
                   maps={c["key"]: cat_dict("maps", c, np.float32) for c in combos},
                   classes={c["key"]: cat_dict("classes", c, np.int32) for c in combos},
                   combos=combos, errors=errors, complete=complete, manifest=header)


def _extent(header: dict) -> tuple[float, float]:
    # of the model's input: jobs written before the field was recorded cover it all
    return tuple(header.get("grid_extent") or (1.0, 1.0))


def _size(header: dict, upsample) -> tuple[int, int] | None:
    if upsample is None or upsample is False:
        return None
    if upsample is True:
        return tuple(header["image_size"])
    size = (upsample, upsample) if isinstance(upsample, numbers.Integral) else upsample
    try:
        ok = len(size) == 2 and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0
                                    for v in size)
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"upsample must be True (the model's input size), a size or (height, width) of positive "
                         f"integers; got {upsample!r}")
    return int(size[0]), int(size[1])


def iter_results(out: str | os.PathLike, *, keys=None, dtype=None, upsample=None, normalize: bool = False,
                 verify: bool = False) -> Iterator[Results]:
    """One `Results` per complete shard, in input order: memory bounded by one shard.
    Options as `read_results`."""
    out = Path(out)
    man = read_manifest(out)
    combos = _select_keys(man["combos"], keys)
    header = {k: v for k, v in man.items() if k != "shards"}
    size = _size(header, upsample)
    for sid in sorted(man["shards"]):
        rec = man["shards"][sid]
        part = _read_shard(out, rec, combos, dtype, size, normalize, verify, _extent(header))
        yield _assemble([part], combos, [tuple(e) for e in rec.get("errors", [])], False, header, size)


def read_results(out: str | os.PathLike, *, keys=None, dtype=None, upsample=None, normalize: bool = False,
                 verify: bool = False) -> Results:
    """Read the explanations a `predmaps run` wrote to `out`: every complete shard, in input order.

    keys: which maps to read (combo keys such as "predicatt/L12/top"; default all).
    dtype: convert maps to this dtype (default: as stored, float16 or float32).
    upsample: None (token maps, (gh, gw)), True (the model's input size) or (H, W): bilinear,
      equal to torch `interpolate(mode="bilinear", align_corners=False)` (`predmaps.upsample`),
      over the part of the input the token grid covers (all of it unless the model's input size is
      no patch multiple, as so400m's 384 / 14).
    normalize: min-max normalise each map to [0, 1] (after upsampling).
    verify: check each shard's sha256 against the manifest.

    Only shards the manifest lists are read (an interrupted job reads as the shards it
    finished; `Results.complete` says whether all are there). For jobs too large for memory,
    `iter_results` yields one shard at a time.
    """
    out = Path(out)
    man = read_manifest(out)
    combos = _select_keys(man["combos"], keys)
    header = {k: v for k, v in man.items() if k != "shards"}
    size = _size(header, upsample)
    parts, errors = [], []
    for sid in sorted(man["shards"]):
        rec = man["shards"][sid]
        parts.append(_read_shard(out, rec, combos, dtype, size, normalize, verify, _extent(header)))
        errors += [tuple(e) for e in rec.get("errors", [])]
    n_shards = header.get("num_shards")
    complete = n_shards is not None and len(man["shards"]) == n_shards
    return _assemble(parts, combos, errors, complete, header, size)
