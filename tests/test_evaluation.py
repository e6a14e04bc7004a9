"""predmaps.evaluation: the perturbation and segmentation tests of Chefer et al. 2021b.

Metrics against hand-computed cases and scikit-learn, the removal order, the file formats
(gtsegs_ijcv.mat, results.hdf5), both tests end to end on a tiny random ViT, the data layouts,
the command line.
"""

import argparse
import dataclasses
import json

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import jaxvit
import predmaps
from jaxvit import ViT, ViTConfig, preprocess
from jaxvit.labels import imagenet_wnids
from predmaps.cli import eval as eval_cli
from predmaps import evaluation as ev
from predmaps.evaluation import metrics as ev_metrics

sklearn_metrics = pytest.importorskip("sklearn.metrics")


# --------------------------------------------------------------------------------------------
# Shared fixtures: a tiny random ViT at the protocol's 224 x 224, a tiny ImageFolder tree.

NUM_CLASSES = 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = ViTConfig(name="tiny-eval", img_size=(224, 224), patch_size=32, embed_dim=16, depth=2, num_heads=2,
                    mlp_dim=32, num_classes=NUM_CLASSES, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    model = ViT(cfg)
    # Unit fan-in random weights (flax's zero head would make every class equal), drawn with numpy
    # from the parameter shapes: no init compilation.
    rng = np.random.default_rng(0)
    def draw(s):
        return (rng.standard_normal(s.shape) * (s.shape[0] ** -0.5 if len(s.shape) == 2 else 0.3)).astype(np.float32)

    params = jax.tree_util.tree_map(draw, jaxvit.checkpoint.param_shapes(cfg))
    path = jaxvit.save(tmp_path_factory.mktemp("ckpt") / "tiny", cfg, params)
    return model, params, path


def _write_images(folder, n, rng, prefix=""):
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        h, w = rng.integers(30, 60, 2)
        # Smooth blobs so the tiny model's predictions depend on content, not only noise.
        yy, xx = np.mgrid[0:h, 0:w]
        base = rng.integers(0, 255, 3)
        img = (base + 60 * np.sin(xx[..., None] / rng.uniform(3, 9) + rng.uniform(0, 6, 3))
               + rng.integers(0, 40, (h, w, 3))).clip(0, 255).astype(np.uint8)
        name = f"{prefix}img_{i:03d}.png"
        Image.fromarray(img).save(folder / name)
        names.append(name)
    return names


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """ImageFolder tree with the first NUM_CLASSES ImageNet wnids (labels 0..3), 9 images."""
    root = tmp_path_factory.mktemp("val")
    rng = np.random.default_rng(0)
    wnids = imagenet_wnids()[:NUM_CLASSES]
    for c, n in zip(wnids, (3, 2, 2, 2)):
        _write_images(root / c, n, rng)
    return root


_FORWARDS = {}


def _reference_hits(model, params, unit, labels, target="pred", modes=ev.MODES):
    """The perturbation test written plainly: per image, numpy's stable argsort, numpy masking;
    the model once per image on its len(modes) * 10 masked versions."""
    x = preprocess.normalize(unit, (0.5,) * 3, (0.5,) * 3)
    tgt = "top" if target == "pred" else np.asarray(labels)
    ex = predmaps.explain(model, params, x, method="predicatt", target=tgt)
    maps = np.asarray(predmaps.upsample(ex.maps[:, 0], (224, 224), normalize=True))
    if id(model) not in _FORWARDS:
        _FORWARDS[id(model)] = jax.jit(lambda p, x: model.apply({"params": p}, x).logits)
    forward = _FORWARDS[id(model)]
    counts = np.zeros((len(modes), len(ev.STEPS)), int)
    for i in range(len(unit)):
        flat = maps[i].ravel()
        masked = []
        for mode in modes:
            order = np.argsort(-flat if mode == "positive" else flat, kind="stable")
            for s in ev.STEPS:
                img = unit[i].reshape(-1, 3).copy()
                img[order[:int(224 * 224 * s)]] = 0.0
                masked.append(img.reshape(224, 224, 3))
        masked += [masked[0]] * (20 - len(masked))  # one compiled shape
        logits = forward(params, jnp.asarray(preprocess.normalize(np.stack(masked), (0.5,) * 3, (0.5,) * 3)))
        preds = np.argmax(np.asarray(logits), -1)[: len(modes) * len(ev.STEPS)].reshape(len(modes), -1)
        counts += preds == labels[i]
    return counts, maps


# --------------------------------------------------------------------------------------------
# Perturbation metrics


def test_auc_of_known_curves():
    assert ev.perturbation_auc([1.0] * 10) == pytest.approx(90.0, abs=1e-12)
    assert ev.perturbation_auc([0.0] * 10) == 0.0
    acc = [1 - s for s in ev.STEPS]  # linear: integral of 1 - x over [0, 0.9] = 0.9 - 0.405
    assert ev.perturbation_auc(acc) == pytest.approx(49.5, abs=1e-12)
    acc = [0.8, 0.6, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1, 0.05]
    hand = 0.1 * (sum(acc) - (acc[0] + acc[-1]) / 2) * 100
    assert ev.perturbation_auc(acc) == pytest.approx(hand, abs=1e-10)
    assert ev.perturbation_auc(acc) == pytest.approx(np.trapezoid(acc, ev.STEPS) * 100, abs=1e-12)
    assert ev.perturbation_auc(acc) != pytest.approx(np.mean(acc) * 100)  # not the mean accuracy


def test_pixels_removed_per_step():
    assert [ev.num_removed(s, 224 * 224) for s in ev.STEPS] == [
        0, 5017, 10035, 15052, 20070, 25088, 30105, 35123, 40140, 45158]


def test_masking_removes_exactly_k_top_or_bottom_pixels_in_all_channels():
    rng = np.random.default_rng(0)
    maps = (rng.integers(0, 6, (2, 224, 224)) / 5).astype(np.float32)  # heavy ties
    unit = rng.uniform(0.05, 1.0, (2, 224, 224, 3)).astype(np.float32)  # no zero before masking
    for mode in ev.MODES:
        masks = np.asarray(ev.removal_masks(maps, mode))
        out = np.asarray(ev.remove_pixels(jnp.asarray(unit[None]), jnp.asarray(masks)))
        for si, s in enumerate(ev.STEPS):
            k = int(224 * 224 * s)
            for b in range(2):
                zero = out[si, b] == 0
                assert zero.sum() == 3 * k
                np.testing.assert_array_equal(zero[..., 0], zero[..., 1])
                np.testing.assert_array_equal(zero[..., 0], zero[..., 2])
                np.testing.assert_array_equal(out[si, b][~zero], unit[b][~zero])
                # The documented order: value first (decreasing / increasing), then pixel index.
                flat = maps[b].ravel()
                order = np.argsort(-flat if mode == "positive" else flat, kind="stable")
                expect = np.zeros(flat.size, bool)
                expect[order[:k]] = True
                np.testing.assert_array_equal(zero[..., 0].ravel(), expect)
                if 0 < k:
                    removed, kept = flat[expect], flat[~expect]
                    if mode == "positive":
                        assert removed.min() >= kept.max()
                    else:
                        assert removed.max() <= kept.min()


def test_removal_ranks_by_hand_and_constant_maps():
    m = np.array([[0.5, 1.0, 0.5], [0.0, 1.0, 0.5]], np.float32)
    np.testing.assert_array_equal(ev.removal_ranks(m, "positive"), [[2, 0, 3], [5, 1, 4]])
    np.testing.assert_array_equal(ev.removal_ranks(m, "negative"), [[1, 4, 2], [0, 5, 3]])
    for c in (np.zeros((3, 3)), np.full((3, 3), np.nan), np.array([[0.0, -0.0, 0.0]] * 3)):
        for mode in ev.MODES:  # all ties: removal in pixel-index order
            np.testing.assert_array_equal(np.asarray(ev.removal_ranks(c, mode)).ravel(), np.arange(9))
    r, const = ev.minmax_normalize(np.stack([np.full((4, 4), 3.0), np.full((4, 4), np.nan), np.eye(4) * 2 + 1]))
    np.testing.assert_array_equal(const, [True, True, False])
    np.testing.assert_array_equal(r[:2], 0.0)
    np.testing.assert_array_equal(r[2], np.eye(4))


# --------------------------------------------------------------------------------------------
# Average precision and segmentation metrics


@pytest.mark.parametrize("n", [7, 64, 1000, 2 * 224 * 224])
def test_ap_equals_sklearn_including_ties(n):
    rng = np.random.default_rng(n)
    for levels in (None, 2, 5, 50):
        s = rng.random((3, n)).astype(np.float32)
        if levels:
            s = np.round(s * levels) / levels
        y = rng.random((3, n)) < rng.uniform(0.1, 0.9)
        y[:, 0] = True
        ours = np.asarray(ev.average_precision(s, y))  # batched over the leading axis
        for b in range(3):
            ref = sklearn_metrics.average_precision_score(y[b], s[b])
            assert ours[b] == pytest.approx(ref, abs=2e-6)
            assert ev.average_precision_numpy(s[b], y[b]) == pytest.approx(ref, abs=1e-12)


def test_ap_by_hand():
    # Ranking: 0.9 (+), 0.8 (-), 0.8 (+), 0.1 (-): thresholds 0.9 -> P 1, R 1/2; 0.8 -> P 2/3, R 1.
    assert float(ev.average_precision([0.1, 0.8, 0.8, 0.9], [0, 0, 1, 1])) == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert float(ev.average_precision([0.3, 0.3, 0.3, 0.3], [0, 1, 0, 1])) == pytest.approx(0.5)  # all tied
    assert float(ev.average_precision([0.3, 0.2], [0, 0])) == 0.0  # no positive


def test_segmentation_metrics_by_hand():
    r1 = np.array([[0.0, 0.2], [0.9, 1.0]], np.float32)  # mean 0.525 -> foreground on the bottom row
    g1 = np.array([[0, 1], [1, 1]])
    r2 = np.zeros((2, 2), np.float32)  # a constant map, all-foreground mask
    g2 = np.ones((2, 2), int)
    counts = ev.segmentation_counts(np.stack([r1, r2]), np.array([False, True]), np.stack([g1, g2]))
    np.testing.assert_array_equal(counts["correct"], [3, 0])
    np.testing.assert_array_equal(counts["labeled"], [4, 4])
    np.testing.assert_array_equal(counts["inter"], [[1, 2], [0, 0]])
    np.testing.assert_array_equal(counts["union"], [[2, 3], [4, 4]])
    # AP, image 1: scores [1-R, R] = [1, .8, .1, 0 | 0, .2, .9, 1], labels [1, 0, 0, 0 | 0, 1, 1, 1]:
    # threshold 1: 2/2 correct (R 2/4); .9: 3/3 (R 3/4); .8: 3/4; .2: 4/5 (R 1) -> .5 + .25 + .25 * .8.
    # Image 2: the reference's NaN scores set to 0 -> all tied -> AP = fraction of positives = 0.5.
    np.testing.assert_allclose(counts["ap"], [0.95, 0.5], atol=1e-6)
    totals = ev.SegmentationTotals()
    totals.update(counts)
    assert totals.pixel_accuracy == pytest.approx(3 / 8)
    np.testing.assert_allclose(totals.iou, [1 / 6, 2 / 7])
    assert totals.miou == pytest.approx((1 / 6 + 2 / 7) / 2)
    assert totals.mean_ap == pytest.approx((0.95 + 0.5) / 2, abs=1e-6)
    # Padding rows are dropped.
    t2 = ev.SegmentationTotals()
    t2.update(counts, valid=np.array([True, False]))
    assert (t2.n, t2.correct, t2.labeled) == (1, 3, 4)


def test_segmentation_ap_matches_reference_construction():
    """AP as Chefer's get_ap_scores builds it: [1-R, R] against one-hot [gt==0, gt==1], flattened together."""
    rng = np.random.default_rng(1)
    raw = rng.random((3, 14, 14)).astype(np.float32)
    raw[2] = 0.25  # constant
    r, const = ev.minmax_normalize(predmaps.upsample(raw, (224, 224)))
    gt = rng.random((3, 224, 224)) < 0.3
    gt[1] = True  # all-foreground mask
    ours = np.asarray(ev.segmentation_counts(r, const, gt)["ap"])
    r = np.asarray(r)
    for b in range(3):
        rb = np.where(const[b], np.nan, r[b])  # the reference's NaN for a constant map
        pred = np.nan_to_num(np.stack([1 - rb, rb]))
        onehot = np.stack([~gt[b], gt[b]]).astype(int)
        ref = sklearn_metrics.average_precision_score(onehot.ravel(), pred.ravel())
        assert ours[b] == pytest.approx(ref, abs=2e-6)
    assert ours[2] == pytest.approx(0.5)


# --------------------------------------------------------------------------------------------
# Files: gtsegs_ijcv.mat and results.hdf5


def _build_mat(path, images, masks, wnids):
    """The structure of gtsegs_ijcv.mat, written here directly with h5py (independent of the package)."""
    with h5py.File(path, "w") as f:
        refs = f.create_group("#refs#")
        n = len(images)
        img = np.empty((n, 1), h5py.ref_dtype)
        gt = np.empty((n, 1), h5py.ref_dtype)
        ids = np.empty((n, 1), h5py.ref_dtype)
        tgt = np.empty((n, 1), h5py.ref_dtype)
        for i in range(n):
            img[i, 0] = refs.create_dataset(f"a{i}", data=np.transpose(images[i], (2, 1, 0))).ref  # (C, W, H)
            mask = refs.create_dataset(f"b{i}", data=masks[i].T.astype(np.uint8))  # (W, H)
            cell = np.empty((1, 1), h5py.ref_dtype)
            cell[0, 0] = mask.ref
            gt[i, 0] = refs.create_dataset(f"c{i}", data=cell).ref
            ids[i, 0] = refs.create_dataset(f"d{i}", data=np.array([[ord(ch)] for ch in wnids[i]], np.uint16)).ref
            tgt[i, 0] = refs.create_dataset(f"e{i}", data=np.array([[i + 1.0]])).ref
        f.create_dataset("value/img", data=img)
        f.create_dataset("value/gt", data=gt)
        f.create_dataset("value/id", data=ids)
        f.create_dataset("value/target", data=tgt)


@pytest.fixture(scope="module")
def seg_file(tmp_path_factory):
    rng = np.random.default_rng(3)
    images, masks = [], []
    for i in range(5):
        h, w = 40 + 3 * i, 57 - 2 * i  # non-square: a missed transpose shows
        images.append(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        m = np.zeros((h, w), np.uint8)
        m[h // 4: 3 * h // 4, w // 3:] = 1
        masks.append(m)
    masks[4][:] = 1  # an all-foreground mask
    wnids = list(imagenet_wnids()[10:15])
    path = tmp_path_factory.mktemp("seg") / "gtsegs_ijcv.mat"
    _build_mat(path, images, masks, wnids)
    return path, images, masks, wnids


def test_mat_reader_on_built_file(seg_file, tmp_path):
    path, images, masks, wnids = seg_file
    with ev.ImageNetSegmentation(path) as ds:
        assert len(ds) == 5
        for i in range(5):
            np.testing.assert_array_equal(ds.image(i), images[i])
            np.testing.assert_array_equal(ds.mask(i), masks[i])
            assert ds.mask(i).dtype == np.uint8 and ds.image(i).shape == images[i].shape
            assert ds.wnid(i) == wnids[i]
    # The package's own writer produces the same structure.
    other = ev.write_segmentation_mat(tmp_path / "copy.mat", images, masks, wnids)
    with ev.ImageNetSegmentation(other) as ds:
        np.testing.assert_array_equal(ds.image(3), images[3])
        np.testing.assert_array_equal(ds.mask(3), masks[3])
    # A folder holding the file works too.
    with ev.ImageNetSegmentation(path.parent) as ds:
        assert len(ds) == 5


def test_mask_of_another_shape_than_its_image_is_refused(tiny, seg_file, tmp_path):
    """A mask whose (H, W) differs from its image's (here transposed) raises a DataLayoutError
    naming the entry and both shapes, from the reader and from the segmentation test, instead of
    being resized on its own and scored against the wrong pixels; the other entries still read."""
    model, params, _ = tiny
    _, images, masks, _ = seg_file
    bad = list(masks)
    bad[1] = masks[1].T.copy()  # 43 x 55 image, 55 x 43 mask
    path = ev.write_segmentation_mat(tmp_path / "transposed.mat", images, bad)
    with ev.ImageNetSegmentation(path) as ds:
        np.testing.assert_array_equal(ds.mask(0), masks[0])
        with pytest.raises(ev.DataLayoutError, match=r"transposed.mat: entry 1: mask is 55x43 \(H x W\) but its "
                                                     r"image 43x55"):
            ds.mask(1)
    with pytest.raises(ev.DataLayoutError, match="entry 1: mask is 55x43"):
        ev.segmentation_test(model, params, path, batch_size=2)


def test_chefer_hdf5_roundtrip_layout(tmp_path):
    rng = np.random.default_rng(0)
    maps = rng.random((3, 224, 224)).astype(np.float32)
    unit = rng.random((3, 224, 224, 3)).astype(np.float32)
    labels = np.array([1, 0, 3])
    path = ev.write_chefer_hdf5(tmp_path / "results.hdf5", maps, unit, labels)
    with h5py.File(path, "r") as f:  # exactly the reference's layout
        assert f["vis"].shape == (3, 1, 224, 224) and f["vis"].dtype == np.float32
        assert f["image"].shape == (3, 3, 224, 224) and f["image"].dtype == np.float32
        assert f["target"].shape == (3,) and f["target"].dtype == np.int32
        np.testing.assert_array_equal(f["image"][1], unit[1].transpose(2, 0, 1))
    back = ev.read_chefer_hdf5(path)
    np.testing.assert_array_equal(back["maps"], maps)
    np.testing.assert_array_equal(back["unit"], unit)
    np.testing.assert_array_equal(back["labels"], labels)


def test_scores_from_hdf5_equal_in_memory_and_independent_of_batch_size(tiny, tmp_path):
    model, params, _ = tiny
    rng = np.random.default_rng(5)
    n = 7
    unit = rng.random((n, 224, 224, 3)).astype(np.float32)
    maps = rng.random((n, 224, 224)).astype(np.float32)
    maps[2] = 0.0  # constant
    maps[3] = (rng.integers(0, 3, (224, 224)) / 2).astype(np.float32)  # ties
    labels = rng.integers(0, NUM_CLASSES, n)
    mem = ev.score_maps(model, params, unit, maps, labels, batch_size=4)
    path = ev.write_chefer_hdf5(tmp_path / "results.hdf5", maps, unit, labels)
    with ev.CheferResults(path) as r:
        disk = ev.score_maps(model, params, r, None, None, batch_size=4)
        sub = ev.score_maps(model, params, r, None, None, batch_size=4, indices=[1, 2, 5])
    assert disk.correct == mem.correct and disk.auc == mem.auc and mem.n == n
    assert sub.correct == ev.score_maps(model, params, unit[[1, 2, 5]], maps[[1, 2, 5]], labels[[1, 2, 5]],
                                        batch_size=4).correct
    # Batch size changes nothing: 4 pads the last batch with one image, 7 is one full batch.
    assert ev.score_maps(model, params, unit, maps, labels, batch_size=7).correct == mem.correct
    # Step 0 is the clean accuracy, the same for both modes.
    assert mem.correct["positive"][0] == mem.correct["negative"][0]
    assert mem.clean_accuracy == mem.correct["positive"][0] / n


def test_chefer_images_outside_unit_range_are_refused(tiny, tmp_path):
    """A results.hdf5 whose 'image' holds 0..255 or mean/std-normalised values (not [0, 1]) is
    refused with a DataLayoutError naming the file and the range found, by batch and by take,
    rather than scored at a wrong clean accuracy; [0, 1] within 1e-6 (float32 rounding) is read.
    Arrays given to score_maps or CheferWriter are refused alike."""
    model, params, _ = tiny
    rng = np.random.default_rng(2)
    unit = rng.random((3, 3, 224, 224)).astype(np.float32)  # as stored: (n, 3, H, W)
    unit[0, 0, 0, 0], unit[1, 0, 0, 0] = 0.0, 1.0
    unit[2, 0, 0, 0] = 1 + 5e-7  # an ulp-scale overshoot is kept

    def write(name, image):
        with h5py.File(tmp_path / name, "w") as f:
            f["vis"] = rng.random((3, 1, 224, 224)).astype(np.float32)
            f["image"] = image
            f["target"] = np.array([0, 1, 2], np.int32)
        return tmp_path / name

    with ev.CheferResults(write("ok.hdf5", unit)) as r:
        np.testing.assert_array_equal(r.batch(0, 3)["unit"], unit.transpose(0, 2, 3, 1))
    for name, image, lo, hi in (("u255.hdf5", unit * 255, "0", "255"), ("norm.hdf5", unit * 2 - 1, "-1", "1")):
        path = write(name, image)
        with ev.CheferResults(path) as r:
            with pytest.raises(ev.DataLayoutError, match=rf"{name}: 'image' among entries 0\.\.2 holds values in "
                                                         rf"\[{lo}, {hi}[.0-9]*\]; .*\[0, 1\]"):
                ev.score_maps(model, params, r, None, None, batch_size=3)
            with pytest.raises(ev.DataLayoutError, match=rf"entries 1\.\.2 holds values"):
                r.take([1, 2])
    rest = unit.copy()
    rest[1:] *= 255  # refused in the batch holding it, not sooner
    with ev.CheferResults(write("late.hdf5", rest)) as r:
        assert r.batch(0, 1)["unit"].shape == (1, 224, 224, 3)
        with pytest.raises(ev.DataLayoutError, match="entries 1..2"):
            r.batch(1, 3)
    # Arrays too: scored directly, or written for other tools
    hwc = (unit * 255).transpose(0, 2, 3, 1)
    with pytest.raises(ev.DataLayoutError, match=r"score_maps: unit holds values in \[0, 255"):
        ev.score_maps(model, params, hwc, hwc[..., 0], np.array([0, 1, 2]), batch_size=3)
    writer = ev.CheferWriter(tmp_path / "w.hdf5")
    try:
        with pytest.raises(ev.DataLayoutError, match=r"append to .*w\.hdf5: unit holds values in \[0, 255"):
            writer.append(hwc[..., 0], hwc, np.array([0, 1, 2]))
    finally:
        writer.abort()


# --------------------------------------------------------------------------------------------
# End to end on the tiny model


def test_perturbation_end_to_end_matches_plain_loop(tiny, tree, tmp_path):
    model, params, _ = tiny
    images = ev.imagenet_val(tree)
    assert images.layout == "class folders" and len(images) == 9
    np.testing.assert_array_equal(images.labels, [0, 0, 0, 1, 1, 2, 2, 3, 3])
    res = ev.perturbation_test(model, params, images, batch_size=4, save_maps=tmp_path / "ours.hdf5")
    unit = np.stack([preprocess.to_unit(preprocess.load_image(p), 224) for p in images.paths])
    ref, ref_maps = _reference_hits(model, params, unit, images.labels)
    assert res.correct == {"positive": ref[0].tolist(), "negative": ref[1].tolist()}
    assert res.n == 9 and set(res.auc) == {"positive", "negative"}
    # (The last batch of 4 was padded with 3 images: the plain loop above has no batches.)
    # The written maps are Chefer's layout and score the same through the hdf5 path.
    saved = ev.read_chefer_hdf5(tmp_path / "ours.hdf5")
    np.testing.assert_allclose(saved["maps"], ref_maps, atol=2e-5)
    np.testing.assert_array_equal(saved["unit"], unit)
    with ev.CheferResults(tmp_path / "ours.hdf5") as r:
        assert ev.score_maps(model, params, r, None, None, batch_size=4).correct == res.correct


def test_perturbation_skips_an_unreadable_image_and_scores_the_rest(tiny, tree, tmp_path, capsys):
    """One corrupt file among the images: the test goes on, counts only the readable ones (the
    same counts as without the file), and lists it; skip_unreadable=False stops at it instead."""
    import shutil

    model, params, ckpt = tiny
    bad_tree = tmp_path / "val"
    shutil.copytree(tree, bad_tree)
    wnid = sorted(p.name for p in bad_tree.iterdir())[1]
    (bad_tree / wnid / "zz_truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    images = ev.imagenet_val(bad_tree)
    assert len(images) == 10
    res = ev.perturbation_test(model, params, images, batch_size=4)
    clean = ev.perturbation_test(model, params, ev.imagenet_val(tree), batch_size=4)
    assert res.n == 9 and res.correct == clean.correct
    assert [u["path"] for u in res.info["unreadable"]] == [str(bad_tree / wnid / "zz_truncated.png")]
    with pytest.raises(preprocess.ImageLoadError, match="zz_truncated.png"):
        ev.perturbation_test(model, params, images, batch_size=4, skip_unreadable=False)
    out = tmp_path / "p.json"
    assert _run_cli(["eval", "perturbation", "--model", str(ckpt), "--data", str(bad_tree), "--batch-size", "4",
                     "--json", str(out), "--quiet"]) == 0
    assert "skipped 1 unreadable image(s), not counted in the 9 above (listed in the JSON)" in capsys.readouterr().err
    js = json.loads(out.read_text())
    assert js["n_images"] == 9 and len(js["unreadable"]) == 1


def test_segmentation_end_to_end(tiny, seg_file):
    model, params, _ = tiny
    path, images, masks, _ = seg_file
    res = ev.segmentation_test(model, params, path, batch_size=2)
    assert res.n == 5
    # The same numbers by hand from the pieces: plain resize, nearest masks, explain, upsample.
    unit = np.stack([preprocess.to_unit(img, 224) for img in images])
    gt = np.stack([np.asarray(Image.fromarray(m).resize((224, 224), Image.NEAREST)) for m in masks])
    ex = predmaps.explain(model, params, preprocess.normalize(unit, (0.5,) * 3, (0.5,) * 3), target="top")
    r = np.asarray(predmaps.upsample(ex.maps[:, 0], (224, 224), normalize=True))
    fg = r > r.mean(axis=(1, 2), keepdims=True)
    inter = [int((~fg & (gt == 0)).sum()), int((fg & (gt == 1)).sum())]
    union = [int((~fg | (gt == 0)).sum()), int((fg | (gt == 1)).sum())]
    # Given maps are min-max normalised again, as the reference does. In float32 that can move a
    # value of R or 1 - R by one ulp, which splits or joins a tie between the two halves of the
    # ranked scores (a change of ~1e-4 in AP on these maps, seen after an unrelated change in the
    # attention kernel). So AP is checked exactly against scikit-learn on the scores the
    # evaluator ranks, and to 5e-4 against scikit-learn on numpy's 1 - R, R.
    labels = [np.stack([gt[b] == 0, gt[b] == 1]).ravel() for b in range(5)]
    ranked = [np.concatenate([np.ravel(s) for s in ev_metrics.segmentation_ap_scores(*ev.minmax_normalize(r[b]))])
              for b in range(5)]
    aps = [sklearn_metrics.average_precision_score(labels[b], ranked[b]) for b in range(5)]
    aps_numpy = [sklearn_metrics.average_precision_score(labels[b], np.stack([1 - r[b], r[b]]).ravel())
                 for b in range(5)]
    # Given maps (in the file's order) are scored exactly so; batch size changes nothing.
    given = ev.segmentation_test(None, None, path, maps=r, batch_size=2)
    assert given.totals.correct == int((fg == (gt == 1)).sum()) and given.totals.labeled == 5 * 224 * 224
    assert given.totals.inter.tolist() == inter and given.totals.union.tolist() == union
    np.testing.assert_allclose(given.totals.ap, aps, atol=2e-6)
    np.testing.assert_allclose(given.totals.ap, aps_numpy, atol=5e-4)
    assert given.mean_ap == pytest.approx(np.mean(aps), abs=2e-6)
    assert ev.segmentation_test(None, None, path, maps=r, batch_size=3).to_dict()["totals"] == \
        given.to_dict()["totals"]
    # Maps computed inside the evaluation's jit differ from predmaps.explain's by float rounding only.
    assert abs(res.totals.correct - given.totals.correct) <= 20
    np.testing.assert_allclose(res.totals.ap, given.totals.ap, atol=1e-4)
    sub = ev.segmentation_test(model, params, path, batch_size=2, limit=2, subset="first")
    assert sub.n == 2 and sub.totals.ap == pytest.approx(res.totals.ap[:2], abs=1e-7)


def test_segmentation_with_the_timm_transform_crops_masks_with_their_images(tiny, seg_file):
    """transform="timm": images through the model's eval transform, masks through the same resize
    and crop (nearest); the counts equal a by-hand computation on those pieces."""
    model, params, _ = tiny
    path, images, masks, _ = seg_file
    cfg = model.config
    res = ev.segmentation_test(model, params, path, batch_size=2, transform="timm")
    assert res.info["transform"] == "timm" and res.n == 5
    unit = np.stack([preprocess.eval_transform(img, img_size=224, mean=(0.0,) * 3, std=(1.0,) * 3,
                                               interpolation=cfg.interpolation, crop_pct=cfg.crop_pct)
                     for img in images])
    gt = np.stack([preprocess.eval_geometry(Image.fromarray(m), img_size=224, resample=Image.Resampling.NEAREST,
                                            crop_pct=cfg.crop_pct) for m in masks])
    ex = predmaps.explain(model, params, preprocess.normalize(unit, (0.5,) * 3, (0.5,) * 3), target="top")
    r = np.asarray(predmaps.upsample(ex.maps[:, 0], (224, 224), normalize=True))
    fg = r > r.mean(axis=(1, 2), keepdims=True)
    inter = np.array([(~fg & (gt == 0)).sum(), (fg & (gt == 1)).sum()])
    union = np.array([(~fg | (gt == 0)).sum(), (fg | (gt == 1)).sum()])
    # Maps computed inside the evaluation's jit differ from predmaps.explain's by float rounding only
    # (a few pixels at the mean threshold); plain-resized masks would move thousands.
    np.testing.assert_allclose(res.totals.inter, inter, atol=20)
    np.testing.assert_allclose(res.totals.union, union, atol=20)
    plain = np.stack([ev.resize_mask(m) for m in masks])
    assert np.abs(res.totals.union - np.array([(~fg | (plain == 0)).sum(), (fg | (plain == 1)).sum()])).max() > 500


# --------------------------------------------------------------------------------------------
# Data layouts and errors


def test_flat_layouts_and_subsets(tmp_path):
    rng = np.random.default_rng(2)
    wn = imagenet_wnids()
    flat = tmp_path / "flat"
    names = _write_images(flat, 4, rng, prefix="ILSVRC2012_")
    (flat / "val.txt").write_text(f"{names[0]} {wn[7]}\n{names[1]} 3\n{names[2]} 999\n{names[3]} {wn[0]}\n"
                                  "extra_not_on_disk.JPEG 5\n")
    lst = ev.imagenet_val(flat)
    assert lst.labels.tolist() == [7, 3, 999, 0] and "val.txt" in lst.layout
    # Kaggle's LOC_val_solution.csv, given explicitly (stems, first wnid of the prediction string).
    (tmp_path / "kaggle").mkdir()
    csv = tmp_path / "kaggle" / "LOC_val_solution.csv"
    csv.write_text("ImageId,PredictionString\n" + "".join(
        f"{n.rsplit('.', 1)[0]},{wn[i + 20]} 1 2 3 4 {wn[1]} 5 6 7 8\n" for i, n in enumerate(names)))
    assert ev.imagenet_val(flat, labels_file=csv).labels.tolist() == [20, 21, 22, 23]
    # Files named <wnid>_*.
    named = tmp_path / "named"
    for i, c in enumerate((5, 900)):
        _write_images(named, 1, rng, prefix=f"{wn[c]}_x{i}_")
    assert ev.imagenet_val(named).labels.tolist() == [5, 900]
    # The devkit ground truth with meta.mat (ILSVRC2012_IDs are not synset order).
    scipy_io = pytest.importorskip("scipy.io")
    dev = tmp_path / "dev"
    for i in range(3):
        _write_images(dev, 1, rng, prefix=f"ILSVRC2012_val_{i + 1:08d}_")
    for p in sorted(dev.iterdir()):
        p.rename(dev / (p.name.split("_img")[0] + ".png"))
    synsets = np.zeros((3,), dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")])
    for j, (sid, widx) in enumerate([(1, 500), (2, 3), (3, 42)]):
        synsets[j] = (sid, wn[widx], 0)
    scipy_io.savemat(dev / "meta.mat", {"synsets": synsets})
    (dev / "ILSVRC2012_validation_ground_truth.txt").write_text("2\n3\n1\n")
    assert ev.imagenet_val(dev).labels.tolist() == [3, 42, 500]
    # Deterministic subsets.
    a = ev.subset_indices(100, 10, seed=0)
    assert a.tolist() == ev.subset_indices(100, 10, seed=0).tolist() and np.all(np.diff(a) > 0)
    assert a.tolist() != ev.subset_indices(100, 10, seed=1).tolist()
    assert ev.subset_indices(100, 10, mode="first").tolist() == list(range(10))
    assert len(ev.subset_indices(5, 10)) == 5


def test_errors_name_the_expected_layout(tmp_path, tree):
    with pytest.raises(ev.DataLayoutError, match="class folders"):
        ev.imagenet_val(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ev.DataLayoutError, match="holds no images"):
        ev.imagenet_val(tmp_path / "empty")
    bad = tmp_path / "bad_tree"
    (bad / "cats").mkdir(parents=True)
    _write_images(bad / "cats", 1, np.random.default_rng(0))
    with pytest.raises(ev.DataLayoutError, match="WordNet ids.*cats"):
        ev.imagenet_val(bad)
    assert ev.imagenet_val(bad, class_order="sorted").labels.tolist() == [0]
    flat = tmp_path / "flat"
    names = _write_images(flat, 2, np.random.default_rng(0))
    with pytest.raises(ev.DataLayoutError, match="label file"):
        ev.imagenet_val(flat)  # no label file, names are not <wnid>_*
    (flat / "labels.txt").write_text(f"{names[0]} 3\n")
    with pytest.raises(ev.DataLayoutError, match="no label for 1 image"):
        ev.imagenet_val(flat)
    (flat / "labels.txt").write_text(f"{names[0]} 3\n{names[1]} kitten\n")
    with pytest.raises(ev.DataLayoutError, match="neither an ImageNet-1k wnid"):
        ev.imagenet_val(flat)
    # Segmentation file errors.
    not_h5 = tmp_path / "gtsegs_ijcv.mat"
    not_h5.write_bytes(b"MATLAB 5.0 MAT-file, not HDF5")
    with pytest.raises(ev.DataLayoutError, match="/value/img"):
        ev.ImageNetSegmentation(not_h5)
    with h5py.File(tmp_path / "partial.mat", "w") as f:
        f.create_dataset("value/img", data=np.zeros((2, 1)))
    with pytest.raises(ev.DataLayoutError, match="object references"):
        ev.ImageNetSegmentation(tmp_path / "partial.mat")
    with pytest.raises(ev.DataLayoutError, match="gtsegs_ijcv.mat"):
        ev.ImageNetSegmentation(tmp_path / "nowhere.mat")
    # results.hdf5 errors.
    with h5py.File(tmp_path / "r.hdf5", "w") as f:
        f.create_dataset("vis", data=np.zeros((2, 1, 8, 8), np.float32))
    with pytest.raises(ev.DataLayoutError, match="missing dataset.*image.*'vis' \\(n,1,H,W\\)"):
        ev.CheferResults(tmp_path / "r.hdf5")


# --------------------------------------------------------------------------------------------
# Command line


def _parser():
    parser = argparse.ArgumentParser(prog="predmaps")
    eval_cli.add_eval_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def _run_cli(argv):
    args = _parser().parse_args(argv)
    return args.fn(args)


def test_cli_perturbation_and_segmentation(tiny, tree, seg_file, tmp_path, capsys):
    model, params, ckpt = tiny
    out = tmp_path / "p.json"
    rc = _run_cli(["eval", "perturbation", "--model", str(ckpt), "--method", "predicatt", "--layer", "-1",
                   "--target", "gt", "--mode", "negative", "--data", str(tree), "--batch-size", "4", "--limit", "4",
                   "--seed", "1", "--json", str(out), "--quiet"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "negative" in text and "AUC" in text and "ground-truth class" in text
    js = json.loads(out.read_text())
    assert js["n_images"] == 4 and js["steps"] == list(ev.STEPS) and js["target"] == "gt"
    assert js["removed_pixels"][1] == 5017 and js["layout"] == "class folders" and js["limit"] == 4
    assert set(js["auc"]) == {"negative"} and len(js["accuracy"]["negative"]) == 10
    assert js["auc"]["negative"] == pytest.approx(ev.perturbation_auc(js["accuracy"]["negative"]))
    # Maps for the ground-truth class, checked against the plain loop on the same subset.
    images = ev.imagenet_val(tree, limit=4, seed=1)
    unit = np.stack([preprocess.to_unit(preprocess.load_image(p), 224) for p in images.paths])
    ref, _ = _reference_hits(model, params, unit, images.labels, target="gt", modes=("negative",))
    assert js["correct"] == {"negative": ref[0].tolist()}
    out2 = tmp_path / "s.json"
    rc = _run_cli(["eval", "segmentation", "--model", str(ckpt), "--method", "predicatt", "--data", str(seg_file[0]),
                   "--batch-size", "2", "--json", str(out2), "--quiet"])
    assert rc == 0
    assert "mIoU" in capsys.readouterr().out
    js = json.loads(out2.read_text())
    assert js["n_images"] == 5 and len(js["ap_per_image"]) == 5 and 0 <= js["pixel_accuracy"] <= 1
    assert js["map"] == pytest.approx(np.mean(js["ap_per_image"])) and js["transform"] == "resize"
    assert js["method"] == "predicatt" and js["layer"] == 2  # layer -1 = L, this depth-2 model's 2
    rc = _run_cli(["eval", "segmentation", "--model", str(ckpt), "--data", str(seg_file[0]), "--transform", "timm",
                   "--batch-size", "2", "--json", str(out2), "--quiet"])
    assert rc == 0 and json.loads(out2.read_text())["transform"] == "timm"


def test_cli_evaluates_at_the_model_input_size_or_the_one_asked(tiny, tree, seg_file, tmp_path, capsys):
    # The CLI used to run every model at 224 x 224, also with --transform timm: a 64 x 64 model was
    # explained at 224 through resampled position embeddings (its clean accuracy fell from 95% to 10%).
    model, params, _ = tiny
    small = dataclasses.replace(model.config, name="tiny-eval-64", img_size=(64, 64))
    pos = params["pos_embed"]  # (1, 1 + 7 * 7, D) -> the class token's and 2 x 2 of the patches'
    ckpt = jaxvit.save(tmp_path / "small", small, {**params, "pos_embed": pos[:, :5]})
    out = tmp_path / "p.json"
    common = ["--method", "predicatt", "--mode", "negative", "--data", str(tree), "--batch-size", "4", "--limit", "2",
              "--json", str(out), "--quiet"]
    assert _run_cli(["eval", "perturbation", "--model", str(ckpt), *common]) == 0
    js = json.loads(out.read_text())
    assert js["image_size"] == [64, 64] and js["removed_pixels"][-1] == round(0.9 * 64 * 64)
    assert _run_cli(["eval", "perturbation", "--model", str(ckpt), "--image-size", "96x128", "--transform", "timm",
                     *common]) == 0
    assert json.loads(out.read_text())["image_size"] == [96, 128]
    assert _run_cli(["eval", "segmentation", "--model", str(ckpt), "--data", str(seg_file[0]), "--batch-size", "2",
                     "--limit", "2", "--json", str(out), "--quiet"]) == 0
    assert json.loads(out.read_text())["image_size"] == [64, 64]
    with pytest.raises(SystemExit) as e:
        _parser().parse_args(["eval", "perturbation", "--model", str(ckpt), "--image-size", "0x64"])
    assert e.value.code == 2 and "--image-size takes N or HxW" in capsys.readouterr().err
    rc = _run_cli(["eval", "perturbation", "--model", str(ckpt), "--maps", str(tmp_path / "none.hdf5"),
                   "--image-size", "64", "--quiet"])
    assert rc == 2 and "--image-size would be ignored" in capsys.readouterr().err


def test_cli_errors(tiny, tmp_path, capsys):
    _, _, ckpt = tiny
    rc = _run_cli(["eval", "perturbation", "--model", str(ckpt), "--method", "predicatt",
                   "--data", str(tmp_path / "nope"), "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "class folders" in err and "label file" in err
    rc = _run_cli(["eval", "segmentation", "--model", str(ckpt), "--data", str(tmp_path / "x.mat"), "--quiet"])
    assert rc == 2 and "/value/gt" in capsys.readouterr().err
    rc = _run_cli(["eval", "perturbation", "--model", str(ckpt), "--maps", str(tmp_path / "none.hdf5"), "--quiet"])
    assert rc == 2 and "results.hdf5" in capsys.readouterr().err
    # Options that shape computed maps are refused with --maps instead of being ignored.
    rc = _run_cli(["eval", "perturbation", "--model", str(ckpt), "--maps", str(tmp_path / "none.hdf5"),
                   "--method", "rollout", "--target", "gt", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "--method, --target would be ignored" in err and "drop them" in err
    rc = _run_cli(["eval", "segmentation", "--model", str(ckpt), "--data", str(tmp_path / "x.mat"),
                   "--maps", str(tmp_path / "none.hdf5"), "--layer", "-2", "--quiet"])
    assert rc == 2 and "--layer would be ignored" in capsys.readouterr().err
    # An output file that cannot be written: an error before the test runs, not after.
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    rc = _run_cli(["eval", "perturbation", "--model", str(ckpt), "--data", str(tmp_path / "nope"),
                   "--json", str(blocker / "p.json"), "--quiet"])
    assert rc == 2 and f"--json {blocker / 'p.json'} cannot be written" in capsys.readouterr().err
    # A results.hdf5 whose labels lie outside the model's classes: an error before any image is scored.
    rng = np.random.default_rng(0)
    bad = ev.write_chefer_hdf5(tmp_path / "bad_labels.hdf5", rng.random((2, 224, 224)).astype(np.float32),
                               rng.random((2, 224, 224, 3)).astype(np.float32), np.array([1, NUM_CLASSES]))
    rc = _run_cli(["eval", "perturbation", "--model", str(ckpt), "--maps", str(bad), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "'target' labels (entry 1): class index 4 is out of range (0..3 for a 4-class model)" in err
    assert "bad_labels.hdf5" in err
