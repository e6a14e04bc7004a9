"""Files exchanged with the reference code: ImageNet-Segmentation's gtsegs_ijcv.mat and Chefer's
results.hdf5 map files. Both are HDF5, read with h5py.

gtsegs_ijcv.mat (Guillaumin et al. 2014; MATLAB v7.3 = HDF5), as Chefer's
`data/Imagenet.py` reads it:

- /value/img: (n, 1) object references; each dereferences to a uint8 array stored (C, W, H):
  transpose (2, 1, 0) to H x W x C;
- /value/gt: (n, 1) references to cells; the cell's [0, 0] entry references the mask, stored
  (W, H): transpose to H x W, values {0, 1};
- /value/id: (n, 1) references to UTF-16 WordNet ids; /value/target also exists (unused).

results.hdf5 (Chefer's generate_visualizations.py): `vis` (n, 1, 224, 224) float32 maps,
`image` (n, 3, 224, 224) float32 in [0, 1] (not normalised), `target` (n,) int32 labels.
In memory this package uses channels-last: maps (n, H, W), images (n, H, W, 3).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from jaxvit import safe_write
from predmaps.data import DataLayoutError

SEGMENTATION_LAYOUT = (
    "expected ImageNet-Segmentation's gtsegs_ijcv.mat (MATLAB v7.3 / HDF5): /value/img an (n,1) array of object "
    "references to uint8 images stored (C,W,H); /value/gt an (n,1) array of references to cells whose [0,0] entry "
    "references the (W,H) mask of {0,1}; /value/id and /value/target alongside")
CHEFER_LAYOUT = (
    "expected a results.hdf5 map file as written by Chefer et al.'s generate_visualizations.py: datasets "
    "'vis' (n,1,H,W) float32 maps, 'image' (n,3,H,W) float32 in [0,1] and 'target' (n,) int32 labels")
# Declared sizes past these are refused before any data is read: a crafted file of a few KB can declare
# a 3x60000x60000 image (10 GiB). ImageNet-Segmentation's images are at most a few megapixels.
MAX_PIXELS = 64_000_000
# How far 'image' may leave [0, 1]: float32 rounding in a writer's resize or colour conversion; a
# 0..255 or mean/std-normalised image is off by far more.
UNIT_TOLERANCE = 1e-6


def _h5py():
    import h5py

    return h5py


# --------------------------------------------------------------------------------------------
# gtsegs_ijcv.mat


class ImageNetSegmentation:
    """Reader of gtsegs_ijcv.mat. `len(ds)`, `ds.image(i)` -> uint8 (H, W, 3),
    `ds.mask(i)` -> uint8 (H, W) in {0, 1}, `ds.wnid(i)` -> str or None. Use as a context
    manager or call `close()`. Safe to call from several threads (h5py serialises)."""

    def __init__(self, path):
        h5py = _h5py()
        self.path = Path(path)
        if not self.path.exists():
            raise DataLayoutError(f"{self.path}: no such file; {SEGMENTATION_LAYOUT}")
        if self.path.is_dir():
            candidate = self.path / "gtsegs_ijcv.mat"
            if not candidate.is_file():
                raise DataLayoutError(f"{self.path} is a directory without gtsegs_ijcv.mat; {SEGMENTATION_LAYOUT}")
            self.path = candidate
        try:
            self._f = h5py.File(self.path, "r")
        except OSError as e:
            raise DataLayoutError(f"{self.path}: not an HDF5 file ({e}); a MATLAB file older than v7.3 must be "
                                  f"re-saved with -v7.3; {SEGMENTATION_LAYOUT}") from e
        try:
            self._img = self._refs("/value/img")
            self._gt = self._refs("/value/gt")
        except DataLayoutError:
            self._f.close()
            raise
        if self._img.shape[0] != self._gt.shape[0]:
            self._f.close()
            raise DataLayoutError(f"{self.path}: /value/img has {self._img.shape[0]} entries, /value/gt "
                                  f"{self._gt.shape[0]}; {SEGMENTATION_LAYOUT}")
        try:  # optional and unused by the test: never fatal
            self._id = self._refs("/value/id", required=False)
        except DataLayoutError:
            self._id = None

    def _refs(self, name, required=True):
        h5py = _h5py()
        if name not in self._f:
            if not required:
                return None
            raise DataLayoutError(f"{self.path}: missing {name}; {SEGMENTATION_LAYOUT}")
        ds = self._f[name]
        if not isinstance(ds, h5py.Dataset) or ds.ndim != 2 or 1 not in ds.shape or ds.dtype != h5py.ref_dtype:
            raise DataLayoutError(f"{self.path}: {name} must be an (n,1) array of object references; got "
                                  f"{getattr(ds, 'shape', None)} {getattr(ds, 'dtype', type(ds).__name__)}; "
                                  f"{SEGMENTATION_LAYOUT}")
        return ds[()].reshape(-1)  # (n,) refs; MATLAB may also write (1, n)

    def __len__(self) -> int:
        return int(self._img.shape[0])

    def _deref(self, ref, what, i):
        if not ref:
            raise DataLayoutError(f"{self.path}: {what} {i} is a null reference; {SEGMENTATION_LAYOUT}")
        return self._f[ref]

    def _dataset(self, ref, what, i, ndims=(2, 3)):
        """The dataset a reference points to, its declared shape checked before anything is read."""
        h5py = _h5py()
        ds = self._deref(ref, what, i)
        if not isinstance(ds, h5py.Dataset):
            raise DataLayoutError(f"{self.path}: {what} {i} references an HDF5 {type(ds).__name__.lower()}, not an "
                                  f"array; {SEGMENTATION_LAYOUT}")
        shape = tuple(int(v) for v in ds.shape or ())
        if len(shape) not in ndims:
            raise DataLayoutError(f"{self.path}: {what} {i} has shape {shape}; {SEGMENTATION_LAYOUT}")
        hw = shape[-2:] if len(shape) == 3 else shape
        if min(shape) == 0:
            raise DataLayoutError(f"{self.path}: {what} {i} is empty (shape {shape}); {SEGMENTATION_LAYOUT}")
        if hw[0] * hw[1] > MAX_PIXELS or (len(shape) == 3 and shape[0] > 4):
            raise DataLayoutError(f"{self.path}: {what} {i} declares shape {shape}, past {MAX_PIXELS:,} pixels "
                                  f"or 4 channels: refused before reading; {SEGMENTATION_LAYOUT}")
        if ds.dtype.kind not in "biuf":
            raise DataLayoutError(f"{self.path}: {what} {i} holds {ds.dtype}, not numbers; {SEGMENTATION_LAYOUT}")
        from jaxvit.preprocess import DECODE_BUDGET

        DECODE_BUDGET.take(hw[0] * hw[1])  # within a decoding pool's claim: counted against its pixel budget
        return ds

    def image(self, i: int) -> np.ndarray:
        """uint8 (H, W, 3): the stored (C, W, H) array transposed (2, 1, 0); grey images repeated."""
        arr = np.asarray(self._dataset(self._img[i], "/value/img", i)[()])
        if arr.dtype != np.uint8:  # a float 300.7 must not wrap to uint8's 44
            bad = (~np.isfinite(arr) | (arr < 0) | (arr > 255) | (arr != np.round(arr))).ravel()
            if bad.any():
                raise DataLayoutError(f"{self.path}: image {i} holds {arr.dtype} values that are not whole numbers "
                                      f"in 0..255 (e.g. {arr.ravel()[np.argmax(bad)]:g}): refused, not wrapped to "
                                      f"uint8; {SEGMENTATION_LAYOUT}")
        if arr.ndim == 2:  # a grey image stored (W, H)
            arr = arr.T[..., None]
        elif arr.ndim == 3:
            arr = arr.transpose(2, 1, 0)
        else:
            raise DataLayoutError(f"{self.path}: image {i} has shape {arr.shape}; {SEGMENTATION_LAYOUT}")
        if arr.shape[-1] == 1:
            arr = np.repeat(arr, 3, axis=-1)
        if arr.shape[-1] != 3:
            raise DataLayoutError(f"{self.path}: image {i} has {arr.shape[-1]} channels; {SEGMENTATION_LAYOUT}")
        return np.ascontiguousarray(arr.astype(np.uint8, copy=False))

    def mask(self, i: int) -> np.ndarray:
        """uint8 (H, W), 1 = foreground: the cell's [0, 0] reference, stored (W, H), transposed."""
        h5py = _h5py()
        cell = self._deref(self._gt[i], "/value/gt", i)
        if not isinstance(cell, h5py.Dataset) or cell.dtype != h5py.ref_dtype or cell.ndim != 2:
            raise DataLayoutError(f"{self.path}: /value/gt entry {i} must reference a cell (an array of "
                                  f"references); {SEGMENTATION_LAYOUT}")
        if cell.size == 0:
            raise DataLayoutError(f"{self.path}: /value/gt entry {i} is an empty cell (no mask); {SEGMENTATION_LAYOUT}")
        arr = np.asarray(self._dataset(cell[0, 0], "/value/gt cell", i, ndims=(2,))[()])
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):  # NaN != 0 would count as foreground
            raise DataLayoutError(f"{self.path}: mask {i} holds NaN or infinite values; masks are 0/1; "
                                  f"{SEGMENTATION_LAYOUT}")
        # Each is resized to the evaluation size on its own, so a transposed or foreign mask would
        # be scored against the wrong pixels; only the image's stored shape is read, not its data.
        stored = self._deref(self._img[i], "/value/img", i).shape  # (C, W, H) or grey (W, H)
        image_hw, mask_hw = tuple(stored[::-1][:2]), arr.shape[::-1]
        if len(stored) in (2, 3) and mask_hw != image_hw:
            raise DataLayoutError(f"{self.path}: entry {i}: mask is {mask_hw[0]}x{mask_hw[1]} (H x W) but its image "
                                  f"{image_hw[0]}x{image_hw[1]}; the mask must cover the image pixel for pixel; "
                                  f"{SEGMENTATION_LAYOUT}")
        return np.ascontiguousarray((arr.T != 0).astype(np.uint8))

    def wnid(self, i: int) -> str | None:
        if self._id is None or not self._id[i]:
            return None
        codes = np.asarray(self._f[self._id[i]][()]).ravel()
        return "".join(chr(int(c)) for c in codes if int(c))

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_segmentation_mat(path, images, masks, wnids=None, targets=None) -> Path:
    """Write a small file in gtsegs_ijcv.mat's HDF5 structure (for tests and toy data sets).

    images: list of uint8 (H, W, 3); masks: list of (H, W) {0, 1}. Stored as MATLAB does:
    (C, W, H) / (W, H), behind (n, 1) reference arrays, masks behind one-element cells.
    """
    h5py = _h5py()
    path = Path(path)
    n = len(images)
    tmp = path.with_name(safe_write.temp_name(path.name))
    os.close(safe_write.create_new(tmp))  # written under a new name of ours, then renamed onto path
    try:
        _write_segmentation_layout(h5py.File(tmp, "w"), images, masks, wnids, targets, n)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _write_segmentation_layout(file, images, masks, wnids, targets, n) -> None:
    h5py = _h5py()
    with file as f:
        refs = f.create_group("#refs#")
        img_refs = np.empty((n, 1), dtype=h5py.ref_dtype)
        gt_refs = np.empty((n, 1), dtype=h5py.ref_dtype)
        id_refs = np.empty((n, 1), dtype=h5py.ref_dtype)
        tgt_refs = np.empty((n, 1), dtype=h5py.ref_dtype)
        for i in range(n):
            img = np.asarray(images[i], np.uint8)
            img_refs[i, 0] = refs.create_dataset(f"img{i}", data=img.transpose(2, 1, 0)).ref
            m = refs.create_dataset(f"mask{i}", data=np.asarray(masks[i], np.uint8).T)
            cell = refs.create_dataset(f"cell{i}", data=np.array([[m.ref]], dtype=h5py.ref_dtype))
            gt_refs[i, 0] = cell.ref
            wnid = wnids[i] if wnids is not None else "n00000000"
            id_refs[i, 0] = refs.create_dataset(f"id{i}", data=np.array([[ord(c)] for c in wnid], np.uint16)).ref
            t = targets[i] if targets is not None else 0
            tgt_refs[i, 0] = refs.create_dataset(f"target{i}", data=np.array([[t]], np.float64)).ref
        value = f.create_group("value")
        value.create_dataset("img", data=img_refs)
        value.create_dataset("gt", data=gt_refs)
        value.create_dataset("id", data=id_refs)
        value.create_dataset("target", data=tgt_refs)


# --------------------------------------------------------------------------------------------
# Chefer's results.hdf5


class CheferResults:
    """Lazy reader of a results.hdf5 map file. `len(r)`; `r.batch(start, stop)` -> dict with
    "maps" (b, H, W) float32, "unit" (b, H, W, 3) float32 in [0, 1], "labels" (b,) int32;
    `r.read()` -> the whole file the same way. Context manager."""

    def __init__(self, path):
        h5py = _h5py()
        self.path = Path(path)
        if not self.path.is_file():
            raise DataLayoutError(f"{self.path}: no such file; {CHEFER_LAYOUT}")
        try:
            self._f = h5py.File(self.path, "r")
        except OSError as e:
            raise DataLayoutError(f"{self.path}: not an HDF5 file ({e}); {CHEFER_LAYOUT}") from e
        try:
            missing = [k for k in ("vis", "image", "target") if k not in self._f]
            if missing:
                raise DataLayoutError(f"{self.path}: missing dataset(s) {', '.join(missing)}; {CHEFER_LAYOUT}")
            vis, image, target = self._f["vis"], self._f["image"], self._f["target"]
            kinds = {k: d for k, d in (("vis", vis), ("image", image), ("target", target))
                     if not isinstance(d, h5py.Dataset) or not d.shape}
            if kinds:
                raise DataLayoutError(f"{self.path}: " + ", ".join(
                    f"'{k}' is {'an HDF5 group' if not isinstance(d, h5py.Dataset) else 'a scalar'}"
                    for k, d in kinds.items()) + f", not an array; {CHEFER_LAYOUT}")
            if any(d.dtype.kind not in "biuf" for d in (vis, image, target)):
                raise DataLayoutError(f"{self.path}: dtypes vis {vis.dtype}, image {image.dtype}, target "
                                      f"{target.dtype} are not all numbers; {CHEFER_LAYOUT}")
            n = vis.shape[0]
            if vis.ndim == 4 and 0 in vis.shape[2:]:
                raise DataLayoutError(f"{self.path}: 'vis' maps are {vis.shape[2]}x{vis.shape[3]}: empty; {CHEFER_LAYOUT}")
            if (vis.ndim != 4 or vis.shape[1] != 1 or image.ndim != 4 or image.shape[1] != 3
                    or image.shape[0] != n or target.shape != (n,) or vis.shape[2:] != image.shape[2:]):
                raise DataLayoutError(f"{self.path}: shapes vis {vis.shape}, image {image.shape}, target "
                                      f"{target.shape} do not match; {CHEFER_LAYOUT}")
        except DataLayoutError:
            self._f.close()
            raise
        self.image_size = tuple(int(s) for s in vis.shape[2:])

    def __len__(self) -> int:
        return int(self._f["vis"].shape[0])

    def _targets(self, sel) -> np.ndarray:
        t = np.asarray(self._f["target"][sel])
        if t.dtype.kind == "f" and (not np.all(np.isfinite(t)) or np.any(t != np.round(t))):
            bad = int(np.argmax(~np.isfinite(t) | (t != np.round(t))))
            raise DataLayoutError(f"{self.path}: 'target' holds {t[bad]} (not a class index); {CHEFER_LAYOUT}")
        return t

    def labels(self) -> np.ndarray:
        """(n,) int64: every entry's ground-truth class ('target')."""
        return self._targets(slice(None)).astype(np.int64)

    def maps(self, start: int, stop: int) -> np.ndarray:
        """(b, H, W) float32 maps only."""
        return self._finite(np.asarray(self._f["vis"][start:stop, 0], np.float32), start)

    def _finite(self, maps: np.ndarray, first: int, indices=None) -> np.ndarray:
        """Refuse maps holding NaN or inf: an all-NaN map would be scored (as AUC 0) as if it were one."""
        bad = ~np.isfinite(maps).reshape(len(maps), -1).all(axis=1)
        if bad.any():
            j = int(np.argmax(bad))
            k = indices[j] if indices is not None else first + j
            raise DataLayoutError(f"{self.path}: 'vis' entry {k} holds NaN or infinite values: not a map to score; "
                                  f"{CHEFER_LAYOUT}")
        return maps

    def _unit(self, image, first: int, last: int) -> np.ndarray:
        """(b, 3, H, W) as read -> (b, H, W, 3), refused unless in [0, 1]."""
        image = np.asarray(image, np.float32)
        check_unit_range(image, f"{self.path}: 'image' among entries {first}..{last}", CHEFER_LAYOUT)
        return np.ascontiguousarray(image.transpose(0, 2, 3, 1))

    def batch(self, start: int, stop: int) -> dict:
        return {"maps": self.maps(start, stop),
                "unit": self._unit(self._f["image"][start:stop], start, stop - 1),
                "labels": self._targets(slice(start, stop)).astype(np.int32)}

    def take(self, indices) -> dict:
        """Like `batch` for increasing indices."""
        idx = [int(i) for i in indices]
        if any(b <= a for a, b in zip(idx, idx[1:])):
            raise ValueError("take needs strictly increasing indices")
        if not idx:
            return self.batch(0, 0)
        return {"maps": self._finite(np.asarray(self._f["vis"][idx, 0], np.float32), 0, idx),
                "unit": self._unit(self._f["image"][idx], idx[0], idx[-1]),
                "labels": self._targets(idx).astype(np.int32)}

    def read(self) -> dict:
        return self.batch(0, len(self))

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_chefer_hdf5(path) -> dict:
    """The whole results.hdf5 in memory: {"maps" (n, H, W), "unit" (n, H, W, 3), "labels" (n,)}."""
    with CheferResults(path) as r:
        return r.read()


def check_unit_range(image: np.ndarray, what: str, layout: str = "") -> None:
    """Refuse images outside [0, 1] (NaN included): 0..255 or already normalised images would be
    scored without complaint, at a wrong clean accuracy, and written so for other tools."""
    if image.size:
        lo, hi = float(image.min()), float(image.max())
        if not (lo >= -UNIT_TOLERANCE and hi <= 1 + UNIT_TOLERANCE):  # NaN fails too
            raise DataLayoutError(f"{what} holds values in [{lo:g}, {hi:g}]; images must be unnormalised "
                                  f"pixel / 255 in [0, 1]" + (f"; {layout}" if layout else ""))


class CheferWriter:
    """Append maps to a results.hdf5 in Chefer's layout (resizable gzip datasets, as the
    reference writes them). `append(maps (b, H, W), unit (b, H, W, 3) in [0, 1], labels (b,))`."""

    def __init__(self, path, image_size=(224, 224)):
        h5py = _h5py()
        self.path = Path(path)
        if self.path.parent and not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        h, w = image_size
        self._tmp = self.path.with_name(safe_write.temp_name(self.path.name))
        os.close(safe_write.create_new(self._tmp))  # a new file of ours, never an existing path or a symlink
        self._f = h5py.File(self._tmp, "w")
        self._vis = self._f.create_dataset("vis", (0, 1, h, w), maxshape=(None, 1, h, w), dtype=np.float32,
                                           compression="gzip", chunks=(1, 1, h, w))
        self._image = self._f.create_dataset("image", (0, 3, h, w), maxshape=(None, 3, h, w), dtype=np.float32,
                                             compression="gzip", chunks=(1, 3, h, w))
        self._target = self._f.create_dataset("target", (0,), maxshape=(None,), dtype=np.int32, compression="gzip",
                                              chunks=(1024,))

    def append(self, maps, unit, labels) -> None:
        maps = np.asarray(maps, np.float32)
        unit = np.asarray(unit, np.float32)
        labels = np.asarray(labels)
        b = maps.shape[0]
        if maps.ndim == 4 and maps.shape[1] == 1:
            maps = maps[:, 0]
        if maps.shape[1:] != self._vis.shape[2:] or unit.shape != (b,) + self._vis.shape[2:] + (3,) \
                or labels.shape != (b,):
            raise ValueError(f"append takes maps (b, H, W), unit (b, H, W, 3), labels (b,) with (H, W) = "
                             f"{self._vis.shape[2:]}; got {maps.shape}, {unit.shape}, {labels.shape}")
        check_unit_range(unit, f"append to {self.path}: unit")
        n = self._vis.shape[0]
        for ds in (self._vis, self._image, self._target):
            ds.resize(n + b, axis=0)
        self._vis[n:] = maps[:, None]
        self._image[n:] = unit.transpose(0, 3, 1, 2)
        self._target[n:] = labels.astype(np.int32)

    def abort(self) -> None:
        """Drop the unfinished file."""
        if self._f:
            self._f.close()
            self._f = None
        self._tmp.unlink(missing_ok=True)

    def close(self) -> Path:
        """Finish the file (written under a temporary name, renamed here)."""
        if self._f:
            self._f.close()
            self._f = None
            os.replace(self._tmp, self.path)
        return self.path

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_chefer_hdf5(path, maps, unit, labels) -> Path:
    """Write maps (n, H, W), images (n, H, W, 3) in [0, 1] and labels (n,) as a results.hdf5."""
    maps = np.asarray(maps, np.float32)
    if maps.ndim == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    with CheferWriter(path, maps.shape[1:]) as w:
        w.append(maps, unit, labels)
    return w.path
