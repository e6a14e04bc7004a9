"""The evaluation protocol's transforms: the image and mask geometry and normalisation the
perturbation and segmentation tests run at. Listing, labels and decoding are `predmaps.data`'s.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

PROTOCOL_MEAN = (0.5, 0.5, 0.5)
PROTOCOL_STD = (0.5, 0.5, 0.5)
TRANSFORMS = ("resize", "timm")


def _timm_geometry(config) -> dict:
    """The eval-transform geometry of a model config: interpolation, crop_pct, crop_mode."""
    if config is None:
        raise ValueError("the timm transform needs the model config")
    return {"interpolation": getattr(config, "interpolation", "bicubic"),
            "crop_pct": getattr(config, "crop_pct", 0.9), "crop_mode": getattr(config, "crop_mode", "center")}


def eval_size(image_size, config=None) -> tuple[int, int]:
    """The (H, W) a test runs at: `image_size`, else the model's input size (the protocol's 224 x 224
    for the paper's ViT-B/16), else 224 x 224."""
    if image_size is None:
        image_size = config.img_size if config is not None else (224, 224)
    return tuple(int(s) for s in image_size)


def unit_transform(kind: str = "resize", size=(224, 224), config=None) -> Callable:
    """image -> float32 (H, W, 3) in [0, 1], before normalisation.

    "resize": the protocol's plain resize to `size` (bilinear, no crop) and ToTensor.
    "timm": timm's eval transform of `config` (resize by crop_pct, centre crop, its
    interpolation) at `size`, without the normalisation.
    """
    from jaxvit import preprocess

    if kind == "resize":
        return lambda img: preprocess.to_unit(img, size, "bilinear")
    if kind == "timm":
        geometry = _timm_geometry(config)
        return lambda img: preprocess.eval_transform(img, img_size=size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                                                     **geometry)
    raise ValueError(f"transform must be one of {TRANSFORMS}; got {kind!r}")


def mask_transform(kind: str = "resize", size=(224, 224), config=None) -> Callable:
    """label mask (H, W) -> uint8 `size`, through the same geometry as `unit_transform(kind)`
    moves its image, with NEAREST resampling ("resize": torchvision Resize(size, NEAREST), as
    the protocol; "timm": the eval transform's resize and crop, padding with 0 = background)."""
    from PIL import Image

    from jaxvit import preprocess

    def to_pil(mask):
        return Image.fromarray(np.asarray(mask, np.uint8))

    if kind == "resize":
        return lambda mask: np.asarray(to_pil(mask).resize((size[1], size[0]), Image.Resampling.NEAREST))
    if kind == "timm":
        geometry = _timm_geometry(config)
        del geometry["interpolation"]
        return lambda mask: preprocess.eval_geometry(to_pil(mask), img_size=size, resample=Image.Resampling.NEAREST,
                                                     **geometry)
    raise ValueError(f"transform must be one of {TRANSFORMS}; got {kind!r}")
