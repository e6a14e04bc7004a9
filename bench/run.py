"""The benchmark behind `python -m bench`: JAX explanations against the torch version.

For every model x dtype x batch size x method it times the JAX implementation (`predmaps`) and
the torch version (`bench/torch_reference.py`, what a torch user of the methods writes) on the
same device, in the same process, one after the other, and checks that both give the same maps
(parity), so a fast wrong answer cannot win.

Rows
  methods: predicatt_L, predicatt_L-1, predicatt_L+L-1 (both layers from one forward: JAX calls
  `explain_fn` twice inside one `jax.jit` and XLA shares the forward; torch reads both layers
  from one hooked forward), prediction_map, raw_attention, rollout, gradcam, generic_attention,
  transattr (JAX only: the torch version has no LRP), and `forward`: torch = plain timm forward
  with fused SDPA attention and no explanation (the floor a torch user sees), JAX = the bare
  jaxvit forward (fused attention, logits only).

Measures
  latency: median of `--repeats` timed calls (after `--warmup` calls), device synchronised
    (`jax.block_until_ready`, `torch.cuda.synchronize`); reported at batch 1.
  throughput: batch / median time at the large batch (`--large-repeats` calls).
  memory overhead (the paper's): peak device memory during one call minus device memory in use
    before it. GPU: torch `reset_peak_memory_stats` / `max_memory_allocated`; JAX in a fresh
    subprocess per (model, dtype, method) reading `memory_stats()` peak_bytes_in_use minus
    bytes_in_use before (JAX cannot reset its peak in-process; the subprocess hits the
    compilation cache this run wrote, so no autotuning runs before the measured call).
    CPU: resident-set growth of this process during one call (VmHWM after, reset through
    /proc/self/clear_refs, minus VmRSS before): an approximation, labelled as such (memory that
    the allocator reuses from earlier calls does not show).
  compile: JAX trace + lower + compile, reported on its own, never inside the run times.

Inputs: timm models built with `pretrained=False`, every weight re-drawn at unit fan-in scale
(seeded): timm's own init is nearly degenerate (near-uniform attention, tiny logits), which
would make the parity check vacuous. Images: seeded standard-normal (already "normalised").

Parity: each map set against the torch version's fp32 maps on the same inputs (for
predicatt_L+L-1: `torch_reference.predicatt` at L and at L-1), ||a - b|| / ||b|| over the batch.
fp32: <= 1e-4 and the same predicted classes. bf16: at most max(5e-2, 2x the torch version's own
bf16 error against its fp32), over the images whose predicted class agrees with fp32.
Forward rows compare logits the same way.

Modules: bench.models (the cases: models, methods, tolerances), bench.measure (one call's time,
parity and memory), bench.runner (Runner: every case), bench.render (the markdown), bench.bounds,
bench.timing; this one is the command line (arguments, merging result files, main).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from jaxvit import fp8
from jaxvit import gelu as gelu_opt
from jaxvit.model import KERNEL_IMPLS, pallas_parts
from predmaps.runtime import int_at_least
from bench.measure import memory_child, rss_supported
from bench.models import (BF16_TOL, CPU_LARGE_BATCH, FP8_DTYPES, FP8_TOL, FP32_TOL, GPU_LARGE_BATCH, HEADLINE,
                          METHODS, METHOD_ALIASES, MODELS, MODEL_ALIASES, REPO, TF32_TOL, _loadavg, _log)
from bench.render import add_missing_spreads, render_markdown, target_checks
from bench.runner import Runner, _err, _parse_list, _replace_case, device_slug, environment


def merge_results(results: list[dict]) -> dict:
    """One result from several runs on the same device: records concatenated (a later run's row
    replaces an earlier one with the same model, dtype, method, impl and batch), every command
    and note kept, target checks recomputed."""
    devices = {r["environment"]["device"] for r in results}
    if len(devices) != 1:
        raise SystemExit(f"--merge takes runs on one device; got {sorted(devices)}")
    env = dict(results[0]["environment"])
    env["commands"] = [r["environment"]["command"] for r in results]
    env["command"] = " ; ".join(env["commands"])
    env["dates"] = [r["environment"]["date"] for r in results]
    # runs with other model options (--kernels, --gelu, --bf16-weights) say so per run, not as the first run's
    precision = [r["environment"].get("precision", {}) for r in results]
    env["precision"] = {k: precision[0][k] if all(p.get(k) == precision[0][k] for p in precision) else
                        " | ".join(f"run {i}: {p.get(k, '-')}" for i, p in enumerate(precision, 1))
                        for k in precision[0]}
    records = {}
    for r in results:
        for rec in r["records"]:
            records[(rec["model"], rec["dtype"], rec["method"], rec["impl"], rec["batch"])] = rec
    notes = [f"merged from {len(results)} runs ({', '.join(env['dates'])}), one command each (see command)"]
    for i, r in enumerate(results, 1):
        notes += [f"run {i}: {n}" for n in r.get("notes", [])]
    modes: dict[str, list[int]] = {}
    for i, r in enumerate(results, 1):
        modes.setdefault(r["memory_mode"], []).append(i)
    merged = dict(results[0], environment=env, records=list(records.values()), notes=notes,
                  wall_s=sum(r.get("wall_s", 0) for r in results))
    merged["memory_mode"] = next(iter(modes)) if len(modes) == 1 else " | ".join(
        f"run{'s' if len(ix) > 1 else ''} {', '.join(map(str, ix))}: {m}" for m, ix in modes.items())
    for field in ("bounds", "interleaved"):
        merged[field] = []
        for r in results:
            for rec in r.get(field, []):
                merged[field] = _replace_case(merged[field], rec)
    merged["target_checks"] = target_checks(merged["records"], env["jax_backend"] == "gpu", merged["bounds"],
                                            merged["interleaved"])
    return merged


# -- argument types: a bad value stops the parse with exit status 2 and a one-line message (argparse's way)


def _names_arg(known, aliases: dict, what: str):
    """type= for a comma list of names (aliases allowed): the list of known names, at least one."""
    known = list(known)

    def parse(text: str) -> list[str]:
        try:
            names = _parse_list(text, aliases, known, what)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        if not names:
            raise argparse.ArgumentTypeError(f"give at least one {what}, comma-separated, from {', '.join(known)}")
        return names

    parse.__name__ = what
    return parse


def _batch_arg(text: str) -> list[int]:
    try:
        sizes = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"takes comma-separated positive batch sizes like 1,8; got {text!r}")
    return sizes


def _float(text: str) -> float | None:
    try:
        v = float(text)
    except ValueError:
        return None
    return None if v != v else v  # NaN


def _nonnegative_arg(unit: str):
    """type= for a number >= 0 of `unit` (cores, seconds)."""
    def parse(text: str) -> float:
        v = _float(text)
        if v is None or v < 0:
            raise argparse.ArgumentTypeError(f"takes a number of {unit} >= 0; got {text!r}")
        return v

    parse.__name__ = unit
    return parse


def _deadline_arg(text: str) -> float:
    """Seconds; zero or negative means start no case (a session script's remaining time can run out)."""
    v = _float(text)
    if v is None:
        raise argparse.ArgumentTypeError(f"takes a number of seconds like 600; got {text!r}")
    return v


def _seed_arg(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = None
    if v is None or not -(2 ** 63) <= v < 2 ** 64:  # torch.manual_seed's range
        raise argparse.ArgumentTypeError(f"takes an integer (torch.manual_seed's range, e.g. 0); got {text!r}")
    return v


def _tiles_arg(text: str) -> str:
    if not text.strip():
        return text
    from jaxvit.kernels import Tiles

    try:
        Tiles.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _memory_check_arg(text: str) -> str:
    if text not in ("all", "none", ""):
        try:
            _parse_list(text, METHOD_ALIASES, METHODS, "method")
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{e}, or all, or none") from None
    return text


def _out_arg(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("takes a folder path; got an empty one")
    if Path(text).exists() and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder; give a folder for results.json and "
                                         "results.md")
    return text


def _label_arg(text: str) -> str:
    if text.strip() in ("", ".", "..") or "/" in text or os.sep in text:
        raise argparse.ArgumentTypeError(f"takes a folder name without path separators, e.g. cpu-2core; got {text!r}")
    return text


def _os_reason(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__


RESULT_KEYS = {"environment": dict, "records": list, "memory_mode": str}
ENV_KEYS = ("device", "date", "command", "jax_backend")
RECORD_KEYS = ("model", "dtype", "method", "impl", "batch")


def _results_problem(result) -> str | None:
    """Why `result` is not a results.json that `python -m bench` wrote; None if it renders."""
    if not isinstance(result, dict):
        return f"holds a JSON {type(result).__name__}, not an object"
    for key, kind in RESULT_KEYS.items():
        if not isinstance(result.get(key), kind):
            return f"has no {key!r} {kind.__name__}"
    missing = [k for k in ENV_KEYS if k not in result["environment"]]
    if missing:
        return f"its environment lacks {', '.join(map(repr, missing))}"
    for rec in result["records"]:
        if not isinstance(rec, dict) or not all(k in rec for k in RECORD_KEYS):
            return f"a record lacks one of {', '.join(RECORD_KEYS)}"
    if not isinstance(result.get("notes", []), list):
        return "its 'notes' is not a list"
    try:
        render_markdown(result)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        return f"does not render ({_err(e)})"
    return None


def _results_arg(text: str) -> tuple[Path, dict]:
    """type= for --render and --merge: (path, the results it holds), read and checked at parse time."""
    path = Path(text)
    try:
        result = json.loads(path.read_text())
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot read {text}: {_os_reason(e)}; give the results.json a run wrote") \
            from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise argparse.ArgumentTypeError(f"{text} is not JSON ({str(e).splitlines()[0][:120]}); give the "
                                         "results.json a run wrote") from None
    problem = _results_problem(result)
    if problem:
        raise argparse.ArgumentTypeError(f"{text} is not a results.json of python -m bench: {problem}")
    return path, result


USAGE = ("python -m bench [--tiny] [--models M,...] [--methods M,...] [--batch N,...] [--dtypes D,...] [options]\n"
         "       python -m bench --render RESULTS_JSON [--note TEXT]\n"
         "       python -m bench --merge RESULTS_JSON [RESULTS_JSON ...] --out DIR [--note TEXT]\n"
         "(python -m bench --help lists every option)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0], usage=USAGE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=_names_arg(MODELS, MODEL_ALIASES, "model"),
                   help=f"comma list of {', '.join(MODELS)} (default: GPU all but tiny, CPU vit_s16,vit_b16)")
    p.add_argument("--methods", type=_names_arg(METHODS, METHOD_ALIASES, "method"),
                   help=f"comma list of {', '.join(METHODS)} (default: all)")
    p.add_argument("--batch", type=_batch_arg,
                   help="comma list of batch sizes (default: GPU 1 and 256, 128 for ViT-L; CPU 1,8)")
    p.add_argument("--dtypes", type=_names_arg(["fp32", "bf16", *FP8_DTYPES], {}, "dtype"),
                   help=f"comma list of fp32, bf16, {', '.join(FP8_DTYPES)} (default: GPU fp32,bf16; CPU fp32); fp8 "
                        "rows: the bf16 model with e4m3 block GEMMs (jaxvit.ViT(gemm=<dtype>); _mlp: fc1 and fc2 only, "
                        "_fast: cuBLASLt's fast accumulation), "
                        "JAX only, parity against the torch fp32 maps within FP8_TOL")
    p.add_argument("--impls", type=_names_arg(["torch", "jax"], {}, "impl"), default="torch,jax",
                   help="comma list of torch, jax (default both)")
    p.add_argument("--repeats", type=int_at_least(1), help="timed calls at batch 1 (default 20)")
    p.add_argument("--large-repeats", type=int_at_least(1), help="timed calls at larger batches (default GPU 20, CPU 10)")
    p.add_argument("--warmup", type=int_at_least(0), help="untimed calls first (default 2)")
    p.add_argument("--fp32-precision", choices=("highest", "tf32"), default="highest",
                   help="fp32 matmuls: 'highest' = true fp32 in both (default); 'tf32' = JAX default precision and "
                        "torch TF32 allowed (parity tolerance 1e-2)")
    p.add_argument("--memory", choices=("auto", "device", "rss", "off"), default="auto",
                   help="memory overhead: device (GPU stats; JAX in subprocesses), rss (CPU RSS growth), off")
    p.add_argument("--out", type=_out_arg, help="output folder (default bench/results/<device-slug>)")
    p.add_argument("--device-label", type=_label_arg,
                   help="the device slug of the default output folder, e.g. cpu-2core")
    p.add_argument("--note", action="append", default=[], help="a line for the results file (load, context)")
    p.add_argument("--wait-quiet", type=_nonnegative_arg("cores"), metavar="CORES",
                   help="shared machine: before each case wait until other processes use at most CORES cores "
                        "(Linux /proc/stat), and measure a case again (3 tries) when they used more during it")
    p.add_argument("--wait-quiet-max", type=_nonnegative_arg("seconds"), default=1800,
                   help="longest wait per case, s (default 1800)")
    p.add_argument("--bf16-weights", choices=("cast", "fp32"), default="cast",
                   help="bf16 rows: store the block matmul weights in bf16 (cast, default; bit-identical outputs) "
                        "or keep fp32 params cast on every call; fp8 rows with cast also store e4m3 weights and "
                        "calibrated input scales (jaxvit.fp8.prequantize, calibrate), with fp32 take every scale per call")
    p.add_argument("--kernels", choices=KERNEL_IMPLS, default="xla",
                   help="JAX half-precision rows: jaxvit.ViT(kernels=...): XLA's fusions (default) or jaxvit.kernels' "
                        "Pallas kernels (LayerNorm, fc1+GELU, the prediction-map normaliser: all, or one of them)")
    p.add_argument("--gelu", choices=gelu_opt.GELUS, default="erf",
                   help="JAX half-precision rows: jaxvit.ViT(gelu=...): exact erf GELU (default, timm's) or the tanh "
                        "approximation, which XLA:GPU can fold into fc1's cuBLASLt epilogue (with "
                        "XLA_FLAGS=--xla_gpu_enable_cublaslt=true; bench/NOTES.md)")
    p.add_argument("--kernel-tiles", type=_tiles_arg, default="",
                   help="tiles of those kernels, jaxvit.kernels.Tiles text, e.g. 'layer_norm=8,4;dense=128,256,64,8,3;"
                        "head=128,128,64,4,4' "
                        "(default: the library's)")
    p.add_argument("--memory-check", type=_memory_check_arg, default=HEADLINE,
                   help="GPU: comma list of methods whose JAX memory is measured in a fresh subprocess (default "
                        f"{HEADLINE}; 'all'; 'none'); other JAX rows report XLA's static plan (temp + outputs)")
    p.add_argument("--deadline", type=_deadline_arg, metavar="S",
                   help="stop starting new cases after S seconds (the results so far are written after every case)")
    p.add_argument("--no-interleaved", dest="interleaved", action="store_false",
                   help="skip timing the target rows (torch forward, torch PredicAtt_L, JAX PredicAtt_L, JAX "
                        "headline) again round-robin at the large batch; the targets then use the separate cases")
    p.add_argument("--no-bounds", dest="bounds", action="store_false",
                   help="skip the bounds (bench/bounds.py: matmul rate, the model's GEMMs alone, compute floor) "
                        "measured after each model's cases")
    p.add_argument("--seed", type=_seed_arg, default=0, help="weight seed (default 0)")
    p.add_argument("--tiny", action="store_true",
                   help="CI smoke run: ViT-Ti depth 2 at 64x64, batch 2, fp32, one repeat")
    p.add_argument("--verbose", action="store_true")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--render", type=_results_arg, metavar="RESULTS_JSON",
                      help="only re-write results.md beside RESULTS_JSON from it (adding any --note lines)")
    mode.add_argument("--merge", type=_results_arg, nargs="+", metavar="RESULTS_JSON",
                      help="combine the records of several runs on one device (e.g. the invocations of one GPU "
                           "session) into --out/results.{json,md}; the first file's environment heads it")
    p.add_argument("--_memory-child", dest="memory_child", help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.memory_child:
        try:
            spec = json.loads(args.memory_child)
        except ValueError as e:  # internal: written by run_memory_child, never by hand
            parser.error(f"--_memory-child takes the JSON case spec run_memory_child writes ({e})")
        res = memory_child(spec)
        print("MEMCHILD " + json.dumps(res), flush=True)
        return 0
    if args.render:
        path, result = args.render
        result["notes"] = list(dict.fromkeys(result.get("notes", []) + args.note))
        added = add_missing_spreads(result)
        if added:
            print(f"round-by-round spread added to {len(added)} stored target check(s) from their interleaved times",
                  file=sys.stderr)
        md = render_markdown(result)
        try:
            path.write_text(json.dumps(result, indent=1, default=float))
            (path.parent / "results.md").write_text(md)
        except OSError as e:
            parser.error(f"--render: cannot write beside {path}: {_os_reason(e)}; render a copy in a writable folder")
        print(md)
        return 0

    if args.merge:
        if not args.out:
            parser.error("--merge needs --out DIR: the folder to write the merged results.{json,md} to")
        devices = {}
        for path, r in args.merge:
            devices.setdefault(r["environment"]["device"], []).append(str(path))
        if len(devices) != 1:
            parser.error("--merge takes runs on one device; got " + "; ".join(
                f"{d!r} ({', '.join(files)})" for d, files in sorted(devices.items())))
        try:
            result = merge_results([r for _, r in args.merge])
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            parser.error(f"--merge: these files do not combine ({_err(e)}); pass results.json files written by "
                         "python -m bench")
        result["notes"] = list(dict.fromkeys(result["notes"] + args.note))
        out = Path(args.out)
        md = render_markdown(result)
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / "results.json").write_text(json.dumps(result, indent=1, default=float))
            (out / "results.md").write_text(md)
        except OSError as e:
            parser.error(f"--out {out}: cannot write the merged results: {_os_reason(e)}; choose a writable folder")
        print(md)
        return 0

    try:  # jaxvit's own rule for which kernel sets tanh GELU refuses
        gelu_opt.check(args.gelu, pallas_parts(args.kernels))
    except ValueError as e:
        parser.error(f"--gelu {args.gelu} with --kernels {args.kernels}: {e}")
    try:  # jaxvit's own rule for which kernel sets an fp8 model refuses
        for d in set(args.dtypes or []) & set(FP8_DTYPES):
            fp8.check(d, pallas_parts(args.kernels))
    except ValueError:
        parser.error(f"--dtypes {','.join(args.dtypes)} with --kernels {args.kernels}: the fp8 rows quantise fc1, "
                     "which that kernel set runs as a Pallas bf16 kernel; use --kernels xla, pallas_layernorm, "
                     "pallas_head or pallas_layernorm_head")
    import jax
    import torch

    gpu = jax.default_backend() == "gpu"
    if args.memory == "device" and not gpu:
        parser.error(f"--memory device reads GPU memory statistics; JAX runs on {jax.default_backend()} here: "
                     "use --memory rss (or auto)")
    if args.memory == "rss" and not rss_supported():
        parser.error("--memory rss resets and reads this process's peak resident set (/proc/self/clear_refs, "
                     "VmHWM), which this system does not allow: use --memory off (auto falls back to off)")
    if args.tiny:
        models = args.models or ["tiny"]
        batch_list = args.batch or [2]
        dtypes = args.dtypes or ["fp32"]
        args.repeats = args.repeats or 1
        args.large_repeats = args.large_repeats or 1
        args.warmup = 1 if args.warmup is None else args.warmup
    else:
        models = args.models or (["vit_s16", "vit_b16", "vit_l16"] if gpu else ["vit_s16", "vit_b16"])
        batch_list = args.batch
        dtypes = args.dtypes or (["fp32", "bf16"] if gpu else ["fp32"])
        args.repeats = args.repeats or 20
        args.large_repeats = args.large_repeats or (20 if gpu else 10)
        args.warmup = 2 if args.warmup is None else args.warmup
    methods = args.methods or list(METHODS)
    impls = args.impls

    def batches_for(mkey):
        if batch_list:
            return sorted(set(batch_list))
        return [1, GPU_LARGE_BATCH[mkey] if gpu else CPU_LARGE_BATCH]

    runner = Runner(args)
    env = environment(args, runner.tdev)
    load_start = _loadavg()
    t0 = time.perf_counter()
    out = Path(args.out) if args.out else REPO / "bench" / "results" / (args.device_label or device_slug(env))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        parser.error(f"--out {out}: cannot create the output folder: {_os_reason(e)}; choose a writable folder")
    mem_mode = {"device": "GPU: torch max_memory_allocated - memory_allocated before; JAX peak_bytes_in_use - "
                          "bytes_in_use before, second call after compiling (as torch's, after warm-up; where its peak stays under "
                          "the first call's, a third call over a balloon that lifts bytes in use to that peak, which reads exactly) "
                          "in a fresh subprocess per "
                          f"(model, dtype, method) for {', '.join(sorted(runner.memory_check)) or 'no method'}; "
                          "other JAX rows: XLA's static allocation plan (temp + outputs), marked *",
                "rss": "CPU: growth of this process's resident set during one call (VmHWM reset through "
                       "/proc/self/clear_refs, minus VmRSS before); approximate: memory the allocator keeps from "
                       "earlier calls does not show, so small overheads read low",
                "off": "not measured"}[runner.mem_mode]

    def write(final: bool) -> dict:
        # cases measured again after a disturbance are no longer in the records; their samples do not count
        foreign = [r["other_processes_cores"] for r in runner.records if r.get("other_processes_cores") is not None]
        notes = list(args.note)
        if runner.stopped_early:
            notes.append(runner.stopped_early)
        if not final:
            notes.append("partial: written while the run was in progress")
        result = {
            "environment": env,
            "memory_mode": mem_mode,
            "load": {"start": load_start, "end": _loadavg(),
                     "max_1min": max((l[0] for l in runner.loads), default=None),
                     "other_processes_cores_mean": (round(statistics.mean(foreign), 3) if foreign else None),
                     "other_processes_cores_max": max(foreign, default=None)} if load_start else None,
            "notes": notes,
            "tolerances": {"fp32": FP32_TOL if args.fp32_precision == "highest" else TF32_TOL,
                           "bf16": f"max({BF16_TOL}, 2 x the torch version's bf16 error), images whose predicted "
                                   "class agrees with fp32",
                           **{dt: f"{FP8_TOL} against the torch fp32 maps, images whose predicted class agrees with "
                                  "fp32" for dt in FP8_DTYPES if dt in dtypes}},
            "wall_s": time.perf_counter() - t0,
            "skipped_jax_methods": getattr(runner, "skipped", []),
            "records": runner.records,
            "bounds": runner.bounds,
            "interleaved": runner.interleaved,
        }
        result["target_checks"] = target_checks(runner.records, gpu, runner.bounds, runner.interleaved)
        (out / "results.json").write_text(json.dumps(result, indent=1, default=float))
        (out / "results.md").write_text(render_markdown(result))
        return result

    runner.on_record = lambda: write(final=False)
    _log(f"bench on {env['device']} (jax {jax.__version__}, torch {torch.__version__}); load {load_start}")
    runner.run(models, methods, dtypes, batches_for, impls)
    result = write(final=True)
    print(render_markdown(result))
    _log(f"wrote {out / 'results.md'} and {out / 'results.json'} ({result['wall_s']:.0f} s)")
    bad = [r for r in runner.records if r.get("error") or (r.get("parity") or {}).get("status") == "FAIL"]
    return 1 if bad else 0
