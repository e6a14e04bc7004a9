"""Resampling of absolute position embeddings, equal to timm's `resample_abs_pos_embed`.

timm resizes the patch rows of a position embedding with
`F.interpolate(..., mode="bicubic", antialias=True, align_corners=False)` and leaves the
prefix rows (class, register, distillation tokens) untouched. torch's antialiased bicubic is
Pillow's separable filter: Keys cubic with a = -0.5, support widened by the scale when
shrinking, weights normalised over the taps that fall inside the input. The checkpoint filters
of FlexiViT and RADIO use plain bilinear instead (no antialias; RADIO v3 base/huge with
`align_corners=True`). The grids are static shapes, so we build the two 1-D weight matrices in
numpy and apply them as one einsum: exact, jittable, and free when the grid does not change.
"""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import numpy as np


def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _triangle(x: np.ndarray) -> np.ndarray:
    return np.maximum(0.0, 1.0 - np.abs(x))


_FILTERS = {"bicubic": (_cubic, 2.0), "bilinear": (_triangle, 1.0)}


@functools.lru_cache(maxsize=64)
def resample_matrix(in_size: int, out_size: int, interpolation: str = "bicubic", antialias: bool = True,
                    align_corners: bool = False) -> np.ndarray:
    """(out_size, in_size) float64 weights of torch's 1-D resampling (`F.interpolate`): antialiased
    bicubic or bilinear, plain bilinear (`antialias=False`, either `align_corners`), or plain bicubic
    (`antialias=False`: transformers' ViT and DINOv2 `interpolate_pos_encoding`)."""
    if interpolation not in _FILTERS:
        raise ValueError(f"unsupported position-embedding interpolation {interpolation!r}; "
                         f"choose one of {sorted(_FILTERS)}")
    if align_corners and (antialias or interpolation != "bilinear"):
        raise ValueError("align_corners is for plain bilinear (antialias=False)")
    if not antialias and interpolation == "bicubic":
        return _plain_bicubic_matrix(in_size, out_size)
    if align_corners:  # source position i * (in - 1) / (out - 1): the corner pixels' centres coincide
        w = np.zeros((out_size, in_size))
        src = np.arange(out_size) * ((in_size - 1) / (out_size - 1) if out_size > 1 else 0.0)
        lo = np.minimum(np.floor(src).astype(int), in_size - 1)
        hi = np.minimum(lo + 1, in_size - 1)
        frac = src - lo
        np.add.at(w, (np.arange(out_size), lo), 1.0 - frac)
        np.add.at(w, (np.arange(out_size), hi), frac)
        return w
    kernel, support = _FILTERS[interpolation]
    scale = in_size / out_size
    # Antialiasing widens the kernel when shrinking. Without it the same taps and normalisation are
    # torch's plain bilinear: its edge clamping is the renormalisation over the taps inside.
    filter_scale = max(scale, 1.0) if antialias else 1.0
    support = support * filter_scale
    w = np.zeros((out_size, in_size))
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        taps = np.arange(lo, hi)
        weights = kernel((taps - center + 0.5) / filter_scale)
        total = weights.sum()
        if total != 0:
            weights = weights / total
        w[i, lo:hi] = weights
    return w


def _plain_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """torch's bicubic `F.interpolate` without antialias (align_corners=False): Keys cubic with a = -0.75
    on the four taps around (i + 0.5) * in / out - 0.5, taps beyond the edge clamped to it."""
    w = np.zeros((out_size, in_size))
    scale = in_size / out_size
    for i in range(out_size):
        src = scale * (i + 0.5) - 0.5
        base = math.floor(src)
        t = src - base
        for offset in (-1, 0, 1, 2):
            w[i, min(max(base + offset, 0), in_size - 1)] += _cubic(np.asarray(t - offset), a=-0.75)
    return w


def resample_abs_pos_embed(posemb, new_grid: tuple[int, int], old_grid: tuple[int, int],
                           num_prefix_tokens: int, interpolation: str = "bicubic", antialias: bool = True,
                           align_corners: bool = False):
    """Resample (1, P + gh*gw, D) position embeddings to a new (gh', gw') grid.

    The first `num_prefix_tokens` rows are kept as they are. Computed in float32 like timm.
    interpolation, antialias, align_corners: as timm's (see `resample_matrix`).
    """
    new_grid, old_grid = tuple(new_grid), tuple(old_grid)
    if new_grid == old_grid:
        return posemb
    if posemb.shape[1] != num_prefix_tokens + old_grid[0] * old_grid[1]:
        raise ValueError(f"position embedding of length {posemb.shape[1]} does not hold {num_prefix_tokens} prefix "
                         f"rows and a {old_grid[0]}x{old_grid[1]} grid")
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    dtype = grid.dtype
    grid = grid.astype(jnp.float32).reshape(old_grid[0], old_grid[1], -1)
    mode = (interpolation, antialias, align_corners)
    wh = jnp.asarray(resample_matrix(old_grid[0], new_grid[0], *mode), jnp.float32)
    ww = jnp.asarray(resample_matrix(old_grid[1], new_grid[1], *mode), jnp.float32)
    # Separable like torch (rows, then columns); HIGHEST keeps TF32 out of it on GPU.
    grid = jnp.einsum("hH,Hwd->hwd", wh, jnp.einsum("wW,HWd->Hwd", ww, grid,
                                                   precision="highest"), precision="highest")
    grid = grid.reshape(1, new_grid[0] * new_grid[1], -1).astype(dtype)
    return jnp.concatenate([prefix, grid], axis=1)


def grid_from_length(num_tokens: int) -> tuple[int, int]:
    side = int(math.isqrt(num_tokens))
    if side * side != num_tokens:
        raise ValueError(f"{num_tokens} position rows are not a square grid; give the grid size explicitly")
    return side, side


def sincos2d(grid: tuple[int, int], dim: int, temperature: float = 10000.0) -> np.ndarray:
    """(1, gh * gw, dim) float32: big_vision's fixed 2-D sine-cosine position embedding (`posemb="sincos2d"`)
    for a patch grid, row-major. Channels in four quarters: sin and cos of the column index, then of the row
    index, times frequencies temperature^(-k / (dim/4 - 1)), k = 0 .. dim/4 - 1. (MAE's variant, in
    `predmaps.train_digits`, divides by dim/4 and puts the rows first: another embedding.)"""
    if dim % 4 or dim < 8:
        raise ValueError(f"sincos2d splits the width in four quarters of at least 2 channels; got width {dim}")
    quarter = dim // 4
    omega = temperature ** -(np.arange(quarter, dtype=np.float64) / (quarter - 1))
    rows, cols = np.meshgrid(np.arange(grid[0], dtype=np.float64), np.arange(grid[1], dtype=np.float64),
                             indexing="ij")
    x, y = cols.reshape(-1, 1) * omega, rows.reshape(-1, 1) * omega
    return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)[None].astype(np.float32)
