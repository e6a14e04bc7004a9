"""The `predmaps` command.

    predmaps demo [--out DIR]                       # offline: the embedded digit-scenes ViT
    predmaps explain IMAGE... [--model NAME|PATH] [--classes top5|281,285] [--method predicatt]
                     [--layers -1,-2] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
import time
from importlib import resources
from pathlib import Path

import numpy as np

DEFAULT_MODEL = "vit_digits_patch8_64"


def default_model_path() -> Path:
    """The embedded default: a small ViT trained on digit scenes (predmaps/assets)."""
    return Path(str(resources.files("predmaps").joinpath("assets", DEFAULT_MODEL)))


def load_model(spec: str | None):
    import convert

    if spec is None or spec == DEFAULT_MODEL:
        return convert.load(default_model_path())
    return convert.load(spec)


def _parse_layers(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers takes comma-separated integers like -1,-2; got {text!r}") from None


def _parse_classes(text: str):
    if text == "all" or text.startswith("top"):
        return text
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--classes takes top, topK, all or indices like 281,285; got {text!r}") \
            from None


def _write_explanations(model, params, images_unit, images_norm, names, target, method, layers, out: Path,
                        cmap: str, shared_scale: bool) -> list[str]:
    """Explain a batch, write one PNG per (image, class, layer); return summary lines."""
    import predmaps
    from predmaps import viz

    cfg = model.config
    lines = []
    exs = {layer: predmaps.explain(model, params, images_norm, method=method, target=target, layer=layer)
           for layer in layers}
    first = exs[layers[0]]
    probs = np.asarray(__import__("jax").nn.softmax(first.logits, -1))
    for i, name in enumerate(names):
        top = np.argsort(-probs[i])[:5]
        lines.append(f"{name}: " + ", ".join(f"{cfg.class_name(c)} {probs[i, c]:.3f}" for c in top))
        tiles, titles = [], []
        base = (images_unit[i] * 255 + 0.5).astype(np.uint8)
        for layer, ex in exs.items():
            maps = np.asarray(ex.maps[i])
            lo, hi = (float(maps.min()), float(maps.max())) if shared_scale else (None, None)
            for k, c in enumerate(np.asarray(ex.classes[i])):
                img = viz.overlay(base, maps[k], cmap=cmap, vmin=lo, vmax=hi)
                stem = f"{Path(name).stem}_{method}_L{layer}_{cfg.class_name(c).replace(' ', '_').replace('/', '_')}"
                img.save(out / f"{stem}.png")
                tiles.append(img)
                titles.append(f"{cfg.class_name(c)} L{layer}")
        viz.grid(tiles, titles, columns=len(tiles) // len(layers), cell=max(128, base.shape[0])).save(
            out / f"{Path(name).stem}_{method}_grid.png")
    return lines


def cmd_explain(args) -> int:
    from jaxvit import preprocess

    model, params = load_model(args.model)
    cfg = model.config
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    transform = preprocess.eval_transform_for(cfg)
    ok, names, errors = [], [], []
    for path in args.images:
        try:
            img = preprocess.load_image(path)
            ok.append(transform(img))
            names.append(path)
        except preprocess.ImageLoadError as e:
            errors.append(str(e))
            print(f"skipped: {e}", file=sys.stderr)
    if not ok:
        print("error: no readable image", file=sys.stderr)
        return 2
    x = np.stack(ok)
    unit = np.clip(x * np.asarray(cfg.std) + np.asarray(cfg.mean), 0, 1)
    t0 = time.perf_counter()
    try:
        lines = _write_explanations(model, params, unit, x, names, args.classes, args.method, args.layers, out,
                                    args.cmap, args.shared_scale)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    print(f"{len(names)} image(s) explained in {time.perf_counter() - t0:.1f}s; overlays in {out}"
          + (f"; {len(errors)} skipped" if errors else ""))
    return 1 if errors and args.strict else 0


def cmd_demo(args) -> int:
    from predmaps import digits

    model, params = load_model(None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images, labels, _ = digits.two_digit_scenes(args.n, split="test", seed=args.seed)
    x = digits.normalize(images)
    unit = images.astype(np.float32) / 255.0
    names = [f"scene{i}_digits_{a}_{b}.png" for i, (a, b) in enumerate(labels)]
    for name, img in zip(names, images):
        __import__("PIL.Image").Image.fromarray(img).save(out / name)
    lines = _write_explanations(model, params, unit, x, names, np.asarray(labels), "predicatt", [-1, -2], out,
                                "jet", False)
    for method in ("raw_attention", "rollout"):
        _write_explanations(model, params, unit, x, names, "top", method, [-1], out, "jet", False)
    print("\n".join(lines))
    print(f"demo: PredicAtt_L and PredicAtt_(L-1) for both digits of {args.n} two-digit scenes, beside raw "
          f"attention and rollout")
    print(f"report: {out.resolve()}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="predmaps", description="Prediction maps and PredicAtt for ViTs, in JAX")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("explain", help="explain images with a timm ViT; writes PNG overlays")
    p.add_argument("images", nargs="+")
    p.add_argument("--model", help=f"timm name, checkpoint file or directory (default: the embedded {DEFAULT_MODEL})")
    p.add_argument("--classes", type=_parse_classes, default="top", help="top, topK, all, or indices like 281,285")
    p.add_argument("--method", default="predicatt")
    p.add_argument("--layers", type=_parse_layers, default=[-1], help="prediction layers, e.g. -1,-2")
    p.add_argument("--out", default="predmaps-out")
    p.add_argument("--cmap", default="jet")
    p.add_argument("--shared-scale", action="store_true", help="one colour scale for all maps of an image")
    p.add_argument("--strict", action="store_true", help="exit non-zero if any image could not be read")
    p.set_defaults(fn=cmd_explain)

    p = sub.add_parser("demo", help="explain generated two-digit scenes with the embedded model (offline)")
    p.add_argument("--out", default="predmaps-demo")
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_demo)

    from predmaps.eval_cli import add_eval_parser
    from predmaps.run_cli import add_run_parser

    add_eval_parser(sub)
    add_run_parser(sub)

    argv = list(sys.argv[1:] if argv is None else argv)
    for i in range(len(argv) - 1):  # "--layers -1,-2": argparse would take -1,-2 for an option
        if argv[i] == "--layers" and argv[i + 1].startswith("-"):
            argv[i:i + 2] = [f"--layers={argv[i + 1]}", ""]
    args = parser.parse_args([a for a in argv if a != ""])
    try:
        return args.fn(args)
    except (OSError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
