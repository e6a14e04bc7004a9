"""Opt-in fp8 GEMMs for a half-precision ViT's block layers: `ViT(config, dtype=jnp.bfloat16, gemm="fp8")`.

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

import jax
import jax.numpy as jnp

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0  # float(jnp.finfo(E4M3).max)

# ViT.gemm: "dtype" = every GEMM in the compute dtype (the default); "fp8" = e4m3 block GEMMs with float32
# accumulation; "fp8_fast" = the same with cuBLASLt's fast (reduced-precision) fp8 accumulation on a GPU
GEMMS = ("dtype", "fp8", "fp8_fast")


def check(gemm: str, kernels_parts: frozenset) -> None:
    """Raises ValueError for an unknown `gemm` or one that cannot hold with the model's Pallas kernels."""
    if gemm not in GEMMS:
        raise ValueError(f"unknown gemm {gemm!r}; choose from {GEMMS}")
    if gemm != "dtype" and "mlp" in kernels_parts:
        raise ValueError(f"gemm={gemm!r} quantises fc1, which kernels with 'mlp' run as a Pallas bf16 kernel; "
                         "choose kernels='xla', 'pallas_layernorm', 'pallas_head' or 'pallas_layernorm_head'")


def active(gemm: str, dtype) -> bool:
    """Whether `gemm` quantises at compute dtype `dtype`: in half precision only. A float32/float64 model
    (also predmaps' LRP, which re-runs any model in float32 from its stored weights) keeps its own GEMMs."""
    return gemm != "dtype" and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


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


def _precision(gemm: str):
    # XLA enables cuBLASLt's fast fp8 accumulation for a DEFAULT-precision dot, and keeps float32 otherwise
    return jax.lax.Precision.DEFAULT if gemm == "fp8_fast" else jax.lax.Precision.HIGHEST


def matmul(a, b, gemm: str) -> jax.Array:
    """a (..., K) @ b (K, N) for operands already through `fake_quant`, as one 2-D dot in their dtype
    (the rewriter wants one contracting and one non-contracting dimension per operand)."""
    k, n = b.shape
    y = jax.lax.dot_general(a.reshape(-1, k), b, (((1,), (0,)), ((), ())), precision=_precision(gemm))
    return y.reshape(*a.shape[:-1], n)


def dense_dot_general(gemm: str, dtype):
    """A `dot_general` for `flax.linen.Dense(dot_general=...)`: both operands through e4m3, then `matmul`;
    None (Dense's own lax.dot_general) where `gemm` does not quantise at `dtype` (`active`)."""
    if not active(gemm, dtype):
        return None

    def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
        del precision, preferred_element_type  # the fp8 GEMM sets its own (`_precision`)
        if tuple(map(tuple, dimension_numbers[0])) != ((lhs.ndim - 1,), (0,)) or any(dimension_numbers[1]):
            raise ValueError(f"jaxvit.fp8 computes Dense's x @ kernel only; got dimension numbers {dimension_numbers}")
        return matmul(fake_quant(lhs, dtype), fake_quant(rhs, dtype), gemm)

    return dot_general
