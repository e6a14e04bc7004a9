"""ImageNet validation images for `predmaps eval`: listing, labels, subsets, batches.

Layouts (labels always in ImageNet-1k synset order: the rank of the WordNet id among the 1000
sorted ids, as timm and torchvision number the classes):

1. class-folder tree, as torchvision's ImageFolder: ROOT/<wnid>/<image>, e.g.
   val/n01440764/ILSVRC2012_val_00000293.JPEG. Folders and files are taken in sorted order.
   With class_order="sorted", folder names may be anything and the label is the folder's rank
   among the sorted folders (ImageFolder's own numbering).
2. flat files plus a label file: ROOT/<image> and a label file given with `labels_file`, or
   found in ROOT or its parent under one of `LABEL_FILE_NAMES`, in any layout
   `predmaps.data.labels.read_label_file` reads (the reader `predmaps run --labels` uses too).
3. flat files named "<wnid>_<anything>.<ext>" (ImageNet's train naming), no label file.

A ROOT holding a single `val/` folder is entered. Only files with an image extension count
(torchvision's IMAGE_EXTENSIONS, any case).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from predmaps.data.decode import prefetch_batches, stack_padded
from predmaps.data.inputs import IMAGE_EXTENSIONS
from predmaps.data.labels import DataLayoutError, LabelFile, lookup, out_of_range, parse_label_file, wnid_index

LABEL_FILE_NAMES = ("val_labels.txt", "labels.txt", "val.txt", "LOC_val_solution.csv",
                    "ILSVRC2012_validation_ground_truth.txt")
_WNID_PREFIX = re.compile(r"n\d{8}")

IMAGENET_LAYOUTS = (
    "expected ImageNet validation images in one of these layouts:\n"
    "  1. class folders (torchvision ImageFolder): ROOT/<wnid>/<image>.JPEG, e.g. ROOT/n01440764/...;\n"
    "  2. flat files ROOT/<image>.JPEG plus a label file (--labels FILE, or ROOT or its parent holding one of "
    f"{', '.join(LABEL_FILE_NAMES)}): lines '<file> <wnid or class index>', Kaggle's LOC_val_solution.csv, "
    "or the devkit's ILSVRC2012_validation_ground_truth.txt with meta.mat beside it;\n"
    "  3. flat files named <wnid>_<anything>.JPEG.\n"
    "Labels are numbered in ImageNet-1k synset order (sorted wnids).")


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS


@dataclasses.dataclass(frozen=True)
class ImageList:
    """Image files with their class indices (ImageNet-1k synset order unless `class_order`)."""

    paths: tuple[Path, ...]
    labels: np.ndarray  # (n,) int32
    layout: str
    root: Path
    class_order: str = "imagenet"
    label_source: LabelFile | None = dataclasses.field(default=None, repr=False)  # when a label file gave the labels

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def label_file(self) -> Path | None:
        """Where the labels came from, when a label file gave them."""
        return None if self.label_source is None else self.label_source.path

    def check_classes(self, num_classes: int) -> None:
        """Raise unless every label is a class of a `num_classes`-class model, with the message
        `predmaps run` gives for the same data: a label file is checked whole, line by line, as
        `read_label_file` checks it (`labels.check_label`; from the lines read when listing, not read again);
        other layouts name their first bad images (`labels.out_of_range`)."""
        if self.label_source is not None:
            self.label_source.table(num_classes)  # every line, as run checks it
            return
        bad = (self.labels < 0) | (self.labels >= num_classes)
        if bad.any():
            raise out_of_range([(_relative(self.paths[i], self.root), int(self.labels[i]))
                                for i in np.flatnonzero(bad)[:5]], num_classes)

    def subset(self, limit: int | None, *, mode: str = "random", seed: int = 0) -> "ImageList":
        """The first `limit` images ("first"), or `limit` images drawn without replacement by
        numpy's default_rng(seed) and kept in listing order ("random"). Deterministic given the
        listing, `limit` and `seed`. None or limit >= len keeps everything."""
        idx = subset_indices(len(self), limit, mode=mode, seed=seed)
        return dataclasses.replace(self, paths=tuple(self.paths[i] for i in idx), labels=self.labels[idx])


def subset_indices(n: int, limit: int | None, *, mode: str = "random", seed: int = 0) -> np.ndarray:
    """Indices of a deterministic subset, in increasing order (see `ImageList.subset`)."""
    if mode not in ("random", "first"):
        raise ValueError(f"subset mode must be 'random' or 'first'; got {mode!r}")
    if limit is None or limit >= n:
        return np.arange(n)
    if limit < 1:
        raise ValueError(f"limit must be positive; got {limit}")
    if mode == "first":
        return np.arange(limit)
    return np.sort(np.random.default_rng(seed).permutation(n)[:limit])


def imagenet_val(path, *, labels_file=None, class_order: str = "imagenet", limit: int | None = None,
                 subset: str = "random", seed: int = 0, num_classes: int | None = None) -> ImageList:
    """List ImageNet validation images and labels from `path` (see the module docstring). `labels_file`: a
    path, or a `LabelFile` already read (`parse_label_file`: then it is not read again).

    Raises `DataLayoutError` naming the expected layouts when `path` is missing, empty or
    malformed. `num_classes`: the model's class count, every label checked against it as
    `predmaps run` checks it (`ImageList.check_classes`); None: only that none is negative
    (`perturbation_test` checks the list against its model).
    """
    if class_order not in ("imagenet", "sorted"):
        raise ValueError(f"class_order must be 'imagenet' or 'sorted'; got {class_order!r}")
    root = imagenet_root(path)
    entries = sorted(root.iterdir())
    dirs = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
    files = [p for p in entries if _is_image(p)]
    if not files and [d.name for d in dirs] in (["val"], ["validation"]) and labels_file is None:
        return imagenet_val(dirs[0], class_order=class_order, limit=limit, subset=subset, seed=seed,
                            num_classes=num_classes)
    source = None
    if labels_file is not None:
        source = labels_file if isinstance(labels_file, LabelFile) else parse_label_file(labels_file)
        items = _flat_with_label_file(root, files, source, num_classes)
        layout = f"flat files + label file {source.path.name}"
    elif dirs and not files:
        items, layout = _image_folder(root, dirs, class_order), "class folders"
    elif files:
        found = _find_label_file(root)
        if found is not None:
            source = parse_label_file(found)
            items = _flat_with_label_file(root, files, source, num_classes)
            layout = f"flat files + label file {found.name}"
        else:
            items, layout = _flat_wnid_named(root, files), "flat files named <wnid>_*"
    else:
        raise DataLayoutError(f"{root} holds no images; {IMAGENET_LAYOUTS}")
    if not items:
        raise DataLayoutError(f"{root}: no labelled images found; {IMAGENET_LAYOUTS}")
    paths, labels = zip(*items)
    out = ImageList(tuple(paths), np.asarray(labels, np.int32), layout, root,
                    class_order if layout == "class folders" else "imagenet", source)
    if num_classes is not None and source is None:  # a label file's lines were checked as it was read
        out.check_classes(num_classes)
    return out.subset(limit, mode=subset, seed=seed)


def _relative(path: Path, root: Path) -> str:
    """An image's name as `predmaps run` lists it: its path under the data root, '/'-separated."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def imagenet_root(path) -> Path:
    """`path` as a folder `imagenet_val` can list, or the `DataLayoutError` it would raise."""
    root = Path(path)
    if not root.exists():
        raise DataLayoutError(f"{root}: no such file or directory; {IMAGENET_LAYOUTS}")
    if not root.is_dir():
        raise DataLayoutError(f"{root} is a file, not a directory; {IMAGENET_LAYOUTS}")
    return root


def _image_folder(root: Path, dirs: list[Path], class_order: str) -> list[tuple[Path, int]]:
    if class_order == "imagenet":
        index = wnid_index()
        bad = [d.name for d in dirs if d.name not in index]
        if bad:
            raise DataLayoutError(
                f"{root}: class folders must be named by ImageNet-1k WordNet ids (n01440764, ...); these are not: "
                f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''} (use class_order='sorted' / "
                f"--class-order sorted to number folders by their sorted rank instead); {IMAGENET_LAYOUTS}")
        label_of = {d.name: index[d.name] for d in dirs}
    else:
        label_of = {d.name: i for i, d in enumerate(dirs)}
    items = []
    for d in dirs:
        for root_dir, subdirs, names in os.walk(d, followlinks=True):  # ImageFolder walks recursively, sorted
            subdirs.sort()
            for name in sorted(names):
                p = Path(root_dir) / name
                if p.suffix.lower() in IMAGE_EXTENSIONS:
                    items.append((p, label_of[d.name]))
    if not items:
        raise DataLayoutError(f"{root}: the class folders hold no images; {IMAGENET_LAYOUTS}")
    return items


def _find_label_file(root: Path) -> Path | None:
    for where in (root, root.parent):
        for name in LABEL_FILE_NAMES:
            if (where / name).is_file():
                return where / name
    return None


def _flat_wnid_named(root: Path, files: list[Path]) -> list[tuple[Path, int]]:
    index = wnid_index()
    items, bad = [], []
    for p in files:
        m = _WNID_PREFIX.match(p.name)
        if m and m.group(0) in index:
            items.append((p, index[m.group(0)]))
        else:
            bad.append(p.name)
    if bad:
        raise DataLayoutError(f"{root}: flat image files but no label file, and {len(bad)} file name(s) do not start "
                              f"with an ImageNet-1k wnid (e.g. {bad[0]!r}); {IMAGENET_LAYOUTS}")
    return items


def _flat_with_label_file(root: Path, files: list[Path], source: LabelFile,
                          num_classes: int | None) -> list[tuple[Path, int]]:
    table, label_file = source.table(num_classes), source.path
    if not files:
        raise DataLayoutError(f"{root} holds no image files directly (label file {label_file.name}); "
                              f"{IMAGENET_LAYOUTS}")
    items, missing = [], []
    for p in files:
        label = lookup(table, p.name)
        if label >= 0:
            items.append((p, label))
        else:
            missing.append(p.name)
    if missing:
        raise DataLayoutError(f"{label_file}: no label for {len(missing)} image(s) in {root} (e.g. {missing[0]!r}); "
                              f"{IMAGENET_LAYOUTS}")
    return items


def iter_image_list(images: ImageList, transform: Callable, batch_size: int, *, workers: int | None = None,
                    unreadable: list | None = None) -> Iterable[tuple[int, dict, np.ndarray]]:
    """(start, {"unit": (B, H, W, 3) float32, "labels": (B,) int32}, valid) for an `ImageList`.

    An image that cannot be read or decoded (`jaxvit.preprocess.ImageLoadError`) is left out of its
    batch and appended to `unreadable` as {"path", "error"}, so one bad file among 50,000 does not
    end the run; with `unreadable` None it raises instead. A batch left empty is not yielded."""
    from jaxvit import preprocess

    def load(i):
        try:
            image = preprocess.load_image(images.paths[i])
        except preprocess.ImageLoadError as e:
            if unreadable is None:
                raise
            return {"path": str(images.paths[i]), "error": str(e)}
        return {"unit": np.asarray(transform(image), np.float32), "labels": np.int32(images.labels[i])}

    for start, rows in prefetch_batches(len(images), batch_size, load, workers=workers):
        bad = [r for r in rows if "error" in r]
        if bad:
            unreadable.extend(bad)
            rows = [r for r in rows if "error" not in r]
        if rows:
            batch, valid = stack_padded(rows, batch_size)
            yield start, batch, valid
