"""The perturbation test (Chefer et al. 2021b; the paper's Table 1), batched and jitted.

Per batch, one jitted computation: the explanation of the normalised image (for the predicted
class, or the ground-truth class), the map upsampled to the image and min-max normalised
(`predmaps.upsample`), the removal ranks, and the model on every (mode, step) masked version
of the batch at once (a vmap over modes x steps). Hits are counted against the GROUND-TRUTH
label, padding masked out, and accumulated on the device. See `metrics` for the removal order
and the AUC.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from predmaps.evaluation import metrics
from predmaps.data import ImageList, check_label, iter_image_list, stack_padded
from predmaps.evaluation.data import PROTOCOL_MEAN, PROTOCOL_STD, eval_size, unit_transform
from predmaps.request import Request, check
from predmaps.targets import make_targets


# --------------------------------------------------------------------------------------------
# Explanations inside the evaluation's jit

TARGETS = ("pred", "gt")  # the protocol's targets: the predicted class or the ground truth


def pixel_maps(model, params, req: Request, x, labels, target: str, size):
    """(B, H, W) maps upsampled to `size` and min-max normalised, for the predicted class
    (target "pred") or `labels` (target "gt"); also the explained classes (B,)."""
    from predmaps.explain import request_fn, upsample

    targets = make_targets(target, x.shape[0], model.config.num_classes, labels=labels)
    ex = request_fn(model, req)(params, x, targets)
    extent = model.config.grid_extent(*size)  # the pixels the grid came from (all, unless no patch multiple)
    return upsample(ex.maps[:, 0], size, normalize=True, extent=extent), ex.classes[:, 0]


def _normalize(unit, mean, std):
    from jaxvit.preprocess import normalize

    return normalize(unit, mean, std)


# --------------------------------------------------------------------------------------------
# The jitted batch step


def perturbation_hits(model, params, unit, maps, labels, *, modes=metrics.MODES, steps=metrics.STEPS,
                      mean=PROTOCOL_MEAN, std=PROTOCOL_STD) -> jax.Array:
    """bool (M, S, B): whether the model's argmax equals `labels` after removing step s's
    pixels of mode m. unit (B, H, W, 3) in [0, 1]; maps (B, H, W) at the image's size.
    Traceable: all M x S masked batches go through the model in one vmap."""
    h, w = unit.shape[1:3]
    ks = jnp.asarray([metrics.num_removed(s, h * w) for s in steps], jnp.int32)
    ranks = jnp.stack([metrics.removal_ranks(maps, m) for m in modes])  # (M, B, H, W)
    masks = ranks[:, None] < ks[None, :, None, None, None]  # (M, S, B, H, W)
    masks = masks.reshape((-1,) + masks.shape[2:])

    def predict(mask):
        x = _normalize(metrics.remove_pixels(unit, mask), mean, std)
        return jnp.argmax(model.apply({"params": params}, x).logits, axis=-1)

    preds = jax.vmap(predict)(masks).reshape(len(modes), len(steps), -1)
    return preds == labels[None, None]


def _count(hits, valid):
    return (hits & valid[None, None]).sum(-1, dtype=jnp.int32)


@functools.partial(jax.jit, static_argnums=0)
def _explain_step(static, params, counts, unit, labels, valid):
    """Explain, upsample, mask, count: one compilation per (static settings, batch shape)."""
    model, req, target, size, modes, steps, mean, std, want_maps = static
    maps, _ = pixel_maps(model, params, req, _normalize(unit, mean, std), labels, target, size)
    hits = perturbation_hits(model, params, unit, maps, labels, modes=modes, steps=steps, mean=mean, std=std)
    return counts + _count(hits, valid), (maps if want_maps else None)


@functools.partial(jax.jit, static_argnums=0)
def _maps_step(static, params, counts, unit, maps, labels, valid):
    model, modes, steps, mean, std = static
    hits = perturbation_hits(model, params, unit, maps, labels, modes=modes, steps=steps, mean=mean, std=std)
    return counts + _count(hits, valid), None


# --------------------------------------------------------------------------------------------
# Results


@dataclasses.dataclass
class PerturbationResult:
    """Correct counts per (mode, step) over `n` images, with the accuracies and AUCs."""

    n: int
    correct: dict[str, list[int]]
    steps: tuple[float, ...] = metrics.STEPS
    image_size: tuple[int, int] = (224, 224)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def accuracy(self) -> dict[str, list[float]]:
        return {m: [c / self.n for c in cs] for m, cs in self.correct.items()}

    @property
    def auc(self) -> dict[str, float]:
        return {m: metrics.perturbation_auc(a, self.steps) for m, a in self.accuracy.items()}

    @property
    def clean_accuracy(self) -> float:
        """Accuracy at step 0.0 (no pixel removed), when step 0.0 was run."""
        if 0.0 not in self.steps:
            return float("nan")
        i = self.steps.index(0.0)
        return next(iter(self.accuracy.values()))[i]

    def to_dict(self) -> dict:
        h, w = self.image_size
        return {"test": "perturbation", "n_images": self.n, "steps": list(self.steps),
                "removed_pixels": [metrics.num_removed(s, h * w) for s in self.steps],
                "image_size": list(self.image_size), "tie_order": metrics.TIE_ORDER,
                "clean_accuracy": self.clean_accuracy, "correct": self.correct, "accuracy": self.accuracy,
                "auc": self.auc, **self.info}

    def table(self) -> str:
        lines = ["step      " + " ".join(f"{s:>6.1f}" for s in self.steps) + "     AUC"]
        for m, acc in self.accuracy.items():
            lines.append(f"{m:<9} " + " ".join(f"{100 * a:6.2f}" for a in acc) + f"  {self.auc[m]:6.2f}")
        lines.append(f"accuracy in %, {self.n} images; AUC = trapz(acc, steps) x 100 "
                     "(positive: lower is better; negative: higher is better)")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Runners


def _check_modes(modes) -> tuple[str, ...]:
    modes = tuple(modes)
    for m in modes:
        metrics._mode_positive(m)
    if not modes or len(set(modes)) != len(modes):
        raise ValueError(f"modes must be a non-empty subset of {metrics.MODES}; got {modes}")
    return modes


def _run(step_fn: Callable, batches: Iterable, n: int, *, modes, steps, progress, on_batch=None) -> tuple[list, dict]:
    """Drive the jitted batch step with counts accumulating on the device; at most two
    batches in flight. Returns (counts (M, S) as lists, timing info)."""
    from tqdm.auto import tqdm

    counts = jnp.zeros((len(modes), len(steps)), jnp.int32)
    bar = tqdm(total=n, unit="img", disable=not progress, dynamic_ncols=True, smoothing=0.1)
    t0 = time.perf_counter()
    t_first = None
    prev, prev_n = None, 0
    valid = np.zeros(0, bool)  # no batch at all when every image was unreadable
    try:
        for start, batch, valid in batches:
            counts, extra = step_fn(counts, batch, valid)
            if on_batch is not None:
                on_batch(start, batch, valid, extra)
            if prev is not None:
                prev.block_until_ready()
                bar.update(prev_n)
                if t_first is None:
                    t_first = time.perf_counter() - t0
            prev, prev_n = counts, int(valid.sum())
        if prev is not None:
            prev.block_until_ready()
            bar.update(prev_n)
            if t_first is None:
                t_first = time.perf_counter() - t0
    finally:
        bar.close()
    total = time.perf_counter() - t0
    first_n = min(n, len(valid)) if n else 0
    rest = total - (t_first or 0.0)
    timing = {"seconds": total, "first_batch_seconds": t_first,
              "images_per_second": (n - first_n) / rest if n > first_n and rest > 0 else (n / total if total else None)}
    return np.asarray(counts).tolist(), timing


def _check_settings(model, method, layer, target, modes, steps, image_size, mean, std, method_options):
    req = check(model, method, layer, method_options, target, words=TARGETS)
    modes = _check_modes(modes)
    steps = tuple(float(s) for s in steps)
    size = eval_size(image_size, model.config)
    mean, std = tuple(map(float, mean)), tuple(map(float, std))
    return req, modes, steps, size, mean, std


def _check_labels(model, labels, source: str = "labels", entries=None) -> None:
    """Labels given as arrays (or a results.hdf5) against the model's classes: the data layer's one
    range rule and message (`predmaps.data.check_label`), naming the first bad entry (its number in
    `entries` when the labels are a selection of them)."""
    labels = np.asarray(labels)
    bad = np.flatnonzero((labels < 0) | (labels >= model.config.num_classes))
    if bad.size:
        entry = int(bad[0] if entries is None else entries[bad[0]])
        check_label(int(labels[bad[0]]), model.config.num_classes, f"{source} (entry {entry})")


def perturbation_test(model, params, images: ImageList, *, method: str = "predicatt", layer: int = -1,
                      target: str = "pred", modes=metrics.MODES, steps=metrics.STEPS, batch_size: int = 32,
                      image_size=None, transform: str = "resize", mean=PROTOCOL_MEAN, std=PROTOCOL_STD,
                      method_options: dict | None = None, workers: int | None = None, progress: bool = False,
                      save_maps=None, skip_unreadable: bool = True) -> PerturbationResult:
    """The perturbation test of `method` on `images` (an `ImageList`, see `data.imagenet_val`).

    image_size: (H, W) the images are resized to (`transform`) and explained at; default the
    model's input size (224 x 224 for the paper's ViT-B/16, the protocol's size).

    Maps are for the predicted class (target "pred") or the ground truth ("gt"); accuracy is
    always against the ground truth. `save_maps`: a path to write the maps, images and labels
    as Chefer's results.hdf5 (so the torch code can score them). `skip_unreadable`: an image
    that cannot be decoded is left out (`n` counts the scored images) and listed in
    `info["unreadable"]`; False: it ends the test with `ImageLoadError`.

    Memory: each batch runs the model on batch_size x len(modes) x len(steps) images at once
    (640 for the default 32 x 2 x 10); lower `batch_size` if that does not fit.
    """
    req, modes, steps, size, mean, std = _check_settings(model, method, layer, target, modes, steps, image_size,
                                                         mean, std, method_options)
    if len(images) == 0:
        raise ValueError("no images to evaluate")
    images.check_classes(model.config.num_classes)  # the message `predmaps run` gives for the same labels
    want_maps = save_maps is not None
    static = (model, req, target, size, modes, steps, mean, std, want_maps)

    def step_fn(counts, batch, valid):
        return _explain_step(static, params, counts, batch["unit"], batch["labels"], valid)

    writer = None
    on_batch = None
    if want_maps:
        from predmaps.evaluation.files import CheferWriter

        writer = CheferWriter(save_maps, size)

        def on_batch(start, batch, valid, maps):
            b = int(valid.sum())
            writer.append(np.asarray(maps)[:b], batch["unit"][:b], batch["labels"][:b])

    tf = unit_transform(transform, size, model.config)
    unreadable = [] if skip_unreadable else None
    batches = iter_image_list(images, tf, batch_size, workers=workers, unreadable=unreadable)
    try:
        counts, timing = _run(step_fn, batches, len(images), modes=modes, steps=steps, progress=progress,
                              on_batch=on_batch)
        n = len(images) - len(unreadable or ())
        if n == 0:
            raise ValueError(f"none of the {len(images)} images could be read; the first error: "
                             f"{unreadable[0]['error']}")
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is not None:
        writer.close()
    info = {"method": method, "layer": req.layer, "method_options": dict(req.options), "target": target,
            "transform": transform, "normalization": {"mean": list(mean), "std": list(std)},
            "batch_size": batch_size, "maps_source": "computed", "unreadable": unreadable or [], **timing}
    return PerturbationResult(n, dict(zip(modes, counts)), steps, size, info)


def perturbation_test_arrays(model, params, unit, labels, *, method: str = "predicatt", layer: int = -1,
                             target: str = "pred", modes=metrics.MODES, steps=metrics.STEPS, batch_size: int = 32,
                             mean=PROTOCOL_MEAN, std=PROTOCOL_STD, method_options: dict | None = None,
                             progress: bool = False) -> PerturbationResult:
    """`perturbation_test` on images in memory: unit (n, H, W, 3) float in [0, 1] at the size the
    model reads, labels (n,) ground-truth classes."""
    unit, labels = np.asarray(unit, np.float32), np.asarray(labels)
    if unit.ndim != 4 or unit.shape[-1] != 3 or labels.shape != unit.shape[:1]:
        raise ValueError(f"perturbation_test_arrays takes unit (n, H, W, 3) and labels (n,); got {unit.shape}, "
                         f"{labels.shape}")
    req, modes, steps, size, mean, std = _check_settings(model, method, layer, target, modes, steps, unit.shape[1:3],
                                                         mean, std, method_options)
    n = unit.shape[0]
    if n == 0:
        raise ValueError("no images to evaluate")
    _check_labels(model, labels)
    static = (model, req, target, size, modes, steps, mean, std, False)

    def step_fn(counts, batch, valid):
        return _explain_step(static, params, counts, batch["unit"], batch["labels"], valid)

    def batches():
        for start in range(0, n, batch_size):
            rows = [{"unit": unit[i], "labels": np.int32(labels[i])} for i in range(start, min(start + batch_size, n))]
            batch, valid = stack_padded(rows, batch_size)
            yield start, batch, valid

    counts, timing = _run(step_fn, batches(), n, modes=modes, steps=steps, progress=progress)
    info = {"method": method, "layer": req.layer, "method_options": dict(req.options), "target": target,
            "normalization": {"mean": list(mean), "std": list(std)}, "batch_size": batch_size,
            "maps_source": "computed", **timing}
    return PerturbationResult(n, dict(zip(modes, counts)), steps, size, info)


def score_maps(model, params, unit, maps, labels, *, modes=metrics.MODES, steps=metrics.STEPS, batch_size: int = 32,
               mean=PROTOCOL_MEAN, std=PROTOCOL_STD, indices=None, progress: bool = False,
               info: dict | None = None) -> PerturbationResult:
    """The perturbation test with given maps: unit (n, H, W, 3) in [0, 1], maps (n, H, W) (used
    as they are: only their order matters; NaN counts as 0), labels (n,) ground truth.
    Arrays, or a `files.CheferResults` (pass it as `unit`, with maps = labels = None), read
    batch by batch; `indices` (increasing) restricts a `CheferResults` to those entries."""
    from predmaps.evaluation.files import CheferResults, check_unit_range

    if isinstance(unit, CheferResults):
        source = unit
        idx = np.arange(len(source)) if indices is None else np.asarray(indices)
        n = len(idx)
        size = source.image_size
        # Before the first batch: a label outside the head would count every image as wrong.
        _check_labels(model, source.labels()[idx], f"{source.path}: 'target' labels", idx)

        def get(start, stop):
            if indices is None:
                return source.batch(start, stop)
            return source.take(idx[start:stop])
    else:
        if indices is not None:
            raise ValueError("indices applies to a CheferResults source; slice arrays yourself")
        unit, maps, labels = np.asarray(unit, np.float32), np.asarray(maps, np.float32), np.asarray(labels)
        n = unit.shape[0]
        if maps.ndim == 4 and maps.shape[1] == 1:
            maps = maps[:, 0]
        if unit.ndim != 4 or unit.shape[-1] != 3 or maps.shape != unit.shape[:3] or labels.shape != (n,):
            raise ValueError(f"score_maps takes unit (n, H, W, 3), maps (n, H, W), labels (n,); got {unit.shape}, "
                             f"{maps.shape}, {labels.shape}")
        check_unit_range(unit, "score_maps: unit")
        size = unit.shape[1:3]
        _check_labels(model, labels)

        def get(start, stop):
            return {"unit": unit[start:stop], "maps": maps[start:stop], "labels": labels[start:stop].astype(np.int32)}

    if n == 0:
        raise ValueError("no images to evaluate")
    if model.config.num_classes <= 0:
        raise ValueError("this model has no classifier head (num_classes=0): the test needs one")
    modes = _check_modes(modes)
    steps = tuple(float(s) for s in steps)
    mean, std = tuple(map(float, mean)), tuple(map(float, std))

    static = (model, modes, steps, mean, std)

    def step_fn(counts, batch, valid):
        return _maps_step(static, params, counts, batch["unit"], batch["maps"], batch["labels"], valid)

    def batches():
        for start in range(0, n, batch_size):
            b = get(start, min(start + batch_size, n))
            rows = [{k: v[i] for k, v in b.items()} for i in range(len(b["labels"]))]
            batch, valid = stack_padded(rows, batch_size)
            yield start, batch, valid

    counts, timing = _run(step_fn, batches(), n, modes=modes, steps=steps, progress=progress)
    full_info = {"normalization": {"mean": list(mean), "std": list(std)}, "batch_size": batch_size,
                 "maps_source": "given", **(info or {}), **timing}
    return PerturbationResult(n, dict(zip(modes, counts)), steps, tuple(int(s) for s in size), full_info)
