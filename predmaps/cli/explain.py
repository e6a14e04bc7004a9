"""`predmaps explain` and `predmaps demo`.

    predmaps demo [--out DIR]                       # offline: the embedded digit-scenes ViT
    predmaps explain IMAGE... [--model NAME|PATH [--model-name NAME]] [--classes top5|281,285]
                     [--method predicatt] [--layers -1,-2] [--labels 3,7] [--cmap jet] [--alpha 0.5]
                     [--shared-scale] [--out DIR]
    predmaps explain PHOTO... --model CLIP_CHECKPOINT --text PROMPT [--text PROMPT ...] [--layers -2] [--out DIR]
    predmaps explain --text "..." [--text-file FILE] --model TEXT_CLASSIFIER [--json]   # predmaps.cli.text
    predmaps demo --text                            # offline: the shipped text classifier

Both write PNG overlays into --out and a self-contained HTML report (no script, images embedded)
into --out/report: index.html, one page per image (see `predmaps.report`).
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import resources
from pathlib import Path

import numpy as np

from predmaps.cli.common import (DEFAULT_MODEL, MODEL_NAME_HELP, catch_signals, check_class_options, check_out,
                                 check_view_options, exit_status, load_model, make_out, methods_help, nonnegative_int,
                                 parse_layers, positive_int, restore_signals)


def _parse_classes(text: str):
    if text == "all" or re.fullmatch(r"top\d*", text):
        return text
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--classes takes top, topK, all or indices like 281,285; got {text!r}") \
            from None


def _parse_labels(text: str) -> list[list[int]]:
    from predmaps.data.labels import LabelFileError, parse_label

    try:  # a class index or an ImageNet WordNet id, as a label file gives them (predmaps.data.labels)
        rows = [[parse_label(v) for v in item.split("+")] for item in text.split(",")]
    except LabelFileError as e:
        raise argparse.ArgumentTypeError(f"--labels: {e}") from None
    if any(v is None for row in rows for v in row):
        raise argparse.ArgumentTypeError(f"--labels takes one class index per image like 3,7 (several for one image: "
                                         f"3+7); got {text!r}")
    return rows



def _label_array(rows: list[list[int]]) -> np.ndarray:
    """Ragged per-image label lists -> (b, M) int, -1 where an image has fewer labels."""
    rows = [list(dict.fromkeys(r)) for r in rows]  # a repeated label would count twice in the accuracy
    m = max(len(r) for r in rows)
    return np.asarray([r + [-1] * (m - len(r)) for r in rows], np.int64)



def _report_options(args, **overrides):
    from predmaps import report

    fields = dict(target=args.classes, method=args.method, layers=tuple(args.layers), map_class=args.map_class,
                  cmap=args.cmap, alpha=args.alpha, shared_scale=args.shared_scale, top_k=args.top_k,
                  heads=args.heads, batch_size=args.batch_size)
    fields.update(overrides)
    return report.ReportOptions(**fields)


def _run_report(model, params, batches, out: Path, options, png_layers, progress: dict | None = None):
    """The explain flow shared by `explain` and `demo`: the HTML report under out/report, and the
    stand-alone PNG overlays of the requested method and layers in out/. progress["report"]: the
    report folder, once the report is begun."""
    from predmaps import report

    names = report.PngNames()
    if progress is not None:
        progress["report"] = out / "report"

    def pngs(r):
        stem, why = names.stem_and_note(r.name)
        if why:
            print(f"note: {r.name} has {why}; its overlays are {stem}_*.png", file=sys.stderr)
        report.write_pngs(r, model.config, out, options.method, png_layers, cmap=options.cmap, alpha=options.alpha,
                          shared_scale=options.shared_scale, stem=stem)

    from jaxvit import safe_write

    folder = safe_write.make_dir(out / "report", own=True)  # a symlinked report/ is refused, never written into
    return report.write_report(model, params, batches, folder, options, on_result=pngs)


def cmd_explain(args) -> int:
    return _interruptible(_explain, args)


def _interruptible(command, args) -> int:
    """command(args, progress) with Ctrl-C anywhere as one line and exit 130, as in `predmaps run`,
    never a traceback; once the report is begun, write_report has written an index of the pages
    finished before it re-raises."""
    previous = catch_signals()  # Ctrl-C and SIGTERM alike
    progress = {}
    try:
        return command(args, progress)
    except KeyboardInterrupt:
        if "report" in progress:
            print(f"interrupted: the pages finished are kept, listed in {progress['report'] / 'index.html'} "
                  "(marked incomplete)", file=sys.stderr)
        else:
            print("interrupted before any image was explained", file=sys.stderr)
        return exit_status()
    finally:
        restore_signals(previous)


def _explain(args, progress: dict) -> int:
    import itertools

    from jaxvit import preprocess
    from predmaps import report
    from predmaps.data import load_images

    if getattr(args, "text", None) is not None or getattr(args, "text_file", None) is not None:
        # --text: prompts for a CLIP model (predmaps.cli.clip, A.5) or texts for a text classifier (predmaps.cli.text,
        # A.4); the checkpoint decides which
        from predmaps.cli import text as text_cli
        from predmaps.cli.clip import explain_clip, is_clip_checkpoint, text_refusal

        try:
            if args.text_file is None and is_clip_checkpoint(args.model):
                return explain_clip(args, progress)
        except ValueError as e:  # an unreadable weights file
            print(f"error: {e}", file=sys.stderr)
            return 2
        if args.layers is None:
            args.layers = [-1]
        if text_cli.is_text_model(args.model):
            return text_cli.explain_texts(args, progress)
        print(f"error: {text_refusal(args.model)}", file=sys.stderr)
        return 2
    if args.layers is None:  # None only to tell CLIP's default (-2) apart
        args.layers = [-1]
    if not args.images:
        print("error: no image given: name image files (or --text with a text classifier or CLIP --model)",
              file=sys.stderr)
        return 2
    if args.json:  # as CLIP and text refuse the image options: an option that would do nothing is an error
        print("error: --json writes a text classifier's maps (with --text); for images the maps are the PNGs and the "
              "report in --out, and `predmaps run` writes them as data: leave --json out", file=sys.stderr)
        return 2
    if args.classes is None:  # the default for images; a text classifier's is all its classes
        args.classes = "top"
    if args.labels is not None and len(args.labels) != len(args.images):
        print(f"error: --labels gives {len(args.labels)} label(s) for {len(args.images)} image(s); give one per "
              "image, in order", file=sys.stderr)
        return 2
    try:  # before the model loads (seconds, or a download)
        check_view_options(args)
        check_out(args.out)
        from predmaps.request import layer_ignored

        if any(layer_ignored(args.method, layer) for layer in args.layers):  # request.check's rule, before the model
            raise ValueError(f"--layers: {args.method} takes no prediction layer (it reads the attention of every "
                             "block it needs), so its overlays would ignore it; leave --layers out")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        model, params = load_model(args.model, args.model_name)
    except ValueError as e:  # the checkpoint formats' errors (CheckpointMismatchError, ...) say what to do
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = model.config
    from predmaps.core import layer_index

    try:
        for layer in args.layers:
            layer_index(layer, cfg.depth)
    except ValueError as e:
        print(f"error: --layers: {e}", file=sys.stderr)
        return 2
    try:
        from predmaps.data import check_label

        for c in [c for row in args.labels or () for c in row]:  # the range rule (and message) of run and eval
            check_label(c, cfg.num_classes, "--labels")
        check_class_options(args, cfg.num_classes)
        out = make_out(args.out)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    transform = preprocess.eval_transform_for(cfg)
    size = max(1, min(args.batch_size, len(args.images)))
    errors = []
    mean, std = np.asarray(cfg.mean, np.float32), np.asarray(cfg.std, np.float32)

    def make(buf):
        x = np.stack([b[1] for b in buf])
        labels = None if args.labels is None else _label_array([b[2] for b in buf])
        return report.Batch(names=[b[0] for b in buf], images=np.clip(x * std + mean, 0, 1), inputs=x, labels=labels,
                            captions=[report.input_caption(*b[3], cfg) for b in buf])

    def batches():  # read lazily, one batch at a time: a run over many images stays bounded in memory
        buf = []
        for i, (path, x, image_size, e) in enumerate(load_images(args.images, transform, window=2 * size)):
            if e is not None:  # decoded ahead on the data layer's pool
                reason = str(e) if str(path) in str(e) else f"{path}: {e}"  # a transform's error names no file
                errors.append(reason)
                print(f"skipped: {reason}", file=sys.stderr)
                continue
            buf.append((path, x, None if args.labels is None else args.labels[i], image_size))
            if len(buf) == size:
                yield make(buf)
                buf = []
        if buf:
            yield make(buf)

    it = batches()
    first = next(it, None)
    if first is None:
        print("error: no readable image", file=sys.stderr)
        return 2
    options = _report_options(args, batch_size=size, model_name=args.model or DEFAULT_MODEL)
    try:
        rep = _run_report(model, params, itertools.chain([first], it), out, options, args.layers, progress)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(rep.lines))
    print(f"{len(rep.lines)} image(s) explained in {rep.seconds:.1f}s; overlays in {out}"
          + (f"; {len(errors)} skipped" if errors else ""))
    print(f"report: {rep.index.resolve()}")
    return 1 if errors and args.strict else 0


def cmd_demo(args) -> int:
    return _interruptible(_demo, args)


def demo_photos() -> list[Path]:
    """The bundled real photos of `predmaps demo --model` (CC0 / public domain: assets/photos/LICENSE.md)."""
    folder = Path(str(resources.files("predmaps").joinpath("assets", "photos")))
    return sorted(folder.glob("*.jpg"))


# What `predmaps demo` says about the real-photo demo it did not run (offline, no model given).
REAL_PHOTOS_HINT = ("to see the maps on real photos with a real ViT: predmaps demo --model "
                    "vit_base_patch16_224.augreg2_in21k_ft_in1k (a hub name, or a local checkpoint)")


def _demo(args, progress: dict) -> int:
    from PIL import Image

    from jaxvit import safe_write
    from predmaps import digits, report

    if args.text:  # the shipped text classifier on bundled sentences
        from predmaps.cli.text import demo_text

        return demo_text(args, progress)
    if args.model is not None:  # real photos, the model's own top classes
        # explain's own parser, so every option explain reads has explain's default
        parser = argparse.ArgumentParser(prog="predmaps")
        add_explain_parser(parser.add_subparsers())
        argv = ["explain", *map(str, demo_photos()), "--model", args.model, "--classes", "top3", "--layers=-1,-2",
                "--cmap", args.cmap, "--alpha", str(args.alpha), "--strict", "--out", args.out]
        ns = parser.parse_args(argv + ([] if args.model_name is None else ["--model-name", args.model_name]))
        return _explain(ns, progress)
    try:  # before anything is written
        check_view_options(args)
        out = make_out(args.out)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"demo: writing scenes, PNG overlays and an HTML report to {out.resolve()}", flush=True)
    model, params = load_model(None)
    try:
        scenes = safe_write.make_dir(out / "scenes", own=True)
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    images, labels, _ = digits.two_digit_scenes(args.n, split="test", seed=args.seed)
    names = [f"scene{i}_digits_{a}_{b}.png" for i, (a, b) in enumerate(labels)]
    for name, img in zip(names, images):
        report.save_png(Image.fromarray(img), scenes / name)
    size = min(8, args.n)
    batches = [report.Batch(names=names[i:i + size], images=images[i:i + size],
                            inputs=digits.normalize(images[i:i + size]), labels=labels[i:i + size],
                            targets=labels[i:i + size]) for i in range(0, args.n, size)]
    options = report.ReportOptions(
        target=None, method="predicatt", layers=(-1, -2), cmap=args.cmap, alpha=args.alpha, batch_size=size,
        title="predmaps demo: two-digit scenes", model_name=f"{DEFAULT_MODEL} (embedded)",
        label_note="top-1 prediction is one of the scene's two digits", trust_note=digits.trust_note())
    try:
        rep = _run_report(model, params, batches, out, options, [-1, -2], progress)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(rep.lines))
    print(f"demo: PredicAtt_L and PredicAtt_(L-1) for both digits of {args.n} two-digit scene(s), beside raw "
          f"attention and rollout; prediction maps at every layer, heads ranked by alpha~, per-layer statistics "
          f"({rep.seconds:.1f}s). Scenes and PNG overlays in {out.resolve()}")
    print(f"report: {rep.index.resolve()}")
    print(REAL_PHOTOS_HINT)
    return 0



def add_explain_parser(subparsers) -> argparse.ArgumentParser:
    """Register `explain` on `subparsers` (from `add_subparsers`)."""
    p = subparsers.add_parser("explain", help="explain images with a ViT; writes PNG overlays and an HTML report")
    p.add_argument("images", nargs="*", help="image files (any format PIL reads)")
    p.add_argument("--model", help=f"timm name, checkpoint file or directory (default: the embedded {DEFAULT_MODEL})")
    p.add_argument("--model-name", help=MODEL_NAME_HELP)
    p.add_argument("--classes", type=_parse_classes, help="top, topK (e.g. top5), all, or class indices like 281,285 "
                   "(default: top); for --text, default all of a text classifier's classes (top3 past 10)")
    p.add_argument("--method", default="predicatt", help="the method of the PNG overlays and the report's extra "
                   "columns (the report always shows PredicAtt_L, PredicAtt_L-1, raw attention and rollout): "
                   + methods_help() + "; for --text, a text page's maps beside PredicAtt_L: any of these but the "
                   "LRP methods (transattr, lrp, partial_lrp)")
    p.add_argument("--layers", type=parse_layers, help="prediction layers, 0..L or negative from the end, e.g. -1,-2 "
                   "(default: -1); with --text and a CLIP model, one token layer (there -2 unless given: the "
                   "penultimate, as the paper's Fig. 18)")
    p.add_argument("--labels", type=_parse_labels, help="ground truth, one class index (or ImageNet WordNet id) "
                   "per image, e.g. 3,7 (3+7: two labels for one image); adds per-layer accuracy, confidence and "
                   "entropy plots")
    p.add_argument("--map-class", type=int, help="the class whose prediction map the report shows at every layer "
                   "(default: each image's first explained class)")
    p.add_argument("--out", default="predmaps-out", help="output folder (created): PNG overlays, report/index.html")
    p.add_argument("--cmap", default="jet", help="matplotlib colour map")
    p.add_argument("--alpha", type=float, default=0.5, help="heat-map opacity over the image, 0..1")
    p.add_argument("--shared-scale", action="store_true",
                   help="one colour scale per method for all maps of an image (default: each map its own min-max)")
    p.add_argument("--top-k", type=positive_int, default=5, help="predictions listed in the report")
    p.add_argument("--heads", type=positive_int, default=4, help="most and least contributing heads shown per class")
    p.add_argument("--batch-size", type=positive_int, default=8, help="images per forward pass")
    p.add_argument("--strict", action="store_true", help="exit non-zero if any image could not be read")
    p.add_argument("--text", action="append", metavar="TEXT", help="repeat for more. With a text classifier --model "
                   "(transformers BERT, RoBERTa or DistilBERT): a text to explain, its page colouring the words per "
                   "class. With a CLIP --model (open_clip or transformers CLIPModel, both towers): a prompt; writes "
                   "one inverted text-to-patch similarity map per photo and prompt, every layer's maps and clip.json "
                   "into --out (the paper's A.5)")
    p.add_argument("--text-file", metavar="FILE", help="texts to explain, one a line (UTF-8; empty lines skipped)")
    p.add_argument("--json", action="store_true", help="texts: also write tokens, offsets, words and every map to "
                   "--out/text_maps.json")
    p.set_defaults(fn=cmd_explain)
    return p


def add_demo_parser(subparsers) -> argparse.ArgumentParser:
    """Register `demo` on `subparsers` (from `add_subparsers`)."""
    p = subparsers.add_parser("demo", help="explain generated two-digit scenes with the embedded model (offline); "
                       "writes the HTML report and prints its path",
                       description="Explains generated two-digit scenes with the embedded digit ViT, offline, and "
                                   "writes the scenes, PNG overlays and an HTML report into --out (predmaps-demo/ "
                                   "in the current directory unless given); with --model, three bundled real "
                                   "photos explained by that ImageNet ViT instead.")
    p.add_argument("--out", default="predmaps-demo", help="output folder (created; relative to the current directory)")
    p.add_argument("--model", help="explain three bundled real photos (a cat, a coffee cup, a rocket launch) "
                   "with this ImageNet ViT instead: timm name (with its pretrained tag), checkpoint file or "
                   "directory (default: the embedded digit-scenes model on generated scenes)")
    p.add_argument("--model-name", help=MODEL_NAME_HELP)
    p.add_argument("--text", action="store_true", help="explain bundled sentences with the shipped sentiment "
                   "classifier instead (offline), or with --model's text classifier")
    p.add_argument("--n", type=positive_int, default=4, help="number of scenes")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="scene seed")
    p.add_argument("--cmap", default="jet", help="matplotlib colour map")
    p.add_argument("--alpha", type=float, default=0.5, help="heat-map opacity over the image, 0..1")
    p.set_defaults(fn=cmd_demo)
    return p
