"""The digit-scenes benchmark: every explanation method on a real data set with exact object masks.

Runs anywhere, offline: the scenes are generated from the UCI handwritten digits shipped in
scikit-learn (`predmaps.digits`), only from the held-out TEST digits, and the model is any
10-class ViT on 64 x 64 digit scenes (by default the one predmaps ships). Three tests per
(method, layer):

- segmentation: one-digit scenes; the map for the predicted class, upsampled (bilinear) to the
  image and min-max normalised, foreground where above its mean, scored against the digit's
  pixels: pixel accuracy, mIoU, mAP (exactly the ImageNet-Segmentation protocol, `metrics`).
- perturbation: the same one-digit scenes; positive and negative perturbation of the map for
  the predicted class (or the true class) at steps 0.0 .. 0.9, accuracy against the true digit,
  AUC x 100 (exactly the ImageNet protocol, `perturbation`).
- class specificity: two-digit scenes (two different classes a, b in disjoint boxes). For each
  scene and each of its classes c, the map for c upsampled to the image and clamped at 0 (a map's
  "mass" is its non-negative part); m_own = its mass on c's digit, m_other = its mass on the
  other digit. Reported: the mean over scenes and classes of the correct share
  m_own / (m_own + m_other) (0.5 when both are 0), and the win rate: how often m_own > m_other
  (a tie counts one half). A class-agnostic method gives both classes the same map, so its two
  shares sum to 1 and its two comparisons split: it sits exactly at 0.5 on both.

    from predmaps.evaluation import digit_scenes
    res = digit_scenes.run_benchmark(model, params, scenes=1000)
    print(res.markdown())
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from predmaps import digits
from predmaps.evaluation import metrics
from predmaps.evaluation.perturbation import PerturbationResult, perturbation_test_arrays
from predmaps.request import check
from predmaps.evaluation.segmentation import SegmentationResult, segmentation_test_arrays

DEFAULT_SEED = 2024  # the seed of the reported tables (test digits only, whatever the seed)


def default_rows() -> list[tuple[str, int]]:
    """Every method of `predmaps.METHODS` at the last layer, plus the prediction-map methods
    at layer L-1 (the paper reports PredicAtt at both)."""
    from predmaps.explain import METHODS

    rows = [(name, -1) for name in METHODS]
    rows += [(name, -2) for name, m in METHODS.items() if m.uses_layer and name in ("predicatt", "prediction_map")]
    return rows


@dataclasses.dataclass(frozen=True)
class SceneSet:
    """The benchmark's data: n one-digit and n two-digit scenes of the test digits.

    one_unit (n, S, S, 3) float32 in [0, 1]; one_labels (n,); one_masks (n, S, S) bool;
    two_unit (n, S, S, 3); two_labels (n, 2) (two different classes); two_masks (n, 2, S, S).
    """

    one_unit: np.ndarray
    one_labels: np.ndarray
    one_masks: np.ndarray
    two_unit: np.ndarray
    two_labels: np.ndarray
    two_masks: np.ndarray
    seed: int

    @classmethod
    def generate(cls, n: int, seed: int = DEFAULT_SEED, size: int = 64) -> "SceneSet":
        im1, lab1, m1 = digits.one_digit_scenes(n, "test", seed, size)
        im2, lab2, m2 = digits.two_digit_scenes(n, "test", seed, size)
        return cls(im1.astype(np.float32) / 255.0, lab1, m1, im2.astype(np.float32) / 255.0, lab2, m2, seed)

    @property
    def n(self) -> int:
        return int(self.one_labels.shape[0])


@dataclasses.dataclass
class Specificity:
    """Class-specificity totals over `n` (scene, class) pairs of two-digit scenes."""

    share_sum: float = 0.0
    wins: float = 0.0
    n: int = 0

    @property
    def mean_share(self) -> float:
        return self.share_sum / self.n if self.n else float("nan")

    @property
    def win_rate(self) -> float:
        return self.wins / self.n if self.n else float("nan")

    def update(self, mass: np.ndarray) -> None:
        """mass (B, 2, 2): mass of the map for class j on digit k (j, k in scene order)."""
        mass = np.asarray(mass, np.float64)
        own = np.stack([mass[:, 0, 0], mass[:, 1, 1]], 1)
        other = np.stack([mass[:, 0, 1], mass[:, 1, 0]], 1)
        total = own + other
        share = np.where(total > 0, own / np.where(total > 0, total, 1.0), 0.5)
        self.share_sum += float(share.sum())
        self.wins += float((own > other).sum() + 0.5 * (own == other).sum())
        self.n += int(own.size)


@functools.partial(jax.jit, static_argnums=0)
def _mass_step(static, params, unit, labels, masks):
    """(B, 2, 2) mass of the map for each of the scene's two classes on each of its two digits."""
    from jaxvit.preprocess import normalize
    from predmaps.explain import request_fn, upsample
    from predmaps.targets import make_targets

    model, req, mean, std = static
    x = normalize(unit, mean, std)
    ex = request_fn(model, req)(params, x, make_targets(labels, x.shape[0], model.config.num_classes))
    maps = jnp.maximum(upsample(ex.maps, masks.shape[-2:]), 0.0)  # (B, 2, H, W)
    return jnp.einsum("bjhw,bkhw->bjk", maps, masks.astype(jnp.float32), precision="highest")


def class_specificity(model, params, unit, labels, masks, *, method: str = "predicatt", layer: int = -1,
                      batch_size: int = 100, mean=digits.DIGIT_MEAN, std=digits.DIGIT_STD,
                      method_options: dict | None = None) -> Specificity:
    """The class-specificity test on two-object scenes: unit (n, H, W, 3) in [0, 1], labels (n, 2)
    the two classes, masks (n, 2, H, W) their objects' pixels (see the module docstring)."""
    unit, labels, masks = np.asarray(unit, np.float32), np.asarray(labels), np.asarray(masks)
    n = unit.shape[0]
    if labels.shape != (n, 2) or masks.shape != (n, 2) + unit.shape[1:3]:
        raise ValueError(f"class_specificity takes unit (n, H, W, 3), labels (n, 2), masks (n, 2, H, W); got "
                         f"{unit.shape}, {labels.shape}, {masks.shape}")
    static = (model, check(model, method, layer, method_options), tuple(map(float, mean)), tuple(map(float, std)))
    spec_totals = Specificity()
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        b = stop - start
        pad = batch_size - b if n > batch_size else 0  # one compiled shape for every batch

        def padded(a):
            return np.concatenate([a, np.zeros((pad,) + a.shape[1:], a.dtype)]) if pad else a

        mass = _mass_step(static, params, padded(unit[start:stop]), padded(labels[start:stop]),
                          padded(masks[start:stop]))
        spec_totals.update(np.asarray(mass)[:b])
    return spec_totals


@dataclasses.dataclass
class BenchmarkRow:
    method: str
    layer: int | None  # 0-based prediction layer index (None: the method has no layer)
    class_specific: bool
    segmentation: SegmentationResult
    perturbation: PerturbationResult | None  # None: not run for this row (`run_benchmark(perturbation=...)`)
    specificity: Specificity
    seconds: float

    def to_dict(self) -> dict:
        seg = self.segmentation
        return {"method": self.method, "layer": self.layer, "class_specific": self.class_specific,
                "segmentation": {"pixel_accuracy": seg.pixel_accuracy, "miou": seg.miou, "map": seg.mean_ap},
                "perturbation": None if self.perturbation is None else {
                    "auc": self.perturbation.auc, "accuracy": self.perturbation.accuracy,
                    "target": self.perturbation.info.get("target")},
                "specificity": {"mean_correct_share": self.specificity.mean_share,
                                "win_rate": self.specificity.win_rate, "pairs": self.specificity.n},
                "seconds": self.seconds}


@dataclasses.dataclass
class BenchmarkResult:
    rows: list[BenchmarkRow]
    info: dict[str, Any]

    def to_dict(self) -> dict:
        return {"benchmark": "digit scenes", **self.info, "rows": [r.to_dict() for r in self.rows]}

    def markdown(self) -> str:
        from predmaps.core import layer_name

        depth = self.info["depth"]
        head = ("| method | layer | class-specific | pixel acc | mIoU | mAP | pert. pos AUC (lower better) | "
                "pert. neg AUC (higher better) | correct share | own > other |\n"
                "|---|---|---|---|---|---|---|---|---|---|")
        lines = [head]
        for r in self.rows:
            layer = "" if r.layer is None else layer_name(r.layer, depth)
            seg, auc, sp = r.segmentation, ({} if r.perturbation is None else r.perturbation.auc), r.specificity
            cell = lambda mode: f"{auc[mode]:.2f}" if mode in auc else "–"  # not run for this row
            lines.append(f"| {r.method} | {layer} | {'yes' if r.class_specific else 'no'} | "
                         f"{100 * seg.pixel_accuracy:.2f} | {100 * seg.miou:.2f} | {100 * seg.mean_ap:.2f} | "
                         f"{cell('positive')} | {cell('negative')} | "
                         f"{sp.mean_share:.4f} | {sp.win_rate:.4f} |")
        return "\n".join(lines)


def scene_accuracy(model, params, scenes: SceneSet, batch_size: int = 250) -> dict[str, float]:
    """Top-1 accuracy on the one-digit scenes; share of two-digit scenes whose classes are the top two."""
    from jaxvit.preprocess import normalize

    def x(unit):
        return np.asarray(normalize(unit, digits.DIGIT_MEAN, digits.DIGIT_STD), np.float32)

    return {"one_digit_accuracy": digits.scene_accuracy(model, params, x(scenes.one_unit), scenes.one_labels, batch_size),
            "two_digit_top2": digits.scene_accuracy(model, params, x(scenes.two_unit), scenes.two_labels, batch_size)}


def run_benchmark(model, params, *, rows: Sequence[tuple[str, int]] | None = None, scenes: int | SceneSet = 1000,
                  seed: int = DEFAULT_SEED, batch_size: int = 100, target: str = "pred",
                  method_options: dict | None = None, progress: bool = False,
                  perturbation: Sequence[tuple[str, int]] | None = None) -> BenchmarkResult:
    """Every (method, layer) of `rows` (default `default_rows()`) through the three tests on the
    same scenes. `scenes`: how many of each kind (or a `SceneSet`). `target`: the class of the
    perturbation test's maps, "pred" or "gt" (segmentation always explains the prediction, as the
    protocol does; class specificity explains both true classes). `perturbation`: the rows that run
    the perturbation test (default: all; the slowest test, 20 forward passes per scene)."""
    from tqdm.auto import tqdm

    from predmaps.explain import get_method

    cfg = model.config
    if cfg.num_classes != 10:
        raise ValueError(f"the digit-scenes benchmark needs a 10-class digits model; {cfg.name!r} has "
                         f"{cfg.num_classes} classes")
    data = scenes if isinstance(scenes, SceneSet) else SceneSet.generate(int(scenes), seed, cfg.img_size[0])
    if data.n < 1:
        raise ValueError("scenes must be at least 1")
    if data.one_unit.shape[1:3] != tuple(cfg.img_size):
        raise ValueError(f"scenes are {data.one_unit.shape[1:3]} but the model reads {tuple(cfg.img_size)}")
    rows = list(rows or default_rows())
    opts = method_options if len(rows) == 1 else None  # options belong to a single method
    for method, layer in rows:  # every request checked before the first long computation
        check(model, method, layer, opts)
    common = dict(batch_size=batch_size, mean=digits.DIGIT_MEAN, std=digits.DIGIT_STD)
    out = []
    for method, layer in tqdm(rows, disable=not progress, unit="method", dynamic_ncols=True):
        t0 = time.perf_counter()
        seg = segmentation_test_arrays(model, params, data.one_unit, data.one_masks, method=method, layer=layer,
                                       method_options=opts, **common)
        pert = None
        if perturbation is None or (method, layer) in perturbation:
            pert = perturbation_test_arrays(model, params, data.one_unit, data.one_labels, method=method,
                                            layer=layer, target=target, method_options=opts, **common)
        spec = class_specificity(model, params, data.two_unit, data.two_labels, data.two_masks, method=method,
                                 layer=layer, method_options=opts, **common)
        m = get_method(method)
        out.append(BenchmarkRow(method, seg.info["layer"], m.class_specific, seg, pert, spec,
                                time.perf_counter() - t0))
    info = {"model": cfg.name, "depth": cfg.depth, "scenes": data.n, "seed": data.seed, "split": "test",
            "image_size": list(cfg.img_size), "perturbation_target": target, "batch_size": batch_size,
            "steps": list(metrics.STEPS), **scene_accuracy(model, params, data)}
    return BenchmarkResult(out, info)
