"""What a report shows, computed: one compiled call per batch (`analyse`) gives each image's
`ImageResult` (maps of the planned columns, raw attention and rollout, prediction maps at every
layer, head weights and attention, per-layer statistics). No HTML or files here: `predmaps.report.png`
writes overlays and `predmaps.report.html` the pages from these results.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import numpy as np

AGNOSTIC = ("raw_attention", "rollout")  # class-agnostic baselines shown beside every class


@dataclasses.dataclass
class Batch:
    """Images to report on. images: what to show, (b, H, W, 3) uint8 or float in [0, 1], the model's
    input before normalisation; inputs: the normalised model input (b, H, W, 3); labels: ground
    truth, (b,) or (b, M) int (M labels per image, -1 for none); targets: (b, K) classes to
    explain per image, overriding `ReportOptions.target`; captions: what each input is, shown under it
    (`input_caption`; default "model input")."""

    names: Sequence[str]
    images: np.ndarray
    inputs: np.ndarray
    labels: np.ndarray | None = None
    targets: np.ndarray | None = None
    captions: Sequence[str] | None = None


@dataclasses.dataclass
class ReportOptions:
    """What a report shows and how.

    target: the classes to explain: "top", "topK", a class or a list of classes (see `predmaps.explain`).
    method, layers: the method and prediction layers of the extra columns (PredicAtt_L and
      PredicAtt_{L-1} are always shown); layers negative from the end.
    map_class: the class whose prediction map is shown at every layer (default: each image's first
      requested class).
    cmap, alpha, shared_scale: colour map, heat-map opacity, and one colour scale per method (over
      classes and layers) instead of each map's own min-max.
    top_k: predictions listed; heads: most and least contributing heads shown per class, for the
      first `head_classes` classes; max_classes: class rows shown per image.
    tile, small_tile, thumb: display sizes (px, longer side) of main maps, layer/head maps, index thumbnails.
    """

    target: Any = "top"
    method: str = "predicatt"
    layers: Sequence[int] = (-1, -2)
    map_class: int | None = None
    cmap: str = "jet"
    alpha: float = 0.5
    shared_scale: bool = False
    top_k: int = 5
    heads: int = 4
    head_classes: int = 3
    max_classes: int = 10
    tile: int = 176
    small_tile: int = 112
    thumb: int = 72
    batch_size: int = 8
    per_index_page: int = 100
    title: str = "predmaps report"
    model_name: str = ""
    label_note: str = "top-1 prediction equals the label"
    trust_note: str = ""  # the model's measured locality and class specificity, shown first (`digits.trust_note`)


@dataclasses.dataclass
class ImageResult:
    """Everything a page shows for one image (numpy, host side)."""

    index: int
    name: str  # `display_name` of the Batch's name: valid UTF-8, for pages, stdout and file names
    image: np.ndarray  # (H, W, 3) uint8
    probs: np.ndarray  # (C,)
    classes: np.ndarray  # (K,)
    maps: dict  # (method, layer index or None) -> (K, gh, gw)
    agnostic: dict  # method -> (gh, gw)
    map_class: int
    layer_maps: np.ndarray  # (L + 1, gh, gw) Psi^(l)(map_class)
    head_weights: np.ndarray  # (K, L, H) alpha~ of PredicAtt_L
    head_attention: np.ndarray  # (L, H, gh, gw) A_CLS
    labels: np.ndarray | None = None  # (M,)
    stats: dict | None = None  # name -> (L + 1,)
    top_head_block: int = -1
    extent: tuple[float, float] = (1.0, 1.0)  # of the image the token grid covers (ViTConfig.grid_extent)
    caption: str = "model input"  # what `image` is (`input_caption`)


def plan_columns(method: str, layers: Sequence[int], depth: int) -> list[tuple[str, int | None]]:
    """The class-specific map columns: PredicAtt_L, PredicAtt_{L-1}, then `method` at `layers`."""
    from predmaps import core
    from predmaps.explain import get_method

    m = get_method(method)
    cols = [("predicatt", depth), ("predicatt", max(depth - 1, 0))]
    if method not in AGNOSTIC:
        for layer in layers:
            key = (method, core.layer_index(layer, depth) if m.uses_layer else None)
            if key not in cols:
                cols.append(key)
    return list(dict.fromkeys(cols))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _compute(model, plan, n_labels, params, images, targets, map_class, labels):
    """Everything a batch's pages show, in one compiled function (the methods' forward passes are
    the same computation; XLA shares them): the `plan` columns through `predmaps.explain_fn`, raw
    attention and rollout, Psi^(l)(c) at every layer l = 0..L for the map class (the first target
    class where map_class < 0), A_CLS, logits, and with labels (B, n_labels) the per-layer statistics."""
    import jax.numpy as jnp

    import predmaps
    from predmaps import core, stats

    b, c = images.shape[0], model.config.num_classes
    exs = [predmaps.explain_fn(model, method=m, layer=-1 if layer is None else layer)(params, images, targets)
           for m, layer in plan]
    top = predmaps.make_targets("top", b, c)
    agnostic = [predmaps.explain_fn(model, method=m)(params, images, top).maps[:, 0] for m in AGNOSTIC]
    first = exs[0]  # PredicAtt_L
    map_cls = jnp.where(map_class < 0, first.classes[:, 0], map_class)[:, None].astype(jnp.int32)
    out = model.apply({"params": params}, images)
    psi = jnp.stack([core.prediction_columns(model, params, out.tokens[:, l], map_cls)[:, 0]
                     for l in range(model.config.depth + 1)], axis=1)
    res = dict(maps=[e.maps for e in exs], agnostic=agnostic, classes=first.classes, head_weights=first.head_weights,
               map_class=map_cls[:, 0], layer_maps=psi, head_attention=core.cls_attention(model, out.attn_cls),
               logits=first.logits)
    if n_labels:
        per_label = [stats.layer_statistics(model, params, images, labels[:, j]) for j in range(n_labels)]
        s = per_label[0]
        # a token predicts one class: its accuracy against a label set is the sum over the (distinct) labels
        res["stats"] = dict(cls_accuracy=sum(p.cls_accuracy for p in per_label),
                            patch_accuracy=sum(p.patch_accuracy for p in per_label),
                            cls_confidence=s.cls_confidence, patch_confidence=s.patch_confidence,
                            cls_entropy=s.cls_entropy, patch_entropy=s.patch_entropy)
        res["top_head_block"] = s.top_head_block
    return res


def check_model(model, methods) -> None:
    """What `predmaps.explain` checks on the host before it runs, for the report's methods."""
    from predmaps.request import check

    for name in methods:
        check(model, name, None)


def _pad(x: np.ndarray | None, n: int) -> np.ndarray | None:
    if x is None or x.shape[0] == n:
        return x
    return np.concatenate([x, np.zeros((n - x.shape[0],) + x.shape[1:], x.dtype)])


def _as_uint8(images) -> np.ndarray:
    a = np.asarray(images)
    return a if a.dtype == np.uint8 else (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)


def display_name(name) -> str:
    """A name as it can be shown and written: a file name that is not valid UTF-8 (os.fsdecode
    gives its stray bytes as lone surrogates, e.g. b'caf\\xe9.jpg' -> 'caf\\udce9.jpg') with U+FFFD
    for each such byte. Writing the raw name into a UTF-8 page or stdout raises."""
    return str(name).encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def analyse(model, params, batch: Batch, options: ReportOptions, *, start: int = 0) -> list[ImageResult]:
    """Compute everything the pages show for one batch: one compiled call, the batch padded to
    `options.batch_size` so that a run compiles once."""
    import predmaps

    cfg = model.config
    depth = cfg.depth
    b = len(batch.names)
    size = max(b, options.batch_size)
    plan = tuple(plan_columns(options.method, options.layers, depth))
    check_model(model, [m for m, _ in plan] + list(AGNOSTIC))
    x = _pad(np.asarray(batch.inputs, np.float32), size)
    if x.ndim != 4 or x.shape[-1] != cfg.in_chans:
        raise ValueError(f"inputs must be (B, H, W, {cfg.in_chans}) channels-last, normalised; got {x.shape}")
    target = options.target if batch.targets is None else _pad(np.asarray(batch.targets, np.int32), size)
    targets = predmaps.make_targets(target, size, cfg.num_classes)
    labels = None if batch.labels is None else np.asarray(batch.labels, np.int64).reshape(b, -1)
    padded = None if labels is None else _pad(labels.astype(np.int32), size)
    map_class = np.full((size,), -1 if options.map_class is None else options.map_class, np.int32)
    res = _compute(model, plan, 0 if labels is None else labels.shape[1], params, x, targets, map_class, padded)
    res = jax.tree_util.tree_map(lambda a: np.asarray(a)[:b], res)  # slice on the host: a device slice compiles

    gh, gw = x.shape[1] // cfg.patch_size, x.shape[2] // cfg.patch_size
    classes = res["classes"]
    maps = dict(zip(plan, res["maps"]))
    agnostic = dict(zip(AGNOSTIC, res["agnostic"]))
    if options.method in AGNOSTIC:
        for m in AGNOSTIC:  # so the requested method's PNGs can be written from `maps`
            maps[(m, None)] = np.broadcast_to(agnostic[m][:, None], (b,) + (classes.shape[1],) + agnostic[m].shape[1:])
    psi = res["layer_maps"].reshape(b, depth + 1, gh, gw)
    a_cls = res["head_attention"].reshape(b, depth, cfg.num_heads, gh, gw)
    logits = res["logits"].astype(np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    st = res.get("stats")
    images = _as_uint8(batch.images)
    extent = cfg.grid_extent(x.shape[1], x.shape[2])
    return [ImageResult(
        index=start + i, name=display_name(batch.names[i]), image=images[i], probs=probs[i], classes=classes[i],
        maps={k: v[i] for k, v in maps.items()}, agnostic={k: v[i] for k, v in agnostic.items()},
        map_class=int(res["map_class"][i]), layer_maps=psi[i], head_weights=res["head_weights"][i],
        head_attention=a_cls[i], labels=None if labels is None else labels[i],
        stats=None if st is None else {k: v[i] for k, v in st.items()}, extent=extent,
        top_head_block=-1 if st is None else int(res["top_head_block"][i]),
        caption="model input" if batch.captions is None else batch.captions[i]) for i in range(b)]


def input_caption(width: int, height: int, cfg) -> str:
    """What part of a width x height image the model input (and so every overlay) shows, after the
    config's eval transform (`jaxvit.preprocess.eval_transform_for`), e.g. "model input: centre
    crop 224×224 of the 773×170 image resized to 1127×248, 20% of its width shown (crop_pct 0.9,
    bicubic)"."""
    from jaxvit import preprocess

    crop_pct = getattr(cfg, "crop_pct", 0.9) or preprocess.DEFAULT_CROP_PCT  # as eval_transform_for
    mode = getattr(cfg, "crop_mode", "center") or "center"
    interpolation = getattr(cfg, "interpolation", "bicubic")
    ch, cw = (cfg.img_size, cfg.img_size) if np.ndim(cfg.img_size) == 0 else tuple(cfg.img_size)
    rh, rw = preprocess.eval_resize_size((height, width), img_size=(ch, cw), crop_pct=crop_pct, crop_mode=mode)
    image = f"the {width}×{height} image"
    if mode in ("squash", "hf_squash"):  # timm's squash and transformers' size={height, width} processors
        image += f" squashed to {rw}×{rh} (aspect ratio not kept)"
    elif (rw, rh) != (width, height):
        image += f" resized to {rw}×{rh}"
    cropped, padded = rw > cw or rh > ch, rw < cw or rh < ch
    fill = "the mean colour" if mode == "border" else "black"  # as eval_geometry pads
    if padded and cropped:
        text = f"{image}, cut to its centre {min(cw, rw)}×{min(ch, rh)} and padded to {cw}×{ch} with {fill}"
    elif padded:
        text = f"{image}, padded to {cw}×{ch} with {fill}"
    elif cropped:
        text = f"centre crop {cw}×{ch} of {image}"
    else:
        text = image
    shown = [(f"{100 * c / r:.0f}%", side) for c, r, side in [(cw, rw, "width"), (ch, rh, "height")] if r > c]
    if len(shown) == 2 and shown[0][0] == shown[1][0]:
        text += f", {shown[0][0]} of each side shown"
    elif shown:
        text += ", " + " and ".join(f"{pct} of its {side}" for pct, side in shown) + " shown"
    return f"model input: {text} (crop_pct {crop_pct:g}, {interpolation})"
