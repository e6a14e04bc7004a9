"""Library quick start: load a model, explain a batch, draw the maps.

    python examples/quickstart.py --out quickstart-out/

Runs offline in seconds on a CPU: the embedded digit-scenes ViT (a small model the project trained on
real handwritten digits) explains two-digit scenes. For a timm model, replace the first lines with
`model, params = convert.load("vit_base_patch16_224.augreg2_in21k_ft_in1k")` and
`x = preprocess.load_batch(["cat.jpg"], model.config)`.
"""

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

import convert
import predmaps
from predmaps import digits, viz


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for the PNGs (created)")
    p.add_argument("--n", type=int, default=4, help="scenes to explain (default 4)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    model, params = convert.load(digits.ASSET_DIR)               # any timm ViT loads the same way
    images, labels, _ = digits.two_digit_scenes(args.n, "test", seed=0)   # uint8 (n, 64, 64, 3), labels (n, 2)
    x = digits.normalize(images)                                  # normalised float32, channels last

    ex = predmaps.explain(model, params, x, method="predicatt", target=labels, layer=-1)   # both digits
    print(ex)                                                     # shapes and dtypes
    print("predicted:", np.asarray(ex.logits).argmax(-1).tolist(), "digits:", labels.tolist())
    print("PredicAtt_L of the first digit, scene 0:\n", np.asarray(ex.maps[0, 0]).round(3))

    for i in range(args.n):   # one overlay per digit, side by side
        tiles = [viz.overlay(images[i], ex.maps[i, k], alpha=0.6) for k in range(2)]
        viz.grid(tiles, titles=[f"digit {c}" for c in labels[i]], cell=128).save(out / f"scene{i}.png")
    heat = predmaps.upsample(ex.maps, 64, normalize=True)          # (n, 2, 64, 64), in [0, 1]
    Image.fromarray((np.asarray(heat[0, 0]) * 255).astype(np.uint8)).save(out / "scene0_heat.png")
    print(f"wrote {args.n} overlays to {out.resolve()}")


if __name__ == "__main__":
    main()
