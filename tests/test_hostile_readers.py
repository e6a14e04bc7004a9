"""Readers of crafted files (issue 24, items 6-8): bounded before they read, and a one-line
message naming the file instead of a traceback or a silently wrong score. Every file is made here."""

import os
import threading

import numpy as np
import pytest
from PIL import Image

from jaxvit import preprocess
from predmaps import data as pdata
from predmaps.data import DataLayoutError
from predmaps.evaluation.files import CheferResults, ImageNetSegmentation
from predmaps.pipeline import read_label_file

h5py = pytest.importorskip("h5py")


# --------------------------------------------------------------------------------------
# Label files
# --------------------------------------------------------------------------------------


def test_label_files_must_be_small_regular_files(tmp_path):
    fifo = tmp_path / "labels.fifo"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match=r"labels\.fifo is not a regular file \(a FIFO"):
        read_label_file(fifo)  # returns at once: it never waits for a writer
    with pytest.raises(ValueError, match="/dev/zero is not a regular file"):
        read_label_file("/dev/zero")
    big = tmp_path / "big.txt"
    with open(big, "wb") as f:
        f.truncate((256 << 20) + 1)  # sparse: no disk used
    with pytest.raises(ValueError, match=r"big\.txt is 268,435,457 bytes, over the 268,435,456 a label file"):
        read_label_file(big)
    with pytest.raises(DataLayoutError, match="is not a regular file"):
        pdata.imagenet_val(tmp_path, labels_file=fifo)  # predmaps eval's path to the same reader


# --------------------------------------------------------------------------------------
# gtsegs_ijcv.mat
# --------------------------------------------------------------------------------------


def _mat(path, image=None, cell=None, mask=None):
    """One entry in gtsegs_ijcv.mat's layout; image(refs) / cell(refs, mask_ref) / mask(refs) make the
    crafted objects (defaults: a valid 4x5 RGB image, its mask, a one-element cell)."""
    with h5py.File(path, "w") as f:
        refs = f.create_group("#refs#")
        img = image(refs) if image else refs.create_dataset("img", data=np.zeros((3, 5, 4), np.uint8))
        m = mask(refs) if mask else refs.create_dataset("mask", data=np.ones((5, 4), np.uint8))
        c = cell(refs, m.ref) if cell else refs.create_dataset("cell", data=np.array([[m.ref]], dtype=h5py.ref_dtype))
        value = f.create_group("value")
        value.create_dataset("img", data=np.array([[img.ref]], dtype=h5py.ref_dtype))
        value.create_dataset("gt", data=np.array([[c.ref]], dtype=h5py.ref_dtype))
    return path


def test_gtsegs_declared_sizes_are_checked_before_reading(tmp_path):
    # 3 x 60000 x 60000 declared (10 GiB), stored in a few KB: refused without allocating it
    path = _mat(tmp_path / "huge.mat", image=lambda r: r.create_dataset(
        "img", shape=(3, 60000, 60000), dtype=np.uint8, chunks=(1, 64, 64), compression="gzip"))
    assert path.stat().st_size < 100_000
    with ImageNetSegmentation(path) as ds:
        with pytest.raises(DataLayoutError, match=r"/value/img 0 declares shape \(3, 60000, 60000\), past 64,000,000 "
                                                  "pixels or 4 channels: refused before reading"):
            ds.image(0)
        with pytest.raises(DataLayoutError, match=r"mask is 4x5 \(H x W\) but its image 60000x60000"):
            ds.mask(0)  # the mask check reads only the image's declared shape


@pytest.mark.parametrize("kind, message", [
    ("group", r"/value/img 0 references an HDF5 group, not an array"),
    ("empty", r"/value/img 0 is empty \(shape \(3, 0, 0\)\)"),
    ("float", r"image 0 holds float64 values that are not whole numbers in 0\.\.255 \(e\.g\. 300\.7\): refused, not "
              r"wrapped to uint8"),
])
def test_gtsegs_crafted_images_are_refused_with_a_message(tmp_path, kind, message):
    make = {"group": lambda r: r.create_group("img"),
            "empty": lambda r: r.create_dataset("img", data=np.zeros((3, 0, 0), np.uint8)),
            "float": lambda r: r.create_dataset("img", data=np.full((3, 5, 4), 300.7))}[kind]
    with ImageNetSegmentation(_mat(tmp_path / "x.mat", image=make)) as ds:
        with pytest.raises(DataLayoutError, match=message):
            ds.image(0)


def test_gtsegs_crafted_masks_are_refused_with_a_message(tmp_path):
    empty_cell = _mat(tmp_path / "cell.mat", cell=lambda r, ref: r.create_dataset(
        "cell", shape=(0, 0), dtype=h5py.ref_dtype))
    with ImageNetSegmentation(empty_cell) as ds:
        with pytest.raises(DataLayoutError, match=r"/value/gt entry 0 is an empty cell \(no mask\)"):
            ds.mask(0)
    group = _mat(tmp_path / "group.mat", mask=lambda r: r.create_group("mask"))
    with ImageNetSegmentation(group) as ds:
        with pytest.raises(DataLayoutError, match=r"/value/gt cell 0 references an HDF5 group"):
            ds.mask(0)
    nan = _mat(tmp_path / "nan.mat", mask=lambda r: r.create_dataset("mask", data=np.full((5, 4), np.nan)))
    with ImageNetSegmentation(nan) as ds:
        with pytest.raises(DataLayoutError, match=r"mask 0 holds NaN or infinite values"):
            ds.mask(0)  # NaN != 0 was taken as foreground
    ok = _mat(tmp_path / "ok.mat")
    with ImageNetSegmentation(ok) as ds:
        assert ds.image(0).shape == (4, 5, 3) and ds.mask(0).shape == (4, 5)


# --------------------------------------------------------------------------------------
# results.hdf5
# --------------------------------------------------------------------------------------


def _results(path, vis=None, target=None):
    with h5py.File(path, "w") as f:
        if isinstance(vis, str) and vis == "group":
            f.create_group("vis")
        elif isinstance(vis, str):
            f.create_dataset("vis", data=np.float32(1))
        else:
            f.create_dataset("vis", data=np.random.default_rng(0).random((2, 1, 4, 4)).astype(np.float32)
                             if vis is None else vis)
        f.create_dataset("image", data=np.zeros((2, 3, 4, 4), np.float32))
        f.create_dataset("target", data=np.array([1, 2], np.int32) if target is None else target)
    return path


def test_results_hdf5_crafted_fields_are_refused_with_a_message(tmp_path):
    with pytest.raises(DataLayoutError, match="'vis' is an HDF5 group, not an array"):
        CheferResults(_results(tmp_path / "g.hdf5", vis="group"))
    with pytest.raises(DataLayoutError, match="'vis' is a scalar, not an array"):
        CheferResults(_results(tmp_path / "s.hdf5", vis="scalar"))
    with CheferResults(_results(tmp_path / "nanlabel.hdf5", target=np.array([1.0, np.nan]))) as r:
        with pytest.raises(DataLayoutError, match="'target' holds nan \\(not a class index\\)"):
            r.read()
    vis = np.zeros((2, 1, 4, 4), np.float32)
    vis[1] = np.nan
    with CheferResults(_results(tmp_path / "nanvis.hdf5", vis=vis)) as r:
        with pytest.raises(DataLayoutError, match="'vis' entry 1 holds NaN or infinite values: not a map to score"):
            r.read()  # an all-NaN map was scored as AUC 0
        with pytest.raises(DataLayoutError, match="'vis' entry 1 holds NaN"):
            r.take([1])
    with CheferResults(_results(tmp_path / "ok.hdf5")) as r:
        assert r.read()["maps"].shape == (2, 4, 4)


# --------------------------------------------------------------------------------------
# Decoded pixels
# --------------------------------------------------------------------------------------


def test_decoding_workers_share_one_pixel_budget(tmp_path, monkeypatch):
    """Eight workers decoding 40x40 images (1,600 px) under a 5,000-pixel budget hold at most 3 at once;
    an image over the whole budget (100x100) waits for it all and runs alone; none deadlocks."""
    budget = preprocess.PixelBudget(5000)
    monkeypatch.setattr(preprocess, "DECODE_BUDGET", budget)
    paths = []
    for i in range(24):
        side = 100 if i == 5 else 40
        p = tmp_path / f"im{i}.png"
        Image.new("RGB", (side, side), (i, 0, 0)).save(p)
        paths.append(p)
    live, peak, lock = [0], [0], threading.Lock()
    real = Image.Image.load

    def counting_load(self):  # the decode itself: count how many images are being decoded at once
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        try:
            threading.Event().wait(0.01)
            return real(self)
        finally:
            with lock:
                live[0] -= 1

    monkeypatch.setattr(Image.Image, "load", counting_load)
    rows = list(pdata.prefetch_batches(len(paths), 6, lambda i: {"x": np.asarray(preprocess.load_image(paths[i]))},
                                        workers=8))
    assert sum(len(r) for _, r in rows) == 24 and rows[0][1][5]["x"].shape == (100, 100, 3)
    assert budget.peak <= 5000 and budget.used == 0 and 1 < peak[0] <= 3
