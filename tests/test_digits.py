"""Tests of the digit-scene generator (`predmaps.digits`), the training script, and the shipped
digit ViT (`predmaps/assets/vit_digits_patch8_64`): its accuracy and its parity with timm."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("sklearn")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import convert  # noqa: E402
import jaxvit  # noqa: E402
from predmaps import digits, train_digits  # noqa: E402

ASSET = digits.ASSET_DIR
needs_asset = pytest.mark.skipif(not (ASSET / "model.safetensors").exists(), reason="digit ViT not shipped")


# ---------------------------------------------------------------- the split

def test_split_is_disjoint_fixed_and_covers_every_class():
    from sklearn.datasets import load_digits

    train, test = digits.split_indices("train"), digits.split_indices("test")
    assert len(train) == digits.NUM_TRAIN and len(test) == digits.NUM_DIGITS - digits.NUM_TRAIN
    assert not set(train.tolist()) & set(test.tolist())
    assert sorted(train.tolist() + test.tolist()) == list(range(digits.NUM_DIGITS))
    np.testing.assert_array_equal(train, digits.split_indices("train"))
    target = load_digits().target
    for split, idx in (("train", train), ("test", test)):
        assert set(target[idx].tolist()) == set(range(10))
        images, labels = digits.digit_set(split)
        assert images.shape == (len(idx), 8, 8) and images.dtype == np.float32
        assert 0 <= images.min() and images.max() <= 1
        np.testing.assert_array_equal(labels, target[idx])
    with pytest.raises(ValueError, match="split"):
        digits.split_indices("val")


@pytest.mark.parametrize("split", digits.SPLITS)
def test_scenes_draw_their_split_digits_only(split):
    from sklearn.datasets import load_digits

    target = load_digits().target
    allowed = set(digits.split_indices(split).tolist())
    r1 = digits.render_one_digit(200, split, seed=3)
    r2 = digits.render_two_digit(100, split, seed=3)
    for r in (r1, r2):
        assert set(r["digit_index"].ravel().tolist()) <= allowed
        np.testing.assert_array_equal(target[r["digit_index"]], r["labels"])


# ---------------------------------------------------------------- one-digit scenes

def test_one_digit_shapes_dtypes_and_determinism():
    images, labels, masks = digits.one_digit_scenes(16, "train", seed=7)
    assert images.shape == (16, 64, 64, 3) and images.dtype == np.uint8
    assert labels.shape == (16,) and np.issubdtype(labels.dtype, np.integer)
    assert ((0 <= labels) & (labels <= 9)).all()
    assert masks.shape == (16, 64, 64) and masks.dtype == bool
    again = digits.one_digit_scenes(16, "train", seed=7)
    for a, b in zip((images, labels, masks), again):
        np.testing.assert_array_equal(a, b)
    other = digits.one_digit_scenes(16, "train", seed=8)
    assert not np.array_equal(images, other[0])
    test_split = digits.one_digit_scenes(16, "test", seed=7)
    assert not np.array_equal(images, test_split[0])
    small = digits.one_digit_scenes(3, "test", seed=0, size=32)
    assert small[0].shape == (3, 32, 32, 3) and small[2].shape == (3, 32, 32)
    empty = digits.one_digit_scenes(0, "test", seed=0)
    assert empty[0].shape == (0, 64, 64, 3) and empty[1].shape == (0,)


def test_difficulty_outside_zero_one_is_refused():
    """A difficulty of NaN passed the [0, 1] check and rendered scenes with no digit in them; one of
    the wrong length failed as a bare broadcast error."""
    for bad in (np.nan, -0.1, 1.5, [0.5, np.nan, 0.2]):
        with pytest.raises(ValueError, match=r"difficulty must lie in \[0, 1\]; got \[(nan|-0\.1|1\.5)"):
            digits.one_digit_scenes(3, "test", seed=0, difficulty=bad)
    with pytest.raises(ValueError, match=r"difficulty must be a number or one per scene, shape \(3,\); got shape \(2,\)"):
        digits.one_digit_scenes(3, "test", seed=0, difficulty=[0.1, 0.2])
    assert digits.one_digit_scenes(3, "test", seed=0, difficulty=[0.0, 0.5, 1.0])[2].any(axis=(1, 2)).all()


def test_one_digit_masks_are_the_digit_pixels():
    r = digits.render_one_digit(64, "test", seed=11)
    images, masks, alpha, bg, colour = r["images"], r["masks"], r["alpha"], r["background"], r["colour"]
    np.testing.assert_array_equal(masks, alpha > digits.MASK_THRESHOLD)
    # The image is the background with the digit painted at its opacity, nothing else.
    composed = bg * (1 - alpha[..., None]) + colour[:, None, None] * alpha[..., None]
    np.testing.assert_array_equal(images, np.clip(np.rint(composed * 255), 0, 255).astype(np.uint8))
    # Every scene has a digit of plausible size, inside its box, that stands out from the background.
    area = masks.sum((1, 2))
    assert (area >= 25).all() and (area <= 0.35 * 64 * 64).all()
    ys, xs = np.arange(64) + 0.5, np.arange(64) + 0.5
    for i in range(len(masks)):
        top, left, side = r["box"][i]
        in_box = ((ys >= top) & (ys < top + side))[:, None] & ((xs >= left) & (xs < left + side))[None, :]
        assert not (alpha[i] > 0)[~in_box].any()
        assert 20 <= side <= 32
        fg = images[i][masks[i]].astype(float)
        diff = np.abs(fg - np.rint(bg[i][masks[i]] * 255)).sum(-1)
        assert diff.mean() > 60  # contrast: the digit's pixels differ from the background under them
    # The mask has the digit's shape: pooled back to 8x8 over its box it matches the scan (rotation,
    # shear and scale blur this, so only correlation is asked for).
    # Compared with the scan of a different digit (digit scans correlate ~0.4 among themselves:
    # all are centred strokes), its own scan must correlate better.
    images8, _ = digits._all_digits()
    corr, other = [], []
    for i in range(len(masks)):
        top, left, side = r["box"][i]
        t, lft, s = int(np.ceil(top)), int(np.ceil(left)), int(side)
        crop = alpha[i, t:t + s, lft:lft + s][: s // 8 * 8, : s // 8 * 8]
        pooled = crop.reshape(8, s // 8, 8, s // 8).mean((1, 3))
        corr.append(np.corrcoef(pooled.ravel(), images8[r["digit_index"][i]].ravel())[0, 1])
        other.append(np.corrcoef(pooled.ravel(), images8[(r["digit_index"][i] + 1) % len(images8)].ravel())[0, 1])
    assert np.median(corr) > 0.4 and np.median(corr) > np.median(other) + 0.1


# ---------------------------------------------------------------- two-digit scenes

def test_two_digit_scenes():
    images, labels, masks = digits.two_digit_scenes(64, "test", seed=5)
    assert images.shape == (64, 64, 64, 3) and images.dtype == np.uint8
    assert labels.shape == (64, 2) and masks.shape == (64, 2, 64, 64) and masks.dtype == bool
    assert (labels[:, 0] != labels[:, 1]).all()
    assert ((0 <= labels) & (labels <= 9)).all()
    assert not (masks[:, 0] & masks[:, 1]).any()
    assert (masks.sum((2, 3)) >= 25).all()
    for a, b in zip((images, labels, masks), digits.two_digit_scenes(64, "test", seed=5)):
        np.testing.assert_array_equal(a, b)
    r = digits.render_two_digit(64, "test", seed=5)
    np.testing.assert_array_equal(r["masks"], r["alpha"] > digits.MASK_THRESHOLD)
    # The boxes are disjoint, so the digits cannot overlap at any opacity.
    assert not ((r["alpha"][:, 0] > 0) & (r["alpha"][:, 1] > 0)).any()
    # Over many scenes every ordered pair of different classes occurs and both layouts are used.
    many = digits.two_digit_scenes(2000, "train", seed=0)[1]
    assert len({(a, b) for a, b in many.tolist()}) == 90


def test_normalize():
    images = np.array([[[[0, 128, 255]]]], np.uint8)
    x = digits.normalize(images)
    assert x.dtype == np.float32
    np.testing.assert_allclose(x[0, 0, 0], [-1.0, 128 / 255 * 2 - 1, 1.0], atol=1e-6)
    assert digits.DIGIT_MEAN == (0.5, 0.5, 0.5) and digits.DIGIT_STD == (0.5, 0.5, 0.5)


# ---------------------------------------------------------------- training script

@pytest.mark.slow
def test_train_smoke(tmp_path):
    """Two steps of a tiny model: the script runs end to end and writes a loadable checkpoint."""
    rec = train_digits.train(tmp_path, steps=2, batch=8, warmup=1, embed_dim=32, depth=1, num_heads=2,
                             two_digit_frac=0.25, eval_scenes=8, log_every=1, command="test")
    assert {"model.safetensors", "config.json", "TRAINING.md"} <= {p.name for p in tmp_path.iterdir()}
    assert 0 <= rec["test_acc"] <= 1
    model, params = convert.load(tmp_path)
    assert model.config == train_digits.make_config(32, 1, 2)
    assert "test accuracy" in (tmp_path / "TRAINING.md").read_text().lower()


def test_train_batch_patch_targets_follow_the_digits_and_cutmix_moves_them():
    """Token-labelling targets: a patch's share of digit pixels goes to the digit's class, the rest is
    uniform; CutMix pastes the same box into the image, the patch targets and (by area) the scene target."""
    x, t, dense = train_digits._train_batch(16, 3, 5, 0.25, 64)
    assert x.shape == (16, 64, 64, 3) and t.shape == (16, 10) and dense.shape == (16, 64, 10)
    np.testing.assert_allclose(dense.sum(-1), 1, atol=1e-6)
    np.testing.assert_allclose(t[:12].sum(-1), 1)
    np.testing.assert_allclose(t[12:].max(-1), 0.5)
    # against the masks, by hand, for the first one-digit scene
    _, labels, masks = digits.one_digit_scenes(12, "train", 3 * 1_000_003 + 5, 64, difficulty=1.0)
    cover = masks[0].reshape(8, 8, 8, 8).mean((1, 3)).reshape(64)
    np.testing.assert_allclose(dense[0, :, labels[0]], cover + 0.1 * (1 - cover), atol=1e-6)
    assert np.isclose(dense[0][cover == 0], 0.1).all()
    _, t_ml, _ = train_digits._train_batch(16, 3, 5, 0.25, 64, multilabel=True)
    np.testing.assert_allclose(t_ml[12:].sum(-1), 2)
    xm, tm, dm = train_digits._train_batch(16, 3, 5, 0.25, 64, cutmix=1.0)
    changed = [i for i in range(16) if not np.array_equal(xm[i], x[i])]
    assert len(changed) >= 12  # every scene got a box (a box can copy an identical scene only by chance)
    i = changed[0]
    j = (i + 1) % 16
    same = np.all(xm[i] == x[j], axis=-1)  # the pasted pixels are scene j's
    rows, cols = np.where(same.reshape(8, 8, 8, 8).all((1, 3)))
    assert len(rows) > 0
    np.testing.assert_allclose(dm[i].reshape(8, 8, 10)[rows, cols], dense[j].reshape(8, 8, 10)[rows, cols])
    np.testing.assert_allclose(tm[i].sum(), 1, atol=1e-6)


def test_mixup_blends_each_scene_with_the_next_and_its_targets_alike():
    """Mixup: a mixed scene is lam x itself + (1 - lam) x the next scene, with the same lam on its scene
    and patch targets (recovered from the images, by hand); share 0 changes nothing."""
    x, t, dense = train_digits._train_batch(16, 3, 5, 0.25, 64)
    xm, tm, dm = train_digits._train_batch(16, 3, 5, 0.25, 64, mixup=1.0)
    mixed = 0
    for i in range(16):
        j = (i + 1) % 16
        d = (x[i] - x[j]).ravel()
        lam = float(d @ (xm[i] - x[j]).ravel() / (d @ d))
        np.testing.assert_allclose(xm[i], lam * x[i] + (1 - lam) * x[j], atol=1e-4)
        np.testing.assert_allclose(tm[i], lam * t[i] + (1 - lam) * t[j], atol=1e-4)
        np.testing.assert_allclose(dm[i], lam * dense[i] + (1 - lam) * dense[j], atol=1e-4)
        mixed += not 0.999 < lam < 1.001
    assert mixed >= 12
    np.testing.assert_allclose(dm.sum(-1), 1, atol=1e-5)
    x0, t0, d0 = train_digits._train_batch(16, 3, 5, 0.25, 64, mixup=0.0)
    assert np.array_equal(x0, x) and np.array_equal(t0, t)


def test_strong_augmentation_changes_pixels_not_labels_and_erased_patches_lose_their_class():
    """Strong augmentation: every scene's pixels change, its scene target does not; a patch's
    token-labelling target moves to uniform by the share of it erased (an erased box is found by
    hand as the pixels that differ from every photometric operation's range)."""
    x, t, dense = train_digits._train_batch(32, 3, 5, 0.25, 64)
    xa, ta, da = train_digits._train_batch(32, 3, 5, 0.25, 64, strong_aug=True)
    assert xa.shape == x.shape and xa.dtype == np.float32
    assert all(not np.array_equal(xa[i], x[i]) for i in range(32))
    assert np.array_equal(ta, t)
    np.testing.assert_allclose(da.sum(-1), 1, atol=1e-5)
    changed = [i for i in range(32) if not np.allclose(da[i], dense[i])]
    assert 2 <= len(changed) <= 20  # random erasing at p 0.25 on 32 scenes
    for i in changed:
        moved = ~np.isclose(da[i], dense[i]).all(-1)
        # where the target moved it moved towards uniform, never away
        assert (np.abs(da[i][moved] - 0.1) <= np.abs(dense[i][moved] - 0.1) + 1e-6).all()
    # one operation by hand: posterize at 2**k levels leaves only those levels
    rng = np.random.default_rng(0)
    img = rng.random((8, 8, 3))
    out = train_digits._posterize(img, np.random.default_rng(1))
    assert len(np.unique(out)) <= 16 and (out <= img).all()


def test_train_smoke_with_every_recipe(tmp_path):
    """Token labelling, the sigmoid loss, CutMix and stochastic depth together: finite losses, a
    loadable checkpoint, and the recipe written in TRAINING.md."""
    rec = train_digits.train(tmp_path, steps=2, batch=8, warmup=1, embed_dim=32, depth=2, num_heads=2,
                             two_digit_frac=0.25, eval_scenes=8, log_every=1, command="test", token_label=1.0,
                             multilabel=True, cutmix=0.5, drop_path=0.2, mixup=0.5, strong_aug=True)
    assert rec["token_label"] == 1.0 and rec["multilabel"] and rec["drop_path"] == 0.2
    text = (tmp_path / "TRAINING.md").read_text()
    assert "token labelling, weight 1.0" in text and "sigmoid loss" in text and "CutMix on 50%" in text
    assert "stochastic depth up to 0.2" in text and "Mixup on 50%" in text and "strong augmentation" in text
    convert.load(tmp_path)


def test_stochastic_depth_drops_whole_blocks_and_is_the_model_without_it():
    """`_train_forward` with every block kept is the model's forward; a dropped block passes its input."""
    cfg = train_digits.make_config(32, 2, 2)
    model = jaxvit.ViT(cfg, attention="materialized")
    x = jnp.asarray(digits.normalize(digits.one_digit_scenes(2, "test", 0)[0]))
    params = train_digits.jax_init(model.init(jax.random.key(0), x)["params"], jax.random.key(1))
    params["head"]["kernel"] = 0.1 * jnp.ones_like(params["head"]["kernel"]).at[0].set(1.0)
    logits, last = model.apply({"params": params}, x, method=train_digits._train_forward)
    out = model.apply({"params": params}, x)
    np.testing.assert_allclose(logits, out.logits, atol=1e-6)
    np.testing.assert_allclose(last, out.tokens[:, -1], atol=1e-6)
    keep = jnp.asarray([[1.0, 1.0], [0.0, 0.0]])  # block 1 dropped for both scenes
    _, last = model.apply({"params": params}, x, keep, method=train_digits._train_forward)
    np.testing.assert_allclose(last, out.tokens[:, 1], atol=1e-6)


def _random_head_model(x):
    """A 2-block digits ViT with a random head (so patch tokens' top classes vary) and the head applied
    in numpy, float64, to every patch token of every layer: the hand reference of the locality tests."""
    cfg = train_digits.make_config(32, 2, 2)
    model = jaxvit.ViT(cfg)
    params = train_digits.jax_init(model.init(jax.random.key(0), x[:1])["params"], jax.random.key(1))
    params["head"]["kernel"] = jax.random.normal(jax.random.key(2), params["head"]["kernel"].shape)
    tokens = np.asarray(model.apply({"params": params}, x).tokens, np.float64)[:, :, 1:]  # (B, L+1, N, D)
    mu, var = tokens.mean(-1, keepdims=True), tokens.var(-1, keepdims=True)
    n = np.asarray(params["norm"]["scale"]) * (tokens - mu) / np.sqrt(var + cfg.norm_eps) + np.asarray(params["norm"]["bias"])
    z = n @ np.asarray(params["head"]["kernel"]) + np.asarray(params["head"]["bias"])  # (B, L+1, N, C)
    return model, params, z


def test_patch_locality_counts_patches_on_the_digit_and_on_background():
    """stats.patch_locality against a hand count: the head applied (numpy) to every patch token."""
    from predmaps import stats

    images, labels, masks = digits.one_digit_scenes(6, "test", 4)
    x = digits.normalize(images)
    model, params, z = _random_head_model(x)
    res = stats.patch_locality(model, params, x, labels, masks, batch=4)
    hit = z.argmax(-1) == labels[:, None, None]
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    top2 = np.sort(z, -1)[..., -2:]
    conf, ent = top2[..., 1] - top2[..., 0], -(p * np.log(p)).sum(-1)  # A.6: the logit margin, the entropy
    cover = masks.reshape(6, 8, 8, 8, 8).mean((2, 4)).reshape(6, 64)
    on, bg = cover >= 0.25, cover == 0
    for layer in range(3):
        assert np.isclose(res["on_accuracy"][layer], hit[:, layer][on].mean(), atol=1e-6)
        assert np.isclose(res["background_accuracy"][layer], hit[:, layer][bg].mean(), atol=1e-6)
        for key, ref in (("confidence", conf), ("entropy", ent)):
            assert np.isclose(res[f"on_{key}"][layer], ref[:, layer][on].mean(), atol=1e-5)
            assert np.isclose(res[f"background_{key}"][layer], ref[:, layer][bg].mean(), atol=1e-5)
    assert res["on_patches"] == on.sum() and res["background_patches"] == bg.sum()
    assert np.isclose(res["gap"][-1], res["on_accuracy"][-1] - res["background_accuracy"][-1])


def test_object_locality_counts_each_digits_patches_for_its_class_and_the_others():
    """stats.object_locality on two-digit scenes against a hand count: the head applied (numpy) to
    every patch token, each digit's patches scored against its own class and the other digit's."""
    from predmaps import stats

    images, labels, masks = digits.two_digit_scenes(6, "test", 4)
    x = digits.normalize(images)
    model, params, z = _random_head_model(x)
    res = stats.object_locality(model, params, x, labels, masks, batch=6)
    top = z.argmax(-1)  # (B, L+1, N)
    own, other, count = np.zeros(3), np.zeros(3), 0
    for b in range(6):
        for j in range(2):
            on = masks[b, j].reshape(8, 8, 8, 8).mean((1, 3)).reshape(64) >= 0.25
            own += (top[b][:, on] == labels[b, j]).sum(-1)
            other += (top[b][:, on] == labels[b, 1 - j]).sum(-1)
            count += on.sum()
    np.testing.assert_allclose(res["own_accuracy"], own / count, atol=1e-6)
    np.testing.assert_allclose(res["other_accuracy"], other / count, atol=1e-6)
    assert res["patches"] == count
    with pytest.raises(ValueError, match="different classes"):
        stats.object_locality(model, params, x[:1], labels[:1, [0, 0]], masks[:1])


# ---------------------------------------------------------------- the shipped model

@pytest.fixture(scope="module")
def shipped():
    return convert.load(ASSET)


@needs_asset
def test_shipped_config(shipped):
    model, params = shipped
    cfg = model.config
    assert cfg.name == train_digits.MODEL_NAME
    assert cfg.img_size == (64, 64) and cfg.patch_size == 8 and cfg.grid_size == (8, 8)
    assert cfg.num_classes == 10 and cfg.label_names == digits.LABEL_NAMES
    assert cfg.mean == digits.DIGIT_MEAN and cfg.std == digits.DIGIT_STD
    assert cfg == train_digits.make_config(cfg.embed_dim, cfg.depth, cfg.num_heads)
    assert (ASSET / "model.safetensors").stat().st_size < 5_000_000
    assert json.loads((ASSET / "config.json").read_text())["jaxvit_config"]["name"] == cfg.name
    assert "test accuracy" in (ASSET / "TRAINING.md").read_text().lower()


@needs_asset
def test_shipped_accuracy(shipped):
    model, params = shipped
    # Golden value of the committed checkpoint (TRAINING.md: 0.980 on 1000 test scenes). The scenes
    # are seeded and the forward deterministic on CPU; 0.01 leaves room for another XLA build
    # flipping a borderline scene or two (1 scene = 0.0033).
    acc = train_digits.evaluate(model, params, n=300, split="test", seed=train_digits.EVAL_SEED, batch=150)
    assert abs(acc - 0.97) <= 0.01, acc


@needs_asset
def test_shipped_patch_tokens_are_local_and_its_measurements_are_current(shipped):
    """The embedded model's premise (issue 30): its last-layer patch tokens predict the digit's class
    on the digit far more often than on background; and the measured.json the report quotes is what
    this checkpoint measures on the same scenes (one patch changing its top class moves an accuracy by
    at most 1/2554; the file rounds to 1e-4)."""
    from predmaps import stats

    model, params = shipped
    measured = json.loads((ASSET / digits.MEASURED_FILE).read_text())
    assert measured["one_digit_seed"] == 7 and measured["two_digit_scenes"] == 1000
    images, labels, masks = digits.one_digit_scenes(measured["one_digit_scenes"], "test", 7)
    loc = stats.patch_locality(model, params, digits.normalize(images), labels, masks)
    assert loc["gap"][-1] >= 0.25, loc["gap"]  # issue 30's bar; the old model's was -0.04
    np.testing.assert_allclose(loc["on_accuracy"], measured["patch_accuracy_on_digit"], atol=1e-3)
    np.testing.assert_allclose(loc["background_accuracy"], measured["patch_accuracy_background"], atol=1e-3)
    assert "How far to trust these maps" in digits.trust_note()


@needs_asset
def test_shipped_matches_timm(shipped):
    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    model, params = shipped
    cfg = model.config
    tm = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, patch_size=8,
                           embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, num_classes=10)
    tm.load_state_dict(safetensors_torch.load_file(str(ASSET / "model.safetensors")), strict=True)
    tm.eval()
    images, _, _ = digits.one_digit_scenes(8, "test", seed=1)
    x = digits.normalize(images)
    with torch.no_grad():
        ref = tm(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    ours = np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x).logits)(params, jnp.asarray(x)))
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


# ---------------------------------------------------------------- the locality study

@needs_asset
def test_the_study_renders_its_one_digit_scenes_once_for_the_a6_statistics_and_the_locality(monkeypatch):
    """study_model rendered the same one-digit scenes twice (A.6 statistics, then `locality_of`); now once,
    and its locality equals `locality_of` rendering them itself. The benchmark is left out (its own tests)."""
    import types

    from predmaps.evaluation import digit_locality, digit_scenes

    rendered, render = [], digits.one_digit_scenes
    monkeypatch.setattr(digits, "one_digit_scenes", lambda *a, **k: rendered.append(a) or render(*a, **k))
    monkeypatch.setattr(digit_scenes, "run_benchmark", lambda *a, **k: types.SimpleNamespace(to_dict=dict))
    study = digit_locality.study_model("shipped", str(ASSET), scenes=20, batch_size=10)
    assert len(rendered) == 1
    model, params = digits.load_model(ASSET)
    alone = digit_locality.locality_of(model, params, scenes=20, batch_size=10)
    assert study["locality"] == alone["locality"] and len(study["a6"]["cls_accuracy"]) == model.config.depth + 1
