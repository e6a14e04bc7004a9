"""Opt-in tanh GELU for a half-precision ViT's MLP: `ViT(config, dtype=jnp.bfloat16, gelu="tanh")`.

timm's ViTs compute exact GELU, x/2 (1 + erf(x/sqrt 2)); so does jaxvit by default (`gelu="erf"`).
`gelu="tanh"` computes the tanh approximation, x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (torch's
`GELU(approximate="tanh")`, `jax.nn.gelu(approximate=True)`), for one reason: it is the GELU cuBLASLt can
apply in a GEMM's epilogue, which takes fc1's separate GELU pass (a read and a write of the (B, T, 4D)
activation) off the GPU. XLA:GPU's gemm rewriter fuses it where fc1 + bias + GELU is spelled as
`tanh_gelu` spells it, on a cuBLASLt GEMM (`--xla_gpu_enable_cublaslt=true`): the epilogue then computes
the function in float32 from the float32 accumulator and rounds once. Where XLA does not fuse it (CPU,
TPU, a GPU without cuBLASLt) the chain runs as written, in the compute dtype with its constants rounded
to it. How far either moves the maps: bench/NOTES.md (`python -m bench.gelu_numerics`).

Like `jaxvit.fp8`, it acts in half precision only: a float32 model, and predmaps' LRP (which re-runs any
model in float32), compute exact GELU whatever `gelu` says.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

GELUS = ("erf", "tanh")  # ViT.gelu: exact (timm's) or the tanh approximation, opt-in


def check(gelu: str, kernels_parts: frozenset) -> None:
    """Raises ValueError for an unknown `gelu` or one the model's Pallas kernels would not compute."""
    if gelu not in GELUS:
        raise ValueError(f"unknown gelu {gelu!r}; choose from {GELUS}")
    if gelu == "tanh" and "mlp" in kernels_parts:
        raise ValueError("gelu='tanh' computes fc1's GELU in the GEMM's epilogue, which kernels with 'mlp' run as "
                         "a Pallas kernel with exact GELU; choose kernels='xla', 'pallas_layernorm', 'pallas_head' "
                         "or 'pallas_layernorm_head'")


def active(gelu: str, act: str, dtype) -> bool:
    """Whether `gelu` replaces the MLP activation `act` (a ViTConfig.act) at compute dtype `dtype`: GELU
    activations in half precision only."""
    return (gelu == "tanh" and act in ("gelu", "gelu_tanh")
            and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)))


def tanh_gelu(y):
    """x * cdf(x), cdf = 0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x (x x)))), in y's dtype, op for op the
    form XLA:GPU's gemm rewriter (xla/service/gpu/transforms/gemm_rewriter.cc, HandleMultiply) matches on
    a cuBLASLt GEMM's output: every use of y is the GEMM's (+ bias) output itself, so no convert may come
    between (float32 math here would keep it out of the epilogue)."""
    return y * (0.5 * (1.0 + jnp.tanh(math.sqrt(2 / math.pi) * (y + 0.044715 * (y * (y * y))))))
