"""What bounds a throughput target: the machine's measured matmul rate and the model's own GEMMs.

Measured in the benchmark's process, right after a model's large-batch cases, for JAX and torch alike:

  peak    an n x n x n matmul in the row's dtype. The fastest of the two and of every model GEMM
          below is this machine's measured compute rate for that dtype (`best_rate`).
  gemms   the model's dense layers alone at the benchmark's shapes: the patch embedding, and qkv, proj,
          fc1, fc2 with their biases at M = B*T tokens, times the depth. What each library's GEMMs cost
          before any attention, norm, activation or explanation.
  flops   the headline's arithmetic counted from the config: the dense layers, the two attention
          matmuls, and the softmax normaliser of the prediction matrices of the two layers.

floor = flops / peak is a time no implementation on this machine beats in that dtype, so a target that
needs less time per call is out of reach for any code; one that needs less than JAX's GEMMs alone is out
of reach with the GEMMs XLA emits here.
"""

from __future__ import annotations

import statistics

from bench.timing import time_calls

PEAK_N = {"cpu": 2048, "gpu": 8192}
# Dense GEMMs are timed in bursts: as many back-to-back calls as the model makes (at least this many)
# and one sync, the time divided by the count, as they run in the model: a sync after each would add the
# host's dispatch and wait to every GEMM (bench/NOTES.md, "Numbers moved out of docstrings").
MIN_BURST = 8


def headline_flops(cfg, batch: int, prediction_layers: int = 2) -> dict:
    """Floating-point operations (2 per multiply-add) of one call of the headline: the forward plus
    the prediction matrices of `prediction_layers` layers (the softmax over classes reads all C logits)."""
    t, n, d, f = cfg.num_patches + cfg.num_prefix_tokens, cfg.num_patches, cfg.embed_dim, cfg.mlp_dim
    inner = cfg.num_heads * cfg.dim_head
    patch = n * cfg.patch_size ** 2 * cfg.in_chans * d
    dense = t * d * 3 * inner + t * inner * d + 2 * t * d * f
    attention = 2 * cfg.num_heads * t * t * cfg.dim_head
    head = d * cfg.num_classes
    predictions = prediction_layers * n * d * cfg.num_classes
    per_image = {"patch_embed": patch, "dense": cfg.depth * dense, "attention": cfg.depth * attention,
                 "head": head, "prediction_matrices": predictions}
    out = {k: 2 * v * batch for k, v in per_image.items()}
    out["total"] = sum(out.values())
    return out


def _gemm_shapes(cfg, batch: int) -> dict:
    """name -> (M, K, N, times per call) of the model's dense layers."""
    t, n = cfg.num_patches + cfg.num_prefix_tokens, cfg.num_patches
    d, f, inner = cfg.embed_dim, cfg.mlp_dim, cfg.num_heads * cfg.dim_head
    m = batch * t
    return {"patch_embed": (batch * n, cfg.patch_size ** 2 * cfg.in_chans, d, 1),
            "qkv": (m, d, 3 * inner, cfg.depth), "proj": (m, inner, d, cfg.depth),
            "fc1": (m, d, f, cfg.depth), "fc2": (m, f, d, cfg.depth)}


def _median(times: list[float]) -> float:
    return statistics.median(times)


def _jax_precision(dtype: str, fp32_precision: str):
    # as the benchmark's rows run: fp32 at "highest" (true fp32) unless --fp32-precision tf32
    return "highest" if dtype == "fp32" and fp32_precision == "highest" else None


def jax_matmul_peak(dtype: str, n: int, warmup: int, repeats: int, fp32_precision: str = "highest") -> dict:
    import jax
    import jax.numpy as jnp

    jdt = jnp.bfloat16 if dtype == "bf16" else jnp.float32
    a = jax.random.normal(jax.random.key(3), (n, n), jdt)
    b = jax.random.normal(jax.random.key(4), (n, n), jdt)
    prec = _jax_precision(dtype, fp32_precision)
    fn = jax.jit(lambda x, y: jnp.dot(x, y, precision=prec))
    _, times = time_calls(lambda: fn(a, b), jax.block_until_ready, warmup, repeats)
    med = _median(times)
    return {"n": n, "ms": med * 1e3, "tflops": 2 * n ** 3 / med / 1e12}


def torch_matmul_peak(dtype: str, n: int, device, sync, warmup: int, repeats: int) -> dict:
    import torch

    tdt = torch.bfloat16 if dtype == "bf16" else torch.float32
    g = torch.Generator(device="cpu").manual_seed(3)
    a = torch.randn(n, n, generator=g).to(device, tdt)
    b = torch.randn(n, n, generator=g).to(device, tdt)
    with torch.inference_mode():
        _, times = time_calls(lambda: torch.mm(a, b), sync, warmup, repeats)
    med = _median(times)
    return {"n": n, "ms": med * 1e3, "tflops": 2 * n ** 3 / med / 1e12}


def jax_dense_gemms(cfg, batch: int, dtype: str, warmup: int, repeats: int, fp32_precision: str = "highest") -> dict:
    """Each dense layer's x @ W + b alone (fp32 at the benchmark's precision, "highest" by default);
    'total_ms' = the sum over one call of the model."""
    import jax
    import jax.numpy as jnp

    jdt = jnp.bfloat16 if dtype == "bf16" else jnp.float32
    prec = _jax_precision(dtype, fp32_precision)
    fn = jax.jit(lambda a, b, c: jnp.dot(a, b, precision=prec) + c)
    out, total = {}, 0.0
    for i, (name, (m, k, n, times_per_call)) in enumerate(_gemm_shapes(cfg, batch).items()):
        x = jax.random.normal(jax.random.key(10 + i), (m, k), jdt)
        w = (jax.random.normal(jax.random.key(20 + i), (k, n), jnp.float32) * k ** -0.5).astype(jdt)
        bias = jnp.zeros((n,), jdt)
        burst = max(times_per_call, MIN_BURST)
        _, times = time_calls(lambda: [fn(x, w, bias) for _ in range(burst)], jax.block_until_ready, warmup, repeats)
        med = _median(times) / burst
        out[name] = {"shape": [m, k, n], "ms": med * 1e3, "tflops": 2 * m * k * n / med / 1e12,
                     "times_per_call": times_per_call, "burst": burst}
        total += med * times_per_call
    out["total_ms"] = total * 1e3
    return out


def torch_dense_gemms(cfg, batch: int, dtype: str, device, sync, warmup: int, repeats: int) -> dict:
    """torch's counterpart of `jax_dense_gemms`: F.linear (weights stored (N, K), as in nn.Linear),
    operands already in the dtype (a floor: autocast's per-call weight casts are not in it)."""
    import torch
    import torch.nn.functional as F

    tdt = torch.bfloat16 if dtype == "bf16" else torch.float32
    g = torch.Generator(device="cpu").manual_seed(5)
    out, total = {}, 0.0
    with torch.inference_mode():
        for name, (m, k, n, times_per_call) in _gemm_shapes(cfg, batch).items():
            x = torch.randn(m, k, generator=g).to(device, tdt)
            w = (torch.randn(n, k, generator=g) * k ** -0.5).to(device, tdt)
            bias = torch.zeros(n, dtype=tdt, device=device)
            burst = max(times_per_call, MIN_BURST)
            _, times = time_calls(lambda: [F.linear(x, w, bias) for _ in range(burst)], sync, warmup, repeats)
            med = _median(times) / burst
            out[name] = {"shape": [m, k, n], "ms": med * 1e3, "tflops": 2 * m * k * n / med / 1e12,
                         "times_per_call": times_per_call, "burst": burst}
            total += med * times_per_call
            del x, w, bias
    out["total_ms"] = total * 1e3
    return out


def measure(cfg, batch: int, dtype: str, *, gpu: bool, torch_device, torch_sync, warmup: int, repeats: int,
            peak_n: int | None = None, impls=("torch", "jax"), fp32_precision: str = "highest") -> dict:
    """The bounds of one (model, dtype, batch); see the module docstring. Failures are recorded per
    part, so a missing torch or an out-of-memory peak matmul leaves the rest. fp32_precision: the
    benchmark's (JAX's GEMMs run at it; torch's follow the TF32 switch the benchmark set)."""
    n = peak_n or PEAK_N["gpu" if gpu else "cpu"]
    flops = headline_flops(cfg, batch)
    res = {"batch": batch, "dtype": dtype, "flops": flops, "peak": {}, "gemms": {},
           "fp32_precision": fp32_precision if dtype == "fp32" else None}
    parts = []
    if "jax" in impls:
        parts += [("peak", "jax", lambda: jax_matmul_peak(dtype, n, warmup, repeats, fp32_precision)),
                  ("gemms", "jax", lambda: jax_dense_gemms(cfg, batch, dtype, warmup, repeats, fp32_precision))]
    if "torch" in impls:
        parts += [("peak", "torch", lambda: torch_matmul_peak(dtype, n, torch_device, torch_sync, warmup, repeats)),
                  ("gemms", "torch", lambda: torch_dense_gemms(cfg, batch, dtype, torch_device, torch_sync, warmup,
                                                               repeats))]
    for what, impl, fn in parts:
        try:
            res[what][impl] = fn()
        except Exception as e:  # a bound that cannot be measured must not lose the benchmark's rows
            res[what][impl] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    res["peak_tflops"], res["peak_source"] = best_rate(res, n)
    res["floor_ms"] = flops["total"] / (res["peak_tflops"] * 1e12) * 1e3 if res["peak_tflops"] else None
    return res


def best_rate(res: dict, n: int) -> tuple[float | None, str | None]:
    """The fastest GEMM rate measured for a bound and what ran at it: either library's n^3 matmul or any
    of the model's own GEMM shapes. The shapes count too: a model GEMM can run faster than the n^3
    matmul, and a floor from the slower rate can read above JAX's whole call (bench/NOTES.md)."""
    rates = {f"{impl} {n}^3 matmul": p["tflops"] for impl, p in res["peak"].items() if "tflops" in p}
    for impl, gemms in res["gemms"].items():
        for name, part in gemms.items():
            if isinstance(part, dict) and "tflops" in part:
                rates[f"{impl} {name} ({'x'.join(map(str, part['shape']))})"] = part["tflops"]
    if not rates:
        return None, None
    source = max(rates, key=rates.get)
    return rates[source], source


def verdict(needed_ms: float, bound: dict | None, jax_ms: float | None = None, prediction_layers: int = 2) -> str | None:
    """Where a target that needs `needed_ms` per call stands against the measured bounds; `jax_ms` is
    JAX's time for that call now, to say how much of it lies outside the GEMMs. prediction_layers:
    the call's prediction matrices (the bound's floor counts the headline's 2; PredicAtt_L has 1)."""
    if not bound or bound.get("floor_ms") is None:
        return None
    floor = bound["floor_ms"]
    flops = bound.get("flops") or {}
    if prediction_layers != 2 and flops.get("total"):
        total = flops["total"] - flops["prediction_matrices"] * (2 - prediction_layers) / 2
        floor *= total / flops["total"]
    jg = (bound["gemms"].get("jax") or {}).get("total_ms")
    what = "the headline" if prediction_layers == 2 else "the call"
    text = (f"needs <= {needed_ms:.4g} ms per b{bound['batch']} call, i.e. every FLOP of {what} at "
            f"{floor / needed_ms:.0%} of the best matmul rate measured here (compute floor {floor:.4g} ms)")
    if jg is not None:
        text += f"; JAX's dense GEMMs alone take {jg:.4g} ms"
    if needed_ms < floor:
        return text + ": out of reach for any implementation in this dtype on this machine"
    if jg is None:
        return text
    if needed_ms < jg:
        return text + ": out of reach with the GEMMs XLA emits here"
    rest = f"; JAX spends {jax_ms - jg:.4g} ms there now" if jax_ms is not None else ""
    return text + f": leaves {needed_ms - jg:.4g} ms for attention, norms, activations and the explanation{rest}"
