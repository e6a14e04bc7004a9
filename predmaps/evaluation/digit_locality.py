"""The digit-locality study: do a digits ViT's patch tokens predict the class where the digit is?

The premise of prediction maps is that the head, applied to a patch token, reads what is at
that patch (the paper's Figs. 3 and 8 on ImageNet ViTs). This module measures it for any
10-class digits ViT, on one-digit scenes of the held-out test digits:

- locality (`predmaps.stats.patch_locality`): per layer, how often the head's top class on a
  patch token is the digit's class, on patches covering the digit (>= 25% of their pixels) and on
  background patches (none); the gap between the two is the study's criterion;
- the appendix A.6 statistics (`predmaps.stats.layer_statistics`): class token and patch tokens,
  accuracy, confidence, entropy per layer;
- the digit benchmark (`predmaps.evaluation.digit_scenes`): localisation, perturbation and class
  specificity of every method.

    python -m predmaps.evaluation.digit_locality shipped=predmaps/assets/vit_digits_patch8_64 \\
        other=/tmp/run --json docs/digit-locality.json --markdown docs/digit-locality.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import sys
import time
from pathlib import Path

import jax
import numpy as np

from jaxvit import safe_write
from predmaps import digits, stats
from predmaps.evaluation import digit_scenes

LOCALITY_SEED = 7  # one-digit test scenes of the locality and A.6 statistics (the benchmark uses 2024)


def recipe_of(path: Path) -> str:
    """The recipe row of a model's TRAINING.md (`predmaps.train_digits` writes it), or ''."""
    text = (path / "TRAINING.md").read_text() if (path / "TRAINING.md").is_file() else ""
    m = re.search(r"^\| recipe \| (.*) \|$", text, re.M)
    return m.group(1) if m else ""


# The benchmark rows of the study: the method under test at L and L-1, its two factors, a
# class-agnostic and a gradient reference (`--rows all`: every method, as docs/digit-benchmark.md).
STUDY_ROWS = (("predicatt", -1), ("predicatt", -2), ("prediction_map", -1), ("weighted_attention", -1),
              ("raw_attention", -1), ("generic_attention", -1))


def study_model(name: str, path: str, *, scenes: int = 400, bench_scenes: int = 300,
                batch_size: int = 100, rows=STUDY_ROWS, progress: bool = False) -> dict:
    """Every number of the study for the digits ViT at `path`."""
    model, params = digits.load_model(path)
    cfg = model.config
    t0 = time.perf_counter()
    one_digit = digits.one_digit_scenes(scenes, "test", LOCALITY_SEED, cfg.img_size[0])
    x, labels = digits.normalize(one_digit[0]), one_digit[1]
    a6 = [stats.layer_statistics(model, params, x[i:i + batch_size], labels[i:i + batch_size])
          for i in range(0, scenes, batch_size)]
    a6 = {k: np.concatenate([np.asarray(getattr(s, k)) for s in a6]).mean(0).tolist()
          for k in ("cls_accuracy", "cls_confidence", "cls_entropy", "patch_accuracy", "patch_confidence",
                    "patch_entropy")}
    bench = digit_scenes.run_benchmark(model, params, rows=rows, scenes=bench_scenes, batch_size=batch_size,
                                       progress=progress)
    n_params = sum(int(v.size) for v in jax.tree_util.tree_leaves(params))
    return {"name": name, "path": str(path), "recipe": recipe_of(Path(path)), "params": n_params,
            "depth": cfg.depth, "embed_dim": cfg.embed_dim, "heads": cfg.num_heads,
            **locality_of(model, params, scenes=scenes, batch_size=batch_size, one_digit=one_digit),
            "a6": a6, "benchmark": bench.to_dict(), "seconds": time.perf_counter() - t0}


TWO_DIGIT_SCENES = 200  # two-digit test scenes of the object locality (seed LOCALITY_SEED)


def locality_of(model, params, *, scenes: int = 400, batch_size: int = 100, one_digit=None) -> dict:
    """The study's locality numbers (forward passes only): `locality`, `stats.patch_locality` on
    `scenes` one-digit test scenes, and `locality_two_digit`, `stats.object_locality` on
    TWO_DIGIT_SCENES two-digit test scenes (a digit's patch tokens naming its class / the other's).
    one_digit: those one-digit scenes (images, labels, masks) when the caller has rendered them already."""
    size = model.config.img_size[0]
    if one_digit is None:
        one_digit = digits.one_digit_scenes(scenes, "test", LOCALITY_SEED, size)
    images, labels, masks = one_digit
    loc = stats.patch_locality(model, params, digits.normalize(images), labels, masks, batch=batch_size)
    images, labels, masks = digits.two_digit_scenes(TWO_DIGIT_SCENES, "test", LOCALITY_SEED, size)
    two = stats.object_locality(model, params, digits.normalize(images), labels, masks, batch=batch_size)
    listed = lambda d: {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in d.items()}
    return {"locality": listed(loc), "locality_two_digit": {**listed(two), "scenes": TWO_DIGIT_SCENES}}


def _row(bench: dict, method: str, layer: int) -> dict:
    for r in bench["rows"]:
        if r["method"] == method and r["layer"] in (layer, None):
            return r
    raise KeyError((method, layer))


def _two_digit_cell(m: dict) -> str:
    two = m.get("locality_two_digit")
    return "-" if two is None else f"{100 * two['own_accuracy'][-1]:.1f} / {100 * two['other_accuracy'][-1]:.1f}"


def refresh_locality(models: list[dict], scenes: int = 400, batch_size: int = 100) -> None:
    """Measure the locality numbers of stored study entries again from their `path` (entries that
    predate a statistic get it; the benchmark columns are kept). A missing path is an error."""
    for m in models:
        if not Path(m["path"]).is_dir():
            raise FileNotFoundError(f"{m['name']}: {m['path']} is gone; cannot measure its locality again")
        model, params = digits.load_model(m["path"])
        m.update(locality_of(model, params, scenes=scenes, batch_size=batch_size))
        print(f"{m['name']}: locality measured again", file=sys.stderr, flush=True)


def markdown(models: list[dict], info: dict) -> str:
    depth_max = max(m["depth"] for m in models)
    lines = [
        "| model | recipe | depth x width | params | one-digit acc | last layer: patch acc on digit | "
        "on background | gap | L-1 gap | two digits: on its digit, its class / the other's | "
        "PredicAtt_L own > other | Psi_L own > other | PredicAtt_L mAP | PredicAtt_L pert. pos AUC |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in models:
        loc, b = m["locality"], m["benchmark"]
        last = m["depth"]  # the benchmark's 0-based prediction layer of L
        pa, psi = _row(b, "predicatt", last), _row(b, "prediction_map", last)
        lines.append(
            f"| {m['name']} | {m['recipe']} | {m['depth']} x {m['embed_dim']} | {m['params']:,} | "
            f"{100 * b['one_digit_accuracy']:.1f} | {100 * loc['on_accuracy'][-1]:.1f} | "
            f"{100 * loc['background_accuracy'][-1]:.1f} | **{100 * loc['gap'][-1]:+.1f}** | "
            f"{100 * loc['gap'][-2]:+.1f} | {_two_digit_cell(m)} | {pa['specificity']['win_rate']:.3f} | "
            f"{psi['specificity']['win_rate']:.3f} | {100 * pa['segmentation']['map']:.1f} | "
            f"{pa['perturbation']['auc'].get('positive', float('nan')):.2f} |")
    lines += ["", "Per layer (x^(0) = the embeddings, then each block's output): patch-token accuracy on the "
              "digit / on background, and the class token's accuracy (A.6).", "",
              "| model | " + " | ".join(f"layer {i}" for i in range(depth_max + 1)) + " |",
              "|---|" + "---|" * (depth_max + 1)]
    for m in models:
        loc, a6 = m["locality"], m["a6"]
        cells = [f"{100 * on:.0f} / {100 * bg:.0f} (cls {100 * c:.0f})"
                 for on, bg, c in zip(loc["on_accuracy"], loc["background_accuracy"], a6["cls_accuracy"])]
        lines.append(f"| {m['name']} | " + " | ".join(cells) + " |")
    for key, what in (("confidence", "A.6's: the largest logit minus the second"),
                      ("entropy", "the entropy of the head's softmax (nats; uniform over 10 classes: 2.30)")):
        lines += ["", f"Per layer: patch tokens' {key} ({what}) on the digit / on background, and the class "
                  f"token's (A.6).", "",
                  "| model | " + " | ".join(f"layer {i}" for i in range(depth_max + 1)) + " |",
                  "|---|" + "---|" * (depth_max + 1)]
        for m in models:
            loc, a6 = m["locality"], m["a6"]
            if f"on_{key}" not in loc:
                lines.append(f"| {m['name']} | " + " | ".join("-" for _ in range(m["depth"] + 1)) + " |")
                continue
            cells = [f"{on:.2f} / {bg:.2f} (cls {c:.2f})" for on, bg, c in
                     zip(loc[f"on_{key}"], loc[f"background_{key}"], a6[f"cls_{key}"])]
            lines.append(f"| {m['name']} | " + " | ".join(cells) + " |")
    lines += ["", f"Run: {info['date']}, {info['machine']}, jax {info['jax']}; {info['scenes']} locality scenes "
              f"(test digits, seed {LOCALITY_SEED}), benchmark on {info['bench_scenes']} + {info['bench_scenes']} "
              f"scenes (seed {digit_scenes.DEFAULT_SEED})."]
    return "\n".join(lines)


def write_measured(path: str | Path, *, scenes: int = 400, two_digit_scenes: int = 1000,
                   batch_size: int = 100) -> Path:
    """Measure the digits model at `path` and write `digits.MEASURED_FILE` beside it: its patch tokens'
    accuracy on the digit and on background per layer (`scenes` one-digit scenes, as the study) and
    PredicAtt_L's class specificity (`two_digit_scenes` two-digit scenes, as the digit benchmark).
    The report's first screen quotes it (`digits.trust_note`)."""
    model, params = digits.load_model(path)
    size = model.config.img_size[0]
    images, labels, masks = digits.one_digit_scenes(scenes, "test", LOCALITY_SEED, size)
    loc = stats.patch_locality(model, params, digits.normalize(images), labels, masks, batch=batch_size)
    im2, lab2, m2 = digits.two_digit_scenes(two_digit_scenes, "test", digit_scenes.DEFAULT_SEED, size)
    spec = digit_scenes.class_specificity(model, params, im2.astype(np.float32) / 255.0, lab2, m2,
                                          batch_size=batch_size)
    out = Path(path) / digits.MEASURED_FILE
    safe_write.write_text(out, json.dumps({
        "patch_accuracy_on_digit": [round(float(v), 4) for v in loc["on_accuracy"]],
        "patch_accuracy_background": [round(float(v), 4) for v in loc["background_accuracy"]],
        "one_digit_scenes": scenes, "one_digit_seed": LOCALITY_SEED,
        "predicatt_L_own_beats_other": round(spec.win_rate, 4), "predicatt_L_mean_share": round(spec.mean_share, 4),
        "two_digit_scenes": two_digit_scenes, "two_digit_seed": digit_scenes.DEFAULT_SEED,
        "measured": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "command": f"python -m predmaps.evaluation.digit_locality --measured {path}"}, indent=1) + "\n")
    return out


def main(argv=None) -> int:
    from predmaps.machine import cpu_name

    ap = argparse.ArgumentParser(prog="python -m predmaps.evaluation.digit_locality",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="*", metavar="NAME=DIR", help="digits ViT checkpoints, each with a name")
    ap.add_argument("--measured", metavar="DIR",
                    help="instead: write DIR/measured.json, what the report quotes of the model in DIR")
    ap.add_argument("--scenes", type=int, default=400, help="one-digit scenes of the locality statistics")
    ap.add_argument("--bench-scenes", type=int, default=300, help="scenes of each kind in the digit benchmark")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--rows", choices=("study", "all"), default="study",
                    help="benchmark rows: the study's six (default) or every method")
    ap.add_argument("--json", help="write every number here (models already in it are kept, by name)")
    ap.add_argument("--markdown", help="write the tables here")
    ap.add_argument("--refresh-locality", action="store_true",
                    help="with --json and --markdown alone: measure the locality numbers of every stored model again "
                         "from its path (forward passes only; the benchmark columns are kept)")
    a = ap.parse_args(argv)
    from predmaps.runtime import configure_compile_cache

    configure_compile_cache()  # models of one architecture share every executable: compile once, not per model
    if a.measured:
        print(write_measured(a.measured, scenes=a.scenes, batch_size=a.batch_size).read_text())
        return 0
    if not a.models:
        if not (a.json and a.markdown and Path(a.json).is_file()):
            ap.error("give NAME=DIR checkpoints (or --measured DIR, or --json and --markdown to render a study)")
        study = json.loads(Path(a.json).read_text())
        if a.refresh_locality:
            refresh_locality(study["models"], study["info"]["scenes"], a.batch_size)
            safe_write.write_text(a.json, json.dumps(study, indent=1) + "\n")
        safe_write.write_text(a.markdown, markdown(study["models"], study["info"]) + "\n")
        return 0
    pairs = []
    for spec in a.models:
        name, sep, path = spec.partition("=")
        if not sep or not name or not Path(path).is_dir():
            ap.error(f"{spec!r}: give NAME=DIR with DIR a checkpoint folder")
        pairs.append((name, path))
    done = {}
    if a.json and Path(a.json).is_file():
        done = {m["name"]: m for m in json.loads(Path(a.json).read_text())["models"]}
    for name, path in pairs:
        print(f"{name}: {path}", file=sys.stderr, flush=True)
        rows = STUDY_ROWS if a.rows == "study" else digit_scenes.default_rows()
        done[name] = study_model(name, path, scenes=a.scenes, bench_scenes=a.bench_scenes, batch_size=a.batch_size,
                                 rows=rows)
        loc = done[name]["locality"]
        print(f"  last-layer patch accuracy on digit {loc['on_accuracy'][-1]:.3f}, background "
              f"{loc['background_accuracy'][-1]:.3f}, gap {loc['gap'][-1]:+.3f} ({done[name]['seconds']:.0f} s)",
              file=sys.stderr, flush=True)
        info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "machine": f"{jax.device_count()}-device {jax.default_backend()} ({cpu_name()}, {platform.machine()})",
                "jax": jax.__version__, "scenes": a.scenes, "bench_scenes": a.bench_scenes}
        if a.json:
            safe_write.write_text(a.json, json.dumps({"info": info, "models": list(done.values())}, indent=1) + "\n")
    if a.markdown:
        safe_write.write_text(a.markdown, markdown(list(done.values()), info) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
