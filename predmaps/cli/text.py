"""`predmaps explain --text` with a text classifier, and `predmaps demo --text`.

    predmaps explain --text "a wonderful film" [--text ...] [--text-file FILE] --model CHECKPOINT
                     [--method predicatt] [--layers -1] [--classes all|top2|0,1] [--shared-scale] [--json] [--out DIR]
    predmaps demo --text [--out DIR]        # offline: the shipped text classifier on bundled sentences

The model decides: a transformers sequence-classification checkpoint (`convert.hf_text.is_text_checkpoint`)
explains the texts; the report (one page per text, the words coloured per class) goes to --out/report and,
with --json, every map to --out/text_maps.json (`predmaps.report.text`).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from predmaps.cli import common

# What `predmaps demo --text` explains: sentences in the shipped model's own vocabulary (the neutral filler
# and VADER-rated words it was trained on, predmaps/sentiment.py), one or both polarities; on words it never
# saw ("the plot was ... dull") that model is confidently wrong, which a demo should not show as typical.
DEMO_SENTENCES = (
    "the wonderful garden stood beside the river on monday",
    "a horrible train waited behind the station at noon",
    "the great and lovely garden stood beside the broken bridge",
    "a horrible and stupid train waited beside the wonderful station at noon",
    "we walked past the ruined tower and the terrified village this morning",
)
JSON_NAME = "text_maps.json"
# Classes explained when --classes is not given: every class of a model with up to this many.
ALL_CLASSES_UP_TO = 10


def is_text_model(spec) -> bool:
    """Whether --model names a text classifier checkpoint (config.json says so)."""
    from convert.hf_text import is_text_checkpoint

    return spec is not None and is_text_checkpoint(spec)


def read_texts(args) -> tuple[list[str], int]:
    """--text values then --text-file lines (one text a line) -> (texts, empty lines skipped); ValueError
    naming the empty --text or the unreadable file."""
    texts = []
    for i, t in enumerate(args.text or []):
        if not t.strip():
            raise ValueError(f"--text {i + 1} is empty: give at least one word to explain")
        texts.append(t)
    skipped = 0
    if args.text_file is not None:
        path = Path(args.text_file)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise ValueError(f"--text-file {path} is not UTF-8 text; save it as UTF-8, one text a line") from None
        except OSError as e:
            raise ValueError(f"--text-file {path}: {e.strerror or e}") from None
        for line in lines:
            if line.strip():
                texts.append(line)
            else:
                skipped += 1
    if not texts:
        raise ValueError("no text to explain: --text is empty and --text-file holds only empty lines" if
                         args.text_file is not None else "no text to explain: give --text or --text-file")
    return texts, skipped


def check_tokenisable(tokenizer, texts: list[str], size: int) -> None:
    """Tokenise the texts batch by batch before anything is written: the tokenizer's ValueError (a text
    with no tokens, ids past the model's vocabulary) numbered as the CLI numbers texts (from 1)."""
    import warnings

    for start in range(0, len(texts), size):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # truncation is warned once, as the texts are explained
                tokenizer(texts[start:start + size])
        except ValueError as e:
            raise ValueError(re.sub(r"^text (\d+)", lambda m: f"text {start + int(m.group(1)) + 1}", str(e))) from None


def _refuse_image_options(args) -> None:
    given = [flag for flag, value in (("image arguments", getattr(args, "images", None)),
                                      ("--labels", getattr(args, "labels", None)),
                                      ("--map-class", getattr(args, "map_class", None)),
                                      ("--model-name", getattr(args, "model_name", None))) if value]
    if given:
        raise ValueError(f"{', '.join(given)} are for images; a text classifier explains the --text / --text-file "
                         "texts only: leave them out")


def explain_texts(args, progress: dict | None = None) -> int:
    """The --text path of `predmaps explain` for a text classifier; exit status (2: bad input, one line)."""
    from convert.hf_text import load_text
    from predmaps.report import text as text_report
    from predmaps.text import TEXT_METHODS

    try:  # before the model loads
        _refuse_image_options(args)
        texts, skipped = read_texts(args)
        if args.method not in TEXT_METHODS:
            raise ValueError(f"--method: unknown text method {args.method!r}; available: {', '.join(TEXT_METHODS)}")
        common.check_out(args.out)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        model, params, tokenizer = load_text(args.model)
    except (ValueError, OSError) as e:  # unsupported architecture, missing tokenizer, strict key errors
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = model.config
    classes = args.classes
    if classes is None:
        classes = "all" if cfg.num_classes <= ALL_CLASSES_UP_TO else "top3"
    try:
        columns = text_report.plan_text_columns(args.method, args.layers, cfg.num_layers)
        from predmaps.text import check_text_request

        for method, layer in columns:
            check_text_request(model, method, -1 if layer is None else layer, {})
        common.check_class_options(argparse.Namespace(classes=classes, map_class=None), cfg.num_classes)
        check_tokenisable(tokenizer, texts, args.batch_size)
        out = common.make_out(args.out)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    notes = [f"{skipped} empty line(s) of {args.text_file} skipped."] if skipped else []
    if skipped:
        print(f"note: {skipped} empty line(s) of {args.text_file} skipped", file=sys.stderr)
    options = text_report.TextReportOptions(title=getattr(args, "title", None) or "predmaps: text explanations",
                                            model_name=getattr(args, "model_label", None) or str(args.model),
                                            shared_scale=args.shared_scale, notes=notes)

    def warn(i, message):
        print(f"warning: text {i + 1}: {message}", file=sys.stderr)

    from jaxvit import safe_write

    folder = safe_write.make_dir(out / "report", own=True)  # a symlinked report/ is refused, never written into
    if progress is not None:
        progress["report"] = folder
    entries = []
    results = text_report.analyse_texts(model, params, tokenizer, texts, columns=columns, target=classes,
                                        batch_size=args.batch_size, reduce=options.reduce, on_warning=warn)
    collect = (lambda r: entries.append(text_report.text_result_json(r, cfg))) if args.json else None
    try:
        rep = text_report.write_text_report(results, folder, cfg, options, on_result=collect)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(rep.lines))
    print(f"{len(rep.pages)} text(s) explained in {rep.seconds:.1f}s")
    if args.json:
        path = out / JSON_NAME
        safe_write.write_text(path, json.dumps(text_report.text_results_json(entries, cfg, options)))
        print(f"maps: {path.resolve()}")
    print(f"report: {rep.index.resolve()}")
    return 0


def demo_text(args, progress: dict | None = None) -> int:
    """`predmaps demo --text`: the shipped text classifier (common.DEFAULT_TEXT_MODEL), or --model's, on
    DEMO_SENTENCES."""
    folder = Path(args.model or common.DEFAULT_TEXT_MODEL)
    if args.model is None and not (folder / "config.json").is_file():
        print(f"error: the shipped text classifier is missing from {folder}; reinstall predmaps, or explain with "
              "your own: predmaps explain --text '...' --model CHECKPOINT", file=sys.stderr)
        return 2
    if args.model is not None and not is_text_model(args.model):
        print(f"error: demo --text --model {args.model}: not a text classifier checkpoint (a transformers folder "
              "whose config.json names a *ForSequenceClassification)", file=sys.stderr)
        return 2
    which = "the shipped text classifier" if args.model is None else args.model
    print(f"demo: explaining {len(DEMO_SENTENCES)} sentences with {which}; writing the report "
          f"to {Path(args.out).resolve()}", flush=True)
    ns = argparse.Namespace(text=list(DEMO_SENTENCES), text_file=None, model=str(folder), method="predicatt",
                            layers=[-1], classes=None, shared_scale=False, json=True, out=args.out, batch_size=8,
                            title="predmaps demo: text classifier",
                            model_label=f"{folder.name} (shipped with predmaps)" if args.model is None else None)
    return explain_texts(ns, progress)
