"""Image loading and preprocessing for jaxvit, with numpy + PIL only (no torch, no timm).

The transforms reproduce timm's evaluation pipeline
(`timm.data.create_transform(..., is_training=False)`, i.e.
`timm.data.transforms_factory.transforms_imagenet_eval`) on PIL images bit for bit:
same output sizes, same rounding, same PIL resampling filter, same float32 arithmetic
for ToTensor (`/ 255`) and Normalize (`(x - mean) / std`). The only difference is the
layout: every array returned here is channel-last, (H, W, 3) or (B, H, W, 3), ready for
an NHWC model; transpose timm's CHW output with `.permute(1, 2, 0)` to compare.

Pipeline summary (timm, crop_mode='center'):

1. ``scale_size = floor(img_size / crop_pct)`` per side.
2. Square ``scale_size``: torchvision ``Resize(int)`` -- the shorter image side becomes
   ``scale_size`` and the longer one ``int(scale_size * long / short)`` (truncated).
   Non-square ``scale_size``: timm ``ResizeKeepRatio`` -- both sides are divided by
   ``min(h / scale_h, w / scale_w)`` and rounded with Python's ``round`` (half to even),
   so the image just covers ``scale_size``.
3. torchvision ``CenterCrop(img_size)``: zero padding (left/top get the floor half) when
   the image is smaller, then crop at ``round((size - crop) / 2)``.
4. ToTensor (uint8 / 255 in float32) and Normalize.

'squash' resizes straight to ``scale_size`` (aspect ratio not kept) then centre crops;
'border' resizes so the *longest* side fits ``scale_size`` (``ResizeKeepRatio(longest=1)``)
and centre crops/pads with the mean colour ``round(255 * mean)``.

'hf_squash' and 'hf_shortest' are Hugging Face transformers' slow (PIL) image processors
(ViTImageProcessor, DeiTImageProcessor, CLIPImageProcessor, BitImageProcessor): resize to
``round(img_size / crop_pct)`` per side ('hf_squash', their ``size={height, width}``) or its
shorter side to that ('hf_shortest', ``size={shortest_edge}``), then their centre crop, whose
offset is ``(size - crop) // 2`` (torchvision rounds half to even) and whose padding puts an
odd pixel before; x / 255 (their float64 ``x * (1/255)`` rounds to the same float32) and Normalize.

One module past 600 lines on purpose: every resize, crop and rounding rule above sits beside the
safe decoding they share, so the bit-for-bit parity with timm and transformers reads in one place.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import stat
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "ImageLoadError",
    "INTERPOLATIONS",
    "CROP_MODES",
    "DEFAULT_CROP_PCT",
    "pil_interpolation",
    "load_image",
    "eval_transform",
    "eval_transform_for",
    "eval_resize_size",
    "eval_crop_box",
    "eval_settings",
    "resize_transform",
    "to_unit",
    "normalize",
    "load_batch",
]

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, io.IOBase, Image.Image, np.ndarray]

# timm's interpolation names -> the PIL filter torchvision uses for them on PIL images
# (torchvision.transforms.functional.pil_modes_mapping).
INTERPOLATIONS: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
CROP_MODES = ("center", "squash", "border", "hf_squash", "hf_shortest")
_HF_MODES = ("hf_squash", "hf_shortest")
DEFAULT_CROP_PCT = 0.875  # timm's DEFAULT_CROP_PCT, used when crop_pct is None or 0

# Modes converted with PIL's own convert("RGB"), exactly as timm/torchvision loaders do.
_PIL_CONVERT_MODES = {"RGB", "L", "LA", "La", "P", "PA", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "1"}
# Modes with more than 8 bits per sample: scaled to 8 bits here (PIL would clip to white).
_16BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}
_WIDE_MODES = {"I", "F", "I;16S", "I;16LS", "I;16BS", "I;32", "I;32L", "I;32B", "I;32S", "I;32LS", "I;32BS"}


class ImageLoadError(ValueError):
    """An input could not be read as an image. The message names the source and the reason."""


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def _describe(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return repr(os.fspath(source))
    name = getattr(source, "name", None)
    if isinstance(name, (str, os.PathLike)):
        return repr(os.fspath(name))
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    if isinstance(source, Image.Image):
        return f"<PIL image mode={source.mode} size={source.size}>"
    return f"<{type(source).__name__}>"


def _scale_wide_to_uint8(img: Image.Image) -> np.ndarray:
    """8-bit greyscale array of a 16/32-bit integer or float image."""
    arr = np.asarray(img)
    if img.mode in _16BIT_MODES:
        # Unsigned 16-bit: keep the top byte (value >> 8). This maps 0 -> 0, 65535 -> 255
        # and inverts the usual 8->16 expansion v * 257 exactly.
        return (arr.astype(np.uint16) >> 8).astype(np.uint8)
    x = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    peak = float(x.max()) if x.size else 0.0
    if peak > 255.0:
        x = x * (255.0 / peak)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode in _16BIT_MODES or mode in _WIDE_MODES:
        return Image.fromarray(_scale_wide_to_uint8(img), mode="L").convert("RGB")
    # RGB itself: convert("RGB") returns a copy, detached from any open file.
    return img.convert("RGB")


class PixelBudget:
    """At most `limit` decoded pixels held at once by the threads decoding inside `claim()`: a pool of
    workers decoding crafted 13000x13000 PNGs (0.5 MB each, 500 MB decoded) waits its turn instead of
    holding one each. An image over the whole budget runs alone. Images decode as usual outside a claim."""

    def __init__(self, limit: int):
        self.limit, self.used, self.peak = int(limit), 0, 0
        self._cv = threading.Condition()
        self._local = threading.local()

    @contextlib.contextmanager
    def claim(self):
        """Pixels decoded on this thread inside the block count against the budget until it ends."""
        outer = getattr(self._local, "held", None)
        self._local.held = [0]
        try:
            yield self
        finally:
            held, self._local.held = self._local.held[0], outer
            if held:
                with self._cv:
                    self.used -= held
                    self._cv.notify_all()

    def take(self, pixels: int) -> None:
        """Wait until `pixels` (at most the budget, less what this claim holds) are free and hold them."""
        held = getattr(self._local, "held", None)
        if held is None:
            return
        n = min(int(pixels), self.limit - held[0])  # never waits on itself
        if n <= 0:
            return
        with self._cv:
            self._cv.wait_for(lambda: self.used + n <= self.limit)
            self.used += n
            self.peak = max(self.peak, self.used)
        held[0] += n


# Shared by every decoding pool of the process (predmaps run, eval): ~64 MP, ~190 MB of RGB, about
# 300 ImageNet-sized images at once, so it only ever binds on huge images.
DECODE_BUDGET = PixelBudget(64_000_000)


def _open_and_decode(source: Any, desc: str) -> Image.Image:
    try:
        img = Image.open(source)
    except UnidentifiedImageError as e:
        raise ImageLoadError(f"cannot read image {desc}: not an image or unidentified format ({e})") from e
    except Image.DecompressionBombError as e:
        raise ImageLoadError(f"cannot read image {desc}: refused as a decompression bomb ({e})") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageLoadError(f"cannot read image {desc}: {e}") from e
    DECODE_BUDGET.take(img.size[0] * img.size[1])  # the header's size, before the pixels are decoded
    try:
        img.load()  # force a full decode: truncated or corrupt data fails here
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        img.close()
        raise ImageLoadError(f"cannot read image {desc}: truncated or corrupt image data ({e})") from e
    return img


def load_image(path_or_file: ImageSource) -> Image.Image:
    """Read an image and return it as a fully decoded PIL image in mode 'RGB'.

    `path_or_file` may be a path (str / Path), a binary file object, raw bytes, a PIL
    image, or a uint8 numpy array (H, W) or (H, W, 3). Any failure (missing file, empty
    file, unidentified format, truncated or corrupt data) raises `ImageLoadError` naming
    the source and the reason. The whole image is decoded here (`img.load()`), so a
    truncated JPEG fails now rather than inside a later transform (unless the caller set
    `PIL.ImageFile.LOAD_TRUNCATED_IMAGES`).

    Mode handling:

    * 'RGB', 'L', 'LA', 'P', 'PA', 'RGBA', 'CMYK', 'YCbCr', '1' (and the other 8-bit
      modes): PIL's plain ``convert("RGB")``, which is exactly what timm's and
      torchvision's loaders do, so results match them. Alpha is dropped, not composited;
      a palette image with transparency is converted directly, not through RGBA.
    * 16-bit unsigned ('I;16', 'I;16L', 'I;16B', 'I;16N'): each value becomes
      ``value >> 8`` (the high byte; truncation, not /257 rounding) and is replicated
      to three channels.
    * 32-bit integer 'I' and float 'F' (and the other wide modes): when the image's own
      maximum exceeds 255 the values are scaled by ``255 / max``; otherwise they are taken
      as 8-bit values. The result is rounded to nearest (PIL's ``convert`` truncates: a
      float image in 0..255 can differ from timm's input by one grey level) and clipped to
      [0, 255] (NaN and inf become 0). A float image in [0, 1] therefore comes out nearly
      black: scale it to [0, 255] yourself first.

    PIL's naive ``convert("RGB")`` of those wide modes clips every value above 255 to
    white; we refuse to do that. EXIF orientation is not applied (neither timm nor
    torchvision apply it).
    """
    desc = _describe(path_or_file)
    if isinstance(path_or_file, Image.Image):
        try:
            path_or_file.load()
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise ImageLoadError(f"cannot read image {desc}: truncated or corrupt image data ({e})") from e
        return _to_rgb(path_or_file)
    if isinstance(path_or_file, np.ndarray):
        arr = path_or_file
        if arr.dtype != np.uint8 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 3, 4))):
            raise ImageLoadError(
                f"cannot read image from array of shape {arr.shape} and dtype {arr.dtype}: "
                "expected uint8 (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)")
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        return Image.fromarray(np.ascontiguousarray(arr)).convert("RGB")
    if isinstance(path_or_file, (bytes, bytearray, memoryview)):
        if len(path_or_file) == 0:
            raise ImageLoadError(f"cannot read image {desc}: empty input (zero bytes)")
        path_or_file = io.BytesIO(bytes(path_or_file))

    if isinstance(path_or_file, (str, os.PathLike)):
        if not os.fspath(path_or_file):  # Path("") is the current directory
            raise ImageLoadError(f"cannot read image {desc}: the path is empty")
        path = Path(path_or_file)
        if not path.exists():
            raise ImageLoadError(f"cannot read image {desc}: file not found")
        if path.is_dir():
            raise ImageLoadError(f"cannot read image {desc}: is a directory, not a file")
        try:
            st = path.stat()
        except OSError as e:
            raise ImageLoadError(f"cannot read image {desc}: {e}") from e
        if not stat.S_ISREG(st.st_mode):  # opening a FIFO would wait for a writer: a batch job would hang
            raise ImageLoadError(f"cannot read image {desc}: not a regular file (a FIFO, socket or device)")
        size = st.st_size
        if size == 0:
            raise ImageLoadError(f"cannot read image {desc}: file is empty (zero bytes)")
        img = _open_and_decode(path, desc)
        with img:
            return _to_rgb(img)

    if not hasattr(path_or_file, "read"):
        raise TypeError(
            f"load_image expects a path, a binary file object, bytes, a PIL image or a uint8 "
            f"array, not {type(path_or_file).__name__}")
    # File object: detect an empty stream (Image.open would only say "cannot identify").
    fp = path_or_file
    if hasattr(fp, "seek") and hasattr(fp, "tell"):
        try:
            pos = fp.tell()
            empty = not fp.read(1)
            fp.seek(pos)
        except (OSError, ValueError):
            empty = False
        if empty:
            raise ImageLoadError(f"cannot read image {desc}: file is empty (zero bytes)")
    img = _open_and_decode(fp, desc)
    # Do not close: the caller owns the file object (PIL only closes what it opened).
    return _to_rgb(img)


def _as_rgb(image: ImageSource) -> Image.Image:
    return load_image(image)


# --------------------------------------------------------------------------------------
# Geometry helpers (torchvision / timm semantics on PIL images)
# --------------------------------------------------------------------------------------


def pil_interpolation(name: str) -> Image.Resampling:
    """PIL resampling filter for a timm interpolation name (the filter torchvision uses)."""
    if isinstance(name, str):
        key = name.lower()
        if key in INTERPOLATIONS:
            return INTERPOLATIONS[key]
    raise ValueError(f"unknown interpolation {name!r}; valid names are {sorted(INTERPOLATIONS)}")


def _pair(size: int | Sequence[int], what: str) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    size = tuple(int(s) for s in size)
    if len(size) == 1:
        return size[0], size[0]
    if len(size) == 3:  # timm input_size (C, H, W)
        size = size[1:]
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"{what} must be a positive int or (height, width), got {size}")
    return size  # type: ignore[return-value]


# Pixels of one resize's output. The shorter side goes to ~256 before the crop, so a thin strip
# becomes huge (1 x 8000 -> 248 x 1,984,000: 4.9 GB of peak memory for a 224 x 224 input; a
# 1 x 100000 strip needs ~25 GB). 2^24 allows aspect ratios up to ~270:1 at 224.
MAX_RESIZE_PIXELS = 1 << 24


def _resize(img: Image.Image, hw: tuple[int, int], resample: Image.Resampling) -> Image.Image:
    """torchvision F.resize on PIL with an explicit (h, w): no-op when already that size."""
    h, w = hw
    if (img.height, img.width) == (h, w):
        return img
    if h * w > MAX_RESIZE_PIXELS:
        raise ImageLoadError(f"a {img.width}x{img.height} image would be resized to {w}x{h} before the crop "
                             f"({h * w / 1e6:.0f}M pixels, over the limit of {MAX_RESIZE_PIXELS / 1e6:.1f}M): its "
                             "aspect ratio is too extreme for this transform; crop it first")
    return img.resize((w, h), resample)


def _shorter_side_size(hw: tuple[int, int], size: int) -> tuple[int, int]:
    """torchvision Resize(int)'s (h, w): shorter side -> size, longer -> int(size * long / short)."""
    h, w = hw
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if w <= h else (new_short, new_long)


def _keep_ratio_size(hw: tuple[int, int], target: tuple[int, int], longest: float) -> tuple[int, int]:
    """timm ResizeKeepRatio's (h, w) (no randomness)."""
    img_h, img_w = hw
    ratio_h = img_h / target[0]
    ratio_w = img_w / target[1]
    ratio = max(ratio_h, ratio_w) * longest + min(ratio_h, ratio_w) * (1.0 - longest)
    # At least 1 px: timm's round() gives 0 for a thin strip (4000 x 10 in 'border' mode) and PIL
    # fails; here the strip becomes one row, padded like any small image.
    return max(1, round(img_h * 1.0 / ratio)), max(1, round(img_w * 1.0 / ratio))


def _crop_origin(hw: tuple[int, int], crop: tuple[int, int], hf: bool = False) -> tuple[int, int]:
    """(top, left) of `_center_crop_or_pad`'s window in the (h, w) image's pixels, negative where it pads."""
    if hf:
        return tuple((n - c) // 2 for n, c in zip(hw, crop))  # type: ignore[return-value]
    out = []
    for n, c in zip(hw, crop):
        before = (c - n) // 2 if c > n else 0
        out.append(int(round((max(n, c) - c) / 2.0)) - before)
    return out[0], out[1]


def _center_crop_or_pad(arr: np.ndarray, crop: tuple[int, int], fill: Sequence[int] | int = 0) -> np.ndarray:
    """torchvision center_crop / timm center_crop_or_pad on an (H, W[, C]) uint8 array."""
    crop_h, crop_w = crop
    img_h, img_w = arr.shape[:2]
    if crop_w > img_w or crop_h > img_h:
        left = (crop_w - img_w) // 2 if crop_w > img_w else 0
        top = (crop_h - img_h) // 2 if crop_h > img_h else 0
        right = (crop_w - img_w + 1) // 2 if crop_w > img_w else 0
        bottom = (crop_h - img_h + 1) // 2 if crop_h > img_h else 0
        padded = np.empty((img_h + top + bottom, img_w + left + right) + arr.shape[2:], dtype=arr.dtype)
        padded[...] = np.asarray(fill, dtype=arr.dtype)
        padded[top:top + img_h, left:left + img_w] = arr
        arr = padded
        img_h, img_w = arr.shape[:2]
        if (img_h, img_w) == (crop_h, crop_w):
            return arr
    top = int(round((img_h - crop_h) / 2.0))
    left = int(round((img_w - crop_w) / 2.0))
    return arr[top:top + crop_h, left:left + crop_w]


def _hf_center_crop(arr: np.ndarray, crop: tuple[int, int]) -> np.ndarray:
    """transformers' image_transforms.center_crop on an (H, W[, C]) uint8 array: offset (size - crop) // 2,
    zero padding where the image is smaller (an odd pixel before), as the window (size - crop) // 2 of
    the padded image."""
    top, left = _crop_origin(arr.shape[:2], crop, hf=True)
    out = np.zeros(tuple(crop) + arr.shape[2:], dtype=arr.dtype)
    src_t, src_l = max(top, 0), max(left, 0)
    src_b, src_r = min(top + crop[0], arr.shape[0]), min(left + crop[1], arr.shape[1])
    out[src_t - top:src_b - top, src_l - left:src_r - left] = arr[src_t:src_b, src_l:src_r]
    return out


def _unit(arr: np.ndarray) -> np.ndarray:
    """torchvision ToTensor: uint8 -> float32 / 255 (a true division, as torch does)."""
    return np.asarray(arr, dtype=np.float32) / np.float32(255.0)


# --------------------------------------------------------------------------------------
# Public transforms
# --------------------------------------------------------------------------------------


def normalize(x, mean: Sequence[float], std: Sequence[float]):
    """(x - mean) / std over the last (channel) axis; numpy in, numpy out, jax in, jax out.

    Float inputs keep their dtype; integer inputs are promoted to float32, not scaled: timm's
    mean and std are for pixels in [0, 1], so divide 8-bit pixels by 255 first. The mean and
    std are cast to that dtype first and the division is a true division, as in
    torchvision's Normalize, so float32 results match it exactly.
    """
    dtype = np.dtype(getattr(x, "dtype", np.float32))
    if not np.issubdtype(dtype, np.floating):
        dtype = np.dtype(np.float32)
        x = x.astype(dtype) if hasattr(x, "astype") else np.asarray(x, dtype=dtype)
    elif not hasattr(x, "dtype"):
        x = np.asarray(x, dtype=dtype)
    m = np.asarray(mean, dtype=dtype)
    s = np.asarray(std, dtype=dtype)
    if m.ndim != 1 or s.ndim != 1:
        raise ValueError("mean and std must be 1-D sequences (one value per channel)")
    if np.any(s == 0):
        raise ValueError(f"std has a zero entry: {tuple(std)}")
    return (x - m) / s


def eval_geometry(
    img: Image.Image,
    *,
    img_size: int | Sequence[int] = (224, 224),
    resample: Image.Resampling = Image.Resampling.BICUBIC,
    crop_pct: float | None = 0.9,
    crop_mode: str | None = "center",
    fill: Sequence[int] | int = 0,
) -> np.ndarray:
    """The resize and crop of timm's eval transform on any PIL image, as a uint8 (H, W[, C]) array.

    `eval_transform` is this plus ToTensor and Normalize. Apart from images, it moves label maps
    (segmentation masks: `resample=NEAREST`, `fill=0`) through exactly the same geometry.
    `fill`: what 'border' mode pads with.
    """
    img = _resize(img, eval_resize_size((img.height, img.width), img_size=img_size, crop_pct=crop_pct,
                                        crop_mode=crop_mode), resample)
    if crop_mode in _HF_MODES:
        return _hf_center_crop(np.asarray(img), _pair(img_size, "img_size"))
    return _center_crop_or_pad(np.asarray(img), _pair(img_size, "img_size"), fill if crop_mode == "border" else 0)


def eval_resize_size(
    hw: tuple[int, int],
    *,
    img_size: int | Sequence[int] = (224, 224),
    crop_pct: float | None = 0.9,
    crop_mode: str | None = "center",
) -> tuple[int, int]:
    """The (h, w) an (h, w) image is resized to by `eval_geometry`, before its centre crop (or
    pad) to img_size: what part of the image the model sees, without resizing it."""
    out_h, out_w = _pair(img_size, "img_size")
    crop_pct = crop_pct or DEFAULT_CROP_PCT
    if crop_pct < 0:
        raise ValueError(f"crop_pct must be positive, got {crop_pct}")
    crop_mode = crop_mode or "center"
    if crop_mode not in CROP_MODES:
        raise ValueError(f"unknown crop_mode {crop_mode!r}; valid modes are {list(CROP_MODES)}")
    if crop_mode in _HF_MODES:  # crop_pct = crop / resize exactly: rounding gives the resize back
        scale = (round(out_h / crop_pct), round(out_w / crop_pct))
        return scale if crop_mode == "hf_squash" else _shorter_side_size(hw, scale[0])
    scale = (math.floor(out_h / crop_pct), math.floor(out_w / crop_pct))
    if crop_mode == "squash":
        return scale
    if crop_mode == "border":
        return _keep_ratio_size(hw, scale, 1.0)
    if scale[0] == scale[1]:
        return _shorter_side_size(hw, scale[0])
    return _keep_ratio_size(hw, scale, 0.0)


def eval_crop_box(
    hw: tuple[int, int],
    *,
    img_size: int | Sequence[int] = (224, 224),
    crop_pct: float | None = 0.9,
    crop_mode: str | None = "center",
) -> tuple[float, float, float, float]:
    """(left, top, right, bottom), in an (h, w) image's own pixels, of what `eval_geometry` turns into
    the model input: the centre crop mapped back through the resize. Past the image's edges where the
    transform pads it; the whole image for 'squash'. A map over the model input lies on this box."""
    crop = _pair(img_size, "img_size")
    rh, rw = eval_resize_size(hw, img_size=crop, crop_pct=crop_pct, crop_mode=crop_mode)
    (top, left), (sy, sx) = _crop_origin((rh, rw), crop, crop_mode in _HF_MODES), (hw[0] / rh, hw[1] / rw)
    return left * sx, top * sy, (left + crop[1]) * sx, (top + crop[0]) * sy


def eval_settings(config: Any) -> dict[str, Any]:
    """The eval transform's settings of a config, duck-typed: img_size, interpolation, crop_pct and
    crop_mode (the last three default to 'bicubic', 0.9 and 'center' when absent)."""
    return dict(img_size=_pair(config.img_size, "img_size"), interpolation=getattr(config, "interpolation", "bicubic"),
                crop_pct=getattr(config, "crop_pct", 0.9), crop_mode=getattr(config, "crop_mode", "center"))


def eval_transform(
    image: ImageSource,
    *,
    img_size: int | Sequence[int] = (224, 224),
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bicubic",
    crop_pct: float | None = 0.9,
    crop_mode: str | None = "center",
) -> np.ndarray:
    """timm's eval transform, as a float32 (H, W, 3) array (channel-last, not CHW).

    Equals ``timm.data.create_transform(input_size=(3, H, W), interpolation=...,
    mean=..., std=..., crop_pct=..., crop_mode=...)(img).permute(1, 2, 0)`` for an RGB
    PIL image `img`. `image` may be anything `load_image` accepts; non-RGB PIL images
    are converted with `load_image`'s rules. `img_size` is an int (square) or (H, W).
    `crop_pct` None (or 0) means timm's default 0.875, `crop_mode` None means 'center'.
    Unlike timm, an unknown `crop_mode` raises ValueError instead of silently falling
    back to 'center'. See the module docstring for the exact steps.
    """
    img = _as_rgb(image)
    try:
        arr = eval_geometry(img, img_size=img_size, resample=pil_interpolation(interpolation),
                            crop_pct=crop_pct, crop_mode=crop_mode, fill=[round(255 * v) for v in mean])
    except ImageLoadError as e:
        if isinstance(image, Image.Image):
            raise
        raise ImageLoadError(f"cannot use image {_describe(image)}: {e}") from None
    return normalize(_unit(arr), mean, std)


def eval_transform_for(config: Any) -> Callable[[ImageSource], np.ndarray]:
    """The eval transform of a config (e.g. `jaxvit.config.ViTConfig`), as image -> array.

    Duck-typed: reads `img_size`, `mean`, `std`, `interpolation`, `crop_pct` and
    `crop_mode` (the last three default to 'bicubic', 0.9 and 'center' when absent).
    """
    settings = eval_settings(config)
    img_size, interpolation, crop_pct, crop_mode = (settings[k] for k in ("img_size", "interpolation", "crop_pct",
                                                                         "crop_mode"))
    mean = tuple(float(v) for v in config.mean)
    std = tuple(float(v) for v in config.std)
    pil_interpolation(interpolation)  # fail early on a bad name
    if (crop_mode or "center") not in CROP_MODES:
        raise ValueError(f"unknown crop_mode {crop_mode!r}; valid modes are {list(CROP_MODES)}")

    def transform(image: ImageSource) -> np.ndarray:
        return eval_transform(image, img_size=img_size, mean=mean, std=std, interpolation=interpolation,
                              crop_pct=crop_pct, crop_mode=crop_mode)

    transform.__doc__ = (f"eval_transform(img_size={img_size}, mean={mean}, std={std}, "
                         f"interpolation={interpolation!r}, crop_pct={crop_pct}, crop_mode={crop_mode!r})")
    return transform


def to_unit(image: ImageSource, size: int | Sequence[int] | None = None,
            interpolation: str = "bilinear") -> np.ndarray:
    """The image as float32 (H, W, 3) in [0, 1] (ToTensor, before normalisation).

    With `size` (an int for a square, or (H, W)) the image is first resized straight to
    that size, ignoring the aspect ratio, as torchvision ``Resize((H, W))`` on a PIL image.
    Note an int here means a square, unlike torchvision ``Resize(int)`` (shorter side).
    """
    img = _as_rgb(image)
    resample = pil_interpolation(interpolation)
    if size is not None:
        img = _resize(img, _pair(size, "size"), resample)
    return _unit(np.asarray(img))


def resize_transform(
    image: ImageSource,
    *,
    size: int | Sequence[int] = (224, 224),
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
    interpolation: str = "bilinear",
) -> np.ndarray:
    """Plain resize to `size`, ToTensor, Normalize: float32 (H, W, 3).

    The protocol of Chefer et al.'s perturbation and segmentation evaluations:
    torchvision ``Compose([Resize((224, 224)), ToTensor(), Normalize([0.5]*3, [0.5]*3)])``
    on a PIL image (bilinear, no crop, aspect ratio not kept).
    """
    return normalize(to_unit(image, size, interpolation), mean, std)


def load_batch(paths: Iterable[ImageSource],
               transform: Callable[[Image.Image], np.ndarray] | Any) -> np.ndarray:
    """Load each source with `load_image`, apply `transform`, stack to (B, H, W, 3).

    `transform` is a callable image -> (H, W, 3) array, or a config object, which is
    turned into its eval transform with `eval_transform_for`.
    """
    if not callable(transform):
        transform = eval_transform_for(transform)
    arrays = [np.asarray(transform(load_image(p))) for p in paths]
    if not arrays:
        raise ValueError("load_batch got no images")
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"transform produced arrays of different shapes {sorted(shapes)}; cannot stack")
    return np.stack(arrays)
