"""The text report: one self-contained HTML page per text, its words coloured per class (the paper's
Figs. 16-17), and index pages linking them (as the image report's, `per_index_page` rows a page); `text_results_json` gives the same numbers as JSON.

    from predmaps.report import text as text_report
    results = text_report.analyse_texts(model, params, tokenizer, ["a wonderful film"],
                                        columns=text_report.plan_text_columns("predicatt", [-1], depth))
    rep = text_report.write_text_report(results, "out/report", model.config)

Each page shows the text, the predicted class and its probability, and per method / layer one row per
class with every word coloured by its word-level map (`predmaps.text.word_maps`: the word's pieces
summed). Every coloured word carries its value in `data-v` (the float32 value, exactly), so what a page
shows can be read back. Pages are plain HTML and CSS (no script, nothing loaded), the text HTML-escaped.
"""

from __future__ import annotations

import dataclasses
import html
import re
import time
import warnings
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from jaxvit import safe_write
from predmaps.report.html import METHOD_TITLES, IndexPages, Report, _nav, _page, _pct, method_title

# Diverging colours: red for positive values (the word's share of the class's map), blue for negative ones.
POSITIVE_RGB = (214, 39, 40)
NEGATIVE_RGB = (31, 119, 180)

TEXT_CSS = """
.txt{font-size:16px;line-height:2.1;white-space:pre-wrap}
.w{padding:1px 3px;border-radius:3px}
.unseen{color:#8a909c;text-decoration:line-through}
table.tmaps{width:100%}
table.tmaps td{padding:4px 8px;vertical-align:top;border-bottom:1px solid #eceef2}
table.tmaps td.cls{white-space:nowrap;font-size:13px;width:1%}
.warn{background:#fff4e5;border-color:#f0b429}
.scale{display:inline-block;width:150px;height:11px;vertical-align:middle;border:1px solid #888;margin:0 6px}
"""


@dataclasses.dataclass
class TextResult:
    """One explained text. tokens, offsets: the tokens the model saw and their characters; words, spans:
    the words those tokens cover; probs (C,); classes (K,) the explained classes; word_maps and
    token_maps: per (method, layer index or None) a (K, W) and a (K, T) float32 map (T: this text's
    tokens, special ones included, 0 there); truncation: the tokenizer's warning when the text was cut."""

    index: int
    text: str
    tokens: tuple[str, ...]
    offsets: tuple[tuple[int, int], ...]
    words: tuple[str, ...]
    spans: tuple[tuple[int, int], ...]
    probs: np.ndarray
    classes: np.ndarray
    word_maps: dict
    token_maps: dict
    truncation: str | None = None


@dataclasses.dataclass
class TextReportOptions:
    """title; model_name: shown in the header; shared_scale: one colour scale per method / layer over all
    its class rows (default: each row its own); reduce: how word pieces merge into a word ("sum" / "max");
    notes: lines for the index (e.g. the empty lines skipped); per_index_page: rows per index page."""

    title: str = "predmaps: text explanations"
    model_name: str = ""
    shared_scale: bool = False
    reduce: str = "sum"
    notes: Sequence[str] = ()
    per_index_page: int = 100


def plan_text_columns(method: str, layers: Sequence[int], depth: int) -> list[tuple[str, int | None]]:
    """(method, layer index or None) of each map a page shows: PredicAtt_L first, then `method` at each of
    `layers` (once, without a layer, for methods that take none). ValueError for an unknown method / layer."""
    from predmaps.core import layer_index
    from predmaps.text import TEXT_METHODS

    if method not in TEXT_METHODS:
        raise ValueError(f"unknown text method {method!r}; available: {', '.join(TEXT_METHODS)}")
    cols = [("predicatt", depth)]
    if TEXT_METHODS[method].uses_layer:
        cols += [(method, layer_index(layer, depth)) for layer in layers]
    else:
        cols.append((method, None))
    return list(dict.fromkeys(cols))


_TRUNCATED = re.compile(r"^text (\d+) (has .*)$", re.S)


def bucket_length(t: int, limit: int) -> int:
    """The padded length a batch of longest text t tokens runs at: the next power of two (at least 16),
    at most the model's `limit`, so a file of texts of every length compiles a few shapes, not one per length."""
    return min(max(16, 1 << (t - 1).bit_length()), max(limit, t))


def pad_batch(batch, length: int, pad_id: int):
    """`batch` (a TextBatch) padded to `length` tokens with `pad_id`: padding is masked out of attention and
    of every map, so each text's maps are those of the unpadded batch."""
    extra = length - batch.input_ids.shape[1]
    if extra <= 0:
        return batch

    def pad(a, value):
        return np.pad(a, ((0, 0), (0, extra)), constant_values=value)

    return dataclasses.replace(batch, input_ids=pad(batch.input_ids, pad_id),
                               attention_mask=pad(batch.attention_mask, False),
                               token_type_ids=pad(batch.token_type_ids, 0), special=pad(batch.special, True))


def analyse_texts(model, params, tokenizer, texts: Sequence[str], *, columns, target="all", batch_size: int = 8,
                  reduce: str = "sum", on_warning: Callable[[int, str], None] | None = None) -> Iterator[TextResult]:
    """Explain `texts` in batches of `batch_size` -> one TextResult per text, in order. on_warning(i, message):
    the tokenizer's truncation warning of text i (also kept on its result)."""
    from predmaps.text import explain_text, word_maps

    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start:start + batch_size])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            batch = tokenizer(chunk)
        batch = pad_batch(batch, bucket_length(batch.input_ids.shape[1], tokenizer.config.max_tokens),
                          tokenizer.config.pad_token_id)
        cut = {}
        for w in caught:
            m = _TRUNCATED.match(str(w.message))
            if m is None:  # not the tokenizer's truncation: pass it on untouched
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
                continue
            cut[int(m.group(1))] = f"this text {m.group(2)}"
            if on_warning is not None:
                on_warning(start + int(m.group(1)), cut[int(m.group(1))])
        per_col, given = {}, target
        for method, layer in columns:
            ex = explain_text(model, params, batch, method=method, target=given, layer=-1 if layer is None else layer)
            per_col[(method, layer)] = (ex, word_maps(ex, batch, reduce))
            given = np.asarray(ex.classes)  # the first column's classes for every column: the rows line up
        ex0 = per_col[columns[0]][0]
        probs = np.asarray(ex0.logits, np.float64)
        probs = np.exp(probs - probs.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        classes = np.asarray(ex0.classes)
        for i in range(len(chunk)):
            n = len(batch.tokens[i])
            wm0 = per_col[columns[0]][1][i]
            yield TextResult(
                index=start + i, text=chunk[i], tokens=batch.tokens[i], offsets=batch.offsets[i], words=wm0.words,
                spans=wm0.spans, probs=probs[i], classes=classes[i],
                word_maps={key: wm[i].maps for key, (_, wm) in per_col.items()},
                token_maps={key: np.asarray(ex.maps[i, :, :n]) for key, (ex, _) in per_col.items()},
                truncation=cut.get(i))


def _label(cfg, c: int) -> str:
    name = cfg.labels[int(c)]
    return html.escape(name) if name == str(int(c)) else f"{html.escape(name)} <span class='note'>({int(c)})</span>"


def word_colour(v: float, scale: float) -> str:
    """The CSS style of a word of value v on a scale of max |value| `scale`: a red (positive) or blue
    (negative) background at opacity |v| / scale, transparent at 0 or on an all-zero scale; white letters
    on the darker backgrounds, where dark ones would be hard to read."""
    if not np.isfinite(v) or scale <= 0 or v == 0:
        return "background:transparent"
    r, g, b = POSITIVE_RGB if v > 0 else NEGATIVE_RGB
    alpha = min(1.0, abs(v) / scale)
    return f"background:rgba({r},{g},{b},{alpha:.3f})" + (";color:#fff" if alpha > 0.6 else "")


def _scale_of(values: np.ndarray) -> float:
    finite = np.abs(values[np.isfinite(values)])
    return float(finite.max()) if finite.size else 0.0


def coloured_text(r: TextResult, values: np.ndarray | None, scale: float = 0.0) -> str:
    """The text, HTML-escaped, each explained word in a span coloured by its value (values None: the
    plain text); characters the model did not see (a truncated text's tail) struck through."""
    parts, pos = [], 0
    if values is None:
        pos = r.spans[-1][1] if r.spans else 0
        parts.append(html.escape(r.text[:pos]))
    else:
        for (s, e), v in zip(r.spans, values):
            parts.append(html.escape(r.text[pos:s]))
            v = float(v)
            parts.append(f"<span class='w' data-v='{v!r}' style='{word_colour(v, scale)}' "
                         f"title='{v:.4g}'>{html.escape(r.text[s:e])}</span>")
            pos = e
    tail = r.text[pos:]
    if r.truncation and tail.strip():
        lead = len(tail) - len(tail.lstrip())
        parts.append(html.escape(tail[:lead]) + f"<span class='unseen' title='not seen by the model'>"
                     f"{html.escape(tail[lead:])}</span>")
    else:
        parts.append(html.escape(tail))
    return "".join(parts)


def _legend(o: TextReportOptions, negative: bool) -> str:
    red = "rgb({},{},{})".format(*POSITIVE_RGB)
    blue = "rgb({},{},{})".format(*NEGATIVE_RGB)
    scale = ("one scale per method and layer, over all its class rows (rows compare)" if o.shared_scale else
             "each row its own scale: its largest |value| is full colour (rows do not compare; --shared-scale "
             "gives one scale per method and layer)")
    sign = (f"blue marks negative values (<span class='scale' style='background:linear-gradient(90deg,{blue},"
            "#fff)'></span>)" if negative else "no value on this page is negative, so there is no blue")
    return (f"<p>One row per class: red = how much of the row's class's map falls on the word, from none (white) "
            f"to the scale's largest<span class='scale' style='background:linear-gradient(90deg,#fff,{red})'>"
            f"</span>; {sign}. Scale: {scale}. A word's value is its pieces' {html.escape(o.reduce)} "
            "(hover a word for its value). PredicAtt<sub>L</sub>: the [CLS] attention of all heads, weighted by their "
            "similarity to the last layer's prediction map Ψ (the classifier head on every token), times Ψ.</p>")


def _meta(cfg, o: TextReportOptions) -> str:
    name = o.model_name or cfg.architecture
    return (f"<div class='meta'>{html.escape(name)} · {html.escape(cfg.architecture)}, {cfg.num_layers} layers × "
            f"{cfg.num_heads} heads, {cfg.num_classes} classes, up to {cfg.max_tokens} tokens</div>")


def text_page(r: TextResult, cfg, o: TextReportOptions, nav: str) -> str:
    """The HTML of one text's page."""
    from predmaps.text import TEXT_METHODS

    depth = cfg.num_layers
    pred = int(np.argmax(r.probs))
    parts = []
    if r.truncation:
        parts.append(f"<section class='warn'><h2>Truncated</h2><p>{html.escape(r.truncation[0].upper())}"
                     f"{html.escape(r.truncation[1:])}. The struck-through words were not seen by the model and "
                     "are not explained.</p></section>")
    order = np.argsort(-r.probs)[:10]
    rows = "".join(f"<tr><td>{_label(cfg, c)}</td><td class='p'>{_pct(r.probs[c])}</td><td><span class='bar' "
                   f"style='width:{max(1, round(160 * float(r.probs[c])))}px'></span></td></tr>" for c in order)
    more = f"<p class='note'>{cfg.num_classes - len(order)} more classes not listed.</p>" if len(order) < cfg.num_classes \
        else ""
    parts.append(f"<section><h2>Prediction: {_label(cfg, pred)}, p = {_pct(r.probs[pred])}</h2>"
                 f"<p class='txt'>{coloured_text(r, None)}</p>"
                 f"<table class='preds'><tr><th>class</th><th>p</th><th></th></tr>{rows}</table>{more}</section>")
    negative = any((m < 0).any() for m in r.word_maps.values())
    parts.append(f"<section><h2>Reading the colours</h2>{_legend(o, negative)}</section>")
    for key, maps in r.word_maps.items():
        shared = _scale_of(maps)
        body = []
        for j, c in enumerate(r.classes):
            scale = shared if o.shared_scale else _scale_of(maps[j])
            body.append(f"<tr data-class='{int(c)}'><td class='cls'>{_label(cfg, c)}<br><span class='note'>p = "
                        f"{_pct(r.probs[c])}</span></td><td class='txt'>{coloured_text(r, maps[j], scale)}</td></tr>")
        method = key[0]
        agnostic = "" if TEXT_METHODS[method].class_specific else " (the same map for every class)"
        parts.append(f"<section data-method='{html.escape(method)}' data-layer='{'' if key[1] is None else key[1]}'>"
                     f"<h2>{method_title(*key, depth)}{agnostic}</h2><table class='tmaps'>{''.join(body)}"
                     "</table></section>")
    parts.append("<section><h2>Word pieces</h2><p class='note'>The tokens the model saw ([CLS]/[SEP] or &lt;s&gt;/"
                 "&lt;/s&gt; are never explained); the word-level maps above take the "
                 f"{html.escape(o.reduce)} of each word's pieces, found by their character offsets.</p><p>"
                 + " ".join(f"<code>{html.escape(t)}</code>" for t in r.tokens) + "</p></section>")
    header = (f"<h1>{html.escape(o.title)} · text {r.index + 1}</h1>{_meta(cfg, o)}{nav}")
    return _page(f"text {r.index + 1} · {o.title}", header, "\n".join(parts), TEXT_CSS)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text[:40]).strip("_")[:32] or "text"


def page_name(r: TextResult) -> str:
    return f"{r.index:04d}_{_slug(r.text)}.html"


def _index_row(r: TextResult, cfg, href: str) -> str:
    pred = int(np.argmax(r.probs))
    key = next(iter(r.word_maps))
    j = int(np.flatnonzero(r.classes == pred)[0]) if (r.classes == pred).any() else 0
    values = r.word_maps[key][j]
    cut = " <span class='bad'>(truncated)</span>" if r.truncation else ""
    return (f"<tr><td><a href='{html.escape(href)}'>{r.index + 1}</a></td><td>{_label(cfg, pred)} "
            f"{_pct(r.probs[pred])}</td><td>{_label(cfg, r.classes[j])}</td>"
            f"<td class='txt'>{coloured_text(r, values, _scale_of(values))}{cut}</td></tr>")


def _index_table(rows: list[str]) -> str:
    return ("<table class='index'><tr><th>#</th><th>prediction</th><th>map of</th><th>text</th></tr>"
            + "".join(rows) + "</table>")


def write_text_report(results: Iterable[TextResult], out_dir, cfg, options: TextReportOptions | None = None, *,
                      on_result: Callable[[TextResult], None] | None = None) -> Report:
    """Write one page per result and index.html (+ index_N.html past `per_index_page` texts) into out_dir
    (pages as results arrive: a page holds links to its neighbours, so each is written once the next is known).
    Returns the paths and one line per text."""
    o = options or TextReportOptions()
    t0 = time.perf_counter()
    index = IndexPages(out_dir, o.per_index_page, o.title, _meta(cfg, o), _index_table, TEXT_CSS)
    out = index.out
    pages, lines = [], []
    pending: list = []  # [result, name, previous name]

    def flush(next_name):
        if pending:
            r, name, prev = pending.pop()
            nav = _nav([("↑ index", index.page_of(len(pages))), ("← previous", prev), ("next →", next_name)])
            safe_write.write_text(out / name, text_page(r, cfg, o, nav))
            pages.append(out / name)
            index.add(_index_row(r, cfg, name))  # once its page exists: the index never links to a page not written

    def write_index(stopped=None):
        table, pager, next_page = index.finish()
        notes = "".join(f"<p class='note'>{html.escape(n)}</p>" for n in o.notes)
        if stopped:
            notes = (f"<p class='bad'>Incomplete: this run {html.escape(stopped)} after {len(pages)} text(s); the "
                     f"report holds only those.</p>{notes}")
        body = (f"<section><h2>Texts ({len(pages)})</h2>{notes}{pager}<p class='note'>Each row shows the text coloured "
                f"by PredicAtt<sub>L</sub> of the predicted class (red: more of the map; each row its own scale) and "
                f"links to the text's page: every class's map, per method and layer.</p>{table}{pager}</section>")
        header = f"<h1>{html.escape(o.title)}</h1>{_meta(cfg, o)}{next_page}"
        safe_write.write_text(out / "index.html", _page(o.title, header, body, TEXT_CSS))
        return out / "index.html"

    try:
        for r in results:
            name = page_name(r)
            prev = pending[0][1] if pending else None
            flush(name)
            pending.append([r, name, prev])
            pred = int(np.argmax(r.probs))
            lines.append(f"text {r.index + 1}: {cfg.labels[pred]} {r.probs[pred]:.3f}"
                         + (" (truncated)" if r.truncation else ""))
            if on_result is not None:
                on_result(r)
        flush(None)
    except BaseException as e:  # Ctrl-C included: the pages already written stay reachable from an index
        why = "was interrupted" if isinstance(e, KeyboardInterrupt) else \
            f"stopped on an error ({type(e).__name__}: {e})"
        try:
            flush(None)
            write_index(why)
        except Exception:  # noqa: BLE001 - e.g. the disk that failed the run; the first error is the one to report
            pass
        raise
    return Report(index=write_index(), pages=pages, index_pages=[out / "index.html"] + index.paths, lines=lines,
                  seconds=time.perf_counter() - t0)


def _column_name(key, depth: int) -> str:
    method, layer = key
    return method if layer is None else f"{method}_L" if layer == depth else f"{method}_{layer}"


def text_result_json(r: TextResult, cfg) -> dict:
    """One text's entry of the --json file: tokens, offsets, words, spans, probabilities and every map."""
    return {
        "index": r.index, "text": r.text, "truncated": r.truncation is not None, "truncation": r.truncation,
        "tokens": list(r.tokens), "offsets": [list(o) for o in r.offsets], "words": list(r.words),
        "spans": [list(s) for s in r.spans], "probs": [float(p) for p in r.probs],
        "predicted": int(np.argmax(r.probs)), "classes": [int(c) for c in r.classes],
        "maps": [{"name": _column_name(key, cfg.num_layers), "method": key[0], "layer": key[1],
                  "words": r.word_maps[key].tolist(), "tokens": r.token_maps[key].tolist()} for key in r.word_maps],
    }


def text_results_json(entries: list[dict], cfg, o: TextReportOptions) -> dict:
    return {"model": o.model_name, "architecture": cfg.architecture, "labels": list(cfg.labels),
            "num_layers": cfg.num_layers, "word_reduce": o.reduce,
            "layer_note": "layer: the prediction layer index 0..num_layers (num_layers = L, the last); null for "
                          "methods without one",
            "method_titles": {k: METHOD_TITLES[k] for k in sorted({m["method"] for e in entries for m in e["maps"]})
                              if k in METHOD_TITLES},
            "texts": entries}
