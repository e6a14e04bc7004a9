"""Self-contained HTML reports of PredicAtt explanations: one page per image, paged index pages.

    from predmaps import report
    batch = report.Batch(names=["cat.jpg"], images=unit, inputs=x, labels=None)     # unit: [0, 1], x: normalised
    rep = report.write_report(model, params, [batch], "out/report", report.ReportOptions(target="top3"))
    rep.index                                                                      # out/report/index.html

Each image's page shows, for that image:
  - the top-k predictions with probabilities and class names (ground truth marked when given);
  - PredicAtt_L and PredicAtt_{L-1} (plus the requested method and layers) for every requested
    class, beside the class-agnostic raw attention and rollout;
  - the prediction map Psi^(l)(c) of one chosen class at every layer l = 0..L (paper Fig. 3, 8);
  - the heads ranked by alpha~ (PredicAtt_L's head weights), with the class-token attention maps
    of the most and least contributing heads (paper Fig. 4, 13-15);
  - with labels: per-layer accuracy, confidence and entropy of the class token and the patch
    tokens (paper Fig. 19-21); the index shows their mean over all images.

Pages are plain HTML and CSS (no script), every image embedded as a PNG data URI, so a page opens
offline and can be mailed around alone. Images are processed in fixed-size batches (one compile)
and pages are written as they are made, so memory and every file stay bounded however many images
a run has: the index is split into pages of `per_index_page` rows.

Size: compute, HTML and PNG writing in one module; issue 25 splits them (overlays without the
HTML report), not yet done.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import html
import io
import re
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import jax
import numpy as np

from jaxvit import safe_write

AGNOSTIC = ("raw_attention", "rollout")  # class-agnostic baselines shown beside every class
METHOD_TITLES = {
    "predicatt": "PredicAtt", "prediction_map": "Ψ", "weighted_attention": "Ã", "mean_attention": "Mean attention",
    "raw_attention": "Raw attention", "rollout": "Rollout", "gradcam": "GradCAM",
    "generic_attention": "Generic attention", "transattr": "Transformer Attribution", "lrp": "LRP",
    "partial_lrp": "Partial LRP",
}


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


@dataclasses.dataclass
class Report:
    index: Path
    pages: list[Path]
    index_pages: list[Path]
    lines: list[str]
    seconds: float


def method_title(method: str, layer: int | None, depth: int) -> str:
    """HTML title of a map: PredicAtt<sub>L</sub>, PredicAtt<sub>L−1</sub>, Ψ<sub>3</sub>, Rollout..."""
    name = METHOD_TITLES.get(method, html.escape(method))
    if layer is None:
        return name
    sub = "L" if layer == depth else "L−1" if layer == depth - 1 else str(layer)
    return f"{name}<sub>{sub}</sub>"


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


# ---- computation ----

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
    if mode == "squash":
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


# ---- HTML ----

CSS = """
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;background:#f4f5f7;
color:#1c2230}
header{background:#1c2230;color:#fff;padding:10px 24px}
header h1{font-size:19px;margin:0 0 2px;font-weight:600}
header .meta{color:#c5cad6;font-size:12.5px}
nav{font-size:13px;margin-top:4px}
nav a{color:#9cc3ff;margin-right:14px;text-decoration:none}
nav .off{color:#6b7385;margin-right:14px}
main{padding:4px 24px 40px}
section{background:#fff;border:1px solid #dcdfe6;border-radius:8px;padding:10px 16px 12px;margin:14px 0;
overflow-x:auto}
h2{font-size:16px;margin:2px 0 4px}
h3{font-size:14px;margin:10px 0 2px}
.note{color:#596274;font-size:12.5px;margin:0 0 8px}
.row{display:flex;flex-wrap:wrap;gap:6px;align-items:flex-start}
figure{margin:0 2px 4px;text-align:center}
figcaption{font-size:11.5px;color:#333;line-height:1.25;margin-top:1px}
img{display:block;margin:0}
td img,figure img{margin:0 auto}
table{border-collapse:collapse}
table.preds td,table.preds th{padding:2px 10px 2px 0;text-align:left;font-size:13px}
table.preds td.p{text-align:right;font-variant-numeric:tabular-nums}
.bar{display:inline-block;height:10px;background:#4c72b0;border-radius:2px;vertical-align:middle}
.gt{color:#1a7f37;font-weight:600}
table.maps th{font-size:13px;font-weight:600;padding:2px 6px;white-space:nowrap}
table.maps td{padding:3px 6px;text-align:center;vertical-align:middle}
table.maps td.cls{text-align:left;font-size:13px;white-space:nowrap}
table.maps td.agn{background:#f7f8fa}
table.index td,table.index th{padding:4px 10px;border-bottom:1px solid #e6e8ee;text-align:left;font-size:13px;
vertical-align:middle}
.legend{display:inline-block;width:150px;height:11px;vertical-align:middle;border:1px solid #888;margin:0 6px}
.ok{color:#1a7f37}.bad{color:#b42318}
.flex{display:flex;gap:24px;align-items:flex-start;flex-wrap:wrap}
"""


def _page(title: str, header: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<link rel="icon" href="data:,"><title>{html.escape(title)}</title><style>{CSS}</style></head>\n'
            f"<body><header>{header}</header><main>\n{body}\n</main></body></html>\n")


def _img(image, alt: str, title: str | None = None) -> str:
    from predmaps import viz

    w, h = image.size
    t = f' title="{html.escape(title)}"' if title else ""
    return f'<img src="{viz.to_data_uri(image)}" width="{w}" height="{h}" alt="{html.escape(alt)}"{t}>'


def _fig(image, caption: str, alt: str) -> str:
    return f"<figure>{_img(image, alt)}<figcaption>{caption}</figcaption></figure>"


def _slug(name: str) -> str:
    stem = Path(name).stem or "image"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem)[:48].strip("._") or "image"


def _pct(p: float) -> str:
    return f"{100 * p:.1f}%" if p >= 0.001 else f"{100 * p:.2g}%"


class _Tiles:
    """Overlays of one image at a display size (the base image resized once)."""

    def __init__(self, r: ImageResult, options: ReportOptions):
        from predmaps import viz

        self.o = options
        self.extent = r.extent
        self.base = {s: viz.fit(r.image, s) for s in {options.tile, options.small_tile, options.thumb}}

    def __call__(self, m, size: int, scale: tuple[float, float] | None = None):
        from predmaps import viz

        lo, hi = scale if scale is not None else (None, None)
        return viz.overlay(self.base[size], m, cmap=self.o.cmap, alpha=self.o.alpha, vmin=lo, vmax=hi,
                           extent=self.extent)


def _scale(maps: Iterable[np.ndarray], shared: bool):
    from predmaps import viz

    return viz.finite_range(maps) if shared else None


def _class_label(cfg, c: int) -> str:
    name = cfg.class_name(int(c))
    return html.escape(name) if name == str(int(c)) else f"{html.escape(name)} <span class='note'>({int(c)})</span>"


def _stats_curves(stats: dict) -> dict:
    return {"accuracy": {"class token": stats["cls_accuracy"], "patch tokens": stats["patch_accuracy"]},
            "confidence (logit margin)": {"class token": stats["cls_confidence"],
                                          "patch tokens": stats["patch_confidence"]},
            "entropy": {"class token": stats["cls_entropy"], "patch tokens": stats["patch_entropy"]}}


def _nav(links: list[tuple[str, str | None]]) -> str:
    return "<nav>" + "".join(f'<a href="{html.escape(h)}">{t}</a>' if h else f'<span class="off">{t}</span>'
                             for t, h in links) + "</nav>"


def _meta(cfg, o: ReportOptions) -> str:
    from predmaps import viz

    scale = "one scale per method (over classes and layers)" if o.shared_scale else "each map its own min–max"
    name = o.model_name or cfg.name or "model"
    return (f'<div class="meta">{html.escape(name)} · {cfg.depth} blocks × {cfg.num_heads} heads, '
            f'{cfg.grid_size[0]}×{cfg.grid_size[1]} patches · method {html.escape(o.method)} · colour map '
            f'{html.escape(o.cmap)}: low<span class="legend" style="background:{viz.cmap_css_gradient(o.cmap)}">'
            f'</span>high · opacity {o.alpha:g} · {scale}</div>')


def image_page(r: ImageResult, cfg, o: ReportOptions, nav: str) -> str:
    """The HTML of one image's page."""
    from predmaps import viz

    depth = cfg.depth
    tiles = _Tiles(r, o)
    k_all = len(r.classes)
    k = min(k_all, o.max_classes)
    label_set = set() if r.labels is None else {int(c) for c in r.labels if c >= 0}
    parts = []

    # 1. predictions
    top = np.argsort(-r.probs)[: o.top_k]
    rows = "".join(
        f"<tr><td>{i + 1}</td><td{' class=gt' if int(c) in label_set else ''}>{_class_label(cfg, c)}"
        f"{' ✓' if int(c) in label_set else ''}</td><td class='p'>{_pct(r.probs[c])}</td>"
        f"<td><span class='bar' style='width:{max(1, round(160 * float(r.probs[c])))}px'></span></td></tr>"
        for i, c in enumerate(top))
    gt = ("" if not label_set else
          "<p class='note'>ground truth: " + ", ".join(_class_label(cfg, c) for c in sorted(label_set)) + "</p>")
    parts.append(
        f"<section><h2>Prediction</h2><div class='flex'>{_fig(tiles.base[o.tile], html.escape(r.caption), 'input')}"
        f"<div><table class='preds'><tr><th>#</th><th>class</th><th>p</th><th></th></tr>{rows}</table>{gt}"
        f"</div></div></section>")

    # 2. explanations per class
    cols = [key for key in r.maps if key[0] not in AGNOSTIC or key[1] is not None]
    by_method = {}
    for key in cols:
        by_method.setdefault(key[0], []).append(key)
    scales = {m: _scale([r.maps[key][:k] for key in keys], o.shared_scale) for m, keys in by_method.items()}
    head = "".join(f"<th>{method_title(m, l, depth)}</th>" for m, l in cols)
    head += "".join(f"<th>{METHOD_TITLES[m]}</th>" for m in AGNOSTIC)
    body = []
    for j in range(k):
        c = int(r.classes[j])
        cells = [f"<td class='cls'>{_class_label(cfg, c)}<br><span class='note'>p = {_pct(r.probs[c])}</span>"
                 f"{'<br><span class=gt>ground truth</span>' if c in label_set else ''}</td>"]
        for m, l in cols:
            alt = f"{METHOD_TITLES.get(m, m)} layer {l} class {cfg.class_name(c)}"
            cells.append(f"<td>{_img(tiles(r.maps[(m, l)][j], o.tile, scales[m]), alt)}</td>")
        if j == 0:
            for m in AGNOSTIC:
                cells.append(f"<td class='agn' rowspan='{k}'>{_img(tiles(r.agnostic[m], o.tile), METHOD_TITLES[m])}"
                             f"<div class='note'>same for every class</div></td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    more = f" The first {k} of {k_all} requested classes are shown." if k < k_all else ""
    parts.append(
        "<section><h2>Explanations per class</h2><p class='note'>PredicAtt<sub>i</sub>(c) = Ã(c) · Ψ<sup>(i)</sup>(c):"
        " the class-token attention of all heads weighted by α̃ (their similarity to the prediction map), times "
        "the prediction map of layer i. Raw attention (last block, mean over heads) and rollout do not depend on "
        f"the class.{more}</p><table class='maps'><tr><th>class</th>{head}</tr>{''.join(body)}</table></section>")

    # 3. prediction map of one class at every layer
    lm = r.layer_maps
    sc = _scale(lm, o.shared_scale)
    figs = "".join(_fig(tiles(lm[layer], o.small_tile, sc),
                        f"layer {layer}{' (L)' if layer == depth else ''}<br>max {lm[layer].max():.2f}",
                        f"prediction map layer {layer}") for layer in range(depth + 1))
    parts.append(
        f"<section><h2>Prediction map Ψ<sup>(l)</sup>(c) at every layer, c = {_class_label(cfg, r.map_class)}</h2>"
        "<p class='note'>The classifier head applied to every patch token of layer l (0 = the embeddings): the "
        "probability of class c at each patch; the caption gives its largest value.</p>"
        f"<div class='row'>{figs}</div></section>")

    # 4. heads ranked by alpha~
    n_heads = depth * cfg.num_heads
    n = min(o.heads, n_heads // 2) if n_heads > 1 else 1
    hk = min(k, o.head_classes)
    blocks = []
    for j in range(hk):
        c = int(r.classes[j])
        a = r.head_weights[j]  # (L, H)
        order = np.argsort(-a, axis=None)
        most, least = order[:n], order[::-1][:n]
        shown = [np.unravel_index(i, a.shape) for i in np.concatenate([most, least])]
        sc = _scale([r.head_attention[b, h] for b, h in shown], o.shared_scale)

        def head_figs(idx, sc=sc, a=a):
            out = []
            for i in idx:
                b, h = np.unravel_index(i, a.shape)
                rank = int(np.where(order == i)[0][0]) + 1
                out.append(_fig(tiles(r.head_attention[b, h], o.small_tile, sc),
                                f"block {b} head {h}<br>α̃ = {a[b, h]:.3g} (#{rank})", f"block {b} head {h}"))
            return "".join(out)

        amap = viz.head_weight_map(a, title="α̃ over blocks × heads",
                                   mark=[tuple(int(v) for v in np.unravel_index(i, a.shape)) for i in most])
        blocks.append(
            f"<h3>{_class_label(cfg, c)}</h3><div class='flex'><figure>{_img(amap, 'head weights')}"
            f"<figcaption>red: the {n} most contributing</figcaption></figure><div>"
            f"<div class='note'>most contributing</div><div class='row'>{head_figs(most)}</div>"
            f"<div class='note'>least contributing</div><div class='row'>{head_figs(least)}</div></div></div>")
    more = f" The first {hk} of {k_all} classes are shown." if hk < k_all else ""
    parts.append(
        "<section><h2>Heads ranked by α̃</h2><p class='note'>α̃<sub>l,h</sub>(c): the softmax over all heads of the "
        "similarity between head (l, h)'s class-token attention and the last layer's prediction map of c; "
        f"PredicAtt<sub>L</sub> weights each head's attention map (shown) by it.{more}</p>{''.join(blocks)}</section>")

    # 5. per-layer statistics
    if r.stats is not None:
        plot = viz.layer_curves(_stats_curves(r.stats))
        parts.append(
            "<section><h2>Per-layer statistics</h2><p class='note'>What the tokens of each layer predict through the "
            f"classifier head: accuracy ({html.escape(o.label_note)}), confidence (largest minus second largest "
            "logit) and softmax entropy; the class token, and the mean over patch tokens. The index shows the mean "
            f"over all images.</p>{_img(plot, 'per-layer statistics')}</section>")

    header = (f"<h1>{html.escape(o.title)} · image {r.index + 1}: {html.escape(r.name)}</h1>{_meta(cfg, o)}{nav}")
    return _page(f"{r.name} · {o.title}", header, "\n".join(parts))


def _index_row(r: ImageResult, cfg, o: ReportOptions, href: str) -> str:
    tiles = _Tiles(r, o)
    m = r.maps[("predicatt", cfg.depth)][0]
    top = np.argsort(-r.probs)[:3]
    label_set = set() if r.labels is None else {int(x) for x in r.labels if x >= 0}
    preds = ", ".join(f"{html.escape(cfg.class_name(t))} {_pct(r.probs[t])}" for t in top)
    shown = r.classes[: o.max_classes]
    explained = ", ".join(html.escape(cfg.class_name(k)) for k in shown) + (" …" if len(r.classes) > len(shown) else "")
    if label_set:
        ok = int(top[0]) in label_set
        gt = (", ".join(html.escape(cfg.class_name(x)) for x in sorted(label_set))
              + (" <span class='ok'>✓</span>" if ok else " <span class='bad'>✗</span>"))
    else:
        gt = "–"
    return (f"<tr><td>{r.index + 1}</td><td>{_img(tiles.base[o.thumb], 'input')}</td>"
            f"<td>{_img(tiles(m, o.thumb), 'PredicAtt_L')}<br><span class='note'>c = "
            f"{html.escape(cfg.class_name(int(r.classes[0])))}</span></td>"
            f"<td><a href='{html.escape(href)}'>{html.escape(r.name)}</a></td>"
            f"<td>{explained}</td><td>{preds}</td><td>{gt}</td></tr>")


def _index_table(rows: list[str]) -> str:
    return ("<table class='index'><tr><th>#</th><th>input</th><th>PredicAtt<sub>L</sub></th><th>image</th>"
            "<th>explained classes</th><th>top-3 predictions</th><th>ground truth</th></tr>" + "".join(rows) + "</table>")


def _reading_guide(o: ReportOptions) -> str:
    """The index's first section: what to look for, and how far this model's maps can be trusted."""
    trust = o.trust_note or ("How far to trust these maps: not measured for this model (predmaps eval digits "
                             "measures a digits model's class specificity); the per-layer statistics below show how "
                             "often its patch tokens predict the label through the head on these images.")
    return ("<section><h2>What to look for</h2><p>Each map is one class's evidence: where in the image the "
            "model sees that class (colour scale: low to high). A class-specific map (PredicAtt, the prediction "
            "map Ψ) should move to a different object when the class changes; raw attention and rollout show the "
            "same map for every class. The thumbnail below shows PredicAtt<sub>L</sub> of the class named under "
            f"it.</p><p class='note'>{html.escape(trust)}</p></section>")


def _index_name(page: int) -> str:
    return "index.html" if page == 0 else f"index_{page + 1}.html"


class ReportWriter:
    """Writes pages as images arrive; `finish()` writes the index. Memory and files stay bounded:
    one pending page, one index page of rows, and per-image statistics curves (a few floats)."""

    def __init__(self, out_dir, cfg, options: ReportOptions):
        self.out = safe_write.make_dir(out_dir)  # a symlinked report/ would put the pages where it points
        self.cfg, self.o = cfg, options
        self.pending: tuple[ImageResult, str, str] | None = None  # result, file name, previous file name
        self.rows: list[str] = []
        self.first_rows: list[str] | None = None
        self.index_pages: list[Path] = []
        self.pages: list[Path] = []
        self.stats: list[dict] = []
        self.top_blocks: list[int] = []
        self.correct: list[bool] = []
        self.count = 0

    def _flush_pending(self, next_name: str | None):
        if self.pending is None:
            return
        r, name, prev = self.pending
        nav = _nav([("↑ index", _index_name(r.index // self.o.per_index_page)), ("← previous", prev),
                    ("next →", next_name)])
        path = self.out / name
        safe_write.write_text(path, image_page(r, self.cfg, self.o, nav))
        self.pages.append(path)
        self.pending = None

    def add(self, r: ImageResult):
        name = f"{r.index:04d}_{_slug(r.name)}.html"
        prev = self.pending[1] if self.pending else None
        self._flush_pending(name)
        self.pending = (r, name, prev)
        if len(self.rows) == self.o.per_index_page:  # only now is it known that another index page follows
            self._flush_rows(more=True)
        self.rows.append(_index_row(r, self.cfg, self.o, name))
        if r.stats is not None:
            self.stats.append(r.stats)
            self.top_blocks.append(r.top_head_block)
            self.correct.append(int(np.argmax(r.probs)) in {int(x) for x in r.labels if x >= 0})
        self.count += 1

    def _flush_rows(self, more: bool):
        page = len(self.index_pages) + (self.first_rows is not None)
        if page == 0:
            self.first_rows = self.rows
        else:
            nav = _nav([("↑ summary", "index.html"), ("← previous", _index_name(page - 1)),
                        ("next →", _index_name(page + 1) if more else None)])
            header = f"<h1>{html.escape(self.o.title)} · index page {page + 1}</h1>{_meta(self.cfg, self.o)}{nav}"
            path = self.out / _index_name(page)
            safe_write.write_text(path, _page(f"{self.o.title} · index page {page + 1}", header,
                                              f"<section>{_index_table(self.rows)}</section>"))
            self.index_pages.append(path)
        self.rows = []

    def finish(self, stopped: str | None = None) -> Path:
        """Write the index. stopped: why the run ended before its last image (said on the index)."""
        self._flush_pending(None)
        if self.rows or self.first_rows is None:
            self._flush_rows(more=False)
        n_pages = 1 + len(self.index_pages)
        parts = [_reading_guide(self.o)]
        if stopped:
            parts.append(f"<section><h2>Incomplete</h2><p>This run {html.escape(stopped)} after {self.count} "
                         "image(s): the report holds only those.</p></section>")
        if self.stats:
            from predmaps import viz

            mean = {key: np.nanmean(np.stack([s[key] for s in self.stats]), axis=0) for key in self.stats[0]}
            plot = viz.layer_curves(_stats_curves(mean), title=f"mean over {len(self.stats)} image(s)")
            blocks = np.asarray(self.top_blocks)  # as stats.top_head_histogram, on the host
            hist = viz.histogram(np.bincount(blocks[blocks >= 0], minlength=self.cfg.depth)[: self.cfg.depth],
                                 xlabel="block", title="block of the most similar head")
            acc = float(np.mean(self.correct))
            parts.append(
                "<section><h2>Per-layer statistics</h2><p class='note'>Paper Fig. 19-21: accuracy "
                f"({html.escape(self.o.label_note)}), confidence (logit margin) and entropy of what each layer's "
                "class token and patch tokens predict through the classifier head, averaged over the images; and, "
                "per image, the block holding the head whose attention is most similar to the predicted class's "
                f"prediction map. Top-1 accuracy of the model: {100 * acc:.1f}% ({sum(self.correct)}/"
                f"{len(self.correct)}).</p><div class='flex'>{_img(plot, 'per-layer statistics')}"
                f"{_img(hist, 'top head block histogram')}</div></section>")
        pager = ""
        if n_pages > 1:
            links = [("1", None)] + [(str(p + 1), _index_name(p)) for p in range(1, n_pages)]
            pager = "<p>index pages: " + " · ".join(
                f"<a href='{h}'>{t}</a>" if h else f"<b>{t}</b>" for t, h in links) + "</p>"
        parts.append(f"<section><h2>Images ({self.count})</h2>{pager}<p class='note'>Each row links to the image's "
                     "page: predictions, PredicAtt per class beside raw attention and rollout, the prediction map at "
                     "every layer, and the heads ranked by α̃.</p>"
                     f"{_index_table(self.first_rows or [])}{pager}</section>")
        header = (f"<h1>{html.escape(self.o.title)}</h1>{_meta(self.cfg, self.o)}"
                  + (_nav([("next index page →", _index_name(1))]) if n_pages > 1 else ""))
        path = self.out / "index.html"
        safe_write.write_text(path, _page(self.o.title, header, "\n".join(parts)))
        return path


MAX_GRID_TILES = 100


def write_pngs(r: ImageResult, cfg, out: Path, method: str, layers: Sequence[int], *, cmap: str = "jet",
               alpha: float = 0.5, shared_scale: bool = False, stem: str | None = None) -> None:
    """Stand-alone PNG overlays at the model's input size: `{stem}_{method}_{layer}_{class}.png` per
    requested class and layer (layer named as the paper: L, L-1, ...; `{stem}_{method}_{class}.png`
    for methods without a layer), and `{stem}_{method}_grid.png` (layers x classes, at most 10
    classes a row; only up to 100 overlays: all 1000 ImageNet classes would make a 65 MB image,
    the single PNGs are the way to look at those). `stem`: the image's file stem unless given
    (`PngNames` keeps stems unique over a run)."""
    from predmaps import core, viz
    from predmaps.explain import get_method

    uses_layer = get_method(method).uses_layer
    stem = stem or Path(r.name).stem or "image"
    tiles, titles = [], []
    keys = [(method, core.layer_index(layer, cfg.depth) if uses_layer else None)
            for layer in (layers if uses_layer else layers[:1])]  # a method without a layer has one map per class
    # --shared-scale: one scale for the method over all its layers and classes, as on the pages
    lo, hi = _scale([r.maps[key] for key in keys], True) if shared_scale else (None, None)
    for key in keys:
        tag = core.layer_name(key[1], cfg.depth) if uses_layer else ""
        maps = r.maps[key]
        for j, c in enumerate(r.classes):
            img = viz.overlay(r.image, maps[j], cmap=cmap, alpha=alpha, vmin=lo, vmax=hi, extent=r.extent)
            cname = re.sub(r"[^A-Za-z0-9_.-]+", "_", cfg.class_name(c))[:_CLASS_BYTES]
            save_png(img, out / (f"{stem}_{method}_{tag}_{cname}.png" if tag else f"{stem}_{method}_{cname}.png"))
            tiles.append(img)
            titles.append(f"{cfg.class_name(c)} {tag}".rstrip())
    if len(tiles) <= MAX_GRID_TILES:
        save_png(viz.grid(tiles, titles, columns=min(len(r.classes), 10), cell=max(128, r.image.shape[0])),
                 out / f"{stem}_{method}_grid.png")


def save_png(image, path: Path) -> None:
    """A PNG (PIL's default compression) written through `jaxvit.safe_write`: never through a symlink."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    safe_write.write_bytes(path, buf.getvalue(), durable=False)


# File names hold at most 255 bytes: stem + method + layer + class name + ".png" stays well under.
MAX_STEM_BYTES, _CLASS_BYTES = 120, 64


def _clip_utf8(text: str, limit: int) -> str:
    return display_name(text).encode("utf-8")[:limit].decode("utf-8", "ignore")


class PngNames:
    """File stems for `write_pngs`, unique over one run: a second `cat.jpg` (from another folder,
    or `cat.png`) gets `cat-2`, so its overlays do not overwrite the first one's. Stems are cut to
    120 bytes: a legal 250-byte image name would otherwise make overlay names too long to write."""

    def __init__(self):
        self.used: set[str] = set()

    def __call__(self, name: str) -> str:
        return self.stem_and_note(name)[0]

    def stem_and_note(self, name: str) -> tuple[str, str | None]:
        """The stem, and why it is not the name's own stem (None when it is)."""
        own = display_name(Path(name).stem)
        base = _clip_utf8(own, MAX_STEM_BYTES) or "image"
        stem, k = base, 1
        while stem in self.used:
            k += 1
            stem = f"{base}-{k}"
        self.used.add(stem)
        why = []
        if base != own and own:
            why.append(f"a file stem over {MAX_STEM_BYTES} bytes, shortened")
        if k > 1:
            why.append("the file stem of an earlier image")
        return stem, " and ".join(why) or None


def write_report(model, params, batches: Iterable[Batch], out_dir, options: ReportOptions | None = None, *,
                 on_result: Callable[[ImageResult], None] | None = None) -> Report:
    """Analyse the batches and write the report into out_dir: index.html (+ index_N.html when
    more than `per_index_page` images) and one page per image. on_result(r) is called for every
    image (e.g. to write PNGs). Returns the paths and one summary line per image."""
    from predmaps import viz

    o = options or ReportOptions()
    viz.check_cmap(o.cmap)
    if not 0 <= o.alpha <= 1:
        raise ValueError(f"opacity must be in [0, 1]; got {o.alpha}")
    cfg = model.config
    plan_columns(o.method, o.layers, cfg.depth)  # validates method and layers before any work
    if o.map_class is not None and not 0 <= o.map_class < cfg.num_classes:
        raise ValueError(f"map class {o.map_class} out of range 0..{cfg.num_classes - 1}")
    t0 = time.perf_counter()
    writer = ReportWriter(out_dir, cfg, o)
    lines = []
    start = 0
    try:
        for batch in batches:
            if not len(batch.names):
                continue
            for r in analyse(model, params, batch, o, start=start):
                top = np.argsort(-r.probs)[:5]
                lines.append(f"{r.name}: " + ", ".join(f"{cfg.class_name(c)} {r.probs[c]:.3f}" for c in top))
                writer.add(r)
                if on_result is not None:
                    on_result(r)
            start += len(batch.names)
    except BaseException as e:  # Ctrl-C included: the pages already written stay reachable from an index
        why = "was interrupted" if isinstance(e, KeyboardInterrupt) else \
            f"stopped on an error ({type(e).__name__}: {e})"
        try:
            writer.finish(stopped=why)
        except Exception:  # noqa: BLE001 - e.g. the disk that failed the run; the first error is the one to report
            pass
        raise
    index = writer.finish()
    return Report(index=index, pages=writer.pages, index_pages=[index] + writer.index_pages, lines=lines,
                  seconds=time.perf_counter() - t0)


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.images, self.links, self.scripts, self.external = [], [], 0, []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a.get("src") or "")
        elif tag == "a" and a.get("href"):
            self.links.append(a["href"])
        elif tag == "script":
            self.scripts += 1
        for key, value in attrs:
            if value and key in ("src", "href", "srcset", "data", "poster", "action") \
                    and re.match(r"^\s*(https?:)?//", value, re.I):
                self.external.append(f"<{tag} {key}={value[:80]}>")
        style = a.get("style") or ""
        if re.search(r"url\(\s*['\"]?(https?:)?//", style, re.I):
            self.external.append(f"<{tag} style={style[:80]}>")


def verify(index) -> list[str]:
    """Problems with a written report, empty when there are none. From `index` (a page path), follows
    every local link; every page must be script-free and load nothing from the network, every <img>
    must be an embedded image that decodes (or an existing local file) and every link must reach an
    existing local file."""
    from PIL import Image

    problems = []
    todo, seen = [Path(index).resolve()], set()
    while todo:
        page = todo.pop()
        if page in seen:
            continue
        seen.add(page)
        if not page.is_file():
            problems.append(f"missing page {page}")
            continue
        text = page.read_text(encoding="utf-8")
        refs = _Refs()
        refs.feed(text)
        if refs.scripts:
            problems.append(f"{page.name}: {refs.scripts} <script> element(s)")
        problems += [f"{page.name}: external reference {e}" for e in refs.external]
        if not refs.images and "<img" in text:
            problems.append(f"{page.name}: unparsed <img> elements")
        for i, src in enumerate(refs.images):
            if src.startswith("data:"):
                m = re.match(r"data:image/(png|jpeg|gif|webp);base64,(.*)$", src, re.S)
                try:
                    Image.open(io.BytesIO(base64.b64decode(m.group(2), validate=True))).load()
                except Exception as e:  # noqa: BLE001 - any failure means a broken image
                    problems.append(f"{page.name}: image {i} does not decode ({type(e).__name__})")
            elif not src or not (page.parent / src).is_file():
                problems.append(f"{page.name}: image {i} {src[:80]!r} is missing")
        for href in refs.links:
            target = href.split("#")[0]
            if not target:
                continue
            path = (page.parent / target).resolve()
            if not path.is_file():
                problems.append(f"{page.name}: link {href!r} leads nowhere")
            elif path.suffix == ".html":
                todo.append(path)
    return problems
