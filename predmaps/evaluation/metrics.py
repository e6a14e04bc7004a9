"""The metrics of the two evaluation tests, as pure functions (numpy in, or jax arrays under `jit`).

Perturbation test (Chefer et al. 2021b, Table 1 of the paper):

- `STEPS` = 0.0, 0.1, ..., 0.9; at step s, k = int(H * W * s) pixels are removed
  (`num_removed`): 0, 5017, 10035, ... for 224 x 224.
- Removal order (`removal_ranks`), a documented, stable replacement for the reference's
  `torch.topk` (whose order among equal values is unspecified):

  * positive test: pixels in DECREASING map value; equal values in INCREASING flat pixel
    index (row-major, i = y * W + x);
  * negative test: pixels in INCREASING map value; equal values in INCREASING flat pixel
    index (so the negative order is not the positive order reversed).

  NaN map values count as 0 (the reference's constant-map NaN set to 0), and -0.0 and 0.0
  are one value.
- A removed pixel is 0 in all three channels of the [0, 1] image, before normalisation.
- `perturbation_auc`: the trapezoidal integral of the accuracy over x = STEPS, times 100
  (`numpy.trapz(acc, x) * 100`), not the mean accuracy.

Segmentation test (Table 2 of the paper), on `R`, a map upsampled to the mask size and min-max
normalised per image (a constant map is 0 everywhere, see `minmax_normalize`):

- prediction: foreground where R > mean(R) (per-image mean), background otherwise;
- pixel accuracy and mIoU (two classes) from counts summed over the whole data set
  (`segmentation_counts` per image, `SegmentationTotals` to accumulate);
- AP per image (`average_precision`, scikit-learn's `average_precision_score`: step-wise,
  no interpolation) of the 2*H*W scores [1-R, R] against the one-hot labels
  [gt==0, gt==1], ranked jointly; mAP is the mean over images. For a constant map the
  reference's scores are NaN, set to 0 for both channels: every score ties, so AP is the
  fraction of positives, 0.5. `segmentation_ap_scores` reproduces that.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

STEPS: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
MODES: tuple[str, ...] = ("positive", "negative")
TIE_ORDER = ("positive: decreasing map value, ties by increasing flat pixel index (y * W + x); "
             "negative: increasing map value, ties by increasing flat pixel index; NaN counts as 0")
# The reference divides by (eps + total) with eps = np.spacing(1) in float64.
_EPS = float(np.spacing(1, dtype=np.float64))


# --------------------------------------------------------------------------------------------
# Perturbation test


def num_removed(step: float, num_pixels: int) -> int:
    """Pixels removed at `step`: int(num_pixels * step), as the reference computes it."""
    return int(num_pixels * step)


def perturbation_auc(accuracy, steps=STEPS) -> float:
    """Area under the accuracy curve: trapezoid rule over x = `steps`, times 100.

    Equal to `numpy.trapz(accuracy, steps) * 100` (the same formula, written out: numpy 2
    renamed trapz). `accuracy` is a fraction in [0, 1] per step; [1] * 10 gives 90.0.
    """
    y = np.asarray(accuracy, dtype=np.float64)
    x = np.asarray(steps, dtype=np.float64)
    if y.shape != x.shape or y.ndim != 1:
        raise ValueError(f"accuracy {y.shape} and steps {x.shape} must be 1-D of the same length")
    return float((np.diff(x) * (y[1:] + y[:-1]) / 2.0).sum() * 100.0)


def _mode_positive(mode) -> bool:
    if mode in ("positive", True):
        return True
    if mode in ("negative", False):
        return False
    raise ValueError(f"mode must be 'positive' or 'negative'; got {mode!r}")


@functools.partial(jax.jit, static_argnames="mode")
def removal_ranks(maps, mode="positive") -> jax.Array:
    """The position at which each pixel is removed: int32 (..., H, W), 0 = removed first.

    `maps` (..., H, W). Order: see the module docstring (`TIE_ORDER`). At step s the removed
    pixels are exactly those with rank < num_removed(s, H * W).
    """
    maps = jnp.asarray(maps, jnp.float32)
    shape = maps.shape
    flat = maps.reshape(shape[:-2] + (-1,))
    flat = jnp.where(jnp.isnan(flat), 0.0, flat)
    key = -flat if _mode_positive(mode) else flat
    key = jnp.where(key == 0, 0.0, key)  # -0.0 -> 0.0: one tie group
    n = flat.shape[-1]
    iota = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), flat.shape)
    # Sort (key, index) by key; the sort is stable, so equal keys keep increasing index order.
    _, order = jax.lax.sort((key, iota), dimension=flat.ndim - 1, num_keys=1, is_stable=True)
    # Invert the permutation: rank[order[j]] = j.
    _, ranks = jax.lax.sort((order, iota), dimension=flat.ndim - 1, num_keys=1, is_stable=True)
    return ranks.reshape(shape)


@functools.partial(jax.jit, static_argnames=("mode", "steps"))
def removal_masks(maps, mode="positive", steps=STEPS) -> jax.Array:
    """bool (S, ..., H, W): True where step s removes the pixel."""
    maps = jnp.asarray(maps)
    h, w = maps.shape[-2:]
    ks = jnp.asarray([num_removed(s, h * w) for s in steps], jnp.int32)
    ranks = removal_ranks(maps, mode)
    return ranks[None] < ks.reshape((-1,) + (1,) * ranks.ndim)


@jax.jit
def remove_pixels(images_unit, masks) -> jax.Array:
    """Zero the masked pixels in all channels: images (..., H, W, C) in [0, 1], masks (..., H, W)."""
    return jnp.where(masks[..., None], jnp.zeros((), images_unit.dtype), images_unit)


# --------------------------------------------------------------------------------------------
# Maps


@jax.jit
def minmax_normalize(maps) -> tuple[jax.Array, jax.Array]:
    """Per-map min-max over the last two axes: (R, constant).

    A constant map (max == min), or one containing NaN, gives R = 0 everywhere and
    constant = True: the reference's NaN, set to 0 explicitly.
    """
    maps = jnp.asarray(maps, jnp.float32)
    lo = maps.min(axis=(-2, -1), keepdims=True)
    hi = maps.max(axis=(-2, -1), keepdims=True)
    ok = hi > lo  # False for NaN too
    r = jnp.where(ok, (maps - lo) / jnp.where(ok, hi - lo, 1.0), 0.0)
    return r, ~ok[..., 0, 0]


# --------------------------------------------------------------------------------------------
# Average precision (scikit-learn's definition)


def _accurate_sum(x, block: int = 256):
    """Sum over the last axis in two levels (blocks of `block`), for float32 accuracy."""
    n = x.shape[-1]
    pad = (-n) % block
    if pad:
        x = jnp.concatenate([x, jnp.zeros(x.shape[:-1] + (pad,), x.dtype)], axis=-1)
    return x.reshape(x.shape[:-1] + (-1, block)).sum(-1).sum(-1)


@jax.jit
def average_precision(scores, labels) -> jax.Array:
    """Average precision over the last axis, batched over the leading ones.

    The definition of scikit-learn's `average_precision_score` for binary labels:
    AP = sum_n (R_n - R_{n-1}) P_n over the distinct score thresholds in decreasing order
    (equal scores form one threshold), precision and recall step-wise, no interpolation.
    Equivalently the mean, over the positives, of the precision at the threshold of the
    positive's score. No positives gives 0 (scikit-learn warns and returns 0 or NaN by version;
    the reference applies nan_to_num). Computed in float32 with a blocked sum (float64 when
    jax_enable_x64 is on).
    """
    scores = jnp.asarray(scores)
    if not jnp.issubdtype(scores.dtype, jnp.floating):
        scores = scores.astype(jnp.float32)
    labels = jnp.asarray(labels)
    if scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must have the same shape")
    ax = scores.ndim - 1
    n = scores.shape[-1]
    y = (labels > 0).astype(jnp.int32)
    key = -scores
    key = jnp.where(key == 0, jnp.zeros((), key.dtype), key)
    key_s, y_s = jax.lax.sort((key, y), dimension=ax, num_keys=1, is_stable=True)
    tp = jnp.cumsum(y_s, axis=ax)
    count = jnp.arange(1, n + 1, dtype=jnp.int32)
    # The last element of each tie group is where the threshold's precision is read.
    group_end = jnp.concatenate([key_s[..., 1:] != key_s[..., :-1], jnp.ones(key_s.shape[:-1] + (1,), bool)], axis=ax)
    end = jax.lax.cummin(jnp.where(group_end, jnp.arange(n, dtype=jnp.int32), n), axis=ax, reverse=True)
    fdt = scores.dtype if scores.dtype == jnp.float64 else jnp.float32
    precision = tp.astype(fdt) / count.astype(fdt)
    prec_at_threshold = jnp.take_along_axis(precision, end, axis=ax)
    pos = tp[..., -1]
    total = _accurate_sum(jnp.where(y_s > 0, prec_at_threshold, 0).astype(fdt))
    return jnp.where(pos > 0, total / jnp.maximum(pos, 1).astype(fdt), 0.0)


def average_precision_numpy(scores, labels) -> float:
    """`average_precision` for one 1-D case in numpy float64 (a host-side reference)."""
    s = np.asarray(scores, np.float64).ravel()
    y = (np.asarray(labels).ravel() > 0).astype(np.int64)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    tp = np.cumsum(y)
    if tp[-1] == 0:
        return 0.0
    ends = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tps, counts = tp[ends], ends + 1
    recall = tps / tps[-1]
    precision = tps / counts
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


# --------------------------------------------------------------------------------------------
# Segmentation test


@jax.jit
def segmentation_ap_scores(r, constant) -> tuple[jax.Array, jax.Array]:
    """The reference's AP scores of one map: (background 1-R, foreground R), both 0 where the
    map was constant (the reference's NaN set to 0)."""
    r = jnp.asarray(r, jnp.float32)
    c = jnp.asarray(constant)[..., None, None]
    return jnp.where(c, 0.0, 1.0 - r), jnp.where(c, 0.0, r)


@jax.jit
def segmentation_counts(r, constant, gt) -> dict[str, jax.Array]:
    """Per-image counts and AP of the segmentation test.

    r: (..., H, W) normalised maps in [0, 1] (see `minmax_normalize`); constant: (...,) bool;
    gt: (..., H, W) masks, foreground where != 0. Returns int32 `correct` (...,), `labeled`
    (...,) (every pixel is labelled: the reference counts gt + 1 > 0), `inter` and `union`
    (..., 2) for (background, foreground), and float `ap` (...,).
    """
    r = jnp.asarray(r, jnp.float32)
    fg_gt = jnp.asarray(gt) != 0
    fg_pred = r > r.mean(axis=(-2, -1), keepdims=True)
    axes = (-2, -1)
    correct = (fg_pred == fg_gt).sum(axes, dtype=jnp.int32)
    labeled = jnp.full(correct.shape, r.shape[-2] * r.shape[-1], jnp.int32)

    def count(x):
        return x.sum(axes, dtype=jnp.int32)

    inter = jnp.stack([count(~fg_pred & ~fg_gt), count(fg_pred & fg_gt)], -1)
    union = jnp.stack([count(~fg_pred | ~fg_gt), count(fg_pred | fg_gt)], -1)
    s0, s1 = segmentation_ap_scores(r, constant)
    lead = r.shape[:-2]
    scores = jnp.concatenate([s0.reshape(lead + (-1,)), s1.reshape(lead + (-1,))], -1)
    labels = jnp.concatenate([(~fg_gt).reshape(lead + (-1,)), fg_gt.reshape(lead + (-1,))], -1)
    return dict(correct=correct, labeled=labeled, inter=inter, union=union, ap=average_precision(scores, labels))


@dataclasses.dataclass
class SegmentationTotals:
    """Counts summed over a data set (int64), and the per-image AP list."""

    correct: int = 0
    labeled: int = 0
    inter: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(2, np.int64))
    union: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(2, np.int64))
    ap: list = dataclasses.field(default_factory=list)

    def update(self, counts: dict, valid=None) -> None:
        """Add per-image counts (as returned by `segmentation_counts`, leading batch axis);
        `valid` (B,) bool drops padding."""
        c = {k: np.asarray(v) for k, v in counts.items()}
        keep = np.ones(c["correct"].shape[0], bool) if valid is None else np.asarray(valid, bool)
        self.correct += int(c["correct"][keep].astype(np.int64).sum())
        self.labeled += int(c["labeled"][keep].astype(np.int64).sum())
        self.inter = self.inter + c["inter"][keep].astype(np.int64).sum(0)
        self.union = self.union + c["union"][keep].astype(np.int64).sum(0)
        self.ap.extend(float(a) for a in c["ap"][keep])

    @property
    def n(self) -> int:
        return len(self.ap)

    @property
    def pixel_accuracy(self) -> float:
        return float(np.float64(self.correct) / (_EPS + np.float64(self.labeled)))

    @property
    def iou(self) -> np.ndarray:
        """(background, foreground) IoU from the summed counts."""
        return self.inter.astype(np.float64) / (_EPS + self.union.astype(np.float64))

    @property
    def miou(self) -> float:
        return float(self.iou.mean())

    @property
    def mean_ap(self) -> float:
        return float(np.mean(np.nan_to_num(np.asarray(self.ap, np.float64)))) if self.ap else float("nan")
