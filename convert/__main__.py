"""Convert ViT weights (timm, Google .npz, Hugging Face transformers, open_clip) into a jaxvit checkpoint.

    python -m convert vit_base_patch16_224.orig_in21k_ft_in1k --out ckpt/vit_b16
    python -m convert model.safetensors --model-name vit_small_patch16_224 --out ckpt/vit_s16
    python -m convert ViT-B_16.npz --out ckpt/vit_b16_jax                # Google's JAX checkpoint
    python -m convert google/vit-base-patch16-224 --out ckpt/hf_vit      # transformers (hub cache or folder)
    python -m convert ckpt/vit_s16 --to-timm out_dir          # back to timm safetensors

`jaxvit.load(out)` reads the result.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="timm hub name, Hugging Face hub repo id, .safetensors/.pth/.bin/.npz file, "
                                       "or a directory")
    parser.add_argument("--out", help="write a jaxvit checkpoint directory here")
    parser.add_argument("--to-timm", metavar="DIR", help="write timm model.safetensors + config.json here")
    parser.add_argument("--model-name", help="timm name of the weights when the source does not say (a Google .npz: "
                                             "or big_vision's 'B/16'; an open_clip state dict: its open_clip name)")
    parser.add_argument("--img-size", type=int, nargs=2, metavar=("H", "W"),
                        help="resample position embeddings to this input size")
    args = parser.parse_args(argv)
    if not args.out and not args.to_timm:
        parser.error("say where to write: --out DIR (jaxvit) and/or --to-timm DIR (timm safetensors)")
    # Both write a config.json: timm's over jaxvit's leaves a checkpoint that does not load, and
    # jaxvit's over timm's an export that timm cannot build.
    if args.out and args.to_timm and Path(args.out).resolve() == Path(args.to_timm).resolve():
        parser.error(f"--out and --to-timm are the same folder ({args.out}); both write a config.json: give "
                     "each its own folder")

    import convert
    import jaxvit

    clash = _config_clash(args.out, args.to_timm)
    if clash:
        print(f"error: {clash}", file=sys.stderr)
        return 2
    refusal = convert._model_name_refusal(args.source, args.model_name, "--model-name")
    if refusal:
        print(f"error: {refusal}", file=sys.stderr)
        return 2
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
    refusal = convert.timm_export_refusal(cfg) if args.to_timm else None
    if refusal:  # before anything is written
        print(f"error: {refusal}", file=sys.stderr)
        return 2
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


def _config_clash(out: str | None, to_timm: str | None) -> str | None:
    """Why writing there would replace the other format's config.json, or None."""
    import json

    import convert
    from jaxvit.checkpoint import CONFIG_FILE, is_timm_config

    if to_timm and convert._is_jaxvit_checkpoint(Path(to_timm)):
        return (f"--to-timm {to_timm} holds a jaxvit checkpoint, whose config.json the timm export would replace: "
                "choose another folder")
    if out and (Path(out) / CONFIG_FILE).is_file():
        try:
            timm_export = is_timm_config(json.loads((Path(out) / CONFIG_FILE).read_text()))
        except (OSError, ValueError):  # not a config either format reads: replacing it is fine
            timm_export = False
        if timm_export:
            return (f"--out {out} holds a timm export, whose config.json the jaxvit checkpoint would replace: "
                    "choose another folder")
    return None


if __name__ == "__main__":
    sys.exit(main())
