"""The segmentation test on ImageNet-Segmentation (Chefer et al. 2021b; the paper's Table 2).

Per image: plain resize to 224 x 224 (bilinear) + 0.5/0.5 normalisation; the mask resized to
224 x 224 with NEAREST; the map for the PREDICTED class, upsampled and min-max normalised (R);
foreground where R > mean(R). Pixel accuracy and mIoU from counts summed over the data set; AP
per image over the jointly ranked scores [1-R, R], then the mean (see `metrics`). Batched: one
jitted computation per batch gives every image's counts and AP; the last batch is padded.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import numpy as np

from predmaps.evaluation import metrics
from predmaps.data import prefetch_batches, stack_padded, subset_indices
from predmaps.evaluation.data import PROTOCOL_MEAN, PROTOCOL_STD, eval_size, mask_transform, unit_transform
from predmaps.evaluation.files import ImageNetSegmentation
from predmaps.evaluation.perturbation import _normalize, pixel_maps
from predmaps.request import check


@dataclasses.dataclass
class SegmentationResult:
    totals: metrics.SegmentationTotals
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def n(self) -> int:
        return self.totals.n

    @property
    def pixel_accuracy(self) -> float:
        return self.totals.pixel_accuracy

    @property
    def miou(self) -> float:
        return self.totals.miou

    @property
    def mean_ap(self) -> float:
        return self.totals.mean_ap

    def to_dict(self) -> dict:
        t = self.totals
        return {"test": "segmentation", "n_images": t.n, "pixel_accuracy": t.pixel_accuracy, "miou": t.miou,
                "iou": {"background": float(t.iou[0]), "foreground": float(t.iou[1])}, "map": t.mean_ap,
                "totals": {"correct": t.correct, "labeled": t.labeled, "intersection": t.inter.tolist(),
                           "union": t.union.tolist()},
                "ap_per_image": list(t.ap), **self.info}

    def table(self) -> str:
        t = self.totals
        return "\n".join([
            f"{'pixel accuracy':<16}{100 * t.pixel_accuracy:7.2f}",
            f"{'mIoU':<16}{100 * t.miou:7.2f}   (background {100 * t.iou[0]:.2f}, foreground {100 * t.iou[1]:.2f})",
            f"{'mAP':<16}{100 * t.mean_ap:7.2f}",
            f"in %, {t.n} images; foreground where R > mean(R); pixAcc and mIoU over the data set, AP per image"])


def resize_mask(mask, size=(224, 224)) -> np.ndarray:
    """uint8 (H, W) -> uint8 `size`, NEAREST (torchvision Resize(size, Image.NEAREST) on PIL)."""
    return mask_transform("resize", size)(mask)


@functools.partial(jax.jit, static_argnums=0)
def _segmentation_step(static, params, unit, masks, maps=None):
    model, req, size, mean, std = static
    if req is None:  # given maps
        r, constant = metrics.minmax_normalize(maps)
    else:
        raw, _ = pixel_maps(model, params, req, _normalize(unit, mean, std), None, "pred", size)
        # upsample(normalize=True) already min-max normalised; a constant map is 0 and flagged here.
        r, constant = raw, ~(raw.max(axis=(-2, -1)) > raw.min(axis=(-2, -1)))
    return metrics.segmentation_counts(r, constant, masks)


def segmentation_step(model, req, *, size=(224, 224), mean=PROTOCOL_MEAN, std=PROTOCOL_STD):
    """The jitted per-batch step: (params, unit, masks[, maps]) -> per-image counts and AP.
    `req` None: maps are given (min-max normalised here), the model is not run."""
    static = (model if req is not None else None, req, tuple(size), tuple(mean), tuple(std))
    return functools.partial(_segmentation_step, static)


def segmentation_test(model, params, data, *, method: str = "predicatt", layer: int = -1, batch_size: int = 32,
                      limit: int | None = None, subset: str = "random", seed: int = 0, image_size=None,
                      transform: str = "resize", mean=PROTOCOL_MEAN, std=PROTOCOL_STD,
                      method_options: dict | None = None, maps=None,
                      workers: int | None = None, progress: bool = False) -> SegmentationResult:
    """The segmentation test of `method` on gtsegs_ijcv.mat (`data`: a path or an open
    `ImageNetSegmentation`). `maps`: optional precomputed maps, (n, H, W) array or a
    results.hdf5 path, in the .mat file's order (min-max normalised again here; only their
    `vis` is used); then the model is not run. `transform`: "resize" (the protocol) or "timm"
    (the model's eval transform; each mask goes through the same resize and crop, NEAREST).
    image_size: (H, W) of images, masks and maps; default the given maps' size, else the model's
    input size (224 x 224 for the paper's ViT-B/16, the protocol's size)."""
    from tqdm.auto import tqdm

    own = not isinstance(data, ImageNetSegmentation)
    ds = ImageNetSegmentation(data) if own else data
    closers = [ds] if own else []
    try:
        config = model.config if model is not None else None
        given = None
        if maps is not None:
            if isinstance(maps, (str, bytes)) or hasattr(maps, "__fspath__"):
                from predmaps.evaluation.files import CheferResults

                reader = CheferResults(maps)
                closers.append(reader)
                given_shape = (len(reader),) + reader.image_size

                def given(i):
                    return reader.maps(i, i + 1)[0]
            else:
                arr = np.asarray(maps, np.float32)
                if arr.ndim == 4 and arr.shape[1] == 1:
                    arr = arr[:, 0]
                given_shape = arr.shape

                def given(i):
                    return arr[i]
            if image_size is None:  # given maps fix the size
                image_size = given_shape[1:]
            size = eval_size(image_size, config)
            if len(given_shape) != 3 or given_shape[0] != len(ds) or given_shape[1:] != size:
                raise ValueError(f"maps {given_shape} must be (n, H, W) = ({len(ds)}, {size[0]}, {size[1]}), one per "
                                 "image of the .mat file in its order")
            req = None
        else:
            req = check(model, method, layer, method_options)
            size = eval_size(image_size, config)
        image_tf, mask_tf = unit_transform(transform, size, config), mask_transform(transform, size, config)
        idx = subset_indices(len(ds), limit, mode=subset, seed=seed)
        n = len(idx)
        if n == 0:
            raise ValueError("no images to evaluate")
        mean_, std_ = tuple(map(float, mean)), tuple(map(float, std))
        step = segmentation_step(model, req, size=size, mean=mean_, std=std_)

        def load(j):
            i = int(idx[j])
            row = {"unit": image_tf(ds.image(i)), "masks": mask_tf(ds.mask(i))}
            if given is not None:
                row["maps"] = given(i)
            return row

        totals = metrics.SegmentationTotals()
        bar = tqdm(total=n, unit="img", disable=not progress, dynamic_ncols=True, smoothing=0.1)
        t0 = time.perf_counter()
        t_first = None
        pending = None
        try:
            for _, rows in prefetch_batches(n, batch_size, load, workers=workers):
                batch, valid = stack_padded(rows, batch_size)
                out = step(params, batch["unit"], batch["masks"], batch.get("maps"))
                if pending is not None:
                    totals.update(*pending)
                    bar.update(int(pending[1].sum()))
                    if t_first is None:
                        t_first = time.perf_counter() - t0
                pending = (out, valid)
            totals.update(*pending)
            bar.update(int(pending[1].sum()))
            if t_first is None:
                t_first = time.perf_counter() - t0
        finally:
            bar.close()
        total = time.perf_counter() - t0
        first_n = min(n, batch_size)
        rest = total - t_first
        info = {"method": method if given is None else None, "layer": req.layer if req else None,
                "method_options": dict(req.options) if req else {}, "target": "pred",
                "maps_source": "computed" if given is None else "given", "image_size": list(size),
                "transform": transform, "normalization": {"mean": list(mean_), "std": list(std_)},
                "batch_size": batch_size, "limit": limit, "subset": subset if limit else None,
                "seed": seed if limit and subset == "random" else None, "seconds": total,
                "first_batch_seconds": t_first,
                "images_per_second": (n - first_n) / rest if n > first_n and rest > 0 else n / total}
        return SegmentationResult(totals, info)
    finally:
        for c in closers:
            c.close()


def segmentation_test_arrays(model, params, unit, masks, *, method: str = "predicatt", layer: int = -1,
                             batch_size: int = 32, mean=PROTOCOL_MEAN, std=PROTOCOL_STD,
                             method_options: dict | None = None) -> SegmentationResult:
    """`segmentation_test` on images in memory: unit (n, H, W, 3) float in [0, 1] at the size the
    model reads, masks (n, H, W) (foreground where != 0); maps for the predicted class."""
    unit, masks = np.asarray(unit, np.float32), np.asarray(masks)
    if unit.ndim != 4 or unit.shape[-1] != 3 or masks.shape != unit.shape[:3]:
        raise ValueError(f"segmentation_test_arrays takes unit (n, H, W, 3) and masks (n, H, W); got {unit.shape}, "
                         f"{masks.shape}")
    n = unit.shape[0]
    if n == 0:
        raise ValueError("no images to evaluate")
    req = check(model, method, layer, method_options)
    size = unit.shape[1:3]
    mean_, std_ = tuple(map(float, mean)), tuple(map(float, std))
    step = segmentation_step(model, req, size=size, mean=mean_, std=std_)
    totals = metrics.SegmentationTotals()
    t0 = time.perf_counter()
    pending = None
    for start in range(0, n, batch_size):
        rows = [{"unit": unit[i], "masks": masks[i].astype(np.uint8)} for i in range(start, min(start + batch_size, n))]
        batch, valid = stack_padded(rows, batch_size)
        out = step(params, batch["unit"], batch["masks"])
        if pending is not None:
            totals.update(*pending)
        pending = (out, valid)
    totals.update(*pending)
    info = {"method": method, "layer": req.layer, "method_options": dict(req.options), "target": "pred",
            "maps_source": "computed", "image_size": list(size), "normalization": {"mean": list(mean_), "std": list(std_)},
            "batch_size": batch_size, "seconds": time.perf_counter() - t0}
    return SegmentationResult(totals, info)
