"""Tests of jaxvit.preprocess: parity with timm / torchvision transforms, mode handling, errors."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxvit import preprocess as pp
from jaxvit.preprocess import ImageLoadError

SAMPLE_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
ATOL = 1e-6


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def _rgb_array(w: int, h: int, seed: int = 0) -> np.ndarray:
    """Smooth gradients plus noise: resampling filters give distinct results on it."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    base = np.stack([255 * xx / max(w - 1, 1), 255 * yy / max(h - 1, 1),
                     127 + 120 * np.sin(xx / 7.0 + yy / 11.0)], axis=-1)
    noisy = base + rng.normal(0, 25, size=base.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def _make_image(mode: str, w: int = 181, h: int = 263, seed: int = 0) -> Image.Image:
    rgb = Image.fromarray(_rgb_array(w, h, seed))
    rng = np.random.default_rng(seed + 1)
    alpha = Image.fromarray(rng.integers(0, 256, size=(h, w), dtype=np.uint8))
    if mode == "RGB":
        return rgb
    if mode == "L":
        return rgb.convert("L")
    if mode == "LA":
        return Image.merge("LA", (rgb.convert("L"), alpha))
    if mode == "P":
        return rgb.quantize(colors=64)
    if mode == "RGBA":
        return Image.merge("RGBA", (*rgb.split(), alpha))
    if mode == "CMYK":
        return Image.frombytes("CMYK", (w, h), rng.integers(0, 256, size=(h, w, 4), dtype=np.uint8).tobytes())
    if mode == "YCbCr":
        return rgb.convert("YCbCr")
    if mode == "1":
        return rgb.convert("1")
    if mode == "I;16":
        grad = (np.linspace(0, 65535, w)[None, :] * np.ones((h, 1))).astype(np.uint16)
        img = Image.fromarray(grad)
        assert img.mode == "I;16"
        return img
    raise AssertionError(mode)


def _timm_eval(img: Image.Image, size, *, mean, std, interpolation, crop_pct, crop_mode="center") -> np.ndarray:
    timm_data = pytest.importorskip("timm.data")
    tf = timm_data.create_transform(input_size=(3, *size), is_training=False, interpolation=interpolation,
                                    mean=mean, std=std, crop_pct=crop_pct, crop_mode=crop_mode)
    want = timm_data.transforms.str_to_interp_mode(interpolation)
    for t in getattr(tf, "transforms", []):
        if type(t).__name__ == "ResizeKeepRatio" and t.interpolation != want:
            # timm <= 1.0.29 built ResizeKeepRatio (non-square center crops) without the interpolation
            # it was given, so its reference is bilinear whatever was asked; fixed in 1.0.31
            import timm

            pytest.skip(f"timm {timm.__version__} resizes non-square center crops with {t.interpolation}, "
                        f"not the {interpolation} asked for (fixed in timm 1.0.31)")
    return tf(img).permute(1, 2, 0).numpy()


def _assert_same(ours: np.ndarray, ref: np.ndarray):
    assert ours.dtype == np.float32
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=0, atol=ATOL)


@pytest.fixture(scope="module")
def timm_data():
    data = pytest.importorskip("timm.data")
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny images: threading only adds overhead
    yield data
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------
# Parity with timm's eval transform
# --------------------------------------------------------------------------------------

EIGHT_BIT_MODES = ["RGB", "L", "LA", "P", "RGBA", "CMYK", "YCbCr", "1"]


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("mode", EIGHT_BIT_MODES)
def test_eval_parity_modes(timm_data, mode, interpolation):
    img = _make_image(mode)
    kw = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation=interpolation, crop_pct=0.9)
    ours = pp.eval_transform(img, img_size=(224, 224), **kw)
    # timm's loaders feed it img.convert("RGB").
    ref = _timm_eval(img.convert("RGB"), (224, 224), **kw)
    _assert_same(ours, ref)
    assert ours.shape == (224, 224, 3)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_eval_parity_16bit(timm_data, interpolation):
    img = _make_image("I;16")
    rgb8 = pp.load_image(img)
    kw = dict(mean=HALF, std=HALF, interpolation=interpolation, crop_pct=0.875)
    ours = pp.eval_transform(img, img_size=(192, 256), **kw)
    _assert_same(ours, _timm_eval(rgb8, (192, 256), **kw))
    # Not saturated: the gradient spans the range; PIL's naive convert would be ~all white.
    unit = ours * 0.5 + 0.5
    assert 0.3 < unit.mean() < 0.7
    assert unit.min() < 0.1
    assert np.asarray(img.convert("RGB")).mean() > 250  # what we refuse to do


SIZES = [(224, 224), (192, 256), (256, 160)]  # (H, W)
IMAGES = [(320, 240), (181, 263), (97, 150)]  # (W, H); the last is smaller than every crop
CROP_PCTS = [0.875, 0.9, 1.0, 1.15]  # 1.15: the resized image is smaller than the crop (padding)


@pytest.mark.parametrize("crop_mode", ["center", "squash", "border"])
@pytest.mark.parametrize("crop_pct", CROP_PCTS)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("wh", IMAGES, ids=lambda s: f"img{s[0]}x{s[1]}")
def test_eval_parity_geometry(timm_data, wh, size, crop_pct, crop_mode):
    img = Image.fromarray(_rgb_array(*wh, seed=wh[0]))
    # Alternate the filter over the grid so each is seen with every geometry, at half the cost.
    interpolation = ("bicubic", "bilinear")[(IMAGES.index(wh) + SIZES.index(size) + CROP_PCTS.index(crop_pct)) % 2]
    kw = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation=interpolation,
              crop_pct=crop_pct, crop_mode=crop_mode)
    ours = pp.eval_transform(img, img_size=size, **kw)
    _assert_same(ours, _timm_eval(img, size, **kw))


@pytest.mark.parametrize("interpolation", ["nearest", "lanczos", "box", "hamming"])
def test_eval_parity_other_filters(timm_data, interpolation):
    img = Image.fromarray(_rgb_array(300, 217, seed=3))
    kw = dict(mean=HALF, std=HALF, interpolation=interpolation, crop_pct=0.9)
    _assert_same(pp.eval_transform(img, img_size=(224, 224), **kw), _timm_eval(img, (224, 224), **kw))


def test_eval_defaults_like_timm(timm_data):
    """crop_pct None -> 0.875 and crop_mode None -> center, as in timm."""
    img = Image.fromarray(_rgb_array(300, 217, seed=4))
    kw = dict(mean=HALF, std=HALF, interpolation="bicubic")
    ours = pp.eval_transform(img, img_size=224, crop_pct=None, crop_mode=None, **kw)
    _assert_same(ours, _timm_eval(img, (224, 224), crop_pct=None, crop_mode=None, **kw))
    _assert_same(ours, pp.eval_transform(img, img_size=(224, 224), crop_pct=0.875, **kw))


def test_eval_pads_with_zero_and_mean():
    """A small image with crop_pct > 1: center pads with 0 (black), border with the mean colour."""
    img = Image.fromarray(np.full((50, 80, 3), 200, np.uint8))
    center = pp.eval_transform(img, img_size=64, mean=HALF, std=HALF, crop_pct=2.0, crop_mode="center")
    assert center.shape == (64, 64, 3)
    assert np.allclose(center[0, 0], -1.0)  # zero pixel normalised
    border = pp.eval_transform(img, img_size=64, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                               crop_pct=1.0, crop_mode="border")
    fill = (np.array([124, 116, 104], np.float32) / 255 - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)
    np.testing.assert_allclose(border[0, 0], fill, atol=1e-6)


def test_border_mode_takes_a_strip_thinner_than_a_pixel_after_resizing():
    """4000 x 10 in 'border' mode scales to 224 x 0.56: timm rounds that to 0 and PIL fails (an
    error on one image of a job). Here it keeps one row, the rest padded with the mean colour."""
    strip = Image.fromarray(np.full((10, 4000, 3), 30, np.uint8))
    out = pp.eval_transform(strip, img_size=224, mean=HALF, std=HALF, crop_pct=1.0, crop_mode="border")
    assert out.shape == (224, 224, 3)
    rows = np.flatnonzero(np.abs(out - out[0, 0]).max(axis=(1, 2)) > 0.1)
    assert len(rows) == 1 and np.allclose(out[rows[0]], (30 / 255 - 0.5) / 0.5, atol=0.02)


def test_a_strip_too_thin_to_resize_is_refused_as_an_image_error(tmp_path):
    """The shorter side goes to 248 before a 224 crop, so a 1 x 8000 strip would become 248 x
    1,984,000 pixels (4.9 GB of peak memory; 1 x 100000 ~25 GB): refused as that image's error, naming
    it, before any allocation. 200:1 still resizes as timm does (the limit allows ~270:1)."""
    path = tmp_path / "strip.png"
    Image.fromarray(np.full((1, 8000, 3), 30, np.uint8)).save(path)
    with pytest.raises(ImageLoadError, match=r"strip\.png.*8000x1 image would be resized to 1984000x248 .*crop it first"):
        pp.eval_transform(path, mean=HALF, std=HALF)
    assert pp.eval_transform(Image.new("RGB", (2000, 10)), mean=HALF, std=HALF).shape == (224, 224, 3)


@pytest.mark.parametrize("crop_mode", ["center", "squash", "border"])
@pytest.mark.parametrize("wh,size,crop_pct", [((320, 240), (224, 224), 0.9), ((181, 263), (192, 256), 0.875),
                                              ((97, 150), (224, 224), 1.15)], ids=["wide", "tall-nonsquare", "pad"])
def test_eval_geometry_moves_a_label_map_as_timm_moves_its_image(timm_data, wh, size, crop_pct, crop_mode):
    """A segmentation mask through `eval_geometry` (NEAREST, fill 0) lands exactly where timm's
    eval transform with nearest interpolation puts the same labels drawn as an image: every pixel
    equal, so masks stay aligned with images under the timm transform."""
    w, h = wh
    rng = np.random.default_rng(w)
    labels = np.kron(rng.integers(0, 3, (h // 8 + 1, w // 8 + 1)), np.ones((8, 8), int))[:h, :w].astype(np.uint8)
    ours = pp.eval_geometry(Image.fromarray(labels), img_size=size, resample=Image.Resampling.NEAREST,
                            crop_pct=crop_pct, crop_mode=crop_mode)
    drawn = Image.fromarray(np.repeat(labels[..., None] * 100, 3, axis=-1))
    ref = _timm_eval(drawn, size, mean=(0.0,) * 3, std=(1.0,) * 3, interpolation="nearest", crop_pct=crop_pct,
                     crop_mode=crop_mode)
    assert ours.shape == size and ours.dtype == np.uint8
    np.testing.assert_array_equal(ours.astype(np.int64) * 100, np.rint(ref[..., 0] * 255).astype(np.int64))
    assert set(np.unique(ours)) <= {0, 1, 2}


# --------------------------------------------------------------------------------------
# Plain resize protocol, to_unit, normalize
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("wh", [(320, 240), (97, 150), (224, 224)])
def test_resize_transform_parity(wh):
    transforms = pytest.importorskip("torchvision.transforms")
    img = Image.fromarray(_rgb_array(*wh, seed=7))
    tf = transforms.Compose([transforms.Resize((224, 224)), transforms.ToTensor(),
                             transforms.Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])])
    ref = tf(img).permute(1, 2, 0).numpy()
    _assert_same(pp.resize_transform(img), ref)


def test_to_unit_parity():
    transforms = pytest.importorskip("torchvision.transforms")
    img = Image.fromarray(_rgb_array(150, 97, seed=8))
    u = pp.to_unit(img)
    assert u.shape == (97, 150, 3) and u.dtype == np.float32
    assert 0.0 <= u.min() and u.max() <= 1.0
    _assert_same(u, transforms.ToTensor()(img).permute(1, 2, 0).numpy())
    sized = pp.to_unit(img, size=(64, 48))
    ref = transforms.ToTensor()(transforms.Resize((64, 48))(img)).permute(1, 2, 0).numpy()
    _assert_same(sized, ref)
    assert pp.to_unit(img, size=32).shape == (32, 32, 3)
    # normalize(to_unit) == resize_transform
    _assert_same(pp.normalize(pp.to_unit(img, (224, 224)), HALF, HALF), pp.resize_transform(img))


def test_normalize_numpy_and_jax():
    x = np.random.default_rng(0).random((4, 5, 3), dtype=np.float32)
    y = pp.normalize(x, IMAGENET_MEAN, IMAGENET_STD)
    assert isinstance(y, np.ndarray) and y.dtype == np.float32
    np.testing.assert_allclose(y, (x - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD), atol=0)
    assert pp.normalize(np.zeros((2, 2, 3), np.uint8), HALF, HALF).dtype == np.float32
    with pytest.raises(ValueError, match="zero"):
        pp.normalize(x, HALF, (0.5, 0.0, 0.5))
    jnp = pytest.importorskip("jax.numpy")
    yj = pp.normalize(jnp.asarray(x), IMAGENET_MEAN, IMAGENET_STD)
    assert not isinstance(yj, np.ndarray) and yj.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(yj), y, atol=1e-6)


# --------------------------------------------------------------------------------------
# Loading and mode handling
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", EIGHT_BIT_MODES + ["PA"])
def test_load_image_8bit_modes_match_pil_convert(mode):
    img = _make_image("P").convert("PA") if mode == "PA" else _make_image(mode)
    out = pp.load_image(img)
    assert out.mode == "RGB" and out.size == img.size
    np.testing.assert_array_equal(np.asarray(out), np.asarray(img.convert("RGB")))


def test_load_image_sources(tmp_path):
    img = _make_image("RGB", 40, 30)
    p = tmp_path / "a.png"
    img.save(p)
    ref = np.asarray(img)
    data = p.read_bytes()
    for src in (p, str(p), io.BytesIO(data), data, ref, img):
        out = pp.load_image(src)
        assert out.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(out), ref)
    with open(p, "rb") as f:
        np.testing.assert_array_equal(np.asarray(pp.load_image(f)), ref)
        assert not f.closed  # the caller's file object stays open
    np.testing.assert_array_equal(np.asarray(pp.load_image(ref[:, :, 0])), np.repeat(ref[:, :, :1], 3, axis=2))


@pytest.mark.parametrize("raw_mode", ["I;16", "I;16B", "I;16L"])
def test_load_image_16bit_scaled(raw_mode):
    a = np.array([[0, 255, 256, 257 * 100, 65535, 40000]], dtype=np.uint16)
    dtype = ">u2" if raw_mode == "I;16B" else "<u2"
    img = Image.frombytes(raw_mode, (a.shape[1], 1), a.astype(dtype).tobytes())
    out = np.asarray(pp.load_image(img))
    np.testing.assert_array_equal(out[..., 0], a >> 8)
    assert (out == out[..., :1]).all()


def test_load_image_16bit_png_roundtrip(tmp_path):
    grad = (np.linspace(0, 65535, 64)[None, :] * np.ones((8, 1))).astype(np.uint16)
    p = tmp_path / "g16.png"
    Image.fromarray(grad).save(p)
    out = np.asarray(pp.load_image(p))
    np.testing.assert_array_equal(out[..., 1], grad >> 8)
    assert out.mean() < 200  # PIL's convert("RGB") would give ~255 everywhere


def test_load_image_int32_and_float():
    i32 = np.array([[0, 1000, 2000, 4000]], dtype=np.int32)
    out = np.asarray(pp.load_image(Image.fromarray(i32)))[..., 0]
    np.testing.assert_array_equal(out, np.rint(i32 * 255.0 / 4000).astype(np.uint8))
    small = np.array([[0, 10, 200, 255]], dtype=np.int32)  # max <= 255: taken as 8-bit
    np.testing.assert_array_equal(np.asarray(pp.load_image(Image.fromarray(small)))[..., 0], small)
    f = np.array([[-5.0, 0.4, 100.6, 510.0, np.nan]], dtype=np.float32)
    out = np.asarray(pp.load_image(Image.fromarray(f)))[..., 0]
    np.testing.assert_array_equal(out, [[0, 0, 50, 255, 0]])  # scaled by 255/510, clipped, NaN -> 0


def test_eval_transform_for_config_and_load_batch(tmp_path):
    from jaxvit.config import ViTConfig

    cfg = ViTConfig(img_size=(192, 256), mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bilinear",
                    crop_pct=0.875, crop_mode="center")
    tf = pp.eval_transform_for(cfg)
    paths = []
    for i, wh in enumerate([(320, 240), (181, 263)]):
        p = tmp_path / f"{i}.png"
        _make_image("RGB", *wh, seed=i).save(p)
        paths.append(p)
    batch = pp.load_batch(paths, tf)
    assert batch.shape == (2, 192, 256, 3) and batch.dtype == np.float32
    for p, row in zip(paths, batch):
        np.testing.assert_array_equal(row, pp.eval_transform(
            Image.open(p), img_size=(192, 256), mean=IMAGENET_MEAN, std=IMAGENET_STD,
            interpolation="bilinear", crop_pct=0.875))
    np.testing.assert_array_equal(pp.load_batch(paths, cfg), batch)  # a config works too
    small = pp.load_batch(paths, lambda im: pp.resize_transform(im, size=(32, 48)))
    assert small.shape == (2, 32, 48, 3)


# --------------------------------------------------------------------------------------
# Real ImageNet JPEGs
# --------------------------------------------------------------------------------------


def _sample_files():
    if not SAMPLE_DIR.is_dir():
        pytest.skip(f"no sample images at {SAMPLE_DIR}")
    files = sorted(p for p in SAMPLE_DIR.iterdir() if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
    if not files:
        pytest.skip(f"no sample images in {SAMPLE_DIR}")
    grey = []
    for p in files:
        with Image.open(p) as im:
            if im.mode == "L":
                grey.append(p)
    colour = [p for p in files if p not in grey]
    return grey[:2] + colour[:4]


def test_real_jpegs_parity(timm_data):
    files = _sample_files()
    modes = set()
    configs = [dict(img_size=(224, 224), mean=HALF, std=HALF, interpolation="bicubic", crop_pct=0.9),
               dict(img_size=(224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bilinear",
                    crop_pct=0.875),
               dict(img_size=(240, 320), mean=HALF, std=HALF, interpolation="bicubic", crop_pct=1.0)]
    for p in files:
        ours_img = pp.load_image(p)
        with Image.open(p) as im:
            modes.add(im.mode)
            timm_img = im.convert("RGB")  # what timm's ImageDataset does
        np.testing.assert_array_equal(np.asarray(ours_img), np.asarray(timm_img))
        for cfg in configs:
            kw = {k: v for k, v in cfg.items() if k != "img_size"}
            _assert_same(pp.eval_transform(p, **cfg), _timm_eval(timm_img, cfg["img_size"], **kw))
    assert "RGB" in modes
    if "L" not in modes:
        pytest.skip("no greyscale JPEG in the sample set (RGB ones checked)")


def test_real_jpegs_resize_protocol():
    transforms = pytest.importorskip("torchvision.transforms")
    tf = transforms.Compose([transforms.Resize((224, 224)), transforms.ToTensor(),
                             transforms.Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])])
    for p in _sample_files()[:3]:
        with Image.open(p) as im:
            ref = tf(im.convert("RGB")).permute(1, 2, 0).numpy()
        _assert_same(pp.resize_transform(p), ref)


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


def _jpeg_bytes() -> bytes:
    files = sorted(SAMPLE_DIR.glob("*.JPEG")) if SAMPLE_DIR.is_dir() else []
    if files:
        return files[0].read_bytes()
    buf = io.BytesIO()
    Image.fromarray(_rgb_array(256, 256)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_error_missing_file(tmp_path):
    p = tmp_path / "nope.jpg"
    with pytest.raises(ImageLoadError, match=r"nope\.jpg.*file not found"):
        pp.load_image(p)


def test_error_zero_byte_file(tmp_path):
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    with pytest.raises(ImageLoadError, match=r"empty\.jpg.*empty \(zero bytes\)"):
        pp.load_image(p)
    with pytest.raises(ImageLoadError, match="zero bytes"):
        pp.load_image(io.BytesIO())
    with pytest.raises(ImageLoadError, match="zero bytes"):
        pp.load_image(b"")


def test_error_not_a_regular_file(tmp_path):
    """A FIFO named like an image is refused at once: opening it would wait for a writer forever."""
    p = tmp_path / "pipe.jpg"
    os.mkfifo(p)
    with pytest.raises(ImageLoadError, match=r"pipe\.jpg.*not a regular file"):
        pp.load_image(p)


def test_error_not_an_image(tmp_path):
    p = tmp_path / "x.jpg"
    p.write_text("this is not a JPEG\n")
    with pytest.raises(ImageLoadError, match=r"x\.jpg.*not an image or unidentified format"):
        pp.load_image(p)
    assert issubclass(ImageLoadError, ValueError)


def test_error_truncated_jpeg(tmp_path):
    data = _jpeg_bytes()
    p = tmp_path / "half.jpg"
    p.write_bytes(data[: len(data) // 2])
    with Image.open(p) as im:  # the header alone opens fine: only a full decode notices
        assert im.format == "JPEG"
    with pytest.raises(ImageLoadError, match=r"half\.jpg.*truncated or corrupt"):
        pp.load_image(p)
    with pytest.raises(ImageLoadError, match="truncated or corrupt"):
        pp.load_image(io.BytesIO(data[: len(data) // 2]))
    with pytest.raises(ImageLoadError, match=r"half\.jpg.*truncated or corrupt"):
        pp.eval_transform(p, mean=HALF, std=HALF)


def test_error_bad_options():
    img = _make_image("RGB", 32, 32)
    with pytest.raises(ValueError, match=r"unknown interpolation 'bicubik'.*bicubic.*bilinear.*lanczos"):
        pp.eval_transform(img, mean=HALF, std=HALF, interpolation="bicubik")
    with pytest.raises(ValueError, match="unknown interpolation"):
        pp.resize_transform(img, interpolation="cubic")
    with pytest.raises(ValueError, match=r"unknown crop_mode 'centre'"):
        pp.eval_transform(img, mean=HALF, std=HALF, crop_mode="centre")
    with pytest.raises(ImageLoadError, match="uint8"):
        pp.load_image(np.zeros((4, 4, 3), np.float32))


@pytest.mark.parametrize("hw, kw", [((300, 400), dict(crop_pct=0.875)), ((300, 400), dict(crop_pct=1.0)),
                                    ((100, 300), dict(crop_pct=1.0, crop_mode="border")),
                                    ((300, 200), dict(crop_pct=0.9, crop_mode="squash"))])
def test_eval_crop_box_is_where_the_model_input_lies_on_the_image(hw, kw):
    # Each pixel holds its own coordinates (red: 0.5 per column, green: 0.5 per row); the model input
    # that eval_geometry makes must hold, at each of its pixels, the coordinates the box maps it to.
    h, w = hw
    rows, cols = np.mgrid[0:h, 0:w]
    arr = np.stack([cols * 0.5, rows * 0.5, np.zeros_like(rows)], -1).round().astype(np.uint8)
    got = pp.eval_geometry(Image.fromarray(arr), img_size=224, **kw).astype(np.float64)
    left, top, right, bottom = pp.eval_crop_box(hw, img_size=224, **kw)
    x = left + (np.arange(224) + 0.5) * (right - left) / 224 - 0.5  # pixel centres, in pixel indices
    y = top + (np.arange(224) + 0.5) * (bottom - top) / 224 - 0.5
    inside_x, inside_y = (x > 2) & (x < w - 3), (y > 2) & (y < h - 3)  # away from the edges' clamping
    assert inside_x.sum() > 100 and inside_y.sum() > 50
    np.testing.assert_allclose(got[inside_y][:, inside_x, 0], np.broadcast_to(x[inside_x] * 0.5, (inside_y.sum(),
                                                                                                inside_x.sum())), atol=1)
    np.testing.assert_allclose(got[inside_y][:, inside_x, 1],
                               np.broadcast_to((y[inside_y] * 0.5)[:, None], (inside_y.sum(), inside_x.sum())), atol=1)


def test_eval_crop_box_by_hand():
    # 400 x 300 at crop_pct 0.875: shorter side 300 -> 256, width int(256 * 400 / 300) = 341; the crop
    # starts at round(117 / 2) = 58 (half to even) and round(32 / 2) = 16; back through the resize.
    box = pp.eval_crop_box((300, 400), img_size=224, crop_pct=0.875)
    np.testing.assert_allclose(box, (58 * 400 / 341, 16 * 300 / 256, 282 * 400 / 341, 240 * 300 / 256))
    # 'border' pads a 3:1 image top and bottom: the box reaches past them
    left, top, right, bottom = pp.eval_crop_box((100, 300), img_size=224, crop_pct=1.0, crop_mode="border")
    assert (left, right) == (0, 300) and top < 0 and bottom > 100
