"""A job's output folder, kept safe: predmaps writes only into a folder it owns, one job at a time
(the output lock), and says what it kept when a write fails or the job is interrupted.
"""

from __future__ import annotations

import errno
import json
import os
import re
import time
from pathlib import Path

from jaxvit import safe_write
from predmaps.results.manifest import FORMAT, PART_RE


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


def write_file(path: Path, data: bytes, out: Path, kept: int | None = None) -> None:
    try:
        atomic_write(path, data)
    except OSError as e:
        raise OutputWriteError(path, e, out, kept) from e


def check_writable(out: Path) -> None:
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


def check_owned(out: Path, pidx: int) -> None:
    """A job writes only into a folder it owns: one holding a predmaps manifest (this job's, checked
    later), or one holding nothing but what predmaps makes before its manifest (lock files,
    temporaries). Anything else is a user's folder: refused, nothing in it touched."""
    try:
        names = [e.name for e in os.scandir(out)]
    except OSError as e:
        raise OutputWriteError(out, e, out, action=f"list {out}") from e
    parts = sorted(n for n in names if PART_RE.match(n))  # any process's manifest marks a job
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
        return  # unreadable: read_manifest_file says it is damaged (predmaps writes it atomically: rare)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise FileExistsError(not_job)


class OutputInUseError(OSError):
    """Another job (or another process of this one with the same index) is writing to the same
    output directory: two writers would remove each other's temporaries and overwrite each
    other's manifest records."""

    def __str__(self) -> str:
        return str(self.args[0])


class OutputLock:
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


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a new temporary file in the same directory, fsync, rename:
    readers see the old file or the whole new one, never a part; a symlink at `path` is replaced,
    never written through (`jaxvit.safe_write`)."""
    safe_write.write_bytes(path, data)


def remove_temporaries(out: Path) -> int:
    """Delete temporary files a killed job left behind (predmaps's own names only); returns how many."""
    return safe_write.remove_temporaries(out)
