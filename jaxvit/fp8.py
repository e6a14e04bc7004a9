"""Opt-in fp8 GEMMs for a half-precision ViT's block layers: `ViT(config, dtype=jnp.bfloat16, gemm="fp8")`.

`gemm` names a layout (`LAYOUTS`) or is a `Layout`: which of a block's GEMMs go through e4m3 and whether the
last blocks keep the compute dtype. `prequantize(params)` stores the weights' e4m3 copies once (the
per-call weight amax and quantisation go away) and `calibrate(model, params, images)` stores static input
scales (no per-call amax pass over the activations); both leave the float32 weights as they were.

qkv, proj, fc1 and fc2 (~all of a ViT's FLOPs) take their input and weight in e4m3 (`jnp.float8_e4m3fn`,
largest finite value 448) with one scale per tensor computed from that tensor on every call (current
scaling), accumulate in float32 and write the compute dtype. The patch embedding, the head and attention's
q k^T and p v stay in the compute dtype: together a few percent of the FLOPs, and the head's logits and the
attention rows are what the maps are made of.

The computation is spelled the way XLA:GPU's gemm rewriter turns into one cuBLASLt fp8 GEMM (Ada, Hopper
and later): quantise (x / scale, clamp to +-448, convert to e4m3), then dequantise (convert to the compute
dtype, multiply by the scalar scale), then a plain dot of the two dequantised operands. The rewriter folds
the converts and scales into the GEMM's inputs and scale arguments; any other backend (and a GPU without
fp8) runs the same arithmetic as written, which makes CPU results the GPU's up to accumulation order.

Scales are powers of two, the smallest >= amax / 448. e4m3's relative precision is the same across its
normal range, so rounding the scale up costs at most one binade at the subnormal end, and buys: the
quantisation divides and the dequantisation multiplies exactly (no bf16 rounding of the dequantised
operand, which cuBLASLt would not do either), and a row's rounding does not depend on the other rows of
the tensor (the batch) unless its values fall to e4m3's subnormals (below ~amax * 2^-14).
Weights get one scale per tensor too: cuBLASLt's fp8 GEMM (and XLA's rewrite) takes scalar scales only.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0  # float(jnp.finfo(E4M3).max)

LAYERS = ("qkv", "proj", "fc1", "fc2")  # a block's GEMMs, by their module names


class Layout(NamedTuple):
    """Which block GEMMs go through e4m3: `layers` (of `LAYERS`) in every block but the last `bf16_last`,
    which keep the compute dtype (PredicAtt and prediction maps read layers L and L-1); `fast`: cuBLASLt's
    fast (reduced-precision) fp8 accumulation on a GPU instead of float32."""

    layers: tuple = LAYERS
    fast: bool = False
    bf16_last: int = 0


# ViT.gemm names: "dtype" = every GEMM in the compute dtype (the default); the others are layouts
# (bench/NOTES.md, "fp8 GEMMs", has each one's deviation of the maps from bf16 and share of fp8 FLOPs)
LAYOUTS = {"fp8": Layout(), "fp8_fast": Layout(fast=True),
           "fp8_mlp": Layout(("fc1", "fc2")), "fp8_mlp_fast": Layout(("fc1", "fc2"), fast=True)}
GEMMS = ("dtype", *LAYOUTS)


def layout(gemm) -> Layout | None:
    """The `Layout` of a `ViT.gemm` value (a name in `GEMMS` or a `Layout`); None for "dtype"."""
    if isinstance(gemm, Layout):
        # a tuple: a module's fields must hash
        if not isinstance(gemm.layers, tuple) or not gemm.layers or not set(gemm.layers) <= set(LAYERS) \
                or not isinstance(gemm.bf16_last, int) or gemm.bf16_last < 0:
            raise ValueError(f"jaxvit.fp8.Layout takes layers, a tuple from {LAYERS} (at least one), and "
                             f"bf16_last >= 0; got {gemm}")
        return gemm
    if gemm == "dtype":
        return None
    if gemm not in LAYOUTS:
        raise ValueError(f"unknown gemm {gemm!r}; choose from {GEMMS} or pass a jaxvit.fp8.Layout")
    return LAYOUTS[gemm]


def check(gemm, kernels_parts: frozenset) -> None:
    """Raises ValueError for an unknown `gemm` or one that cannot hold with the model's Pallas kernels."""
    lay = layout(gemm)
    if lay is not None and "fc1" in lay.layers and "mlp" in kernels_parts:
        raise ValueError(f"gemm={gemm!r} quantises fc1, which kernels with 'mlp' run as a Pallas bf16 kernel; "
                         "choose kernels='xla', 'pallas_layernorm', 'pallas_head' or 'pallas_layernorm_head'")


def block_gemm(gemm, index: int, depth: int):
    """The `gemm` block `index` of `depth` runs: "dtype" for the last `bf16_last` blocks of a layout."""
    lay = layout(gemm)
    return "dtype" if lay is not None and index >= depth - lay.bf16_last else gemm


def active(gemm, dtype, layer: str | None = None) -> bool:
    """Whether `gemm` quantises (GEMM `layer`, any if None) at compute dtype `dtype`: in half precision only.
    A float32/float64 model (also predmaps' LRP, which re-runs any model in float32 from its stored weights)
    keeps its own GEMMs."""
    lay = layout(gemm)
    return (lay is not None and (layer is None or layer in lay.layers)
            and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)))


def fp8_share(gemm, embed_dim: int, mlp_dim: int, depth: int) -> float:
    """The share of the blocks' qkv/proj/fc1/fc2 MACs that `gemm` runs in e4m3 (a proxy for its speed-up)."""
    lay = layout(gemm)
    if lay is None:
        return 0.0
    macs = {"qkv": 3 * embed_dim ** 2, "proj": embed_dim ** 2, "fc1": embed_dim * mlp_dim, "fc2": embed_dim * mlp_dim}
    blocks = max(depth - lay.bf16_last, 0) / depth
    return blocks * sum(macs[k] for k in lay.layers) / sum(macs.values())


def scale_of(x) -> jax.Array:
    """float32 scalar: the smallest power of two >= max|x| / 448 (1 for an all-zero x)."""
    amax = jnp.max(jnp.abs(x)).astype(jnp.float32)
    bits = jax.lax.bitcast_convert_type(amax / E4M3_MAX, jnp.int32)
    up = (bits + 0x7FFFFF) & 0x7F800000  # a nonzero mantissa carries into the exponent: the next power of two
    return jnp.where(amax > 0, jax.lax.bitcast_convert_type(up, jnp.float32), jnp.float32(1.0))


def quantize(x, scale) -> jax.Array:
    """x / scale rounded to e4m3 (to nearest, ties to even), clamped to +-448 first: e4m3fn has no inf and
    converts an out-of-range value to NaN."""
    return jnp.clip(x.astype(jnp.float32) / scale, -E4M3_MAX, E4M3_MAX).astype(E4M3)


def dequantize(q, scale, dtype) -> jax.Array:
    """q * scale in `dtype`: the convert and scalar multiply the GEMM rewriter folds into the fp8 GEMM."""
    return q.astype(dtype) * scale.astype(dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def fake_quant(x, dtype) -> jax.Array:
    """x through e4m3 at its own per-tensor scale, back in `dtype` (exactly representable there).

    Its derivative is the identity (straight-through): rounding's own is zero almost everywhere, and JAX's
    rule for the convert would round the tangent to e4m3 unscaled, so gradient explainers (GradCAM, generic
    attention) get the gradient of the model's unquantised GEMMs at the quantised forward's values."""
    scale = scale_of(x)
    return dequantize(quantize(x, scale), scale, dtype)


@fake_quant.defjvp
def _fake_quant_jvp(dtype, primals, tangents):
    return fake_quant(primals[0], dtype), tangents[0].astype(dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def fake_quant_at(x, scale, dtype) -> jax.Array:
    """x through e4m3 at a given (calibrated) scale, back in `dtype`; values beyond 448 * scale saturate.
    Straight-through derivative in x, as `fake_quant`'s."""
    return dequantize(quantize(x, scale), scale, dtype)


@fake_quant_at.defjvp
def _fake_quant_at_jvp(dtype, primals, tangents):
    return fake_quant_at(primals[0], primals[1], dtype), tangents[0].astype(dtype)


def _precision(gemm):
    # XLA enables cuBLASLt's fast fp8 accumulation for a DEFAULT-precision dot, and keeps float32 otherwise
    return jax.lax.Precision.DEFAULT if layout(gemm).fast else jax.lax.Precision.HIGHEST


def matmul(a, b, gemm) -> jax.Array:
    """a (..., K) @ b (K, N) for operands already through e4m3 (`operands`), as one 2-D dot in their dtype
    (the rewriter wants one contracting and one non-contracting dimension per operand)."""
    k, n = b.shape
    y = jax.lax.dot_general(a.reshape(-1, k), b, (((1,), (0,)), ((), ())), precision=_precision(gemm))
    return y.reshape(*a.shape[:-1], n)


# the leaves `prequantize` and `calibrate` add beside a GEMM's kernel and bias
KERNEL_E4M3, KERNEL_SCALE, INPUT_SCALE = "kernel_e4m3", "kernel_scale", "input_scale"


def operands(module: nn.Module, x, kernel, dtype):
    """(x, kernel) of an fp8 GEMM in `module` (QKV or `Dense`), through e4m3 and back in `dtype`: the kernel
    from the module's stored e4m3 copy where `prequantize` made one (else quantised here, at its amax), x at
    the module's calibrated scale where `calibrate` stored one (else at its own amax)."""
    if module.has_variable("params", KERNEL_E4M3):
        kernel = dequantize(module.get_variable("params", KERNEL_E4M3), module.get_variable("params", KERNEL_SCALE),
                            dtype)
    else:
        kernel = fake_quant(kernel.astype(dtype), dtype)
    x = x.astype(dtype)
    if module.has_variable("params", INPUT_SCALE):
        return fake_quant_at(x, module.get_variable("params", INPUT_SCALE), dtype), kernel
    return fake_quant(x, dtype), kernel


class Dense(nn.Dense):
    """`flax.linen.Dense` (same parameters) as an fp8 GEMM of layout `gemm`: x @ kernel through `operands`."""

    gemm: Any = "fp8"

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
        x, kernel = operands(self, x, kernel, self.dtype)
        y = matmul(x, kernel, self.gemm)
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,), self.param_dtype).astype(self.dtype)
        return y


def dense(gemm, dtype, layer: str):
    """The Dense class of block GEMM `layer`: `Dense` where `gemm` quantises it at `dtype`, else flax's own."""
    return functools.partial(Dense, gemm=gemm) if active(gemm, dtype, layer) else nn.Dense


def _fp8_layers(params, gemm):
    """(block name, layer name) of every GEMM that `gemm` runs in e4m3, from the blocks in `params`."""
    lay = layout(gemm)
    depth = sum(1 for k in params if k.startswith("blocks_"))
    for i in range(depth):
        if block_gemm(gemm, i, depth) != "dtype":
            for layer in lay.layers:
                yield f"blocks_{i}", layer


def _with_leaves(params, leaves: dict):
    """params with {(block, layer): {leaf: value}} added to those layers' dicts (copies; the rest shared)."""
    out = dict(params)
    for (blk, layer), new in leaves.items():
        block = dict(out[blk])
        parent = "mlp" if layer in ("fc1", "fc2") else "attn"
        block[parent] = dict(block[parent])
        block[parent][layer] = {**block[parent][layer], **new}
        out[blk] = block
    return out


def prequantize(params, gemm="fp8", dtype=jnp.bfloat16):
    """params with each e4m3 GEMM's weight quantised once: `kernel_e4m3` (e4m3) and `kernel_scale` (float32)
    beside its kernel, which stays as it was (float32 models, predmaps' LRP and bf16 read it; +1 byte per
    weight of memory). The fp8 model's outputs are bit for bit those of per-call weight quantisation: the
    same scale and rounding of the kernel cast to `dtype`, the model's compute dtype."""
    if layout(gemm) is None:
        raise ValueError("prequantize takes an fp8 gemm (a name in jaxvit.fp8.GEMMS other than 'dtype', or a Layout)")
    leaves = {}
    for blk, layer in _fp8_layers(params, gemm):
        k = params[blk]["mlp" if layer in ("fc1", "fc2") else "attn"][layer]["kernel"].astype(dtype)
        s = scale_of(k)
        leaves[blk, layer] = {KERNEL_E4M3: quantize(k, s), KERNEL_SCALE: s}
    return _with_leaves(params, leaves)


# where each block GEMM's input is sown (`jaxvit.model`'s intermediates), under its block
_INPUTS = {"qkv": ("attn_in",), "proj": ("attn", "proj_in"), "fc1": ("mlp_in",), "fc2": ("mlp", "fc2_in")}


def input_amax(model, params, images) -> dict:
    """{(block, layer): max |input|} over `images` of each GEMM `model.gemm` runs in e4m3, from `model` itself."""
    # "intermediates": jaxvit.model.INTERMEDIATES (not imported: jaxvit.model imports this module)
    _, state = model.apply({"params": params}, images, mutable=["intermediates"])  # eager: one call, no compile
    inter = state["intermediates"]
    out = {}
    for blk, layer in _fp8_layers(params, model.gemm):
        node = inter[blk]
        for key in _INPUTS[layer]:
            node = node[key]
        out[blk, layer] = jnp.max(jnp.abs(node[0])).astype(jnp.float32)
    return out


def calibrate(model, params, images, margin: float = 2.0):
    """params with a static `input_scale` for each e4m3 GEMM: the power-of-two scale of `margin` times its
    input's max |value| over the calibration `images` (run through `model`, an fp8 model, with current scaling
    where params have no scales yet). An input beyond 448 * scale later saturates to +-448 * scale: `margin`
    (>= 1) is headroom for inputs larger than the calibration set's; e4m3's relative precision is the same over
    its range, so a factor 2 costs only values near its subnormals (~2^-14 of the largest)."""
    if layout(model.gemm) is None or not active(model.gemm, model.dtype):
        raise ValueError(f"calibrate takes an fp8 model (half-precision dtype, gemm in {GEMMS[1:]} or a Layout); "
                         f"got gemm={model.gemm!r}, dtype={jnp.dtype(model.dtype).name}")
    if not margin >= 1:
        raise ValueError(f"calibrate's margin must be >= 1 (headroom over the calibration amax); got {margin}")
    amax = input_amax(model, params, images)
    return _with_leaves(params, {k: {INPUT_SCALE: scale_of(a * margin)} for k, a in amax.items()})
