"""Writing a job's results: shards and their records, the manifests read back (checked) before a
resume, which finished shards a resume may trust, and errors.tsv.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import time
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

from predmaps.data.decode import file_sha256
from predmaps.results import folder
from predmaps.results.manifest import (ERRORS_FILE, MANIFEST, PART_RE, check_manifest_fields, dumps, load_json,
                                       manifest_parts, shard_file)


def list_manifest_parts(out: Path) -> list[Path]:
    """Every manifest file of out (manifest.json and each process's manifest-pP.json)."""
    try:
        return manifest_parts(out)
    except OSError:
        return []


def read_manifest_file(path: Path, out: Path) -> dict:
    """One manifest file, checked, or an error that names it and says what to do. A damaged file
    is never skipped: it may be the only record of finished shards, and read_results refuses it."""
    try:
        data = load_json(path)
        shards = data.get("shards") if isinstance(data, dict) else None
        if not isinstance(shards, list) or not all(isinstance(r, dict) and {"id", "file", "bytes"} <= r.keys()
                                                   for r in shards):
            raise ValueError(f"unreadable manifest {path}: not a predmaps manifest (no list of shard records)")
        check_manifest_fields(data, path)
    except ValueError as e:
        main = out / MANIFEST
        if path == main:
            raise ValueError(f"{e}\nIf predmaps wrote it, it describes the job and records the shards process 0 "
                             "finished: restore it, or delete it and rerun the same command to start the job again "
                             "(every shard is recomputed). If predmaps did not write it, this is not a predmaps job: "
                             "choose another --out.") from None
        try:  # what deleting it would keep: the shards manifest.json lists (consolidated at a job's end)
            header = load_json(main)
            listed = sum((out / r["file"]).is_file() and (out / r["file"]).stat().st_size == r["bytes"]
                         for r in header.get("shards", []))
            total = header.get("num_shards")
            keeps = (f"{MANIFEST} lists all {total} shard(s) of the job: none is recomputed" if listed == total
                     else f"{MANIFEST} lists {listed} of the job's {total or '?'} shard(s): they are kept, "
                          "the others recomputed")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            keeps = f"the shards that {MANIFEST} lists are kept, the others recomputed"
        raise ValueError(f"{e}\nIt records the shards one process of a multi-process run finished, and results "
                         f"cannot be read without it: restore it, or delete it and rerun the same command "
                         f"({keeps}).") from None
    return data


def stale_reason(out: Path, rec: dict, sh, verify_inputs: bool) -> str | None:
    """Why a finished shard (`sh`: the pipeline's shard, its `first` and `items`) must not be skipped,
    or None. Its file's sha256 against the manifest (well under the device work a skip saves:
    bench/NOTES.md, "Resume checks"). Then each input's size and mtime (a stat) against those
    recorded when it was decoded, or, with verify_inputs where recorded, its content's sha256.
    Shards written before inputs were recorded are checked by their own sha256 only."""
    path = out / rec["file"]
    try:
        if file_sha256(path).hex() != rec.get("sha256"):
            return "its sha256 differs from the manifest's (damaged on disk)"
        with np.load(path, allow_pickle=False) as z:
            if "input_size" not in z.files:
                return None
            index, size, mtime = (z[k] for k in ("index", "input_size", "input_mtime_ns"))
            sha = z["input_sha256"] if verify_inputs and "input_sha256" in z.files else None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        return f"unreadable ({type(e).__name__}: {e})"
    by_content = sha is not None  # else (hashes not recorded: a run without --verify-inputs) by size and mtime
    for pos, n, t, digest in zip(index.tolist(), size.tolist(), mtime.tolist(), sha if by_content else size):
        j = pos - sh.first
        item = sh.items[j] if 0 <= j < len(sh.items) else None
        if item is None or not item.path:
            continue
        try:
            st = os.stat(item.path)
            if not stat.S_ISREG(st.st_mode):  # hashing a FIFO would wait forever
                return f"its input {item.name} is no longer a regular file"
            changed = (file_sha256(item.path) != digest.tobytes()) if by_content else \
                (st.st_size, st.st_mtime_ns) != (n, t)
        except OSError as e:
            return f"its input {item.name} cannot be read now ({e.strerror or e})"
        if changed:
            how = "content" if by_content else "size or modification time"
            return f"its input {item.name} changed since it was explained ({how})"
    return None


def drop_records(out: Path, sids: set[int], pidx: int, pcount: int, write: Callable[[Path, bytes], None]) -> None:
    """Remove the records of shards `sids` from this process's manifest file, and (process 0) from
    the files of processes this run does not have (an earlier run's): no writer races those."""
    for part in list_manifest_parts(out):
        m = PART_RE.match(part.name)
        index = int(m.group(1) or 0)
        if index != pidx and not (pidx == 0 and index >= pcount):
            continue
        data = load_json(part)
        keep = [r for r in data.get("shards", []) if int(r["id"]) not in sids]
        if len(keep) != len(data.get("shards", [])):
            write(part, dumps(dict(data, shards=keep)))


def drop_superseded_records(out: Path, everything: dict[int, dict], write: Callable[[Path, bytes], None]) -> None:
    """Remove, from other processes' manifest files, records of shards recomputed since (by another
    process count): readers take those files' records first, and a stale one of the same size
    would pass for the new shard."""
    for part in list_manifest_parts(out):
        if part.name == MANIFEST:
            continue
        data = load_json(part)
        keep = [r for r in data.get("shards", [])
                if int(r["id"]) not in everything or everything[int(r["id"])].get("sha256") == r.get("sha256")]
        if len(keep) != len(data.get("shards", [])):
            write(part, dumps(dict(data, shards=keep)))


def write_shard(out: Path, sid: int, first: int, count: int, digest: str, batches: list, combos: list, pidx: int,
                write: Callable[[Path, bytes], None] | None = None) -> dict:
    """Write shard `sid` from its `batches` (`pipeline.ResultBatch`es, in order) for `combos`
    (`pipeline.Combo`s); returns its manifest record. `write` defaults to `folder.atomic_write`."""
    def cat(get, dtype, shape=()):
        parts = [get(b) for b in batches]
        parts = [np.asarray(p) for p in parts if len(p)]
        return np.concatenate(parts) if parts else np.zeros((0, *shape), dtype)

    arrays = {"index": cat(lambda b: b.index, np.int64), "name": np.asarray(sum((b.names for b in batches), []), str),
              "path": np.asarray(sum((b.paths for b in batches), []), str), "label": cat(lambda b: b.labels, np.int32),
              "pred": cat(lambda b: b.pred, np.int32), "score": cat(lambda b: b.score, np.float32)}
    if arrays["name"].size == 0:
        arrays["name"] = arrays["path"] = np.zeros((0,), "<U1")
    for c in combos:
        first_b = batches[0]
        shape = first_b.maps[c.key].shape[1:]
        arrays[f"maps_{c.id}"] = cat(lambda b: b.maps[c.key], first_b.maps[c.key].dtype, shape)
        arrays[f"classes_{c.id}"] = cat(lambda b: b.classes[c.key], np.int32, (c.k,))
    idents = [x for b in batches for x in b.identities]
    if idents and all(x is not None for x in idents) and len(idents) == arrays["index"].size:
        # what resume compares before it skips this shard (`stale_reason`)
        arrays["input_size"] = np.asarray([x[0] for x in idents], np.int64)
        arrays["input_mtime_ns"] = np.asarray([x[1] for x in idents], np.int64)
        if all(x[2] is not None for x in idents):
            arrays["input_sha256"] = np.frombuffer(b"".join(x[2] for x in idents), np.uint8).reshape(-1, 32)
    bio = io.BytesIO()
    np.savez(bio, **arrays)
    data = bio.getvalue()
    name = shard_file(sid)
    (write or folder.atomic_write)(out / name, data)
    errors = [list(e) for b in batches for e in b.errors]
    return {"id": sid, "file": name, "first": first, "count": count, "images": int(arrays["index"].size),
            "errors": errors, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "names_sha256": digest, "process": pidx, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


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
    folder.atomic_write(out / ERRORS_FILE, text.encode("utf-8"))
    return len(rows)
