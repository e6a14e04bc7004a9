"""Writing a job's output folder safely: owning and locking it, reading its manifests back before a
resume, writing shards and their records, and the errors that say what was kept.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import stat
import time
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

from jaxvit import safe_write
from predmaps import results as _results
from predmaps.pipeline.spec import Combo
from predmaps.data.decode import file_sha256
from predmaps.pipeline.stream import ResultBatch, _Shard


class OutputWriteError(OSError):
    """Writing a job's output failed (disk full, read-only, no permission). The message names the
    file and what to do; shards finished before stay recorded, so a rerun resumes after them."""

    def __init__(self, path: Path, error: OSError, out: Path, kept: int | None = None, action: str = "",
                 folder: Path | None = None):
        super().__init__(error.errno, error.strerror or str(error))
        self.filename, self.kept = str(path), kept or 0
        reason = error.strerror or str(error)
        action = action or (f"write to {path}" if path == out else f"write {path}")
        folder = folder or out
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            fix = new = "free some space (or raise the quota)"
        elif error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            fix, new = f"make {folder} writable", f"choose another --out, or make {folder} writable"
        elif error.errno in (errno.EEXIST, errno.ENOTDIR, errno.ENOENT) and not kept:  # not a directory
            fix = new = "choose another --out"
        else:
            fix = new = "fix that"
        if kept:  # the job resumes only in the same directory
            self.message = (f"cannot {action}: {reason}. {kept} finished shard(s) are kept in {out}: {fix} and "
                            "rerun the same command to resume")
        else:
            self.message = f"cannot {action}: {reason}: {new}, then rerun the same command"

    def __str__(self) -> str:
        return self.message


class JobInterrupted(KeyboardInterrupt):
    """A job stopped by Ctrl-C (a KeyboardInterrupt): says what it kept. Every shard finished
    before is recorded (shards and manifests are written atomically), so a rerun resumes."""

    def __init__(self, out: Path, kept: int, num_shards: int | None):
        self.out, self.kept, self.num_shards = str(out), kept, num_shards
        of = f" of {num_shards}" if num_shards is not None else ""
        if kept:
            text = f"interrupted: {kept}{of} shard(s) finished are kept in {out}; rerun the same command to resume"
        else:
            text = f"interrupted before any{of} shard(s) finished; rerun the same command to run the job"
        super().__init__(text)


def _atomic_write(path: Path, data: bytes, out: Path, kept: int | None = None) -> None:
    try:
        _results.atomic_write(path, data)
    except OSError as e:
        raise OutputWriteError(path, e, out, kept) from e


def _check_writable(out: Path) -> None:
    """Create and remove a temporary file in out: a read-only or foreign directory is an error
    before any work, not after the first shard (the name is one remove_temporaries matches)."""
    probe = out / safe_write.temp_name("write-probe")
    try:
        os.close(safe_write.create_new(probe))
    except OSError as e:
        raise OutputWriteError(out, e, out) from e
    try:
        probe.unlink()
    except OSError:
        pass


_LOCK_RE = re.compile(r"^\.run-p\d+\.lock$")


def _check_owned(out: Path, pidx: int) -> None:
    """A job writes only into a folder it owns: one holding a predmaps manifest (this job's, checked
    later), or one holding nothing but what predmaps makes before its manifest (lock files,
    temporaries). Anything else is a user's folder: refused, nothing in it touched."""
    try:
        names = [e.name for e in os.scandir(out)]
    except OSError as e:
        raise OutputWriteError(out, e, out, action=f"list {out}") from e
    parts = sorted(n for n in names if _results._PART_RE.match(n))  # any process's manifest marks a job
    for name in parts:
        _check_predmaps_manifest(out / name, out)
    if parts:
        return
    foreign = sorted(n for n in names if not (_LOCK_RE.match(n) or safe_write.is_own_temporary(n)))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise FileExistsError(f"{out} is not empty ({shown}) and holds no predmaps job: predmaps run writes only "
                              "into an empty folder or one holding its own job, so nothing of yours is overwritten. "
                              "Choose another --out (a new or empty folder)")


def _check_predmaps_manifest(path: Path, out: Path) -> None:
    """`path` (a manifest name in out) is a regular file that a predmaps job wrote, or an error that
    says it is not a predmaps job (and never advises deleting what may be a user's file)."""
    not_job = (f"{path} is not a predmaps job's manifest, so {out} is not a predmaps job folder; it is left as it "
               "is. Choose another --out (a new or empty folder)")
    if not path.is_file() or path.is_symlink():
        raise FileExistsError(f"{not_job} ({path.name} is {'a symlink' if path.is_symlink() else 'no regular file'})")
    if path.stat().st_size > 1 << 30:  # no job's manifest is that large: not read
        raise FileExistsError(not_job)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return  # unreadable: _read_manifest_file says it is damaged (predmaps writes it atomically: rare)
    if not isinstance(data, dict) or data.get("format") != _results.FORMAT:
        raise FileExistsError(not_job)


class OutputInUseError(OSError):
    """Another job (or another process of this one with the same index) is writing to the same
    output directory: two writers would remove each other's temporaries and overwrite each
    other's manifest records."""

    def __str__(self) -> str:
        return str(self.args[0])


class _OutputLock:
    """One process's advisory lock on a job directory: `out/.run-pP.lock`, flock-ed while the job
    runs. The kernel drops a flock when its process exits, however it exits, so a killed job
    leaves at most an unlocked file behind, never a stale lock. Release unlinks the file; a lock
    taken on a file unlinked meanwhile is retried on the new one, so two jobs never both hold one."""

    def __init__(self, out: Path, pidx: int):
        self.path, self.out, self.fd = out / f".run-p{pidx}.lock", out, None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # no flock (Windows): unguarded
            return
        while True:
            try:
                fd = safe_write.open_lock(self.path)  # a symlink there is refused, never followed
            except safe_write.UnsafePathError:
                raise
            except OSError as e:
                raise OutputWriteError(self.path, e, self.out) from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 300).decode("utf-8", "replace").strip() or "another process"
                os.close(fd)
                raise OutputInUseError(f"{self.out} is in use: another predmaps run is writing to it ({holder}). "
                                       "Wait for that job to end (rerun this command then to resume it), or choose "
                                       "another --out") from None
            except OSError as e:  # a file system without flock (some network / FUSE mounts)
                os.close(fd)
                import warnings

                warnings.warn(f"cannot lock {self.path} ({e.strerror or e}): nothing stops a second job from "
                              f"writing to {self.out} at the same time", RuntimeWarning, stacklevel=3)
                return
            try:
                current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)  # the holder released (and unlinked) it between our open and flock: again
        import socket

        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                 .encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink()  # while still locked: a waiter then sees it is gone and retries
        except OSError:
            pass
        os.close(self.fd)  # closing the descriptor releases the flock
        self.fd = None


def _manifest_parts(out: Path) -> list[Path]:
    """Every manifest file of out (manifest.json and each process's manifest-pP.json)."""
    try:
        return _results.manifest_parts(out)
    except OSError:
        return []


def _read_manifest_file(path: Path, out: Path) -> dict:
    """One manifest file, checked, or an error that names it and says what to do. A damaged file
    is never skipped: it may be the only record of finished shards, and read_results refuses it."""
    try:
        data = _results._load_json(path)
        shards = data.get("shards") if isinstance(data, dict) else None
        if not isinstance(shards, list) or not all(isinstance(r, dict) and {"id", "file", "bytes"} <= r.keys()
                                                   for r in shards):
            raise ValueError(f"unreadable manifest {path}: not a predmaps manifest (no list of shard records)")
        _results.check_manifest_fields(data, path)
    except ValueError as e:
        main = out / _results.MANIFEST
        if path == main:
            raise ValueError(f"{e}\nIf predmaps wrote it, it describes the job and records the shards process 0 "
                             "finished: restore it, or delete it and rerun the same command to start the job again "
                             "(every shard is recomputed). If predmaps did not write it, this is not a predmaps job: "
                             "choose another --out.") from None
        try:  # what deleting it would keep: the shards manifest.json lists (consolidated at a job's end)
            header = _results._load_json(main)
            listed = sum((out / r["file"]).is_file() and (out / r["file"]).stat().st_size == r["bytes"]
                         for r in header.get("shards", []))
            total = header.get("num_shards")
            keeps = (f"{_results.MANIFEST} lists all {total} shard(s) of the job: none is recomputed" if listed == total
                     else f"{_results.MANIFEST} lists {listed} of the job's {total or '?'} shard(s): they are kept, "
                          "the others recomputed")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            keeps = f"the shards that {_results.MANIFEST} lists are kept, the others recomputed"
        raise ValueError(f"{e}\nIt records the shards one process of a multi-process run finished, and results "
                         f"cannot be read without it: restore it, or delete it and rerun the same command "
                         f"({keeps}).") from None
    return data


def _stale_reason(out: Path, rec: dict, sh: _Shard, verify_inputs: bool) -> str | None:
    """Why a finished shard must not be skipped, or None. Its file's sha256 against the manifest (well
    under the device work a skip saves: bench/NOTES.md, "Resume checks"). Then each input's size and
    mtime (a stat) against those recorded when it was decoded, or, with verify_inputs where recorded,
    its content's sha256. Shards written before inputs were recorded are checked by their own sha256
    only."""
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


def _drop_records(out: Path, sids: set[int], pidx: int, pcount: int, write: Callable[[Path, bytes], None]) -> None:
    """Remove the records of shards `sids` from this process's manifest file, and (process 0) from
    the files of processes this run does not have (an earlier run's): no writer races those."""
    for part in _manifest_parts(out):
        m = _results._PART_RE.match(part.name)
        index = int(m.group(1) or 0)
        if index != pidx and not (pidx == 0 and index >= pcount):
            continue
        data = _results._load_json(part)
        keep = [r for r in data.get("shards", []) if int(r["id"]) not in sids]
        if len(keep) != len(data.get("shards", [])):
            write(part, _results.dumps(dict(data, shards=keep)))


def _drop_superseded_records(out: Path, everything: dict[int, dict], write: Callable[[Path, bytes], None]) -> None:
    """Remove, from other processes' manifest files, records of shards recomputed since (by another
    process count): readers take those files' records first, and a stale one of the same size
    would pass for the new shard."""
    for part in _manifest_parts(out):
        if part.name == _results.MANIFEST:
            continue
        data = _results._load_json(part)
        keep = [r for r in data.get("shards", [])
                if int(r["id"]) not in everything or everything[int(r["id"])].get("sha256") == r.get("sha256")]
        if len(keep) != len(data.get("shards", [])):
            write(part, _results.dumps(dict(data, shards=keep)))


def _write_shard(out: Path, sid: int, first: int, count: int, digest: str, batches: list[ResultBatch],
                 combos: list[Combo], pidx: int, write: Callable[[Path, bytes], None] = _results.atomic_write) -> dict:
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
        # what resume compares before it skips this shard (`_stale_reason`)
        arrays["input_size"] = np.asarray([x[0] for x in idents], np.int64)
        arrays["input_mtime_ns"] = np.asarray([x[1] for x in idents], np.int64)
        if all(x[2] is not None for x in idents):
            arrays["input_sha256"] = np.frombuffer(b"".join(x[2] for x in idents), np.uint8).reshape(-1, 32)
    bio = io.BytesIO()
    np.savez(bio, **arrays)
    data = bio.getvalue()
    name = _results.shard_file(sid)
    write(out / name, data)
    errors = [list(e) for b in batches for e in b.errors]
    return {"id": sid, "file": name, "first": first, "count": count, "images": int(arrays["index"].size),
            "errors": errors, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "names_sha256": digest, "process": pidx, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
