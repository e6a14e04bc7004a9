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

Modules, each importing only those before it: `compute` (Batch, ReportOptions, `analyse` ->
ImageResult), `png` (overlays from an ImageResult, no HTML), `html` (pages, `write_report`, `verify`).
`text` (text classifiers: one page per text, its words coloured per class; `write_text_report`) builds on
`html`'s page helpers.
"""

from predmaps.report.compute import (AGNOSTIC, Batch, ImageResult, ReportOptions, analyse, check_model, display_name,
                                     input_caption, plan_columns)
from predmaps.report.html import METHOD_TITLES, Report, ReportWriter, image_page, method_title, verify, write_report
from predmaps.report.png import MAX_GRID_TILES, MAX_STEM_BYTES, PngNames, save_png, write_pngs

__all__ = ["AGNOSTIC", "MAX_GRID_TILES", "MAX_STEM_BYTES", "METHOD_TITLES", "Batch", "ImageResult", "PngNames",
           "Report", "ReportOptions", "ReportWriter", "analyse", "check_model", "display_name", "image_page",
           "input_caption", "method_title", "plan_columns", "save_png", "verify", "write_pngs", "write_report"]
