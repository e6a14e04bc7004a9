"""Every file the project writes goes through here: nothing is written through a symlink.

A planted symlink in an output folder (`out/config.json -> ~/.bashrc`) must not make a writer
truncate its target, and a dangling one must not create a file outside the folder. So:

- `write_bytes` / `write_text`: a new temporary file (O_CREAT|O_EXCL|O_NOFOLLOW: never an existing
  path, never through a link) in the same folder, fsync, `os.replace` onto the name. A rename
  replaces a symlink itself, never its target; readers see the old file or the whole new one.
- `open_lock`: a lock file opened O_NOFOLLOW; a symlink (or anything but a regular file) there is
  an error, never followed.
- `make_dir(own=True)`: a sub-folder the project names itself, created or an existing real
  folder; a symlink in its place is refused (writing into it would write wherever it points).
- Temporary names all start with `TEMP_PREFIX`; `remove_temporaries` deletes only those (and
  the exact names older versions made), never another program's `.*.tmp-*`.

`read_regular`: a small file read with a size cap, regular files only (label files).

Lowest layer on purpose: jaxvit.save, convert's --to-timm export and predmaps all use it.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import uuid
from pathlib import Path

TEMP_PREFIX = ".predmaps-tmp-"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
# Temporaries of earlier versions (".shard-000001.npz.tmp-PID-HEX"): still removed, by their exact shape only.
_OLD_TEMP = re.compile(r"^\.(shard-\d{6}\.npz|manifest(-p\d+)?\.json|errors\.tsv|write-probe)\.tmp-\d+-[0-9a-f]{8}$")


class UnsafePathError(OSError):
    """A path the project would write holds something it must not write through (a symlink, a
    device, a FIFO). The message names the path and what to do."""

    def __str__(self) -> str:
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


def temp_name(name: str) -> str:
    """The temporary name for `name`: the project's exact prefix, unique per process and call."""
    return f"{TEMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}-{name}"[:255]


def create_new(path: str | os.PathLike, mode: int = 0o666) -> int:
    """A descriptor of a file created now (fails if anything, a symlink included, is at `path`)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0), mode)


def _fsync_dir(folder: Path) -> None:
    try:  # make the rename itself durable
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def write_bytes(path: str | os.PathLike, data: bytes, *, durable: bool = True) -> None:
    """Write `data` to `path` through a new temporary file in the same folder, then rename onto it.
    A symlink at `path` is replaced by the file, its target left untouched; a folder there is an error."""
    path = Path(path)
    tmp = path.with_name(temp_name(path.name))
    fd = create_new(tmp)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if durable:
        _fsync_dir(path.parent)


def write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8", errors: str = "strict",
               *, durable: bool = False) -> None:
    write_bytes(path, text.encode(encoding, errors), durable=durable)


def make_dir(path: str | os.PathLike, *, own: bool = False) -> Path:
    """`path` as a folder, created (its parents too) when missing. own=True for a sub-folder the
    project names itself (report/, scenes/): a symlink in its place is refused, since writing into it
    would write wherever it points; a folder the user named may be a symlink to a folder."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=False)
        return path
    except FileExistsError:
        pass
    if own and os.path.islink(path):
        raise UnsafePathError(f"{path} is a symlink (to {os.readlink(path)}), not a folder predmaps made: writing "
                              "into it would write where it points. Remove it, or choose another output folder")
    if not path.is_dir():
        raise UnsafePathError(f"{path} is a file, not a folder: choose another output folder")
    return path


def open_lock(path: str | os.PathLike) -> int:
    """A read-write descriptor of the lock file at `path` (created when missing), never through a
    symlink: a symlink, dangling or not, or anything but a regular file there raises UnsafePathError."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP or (os.path.islink(path)):
            raise UnsafePathError(f"{path} is a symlink, not the lock file predmaps makes: it is never followed. "
                                  "Remove it, or choose another output folder") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafePathError(f"{path} is not a regular file (a FIFO, socket or device), not the lock file predmaps "
                              "makes: remove it, or choose another output folder")
    return fd


def is_own_temporary(name: str) -> bool:
    """Whether a file name is a temporary this project made (its exact prefix, or an older version's exact shape)."""
    return name.startswith(TEMP_PREFIX) or bool(_OLD_TEMP.match(name))


def remove_temporaries(folder: str | os.PathLike) -> int:
    """Delete the temporaries a killed writer left in `folder` (only this project's names); returns how many."""
    n = 0
    with os.scandir(folder) as entries:
        for e in entries:
            if is_own_temporary(e.name) and not e.is_dir(follow_symlinks=False):
                try:
                    os.unlink(e.path)  # a symlink of that name: the link goes, its target stays
                    n += 1
                except FileNotFoundError:
                    pass
    return n


def read_regular(path: str | os.PathLike, limit: int, what: str) -> bytes:
    """The bytes of a regular file of at most `limit` bytes; ValueError naming it otherwise. A FIFO
    would wait forever for a writer and /dev/zero never ends: both are refused before any read."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise OSError(e.errno, f"{what} {path}: cannot read it: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{what} {path} is not a regular file (a FIFO, device or socket): give a text file")
        if st.st_size > limit:
            raise ValueError(f"{what} {path} is {st.st_size:,} bytes, over the {limit:,} a {what} may hold: "
                             "is it the right file?")
        data = f.read(limit + 1)
    if len(data) > limit:  # grew while read
        raise ValueError(f"{what} {path} is over the {limit:,} bytes a {what} may hold: is it the right file?")
    return data
