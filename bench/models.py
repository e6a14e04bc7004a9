"""The benchmark's cases: its models, methods and tolerances, building the timm and jaxvit models
from the same random weights, and each method as a JAX and a torch function (see bench/run.py)."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # before any JAX backend starts

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
# fp8 rows (bf16 with e4m3 block GEMMs, jaxvit.fp8): maps against the torch fp32 reference; e4m3's 3 mantissa
# bits put 3-5% (rel. L2) on the maps of random-weight ViTs on CPU (bench/NOTES.md, issue 29), any scaling
FP8_TOL = 0.15
FP8_DTYPES = ("fp8", "fp8_fast", "fp8_mlp", "fp8_mlp_fast")  # bench dtypes = jaxvit.ViT(gemm=...) names, at bf16
FP8_CALIBRATION = (8, 2)  # fp8 rows' input scales: calibrated on this many images of this seed (timed: seed 1)
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


def load_jax(tmodel, dtype: str, bf16_weights: str = "cast", kernels: str = "xla", kernel_tiles: str = "",
             gelu: str = "erf"):
    """(jaxvit module, params) for a timm model at compute dtype fp32 or bf16, or one of FP8_DTYPES (bf16 with
    `ViT(gemm=...)`'s e4m3 block GEMMs). bf16 with
    bf16_weights='cast' stores the block matmul weights in bf16 (`jaxvit.cast_params`: the same
    output bits as casting them on every call, without that per-call conversion); fp8 rows with 'cast'
    also store the e4m3 weights (`jaxvit.fp8.prequantize`, same bits) and input scales calibrated on
    other images than the timed ones (`jaxvit.fp8.calibrate`): no per-call amax pass; with 'fp32', every
    scale is taken on every call. kernels and
    kernel_tiles (`jaxvit.kernels.Tiles` text, '' for the defaults) set `ViT.kernels` and its tiles; gelu sets
    `ViT.gelu` ("tanh": the approximation, in half precision only)."""
    import jax.numpy as jnp

    import convert
    import jaxvit
    from jaxvit.kernels import Tiles

    half = dtype == "bf16" or dtype in FP8_DTYPES
    model, params = convert.load(tmodel, dtype=jnp.bfloat16 if half else jnp.float32)
    if half and bf16_weights == "cast":
        params = jaxvit.cast_params(params, jnp.bfloat16)
    if kernels != "xla" or kernel_tiles:
        model = model.clone(kernels=kernels, kernel_tiles=Tiles.parse(kernel_tiles))
    if gelu != "erf":
        model = model.clone(gelu=gelu)
    if dtype in FP8_DTYPES:
        model = model.clone(gemm=dtype)
        if bf16_weights == "cast":
            params = fp8_params(model, params)
    return model, params


def fp8_params(model, params):
    """`params` of an fp8 model (`ViT(gemm=...)`) with its e4m3 weights stored once (`jaxvit.fp8.prequantize`) and
    input scales calibrated on FP8_CALIBRATION's images, other ones than the timed (`jaxvit.fp8.calibrate`)."""
    import jax.numpy as jnp

    from jaxvit import fp8

    n, seed = FP8_CALIBRATION
    calib = jnp.asarray(make_images(n, model.config.img_size[0], seed).transpose(0, 2, 3, 1))
    return fp8.calibrate(model, fp8.prequantize(params, model.gemm, model.dtype), calib)


def make_images(batch: int, size: int, seed: int = 1) -> np.ndarray:
    """(B, 3, H, W) float32, seeded standard normal; the same first images for every batch size."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, 3, size, size), dtype=np.float32)


def jax_function(model, method: str):
    """The function JAX times: (params, images NHWC) -> dict(maps (B, K, gh, gw), classes) or dict(logits)."""
    import jax.numpy as jnp

    from predmaps import explain_fn, make_targets

    top = make_targets("top", 1, model.config.num_classes)  # "top" holds no per-image array: any batch
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
