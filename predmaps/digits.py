"""Digit scenes: seeded, on-the-fly images of real handwritten digits on textured backgrounds.

The digits are the UCI "Optical Recognition of Handwritten Digits" test set that ships inside
scikit-learn (`sklearn.datasets.load_digits`: 1,797 scans of 8x8 pixels, intensities 0..16).
They are split once, by a fixed permutation, into disjoint train (1,438) and test (359) digits.

A scene is an RGB canvas (64x64 by default) with a random background (two colours blended along
a random direction, smoothed noise, faint stripes, pixel noise) and one or two digits, each
warped by a random affine map (size 20-32 px on a 64 px canvas, +-12 degree rotation, shear,
anisotropic scale, stroke gain), bilinearly resampled from the 8x8 scan and painted in a colour
that contrasts with the background (light digits on a dark background or dark on light).
The digit's opacity is its resampled intensity, so the foreground mask is exact: the pixels
whose opacity exceeds `MASK_THRESHOLD`.

    images, labels, masks = one_digit_scenes(256, "train", seed=0)   # uint8 (256, 64, 64, 3)
    images, labels, masks = two_digit_scenes(64, "test", seed=1)     # labels (64, 2), masks (64, 2, 64, 64)
    x = normalize(images)                                            # float32, (x / 255 - 0.5) / 0.5

Everything is vectorised numpy and deterministic for a given (n, split, seed, size).
`load_model()` returns the ViT trained on these scenes (`python -m predmaps.train_digits`),
shipped in `predmaps/assets/vit_digits_patch8_64/`.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import numpy as np

DIGIT_MEAN = (0.5, 0.5, 0.5)
DIGIT_STD = (0.5, 0.5, 0.5)
LABEL_NAMES = tuple(str(i) for i in range(10))
MASK_THRESHOLD = 0.3  # opacity above which a pixel belongs to the digit
SPLITS = ("train", "test")
NUM_DIGITS = 1797
NUM_TRAIN = 1438  # ~80%; the remaining 359 are the test digits
SPLIT_SEED = 20240607  # the fixed permutation that decides the split; never change it
ASSET_DIR = Path(__file__).resolve().parent / "assets" / "vit_digits_patch8_64"

# Digit size on a 64 px canvas (scaled with the canvas), and the warp ranges.
_SIDE_RANGE = (20.0, 32.0)
_MAX_ROTATION = np.deg2rad(12.0)
_MAX_SHEAR = 0.15
_SCALE_RANGE = (0.85, 1.0)
_GAIN_RANGE = (1.0, 1.6)
_DARK_SHARE = 0.5  # share of dark backgrounds with light digits (the rest: dark digits on light)
_POSITION_JITTER = 1.0  # 1: anywhere on the canvas; 0: centred
_TEXTURE = 1.0  # scale of the background texture
_PAD = 2  # zero border around each 8x8 scan, so bilinear sampling fades out at the edges


@functools.lru_cache(maxsize=1)
def _all_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.asarray(data.images, np.float32) / 16.0  # (1797, 8, 8) in [0, 1]
    labels = np.asarray(data.target, np.int64)
    if images.shape != (NUM_DIGITS, 8, 8):
        raise RuntimeError(f"unexpected sklearn digits shape {images.shape}")
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def split_indices(split: str) -> np.ndarray:
    """Indices into `sklearn.datasets.load_digits()` of the train or test digits (disjoint, fixed)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
    perm = np.random.default_rng(SPLIT_SEED).permutation(NUM_DIGITS)
    idx = perm[:NUM_TRAIN] if split == "train" else perm[NUM_TRAIN:]
    return np.sort(idx)


@functools.lru_cache(maxsize=2)
def digit_set(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images float32 (m, 8, 8) in [0, 1], labels int64 (m,)) of one split."""
    images, labels = _all_digits()
    idx = split_indices(split)
    out = images[idx], labels[idx]
    return out


@functools.lru_cache(maxsize=2)
def _by_class(split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Padded digits of a split sorted by class, their `load_digits` indices, each class's start and count."""
    images, labels = digit_set(split)
    order = np.argsort(labels, kind="stable")
    index = split_indices(split)[order]
    padded = np.pad(images[order], ((0, 0), (_PAD, _PAD), (_PAD, _PAD)))
    counts = np.bincount(labels, minlength=10)
    if (counts == 0).any():
        raise RuntimeError(f"split {split!r} lacks a class")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return padded, index, starts, counts


def _rng(seed: int, split: str, kind: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), SPLITS.index(split), kind])


def _sample_digits(rng, classes: np.ndarray, split: str) -> tuple[np.ndarray, np.ndarray]:
    """One random digit of each requested class: padded scans (n, 8 + 2 PAD, 8 + 2 PAD) and their
    indices into `sklearn.datasets.load_digits()`."""
    padded, index, starts, counts = _by_class(split)
    pick = starts[classes] + np.floor(rng.random(classes.shape) * counts[classes]).astype(np.int64)
    return padded[pick], index[pick]


def _upsample_matrix(size: int, coarse: int) -> np.ndarray:
    """(size, coarse) bilinear interpolation weights, align-corners."""
    pos = np.linspace(0.0, coarse - 1.0, size)
    i0 = np.clip(np.floor(pos).astype(int), 0, coarse - 2)
    w = pos - i0
    m = np.zeros((size, coarse), np.float32)
    m[np.arange(size), i0] = 1 - w
    m[np.arange(size), i0 + 1] += w
    return m


def _backgrounds(rng, n: int, size: int, difficulty=1.0) -> tuple[np.ndarray, np.ndarray]:
    """Random textured backgrounds (n, size, size, 3) in [0, 1] and their polarity (n,) (True: dark).

    `difficulty` (scalar or (n,)) scales the texture (0 leaves the plain colour gradient) and the
    share of light digits on dark backgrounds (none at 0, half from 0.5 on)."""
    d1 = np.broadcast_to(np.asarray(difficulty, np.float32), (n,))
    d = _TEXTURE * d1[:, None, None, None]
    dark = rng.random(n) < _DARK_SHARE * np.minimum(1, 2 * d1)  # below difficulty 0.5, more dark digits on light
    c0, c1 = rng.random((2, n, 3), dtype=np.float32)
    lo = np.where(dark, 0.0, 0.58)[:, None].astype(np.float32)
    c0, c1 = lo + 0.42 * c0, lo + 0.42 * c1
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5

    def ramp(angle):  # (n, size, size): position along a direction through the centre, in canvas units
        return (np.cos(angle)[:, None, None] * coords[None, None, :]
                + np.sin(angle)[:, None, None] * coords[None, :, None])

    # Linear blend c0 -> c1 along a random direction.
    t = np.clip(ramp(rng.uniform(0, 2 * np.pi, n).astype(np.float32)) * np.float32(2 ** 0.5) + 0.5, 0, 1)
    bg = c0[:, None, None] + t[..., None] * (c1 - c0)[:, None, None]
    # Smoothed colour noise: a coarse 6x6 grid per channel, bilinearly upsampled.
    up = _upsample_matrix(size, 6)
    coarse = 0.05 * rng.standard_normal((n, 3, 6, 6), dtype=np.float32)
    smooth = up @ coarse @ up.T  # (n, 3, size, size)
    # Faint stripes of random frequency, direction and phase, and pixel noise (uniform, std 0.025).
    psi = rng.uniform(0, 2 * np.pi, n).astype(np.float32)
    freq = rng.uniform(2, 8, n).astype(np.float32) * np.float32(2 * np.pi)
    phase = rng.uniform(0, 2 * np.pi, n).astype(np.float32)
    amp = rng.uniform(0, 0.05, n).astype(np.float32)
    stripes = amp[:, None, None] * np.sin(freq[:, None, None] * ramp(psi) + phase[:, None, None])
    noise = rng.random((n, size, size, 3), dtype=np.float32)
    noise -= 0.5
    noise *= np.float32(0.025 * 12 ** 0.5)
    noise += stripes[..., None]
    noise += smooth.transpose(0, 2, 3, 1)
    noise *= d
    bg += noise
    np.clip(bg, 0, 1, out=bg)
    return bg, dark


def _digit_colours(rng, dark: np.ndarray) -> np.ndarray:
    """Colours (n, 3) that contrast with the background: light on dark, dark on light."""
    c = rng.random((dark.shape[0], 3)).astype(np.float32)
    return np.where(dark[:, None], 0.68 + 0.32 * c, 0.32 * c)


def _render_alpha(rng, digits: np.ndarray, side: np.ndarray, top: np.ndarray, left: np.ndarray,
                  size: int, difficulty=1.0) -> np.ndarray:
    """Opacity (n, size, size) of padded digits warped into the boxes [top, top + side) x [left, left + side)."""
    n = digits.shape[0]
    d = np.broadcast_to(np.asarray(difficulty, np.float64), (n,))
    theta = d * rng.uniform(-_MAX_ROTATION, _MAX_ROTATION, n)
    shear = d * rng.uniform(-_MAX_SHEAR, _MAX_SHEAR, n)
    sy, sx = 1 - d * (1 - rng.uniform(*_SCALE_RANGE, (2, n)))
    gain = rng.uniform(*_GAIN_RANGE, n).astype(np.float32)
    # Forward map (digit units, (y, x), about the centre) = R(theta) @ Shear @ diag(sy, sx); invert it.
    cos, sin = np.cos(theta), np.sin(theta)
    rot = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)
    sh = np.stack([np.stack([np.ones(n), np.zeros(n)], -1), np.stack([shear, np.ones(n)], -1)], -2)
    scl = np.stack([np.stack([sy, np.zeros(n)], -1), np.stack([np.zeros(n), sx], -1)], -2)
    inv = np.linalg.inv(rot @ sh @ scl).astype(np.float32)  # (n, 2, 2)
    pix = np.arange(size, dtype=np.float32) + 0.5
    ry = (pix[None, :] - (top + side / 2)[:, None]) * (8.0 / side)[:, None]  # (n, size) digit units
    rx = (pix[None, :] - (left + side / 2)[:, None]) * (8.0 / side)[:, None]
    # Source coordinates (pixel-index convention: the scan's pixel i has its centre at i) in the padded scan.
    uy = inv[:, 0, 0, None, None] * ry[:, :, None] + inv[:, 0, 1, None, None] * rx[:, None, :] + 3.5 + _PAD
    ux = inv[:, 1, 0, None, None] * ry[:, :, None] + inv[:, 1, 1, None, None] * rx[:, None, :] + 3.5 + _PAD
    p = digits.shape[-1]
    y0, x0 = np.floor(uy), np.floor(ux)
    wy, wx = uy - y0, ux - x0
    y0 = np.clip(y0.astype(np.int64), 0, p - 2)
    x0 = np.clip(x0.astype(np.int64), 0, p - 2)
    wy, wx = np.clip(wy, 0, 1), np.clip(wx, 0, 1)
    flat = digits.reshape(n, p * p)
    base = y0 * p + x0

    def at(offset):
        return np.take_along_axis(flat, (base + offset).reshape(n, size * size), axis=1).reshape(base.shape)

    val = ((1 - wy) * ((1 - wx) * at(0) + wx * at(1)) + wy * ((1 - wx) * at(p) + wx * at(p + 1)))
    # Outside the padded scan the digit is empty; outside its box it is cut (so boxes bound the masks).
    inside = (uy >= 0) & (uy <= p - 1) & (ux >= 0) & (ux <= p - 1)
    in_box = (((pix[None, :] >= top[:, None]) & (pix[None, :] < (top + side)[:, None]))[:, :, None]
              & ((pix[None, :] >= left[:, None]) & (pix[None, :] < (left + side)[:, None]))[:, None, :])
    alpha = np.clip(val * gain[:, None, None], 0, 1) * inside * in_box
    return alpha.astype(np.float32)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def _check(n: int, split: str, size: int):
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size}")


def render_one_digit(n: int, split: str, seed: int, size: int = 64, *, difficulty=1.0) -> dict[str, np.ndarray]:
    """`one_digit_scenes` with its ingredients.

    Keys: images, labels, masks (as returned by `one_digit_scenes`); background float32
    (n, size, size, 3) in [0, 1]; alpha float32 (n, size, size), the digit's opacity (the image is
    `background * (1 - alpha) + colour * alpha`, rounded to uint8; masks = alpha > MASK_THRESHOLD);
    colour (n, 3); box (n, 3) = (top, left, side) in pixels, which bounds the digit; digit_index
    (n,), the scan's index in `sklearn.datasets.load_digits()`.
    """
    _check(n, split, size)
    rng = _rng(seed, split, 1)
    labels = rng.integers(0, 10, n)
    digits, digit_index = _sample_digits(rng, labels, split)
    d = np.asarray(difficulty, np.float32)
    if d.shape not in ((), (n,)):
        raise ValueError(f"difficulty must be a number or one per scene, shape ({n},); got shape {d.shape}")
    d = np.broadcast_to(d, (n,))
    if not ((d >= 0) & (d <= 1)).all():  # NaN fails too: it rendered scenes with no digit
        raise ValueError(f"difficulty must lie in [0, 1]; got {np.unique(d[~((d >= 0) & (d <= 1))])[:5].tolist()}")
    bg, dark = _backgrounds(rng, n, size, d)
    colour = _digit_colours(rng, dark)
    lo, hi = _SIDE_RANGE
    side = (hi - d * (hi - lo) * (1 - rng.random(n))).astype(np.float32) * (size / 64)
    centre = (size - side) / 2
    top = (centre + _POSITION_JITTER * d * (rng.random(n) * (size - side) - centre)).astype(np.float32)
    left = (centre + _POSITION_JITTER * d * (rng.random(n) * (size - side) - centre)).astype(np.float32)
    alpha = _render_alpha(rng, digits, side, top, left, size, d)
    a = alpha[..., None]
    image = _to_uint8(bg * (1 - a) + colour[:, None, None] * a)
    return dict(images=image, labels=labels, masks=alpha > MASK_THRESHOLD, background=bg, alpha=alpha,
                colour=colour, box=np.stack([top, left, side], -1), digit_index=digit_index)


def render_two_digit(n: int, split: str, seed: int, size: int = 64) -> dict[str, np.ndarray]:
    """`two_digit_scenes` with its ingredients, as `render_one_digit`; alpha, colour, box and
    digit_index have a digit axis 1 (the digits are painted in that order; their boxes are disjoint)."""
    _check(n, split, size)
    rng = _rng(seed, split, 2)
    first = rng.integers(0, 10, n)
    second = (first + rng.integers(1, 10, n)) % 10  # uniform over the other nine classes
    labels = np.stack([first, second], 1)
    sampled = [_sample_digits(rng, labels[:, j], split) for j in range(2)]
    digits = [d for d, _ in sampled]
    digit_index = np.stack([i for _, i in sampled], 1)
    bg, dark = _backgrounds(rng, n, size)
    colours = np.stack([_digit_colours(rng, dark) for _ in range(2)], 1)
    side = rng.uniform(*_SIDE_RANGE, (2, n)).astype(np.float32) * (size / 64)
    # Disjoint boxes: along a random axis the digits follow each other in a random order (the
    # sides are at most half the canvas, so both always fit); the other axis is free.
    a0 = rng.random(n) * (size - side[0] - side[1])
    b0 = a0 + side[0] + rng.random(n) * (size - side[1] - a0 - side[0])
    swap = rng.random(n) < 0.5  # mirrored: the second digit comes first along the axis
    pos_first = np.where(swap, size - a0 - side[0], a0)
    pos_second = np.where(swap, size - b0 - side[1], b0)
    free = rng.random((2, n)) * (size - side)
    vertical = rng.random(n) < 0.5
    top = np.stack([np.where(vertical, pos_first, free[0]), np.where(vertical, pos_second, free[1])]).astype(np.float32)
    left = np.stack([np.where(vertical, free[0], pos_first), np.where(vertical, free[1], pos_second)]).astype(np.float32)
    alphas = np.stack([_render_alpha(rng, digits[j], side[j], top[j], left[j], size) for j in range(2)], 1)
    image = bg
    for j in range(2):
        a = alphas[:, j, ..., None]
        image = image * (1 - a) + colours[:, j, None, None] * a
    return dict(images=_to_uint8(image), labels=labels, masks=alphas > MASK_THRESHOLD, background=bg,
                alpha=alphas, colour=colours, box=np.stack([top.T, left.T, side.T], -1), digit_index=digit_index)


def one_digit_scenes(n: int, split: str, seed: int, size: int = 64, *,
                     difficulty=1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n scenes of one digit from `split` ("train" or "test").

    Returns images uint8 (n, size, size, 3), labels int64 (n,) in 0..9, masks bool (n, size, size)
    (the digit's pixels). Deterministic for a given (n, split, seed, size).

    `difficulty` (a scalar or one value per scene, in [0, 1]; 1, the default, is the scene
    distribution described in the module docstring) shrinks the variation for a training
    curriculum: at 0 the digit is centred, 32 px (on 64), unwarped, dark, on an untextured light gradient.
    """
    r = render_one_digit(n, split, seed, size, difficulty=difficulty)
    return r["images"], r["labels"], r["masks"]


def two_digit_scenes(n: int, split: str, seed: int, size: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n scenes of two digits of different classes, in disjoint boxes.

    Returns images uint8 (n, size, size, 3), labels int64 (n, 2) (two different classes),
    masks bool (n, 2, size, size) (each digit's pixels; the two never overlap).
    """
    r = render_two_digit(n, split, seed, size)
    return r["images"], r["labels"], r["masks"]


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 images (..., 3) -> float32 (x / 255 - DIGIT_MEAN) / DIGIT_STD, the model's input."""
    x = np.asarray(images, np.float32) / 255.0
    return (x - np.asarray(DIGIT_MEAN, np.float32)) / np.asarray(DIGIT_STD, np.float32)


@functools.partial(jax.jit, static_argnums=0)
def _logits(model, params, x):
    return model.apply({"params": params}, x).logits


def scene_accuracy(model, params, x, labels, batch: int = 250) -> float:
    """Accuracy of `model` on normalised scenes x (n, S, S, 3) (see `normalize`).

    labels (n,): top-1 accuracy. labels (n, 2) (two-digit scenes): the share of scenes whose two
    classes are the model's top two.
    """
    labels = np.asarray(labels)
    n = labels.shape[0]
    if n == 0:
        return float("nan")
    k = 1 if labels.ndim == 1 else labels.shape[1]
    hits = []
    for i in range(0, n, batch):
        top = np.asarray(jax.lax.top_k(_logits(model, params, x[i:i + batch]), k)[1])
        want = labels[i:i + batch].reshape(len(top), k)
        hits.append((np.sort(top, 1) == np.sort(want, 1)).all(1))
    return float(np.concatenate(hits).mean())


MEASURED_FILE = "measured.json"  # beside a digits model: what the locality study measured of it


def trust_note(path: str | Path | None = None) -> str:
    """One line on how far the digits model at `path` (default: the shipped one) can be trusted, from the
    `measured.json` that `python -m predmaps.evaluation.digit_locality --measured` writes beside it;
    '' when there is none."""
    import json

    f = Path(path or ASSET_DIR) / MEASURED_FILE
    if not f.is_file():
        return ""
    m = json.loads(f.read_text())
    layers = ", ".join(f"{i}: {100 * a:.0f}% / {100 * b:.0f}%"
                       for i, (a, b) in enumerate(zip(m["patch_accuracy_on_digit"], m["patch_accuracy_background"])))
    return (f"How far to trust these maps: on {m['two_digit_scenes']} held-out two-digit scenes, this model's "
            f"PredicAtt_L puts more of its mass on the digit of the class it explains than on the other digit in "
            f"{100 * m['predicatt_L_own_beats_other']:.1f}% of cases (50% is a class-agnostic map); its patch tokens "
            f"predict the digit's class through the head on the digit / on background, by layer, {layers} "
            f"(docs/digit-locality.md).")


def load_model(path: str | Path | None = None, **kwargs):
    """(jaxvit module, params) of the digit-scene ViT shipped with predmaps (or one at `path`)."""
    import convert

    return convert.load(str(path or ASSET_DIR), **kwargs)
