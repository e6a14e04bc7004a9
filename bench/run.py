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
"""

from __future__ import annotations

from jaxvit.model import KERNEL_IMPLS
from predmaps.runtime import int_at_least
from predmaps.machine import cpu_name
from bench.timing import time_calls

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# key -> (timm architecture, create_model kwargs, image size, label)
MODELS = {
    "vit_s16": ("vit_small_patch16_224", {}, 224, "ViT-S/16"),
    "vit_b16": ("vit_base_patch16_224", {}, 224, "ViT-B/16"),
    "vit_l16": ("vit_large_patch16_224", {}, 224, "ViT-L/16"),
    "tiny": ("vit_tiny_patch16_224", dict(depth=2, img_size=64), 64, "ViT-Ti/16 depth 2 @64"),
}
MODEL_ALIASES = {"vit-s/16": "vit_s16", "vits16": "vit_s16", "vit-b/16": "vit_b16", "vitb16": "vit_b16",
                 "vit-l/16": "vit_l16", "vitl16": "vit_l16"}
GPU_LARGE_BATCH = {"vit_s16": 256, "vit_b16": 256, "vit_l16": 128, "tiny": 8}
CPU_LARGE_BATCH = 8

METHODS = ["forward", "predicatt_L", "predicatt_L-1", "predicatt_L+L-1", "prediction_map", "raw_attention",
           "rollout", "gradcam", "generic_attention", "transattr"]
METHOD_ALIASES = {"predicatt": "predicatt_L", "predicatt_l": "predicatt_L", "predicatt_l-1": "predicatt_L-1",
                  "predicatt_l+l-1": "predicatt_L+L-1", "headline": "predicatt_L+L-1", "floor": "forward"}
# bench method -> (predmaps method, layer)
JAX_METHODS = {"predicatt_L": ("predicatt", -1), "predicatt_L-1": ("predicatt", -2),
               "prediction_map": ("prediction_map", -1), "raw_attention": ("raw_attention", -1),
               "rollout": ("rollout", -1), "gradcam": ("gradcam", -1),
               "generic_attention": ("generic_attention", -1), "transattr": ("transattr", -1)}
HEADLINE = "predicatt_L+L-1"
# the rows the targets compare, timed again round-robin (Runner.interleaved_case)
INTERLEAVED = (("torch", "forward"), ("torch", "predicatt_L"), ("jax", "predicatt_L"), ("jax", HEADLINE))
INTERLEAVED_ROUNDS = 10  # at most; each round calls every row twice, so this bounds what it adds to a device session

FP32_TOL = 1e-4
TF32_TOL = 1e-2
BF16_TOL = 5e-2
MiB = 1024 * 1024


# ------------------------------------------------------------------------------------------ set-up


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


class ForeignLoad:
    """CPU time used by other processes (in cores, averaged over an interval): the machine's busy time
    (/proc/stat) minus this process's own (and its children's) CPU time. Linux only; None elsewhere."""

    def __init__(self):
        self.last = self._sample()

    @staticmethod
    def _sample():
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError, IndexError):
            return None
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
        t = os.times()
        return time.perf_counter(), busy, t.user + t.system + t.children_user + t.children_system

    def interval(self) -> float | None:
        """Cores used by other processes since the previous call."""
        now = self._sample()
        prev, self.last = self.last, now
        if now is None or prev is None or now[0] - prev[0] <= 0:
            return None
        return round(max(0.0, ((now[1] - prev[1]) - (now[2] - prev[2])) / (now[0] - prev[0])), 3)


def redraw_(model, seed: int = 0):
    """Re-draw every weight of a timm ViT at unit fan-in scale, in place (as tests/conftest.py)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            elif name.startswith(("pos_embed", "cls_token", "reg_token", "dist_token")):
                p.copy_(torch.randn(p.shape, generator=gen))
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * p[0].numel() ** -0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


def build_timm(key: str, seed: int = 0):
    import timm
    import torch

    arch, kw, size, _ = MODELS[key]
    torch.manual_seed(seed)
    return redraw_(timm.create_model(arch, pretrained=False, **kw), seed), size


def load_jax(tmodel, dtype: str, bf16_weights: str = "cast", kernels: str = "xla", kernel_tiles: str = ""):
    """(jaxvit module, params) for a timm model at compute dtype fp32 or bf16. bf16 with
    bf16_weights='cast' stores the block matmul weights in bf16 (`jaxvit.cast_params`: the same
    output bits as casting them on every call, without that per-call conversion). kernels and
    kernel_tiles (`jaxvit.kernels.Tiles` text, '' for the defaults) set `ViT.kernels` and its tiles."""
    import jax.numpy as jnp

    import convert
    import jaxvit
    from jaxvit.kernels import Tiles

    model, params = convert.load(tmodel, dtype=jnp.bfloat16 if dtype == "bf16" else jnp.float32)
    if dtype == "bf16" and bf16_weights == "cast":
        params = jaxvit.cast_params(params, jnp.bfloat16)
    if kernels != "xla" or kernel_tiles:
        model = model.clone(kernels=kernels, kernel_tiles=Tiles.parse(kernel_tiles))
    return model, params


def make_images(batch: int, size: int, seed: int = 1) -> np.ndarray:
    """(B, 3, H, W) float32, seeded standard normal; the same first images for every batch size."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, 3, size, size), dtype=np.float32)


def jax_function(model, method: str):
    """The function JAX times: (params, images NHWC) -> dict(maps (B, K, gh, gw), classes) or dict(logits)."""
    import jax.numpy as jnp

    from predmaps import explain_fn
    from predmaps.targets import Targets

    top = Targets(kind="top")
    if method == "forward":
        return lambda p, x: {"logits": model.apply({"params": p}, x).logits}
    if method == HEADLINE:
        f_l = explain_fn(model, method="predicatt", layer=-1)
        f_l1 = explain_fn(model, method="predicatt", layer=-2)

        def both(p, x):  # two explanations, one jit: XLA's CSE shares the forward
            a, b = f_l(p, x, top), f_l1(p, x, top)
            return {"maps": jnp.concatenate([a.maps, b.maps], axis=1), "classes": a.classes}

        return both
    name, layer = JAX_METHODS[method]
    g = explain_fn(model, method=name, layer=layer)

    def one(p, x):
        e = g(p, x, top)
        return {"maps": e.maps, "classes": e.classes}

    return one


def jax_methods_available() -> set[str]:
    import predmaps

    out = {"forward", HEADLINE}
    for m, (name, _) in JAX_METHODS.items():
        if name in predmaps.METHODS:
            out.add(m)
    return out


def _precision_ctx(dtype: str, fp32_precision: str):
    import jax

    if dtype == "fp32" and fp32_precision == "highest":
        return jax.default_matmul_precision("highest")
    return contextlib.nullcontext()


def jax_compile(model, params, x, method: str, dtype: str, fp32_precision: str):
    """AOT-compile the timed function. Returns (compiled, seconds, xla static memory dict)."""
    import jax

    fn = jax.jit(jax_function(model, method))
    t0 = time.perf_counter()
    with _precision_ctx(dtype, fp32_precision):
        compiled = fn.lower(params, x).compile()
    secs = time.perf_counter() - t0
    static = None
    try:
        ma = compiled.memory_analysis()
        if ma is not None:
            static = {"temp_bytes": int(ma.temp_size_in_bytes), "output_bytes": int(ma.output_size_in_bytes),
                      "argument_bytes": int(ma.argument_size_in_bytes)}
    except Exception:  # not every backend reports it
        pass
    return compiled, secs, static



# ------------------------------------------------------------------------------------------ torch side


def torch_predicatt_layers(model, images, layers=(-1, -2)):
    """PredicAtt at several layers from ONE hooked forward (the torch counterpart of the JAX
    headline row); the same arithmetic as `torch_reference.predicatt`, maps concatenated on K."""
    import torch

    from bench import torch_reference as tr

    with torch.no_grad():
        out = tr.forward_with_internals(model, images)
        logits, tokens, attn = out["logits"], out["tokens"], out["attn"]
        b, c = logits.shape
        n_layers, n_heads = len(attn), attn[0].shape[1]
        classes = tr.resolve_targets(None, logits, b, c, device=logits.device)
        k = classes.shape[1]
        a_cls = tr._cls_attention(model, attn)
        maps = []
        for layer in layers:
            psi_c = tr._gather_classes(tr.prediction_matrix(model, tokens[tr._layer_index(layer, n_layers)]), classes)
            sim = torch.einsum("blhn,bkn->bklh", a_cls, psi_c)
            alpha = sim.reshape(b, k, n_layers * n_heads).softmax(dim=-1).reshape(b, k, n_layers, n_heads)
            maps.append(torch.einsum("bklh,blhn->bkn", alpha, a_cls) * psi_c)
        return {"maps": torch.cat(maps, dim=1), "classes": classes}


def torch_function(model, method: str):
    """(fn(images) -> dict, setup(), teardown()) for the torch version of `method`; None if it has none."""
    import torch

    from bench import torch_reference as tr

    def fused(on: bool):
        def f():
            for blk in model.blocks:
                blk.attn.fused_attn = on
        return f

    def plain(fn, **kw):
        return lambda x: fn(model, x, **kw)

    if method == "forward":
        def fwd(x):
            with torch.inference_mode():
                return {"logits": model(x)}
        return fwd, fused(True), fused(False)
    table = {
        "predicatt_L": plain(tr.predicatt, layer=-1),
        "predicatt_L-1": plain(tr.predicatt, layer=-2),
        HEADLINE: lambda x: torch_predicatt_layers(model, x),
        "prediction_map": plain(tr.prediction_map, layer=-1),
        "raw_attention": plain(tr.raw_attention),
        "rollout": plain(tr.rollout),
        "gradcam": plain(tr.gradcam),
        "generic_attention": plain(tr.generic_attention),
    }
    if method not in table:
        return None
    return table[method], fused(False), fused(False)


def torch_reference_output(model, method: str, x):
    """The fp32 parity reference: the torch version's own functions, no autocast."""
    from bench import torch_reference as tr

    if method == HEADLINE:
        a, b = tr.predicatt(model, x, layer=-1), tr.predicatt(model, x, layer=-2)
        import torch
        return {"maps": torch.cat([a["maps"], b["maps"]], dim=1), "classes": a["classes"]}
    fn, setup, teardown = torch_function(model, method)
    setup()
    try:
        return fn(x)
    finally:
        teardown()


def _to_numpy(out: dict) -> dict:
    res = {}
    for k, v in out.items():
        if k not in ("maps", "classes", "logits") or v is None:
            continue
        if hasattr(v, "detach"):
            v = v.detach().float().cpu().numpy() if v.is_floating_point() else v.detach().cpu().numpy()
        a = np.asarray(v)
        if k == "maps":
            a = a.reshape(a.shape[0], a.shape[1], -1).astype(np.float64)
        elif k == "logits":
            a = a.astype(np.float64)
        res[k] = a
    return res


# ------------------------------------------------------------------------------------------ measuring


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def rss_supported() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        _status_kb("VmHWM")
        return True
    except OSError:
        return False


def rss_overhead(call) -> int:
    """Peak resident-set growth during call() (reset VmHWM, read VmRSS, call, read VmHWM)."""
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kb("VmRSS")
    out = call()
    peak = _status_kb("VmHWM")
    del out
    return max(0, peak - before) * 1024


def _summary(times: list[float], batch: int) -> dict:
    med = statistics.median(times)
    return {"median_ms": med * 1e3, "min_ms": min(times) * 1e3, "max_ms": max(times) * 1e3, "repeats": len(times),
            "throughput": batch / med, "times_ms": [round(t * 1e3, 4) for t in times]}


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    nb = float(np.linalg.norm(b))
    return float(np.linalg.norm(a - b) / nb) if nb > 0 else float(np.linalg.norm(a - b))


def parity(out: dict, ref: dict, dtype: str, fp32_precision: str, torch_err: float | None = None) -> dict:
    """Compare an output with the fp32 reference. Returns dict(status, rel_err, tol, note)."""
    key = "maps" if "maps" in ref else "logits"
    if key not in out:
        return {"status": "FAIL", "rel_err": None, "tol": None, "note": f"no {key} in the output"}
    a, b = out[key], ref[key]
    if a.shape != b.shape:
        return {"status": "FAIL", "rel_err": None, "tol": None, "note": f"shape {a.shape} != reference {b.shape}"}
    keep = np.ones(a.shape[0], bool)
    if key == "maps" and "classes" in ref and "classes" in out:
        keep = (np.asarray(out["classes"]) == np.asarray(ref["classes"])).all(axis=1)
    if key == "logits":
        keep = a.argmax(-1) == b.argmax(-1)
    mism = int((~keep).sum())
    if dtype == "fp32":
        tol = FP32_TOL if fp32_precision == "highest" else TF32_TOL
        err = rel_err(a, b)
        ok = err <= tol and mism == 0
        note = f"predicted class differs on {mism} image(s)" if mism else ""
        return {"status": "PASS" if ok else "FAIL", "rel_err": err, "tol": tol, "class_mismatch": mism, "note": note}
    tol = BF16_TOL if torch_err is None else max(BF16_TOL, 2 * torch_err)
    if not keep.any():
        return {"status": "FAIL", "rel_err": None, "tol": tol, "class_mismatch": mism,
                "note": "predicted class differs from fp32 on every image"}
    err = rel_err(a[keep], b[keep])
    note = f"{mism} image(s) with another predicted class than fp32 left out" if mism else ""
    return {"status": "PASS" if err <= tol else "FAIL", "rel_err": err, "tol": tol, "class_mismatch": mism,
            "note": note}


# ------------------------------------------------------------------------------------------ JAX memory child


def _enable_compile_cache(path: str) -> None:
    import jax

    for name, value in (("jax_compilation_cache_dir", path), ("jax_persistent_cache_min_compile_time_secs", 0.0),
                        ("jax_persistent_cache_min_entry_size_bytes", -1)):
        try:
            jax.config.update(name, value)
        except Exception:
            pass


def call_memory(stats, call, balloon) -> dict:
    """Memory overhead of `call()`: peak bytes in use during it minus bytes in use before.

    stats() -> {"bytes_in_use", "peak_bytes_in_use"} of the device; call() runs and synchronises and
    drops its output; balloon(n) allocates n bytes on the device and returns the holder. The
    allocator's peak cannot be reset, so a call whose peak stays under an earlier one (the first
    call's library workspaces, loading the executable) reads only as an upper bound. Read 1 is the
    first call, read 2 the second (the steady state torch's rows measure too). Where read 2 is not
    exact, read 3 first raises bytes in use just past the earlier peak with a balloon: every byte
    the call then allocates lifts the peak, so read 3 is exact and is the one reported.
    """

    def read():
        s0 = stats()
        call()
        s1 = stats()
        return {"before": s0["bytes_in_use"], "peak_before": s0["peak_bytes_in_use"],
                "peak_after": s1["peak_bytes_in_use"], "overhead": s1["peak_bytes_in_use"] - s0["bytes_in_use"],
                "exact": s1["peak_bytes_in_use"] > s0["peak_bytes_in_use"]}

    first, second = read(), read()
    if second["exact"]:
        return dict(second, first_call=first, read="second call")
    s = stats()
    holder = balloon(s["peak_bytes_in_use"] - s["bytes_in_use"] + MiB)
    try:
        third = read()
    finally:
        del holder
    if not third["exact"]:  # the balloon did not lift bytes in use past the peak: keep the bound
        return dict(second, first_call=first, balloon_call=third, read="second call (upper bound)")
    return dict(third, first_call=first, second_call=second, read="third call, over a balloon at the earlier peak")


def memory_child(spec: dict) -> dict:
    """In a fresh process: one JAX case per batch size, ascending; the call's memory overhead read by
    `call_memory` (exact, or marked an upper bound)."""
    import jax
    import jax.numpy as jnp

    if spec.get("cache_dir"):
        _enable_compile_cache(spec["cache_dir"])
    tmodel, size = build_timm(spec["model"], spec["seed"])
    model, params = load_jax(tmodel, spec["dtype"], spec.get("bf16_weights", "cast"), spec.get("kernels", "xla"),
                             spec.get("kernel_tiles", ""))
    del tmodel
    dev = jax.devices()[0]
    if dev.memory_stats() is None:
        return {str(b): {"error": f"no memory_stats() on {dev.platform}"} for b in spec["batches"]}
    res = {}
    for batch in sorted(spec["batches"]):
        x = jax.device_put(make_images(batch, size).transpose(0, 2, 3, 1))
        try:
            compiled, csecs, _ = jax_compile(model, params, x, spec["method"], spec["dtype"], spec["fp32_precision"])
            jax.block_until_ready(x)

            def call():
                jax.block_until_ready(compiled(params, x))

            def balloon(n):
                return jax.block_until_ready(jnp.zeros((max(int(n), 1),), jnp.uint8, device=dev))

            res[str(batch)] = dict(call_memory(dev.memory_stats, call, balloon), compile_s=csecs)
        except Exception as e:  # OOM and the like: reported, not fatal
            res[str(batch)] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    return res


def run_memory_child(spec: dict) -> dict:
    cmd = [sys.executable, "-m", "bench", "--_memory-child", json.dumps(spec)]
    try:
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        return {str(b): {"error": "memory subprocess timed out"} for b in spec["batches"]}
    for line in p.stdout.splitlines():
        if line.startswith("MEMCHILD "):
            return json.loads(line[len("MEMCHILD "):])
    return {str(b): {"error": f"memory subprocess failed (rc {p.returncode}): {p.stderr[-400:]}"}
            for b in spec["batches"]}


# ------------------------------------------------------------------------------------------ environment


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
                           f"; kernels={args.kernels} (jaxvit.kernels, tiles {args.kernel_tiles or 'default'})"),
            "torch_bf16": f"torch.autocast('{torch_device.type}', dtype=torch.bfloat16)",
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

        if dtype == "bf16":
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
        if spec is None:
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
            jax_models = {dt: load_jax(tmodel, dt, self.args.bf16_weights, self.args.kernels, self.args.kernel_tiles)
                          for dt in dtypes}
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
                if self.args.bounds and not self._past_deadline(f"{mkey} {dtype} bounds"):
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
                                    kernel_tiles=self.args.kernel_tiles)
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


# ------------------------------------------------------------------------------------------ report


def _fmt_ms(v):
    return "–" if v is None else (f"{v:.2f}" if v < 100 else f"{v:.0f}")


def _fmt_tput(v):
    return "–" if v is None else (f"{v:,.0f}" if v >= 100 else f"{v:.2f}")


def _fmt_mib(v):
    return "n/a" if v is None else f"{v / MiB:,.0f}" if v >= 10 * MiB else f"{v / MiB:.1f}"


STATIC_JAX_MEMORY = "JAX: XLA's static allocation plan of the executable (temp + outputs)"
MEASURED_JAX_MEMORY = "JAX peak_bytes_in_use - bytes_in_use before (fresh subprocess)"


def _mem_cell(idx, *key):
    """Memory overhead in MiB; '*' marks XLA's static plan rather than a measured peak, '≤' a
    measured reading that is only an upper bound (the device's peak did not rise during the call)."""
    r = idx.get(key)
    v = None if r is None or r.get("error") else r.get("memory_bytes")
    detail = (r or {}).get("memory_detail") or {}
    # no subprocess reading: the static plan, whatever the label (older runs labelled it measured up front)
    static = v is not None and r.get("memory_kind") in (STATIC_JAX_MEMORY, MEASURED_JAX_MEMORY) and not detail
    bound = v is not None and detail.get("exact") is False
    return ("≤" if bound else "") + _fmt_mib(v) + ("*" if static else "")


def _fmt_parity(p):
    if not p:
        return "–"
    err = p.get("rel_err")
    s = p["status"]
    if s == "ref":
        return "ref"
    if err is not None:
        s += f" {err:.1e}"
    if p.get("class_mismatch"):
        s += f" ({p['class_mismatch']} cls≠)"
    return s


METHOD_LABEL = {"forward": "forward (no explanation)", "predicatt_L": "PredicAtt_L", "predicatt_L-1": "PredicAtt_{L-1}",
                HEADLINE: "**PredicAtt_L + PredicAtt_{L-1}** (one forward)", "prediction_map": "prediction map (L)",
                "raw_attention": "raw attention", "rollout": "rollout", "gradcam": "GradCAM",
                "generic_attention": "generic attention", "transattr": "TransAttr (LRP)"}
IMPL_LABEL = {("torch", "forward"): "torch forward (fused SDPA)", ("jax", "forward"): "JAX bare forward"}


def _index(records):
    idx = {}
    for r in records:
        idx[(r["model"], r["dtype"], r["method"], r["impl"], r["batch"])] = r
    return idx


def _get(idx, *key, field="median_ms"):
    r = idx.get(key)
    return None if r is None or r.get("error") else r.get(field)


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def per_round_spread(jax_row: dict, versus_row: dict | None, batch: int, target: float) -> dict | None:
    """How a throughput target reads round by round in the interleaved timing: the versus row's time
    over JAX's in the same round (a ratio target), or JAX's images/s (an absolute one). The median of
    the rounds says where the machine usually was; the quartiles and the rounds that meet the target
    say how far a shared machine's drift moves the verdict (the spread measured: bench/NOTES.md)."""
    if not jax_row.get("interleaved") or not jax_row.get("times_ms"):
        return None
    jt = jax_row["times_ms"]
    if versus_row is None:
        values = [batch / t * 1e3 for t in jt]
    elif versus_row.get("interleaved") and len(versus_row.get("times_ms") or []) == len(jt):
        values = [v / t for v, t in zip(versus_row["times_ms"], jt)]
    else:
        return None
    # quantiles() needs two values; one round is its own median and quartiles
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return {"rounds": len(values), "median": median, "q1": q1, "q3": q3, "min": min(values), "max": max(values),
            "rounds_met": sum(v >= target for v in values)}


def target_checks(records, gpu: bool, bounds: list[dict] | None = None,
                  interleaved: list[dict] | None = None) -> list[dict]:
    """The perf-anchors targets this run can check. Throughputs at the large batch come from the
    interleaved timing of the target rows where the run has it (`source`), else from the separate
    cases. A throughput target also says where the time per call it needs stands against the run's
    measured bounds (`bench.bounds.verdict`)."""
    from bench.bounds import verdict

    idx = _index(records)
    for rec in interleaved or []:
        for row in rec.get("rows", []):
            idx[(rec["model"], rec["dtype"], row["method"], row["impl"], rec["batch"])] = dict(row, interleaved=True)
    bidx = {(b["model"], b["dtype"], b["batch"]): b for b in bounds or []}
    checks = []

    def add(what, value, target, met, mkey=None, dtype=None, batch=None, needed_tput=None, method=HEADLINE,
            versus=None):
        c = {"what": what, "value": value, "target": target, "met": met}
        if needed_tput:
            jrow = idx.get((mkey, dtype, method, "jax", batch)) or {}
            c["source"] = "interleaved timing" if jrow.get("interleaved") else "separate cases"
            vrow = (idx.get((mkey, dtype, versus[1], versus[0], batch)) or {}) if versus else None
            c["per_round"] = per_round_spread(jrow, vrow, batch, target)
            c["needed_ms"] = batch / needed_tput * 1e3
            c["bound"] = verdict(c["needed_ms"], bidx.get((mkey, dtype, batch)),
                                 _get(idx, mkey, dtype, method, "jax", batch),
                                 prediction_layers=1 if method == "predicatt_L" else 2)
        checks.append(c)

    if not gpu:
        for mkey in ("vit_s16", "vit_b16"):
            for batch in sorted({r["batch"] for r in records if r["model"] == mkey and r["batch"] > 1}):
                tj = _get(idx, mkey, "fp32", "predicatt_L", "jax", batch, field="throughput")
                tt = _get(idx, mkey, "fp32", "predicatt_L", "torch", batch, field="throughput")
                th = _get(idx, mkey, "fp32", HEADLINE, "jax", batch, field="throughput")
                if tj is None or tt is None:
                    continue
                name = MODELS[mkey][3]
                add(f"{name} fp32 b{batch}: JAX PredicAtt_L / torch PredicAtt_L throughput >= 1.25x",
                    tj / tt, 1.25, tj / tt >= 1.25, mkey, "fp32", batch, 1.25 * tt, "predicatt_L",
                    versus=("torch", "predicatt_L"))
                if th is not None:
                    add(f"{name} fp32 b{batch}: JAX PredicAtt_L+L-1 / torch PredicAtt_L throughput >= 1.25x",
                        th / tt, 1.25, th / tt >= 1.25, mkey, "fp32", batch, 1.25 * tt, versus=("torch", "predicatt_L"))
    else:
        for batch in sorted({r["batch"] for r in records if r["model"] == "vit_b16" and r["batch"] > 1}):
            th = _get(idx, "vit_b16", "bf16", HEADLINE, "jax", batch, field="throughput")
            tt = _get(idx, "vit_b16", "bf16", "predicatt_L", "torch", batch, field="throughput")
            tf = _get(idx, "vit_b16", "bf16", "forward", "torch", batch, field="throughput")
            if th is None:
                continue
            key = ("vit_b16", "bf16", batch)
            add(f"ViT-B/16 bf16 b{batch}: JAX PredicAtt_L+L-1 >= 11,000 img/s", th, 11000, th >= 11000, *key, 11000)
            if tt:
                add(f"ViT-B/16 bf16 b{batch}: vs torch PredicAtt >= 2.3x", th / tt, 2.3, th / tt >= 2.3, *key,
                    2.3 * tt, versus=("torch", "predicatt_L"))
            if tf:
                add(f"ViT-B/16 bf16 b{batch}: vs torch forward >= 1.2x", th / tf, 1.2, th / tf >= 1.2, *key, 1.2 * tf,
                    versus=("torch", "forward"))
        lat = _get(idx, "vit_b16", "bf16", HEADLINE, "jax", 1)
        if lat is not None:
            add("ViT-B/16 bf16 b1: JAX PredicAtt_L+L-1 latency <= 1.5 ms", lat, 1.5, lat <= 1.5)
            tl = _get(idx, "vit_b16", "bf16", "predicatt_L", "torch", 1)
            if tl:
                add("ViT-B/16 bf16 b1: torch PredicAtt latency / JAX >= 4x", tl / lat, 4, tl / lat >= 4)
    return checks


def add_missing_spreads(result: dict) -> list[str]:
    """Results written before `per_round_spread` existed keep their stored target checks (`--render`
    re-renders, it does not re-judge), but their interleaved timings are stored: give each such check
    its round-by-round spread from them. Returns the checks that got one."""
    checks = result.get("target_checks") or []
    if all("per_round" in c for c in checks):
        return []
    gpu = result["environment"].get("jax_backend") == "gpu"
    fresh = {c["what"]: c.get("per_round")
             for c in target_checks(result["records"], gpu, result.get("bounds"), result.get("interleaved"))}
    added = []
    for c in checks:
        if "per_round" not in c and fresh.get(c["what"]):
            c["per_round"] = fresh[c["what"]]
            added.append(c["what"])
    return added


def render_markdown(result: dict) -> str:
    env, records = result["environment"], result["records"]
    idx = _index(records)
    lines = [f"# predmaps benchmark: {env['device']}", ""]
    v = env["versions"]
    lines += [f"- date: {env['date']}", f"- command: `{env['command']}`",
              f"- versions: jax {v['jax']} (jaxlib {v['jaxlib']}), flax {v['flax']}, torch {v['torch']}, "
              f"timm {v['timm']}, numpy {v['numpy']}, python {v['python']}",
              f"- JAX backend: {env['jax_backend']} ({env['jax_device_kind']}); torch device: {env['torch_device']}; "
              f"torch threads: {env['threads']['torch_num_threads']}; XLA_FLAGS: `{env['threads']['XLA_FLAGS']}`",
              f"- fp32 precision: JAX {env['precision']['jax_fp32_matmul']}; torch {env['precision']['torch_fp32']}",
              f"- bf16: JAX {env['precision']['jax_bf16']}; torch {env['precision']['torch_bf16']}",
              f"- weights: {env['weights']}; inputs: {env['inputs']}; targets: {env['targets']}",
              f"- timing: {env['timing']}",
              f"- memory: {result['memory_mode']}"]
    load = result.get("load")
    if load:
        lines.append(f"- load average (1/5/15 min) at start {load['start']}, at end {load['end']}, highest 1-min "
                     f"during the run {load['max_1min']} (this benchmark's own threads count in it)")
        if load.get("other_processes_cores_mean") is not None:
            lines.append(f"- other processes' CPU use during the cases (machine busy time minus this benchmark's, "
                         f"in cores): mean {load['other_processes_cores_mean']:.2f}, highest in one case "
                         f"{load['other_processes_cores_max']:.2f} (per case in results.json)")
    for note in result.get("notes", []):
        lines.append(f"- note: {note}")
    lines.append("")

    models = list(dict.fromkeys(r["model"] for r in records))
    dtypes = list(dict.fromkeys(r["dtype"] for r in records))
    methods = [m for m in METHODS if any(r["method"] == m for r in records)]

    def small(mkey):
        return min(r["batch"] for r in records if r["model"] == mkey)

    def big(mkey):
        return max(r["batch"] for r in records if r["model"] == mkey)

    lat_head = ("b1 latency" if all(small(m) == 1 for m in models)
                else "latency at the smallest batch")

    # headline
    lines += ["## Headline: PredicAtt_L + PredicAtt_{L-1} of the predicted class, both from one forward", ""]
    if result.get("interleaved"):
        lines += ["Each row from its own case; the target checks below use the round-robin timing of these rows "
                  "('Target rows, interleaved'), which shares the machine's state.", ""]
    lines += [
              f"| model | dtype | JAX L+L-1, {lat_head} | torch PredicAtt_L, {lat_head} | JAX L+L-1 throughput | "
              "torch PredicAtt_L throughput | torch forward throughput | x torch PredicAtt_L | x torch forward |",
              "|---|---|---|---|---|---|---|---|---|"]
    for mkey in models:
        nb, sb = big(mkey), small(mkey)
        for dt in dtypes:
            jl = _get(idx, mkey, dt, HEADLINE, "jax", sb)
            tl = _get(idx, mkey, dt, "predicatt_L", "torch", sb)
            jt = _get(idx, mkey, dt, HEADLINE, "jax", nb, field="throughput") if nb else None
            tt = _get(idx, mkey, dt, "predicatt_L", "torch", nb, field="throughput") if nb else None
            tf = _get(idx, mkey, dt, "forward", "torch", nb, field="throughput") if nb else None
            if jl is None and jt is None:
                continue
            r1, r2 = _ratio(jt, tt), _ratio(jt, tf)
            lines.append(f"| {MODELS[mkey][3]} | {dt} | {_fmt_ms(jl)} ms | {_fmt_ms(tl)} ms | "
                         f"{_fmt_tput(jt)} img/s (b{nb}) | {_fmt_tput(tt)} img/s | {_fmt_tput(tf)} img/s | "
                         f"{'–' if r1 is None else f'{r1:.2f}x'} | {'–' if r2 is None else f'{r2:.2f}x'} |")
    lines.append("")
    checks = result.get("target_checks") or []
    if checks:
        lines += ["## Targets (perf-anchors.md)", ""]
        for c in checks:
            spread = c.get("per_round")
            fmt = (lambda v: f"{v:,.0f}") if c["target"] >= 100 else (lambda v: f"{v:.2f}")
            lines.append(f"- {c['what']}: **{c['value']:.2f}** -> {'MET' if c['met'] else 'NOT MET'}"
                         + (f" [{c['source']}]" if c.get("source") else "")
                         + (f" [round by round: median {fmt(spread['median'])}, middle half {fmt(spread['q1'])}-"
                            f"{fmt(spread['q3'])}, {spread['rounds_met']} of {spread['rounds']} rounds meet it]"
                            if spread else "")
                         + (f" ({c['bound']})" if c.get("bound") else ""))
        lines.append("")
    inter = [r for r in result.get("interleaved") or [] if r.get("rows")]
    if inter:
        lines += ["## Target rows, interleaved", "",
                  "The rows the targets compare, timed again round-robin at the large batch (per round, each row "
                  "twice, the second call timed), so that they share the machine's state; the targets above use "
                  "these.", "",
                  "| model | dtype | batch | rounds | " + " | ".join(
                      f"{'JAX' if i == 'jax' else 'torch'} {METHOD_LABEL.get(m, m)}" for i, m in INTERLEAVED) + " |",
                  "|---|---|---|---|" + "---|" * len(INTERLEAVED)]
        for r in inter:
            by = {(row["impl"], row["method"]): row for row in r["rows"]}
            cells = [f"{by[k]['median_ms']:.4g} ms, {_fmt_tput(by[k]['throughput'])} img/s" if k in by else "–"
                     for k in INTERLEAVED]
            lines.append(f"| {r.get('model_label', r['model'])} | {r['dtype']} | {r['batch']} | {r['rounds']} | "
                         + " | ".join(cells) + " |")
        lines.append("")
    bounds = result.get("bounds") or []
    if bounds:
        lines += render_bounds(bounds, idx)

    # all rows
    lines += ["## All rows", "",
              "Latency: median ms at batch 1 (or the smallest batch run). Throughput: images/s at the large batch. Memory: overhead in MiB "
              "(peak during the call minus before it; see 'memory' above; * = XLA's static plan, ≤ = an upper bound: "
              "the device's peak was set before the call and did not rise). Parity: ||a-b||/||b|| of the maps "
              "(forward rows: logits) against the torch version's fp32 output; 'ref' = that reference itself; "
              "bf16 torch rows show their own error ('info'), which sets the JAX bf16 tolerance. "
              "JAX/torch: torch latency / JAX latency at the small batch, JAX throughput / torch throughput at the large batch, "
              "same method.", "",
              f"| model | dtype | method | impl | {lat_head} (ms) | mem at that batch (MiB) | throughput (img/s) | mem at batch "
              "(MiB) | parity | JAX/torch (b1 / large) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for mkey in models:
        nb, sb = big(mkey), small(mkey)
        for dt in dtypes:
            for method in methods:
                for impl in ("torch", "jax"):
                    r1, rn = idx.get((mkey, dt, method, impl, sb)), idx.get((mkey, dt, method, impl, nb))
                    if r1 is None and rn is None:
                        continue
                    errs = [r["error"] for r in (r1, rn) if r is not None and r.get("error")]
                    pars = [r["parity"] for r in (r1, rn) if r is not None and r.get("parity")]
                    worst = None
                    for p in pars:
                        if worst is None or p["status"] == "FAIL" or (
                                worst["status"] != "FAIL" and (p.get("rel_err") or 0) > (worst.get("rel_err") or 0)):
                            worst = p
                    speed = "–"
                    if impl == "jax":
                        a = _ratio(_get(idx, mkey, dt, method, "torch", sb), _get(idx, mkey, dt, method, "jax", sb))
                        b = _ratio(_get(idx, mkey, dt, method, "jax", nb, field="throughput"),
                                   _get(idx, mkey, dt, method, "torch", nb, field="throughput"))
                        if a is not None or b is not None:
                            speed = " / ".join("–" if x is None else f"{x:.2f}x" for x in (a, b))
                    label = IMPL_LABEL.get((impl, method), impl)
                    lines.append(
                        f"| {MODELS[mkey][3]} | {dt} | {METHOD_LABEL.get(method, method)} | {label} | "
                        f"{_fmt_ms(_get(idx, mkey, dt, method, impl, sb))} | "
                        f"{_mem_cell(idx, mkey, dt, method, impl, sb)} | "
                        f"{_fmt_tput(_get(idx, mkey, dt, method, impl, nb, field='throughput'))}"
                        f"{f' (b{nb})' if nb else ''} | "
                        f"{_mem_cell(idx, mkey, dt, method, impl, nb)} | "
                        f"{'ERROR: ' + '; '.join(errs) if errs else _fmt_parity(worst)} | {speed} |")
    lines.append("")

    # compile
    lines += ["## Compile time (JAX: trace + lower + XLA compile, s; not included in any time above; torch is eager)",
              "", "| model | dtype | method | smallest batch | large batch |", "|---|---|---|---|---|"]
    for mkey in models:
        nb, sb = big(mkey), small(mkey)
        for dt in dtypes:
            for method in methods:
                c1 = _get(idx, mkey, dt, method, "jax", sb, field="compile_s")
                cn = _get(idx, mkey, dt, method, "jax", nb, field="compile_s") if nb else None
                if c1 is None and cn is None:
                    continue
                lines.append(f"| {MODELS[mkey][3]} | {dt} | {METHOD_LABEL.get(method, method)} | "
                             f"{'–' if c1 is None else f'{c1:.1f}'} | "
                             f"{'–' if cn is None else f'{cn:.1f} (b{nb})'} |")
    lines.append("")
    if result.get("skipped_jax_methods"):
        lines.append(f"JAX methods not available in this checkout (skipped): {', '.join(result['skipped_jax_methods'])}")
        lines.append("")
    return "\n".join(lines)


def render_bounds(bounds: list[dict], idx) -> list[str]:
    burst = all("burst" in g["qkv"] for b in bounds for g in b.get("gemms", {}).values()
                if isinstance(g, dict) and "qkv" in g)
    how = ("each timed alone in bursts of back-to-back calls with one sync (as many as one call of the model "
           "makes, at least 8)" if burst else "each call timed alone and synced (this run predates the bursts: "
           "the sync adds the host's dispatch and wait to every GEMM, which overstates JAX's on GPU)")
    floor_rate = ("the best rate measured (either matmul, or any of the model's GEMMs below where one ran faster; "
                  "the source is in results.json)" if all("peak_source" in b for b in bounds) else
                  "the better of the two matmul rates (this run predates taking the model's own GEMMs into the floor)")
    lines = ["## What bounds it (bench/bounds.py)", "",
             "Measured in this run after each model's cases. Matmul rate: an n x n x n matmul, each library's "
             f"median; the compute floor is the headline's FLOPs at {floor_rate}. Dense GEMMs alone: "
             f"the model's patch embedding and qkv / proj / fc1 / fc2 (with bias) at the benchmark's shapes, {how}, "
             "summed over one call.", "",
             "| model | dtype | batch | headline GFLOP per call | matmul rate JAX / torch (TFLOP/s) | compute floor "
             "(ms per call; img/s) | dense GEMMs alone JAX / torch (ms) | JAX headline (ms) | torch forward (ms) |",
             "|---|---|---|---|---|---|---|---|---|"]

    def rate(part):
        return "–" if not part or part.get("tflops") is None else f"{part['tflops']:.3g}"

    def ms(v):
        return "–" if v is None else f"{v:.4g}"

    for b in bounds:
        key = (b["model"], b["dtype"])
        jh = _get(idx, *key, HEADLINE, "jax", b["batch"])
        tf = _get(idx, *key, "forward", "torch", b["batch"])
        floor = b.get("floor_ms")
        ceiling = "" if not floor else f"; {b['batch'] / floor * 1e3:,.0f}"
        lines.append(
            f"| {b.get('model_label', b['model'])} | {b['dtype']} | {b['batch']} | {b['flops']['total'] / 1e9:.4g} | "
            f"{rate(b['peak'].get('jax'))} / {rate(b['peak'].get('torch'))} | "
            f"{ms(floor)}{ceiling} | "
            f"{ms((b['gemms'].get('jax') or {}).get('total_ms'))} / {ms((b['gemms'].get('torch') or {}).get('total_ms'))} | "
            f"{ms(jh)} | {ms(tf)} |")
    faster = [f"- {b.get('model_label', b['model'])} {b['dtype']} b{b['batch']}: the floor's rate is {b['peak_source']}'s, "
              f"{b['peak_tflops']:.3g} TFLOP/s, faster than either matmul" for b in bounds
              if b.get("peak_source") and "matmul" not in b["peak_source"]]
    if faster:
        lines += [""] + faster
    errs = [f"{b['model']} {b['dtype']} {what} {impl}: {v['error']}" for b in bounds for what in ("peak", "gemms")
            for impl, v in b[what].items() if "error" in v]
    if errs:
        lines += [""] + [f"- not measured: {e}" for e in errs]
    lines.append("")
    return lines


# ------------------------------------------------------------------------------------------ CLI


def _replace_case(recs: list[dict], rec: dict) -> list[dict]:
    """recs with rec in place of any record of the same (model, dtype, batch): a later measurement wins."""
    key = (rec["model"], rec["dtype"], rec["batch"])
    return [r for r in recs if (r["model"], r["dtype"], r["batch"]) != key] + [rec]


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
    p.add_argument("--dtypes", type=_names_arg(["fp32", "bf16"], {}, "dtype"),
                   help="comma list of fp32, bf16 (default: GPU fp32,bf16; CPU fp32)")
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
                        "or keep fp32 params cast on every call")
    p.add_argument("--kernels", choices=KERNEL_IMPLS, default="xla",
                   help="JAX half-precision rows: jaxvit.ViT(kernels=...): XLA's fusions (default) or jaxvit.kernels' "
                        "Pallas kernels (LayerNorm, fc1+GELU, the prediction-map normaliser: all, or one of them)")
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
                                   "class agrees with fp32"},
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
