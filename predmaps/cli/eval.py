"""`predmaps eval`: the paper's perturbation and segmentation tests (after Chefer et al. 2021b).

    predmaps eval perturbation --model NAME|PATH --method M [--layer L] [--target pred|gt] --data PATH
                               [--batch-size N] [--limit N] [--json FILE] [--maps results.hdf5]
                               [--save-maps results.hdf5] [--mode both|positive|negative]
                               [--transform resize|timm] [--image-size N|HxW]
    predmaps eval segmentation --model NAME|PATH --method M [--layer L] --data gtsegs_ijcv.mat
                               [--batch-size N] [--limit N] [--json FILE] [--maps results.hdf5]
                               [--transform resize|timm] [--image-size N|HxW]
    predmaps eval digits [--model NAME|PATH] [--method M|all] [--layer L] [--target pred|gt]
                         [--scenes N] [--seed S] [--batch-size N] [--json FILE] [--markdown FILE]

`add_eval_parser(subparsers)` registers the `eval` subcommand; its handler returns an exit code
(0 ok, 2 for a missing or malformed data set, a bad option or model).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from jaxvit import safe_write
from predmaps.cli.common import MODEL_NAME_HELP, load_model, methods_help, nonnegative_int, positive_int


def _parse_option(text: str):
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--option takes KEY=VALUE (e.g. similarity=cosine); got {text!r}")
    low = value.lower()
    if low in ("true", "false"):
        return key, low == "true"
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, value


def _common(p: argparse.ArgumentParser, data_help: str) -> None:
    p.add_argument("--model", required=True, help="timm name (with its pretrained tag), checkpoint file or directory")
    p.add_argument("--model-name", help=MODEL_NAME_HELP)
    # Defaults of the options that shape computed maps are filled in by _cmd_eval, so that giving one
    # together with --maps (where it would be ignored) is an error.
    p.add_argument("--method", help="explanation method, " + methods_help() + " (default predicatt)")
    p.add_argument("--layer", type=int, help="prediction layer of prediction-map methods (default -1 = L)")
    p.add_argument("--option", dest="options", type=_parse_option, action="append", default=[], metavar="KEY=VALUE",
                   help="a method option, e.g. --option similarity=cosine (repeatable)")
    p.add_argument("--data", help=data_help)
    p.add_argument("--maps",
                   help="score precomputed maps from a results.hdf5 (Chefer's layout) instead of computing them")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--limit", type=int, help="evaluate only this many images (a deterministic subset)")
    p.add_argument("--subset", choices=("random", "first"), default="random",
                   help="with --limit: a seeded random subset kept in data order (default) or the first N")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the --subset random draw (default 0)")
    p.add_argument("--workers", type=positive_int, help="image loading threads (default: one per core, up to 32)")
    p.add_argument("--json", help="write every number to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _image_size(text: str) -> tuple[int, int]:
    h, sep, w = text.lower().partition("x")
    try:
        size = (int(h), int(w if sep else h))
    except ValueError:
        size = (0, 0)
    if min(size) < 1:
        raise argparse.ArgumentTypeError(f"--image-size takes N or HxW in pixels (e.g. 224 or 384x384); got {text!r}")
    return size


def _transform_option(p: argparse.ArgumentParser, more: str) -> None:
    p.add_argument("--transform", choices=("resize", "timm"),
                   help="resize: the protocol's plain bilinear resize to --image-size (default); timm: the "
                        f"model's eval transform at --image-size (crop_pct, centre crop, its interpolation){more}")
    p.add_argument("--image-size", type=_image_size, metavar="N|HxW",
                   help="the size images are explained at (default: the model's input size, 224 for the paper's "
                        "ViT-B/16)")


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Register `eval perturbation|segmentation` on `subparsers` (from `add_subparsers`)."""
    p = subparsers.add_parser("eval", help="the perturbation and segmentation tests (Chefer et al. 2021b protocol)",
                              description="The paper's evaluation: perturbation (ImageNet validation) and "
                                          "segmentation (ImageNet-Segmentation) tests after Chefer et al. 2021b, "
                                          "and the offline digit-scenes benchmark. `predmaps eval TEST --help` "
                                          "lists each test's options.")
    sub = p.add_subparsers(dest="eval_test", required=True)

    pp = sub.add_parser("perturbation", help="positive / negative perturbation AUC on ImageNet validation")
    _common(pp, "ImageNet validation: a class-folder tree ROOT/<wnid>/*.JPEG, or flat files with a label file")
    pp.add_argument("--target", choices=("pred", "gt"),
                    help="maps for the predicted class (Pred.) or the ground truth (Target); accuracy is always "
                         "against the ground truth (default pred)")
    pp.add_argument("--mode", choices=("both", "positive", "negative"), default="both",
                    help="which perturbation test: removing the most relevant pixels first (positive), the least "
                         "(negative), or both")
    pp.add_argument("--labels", help="label file of a flat image folder (see the layouts in the error message)")
    pp.add_argument("--class-order", choices=("imagenet", "sorted"), default="imagenet",
                    help="class folders: ImageNet-1k wnids in synset order (default), or any names numbered by "
                         "their sorted rank (torchvision ImageFolder)")
    _transform_option(pp, "")
    pp.add_argument("--normalization", choices=("protocol", "model"), default="protocol",
                    help="mean = std = 0.5 as the protocol (default), or the model's own mean/std")
    pp.add_argument("--save-maps", help="also write the computed maps as a results.hdf5 (Chefer's layout)")
    pp.set_defaults(fn=cmd_eval)

    ps = sub.add_parser("segmentation", help="pixel accuracy, mIoU and mAP on ImageNet-Segmentation")
    _common(ps, "ImageNet-Segmentation's gtsegs_ijcv.mat (or a folder holding it)")
    _transform_option(ps, "; each mask goes through the same resize and crop (nearest)")
    ps.add_argument("--normalization", choices=("protocol", "model"), default="protocol",
                    help="mean = std = 0.5 as the protocol (default), or the model's own mean/std")
    ps.set_defaults(fn=cmd_eval)

    pd = sub.add_parser("digits", help="every method on generated digit scenes with exact masks (offline)",
                        description="Segmentation, perturbation and class-specificity tests on scenes of the "
                                    "held-out UCI test digits (predmaps.evaluation.digit_scenes).")
    pd.add_argument("--model", help="a 10-class digits ViT (default: the one predmaps ships)")
    pd.add_argument("--model-name", help=MODEL_NAME_HELP)
    pd.add_argument("--method", default="all",
                    help="a method (" + methods_help() + "), or 'all' (default): every method at layer L plus "
                         "predicatt and prediction_map at L-1")
    pd.add_argument("--layer", type=int, default=-1, help="prediction layer for a single --method (default -1 = L)")
    pd.add_argument("--option", dest="options", type=_parse_option, action="append", default=[], metavar="KEY=VALUE",
                    help="a method option for a single --method (repeatable)")
    pd.add_argument("--target", choices=("pred", "gt"), default="pred",
                    help="perturbation maps for the predicted (default) or the true class")
    pd.add_argument("--scenes", type=int, default=1000, help="one-digit and two-digit scenes each (default 1000)")
    pd.add_argument("--seed", type=nonnegative_int, default=2024,
                    help="scene seed (default 2024, the published table's)")
    pd.add_argument("--batch-size", type=int, default=100, help="images per forward pass")
    pd.add_argument("--json", help="write every number to this JSON file")
    pd.add_argument("--markdown", help="write the table (with the command and the run's details) to this file")
    pd.add_argument("--quiet", action="store_true", help="no progress bar")
    pd.set_defaults(fn=cmd_eval)
    return p


def _method_text(method: str, layer, depth: int) -> str:
    if layer is None:
        return method
    from predmaps.core import layer_name

    name = layer_name(layer, depth)
    return f"{method} (layer {layer} = {name})"


def _write_json(path: str, payload: dict) -> None:
    out = Path(path)
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    safe_write.write_text(out, json.dumps(payload, indent=2, default=float) + "\n")


def cmd_eval(args) -> int:
    from predmaps import evaluation as ev

    try:
        return _cmd_eval(args, ev)
    except ev.DataLayoutError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ValueError, KeyError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _check_writable(path: str, flag: str) -> None:
    """Fail now if `path` cannot be written (its folder is created, as the writers do)."""
    out = Path(path)
    try:  # the writers rename a new file onto the name: what must be writable is the folder
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.is_dir():
            raise IsADirectoryError(21, "is a folder")
        probe = out.parent / safe_write.temp_name("probe")
        os.close(safe_write.create_new(probe))
        probe.unlink()
    except OSError as e:
        raise ValueError(f"{flag} {path} cannot be written ({e.strerror or e}); choose another path") from None


def _check_outputs(args, flags) -> None:
    """The output files of a run, checked before hours of computing rather than after."""
    for flag in flags:
        if getattr(args, flag, None):
            _check_writable(getattr(args, flag), "--" + flag.replace("_", "-"))


def _check_maps_options(args, test: str) -> None:
    """With --maps the maps are given, so the options that would compute them are an error, not
    silently ignored; without it, their defaults are filled in here."""
    computing = {"--method": args.method, "--layer": args.layer, "--option": args.options or None}
    if test == "perturbation":  # the images and labels come from the results.hdf5 as well
        computing.update({"--target": args.target, "--transform": args.transform, "--save-maps": args.save_maps,
                          "--data": args.data, "--labels": args.labels, "--image-size": args.image_size})
    if args.maps is not None:
        given = [flag for flag, value in computing.items() if value is not None]
        if given:
            source = "maps, images and labels" if test == "perturbation" else "maps"
            raise ValueError(f"--maps reads the {source} from {args.maps}, so {', '.join(given)} would be ignored; "
                             "drop them (they apply when this command computes the maps)")
    args.method = args.method or "predicatt"
    args.layer = -1 if args.layer is None else args.layer
    args.transform = args.transform or "resize"
    if test == "perturbation":
        args.target = args.target or "pred"


def _cmd_eval(args, ev) -> int:
    test = args.eval_test
    if test == "digits":
        return _cmd_digits(args)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be positive; got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be positive; got {args.limit}")
    if args.maps is None and args.data is None:
        raise ValueError(f"eval {test} needs --data" + (" (or --maps results.hdf5)" if test == "perturbation" else ""))
    if test == "segmentation" and args.data is None:
        raise ValueError("eval segmentation needs --data gtsegs_ijcv.mat (the masks), also with --maps")
    _check_maps_options(args, test)
    _check_outputs(args, ("json", "save_maps"))
    # What needs no model is checked before it loads (it may download): the label file's lines, then the data
    # folder, in the order `predmaps run` reads them. The images are listed once the model's class count is
    # known, every label checked against it as run checks it, so both refuse bad labels with one message.
    images = seg = labels = None
    if test == "perturbation" and args.maps is None:
        from predmaps.data import imagenet_root, parse_label_file

        if args.labels is not None:
            labels = parse_label_file(args.labels)  # read once: listing and the range check use these lines
        imagenet_root(args.data)
    if test == "segmentation":
        seg = ev.ImageNetSegmentation(args.data)
    maps_reader = ev.CheferResults(args.maps) if (args.maps and test == "perturbation") else None

    model, params = load_model(args.model, args.model_name)
    cfg = model.config
    if test == "perturbation" and args.maps is None:
        images = ev.imagenet_val(args.data, labels_file=labels, class_order=args.class_order, limit=args.limit,
                                 subset=args.subset, seed=args.seed, num_classes=cfg.num_classes)
    options = dict(args.options)
    if args.normalization == "model":
        mean, std = tuple(cfg.mean), tuple(cfg.std)
    else:
        mean, std = ev.PROTOCOL_MEAN, ev.PROTOCOL_STD
    progress = not args.quiet
    header = {"model": args.model, "model_name": cfg.name, "data": args.data, "maps": args.maps}

    if test == "perturbation":
        modes = ev.MODES if args.mode == "both" else (args.mode,)
        if maps_reader is not None:
            with maps_reader:
                idx = ev.subset_indices(len(maps_reader), args.limit, mode=args.subset, seed=args.seed)
                res = ev.score_maps(model, params, maps_reader, None, None, modes=modes, batch_size=args.batch_size,
                                    mean=mean, std=std, indices=idx, progress=progress)
            res.info.update(method=None, layer=None, target=None, note="maps read from --maps; method/target are "
                            "whatever produced them")
        else:
            res = ev.perturbation_test(model, params, images, method=args.method, layer=args.layer, target=args.target,
                                       modes=modes, batch_size=args.batch_size, transform=args.transform,
                                       image_size=args.image_size, mean=mean,
                                       std=std, method_options=options, workers=args.workers, progress=progress,
                                       save_maps=args.save_maps)
            res.info.update(layout=images.layout, class_order=images.class_order, save_maps=args.save_maps)
        res.info.update(limit=args.limit, subset=args.subset if args.limit else None,
                        seed=args.seed if args.limit and args.subset == "random" else None)
        what = ("maps from " + args.maps) if args.maps else (
            _method_text(args.method, res.info.get("layer"), cfg.depth)
            + f", maps for the {'predicted' if args.target == 'pred' else 'ground-truth'} class")
        print(f"perturbation test: {cfg.name or args.model}, {what}, {res.n} images")
    else:
        with seg:
            res = ev.segmentation_test(model, params, seg, method=args.method, layer=args.layer,
                                       batch_size=args.batch_size, limit=args.limit, subset=args.subset,
                                       seed=args.seed, transform=args.transform, image_size=args.image_size,
                                       mean=mean, std=std,
                                       method_options=options, maps=args.maps,
                                       workers=args.workers, progress=progress)
        what = ("maps from " + args.maps) if args.maps else (
            _method_text(args.method, res.info.get("layer"), cfg.depth) + ", maps for the predicted class")
        print(f"segmentation test: {cfg.name or args.model}, {what}, {res.n} images")
    print(res.table())
    unreadable = res.info.get("unreadable") or []
    if unreadable:
        print(f"skipped {len(unreadable)} unreadable image(s), not counted in the {res.n} above"
              + (" (listed in the JSON)" if args.json else "") + f"; the first: {unreadable[0]['error']}",
              file=sys.stderr)
    rate = res.info.get("images_per_second")
    if rate:
        print(f"{res.info['seconds']:.1f} s ({rate:.1f} img/s after the first batch, which took "
              f"{res.info['first_batch_seconds']:.1f} s with compilation)")
    if args.json:
        _write_json(args.json, {**header, **res.to_dict()})
        print(f"results: {args.json}")
    return 0


def _cmd_digits(args) -> int:
    import shlex
    import time

    from predmaps.evaluation import digit_scenes

    if args.scenes < 1:
        raise ValueError(f"--scenes must be positive; got {args.scenes}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be positive; got {args.batch_size}")
    _check_outputs(args, ("json", "markdown"))
    if args.method == "all":
        if args.options or args.layer != -1:
            raise ValueError("--layer and --option apply to a single --method, not to 'all'")
        rows = None
    else:
        rows = [(args.method, args.layer)]
    model, params = load_model(args.model, args.model_name)  # None: the embedded digits ViT
    t0 = time.perf_counter()
    res = digit_scenes.run_benchmark(model, params, rows=rows, scenes=args.scenes, seed=args.seed,
                                     batch_size=args.batch_size, target=args.target,
                                     method_options=dict(args.options) or None, progress=not args.quiet)
    seconds = time.perf_counter() - t0
    info = res.info
    summary = (f"{info['scenes']} one-digit and {info['scenes']} two-digit scenes of the held-out test digits "
               f"(seed {info['seed']}); model {info['model']}: one-digit accuracy "
               f"{100 * info['one_digit_accuracy']:.2f}%, two-digit scenes with both classes in the top two "
               f"{100 * info['two_digit_top2']:.2f}%")
    print(f"digit-scenes benchmark: {summary}")
    print(res.markdown())
    print(f"{seconds:.0f} s")
    if args.json:
        _write_json(args.json, {"model_source": args.model or "predmaps default (predmaps/assets/vit_digits_patch8_64)",
                                "seconds": seconds, **res.to_dict()})
        print(f"results: {args.json}")
    if args.markdown:
        import datetime
        import os
        import platform

        import jax

        from predmaps.machine import cpu_name

        argv = _digits_command(args)
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        text = f"""# Digit-scenes benchmark

{summary}.

Regenerate:

    {shlex.join(argv)}

Columns (definitions: `predmaps/evaluation/digit_scenes.py`):
- segmentation on one-digit scenes, the map of the predicted class against the digit's pixels:
  pixel accuracy, mIoU, mAP in % (the ImageNet-Segmentation protocol);
- perturbation on the same scenes, maps for the {'predicted' if args.target == 'pred' else 'true'} class:
  AUC x 100 of the accuracy as the most (positive) or least (negative) relevant pixels are zeroed;
- class specificity on two-digit scenes, the map of each of the two classes: the mean share of its
  non-negative mass on its own digit (of the mass on both digits), and how often it puts more mass on
  its own digit than on the other (ties count one half). Class-agnostic methods are at 0.5 by construction.

{res.markdown()}

Run: {date}, {os.cpu_count()}-core CPU ({cpu_name()}), {platform.system()} {platform.machine()}, jax {jax.__version__}
on {jax.default_backend()}, float32, batch {args.batch_size}; {seconds:.0f} s for all rows.
"""
        out = Path(args.markdown)
        out.parent.mkdir(parents=True, exist_ok=True)
        safe_write.write_text(out, text)
        print(f"table: {args.markdown}")
    return 0


def _digits_command(args) -> list[str]:
    """The command that regenerates this run (every option that decides a number)."""
    argv = ["predmaps", "eval", "digits"]
    if args.model:
        argv += ["--model", args.model]
    argv += ["--method", args.method]
    if args.method != "all":
        argv += ["--layer", str(args.layer)] + [f"--option={k}={v}" for k, v in args.options]
    argv += ["--target", args.target, "--scenes", str(args.scenes), "--seed", str(args.seed),
             "--batch-size", str(args.batch_size)]
    if args.json:
        argv += ["--json", args.json]
    return argv + ["--markdown", args.markdown]
