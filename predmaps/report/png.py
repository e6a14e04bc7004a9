"""Stand-alone PNG overlays of an `ImageResult` (`write_pngs`), written without the HTML report,
and the unique file stems of one run (`PngNames`)."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Sequence

from jaxvit import safe_write
from predmaps.report.compute import ImageResult, display_name

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
    lo, hi = viz.finite_range([r.maps[key] for key in keys]) if shared_scale else (None, None)
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
