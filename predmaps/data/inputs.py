"""What to explain, as `Inputs` (`open_inputs`): a directory (recursive, image extensions only,
sorted); a glob (image extensions only, sorted); a text file of paths (one per line, relative to the file's folder,
optionally `<TAB>label`); one image; or, from Python, a sequence/iterable of paths, `Item`s, `(name,
image)` pairs or images (PIL / uint8 arrays). ImageNet layouts give labels: a class-folder tree
whose folders are WordNet ids (torchvision's ImageFolder layout of `val/`) through
`jaxvit.labels.wnid_to_index`, or flat files plus a label file (`labels=`, read by
`predmaps.data.labels.read_label_file`: every layout `predmaps eval` reads too).
"""

from __future__ import annotations

import dataclasses
import glob as _glob
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from predmaps.data.labels import WNID, check_label, lookup, parse_label, read_label_file


# torchvision's IMG_EXTENSIONS: what ImageFolder lists.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclasses.dataclass(frozen=True)
class Item:
    """One input. name: its stable identity (path relative to the input root, the list file's
    line, or a caller's name); source: a path (str) or an in-memory image; label: class or -1."""

    name: str
    source: Any
    label: int = -1

    @property
    def path(self) -> str:
        return self.source if isinstance(self.source, str) else ""


class Inputs:
    """An ordered, lazily listed collection of `Item`s. Iterating lists it again (path sources
    and sequences); a one-shot iterator can be iterated once (`reiterable` False)."""

    def __init__(self, make_iter: Callable[[], Iterator[Item]], source: str, *, labelled: str = "",
                 reiterable: bool = True):
        self._make = make_iter
        self.source = source
        self.labelled = labelled  # how labels were found ("" when none)
        self.reiterable = reiterable
        self._used = False

    def __iter__(self) -> Iterator[Item]:
        if not self.reiterable:
            if self._used:
                raise RuntimeError(f"inputs {self.source} are a one-shot iterator, already consumed")
            self._used = True
        return self._make()

    def __repr__(self) -> str:
        return f"Inputs({self.source!r}{', labelled by ' + self.labelled if self.labelled else ''})"


def _has_magic(s: str) -> bool:
    return any(c in s for c in "*?[")


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


class UnlistedFolder:
    """The source of a folder that could not be listed: an input error like an unreadable image's,
    so the job counts it (and --strict fails) instead of silently explaining fewer images."""

    def __init__(self, path: Path, error: OSError):
        # Its images, once listed, change the job's listing, which --retry-failed keeps fixed: say so here.
        self.reason = (f"cannot list the folder {path}: {error.strerror or error}; its images were not explained. "
                       "Once it can be listed they are inputs this job did not list, which --retry-failed cannot "
                       "add: run the job again into a new --out")


def _walk(root: Path, rel: str = "", seen: set | None = None) -> Iterator[tuple[str, Path | UnlistedFolder]]:
    """(relative posix name, path) of every image-extension file under root, sorted per
    directory, depth first; hidden entries skipped; directory symlinks followed once. A subfolder
    that cannot be listed comes as ("sub/", UnlistedFolder); the root itself raises."""
    seen = set() if seen is None else seen
    try:
        real = os.path.realpath(root)
        if real in seen:
            return
        seen.add(real)
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as e:
        if not rel:
            raise OSError(e.errno, f"cannot list the images folder {root}: {e.strerror or e}") from e
        yield rel, UnlistedFolder(root, e)
        return
    for e in entries:
        if e.name.startswith("."):
            continue
        name = f"{rel}{e.name}"
        try:
            is_dir = e.is_dir()
        except OSError:
            continue
        if is_dir:
            yield from _walk(Path(e.path), name + "/", seen)
        elif _is_image_name(e.name):
            yield name, Path(e.path)


def _class_folder_labels(root: Path) -> dict[str, int] | None:
    """{folder: class} when root is an ImageNet class-folder tree (every visible subfolder a
    WordNet id, no images at the top), else None."""
    try:
        entries = [e for e in os.scandir(root) if not e.name.startswith(".")]
    except OSError:
        return None
    dirs = [e.name for e in entries if e.is_dir()]
    if not dirs or not all(WNID.match(d) for d in dirs) or any(_is_image_name(e.name) for e in entries
                                                                if not e.is_dir()):
        return None
    from jaxvit import labels as _labels

    index = {w: i for i, w in enumerate(_labels.imagenet_wnids())}
    return {d: index.get(d, -1) for d in dirs}


def _check_list_file(path: Path) -> None:
    """A file without an image extension is read as a list of paths; refuse one that holds binary
    data (an image under another extension, e.g. .gif or .jpe) rather than explain its bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(8192)
    except OSError as e:
        raise OSError(e.errno, f"images {path}: cannot read it: {e.strerror or e}") from e
    if b"\0" in head:
        raise ValueError(f"images {path}: not an image with a known extension ({', '.join(IMAGE_EXTENSIONS)}) "
                         "nor a text list of image paths (it holds binary data): convert or rename it, or put "
                         "its path in a list file")


def open_inputs(images: Any, *, labels: str | os.PathLike | dict | None = None,
                num_classes: int | None = None) -> Inputs:
    """Resolve what to explain into `Inputs` (see the module docstring). `labels`: a label file,
    or a {name: class} dict, matched by name, base name or stem. num_classes: the model's class
    count, which every label a file gives (label file, list file) must fit (`labels.check_label`)."""
    if isinstance(images, Inputs):
        return images
    label_map = read_label_file(labels, num_classes) if isinstance(labels, (str, os.PathLike)) else labels
    how = "label file" if label_map else ""
    if isinstance(images, (str, os.PathLike)):
        s = os.fspath(images)
        p = Path(s)
        if p.is_dir():
            root = p.resolve()
            folders = None if label_map else _class_folder_labels(root)

            def walk_dir():
                for name, path in _walk(root):
                    label = folders.get(name.split("/", 1)[0], -1) if folders else lookup(label_map, name)
                    yield Item(name, path if isinstance(path, UnlistedFolder) else str(path), label)

            return Inputs(walk_dir, s, labelled="class folders (ImageNet WordNet ids)" if folders else how)
        if p.is_file():  # before the glob test: an existing "cat [1].png" is that file
            if _is_image_name(p.name):
                return Inputs(lambda: iter([Item(s, str(p.resolve()), lookup(label_map, s))]), s, labelled=how)
            _check_list_file(p)
            base = p.resolve().parent

            def walk_list():
                with open(p, encoding="utf-8", errors="surrogateescape") as f:
                    for line in f:
                        line = line.rstrip("\r\n")
                        if not line.strip() or line.lstrip().startswith("#"):
                            continue
                        name, _, lab = line.partition("\t")
                        label = parse_label(lab, str(p)) if lab.strip() else None
                        if lab.strip() and label is None:
                            raise ValueError(f"{p}: cannot read the label of line {line!r}")
                        if label is not None and num_classes is not None:
                            check_label(label, num_classes, f"{p}: line {line!r}")
                        name = name.strip()
                        yield Item(name, str(base / name), lookup(label_map, name) if label is None else label)

            return Inputs(walk_list, s, labelled=how or "list file")
        if _has_magic(s):
            def walk_glob():
                for m in sorted(_glob.glob(s, recursive=True)):
                    if _is_image_name(m) and os.path.isfile(m):  # as a folder lists: "dir/*" skips its notes.txt
                        yield Item(m, os.path.abspath(m), lookup(label_map, m))

            return Inputs(walk_glob, s, labelled=how)
        raise FileNotFoundError(f"images {s!r}: no such directory or file, and not a glob pattern")

    def to_item(i: int, x: Any) -> Item:
        if isinstance(x, Item):
            return x
        if isinstance(x, (str, os.PathLike)):
            x = os.fspath(x)
            return Item(x, os.path.abspath(x), lookup(label_map, x))
        if isinstance(x, tuple) and len(x) in (2, 3) and isinstance(x[0], str):
            return Item(x[0], x[1], int(x[2]) if len(x) == 3 else lookup(label_map, x[0]))
        return Item(f"#{i}", x, -1)

    if isinstance(images, np.ndarray):  # a stack of uint8 images (B, H, W[, C])
        images = list(images)
    if isinstance(images, Sequence) and not isinstance(images, (bytes, bytearray)):
        seq = images
        return Inputs(lambda: (to_item(i, x) for i, x in enumerate(seq)), f"<{len(seq)} inputs>", labelled=how)
    if isinstance(images, Iterable):
        it = iter(images)
        return Inputs(lambda: (to_item(i, x) for i, x in enumerate(it)), "<iterator>", labelled=how,
                      reiterable=False)
    raise TypeError(f"cannot read inputs from {type(images).__name__}")
