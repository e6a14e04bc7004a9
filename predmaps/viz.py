"""Heat-map overlays and image grids (PIL + matplotlib colour maps)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def _colormap(name: str):
    import matplotlib

    try:
        return matplotlib.colormaps[name]
    except KeyError:
        raise ValueError(f"unknown colour map {name!r}; any matplotlib name works, e.g. 'jet', 'inferno'") from None


def overlay(image, token_map, *, cmap: str = "jet", alpha: float = 0.5, vmin: float | None = None,
            vmax: float | None = None) -> Image.Image:
    """Blend a heat map over an image; returns an RGB PIL image of the image's size.

    image: PIL image or (H, W, 3) uint8. token_map: (gh, gw) or (H, W), upsampled bilinearly
    (half-pixel centres) to the image. Scaled to [vmin, vmax] (default: the map's own min and max;
    pass shared values to compare maps on one scale); a constant map shows as the colour of 0.
    """
    from predmaps.explain import upsample

    img = image.convert("RGB") if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
    w, h = img.size
    m = np.asarray(upsample(np.asarray(token_map, np.float32), (h, w)))
    lo = float(m.min()) if vmin is None else vmin
    hi = float(m.max()) if vmax is None else vmax
    scaled = np.clip((m - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(m)
    heat = (_colormap(cmap)(scaled)[..., :3] * 255).astype(np.float32)
    out = (1 - alpha) * np.asarray(img, np.float32) + alpha * heat
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8))


def grid(images: list[Image.Image], titles: list[str] | None = None, columns: int | None = None,
         cell: int | None = None, pad: int = 4, title_height: int = 14) -> Image.Image:
    """Tile images (resized to `cell` x `cell` when given) with optional titles above each."""
    if not images:
        raise ValueError("grid needs at least one image")
    columns = columns or len(images)
    size = (cell, cell) if cell else images[0].size
    th = title_height if titles else 0
    rows = -(-len(images) // columns)
    canvas = Image.new("RGB", (columns * (size[0] + pad) + pad, rows * (size[1] + th + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i, im in enumerate(images):
        r, c = divmod(i, columns)
        x, y = pad + c * (size[0] + pad), pad + r * (size[1] + th + pad)
        if titles:
            draw.text((x, y), titles[i][: max(4, size[0] // 6)], fill="black")
        canvas.paste(im.resize(size, Image.NEAREST) if im.size != size else im, (x, y + th))
    return canvas
