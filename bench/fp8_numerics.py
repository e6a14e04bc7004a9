"""How far the fp8 GEMMs (`jaxvit.ViT(gemm="fp8")`, issue 29) move the maps: fp8 against bf16 and fp32, and
bf16 against fp32 for scale, on the benchmark's models and inputs and on the digits model predmaps ships.

    python -m bench.fp8_numerics [--models tiny,vit_s16] [--batch 8] [--digit-scenes 200] [--hlo-check vit_b16]
                                 [--layouts all|none|fc1,mlp,...] [--out FILE.json]

For each case the fp32, bf16 and fp8 (bf16 with e4m3 GEMMs) models explain the same images for the same
classes (fp32's top-1, so the maps compare like with like) and the script reports, per output, the relative
L2 deviation ||a - b|| / ||b|| over the batch and the largest deviation max|a - b| / max|b|, for
PredicAtt_L, PredicAtt_{L-1}, the prediction maps (layer L) and the logits, and the logits' top-1 agreement.
"mant3" is the floor of any scaling: the same GEMM inputs rounded to 3 mantissa bits with no range limit.
Benchmark models: timm architectures with random unit-fan-in weights (bench/models.py; not pretrained ones:
trained weights have outlier features that random ones lack) on seeded normal images. Digits: the shipped
trained ViT on one-digit test scenes, with its accuracy per variant.
--layouts: other fp8 layouts against bf16 (`LAYOUT_CHOICES`: one GEMM alone, the MLP only, the last blocks in
bf16, weights quantised once, static input scales calibrated on other images than those explained: the
benchmark models' images of seed 2 (explained: seed 1), the digits' training scenes), each with its share of a ViT-B/16 block's GEMM
MACs in e4m3 (a proxy for its speed until a GPU times it).
On CPU, XLA emulates e4m3 exactly: the numbers are a GPU's up to float32 accumulation order.
--hlo-check MODEL counts, in the compiled fp8 and fp8_mlp headline (PredicAtt_L + L-1) of that model as the
benchmark loads it (e4m3 weights stored, calibrated input scales), the GEMMs XLA made cuBLASLt fp8 calls (custom
call __cublas$lt$matmul$f8): on a GPU the fp8 rows are fp8 GEMMs only if this is every e4m3 block GEMM (fp8: 4
per block, 6 where qkv runs as three for cuDNN attention; fp8_mlp: 2); on CPU it is 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

OUTPUTS = ("predicatt_L", "predicatt_L-1", "prediction_map", "logits")
PAIRS = (("fp8", "bf16"), ("fp8", "fp32"), ("bf16", "fp32"), ("mant3", "bf16"))


def _layout_choices() -> dict:
    """{--layouts key: (fp8.Layout, how its weights and input scales are made: 'call', 'prequant', 'static')}."""
    from jaxvit.fp8 import LAYERS, Layout

    mlp = ("fc1", "fc2")
    out = {k: (Layout((k,)), "call") for k in LAYERS}
    out |= {"mlp": (Layout(mlp), "call"), "all_last1": (Layout(bf16_last=1), "call"),
            "all_last2": (Layout(bf16_last=2), "call"), "mlp_last1": (Layout(mlp, bf16_last=1), "call"),
            "mlp_last2": (Layout(mlp, bf16_last=2), "call"), "prequant": (Layout(), "prequant"),
            "static": (Layout(), "static"), "static_mlp": (Layout(mlp), "static")}
    return out


VIT_B = (768, 3072, 12)  # embed_dim, mlp_dim, depth: the e4m3 share is reported for ViT-B/16's blocks


def _mantissa3(x, dtype):
    """x rounded to e4m3's 3 mantissa bits with no exponent limit: what any scale granularity (per tensor,
    channel, token, block) at best gives, since e4m3's relative precision is the same across its range."""
    import jax.numpy as jnp

    x32 = x.astype(jnp.float32)
    m, e = jnp.frexp(x32)  # m in [0.5, 1): 4 significant bits = m rounded to 1/16
    return jnp.ldexp(jnp.round(m * 16) / 16, e).astype(dtype)


def variants(model, params):
    """{name: (module, params)}: fp32, bf16 (block weights stored bf16, as the benchmark's rows), fp8."""
    import jax
    import jax.numpy as jnp

    import jaxvit

    p16 = jaxvit.cast_params(params, jnp.bfloat16)
    p32 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params)
    return {"fp32": (model.clone(dtype=jnp.float32), p32), "bf16": (model.clone(dtype=jnp.bfloat16), p16),
            "fp8": (model.clone(dtype=jnp.bfloat16, gemm="fp8"), p16)}


def outputs(model, params, x, classes) -> dict:
    """The four outputs of one variant for images x (B, H, W, C) and classes (B,), as float64 numpy."""
    import contextlib

    import jax
    import jax.numpy as jnp

    import predmaps

    # fp32 as true fp32 (TF32 on a GPU otherwise); the half-precision variants as the benchmark runs them
    ctx = jax.default_matmul_precision("highest") if model.dtype == jnp.float32 else contextlib.nullcontext()
    with ctx:
        out = {"logits": np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x).logits)(params, x), np.float64)}
        for name, method, layer in (("predicatt_L", "predicatt", -1), ("predicatt_L-1", "predicatt", -2),
                                    ("prediction_map", "prediction_map", -1)):
            e = predmaps.explain(model, params, x, method=method, target=classes, layer=layer)
            out[name] = np.asarray(e.maps, np.float64)
    return out


def mantissa_floor(model, params, x, classes) -> dict:
    """`outputs` of the fp8 model with its fake quantisation replaced by `_mantissa3` (compiled afresh)."""
    import jax

    from jaxvit import fp8

    saved = fp8.fake_quant
    jax.clear_caches()  # explain's jit would reuse the fp8 model's executable (the module compares equal)
    fp8.fake_quant = _mantissa3
    try:
        return outputs(model, params, x, classes)
    finally:
        fp8.fake_quant = saved
        jax.clear_caches()


def deviations(got: dict, ref: dict) -> dict:
    res = {}
    for k in OUTPUTS:
        a, b = got[k], ref[k]
        res[k] = {"rel_l2": float(np.linalg.norm(a - b) / np.linalg.norm(b)),
                  "rel_max": float(np.abs(a - b).max() / np.abs(b).max())}
    res["top1_agreement"] = float((got["logits"].argmax(-1) == ref["logits"].argmax(-1)).mean())
    return res


def layout_outputs(model, params, x, classes, layouts, calib) -> dict:
    """{key: `outputs`} of each --layouts key: the bf16 model with that layout on the bf16 params, weights
    prequantised ('prequant') or input scales calibrated on the images `calib` ('static', never x itself)."""
    import jax.numpy as jnp

    from jaxvit import fp8

    choices, out = _layout_choices(), {}
    for key in layouts:
        lay, how = choices[key]
        m = model.clone(dtype=jnp.bfloat16, gemm=lay)
        p = fp8.prequantize(params, lay) if how == "prequant" else (
            fp8.calibrate(m, params, calib) if how == "static" else params)
        out[key] = outputs(m, p, x, classes)
        if how == "static":  # clipping risk: the held-out inputs' amax against the calibration set's
            held, cal = fp8.input_amax(m, params, x), fp8.input_amax(m, params, calib)
            out[key]["amax_ratio"] = max(float(held[k] / cal[k]) for k in held)
    return out


def case(label: str, model, params, x, labels=None, floor: bool = True, layouts=(), calib=None) -> dict:
    import jax

    from jaxvit import fp8

    vs = variants(model, params)
    m32, p32 = vs["fp32"]
    with jax.default_matmul_precision("highest"):
        classes = np.asarray(m32.apply({"params": p32}, x).logits).argmax(-1)  # what every variant explains
    outs = {name: outputs(m, p, x, classes) for name, (m, p) in vs.items()}
    if floor:
        outs["mant3"] = mantissa_floor(*vs["fp8"], x, classes)
    res = {"case": label, "images": int(x.shape[0]),
           "pairs": {f"{a} vs {b}": deviations(outs[a], outs[b]) for a, b in PAIRS if a in outs}}
    if layouts:
        louts = layout_outputs(model, vs["bf16"][1], x, classes, layouts, calib)
        choices = _layout_choices()
        res["layouts"] = {}
        for key, o in louts.items():
            ref = outs["fp8"] if key == "prequant" else outs["bf16"]  # prequant must equal per-call quantisation
            res["layouts"][key] = {"vs": "fp8" if key == "prequant" else "bf16",
                                   "fp8_share_vit_b": fp8.fp8_share(choices[key][0], *VIT_B), **deviations(o, ref)}
            if "amax_ratio" in o:
                res["layouts"][key]["held_out_amax_over_calibration"] = o["amax_ratio"]
            if labels is not None:
                res["layouts"][key]["accuracy"] = float((o["logits"].argmax(-1) == labels).mean())
    if labels is not None:
        res["accuracy"] = {name: float((o["logits"].argmax(-1) == labels).mean()) for name, o in outs.items()}
    return res


def gemm_calls(key: str, dtype: str = "fp8", batch: int = 8, seed: int = 0) -> dict:
    """The custom calls (by target) in the compiled headline of a benchmark model at an fp8 bench dtype, and how
    many are fp8 GEMMs."""
    import collections
    import re

    import jax
    import jax.numpy as jnp

    from bench.models import HEADLINE, MODELS, build_timm, jax_function, load_jax, make_images
    from jaxvit import fp8

    tmodel, size = build_timm(key, seed)
    model, params = load_jax(tmodel, dtype)
    x = jnp.asarray(make_images(batch, size).transpose(0, 2, 3, 1))
    text = jax.jit(jax_function(model, HEADLINE)).lower(params, x).compile().as_text()
    calls = collections.Counter(re.findall(r'custom_call_target="([^"]+)"', text))
    depth, layers = model.config.depth, fp8.layout(dtype).layers
    expected = sorted({len(layers) * depth, (len(layers) + 2 * ("qkv" in layers)) * depth})
    return {"model": MODELS[key][3], "dtype": dtype, "batch": batch, "custom_calls": dict(calls),
            "fp8_gemms": calls.get("__cublas$lt$matmul$f8", 0), "block_gemms_expected": expected}


def markdown(results: list[dict]) -> str:
    lines = ["| case | pair | " + " | ".join(f"{o} rel L2 / max" for o in OUTPUTS) + " | top-1 agree |",
             "|---|---|" + "---|" * (len(OUTPUTS) + 1)]
    for r in results:
        for pair, d in r["pairs"].items():
            cells = [f"{d[o]['rel_l2']:.2e} / {d[o]['rel_max']:.2e}" for o in OUTPUTS]
            lines.append(f"| {r['case']} | {pair} | " + " | ".join(cells) + f" | {d['top1_agreement']:.3f} |")
    if any("layouts" in r for r in results):
        lines += ["", "| case | layout (against) | e4m3 share of ViT-B/16 block MACs | "
                  + " | ".join(f"{o} rel L2 / max" for o in OUTPUTS) + " | top-1 agree | note |",
                  "|---|---|---|" + "---|" * (len(OUTPUTS) + 2)]
        for r in results:
            for key, d in r.get("layouts", {}).items():
                cells = [f"{d[o]['rel_l2']:.2e} / {d[o]['rel_max']:.2e}" for o in OUTPUTS]
                note = "; ".join(([f"held-out amax / calibration amax {d['held_out_amax_over_calibration']:.2f}"]
                                  if "held_out_amax_over_calibration" in d else [])
                                 + ([f"accuracy {d['accuracy']:.3f}"] if "accuracy" in d else []))
                lines.append(f"| {r['case']} | {key} ({d['vs']}) | {d['fp8_share_vit_b']:.1%} | " + " | ".join(cells)
                             + f" | {d['top1_agreement']:.3f} | {note} |")
    acc = [f"- {r['case']}: accuracy " + ", ".join(f"{k} {v:.3f}" for k, v in r["accuracy"].items())
           for r in results if "accuracy" in r]
    return "\n".join(lines + ([""] + acc if acc else []))


def _json_file_arg(text: str) -> str:
    if Path(text).is_dir() or not Path(text).resolve().parent.is_dir():
        raise argparse.ArgumentTypeError(f"takes a file path in an existing folder; got {text!r}")
    return text


def numerics_parser(prog: str, description: str, default_models: list[str]) -> argparse.ArgumentParser:
    """The arguments every maps-deviation script here takes (this one, bench.gelu_numerics): which models,
    batch, digit scenes, seed and the JSON file."""
    from bench.models import MODELS, MODEL_ALIASES
    from bench.run import _batch_arg, _names_arg
    from predmaps.runtime import int_at_least

    p = argparse.ArgumentParser(prog=prog, description=description)
    models = _names_arg(MODELS, MODEL_ALIASES, "model")
    p.add_argument("--models", type=lambda t: [] if t == "none" else models(t), default=default_models,
                   help=f"benchmark models, comma list of {', '.join(MODELS)}, or none (default {','.join(default_models)})")
    p.add_argument("--batch", type=_batch_arg, default=[8], help="images per benchmark model (default 8)")
    p.add_argument("--digit-scenes", type=int_at_least(0), default=200, help="one-digit test scenes for the digits "
                   "model (default 200; 0 skips it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=_json_file_arg, help="also write the results as JSON to this file")
    return p


def inputs(args):
    """(label, float32 model, params, images NHWC, labels or None, calib) of each case `numerics_parser`'s
    arguments name: the benchmark models (random weights, seeded images), then the digits model on one-digit test
    scenes. calib() gives other images than those, for fp8's input scales: seed 2 (the images are seed 1's), the
    digits' training scenes."""
    import jax.numpy as jnp

    import convert
    from bench.models import MODELS, build_timm, make_images

    for key in args.models:
        tmodel, size = build_timm(key, args.seed)
        model, params = convert.load(tmodel, dtype=jnp.float32)
        x = jnp.asarray(make_images(max(args.batch), size).transpose(0, 2, 3, 1))
        calib = lambda size=size: jnp.asarray(make_images(max(args.batch), size, seed=2).transpose(0, 2, 3, 1))
        yield f"{MODELS[key][3]}, random weights, b{max(args.batch)}", model, params, x, None, calib
    if args.digit_scenes:
        from predmaps import digits

        model, params = digits.load_model()
        images, labels, _ = digits.one_digit_scenes(args.digit_scenes, "test", args.seed)
        calib = lambda: jnp.asarray(digits.normalize(digits.one_digit_scenes(args.digit_scenes, "train", args.seed)[0]))
        yield (f"digits ViT (shipped), {args.digit_scenes} one-digit test scenes", model, params,
               jnp.asarray(digits.normalize(images)), labels, calib)


def report(results: list[dict], t0: float, out: str | None, **extra) -> None:
    """Print the table and the environment; write both (and `extra`) as JSON to `out` if given."""
    import jax

    env = {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
           "jax": jax.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "wall_s": round(time.perf_counter() - t0, 1)}
    if results:
        print(markdown(results))
    print(f"\n{env}")
    if out:
        Path(out).write_text(json.dumps({"environment": env, **extra, "results": results}, indent=1))


def main(argv=None) -> int:
    from bench.models import MODELS, MODEL_ALIASES
    from bench.run import _names_arg

    p = numerics_parser("python -m bench.fp8_numerics", __doc__.split("\n\n")[0], ["tiny", "vit_s16"])
    p.add_argument("--hlo-check", type=_names_arg(MODELS, MODEL_ALIASES, "model"), default=[],
                   help="count the fp8 cuBLASLt GEMMs in these models' compiled fp8 and fp8_mlp headline (b8)")
    p.add_argument("--no-floor", dest="floor", action="store_false",
                   help="skip the mant3 variant (3 mantissa bits, no range limit: the floor of any scaling)")
    choices = list(_layout_choices())
    p.add_argument("--layouts", type=lambda t: choices if t == "all" else [] if t == "none" else _names_arg(
                   choices, {}, "layout")(t), default=[],
                   help=f"fp8 layouts to compare with bf16: all, none (default), or a comma list of {', '.join(choices)}")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    hlo = []
    for key, dt in ((key, dt) for key in args.hlo_check for dt in ("fp8", "fp8_mlp")):
        # first: the shortest answer to whether the fp8 rows time fp8 GEMMs at all
        h = gemm_calls(key, dt, seed=args.seed)
        hlo.append(h)
        print(f"{h['model']} {h['dtype']}: {h['fp8_gemms']} fp8 cuBLASLt GEMMs (block GEMMs: {h['block_gemms_expected']}); custom "
              f"calls {h['custom_calls']}", flush=True)
    results = []
    for label, model, params, x, labels, calib in inputs(args):
        results.append(case(label, model, params, x, labels, floor=args.floor, layouts=args.layouts, calib=calib()))
        print(f"{label}: done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    report(results, t0, args.out, hlo_check=hlo)
    return 0


if __name__ == "__main__":
    sys.exit(main())
