"""Run a batch job (`predmaps run`), read its results back, and plot maps on the photos.

    python examples/read_results.py --out results-example/

Writes a few digit-scene images, explains them into shards under --out (what `predmaps run
--images DIR --out DIR` does), then reads the maps with `predmaps.read_results` and draws each on
the part of its photo that the model saw (`viz.show` applies the eval transform's centre crop).
"""

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

import convert
import predmaps
from predmaps import digits, viz
from predmaps.pipeline import ExplainSpec, explain_dataset


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for the images, the job and the plots (created)")
    p.add_argument("--n", type=int, default=6, help="images (default 6)")
    args = p.parse_args(argv)
    out = Path(args.out)
    (out / "photos").mkdir(parents=True, exist_ok=True)

    # Photos of another size and aspect than the model's 64 x 64 input: the transform resizes and crops.
    images, labels, _ = digits.two_digit_scenes(args.n, "test", seed=2, size=96)
    for i, img in enumerate(images):
        Image.fromarray(img[:, 8:]).save(out / "photos" / f"scene{i}.png")   # 96 x 88

    model, params = convert.load(digits.ASSET_DIR)
    # The same as: predmaps run --images OUT/photos --out OUT/job --method predicatt --layers -1,-2 --target top2
    explain_dataset(model, params, out / "photos", out / "job",
                    ExplainSpec(methods="predicatt", layers="-1,-2", targets="top2"), batch_size=4, progress=False)

    r = predmaps.read_results(out / "job")
    maps = r.map(method="predicatt", layer=-1)                  # (N, 2, 8, 8): the top-2 classes
    print(f"{len(r)} images, maps {r.maps.keys()}, complete: {r.complete}")
    print("predicted:", r.pred.tolist(), "top-2 classes of the first:", r.classes[r.key(layer=-1)][0].tolist())
    boxes = r.crop_boxes()                                      # (N, 4) in each photo's pixels
    print("the model saw, of photo 0, the box (left, top, right, bottom):", np.round(boxes[0], 1).tolist())
    tiles = [viz.show(r.paths[i], maps[i, 0], model.config, alpha=0.6) for i in range(len(r))]
    viz.grid(tiles, titles=[f"{Path(n).stem}: {c}" for n, c in zip(r.names, r.pred)], cell=128).save(
        out / "maps.png")
    print(f"plot: {(out / 'maps.png').resolve()}")


if __name__ == "__main__":
    main()
