"""The HTML report: one self-contained page per image and paged index pages (`ReportWriter`),
`write_report` (analyse every batch and write the pages), and `verify` (a written report's links,
images and the absence of scripts and network references). What a page shows: `predmaps.report`.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import re
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from jaxvit import safe_write
from predmaps.report.compute import AGNOSTIC, Batch, ImageResult, ReportOptions, analyse, plan_columns

METHOD_TITLES = {
    "predicatt": "PredicAtt", "prediction_map": "Ψ", "weighted_attention": "Ã", "mean_attention": "Mean attention",
    "raw_attention": "Raw attention", "rollout": "Rollout", "gradcam": "GradCAM",
    "generic_attention": "Generic attention", "transattr": "Transformer Attribution", "lrp": "LRP",
    "partial_lrp": "Partial LRP",
}


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


def _page(title: str, header: str, body: str, css: str = "") -> str:
    """A whole page: the shared CSS plus `css` (a page kind's own rules), no script."""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<link rel="icon" href="data:,"><title>{html.escape(title)}</title><style>{CSS}{css}</style></head>\n'
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


class IndexPages:
    """An index's rows in pages of `per_page`: the first page's rows are kept for index.html (its owner writes it
    last, with the summary); each later page is written as index_N.html once it is known whether another
    follows, so memory holds one page of rows however many there are. table(rows) -> a page's table.
    Creates the report folder `out_dir` (`.out`), once `per_page` is known to be valid."""

    def __init__(self, out_dir, per_page: int, title: str, meta: str, table: Callable[[list[str]], str],
                 css: str = ""):
        if not isinstance(per_page, int) or per_page < 1:
            raise ValueError(f"rows per index page must be an integer >= 1; got {per_page!r}")
        out = safe_write.make_dir(out_dir)  # a symlinked report/ would put the pages where it points
        self.out, self.per_page, self.title, self.meta, self.table, self.css = out, per_page, title, meta, table, css
        self.rows: list[str] = []
        self.first_rows: list[str] | None = None
        self.paths: list[Path] = []  # index_2.html onwards

    def page_of(self, position: int) -> str:
        """The index file listing row `position` (0-based)."""
        return _index_name(position // self.per_page)

    def add(self, row: str):
        if len(self.rows) == self.per_page:  # only now is it known that another index page follows
            self._flush(more=True)
        self.rows.append(row)

    def _flush(self, more: bool):
        page = len(self.paths) + (self.first_rows is not None)
        if page == 0:
            self.first_rows = self.rows
        else:
            nav = _nav([("↑ summary", "index.html"), ("← previous", _index_name(page - 1)),
                        ("next →", _index_name(page + 1) if more else None)])
            title = f"{self.title} · index page {page + 1}"
            path = self.out / _index_name(page)
            safe_write.write_text(path, _page(title, f"<h1>{html.escape(title)}</h1>{self.meta}{nav}",
                                              f"<section>{self.table(self.rows)}</section>", self.css))
            self.paths.append(path)
        self.rows = []

    def finish(self) -> tuple[str, str, str]:
        """Write the last page (once; calling again changes nothing) -> what index.html shows: the first page's
        table, the links to every index page ('' when there is one) and its header's link to page 2 ('')."""
        if self.rows or self.first_rows is None:
            self._flush(more=False)
        table = self.table(self.first_rows or [])
        if not self.paths:
            return table, "", ""
        links = [("1", None)] + [(str(p + 1), _index_name(p)) for p in range(1, 1 + len(self.paths))]
        pager = "<p>index pages: " + " · ".join(f"<a href='{h}'>{t}</a>" if h else f"<b>{t}</b>" for t, h in links)
        return table, pager + "</p>", _nav([("next index page →", _index_name(1))])


class ReportWriter:
    """Writes pages as images arrive; `finish()` writes the index. Memory and files stay bounded:
    one pending page, one index page of rows, and per-image statistics curves (a few floats)."""

    def __init__(self, out_dir, cfg, options: ReportOptions):
        self.cfg, self.o = cfg, options
        self.pending: tuple[ImageResult, str, str] | None = None  # result, file name, previous file name
        self.index = IndexPages(out_dir, options.per_index_page, options.title, _meta(cfg, options), _index_table)
        self.out = self.index.out
        self.pages: list[Path] = []
        self.stats: list[dict] = []
        self.top_blocks: list[int] = []
        self.correct: list[bool] = []
        self.count = 0

    def _flush_pending(self, next_name: str | None):
        if self.pending is None:
            return
        r, name, prev = self.pending
        nav = _nav([("↑ index", self.index.page_of(r.index)), ("← previous", prev),
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
        self.index.add(_index_row(r, self.cfg, self.o, name))
        if r.stats is not None:
            self.stats.append(r.stats)
            self.top_blocks.append(r.top_head_block)
            self.correct.append(int(np.argmax(r.probs)) in {int(x) for x in r.labels if x >= 0})
        self.count += 1

    def finish(self, stopped: str | None = None) -> Path:
        """Write the index. stopped: why the run ended before its last image (said on the index)."""
        self._flush_pending(None)
        table, pager, next_page = self.index.finish()
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
        parts.append(f"<section><h2>Images ({self.count})</h2>{pager}<p class='note'>Each row links to the image's "
                     "page: predictions, PredicAtt per class beside raw attention and rollout, the prediction map at "
                     f"every layer, and the heads ranked by α̃.</p>{table}{pager}</section>")
        header = f"<h1>{html.escape(self.o.title)}</h1>{_meta(self.cfg, self.o)}{next_page}"
        path = self.out / "index.html"
        safe_write.write_text(path, _page(self.o.title, header, "\n".join(parts)))
        return path


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
    return Report(index=index, pages=writer.pages, index_pages=[index] + writer.index.paths, lines=lines,
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
