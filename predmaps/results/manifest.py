"""A job folder's names and manifests: the job header, its identity, and the records of the shards
every process finished (`read_manifest`). The layout: the package docstring.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np


FORMAT = "predmaps-run"
VERSION = 1
MANIFEST = "manifest.json"
ERRORS_FILE = "errors.tsv"
PART_RE = re.compile(r"^manifest(?:-p(\d+))?\.json$")


class JobMismatchError(ValueError):
    """An output directory holds a different job (model, spec, inputs or shard size)."""


def shard_file(shard_id: int) -> str:
    return f"shard-{shard_id:06d}.npz"


def manifest_file(process_index: int) -> str:
    return MANIFEST if process_index == 0 else f"manifest-p{process_index}.json"


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


def load_json(path: Path) -> dict:
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
    return sorted(p for p in out.iterdir() if PART_RE.match(p.name))


def read_manifest(out: str | os.PathLike) -> dict:
    """The job header plus `shards`: {shard id: record} from every process's manifest, only
    records whose shard file exists with the recorded size (complete shards)."""
    out = Path(out)
    main = out / MANIFEST
    if not main.exists():
        raise FileNotFoundError(f"{out} holds no predmaps results: {MANIFEST} is missing")
    header = load_json(main)
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"{main} is not a predmaps run manifest")
    check_manifest_fields(header, main)
    if header.get("version", 0) > VERSION:
        raise ValueError(f"{main} was written by a newer predmaps (format version {header['version']})")
    shards: dict[int, dict] = {}
    for part in manifest_parts(out):
        data = header if part == main else load_json(part)
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
