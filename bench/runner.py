"""Running the cases: the environment record, and `Runner`, which times every model x dtype x batch
x method in torch and JAX, checks parity, interleaves the target rows and measures the bounds."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import re
import sys
import tempfile
import time
import traceback

import numpy as np

from predmaps.machine import cpu_name
from bench.measure import _enable_compile_cache, _summary, parity, rss_overhead, rss_supported, run_memory_child
from bench.models import (FP8_DTYPES, ForeignLoad, HEADLINE, INTERLEAVED, INTERLEAVED_ROUNDS, METHODS,
                          METHOD_ALIASES, MODELS, MiB, _loadavg, _log, _to_numpy, build_timm, jax_compile, jax_methods_available, load_jax,
                          make_images, torch_function, torch_reference_output)
from bench.render import MEASURED_JAX_MEMORY, STATIC_JAX_MEMORY
from bench.timing import time_calls


def environment(args, torch_device) -> dict:
    import flax
    import jax
    import jaxlib
    import timm
    import torch

    jdev = jax.devices()[0]
    gpu = jdev.platform == "gpu"
    device = torch.cuda.get_device_name(0) if gpu and torch.cuda.is_available() else (
        jdev.device_kind if gpu else f"{cpu_name()} ({os.cpu_count()} cores)")
    hi = args.fp32_precision == "highest"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m bench " + " ".join(sys.argv[1:]),
        "device": device,
        "jax_backend": jdev.platform,
        "jax_device_kind": jdev.device_kind,
        "jax_device_count": jax.device_count(),
        "torch_device": str(torch_device),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "versions": {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
                     "flax": flax.__version__, "torch": torch.__version__, "timm": timm.__version__,
                     "numpy": np.__version__,
                     "cuda (torch)": torch.version.cuda if torch.cuda.is_available() else None},
        "precision": {
            "jax_fp32_matmul": ("highest (jax.default_matmul_precision('highest') around tracing: true fp32)" if hi
                                else "default (TF32-class on GPU, fp32 on CPU)"),
            "torch_fp32": ("true fp32 (torch.backends.cuda.matmul.allow_tf32=False, cudnn.allow_tf32=False)" if hi
                           else "TF32 allowed (cuda.matmul.allow_tf32=True, cudnn.allow_tf32=True)"),
            "jax_bf16": "convert.load(..., dtype=jnp.bfloat16): bf16 matmuls; fp32 LayerNorm stats, softmax and "
                        "logits; " + ("block matmul weights stored in bf16 (jaxvit.cast_params), the rest fp32"
                                      if args.bf16_weights == "cast" else "fp32 params, cast per call")
                        + ("" if args.kernels == "xla" else
                           f"; kernels={args.kernels} (jaxvit.kernels, tiles {args.kernel_tiles or 'default'})")
                        + ("" if args.gelu == "erf" else
                           "; gelu=tanh: the tanh approximation in fc1's output dtype (jaxvit.gelu; cuBLASLt's GELU "
                           "epilogue with --xla_gpu_enable_cublaslt=true), also in the fp8 rows"),
            "torch_bf16": f"torch.autocast('{torch_device.type}', dtype=torch.bfloat16)",
            "jax_fp8": "fp8 rows: the bf16 model with jaxvit.ViT(gemm=<the row's dtype>): fp8 / fp8_fast qkv, proj, "
                       "fc1, fc2, fp8_mlp / fp8_mlp_fast fc1, fc2 with e4m3 inputs and weights, per-tensor power-of-two "
                       "scales, float32 / cuBLASLt fast accumulation (jaxvit.fp8); "
                       + ("e4m3 weights stored once (jaxvit.fp8.prequantize), input scales calibrated on 8 other "
                          "images (jaxvit.fp8.calibrate)" if args.bf16_weights == "cast" else
                          "weight and input scales taken on every call")
                       + "; torch has no fp8 rows (its bf16 rows stand beside; the interleaved rounds time torch "
                         "in bf16); no bounds",
        },
        "threads": {"torch_num_threads": torch.get_num_threads(),
                    "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
                    "note": "torch threads left at their default; XLA:CPU uses every core by default"},
        "env": {k: os.environ[k] for k in ("XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_FLAGS", "OMP_NUM_THREADS",
                                             "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES") if k in os.environ},
        "weights": f"random (timm pretrained=False, re-drawn at unit fan-in scale, seed {args.seed})",
        "inputs": "seeded standard-normal images (seed 1), NCHW for torch, the same values NHWC for JAX",
        "timing": f"median of the timed calls after {args.warmup} warm-up call(s); batch-1 repeats {args.repeats}, "
                  f"large-batch repeats {args.large_repeats}; JAX times the AOT-compiled executable",
        "targets": "the predicted class (K=1), resolved inside the timed call",
    }


def device_slug(env: dict) -> str:
    if env["jax_backend"] == "cpu":
        return f"cpu-{env['cpu_count']}core"
    slug = re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")
    return slug + (f"-x{env['jax_device_count']}" if env["jax_device_count"] > 1 else "")


# ------------------------------------------------------------------------------------------ the run


def _parse_list(text: str | None, aliases: dict, known: list[str], what: str) -> list[str] | None:
    if text is None:
        return None
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        key = aliases.get(item.lower(), item)
        if key not in known:
            raise ValueError(f"unknown {what} {item!r}; choose from {', '.join(known)}")
        out.append(key)
    return out


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


class Runner:
    def __init__(self, args):
        import jax
        import torch

        self.args = args
        self.gpu = jax.default_backend() == "gpu"
        cuda = self.gpu and torch.cuda.is_available()
        self.tdev = torch.device("cuda" if cuda else "cpu")
        hi = args.fp32_precision == "highest"
        torch.backends.cuda.matmul.allow_tf32 = not hi
        torch.backends.cudnn.allow_tf32 = not hi
        self.sync_t = (lambda _out: torch.cuda.synchronize()) if cuda else (lambda _out: None)
        mode = args.memory
        if mode == "auto":
            mode = "device" if self.gpu else ("rss" if rss_supported() else "off")
        self.mem_mode = mode
        self.cache_dir = None
        if mode == "device" and self.gpu:
            self.cache_dir = tempfile.mkdtemp(prefix="bench-jax-cache-")
            _enable_compile_cache(self.cache_dir)
        self.records: list[dict] = []
        self.bounds: list[dict] = []
        self.interleaved: list[dict] = []
        self.kept_executables: dict = {}  # (model, dtype, batch, method) -> compiled, for interleaved_case
        self.refs: dict = {}
        self.torch_bf16_err: dict = {}
        self.loads: list[list[float]] = []
        self.foreign = ForeignLoad()
        self.foreign_samples: list[float] = []
        self.on_record = None  # called after every record: main() rewrites the results files
        self.t0 = time.perf_counter()
        self.stopped_early = None
        mc = args.memory_check
        self.memory_check = set(METHODS) if mc == "all" else set() if mc in ("none", "") else set(
            _parse_list(mc, METHOD_ALIASES, METHODS, "method") or [])

    # -- helpers
    def _record(self, **kw) -> dict:
        load = _loadavg()
        if load:
            self.loads.append(load)
        other = self.foreign.interval()
        if other is not None:
            self.foreign_samples.append(other)
        rec = dict(kw, loadavg=load, other_processes_cores=other)
        self.records.append(rec)
        if self.on_record is not None:
            self.on_record()
        return rec

    def _torch_ctx(self, dtype: str):
        """A context-manager factory for the torch side of a row: bf16 autocast, or nothing."""
        import torch

        if dtype == "bf16" or dtype in FP8_DTYPES:  # torch has no fp8 rows: fp8's interleaved torch rows are bf16
            return lambda: torch.autocast(self.tdev.type, dtype=torch.bfloat16)
        return contextlib.nullcontext

    def _mem_label(self, impl: str, method: str = "") -> str:
        if self.mem_mode == "off":
            return "n/a"
        if self.mem_mode == "rss":
            return "CPU RSS growth during the call (approximate)"
        if impl == "torch":
            return "torch.cuda max_memory_allocated - memory_allocated before"
        if method in self.memory_check:  # set when the subprocess's reading replaces the static plan
            return MEASURED_JAX_MEMORY
        return STATIC_JAX_MEMORY

    def reference(self, tmodel, mkey, method, batch, xt):
        import torch

        key = (mkey, method, batch)
        if key not in self.refs:
            with torch.autocast(self.tdev.type, enabled=False):
                self.refs[key] = _to_numpy(torch_reference_output(tmodel, method, xt))
        return self.refs[key]

    # -- one torch case
    def torch_case(self, tmodel, mkey, method, dtype, batch, xt, repeats):
        import torch

        spec = torch_function(tmodel, method)
        if spec is None or dtype in FP8_DTYPES:  # the torch version has no fp8 path; its bf16 rows stand beside
            return None
        fn, setup, teardown = spec
        base = dict(model=mkey, model_label=MODELS[mkey][3], method=method, impl="torch", dtype=dtype, batch=batch,
                    memory_kind=self._mem_label("torch"))
        ctx = self._torch_ctx(dtype)

        def call():
            with ctx():
                return fn(xt)

        setup()
        self.foreign.interval()
        try:
            out, times = time_calls(call, self.sync_t, self.args.warmup, repeats)
            outn = _to_numpy(out)
            del out
            if dtype == "fp32" and method != HEADLINE:
                self.refs[(mkey, method, batch)] = outn  # the torch version at fp32 IS the reference
                par = {"status": "ref", "rel_err": 0.0, "tol": None, "note": "the parity reference"}
            else:
                teardown()
                ref = self.reference(tmodel, mkey, method, batch, xt)
                setup()
                par = parity(outn, ref, dtype, self.args.fp32_precision)
                if dtype == "bf16" and par.get("rel_err") is not None:
                    self.torch_bf16_err[(mkey, method, batch)] = par["rel_err"]
                if dtype == "bf16":
                    par["status"] = "info"  # the torch version's own bf16 error: what JAX bf16 is held to
            mem = None
            if self.mem_mode == "rss":
                mem = rss_overhead(lambda: (call(), self.sync_t(None))[0])
            elif self.mem_mode == "device" and self.tdev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                o = call()
                torch.cuda.synchronize()
                mem = torch.cuda.max_memory_allocated() - before
                del o
            return self._record(**base, **_summary(times, batch), memory_bytes=mem, compile_s=None, parity=par)
        except Exception as e:
            _log(f"  torch {method} {dtype} b{batch}: {_err(e)}")
            return self._record(**base, error=_err(e))
        finally:
            teardown()
            if self.tdev.type == "cuda":
                torch.cuda.empty_cache()

    # -- one JAX case
    def jax_case(self, jmodel, jparams, tmodel, mkey, method, dtype, batch, xj, xt, repeats):
        import jax

        label = self._mem_label("jax", method)
        # The static plan until the memory check's subprocess replaces it: a run stopped by --deadline
        # (or killed) before that check must not show the plan as a measured peak.
        base = dict(model=mkey, model_label=MODELS[mkey][3], method=method, impl="jax", dtype=dtype, batch=batch,
                    memory_kind=STATIC_JAX_MEMORY if label == MEASURED_JAX_MEMORY else label)
        self.foreign.interval()
        try:
            compiled, csecs, static = jax_compile(jmodel, jparams, xj, method, dtype, self.args.fp32_precision)

            def call():
                return compiled(jparams, xj)

            out, times = time_calls(call, jax.block_until_ready, self.args.warmup, repeats)
            outn = _to_numpy(jax.device_get(out))
            del out
            if method == "transattr":
                par = {"status": "n/a", "rel_err": None, "tol": None,
                       "note": "no torch version of LRP; parity with Chefer's code is tests/test_lrp.py's"}
            else:
                ref = self.reference(tmodel, mkey, method, batch, xt)
                par = parity(outn, ref, dtype, self.args.fp32_precision,
                             self.torch_bf16_err.get((mkey, method, batch)))
            mem = None
            if self.mem_mode == "rss":
                mem = rss_overhead(lambda: jax.block_until_ready(call()))
            elif self.mem_mode == "device" and static is not None:
                mem = static["temp_bytes"] + static["output_bytes"]  # replaced by the subprocess's where checked
            if ("jax", method) in INTERLEAVED and batch > 1 and self.args.interleaved:
                self.kept_executables[(mkey, dtype, batch, method)] = compiled  # interleaved_case times it again
            del compiled
            return self._record(**base, **_summary(times, batch), memory_bytes=mem, compile_s=csecs,
                                xla_static_memory=static, parity=par)
        except Exception as e:
            _log(f"  jax {method} {dtype} b{batch}: {_err(e)}")
            if self.args.verbose:
                traceback.print_exc()
            return self._record(**base, error=_err(e))

    # -- the target rows again, interleaved call by call
    def interleaved_case(self, tmodel, jmodel, jparams, mkey, dtype, batch, xt, xj, methods):
        """Time the rows the targets compare (torch forward, torch PredicAtt_L, JAX PredicAtt_L, JAX
        headline) round-robin: every row then sees the same machine state, so their ratios hold on
        a machine whose speed drifts between cases. Each round runs each row twice and times the
        second call, so a timed call follows a call of its own library, as in the row's own case (timing
        a row's only call per round read slower than its own case: bench/NOTES.md). The timed call is the one the separate cases time; only torch's attention switch is set
        between calls."""
        import jax

        rows = [(impl, m) for impl, m in INTERLEAVED if m in methods]
        if len({impl for impl, _ in rows}) < 2:
            return None
        ctx = self._torch_ctx(dtype)
        calls = []
        try:
            for impl, method in rows:
                if impl == "torch":
                    fn, setup, teardown = torch_function(tmodel, method)

                    def call(fn=fn, setup=setup):
                        setup()
                        t0 = time.perf_counter()
                        with ctx():
                            out = fn(xt)
                        self.sync_t(out)
                        return time.perf_counter() - t0
                    calls.append(((impl, method), call, teardown))
                else:
                    compiled = self.kept_executables.get((mkey, dtype, batch, method))
                    if compiled is None:  # its separate case failed or did not run
                        compiled, _, _ = jax_compile(jmodel, jparams, xj, method, dtype, self.args.fp32_precision)

                    def call(compiled=compiled):
                        t0 = time.perf_counter()
                        jax.block_until_ready(compiled(jparams, xj))
                        return time.perf_counter() - t0
                    calls.append(((impl, method), call, lambda: None))
            self.foreign.interval()
            for _ in range(self.args.warmup):
                for _, call, _ in calls:
                    call()
            times = {key: [] for key, _, _ in calls}
            rounds = min(self.args.large_repeats, INTERLEAVED_ROUNDS)
            for _ in range(rounds):
                for key, call, _ in calls:
                    call()  # untimed: the timed call follows its own library's, as in steady use
                    times[key].append(call())
            rec = {"model": mkey, "model_label": MODELS[mkey][3], "dtype": dtype, "batch": batch,
                   "rounds": rounds,
                   "rows": [dict(impl=impl, method=method, **_summary(ts, batch)) for (impl, method), ts in times.items()]}
        except Exception as e:
            _log(f"  interleaved {mkey} {dtype} b{batch}: {_err(e)}")
            rec = {"model": mkey, "dtype": dtype, "batch": batch, "error": _err(e)}
        finally:
            for _, _, teardown in calls:
                teardown()
            self.kept_executables = {k: v for k, v in self.kept_executables.items() if k[:2] != (mkey, dtype)}
        rec["other_processes_cores"] = self.foreign.interval()
        rec["impl"], rec["method"] = "interleaved", "targets"  # for measured()'s retry bookkeeping
        self.interleaved = _replace_case(self.interleaved, rec)
        if self.on_record is not None:
            self.on_record()
        _log(f"  {mkey} {dtype} b{batch} interleaved: " + ", ".join(
            f"{r['impl']} {r['method']} {r['median_ms']:.4g} ms" for r in rec.get("rows", [])))
        return rec

    # -- what bounds the model's throughput here (bench.bounds)
    def bounds_case(self, cfg, mkey, dtype, batch, impls):
        from bench import bounds

        self._wait_quiet()
        t0 = time.perf_counter()
        self.foreign.interval()
        res = bounds.measure(cfg, batch, dtype, gpu=self.gpu, torch_device=self.tdev, torch_sync=self.sync_t,
                             warmup=self.args.warmup, repeats=self.args.large_repeats,
                             peak_n=256 if self.args.tiny else None, impls=impls,
                             fp32_precision=self.args.fp32_precision)
        res.update(model=mkey, model_label=MODELS[mkey][3], other_processes_cores=self.foreign.interval())
        self.bounds = _replace_case(self.bounds, res)
        if self.on_record is not None:
            self.on_record()
        gem = {k: v.get("total_ms") for k, v in res["gemms"].items()}
        _log(f"  {mkey} {dtype} b{batch} bounds: best rate {res['peak_tflops']} TFLOP/s ({res['peak_source']}), "
             f"floor {res['floor_ms']} ms, "
             f"dense GEMMs alone {gem} ms ({time.perf_counter() - t0:.0f} s)")
        return res

    # -- a shared machine: wait for quiet, redo a case that another process disturbed
    def _wait_quiet(self):
        limit = self.args.wait_quiet
        if limit is None:
            return
        t0, calm = time.time(), 0
        self.foreign.interval()
        while calm < 2 and time.time() - t0 < self.args.wait_quiet_max:
            time.sleep(5)
            other = self.foreign.interval()
            calm = calm + 1 if other is not None and other <= limit else 0
            if calm == 0 and int(time.time() - t0) % 60 < 5:
                _log(f"    waiting for other processes to stop (they use {other} cores)")

    def measured(self, case):
        """Run case() (a torch_case / jax_case thunk); with --wait-quiet, first wait until other processes
        are idle, and redo the case (up to 3 tries) when they used more than the limit during it."""
        for attempt in range(1, 4):
            self._wait_quiet()
            rec = case()
            if rec is None:
                return None
            rec["attempts"] = attempt
            other = rec.get("other_processes_cores")
            if self.args.wait_quiet is None or other is None or other <= self.args.wait_quiet or attempt == 3:
                return rec
            _log(f"    other processes used {other} cores during {rec['impl']} {rec['method']}: measuring again")
            self.records = [r for r in self.records if r is not rec]
        return rec

    def _past_deadline(self, what: str) -> bool:
        if self.args.deadline is None or time.perf_counter() - self.t0 < self.args.deadline:
            return False
        self.stopped_early = f"--deadline {self.args.deadline:.0f} s reached before {what}; later cases not run"
        _log(self.stopped_early)
        return True

    # -- everything
    def run(self, models, methods, dtypes, batches_for, impls):
        import jax
        import torch

        available = jax_methods_available()
        self.skipped = [m for m in methods if m not in available]
        for m in self.skipped:
            _log(f"JAX method {m} not in predmaps.METHODS here: skipped on the JAX side")
        for mkey in models:
            _log(f"== {MODELS[mkey][3]}: building random weights")
            tmodel, size = build_timm(mkey, self.args.seed)
            jax_models = {dt: load_jax(tmodel, dt, self.args.bf16_weights, self.args.kernels, self.args.kernel_tiles,
                                       self.args.gelu) for dt in dtypes}
            tmodel.to(self.tdev)
            batches = batches_for(mkey)
            for dtype in dtypes:
                jmodel, jparams = jax_models[dtype]
                for batch in batches:
                    xh = make_images(batch, size)
                    xt = torch.from_numpy(xh).to(self.tdev)
                    xj = jax.device_put(np.ascontiguousarray(xh.transpose(0, 2, 3, 1)))
                    reps = self.args.repeats if batch == 1 else self.args.large_repeats
                    for method in methods:
                        if self._past_deadline(f"{mkey} {dtype} b{batch} {method}"):
                            return
                        t0 = time.perf_counter()
                        msg = []
                        if "torch" in impls:
                            r = self.measured(lambda: self.torch_case(tmodel, mkey, method, dtype, batch, xt, reps))
                            if r is not None:
                                msg.append(_brief(r))
                        if "jax" in impls and method in available:
                            r = self.measured(lambda: self.jax_case(jmodel, jparams, tmodel, mkey, method, dtype,
                                                                    batch, xj, xt, reps))
                            msg.append(_brief(r))
                        if msg:
                            _log(f"  {mkey} {dtype} b{batch} {method:18s} " + " | ".join(msg)
                                 + f"  ({time.perf_counter() - t0:.0f} s, load {_loadavg()})")
                    if (batch == max(batches) > 1 and {"torch", "jax"} <= set(impls) and self.args.interleaved
                            and not self._past_deadline(f"{mkey} {dtype} b{batch} interleaved")):
                        self.measured(lambda: self.interleaved_case(tmodel, jmodel, jparams, mkey, dtype, batch, xt, xj,
                                                                    methods))
                    del xt, xj
                if self.args.bounds and dtype not in FP8_DTYPES and not self._past_deadline(f"{mkey} {dtype} bounds"):
                    self.bounds_case(jmodel.config, mkey, dtype, max(batches), impls)
                if self.mem_mode == "device" and "jax" in impls:
                    for method in methods:
                        if method not in available or method not in self.memory_check:
                            continue
                        if self._past_deadline(f"{mkey} {dtype} {method} memory check"):
                            return
                        spec = dict(model=mkey, dtype=dtype, method=method, batches=batches, seed=self.args.seed,
                                    fp32_precision=self.args.fp32_precision, cache_dir=self.cache_dir,
                                    bf16_weights=self.args.bf16_weights, kernels=self.args.kernels,
                                    kernel_tiles=self.args.kernel_tiles, gelu=self.args.gelu)
                        res = run_memory_child(spec)
                        for rec in self.records:
                            if (rec["impl"], rec["model"], rec["dtype"], rec["method"]) == ("jax", mkey, dtype, method):
                                m = res.get(str(rec["batch"]), {})
                                rec["memory_bytes"] = m.get("overhead")
                                rec["memory_detail"] = m
                                rec["memory_kind"] = MEASURED_JAX_MEMORY
                        if self.on_record is not None:
                            self.on_record()
                        _log(f"  {mkey} {dtype} {method}: JAX memory {_mem_brief(res)}")
            del jax_models, tmodel
            if self.tdev.type == "cuda":
                torch.cuda.empty_cache()


def _brief(r: dict) -> str:
    if r.get("error"):
        return f"{r['impl']} ERROR"
    par = r["parity"]["status"]
    return f"{r['impl']} {r['median_ms']:.2f} ms {r['throughput']:.1f} img/s {par}"


def _mem_brief(res: dict) -> str:
    return ", ".join(f"b{b}: {v['overhead'] / MiB:.0f} MiB" if "overhead" in v else f"b{b}: {v.get('error')}"
                     for b, v in res.items())


def _replace_case(recs: list[dict], rec: dict) -> list[dict]:
    """recs with rec in place of any record of the same (model, dtype, batch): a later measurement wins."""
    key = (rec["model"], rec["dtype"], rec["batch"])
    return [r for r in recs if (r["model"], r["dtype"], r["batch"]) != key] + [rec]
