"""The on-disk format of `predmaps run` / `predmaps.pipeline.explain_dataset`, and its reader.

    res = predmaps.results.read_results("out/")          # every complete shard, in input order
    res.paths, res.pred, res.score, res.labels           # per image
    res.maps["predicatt/L12/top"]                        # (N, K, gh, gw) token maps
    res.map("predicatt", layer=-1, target="top")         # the same, chosen by parts
    read_results("out/", upsample=True)                  # maps at the model's input size
    for part in iter_results("out/"): ...                # one shard at a time: bounded memory

Layout of an output directory:

    manifest.json          the job (format, model identity, spec, inputs, shard plan) and the
                           shards process 0 completed; consolidated with every process's at the end
    manifest-p{P}.json     the same header and the shards process P > 0 completed (multi-host runs)
    shard-{J:06d}.npz      input positions [J*S, (J+1)*S): one complete, atomically renamed file
    errors.tsv             every input that could not be read: index, name, path, reason

File format: `.npz` shards, not HDF5. Every shard is written whole, once, then renamed into
place, so HDF5's strengths (chunked partial writes and reads inside one big growing file) buy
nothing here, while its costs are real: a native dependency, a file that a crash mid-write can
leave unreadable (the reason to shard and rename anyway), HDF5 file locking that fails on some
network file systems, and h5py's one global lock around every HDF5 call, several of which
(file close, object look-ups) also hold the GIL, stalling the decoding threads. An `.npz` is a
zip of `.npy` members: numpy alone reads it, lazily member by member, on any machine. A
shard's size is bounded (S images), so reading a whole member is cheap. Members are stored
uncompressed: token maps are dense floats that compress poorly, and writing stays fast.

A shard holds, for its n readable images, in input order:
    index (n,) int64 global input position; name, path (n,) str; label (n,) int32 (-1 unknown);
    pred (n,) int32 predicted class; score (n,) float32 its softmax probability;
    maps_{c} (n, K_c, gh, gw) float16/float32 and classes_{c} (n, K_c) int32 for each
    combination c of (method, layer, target) listed in the manifest's "combos".
A shard counts only when the manifest lists it and its size matches: a temporary file, or a
shard renamed into place just before a crash but never recorded, is never read.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import numbers
import os
import re
import zipfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from jaxvit import safe_write

FORMAT = "predmaps-run"
VERSION = 1
MANIFEST = "manifest.json"
ERRORS_FILE = "errors.tsv"
_PART_RE = re.compile(r"^manifest(?:-p(\d+))?\.json$")

__all__ = ["FORMAT", "JobMismatchError", "Results", "iter_results", "read_manifest", "read_results"]


class JobMismatchError(ValueError):
    """An output directory holds a different job (model, spec, inputs or shard size)."""


# --------------------------------------------------------------------------------------
# Atomic files
# --------------------------------------------------------------------------------------


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a new temporary file in the same directory, fsync, rename:
    readers see the old file or the whole new one, never a part; a symlink at `path` is replaced,
    never written through (`jaxvit.safe_write`)."""
    safe_write.write_bytes(path, data)


def remove_temporaries(out: Path) -> int:
    """Delete temporary files a killed job left behind (predmaps's own names only); returns how many."""
    return safe_write.remove_temporaries(out)


def shard_file(shard_id: int) -> str:
    return f"shard-{shard_id:06d}.npz"


def manifest_file(process_index: int) -> str:
    return MANIFEST if process_index == 0 else f"manifest-p{process_index}.json"


# --------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------

# The header fields that make two runs the same job; everything else may differ on resume.
IDENTITY_FIELDS = ("model", "spec", "inputs", "shard_size")


def describe_identity(header: dict) -> str:
    m, s, i = header.get("model", {}), header.get("spec", {}), header.get("inputs", {})
    return (f"model {m.get('name') or '?'} (config sha256 {str(m.get('config_sha256'))[:12]}, params "
            f"{m.get('params_fingerprint')}, dtype {m.get('dtype')}), methods {s.get('methods')} layers "
            f"{s.get('layers')} targets {s.get('targets')} maps {s.get('map_dtype')} options {s.get('options')}, "
            f"inputs {i.get('source')!r} ({i.get('count')} items, sha256 {str(i.get('sha256'))[:12]}), "
            f"shard size {header.get('shard_size')}")


def identity_differences(a: dict, b: dict) -> list[str]:
    """Which identity fields differ between two headers (field names, dotted)."""
    diffs = []
    for key in IDENTITY_FIELDS:
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            diffs += [f"{key}.{k}" for k in sorted(set(va) | set(vb)) if key != "inputs" or k != "source"
                      if va.get(k) != vb.get(k)]
        elif va != vb:
            diffs.append(key)
    return diffs


def check_same_job(existing: dict, wanted: dict, out: Path) -> None:
    diffs = identity_differences(existing, wanted)
    if diffs:
        hint = ""
        if all(d.startswith("inputs.") for d in diffs):  # the usual cause: inputs added, removed or renamed
            hint = ("\nThe inputs' listing (their names, or their labels) changed. A job's shards are fixed by its "
                    "listing: to redo inputs that failed, fix them in place (same names and labels) and rerun with "
                    "--retry-failed. Otherwise ")
        raise JobMismatchError(
            f"{out} already holds a different job ({', '.join(diffs)} differ):\n"
            f"  existing: {describe_identity(existing)}\n  this run: {describe_identity(wanted)}"
            + (hint or "\nResults of different jobs are never mixed: ")  # either way, then:
            + "choose another --out, or delete that directory.")


def _load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"unreadable manifest {path}: {e}") from e


_SHARD_FILE_RE = re.compile(r"^shard-\d{6}\.npz$")


def check_manifest_fields(data: Any, path: Path) -> None:
    """The types of the fields readers use, or a ValueError naming the file and the field: a crafted
    manifest gets a message, not a TypeError from deep inside; a shard "file" must be a shard name in
    the job folder itself ("../other/shard.npz" would read from outside it)."""
    def bad(field, want, value):
        raise ValueError(f"{path}: field {field} is {type(value).__name__} {str(value)[:60]!r}, not {want}: not a "
                         "manifest predmaps wrote (or a damaged one)")

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    if not isinstance(data, dict):
        bad("(top level)", "an object", data)
    for key, want, ok in (("version", "an integer", is_int), ("num_shards", "an integer", is_int),
                          ("shard_size", "an integer", is_int), ("combos", "a list", lambda v: isinstance(v, list)),
                          ("grid", "a list", lambda v: isinstance(v, list)),
                          ("image_size", "a list", lambda v: isinstance(v, list)),
                          ("model", "an object", lambda v: isinstance(v, dict)),
                          ("shards", "a list", lambda v: isinstance(v, list))):
        if data.get(key) is not None and not ok(data[key]):
            bad(key, want, data[key])
    for j, c in enumerate(data.get("combos") or []):
        if not isinstance(c, dict) or not is_int(c.get("id")) or not isinstance(c.get("key"), str) \
                or not is_int(c.get("k")):
            bad(f"combos[{j}]", "an object with integer id and k and a string key", c)
    for j, r in enumerate(data.get("shards") or []):
        if not isinstance(r, dict):
            bad(f"shards[{j}]", "an object", r)
        for key, want, ok in (("id", "an integer >= 0", lambda v: is_int(v) and v >= 0),
                              ("file", "a shard file name (shard-NNNNNN.npz, in the job folder itself)",
                               lambda v: isinstance(v, str) and bool(_SHARD_FILE_RE.match(v))),
                              ("bytes", "an integer", is_int), ("images", "an integer", is_int),
                              ("sha256", "a string", lambda v: isinstance(v, str)),
                              ("errors", "a list of [index, name, path, reason]",
                               lambda v: isinstance(v, list) and all(isinstance(e, list) and len(e) == 4 for e in v))):
            if key in r and not ok(r[key]):
                bad(f"shards[{j}].{key}", want, r[key])


def manifest_parts(out: Path) -> list[Path]:
    """Every manifest file of a job directory, sorted: manifest.json and each process's manifest-pP.json."""
    return sorted(p for p in out.iterdir() if _PART_RE.match(p.name))


def read_manifest(out: str | os.PathLike) -> dict:
    """The job header plus `shards`: {shard id: record} from every process's manifest, only
    records whose shard file exists with the recorded size (complete shards)."""
    out = Path(out)
    main = out / MANIFEST
    if not main.exists():
        raise FileNotFoundError(f"{out} holds no predmaps results: {MANIFEST} is missing")
    header = _load_json(main)
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"{main} is not a predmaps run manifest")
    check_manifest_fields(header, main)
    if header.get("version", 0) > VERSION:
        raise ValueError(f"{main} was written by a newer predmaps (format version {header['version']})")
    shards: dict[int, dict] = {}
    for part in manifest_parts(out):
        data = header if part == main else _load_json(part)
        if part != main:
            check_manifest_fields(data, part)
        if part != main and identity_differences(data, header):
            continue  # a stale part of another job: never mixed in
        for rec in data.get("shards", []):
            f = out / rec["file"]
            try:
                if f.stat().st_size != rec["bytes"]:
                    continue
            except OSError:
                continue
            # Several files may record one shard: a part of a process that a later run (with fewer
            # processes, or --retry-failed interrupted before its clean-up) did not rewrite still holds
            # the old record, whose size can match the new file. The newest record describes the file;
            # at equal times the first file's (a process's own part, written before manifest.json).
            sid = int(rec["id"])
            if sid not in shards or _written(rec) > _written(shards[sid]):
                shards[sid] = rec
    return dict(header, shards=shards)


def _written(rec: dict) -> float:
    """When a shard record was written (its `written` stamp, in seconds); -inf where it has none."""
    try:
        return datetime.datetime.strptime(rec["written"], "%Y-%m-%dT%H:%M:%S%z").timestamp()
    except (KeyError, TypeError, ValueError):
        return float("-inf")


def shard_names_digest(names: list[str], labels: list[int]) -> str:
    h = hashlib.sha256()
    for n, l in zip(names, labels):
        h.update(n.encode("utf-8", "surrogatepass") + b"\0" + str(int(l)).encode() + b"\n")
    return h.hexdigest()[:32]


def write_errors_file(out: Path, shards: dict[int, dict]) -> int:
    """errors.tsv from the error records of the given shards, in input order; returns the count."""
    rows = sorted((e for rec in shards.values() for e in rec.get("errors", [])), key=lambda e: e[0])

    def clean(s):
        s = str(s).replace("\t", " ").replace("\n", " ").replace("\r", " ")
        try:  # a file name's non-UTF-8 bytes (surrogate-escaped) as \xNN text: errors.tsv stays valid UTF-8
            return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:
            return s.encode("utf-8", "backslashreplace").decode("utf-8")

    text = "index\tname\tpath\treason\n" + "".join(
        f"{i}\t{clean(n)}\t{clean(p)}\t{clean(r)}\n" for i, n, p, r in rows)
    atomic_write(out / ERRORS_FILE, text.encode("utf-8"))
    return len(rows)


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


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


def _json_default(o: Any):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def dumps(data: dict) -> bytes:
    return json.dumps(data, indent=1, default=_json_default).encode("utf-8", "surrogateescape")
