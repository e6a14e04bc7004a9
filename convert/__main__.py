"""Convert timm ViT weights into a jaxvit checkpoint (config.json + params.msgpack).

    python -m convert vit_base_patch16_224.orig_in21k_ft_in1k --out ckpt/vit_b16
    python -m convert model.safetensors --model-name vit_small_patch16_224 --out ckpt/vit_s16
    python -m convert ckpt/vit_s16 --to-timm out_dir          # back to timm safetensors

`jaxvit.load(out)` reads the result.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="timm hub name, .safetensors/.pth/.bin file, or a directory")
    parser.add_argument("--out", help="write a jaxvit checkpoint directory here")
    parser.add_argument("--to-timm", metavar="DIR", help="write timm model.safetensors + config.json here")
    parser.add_argument("--model-name", help="timm name of the weights when the source does not say")
    parser.add_argument("--img-size", type=int, nargs=2, metavar=("H", "W"),
                        help="resample position embeddings to this input size")
    args = parser.parse_args(argv)
    if not args.out and not args.to_timm:
        parser.error("say where to write: --out DIR (jaxvit) and/or --to-timm DIR (timm safetensors)")

    import convert
    import jaxvit

    try:
        model, params = convert.load(args.source, model_name=args.model_name,
                                     img_size=tuple(args.img_size) if args.img_size else None)
    except (OSError, ValueError, KeyError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = sum(np.size(x) for x in __import__("jax").tree_util.tree_leaves(params))
    cfg = model.config
    print(f"{cfg.name or 'model'}: {cfg.depth} blocks x {cfg.num_heads} heads, width {cfg.embed_dim}, "
          f"{cfg.img_size[0]}x{cfg.img_size[1]} / {cfg.patch_size}, {cfg.num_classes} classes, {n / 1e6:.1f}M params")
    for out, what, save in ((args.out, "the jaxvit checkpoint", jaxvit.save),
                            (args.to_timm, "the timm weights", lambda d, c, p: convert.save_timm(p, c, d))):
        if not out:
            continue
        try:
            print(f"wrote {save(out, cfg, params)}")
        except OSError as e:  # an unwritable or non-directory path: the OS says which, we say where
            print(f"error: cannot write {what} to {out}: {e.strerror or e}. Choose a writable directory.",
                  file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
