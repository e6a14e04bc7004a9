"""`python -m bench.gpu_probe`: where the headline's time goes on an accelerator, and which levers move it.

A probe, not the benchmark (`python -m bench` is that): JAX only, random jaxvit weights, ViT-B/16 in
bf16 unless told otherwise. It times the headline (PredicAtt_L + PredicAtt_{L-1} of the predicted
class, one jit) and the bare forward under variants of the implementation, and the pieces that bound
them:

  variants   forward / headline with block weights cast to bf16 (jaxvit.cast_params) or fp32,
             attention through cuDNN (the default on GPU in half precision), through jaxvit's own
             heads-first kernel, or materialised; the prediction-column normaliser chunked (default)
             or as one GEMM; tanh GELU (ViT(gelu="tanh"), for cuBLASLt's GELU epilogue); fp8 block GEMMs
             (ViT(gemm=...), weights and scales as the benchmark's fp8 rows). Each records
             its compiled cuBLAS(Lt) calls and their epilogues (`gemm_epilogues`).
  floors     a large matmul (the card's matrix rate) and each dense layer's GEMM at the model's
             shapes, alone (both from bench.bounds); cuDNN attention alone (x L).
  kernels    jaxvit.kernels' Pallas LayerNorm, fc1+GELU and prediction-map normaliser against XLA's,
             alone at the model's shapes, for a few tiles each (with their errors); the fastest
             correct tiles are what the headline_pallas* variants (ViT(kernels=...)) run with.

XLA flags are process-wide, so `--xla-flags-sets` re-runs this script in a subprocess per set.
Results go to a JSON file, rewritten after every measurement, so a run cut short keeps what it did.
The variants themselves (what each changes, how it is built): `bench.probe_variants`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

# after the allocator setting, before any backend starts
from bench.probe_variants import (COMPILE_OPTIONS, DEFAULT_VARIANTS, MODEL_NAMES, PALLAS_VARIANTS,  # noqa: E402
                                  VARIANTS, build_variant, config_for, jaxvit_model, random_params, variant_kernels)

# tiles tried by `tune_kernels`: (block_rows, num_warps) and (block_m, block_n, block_k, num_warps, num_stages)
LAYER_NORM_TILES = ((4, 4), (8, 4), (8, 8), (16, 8), (2, 2))
DENSE_TILES = ((128, 128, 64, 4, 4), (128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (64, 128, 64, 4, 4),
               (128, 256, 32, 8, 4), (256, 128, 64, 8, 3))
HEAD_TILES = ((128, 128, 64, 4, 4), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4))


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


def timeit(fn, args, warmup, repeats):
    """(median, min) seconds of fn(*args), device synchronised: the benchmark's own timing loop."""
    import jax

    from bench.timing import time_calls

    _, times = time_calls(lambda: fn(*args), jax.block_until_ready, warmup, repeats)
    return statistics.median(times), min(times)


def merge_xla_flags(current: str, extra: str) -> str:
    """XLA_FLAGS with `extra`'s flags added, each replacing a flag of the same name in `current`, so a
    flag set can also switch a CLI default back (`--xla_gpu_enable_triton_gemm=true`)."""
    names = {f.split("=")[0] for f in extra.split()}
    return " ".join([f for f in current.split() if f.split("=")[0] not in names] + extra.split())


def _largest_run(entries: dict, variant: str) -> tuple[int, float] | None:
    """(batch, median ms) of `variant` at its largest timed batch among probe entries ('<variant>_b<batch>')."""
    runs = [(v["batch"], v["median_ms"]) for k, v in entries.items()
            if k.startswith(variant + "_b") and k[len(variant) + 2:].isdigit() and "median_ms" in v]
    return max(runs) if runs else None


def best_flag_set(probe: dict, variant: str = "headline", margin: float = 0.02) -> str | None:
    """The XLA_FLAGS of the flag set whose `variant` at the largest batch ran at least `margin`
    faster than the baseline in `probe` (a probe JSON), else None. The GPU session re-times the
    benchmark's rows under it, so a flag worth making a default is measured in the table itself."""
    base = _largest_run(probe.get("variants", {}), variant)
    if base is None:
        return None
    best, best_ms = None, base[1] * (1 - margin)
    for entry in probe.get("flag_sets", {}).values():
        run = _largest_run(entry, variant)
        if run and run[0] == base[0] and run[1] < best_ms:
            best, best_ms = entry["XLA_FLAGS"], run[1]
    return best


def best_kernels(probe: dict, margin: float = 0.02) -> tuple[str, str] | None:
    """(ViT kernels, tiles text) of the headline_pallas* variant that ran at least `margin` faster than
    `headline` at the largest batch in `probe` (a probe JSON), else None: the GPU session re-times the
    benchmark's rows with it (`python -m bench --kernels ... --kernel-tiles ...`)."""
    variants = probe.get("variants", {})
    base = _largest_run(variants, "headline")
    if base is None:
        return None
    best, best_ms = None, base[1] * (1 - margin)
    for name in PALLAS_VARIANTS:
        run = variants.get(f"{name}_b{base[0]}", {})
        if run.get("median_ms", float("inf")) < best_ms:
            best, best_ms = name, run["median_ms"]
    return None if best is None else (variant_kernels(best), probe.get("kernels", {}).get("tiles", ""))


def gemm_epilogues(hlo_text: str) -> dict:
    """{custom-call target or 'target epilogue': count} of the GEMM custom calls in optimised HLO text:
    '__cublas$lt$matmul BIAS_GELU' is fc1 with its bias and GELU in cuBLASLt's epilogue."""
    import collections
    import re

    calls = collections.Counter()
    for line in hlo_text.splitlines():
        target = re.search(r'custom_call_target="(__cublas[^"]*)"', line)
        if target:
            epilogue = re.search(r'"epilogue":"(\w+)"', line)
            calls[target.group(1) + (f" {epilogue.group(1)}" if epilogue else "")] += 1
    return dict(calls)


def output_deviation(name: str, out: dict, refs: dict) -> dict:
    """{'maps_vs_headline' or 'logits_vs_forward': ||out - ref|| / ||ref||} against the same batch's headline maps
    or forward logits in `refs` (which `headline` and `forward` themselves fill), so a variant's timing is read
    with whether it computes what the default computes (bf16 variants ~1e-2, fp8 ~5e-2; a broken kernel ~1)."""
    import numpy as np

    for key, ref_name in (("maps", "headline"), ("logits", "forward")):
        if key not in out:
            continue
        got = np.asarray(out[key], np.float64)
        if name == ref_name:
            refs[key] = got
        elif key in refs and refs[key].shape == got.shape:
            return {f"{key}_vs_{ref_name}": float(np.linalg.norm(got - refs[key]) / np.linalg.norm(refs[key]))}
    return {}


def _time_or_error(fn, args, warmup, repeats):
    """{'ms': median of jit(fn)(*args)} or {'error': ...} (a tile Triton cannot compile, say)."""
    import jax

    try:
        med, _ = timeit(jax.jit(fn), args, warmup, repeats)
        return {"ms": med * 1e3}
    except Exception as e:
        return {"error": f"{type(e).__name__}: {str(e)[:300]}"}


def tune_kernels(cfg, batch, dtype, warmup, repeats, late=lambda what: False):
    """jaxvit.kernels against what XLA runs in their place, alone, at the model's shapes for `batch`
    images, for each tile in LAYER_NORM_TILES / DENSE_TILES / HEAD_TILES:
      layer_norm  x (rows, D), rows = batch x tokens (the model's one-pass half-precision LayerNorm);
      dense       fc1 + activation, (rows, D) @ (D, mlp_dim) (nn.Dense, then the activation);
      head        the prediction-map normaliser of one layer, logsumexp over the classes of
                  (batch x patches, D) @ (D, C) (predmaps.core's class-chunked form).
    A tile counts only if it is correct: layer_norm and dense within one bf16 rounding step (2^-7 of the
    largest magnitude) of the reference, head within 1e-3 absolute (the relative error it puts on every
    probability). Returns the timings, the errors, what the fastest correct tile saves per headline call
    (`saves_ms_per_call`: x 2L LayerNorms, x L fc1, x 2 layers' normalisers) and `tiles`: the fastest
    correct tiles as `jaxvit.kernels.Tiles` text."""
    import jax
    import jax.numpy as jnp

    import jaxvit.model as jm
    import predmaps.core as core
    from jaxvit import kernels as K

    rows, d, f = batch * (cfg.num_patches + cfg.num_prefix_tokens), cfg.embed_dim, cfg.mlp_dim
    keys = iter(jax.random.split(jax.random.key(0), 8))
    normal = lambda shape, scale=1.0: scale * jax.random.normal(next(keys), shape)
    x = (normal((rows, d), 3.0) + 1).astype(dtype)
    scale, bias = 1 + normal((d,), 0.1), normal((d,), 0.1)
    w, b = normal((d, f), d ** -0.5).astype(dtype), normal((f,), 0.1).astype(dtype)
    xn = K.layer_norm_reference(x, scale, bias, cfg.norm_eps, dtype)
    patches = xn[:batch * cfg.num_patches].reshape(batch, cfg.num_patches, d)  # (B, N, D), as predmaps passes it
    wh, bh = normal((d, cfg.num_classes), 2 * d ** -0.5), normal((cfg.num_classes,))  # logits ~ N(0, 4)
    act = jm.activation(cfg.act)

    def rel(got, want):
        got, want = jnp.asarray(got, jnp.float32), jnp.asarray(want, jnp.float32)
        return float(jnp.abs(got - want).max() / jnp.abs(want).max())

    def abs_err(got, want):
        return float(jnp.abs(jnp.asarray(got, jnp.float32) - jnp.asarray(want, jnp.float32)).max())

    ln_xla = lambda x: jm.LayerNorm(cfg.norm_eps, dtype).apply({"params": {"scale": scale, "bias": bias}}, x)
    kinds = {  # kind: (XLA fn, args, reference output, tiles, make kernel fn, error, tolerance, per call, supported)
        "layer_norm": (ln_xla, (x,), jax.jit(ln_xla)(x), LAYER_NORM_TILES,
                       lambda t: lambda x: K.layer_norm(x, scale, bias, cfg.norm_eps, dtype, K.LayerNormConfig(*t)),
                       rel, 2 ** -7, 2 * cfg.depth, lambda t: True),
        "dense": (lambda x, w, b: act(x @ w + b), (xn, w, b), K.dense_act_reference(xn, w, b, cfg.act), DENSE_TILES,
                  lambda t: lambda x, w, b: K.dense_act(x, w, b, cfg.act, K.DenseConfig(*t)),
                  rel, 2 ** -7, cfg.depth, lambda t: K.dense_act_supported(d, f, dtype, K.DenseConfig(*t))),
        "head": (lambda x, w, b: core._logsumexp_chunked(x, w, b), (patches, wh, bh),
                 K.dense_logsumexp_reference(patches, wh.astype(dtype), bh), HEAD_TILES,
                 lambda t: lambda x, w, b: K.dense_logsumexp(x, w.astype(dtype), b, K.DenseConfig(*t)),
                 abs_err, 1e-3, 2, lambda t: K.dense_logsumexp_supported(d, dtype, K.DenseConfig(*t))),
    }
    res, best = {"rows": rows}, {}
    for kind, (xla_fn, args, want, tiles, make, error, tol, per_call, supported) in kinds.items():
        res[kind] = {"xla": _time_or_error(xla_fn, args, warmup, repeats)}
        for t in tiles:
            key = ",".join(map(str, t))
            if late(f"kernels {kind} {key}"):
                continue
            if not supported(t):
                res[kind][key] = {"error": "tile does not divide the shapes"}
                continue
            fn = make(t)
            entry = _time_or_error(fn, args, warmup, repeats)
            if "ms" in entry:
                entry["error_vs_reference"] = error(jax.jit(fn)(*args), want)
                entry["ok"] = entry["error_vs_reference"] <= tol
                if entry["ok"] and entry["ms"] < best.get(kind, (None, float("inf")))[1]:
                    best[kind] = (t, entry["ms"])
            res[kind][key] = entry
            _log(f"kernels {kind} {key}: {json.dumps(entry)}")
        if kind in best and "ms" in res[kind]["xla"]:
            res[kind]["saves_ms_per_call"] = (res[kind]["xla"]["ms"] - best[kind][1]) * per_call
    pick = lambda kind, cls: cls(*best[kind][0]) if kind in best else cls()
    res["tiles"] = str(K.Tiles(pick("layer_norm", K.LayerNormConfig), pick("dense", K.DenseConfig),
                               pick("head", K.DenseConfig)))
    return res


def attention_floor(cfg, batch, dtype, warmup, repeats):
    import jax

    from jaxvit.model import _heads_first_attention

    t = cfg.num_patches + cfg.num_prefix_tokens
    shape = (batch, t, cfg.num_heads, cfg.dim_head)
    q, k, v = (jax.random.normal(jax.random.key(i), shape, dtype) for i in range(3))
    res = {}
    for impl in ("cudnn", "xla"):
        try:
            fn = jax.jit(lambda a, b, c, impl=impl: jax.nn.dot_product_attention(a, b, c, implementation=impl))
            med, _ = timeit(fn, (q, k, v), warmup, repeats)
            res[impl] = {"ms": med * 1e3, "all_blocks_ms": med * cfg.depth * 1e3}
        except Exception as e:
            res[impl] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    own = jax.jit(lambda a, b, c: _heads_first_attention(a, b, c, cfg.dim_head ** -0.5, dtype))
    med, _ = timeit(own, (q, k, v), warmup, repeats)
    res["own"] = {"ms": med * 1e3, "all_blocks_ms": med * cfg.depth * 1e3}
    return res


def profile_summary(fn, args, calls, trace_dir, top=400):
    """Trace `calls` calls of fn and sum the device events: per device line (stream) the busy time,
    and the top events grouped by XLA op (the `hlo_op` stat; the event name where absent).

    A CPU backend's trace has no device plane: there the events of the host threads that carry an
    `hlo_op` stat are XLA:CPU's ops (each on the thread that runs it, its thread-pool work inside),
    and the rest (Python, thread-pool bookkeeping) is left out. Independent ops run concurrently
    there, so the sums are thread time and can exceed the call's wall time (bench/NOTES.md)."""
    import glob
    from collections import defaultdict

    import jax
    from jax.profiler import ProfileData

    jax.block_until_ready(fn(*args))
    with jax.profiler.trace(trace_dir):
        for _ in range(calls):
            jax.block_until_ready(fn(*args))
    files = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))
    if not files:
        return {"error": "no xplane.pb written"}
    data = ProfileData.from_file(files[-1])
    lines, ops = {}, defaultdict(lambda: [0.0, 0, ""])
    planes = [plane.name for plane in data.planes]
    host = not any(name.startswith("/device:") for name in planes)
    for plane in data.planes:
        if not plane.name.startswith("/host:CPU" if host else "/device:"):
            continue
        for line in plane.lines:
            total, n = 0.0, 0
            for ev in line.events:
                stats = {}
                try:
                    stats = dict(ev.stats)
                except Exception:
                    pass
                if host and "hlo_op" not in stats:
                    continue
                total += ev.duration_ns
                n += 1
                key = (line.name, str(stats.get("hlo_op") or ev.name))
                ops[key][0] += ev.duration_ns
                ops[key][1] += 1
                ops[key][2] = ops[key][2] or ev.name[:160]
            if n:
                lines[f"{plane.name} | {line.name}"] = {"busy_ms_per_call": total / calls / 1e6, "events": n}
    ranked = sorted(ops.items(), key=lambda kv: -kv[1][0])[:top]
    kinds = defaultdict(lambda: [0.0, 0])
    for (_, op), (ns, n, _) in ops.items():
        kind = op.split(".")[0]  # 'loop_multiply_fusion.7' -> 'loop_multiply_fusion'
        kinds[kind][0] += ns
        kinds[kind][1] += n
    return {"planes": planes, "calls": calls, "lines": lines,
            "by_kind": {k: {"ms_per_call": v[0] / calls / 1e6, "events_per_call": v[1] / calls}
                        for k, v in sorted(kinds.items(), key=lambda kv: -kv[1][0])},
            "top_ops": [{"line": k[0], "op": k[1], "ms_per_call": v[0] / calls / 1e6, "events": v[1],
                         "kernel": v[2]} for k, v in ranked]}


def _variants_arg(text: str) -> str:
    """type= for a comma list of variant names (may be empty): the text itself, its names checked."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    return ",".join(names)


def _batches_arg(text: str) -> str:
    from bench.run import _batch_arg

    return ",".join(map(str, _batch_arg(text)))  # re-passed as text to the flag sets' subprocesses


def _probe_tiles_arg(text: str) -> str:
    from bench.run import _tiles_arg

    return text if text == "auto" else _tiles_arg(text)


def _json_out_arg(text: str) -> str:
    """The results file is first written after a measurement, minutes in: a path that cannot take it is
    refused before anything runs."""
    path = Path(text)
    if not text.strip():
        raise argparse.ArgumentTypeError("takes a JSON file path; got an empty one")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"takes a JSON file path; got a folder, {text!r}")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{path.parent} is not a folder; create it first")
    if not os.access(path.parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write to {path.parent}; choose a writable folder")
    return text


def main(argv=None) -> int:
    from bench.run import _deadline_arg
    from predmaps.runtime import int_at_least

    p = argparse.ArgumentParser(prog="python -m bench.gpu_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_b16", choices=list(MODEL_NAMES))
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--variants", type=_variants_arg, default=",".join(DEFAULT_VARIANTS),
                   help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--batches", type=_batches_arg, default="256,1")
    p.add_argument("--b1-variants", type=_variants_arg, default="headline,headline_materialized",
                   help="variants also timed at batch 1 (latency)")
    p.add_argument("--floors", action="store_true", help="also time the matmul, GEMM and attention floors")
    p.add_argument("--xla-flags-sets", default="",
                   help="';'-separated XLA_FLAGS values, each re-running --flag-set-variants in a subprocess; "
                        "a flag named there replaces the same flag in XLA_FLAGS (the CLI defaults included)")
    p.add_argument("--flag-set-variants", type=_variants_arg, default="headline",
                   help="variants timed under each --xla-flags-sets entry (at --batches; batch 1: headline only)")
    p.add_argument("--matmul-n", type=int_at_least(1), default=8192, help="size of the square matmul of the ceiling")
    p.add_argument("--repeats", type=int_at_least(1), default=20)
    p.add_argument("--warmup", type=int_at_least(0), default=3)
    p.add_argument("--deadline", type=_deadline_arg, default=1e9, help="start nothing new after S seconds")
    p.add_argument("--kernel-tiles", type=_probe_tiles_arg, default="auto",
                   help="tiles of the headline_pallas* variants: 'auto' (the fastest correct ones of the kernels "
                        "stage, run first when such a variant is asked for) or jaxvit.kernels.Tiles text")
    p.add_argument("--profile", action="store_true",
                   help="trace --profile-variant at --profile-batch and summarise device time by XLA op")
    p.add_argument("--profile-variant", default="headline", choices=VARIANTS)
    p.add_argument("--profile-batch", type=int_at_least(1), default=None,
                   help="batch of the trace (default: the largest of --batches); it runs right after that batch's "
                        "variants, so a deadline that cuts later batches leaves it")
    p.add_argument("--out", type=_json_out_arg, required=True, help="JSON file, rewritten after every measurement")
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",") if b]
    if args.profile and args.profile_batch and args.profile_batch not in batches:
        p.error(f"--profile-batch {args.profile_batch} is not one of --batches {args.batches}")

    from bench.bounds import jax_dense_gemms, jax_matmul_peak
    from predmaps.runtime import configure_xla_flags

    configure_xla_flags()  # the baseline is what the CLI runs; --xla-flags-sets add to it
    import jax
    import jax.numpy as jnp

    t_start = time.perf_counter()
    dtype = jnp.bfloat16 if args.dtype == "bf16" else jnp.float32
    if args.dtype == "fp32":  # true fp32 everywhere, as the benchmark's default and the floors use
        jax.config.update("jax_default_matmul_precision", "highest")
    cfg = config_for(args.model)
    size = cfg.img_size[0]
    variants = [v for v in args.variants.split(",") if v]
    b1_variants = [v for v in args.b1_variants.split(",") if v]
    res = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "jax": jax.__version__,
           "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""), "model": args.model, "dtype": args.dtype,
           "fp32_matmul_precision": "highest" if args.dtype == "fp32" else None,
           "warmup": args.warmup, "repeats": args.repeats,
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "variants": {}, "floors": {},
           "flag_sets": {}}
    out_path = Path(args.out)

    def save():
        out_path.write_text(json.dumps(res, indent=1))

    def late(what):
        if time.perf_counter() - t_start > args.deadline:
            res.setdefault("skipped", []).append(what)
            save()
            return True
        return False

    def floors():
        big = max(batches)
        for what, fn in (("matmul", lambda: jax_matmul_peak(args.dtype, args.matmul_n, args.warmup, args.repeats)),
                         (f"gemms_b{big}", lambda: jax_dense_gemms(cfg, big, args.dtype, args.warmup, args.repeats)),
                         (f"attention_b{big}", lambda: attention_floor(cfg, big, dtype, args.warmup, args.repeats))):
            if late(what):
                continue
            try:
                res["floors"][what] = fn()
            except Exception as e:
                res["floors"][what] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            _log(f"{what}: {json.dumps(res['floors'][what])[:300]}")
            save()

    tiles = "" if args.kernel_tiles == "auto" else args.kernel_tiles
    if args.kernel_tiles == "auto" and set(variants) & set(PALLAS_VARIANTS) and not late("kernels"):
        try:
            res["kernels"] = tune_kernels(cfg, max(batches), dtype, args.warmup, args.repeats, late)
            tiles = res["kernels"]["tiles"]
        except Exception as e:
            res["kernels"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        _log(f"kernels: tiles {tiles or 'default'}")
        save()

    def profile(batch):
        if late("profile"):
            return
        try:
            fn, params, ctx = build_variant(args.profile_variant, cfg, dtype, params32, tiles)
            x = jax.random.normal(jax.random.key(5), (batch, size, size, 3), jnp.float32)
            with ctx():
                compiled = fn.lower(params, x).compile(COMPILE_OPTIONS.get(args.profile_variant))
            res["profile"] = profile_summary(compiled, (params, x), 5, str(out_path.with_suffix("")) + "_trace")
        except Exception as e:
            res["profile"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        res["profile"].update(variant=args.profile_variant, batch=batch)
        _log(f"profile: {json.dumps(res['profile'])[:2000]}")
        save()

    profile_batch = args.profile_batch or max(batches)
    params32 = random_params(jaxvit_model(cfg), size)
    for i_batch, batch in enumerate(batches):
        if i_batch == 1 and args.floors:
            floors()
        x = jax.random.normal(jax.random.key(5), (batch, size, size, 3), jnp.float32)
        reps = args.repeats if batch > 1 else max(args.repeats, 50)
        refs = {}  # this batch's headline maps and forward logits, which every later variant is compared with
        for name in (b1_variants if batch == 1 else variants):
            key = f"{name}_b{batch}"
            if late(key):
                continue
            try:
                fn, params, ctx = build_variant(name, cfg, dtype, params32, tiles)
                with ctx():
                    t0 = time.perf_counter()
                    compiled = fn.lower(params, x).compile(COMPILE_OPTIONS.get(name))
                    csecs = time.perf_counter() - t0
                med, best = timeit(compiled, (params, x), args.warmup, reps)
                ma = compiled.memory_analysis()
                gemms = gemm_epilogues(compiled.as_text())
                res["variants"][key] = {"batch": batch, "median_ms": med * 1e3, "min_ms": best * 1e3,
                                        "img_per_s": batch / med, "compile_s": csecs,
                                        "temp_mib": ma.temp_size_in_bytes / 2 ** 20 if ma else None, "gemms": gemms,
                                        "compile_options": COMPILE_OPTIONS.get(name),
                                        **output_deviation(name, jax.device_get(compiled(params, x)), refs)}
                _log(f"{key:40s} {med * 1e3:8.3f} ms  {batch / med:9.1f} img/s  (compile {csecs:.1f} s)  {gemms}")
                del compiled
            except Exception as e:
                res["variants"][key] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                _log(f"{key}: {res['variants'][key]['error']}")
            save()
        if args.profile and batch == profile_batch:
            profile(batch)
    if args.floors and len(batches) < 2:
        floors()
    for i, flags in enumerate(s for s in args.xla_flags_sets.split(";") if s.strip()):
        if late(f"flags {flags}"):
            continue
        sub = out_path.with_name(f"{out_path.stem}_flags{i}.json")
        env = dict(os.environ, XLA_FLAGS=merge_xla_flags(os.environ.get("XLA_FLAGS", ""), flags))
        cmd = [sys.executable, "-m", "bench.gpu_probe", "--model", args.model, "--dtype", args.dtype,
               "--variants", args.flag_set_variants, "--b1-variants", "headline", "--batches", args.batches,
               "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--out", str(sub)]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                                  timeout=min(900.0, max(30.0, args.deadline - (time.perf_counter() - t_start) + 60)))
            entry = json.loads(sub.read_text())["variants"] if sub.exists() else {}
            if proc.returncode:
                entry["error"] = f"rc {proc.returncode}: {proc.stderr[-400:]}"
        except subprocess.TimeoutExpired:
            entry = {"error": "timed out"}
        entry["XLA_FLAGS"] = env["XLA_FLAGS"]
        entry["wall_s"] = time.perf_counter() - t0
        res["flag_sets"][flags] = entry
        _log(f"XLA_FLAGS+={flags}: {json.dumps(entry)[:400]}")
        save()
    res["wall_s"] = time.perf_counter() - t_start
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
