"""ImageNet validation images for the perturbation test: listing, labels, subsets, batches.

Layouts (labels always in ImageNet-1k synset order: the rank of the WordNet id among the 1000
sorted ids, as timm and torchvision number the classes):

1. class-folder tree, as torchvision's ImageFolder: ROOT/<wnid>/<image>, e.g.
   val/n01440764/ILSVRC2012_val_00000293.JPEG. Folders and files are taken in sorted order.
   With class_order="sorted", folder names may be anything and the label is the folder's rank
   among the sorted folders (ImageFolder's own numbering).
2. flat files plus a label file: ROOT/<image> and a label file given with `labels_file`, or
   found in ROOT or its parent under one of `LABEL_FILE_NAMES`:
   - "<file name or stem> <label>" per line (space, tab or comma separated), the label a
     wnid or a 0-based class index in synset order (e.g. caffe's val.txt);
   - Kaggle's LOC_val_solution.csv (ImageId,PredictionString: the first wnid counts);
   - the devkit's ILSVRC2012_validation_ground_truth.txt (one ILSVRC2012_ID per line for
     ILSVRC2012_val_00000001... in order), with the devkit's meta.mat beside it (read with
     scipy) to map those ids to wnids.
3. flat files named "<wnid>_<anything>.<ext>" (ImageNet's train naming), no label file.

A ROOT holding a single `val/` folder is entered. Only files with an image extension count
(torchvision's IMG_EXTENSIONS, any case).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from jaxvit import labels as imagenet_labels

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
LABEL_FILE_NAMES = ("val_labels.txt", "labels.txt", "val.txt", "LOC_val_solution.csv",
                    "ILSVRC2012_validation_ground_truth.txt")
_WNID = re.compile(r"n\d{8}")

IMAGENET_LAYOUTS = (
    "expected ImageNet validation images in one of these layouts:\n"
    "  1. class folders (torchvision ImageFolder): ROOT/<wnid>/<image>.JPEG, e.g. ROOT/n01440764/...;\n"
    "  2. flat files ROOT/<image>.JPEG plus a label file (--labels FILE, or ROOT or its parent holding one of "
    f"{', '.join(LABEL_FILE_NAMES)}): lines '<file> <wnid or class index>', Kaggle's LOC_val_solution.csv, "
    "or the devkit's ILSVRC2012_validation_ground_truth.txt with meta.mat beside it;\n"
    "  3. flat files named <wnid>_<anything>.JPEG.\n"
    "Labels are numbered in ImageNet-1k synset order (sorted wnids).")


class DataLayoutError(ValueError):
    """A data set is missing or not in an expected layout; the message names the layouts."""


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMG_EXTENSIONS


@dataclasses.dataclass(frozen=True)
class ImageList:
    """Image files with their class indices (ImageNet-1k synset order unless `class_order`)."""

    paths: tuple[Path, ...]
    labels: np.ndarray  # (n,) int32
    layout: str
    root: Path
    class_order: str = "imagenet"

    def __len__(self) -> int:
        return len(self.paths)

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


def _wnid_index() -> dict[str, int]:
    return {w: i for i, w in enumerate(imagenet_labels.imagenet_wnids())}


def imagenet_val(path, *, labels_file=None, class_order: str = "imagenet", limit: int | None = None,
                 subset: str = "random", seed: int = 0) -> ImageList:
    """List ImageNet validation images and labels from `path` (see the module docstring).

    Raises `DataLayoutError` naming the expected layouts when `path` is missing, empty or
    malformed.
    """
    if class_order not in ("imagenet", "sorted"):
        raise ValueError(f"class_order must be 'imagenet' or 'sorted'; got {class_order!r}")
    root = Path(path)
    if not root.exists():
        raise DataLayoutError(f"{root}: no such file or directory; {IMAGENET_LAYOUTS}")
    if not root.is_dir():
        raise DataLayoutError(f"{root} is a file, not a directory; {IMAGENET_LAYOUTS}")
    entries = sorted(root.iterdir())
    dirs = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
    files = [p for p in entries if _is_image(p)]
    if not files and [d.name for d in dirs] in (["val"], ["validation"]) and labels_file is None:
        return imagenet_val(dirs[0], class_order=class_order, limit=limit, subset=subset, seed=seed)
    if labels_file is not None:
        items = _flat_with_label_file(root, files, Path(labels_file))
        layout = f"flat files + label file {Path(labels_file).name}"
    elif dirs and not files:
        items, layout = _image_folder(root, dirs, class_order), "class folders"
    elif files:
        found = _find_label_file(root)
        if found is not None:
            items, layout = _flat_with_label_file(root, files, found), f"flat files + label file {found.name}"
        else:
            items, layout = _flat_wnid_named(root, files), "flat files named <wnid>_*"
    else:
        raise DataLayoutError(f"{root} holds no images; {IMAGENET_LAYOUTS}")
    if not items:
        raise DataLayoutError(f"{root}: no labelled images found; {IMAGENET_LAYOUTS}")
    paths, labels = zip(*items)
    out = ImageList(tuple(paths), np.asarray(labels, np.int32), layout, root,
                    class_order if layout == "class folders" else "imagenet")
    return out.subset(limit, mode=subset, seed=seed)


def _image_folder(root: Path, dirs: list[Path], class_order: str) -> list[tuple[Path, int]]:
    if class_order == "imagenet":
        index = _wnid_index()
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
                if p.suffix.lower() in IMG_EXTENSIONS:
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
    index = _wnid_index()
    items, bad = [], []
    for p in files:
        m = _WNID.match(p.name)
        if m and m.group(0) in index:
            items.append((p, index[m.group(0)]))
        else:
            bad.append(p.name)
    if bad:
        raise DataLayoutError(f"{root}: flat image files but no label file, and {len(bad)} file name(s) do not start "
                              f"with an ImageNet-1k wnid (e.g. {bad[0]!r}); {IMAGENET_LAYOUTS}")
    return items


def _parse_label(token: str, where: str) -> int:
    index = _wnid_index()
    if token in index:
        return index[token]
    try:
        value = int(token)
    except ValueError:
        raise DataLayoutError(f"{where}: label {token!r} is neither an ImageNet-1k wnid nor a class index; "
                              f"{IMAGENET_LAYOUTS}") from None
    if not 0 <= value < 1000:
        raise DataLayoutError(f"{where}: class index {value} out of range 0..999; {IMAGENET_LAYOUTS}")
    return value


def _devkit_ids_to_wnids(meta: Path) -> dict[int, str]:
    if not meta.is_file():
        raise DataLayoutError(f"{meta}: the devkit ground truth numbers classes by ILSVRC2012_ID; its meta.mat "
                              f"must lie beside it to map them to wnids; {IMAGENET_LAYOUTS}")
    import scipy.io

    try:
        synsets = scipy.io.loadmat(str(meta), squeeze_me=True)["synsets"]
        out = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
    except Exception as e:  # noqa: BLE001 - any malformed file is a layout error
        raise DataLayoutError(f"{meta}: not a readable ImageNet devkit meta.mat ({e}); {IMAGENET_LAYOUTS}") from e
    return out


def _read_label_file(label_file: Path) -> tuple[dict[str, int], bool]:
    """{file name or stem: label}, and whether the keys are full names (else stems)."""
    if not label_file.exists():  # a FIFO or device exists: read_regular refuses it, naming what it is
        raise DataLayoutError(f"label file {label_file} not found; {IMAGENET_LAYOUTS}")
    from jaxvit import safe_write
    from predmaps.pipeline import LABEL_FILE_LIMIT

    try:
        text = safe_write.read_regular(label_file, LABEL_FILE_LIMIT, "label file").decode("utf-8-sig")
    except (ValueError, UnicodeDecodeError) as e:
        raise DataLayoutError(f"{e}; {IMAGENET_LAYOUTS}") from None
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise DataLayoutError(f"label file {label_file} is empty; {IMAGENET_LAYOUTS}")
    where = str(label_file)
    if lines[0].replace(" ", "").lower().startswith("imageid,predictionstring"):  # Kaggle LOC_val_solution.csv
        out = {}
        for ln in lines[1:]:
            image_id, _, pred = ln.partition(",")
            if not pred.split():
                raise DataLayoutError(f"{where}: malformed line {ln!r}; {IMAGENET_LAYOUTS}")
            out[image_id.strip()] = _parse_label(pred.split()[0], where)
        return out, False
    if all(re.fullmatch(r"\d+", ln) for ln in lines):  # devkit ground truth: ILSVRC2012_ID per image
        id_to_wnid = _devkit_ids_to_wnids(label_file.parent / "meta.mat")
        index = _wnid_index()
        out = {}
        for i, ln in enumerate(lines):
            wnid = id_to_wnid.get(int(ln))
            if wnid is None or wnid not in index:
                raise DataLayoutError(f"{where}: line {i + 1}: ILSVRC2012_ID {ln} is not an ImageNet-1k class in "
                                      "meta.mat")
            out[f"ILSVRC2012_val_{i + 1:08d}"] = index[wnid]
        return out, False
    out, full = {}, True
    for ln in lines:
        parts = re.split(r"[\s,]+", ln)
        if len(parts) < 2:
            raise DataLayoutError(f"{where}: malformed line {ln!r} (expected '<file> <label>'); {IMAGENET_LAYOUTS}")
        name = parts[0]
        full = full and Path(name).suffix.lower() in IMG_EXTENSIONS
        out[name] = _parse_label(parts[1], where)
    if not full:
        out = {Path(k).stem if Path(k).suffix.lower() in IMG_EXTENSIONS else k: v for k, v in out.items()}
    return out, full


def _flat_with_label_file(root: Path, files: list[Path], label_file: Path) -> list[tuple[Path, int]]:
    table, full = _read_label_file(label_file)
    if not files:
        raise DataLayoutError(f"{root} holds no image files directly (label file {label_file.name}); "
                              f"{IMAGENET_LAYOUTS}")
    items, missing = [], []
    for p in files:
        key = p.name if full else p.stem
        if key in table:
            items.append((p, table[key]))
        else:
            missing.append(p.name)
    if missing:
        raise DataLayoutError(f"{label_file}: no label for {len(missing)} image(s) in {root} (e.g. {missing[0]!r}); "
                              f"{IMAGENET_LAYOUTS}")
    return items


# --------------------------------------------------------------------------------------------
# Transforms and batches


PROTOCOL_MEAN = (0.5, 0.5, 0.5)
PROTOCOL_STD = (0.5, 0.5, 0.5)
TRANSFORMS = ("resize", "timm")


def _timm_geometry(config) -> dict:
    """The eval-transform geometry of a model config: interpolation, crop_pct, crop_mode."""
    if config is None:
        raise ValueError("the timm transform needs the model config")
    return {"interpolation": getattr(config, "interpolation", "bicubic"),
            "crop_pct": getattr(config, "crop_pct", 0.9), "crop_mode": getattr(config, "crop_mode", "center")}


def eval_size(image_size, config=None) -> tuple[int, int]:
    """The (H, W) a test runs at: `image_size`, else the model's input size (the protocol's 224 x 224
    for the paper's ViT-B/16), else 224 x 224."""
    if image_size is None:
        image_size = config.img_size if config is not None else (224, 224)
    return tuple(int(s) for s in image_size)


def unit_transform(kind: str = "resize", size=(224, 224), config=None) -> Callable:
    """image -> float32 (H, W, 3) in [0, 1], before normalisation.

    "resize": the protocol's plain resize to `size` (bilinear, no crop) and ToTensor.
    "timm": timm's eval transform of `config` (resize by crop_pct, centre crop, its
    interpolation) at `size`, without the normalisation.
    """
    from jaxvit import preprocess

    if kind == "resize":
        return lambda img: preprocess.to_unit(img, size, "bilinear")
    if kind == "timm":
        geometry = _timm_geometry(config)
        return lambda img: preprocess.eval_transform(img, img_size=size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                                                     **geometry)
    raise ValueError(f"transform must be one of {TRANSFORMS}; got {kind!r}")


def mask_transform(kind: str = "resize", size=(224, 224), config=None) -> Callable:
    """label mask (H, W) -> uint8 `size`, through the same geometry as `unit_transform(kind)`
    moves its image, with NEAREST resampling ("resize": torchvision Resize(size, NEAREST), as
    the protocol; "timm": the eval transform's resize and crop, padding with 0 = background)."""
    from PIL import Image

    from jaxvit import preprocess

    def to_pil(mask):
        return Image.fromarray(np.asarray(mask, np.uint8))

    if kind == "resize":
        return lambda mask: np.asarray(to_pil(mask).resize((size[1], size[0]), Image.Resampling.NEAREST))
    if kind == "timm":
        geometry = _timm_geometry(config)
        del geometry["interpolation"]
        return lambda mask: preprocess.eval_geometry(to_pil(mask), img_size=size, resample=Image.Resampling.NEAREST,
                                                     **geometry)
    raise ValueError(f"transform must be one of {TRANSFORMS}; got {kind!r}")


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def prefetch_batches(n: int, batch_size: int, load: Callable[[int], dict], *, workers: int | None = None,
                     ahead: int = 2) -> Iterator[tuple[int, list[dict]]]:
    """Yield (start, [load(i) for i in batch]) for consecutive batches, loading `ahead` batches in
    advance on a thread pool (decoding and resizing release the GIL)."""
    workers = workers or default_workers()
    starts = list(range(0, n, batch_size))
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        pending: list[tuple[int, list]] = []
        it = iter(starts)

        def submit():
            s = next(it, None)
            if s is not None:
                pending.append((s, [pool.submit(_within_budget, load, i) for i in range(s, min(s + batch_size, n))]))

        for _ in range(ahead + 1):
            submit()
        while pending:
            s, futs = pending.pop(0)
            submit()
            yield s, [f.result() for f in futs]


def _within_budget(load: Callable[[int], dict], i: int) -> dict:
    """load(i) with what it decodes counted against the process's pixel budget (`jaxvit.preprocess.DECODE_BUDGET`)."""
    from jaxvit.preprocess import DECODE_BUDGET

    with DECODE_BUDGET.claim():
        return load(i)


def stack_padded(rows: Sequence[dict], batch_size: int) -> tuple[dict, np.ndarray]:
    """Stack per-item dicts of arrays into a batch padded with zeros to `batch_size`; returns
    (batch, valid) with valid (batch_size,) bool."""
    b = len(rows)
    out = {}
    for key in rows[0]:
        arr = np.stack([np.asarray(r[key]) for r in rows])
        if b < batch_size:
            arr = np.concatenate([arr, np.zeros((batch_size - b,) + arr.shape[1:], arr.dtype)])
        out[key] = arr
    valid = np.arange(batch_size) < b
    return out, valid


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
