"""Heat-map overlays, image grids and report plots (PIL + matplotlib, no pyplot state).

    from predmaps import viz
    img = viz.overlay(image, ex.maps[0, 0], cmap="inferno", alpha=0.6)     # PIL image, the input's size
    img = viz.show("cat.jpg", ex.maps[0, 0], model.config)   # on the part of the photo the model saw
    viz.grid([img, ...], titles=[...], columns=4).save("grid.png")
    viz.to_data_uri(img)                                                  # "data:image/png;base64,..."
"""

from __future__ import annotations

import base64
import io
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw


def _colormap(name: str):
    import matplotlib

    try:
        return matplotlib.colormaps[name]
    except KeyError:
        raise ValueError(f"unknown colour map {name!r}; any matplotlib name works, e.g. 'jet', 'inferno'") from None


def check_cmap(name: str) -> str:
    """The name, if matplotlib knows the colour map; ValueError otherwise."""
    _colormap(name)
    return name


def _as_rgb_image(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = np.asarray(image)
    if arr.dtype != np.uint8:  # float in [0, 1]
        arr = (np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    return Image.fromarray(arr).convert("RGB")


def covered_size(size: tuple[int, int], extent=1.0) -> tuple[int, int]:
    """The (h, w) pixels of an output `size` that a token grid covering `extent` of it spans.

    extent: a fraction, or (of height, of width), in (0, 1] (`ViTConfig.grid_extent`)."""
    eh, ew = (extent, extent) if np.ndim(extent) == 0 else tuple(extent)
    if not (0 < float(eh) <= 1 and 0 < float(ew) <= 1):
        raise ValueError(f"extent (the fraction of the image the token grid covers) must be in (0, 1]; got {extent}")
    return max(1, round(size[0] * float(eh))), max(1, round(size[1] * float(ew)))


def _resize_map(token_map: np.ndarray, hw: tuple[int, int], extent=1.0) -> np.ndarray:
    """(gh, gw) -> (H, W) bilinear with half-pixel centres (torch align_corners=False), numpy only;
    resized over the `extent` it covers from the top-left, the rest the nearest edge value."""
    m = np.asarray(token_map, np.float32)
    if m.shape == tuple(hw):  # already per pixel
        return m
    ch, cw = covered_size(hw, extent)
    if (ch, cw) != tuple(hw):
        return np.pad(_resize_map(m, (ch, cw)), ((0, hw[0] - ch), (0, hw[1] - cw)), mode="edge")

    def weights(n_in, n_out):
        x = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        i0 = np.floor(x).astype(int)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, (x - i0).astype(np.float32)

    r0, r1, fr = weights(m.shape[0], hw[0])
    c0, c1, fc = weights(m.shape[1], hw[1])
    rows = m[r0] * (1 - fr)[:, None] + m[r1] * fr[:, None]
    return rows[:, c0] * (1 - fc) + rows[:, c1] * fc


NAN_RGB = (128, 128, 128)  # NaN values: mid grey, not a colour of the scale


def finite_range(maps) -> tuple[float | None, float | None]:
    """(min, max) over the finite values of all maps; (None, None) when there are none (each map
    then falls back to its own scale). NaN and inf never enter a shared scale, whatever the order."""
    lo, hi = np.inf, -np.inf
    for m in maps:
        a = np.asarray(m, np.float32)
        a = a[np.isfinite(a)]
        if a.size:
            lo, hi = min(lo, float(a.min())), max(hi, float(a.max()))
    return (lo, hi) if lo <= hi else (None, None)


def _is_constant(lo: float, hi: float) -> bool:
    # A range within float rounding of one value is noise: stretched over the colour map, a constant
    # map one ulp off (0.3 and nextafter(0.3)) showed as the map's full low-to-high contrast.
    return not hi - lo > 1e-6 * max(abs(lo), abs(hi))


def colorize(token_map, size: tuple[int, int] | None = None, *, cmap: str = "jet", vmin: float | None = None,
             vmax: float | None = None, extent=1.0) -> np.ndarray:
    """A map (gh, gw) -> (H, W, 3) uint8 colours, bilinearly upsampled to size (H, W) when given
    (over `extent` of it, as `overlay`), scaled to [vmin, vmax] (default: the min and max of its
    finite values; +-inf take the ends of the scale). A map constant to within float rounding
    shows as the colour of 0; NaN shows as mid grey (`NAN_RGB`)."""
    m = np.asarray(token_map, np.float32)
    if size is not None:
        m = _resize_map(m, size, extent)
    own_lo, own_hi = finite_range([m]) if vmin is None or vmax is None else (None, None)
    lo = float(vmin) if vmin is not None else 0.0 if own_lo is None else own_lo
    hi = float(vmax) if vmax is not None else lo if own_hi is None else own_hi
    with np.errstate(invalid="ignore", over="ignore"):  # NaN and inf go through as NaN, 0 or 1
        scaled = (m > hi).astype(np.float32) if _is_constant(lo, hi) else np.clip((m - lo) / (hi - lo), 0, 1)
    rgb = (_colormap(cmap)(np.nan_to_num(scaled))[..., :3] * 255 + 0.5).astype(np.uint8)
    rgb[np.isnan(m)] = NAN_RGB
    return rgb


def overlay(image, token_map, *, cmap: str = "jet", alpha: float = 0.5, vmin: float | None = None,
            vmax: float | None = None, extent=1.0) -> Image.Image:
    """Blend a heat map over an image; returns an RGB PIL image of the image's size.

    image: PIL image, (H, W, 3) uint8, or float in [0, 1]. token_map: (gh, gw) or (H, W),
    upsampled bilinearly (half-pixel centres, as `predmaps.upsample`) to the image. Scaled to
    [vmin, vmax] (default: the map's own finite min and max; pass shared values, e.g. from
    `finite_range`, to compare maps on one scale); colours as `colorize`. alpha: the heat map's opacity, 0..1.
    extent: the fraction of the image the token grid covers from the top-left (default all;
    `model.config.grid_extent()` for an input size that is no patch multiple, e.g. so400m's 384).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha (the heat map's opacity) must be in [0, 1]; got {alpha}")
    img = _as_rgb_image(image)
    w, h = img.size
    heat = colorize(token_map, (h, w), cmap=cmap, vmin=vmin, vmax=vmax, extent=extent).astype(np.float32)
    out = (1 - alpha) * np.asarray(img, np.float32) + alpha * heat
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8))


def show(image, token_map, config, *, cmap: str = "jet", alpha: float = 0.5, vmin: float | None = None,
         vmax: float | None = None) -> Image.Image:
    """A map over the photo it explains: the part of `image` that the config's eval transform (resize,
    centre crop: `jaxvit.preprocess.eval_transform_for`) made the model input, at the photo's own
    resolution, with the map blended over it as `overlay` does. `overlay` on the whole photo would
    stretch the map over pixels the model never saw.

    image: a path or anything `jaxvit.preprocess.load_image` takes (as given to the model, before the
    transform). token_map: (gh, gw), e.g. `ex.maps[i, k]` or `read_results(...).map()[i, k]`.
    config: the model's `ViTConfig` (`model.config`). Where the transform pads (crop_mode 'border',
    a small image), the padding shows black."""
    from jaxvit import preprocess

    img = preprocess.load_image(image) if not isinstance(image, (Image.Image, np.ndarray)) else _as_rgb_image(image)
    settings = preprocess.eval_settings(config)
    box = preprocess.eval_crop_box((img.height, img.width), img_size=settings["img_size"],
                                   crop_pct=settings["crop_pct"], crop_mode=settings["crop_mode"])
    seen = img.crop(tuple(round(v) for v in box))
    return overlay(seen, token_map, cmap=cmap, alpha=alpha, vmin=vmin, vmax=vmax, extent=config.grid_extent())


def fit(image, size: int, resample=Image.BICUBIC) -> Image.Image:
    """The image resized so that its longer side is `size` pixels (aspect ratio kept)."""
    img = _as_rgb_image(image)
    w, h = img.size
    scale = size / max(w, h)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    return img if new == img.size else img.resize(new, resample)


def grid(images: list[Image.Image], titles: list[str] | None = None, columns: int | None = None,
         cell: int | None = None, pad: int = 4, title_height: int = 14) -> Image.Image:
    """Tile images (resized to `cell` x `cell` when given) with optional titles above each."""
    if not images:
        raise ValueError("grid needs at least one image")
    if titles is not None and len(titles) != len(images):
        raise ValueError(f"{len(titles)} titles for {len(images)} images")
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


def overlay_grid(image, maps: Sequence, titles: Sequence[str] | None = None, *, columns: int | None = None,
                 cell: int | None = None, cmap: str = "jet", alpha: float = 0.5,
                 shared_scale: bool = False, extent=1.0) -> Image.Image:
    """Overlays of several maps on one image, tiled: maps (n, gh, gw). shared_scale: one colour scale
    (the min and max over all maps) instead of each map's own. extent: as `overlay`."""
    maps = [np.asarray(m, np.float32) for m in maps]
    lo, hi = finite_range(maps) if shared_scale else (None, None)
    tiles = [overlay(image, m, cmap=cmap, alpha=alpha, vmin=lo, vmax=hi, extent=extent) for m in maps]
    return grid(tiles, list(titles) if titles is not None else None, columns=columns, cell=cell)


def to_png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=9)
    return buf.getvalue()


def to_data_uri(image: Image.Image) -> str:
    """A PNG data URI, to embed the image in a self-contained HTML page."""
    return "data:image/png;base64," + base64.b64encode(to_png_bytes(image)).decode("ascii")


def cmap_css_gradient(cmap: str, steps: int = 9) -> str:
    """A CSS linear-gradient (left = low, right = high) of the colour map, for legends."""
    cm = _colormap(cmap)
    stops = []
    for t in np.linspace(0, 1, steps):
        r, g, b = (np.asarray(cm(float(t))[:3]) * 255 + 0.5).astype(int)
        stops.append(f"rgb({r},{g},{b}) {100 * t:.0f}%")
    return "linear-gradient(to right, " + ", ".join(stops) + ")"


# ---- plots (matplotlib's object API: no pyplot, no global state, headless) ----

def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=90, layout="constrained")


def figure_to_image(fig) -> Image.Image:
    """Render a matplotlib Figure to an RGB PIL image."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi, facecolor="white")
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def layer_curves(curves: dict[str, dict[str, Sequence[float]]], *, title: str = "") -> Image.Image:
    """Per-layer line plots (paper Fig. 19-21): one panel per metric, one line per token kind.

    curves: {metric: {line label: values over layers 0..L}}, e.g.
      {"accuracy": {"class token": [...], "patch tokens": [...]}, "confidence": {...}, "entropy": {...}}.
    """
    fig = _figure(3.1 * len(curves), 2.5)
    axes = fig.subplots(1, len(curves), squeeze=False)[0]
    styles = ["-o", "-s", "--^", ":v"]
    for ax, (metric, lines) in zip(axes, curves.items()):
        for j, (label, values) in enumerate(lines.items()):
            v = np.asarray(values, np.float64)
            if np.all(np.isnan(v)):
                continue
            ax.plot(np.arange(len(v)), v, styles[j % len(styles)], ms=3, lw=1.4, label=label)
        ax.set_title(metric, fontsize=10)
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.set_xlabel("layer", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        n = max(len(np.asarray(v)) for v in lines.values())
        ax.set_xticks(np.arange(0, n, max(1, n // 8)))
        if metric.startswith("accuracy"):
            ax.set_ylim(-0.03, 1.03)
    axes[0].legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title, fontsize=10)
    return figure_to_image(fig)


def head_weight_map(alpha, *, title: str = "", mark: Sequence[tuple[int, int]] = ()) -> Image.Image:
    """alpha~ (L, H) as a blocks x heads heat map with a colour bar (paper Fig. 4); `mark` outlines
    the given (block, head) cells (0-based)."""
    from matplotlib.patches import Rectangle

    a = np.asarray(alpha, np.float64)
    depth, heads = a.shape
    fig = _figure(max(2.6, 0.32 * heads + 1.5), max(2.0, 0.22 * depth + 0.9))
    ax = fig.subplots()
    im = ax.imshow(a, cmap="viridis", aspect="auto", interpolation="nearest")
    for b, h in mark:
        ax.add_patch(Rectangle((h - 0.5, b - 0.5), 1, 1, fill=False, ec="red", lw=1.5))
    ax.set_xlabel("head", fontsize=8)
    ax.set_ylabel("block", fontsize=8)
    ax.set_xticks(np.arange(0, heads, max(1, heads // 6)))
    ax.set_yticks(np.arange(0, depth, max(1, depth // 6)))
    ax.tick_params(labelsize=7)
    fig.colorbar(im, ax=ax, shrink=0.9).ax.tick_params(labelsize=7)
    if title:
        ax.set_title(title, fontsize=8)
    return figure_to_image(fig)


def histogram(counts: Sequence[int], *, xlabel: str, title: str = "") -> Image.Image:
    """A bar chart of counts over 0..n-1."""
    c = np.asarray(counts)
    fig = _figure(3.0, 2.5)
    ax = fig.subplots()
    from matplotlib.ticker import MaxNLocator

    ax.bar(np.arange(len(c)), c, color="#4c72b0")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel("images", fontsize=9)
    ax.set_xticks(np.arange(0, len(c), max(1, len(c) // 8)))
    ax.tick_params(labelsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return figure_to_image(fig)
