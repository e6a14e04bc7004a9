"""Class labels: the one reader of label files (`predmaps run --labels`, `predmaps eval --labels` and
the label files `eval` finds beside a flat folder) and the one range rule every command applies.

A label file maps image files to classes, in ImageNet-1k synset order (the rank of the WordNet id
among the 1000 sorted ids, as timm and torchvision number the classes). Layouts read as they are:
- "<file name or stem> <label>" lines, space, tab or comma separated (caffe's val.txt), the label
  a 0-based class index or a WordNet id, further fields ignored; a header first line is skipped;
- Kaggle's LOC_val_solution.csv (ImageId,PredictionString: the first WordNet id counts);
- the devkit's ILSVRC2012_validation_ground_truth.txt (one ILSVRC2012_ID per line, for
  ILSVRC2012_val_00000001... in order) with the devkit's meta.mat beside it (read with scipy) to
  map those ids to WordNet ids; without meta.mat such a file is ambiguous and refused.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from pathlib import Path

from jaxvit import safe_write

# ImageNet's 1.28M training labels take ~60 MB as 'path label' lines: a file past this is not a label file
LABEL_FILE_LIMIT = 256 << 20
WNID = re.compile(r"^n\d{8}$")


class DataLayoutError(ValueError):
    """A data set is missing or not in an expected layout; the message names the problem and the fix."""


class LabelFileError(DataLayoutError):
    """A label file, or a label in one, that cannot be used; the message names the file and line."""


@functools.lru_cache(maxsize=1)
def wnid_index() -> dict[str, int]:
    """{WordNet id: class} in ImageNet-1k synset order."""
    from jaxvit import labels as imagenet_labels

    return {w: i for i, w in enumerate(imagenet_labels.imagenet_wnids())}


def parse_label(text: str, where: str = "") -> int | None:
    """A class index or an ImageNet-1k WordNet id -> class; None when the text is neither (a header's
    field). A WordNet id outside ImageNet-1k is an error (no class to give it)."""
    text = text.strip()
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    if WNID.match(text):
        if text not in wnid_index():
            raise LabelFileError(f"{where}{': ' if where else ''}{text!r} is not an ImageNet-1k WordNet id")
        return wnid_index()[text]
    return None


def check_label(value: int, num_classes: int | None, where: str) -> int:
    """`value` when it is a class of a `num_classes`-class model (0..num_classes-1; only >= 0 when the
    count is unknown), else the one out-of-range error every command gives (`predmaps run --labels`,
    `predmaps eval --labels`, `predmaps explain --labels`), prefixed by `where`."""
    if value < 0 or (num_classes is not None and value >= num_classes):
        span = f"0..{num_classes - 1} for a {num_classes}-class model" if num_classes is not None else "0 or more"
        raise LabelFileError(f"{where}: class index {value} is out of range ({span}): give each input its class "
                             "index in the model's class order, or its ImageNet WordNet id")
    return value


def out_of_range(labelled: list[tuple[str, int]], num_classes: int) -> ValueError:
    """The error for inputs whose labels (from folders, list files or Python) are past the model's classes."""
    return ValueError(f"labels out of range for a {num_classes}-class model: {labelled[:5]}")


@dataclasses.dataclass(frozen=True)
class LabelFile:
    """A label file read and parsed once: (name, class, where) per label, in file order, the classes not yet
    checked against a model. `table(num_classes)` checks them: the whole file is parsed before any class is
    range-checked, so parsing it before the model is known and checking later gives the same first error as
    `read_label_file` with the count, without reading the file again."""

    path: Path
    entries: tuple[tuple[str, int, str], ...]

    def table(self, num_classes: int | None = None, *, check_range: bool = True) -> dict[str, int]:
        """{file name or stem: class}, each class checked by `check_label` (unless not `check_range`)."""
        return _checked(self.entries, num_classes, check_range)


def read_label_file(path: str | os.PathLike, num_classes: int | None = None, *,
                    check_range: bool = True) -> dict[str, int]:
    """{file name or stem: class} from a label file in any layout of the module docstring; every
    label checked by `check_label` against `num_classes` (None: only that it is not negative).
    Raises `LabelFileError` naming the file (and line) and what to do."""
    return parse_label_file(path).table(num_classes, check_range=check_range)


def parse_label_file(path: str | os.PathLike) -> LabelFile:
    """Read and parse a label file once (`LabelFile`); its classes are checked by `LabelFile.table`.
    Raises `LabelFileError` for a file that cannot be read or parsed."""
    path = Path(path)
    if not path.exists():  # a FIFO or device exists: read_regular refuses it, naming what it is
        raise LabelFileError(f"label file {path} not found: give the path of an existing label file")
    try:
        text = safe_write.read_regular(path, LABEL_FILE_LIMIT, "label file").decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise LabelFileError(f"{path}: not UTF-8 text ({e}); save the label file as UTF-8") from None
    except ValueError as e:
        raise LabelFileError(str(e)) from None
    lines = [(n, ln.strip()) for n, ln in enumerate(text.splitlines(), 1)]
    lines = [(n, ln) for n, ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise LabelFileError(f"{path}: no labels found (the file is empty): give 'file label' lines")
    if all(re.fullmatch(r"\d+", ln) for _, ln in lines):
        return LabelFile(path, tuple(_devkit_ground_truth(path, lines)))
    out: list[tuple[str, int, str]] = []
    for i, (n, line) in enumerate(lines):
        fields = line.split(",", 1) if "," in line else line.split(None, 1)
        if len(fields) < 2:
            raise LabelFileError(f"{path}:{n}: expected 'file label', got {line!r}")
        token = fields[1].split()[0] if fields[1].split() else ""
        label = parse_label(token, f"{path}:{n}")
        if label is None:
            if i == 0:  # a header such as "ImageId,PredictionString"
                continue
            raise LabelFileError(f"{path}:{n}: cannot read a class index or WordNet id in {line!r}: {token!r} is "
                                 "neither an ImageNet-1k wnid nor a class index")
        out.append((fields[0].strip(), label, f"{path}:{n}"))
    if not out:
        raise LabelFileError(f"{path}: no labels found: give 'file label' lines")
    return LabelFile(path, tuple(out))


def _checked(entries: tuple[tuple[str, int, str], ...], num_classes: int | None, check_range: bool) -> dict[str, int]:
    """{name: class} of (name, class, where) lines, each class checked in file order (unless not `check_range`)."""
    return {name: check_label(label, num_classes, where) if check_range else label for name, label, where in entries}


def _devkit_ground_truth(path: Path, lines: list[tuple[int, str]]) -> list[tuple[str, int, str]]:
    """The devkit's validation ground truth: ILSVRC2012_IDs for ILSVRC2012_val_00000001... in order."""
    meta = path.parent / "meta.mat"
    if not meta.is_file():
        raise LabelFileError(
            f"{path}: one label per line without file names is ambiguous: the ILSVRC2012 devkit's "
            "validation_ground_truth.txt numbers classes by ILSVRC2012_ID, not by class index, and needs the devkit's "
            "meta.mat beside it to map them. Put meta.mat beside it, or give 'file label' lines (label a class index "
            "or a WordNet id)")
    try:
        import scipy.io

        synsets = scipy.io.loadmat(str(meta), squeeze_me=True)["synsets"]
        id_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
    except Exception as e:  # noqa: BLE001 - any malformed file is the same error
        raise LabelFileError(f"{meta}: not a readable ImageNet devkit meta.mat ({e}): give the devkit's own "
                             "meta.mat") from e
    out = []
    for i, (n, line) in enumerate(lines):
        wnid = id_to_wnid.get(int(line))
        if wnid is None or wnid not in wnid_index():
            raise LabelFileError(f"{path}:{n}: ILSVRC2012_ID {line} is not an ImageNet-1k class in {meta}")
        out.append((f"ILSVRC2012_val_{i + 1:08d}", wnid_index()[wnid], f"{path}:{n}"))
    return out


def lookup(label_map: dict[str, int] | None, name: str) -> int:
    """The label of the input `name` (a path relative to its root): matched by name, base name or stem; -1 if none."""
    if not label_map:
        return -1
    for key in (name, os.path.basename(name), os.path.splitext(os.path.basename(name))[0]):
        if key in label_map:
            return label_map[key]
    return -1
