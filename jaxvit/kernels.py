"""Pallas (Triton) kernels for the memory-bound steps beside a half-precision ViT's GEMMs.

Beside the GEMMs, most of a half-precision ViT call on GPU is memory-bound (bench/NOTES.md). XLA computes each
LayerNorm as two kernels (statistics, then apply: x is read twice) and the exact GELU as its own pass
over fc1's (B*T, 4D) output (cuBLASLt's GELU epilogue is the tanh form, which timm's ViTs do not
compute). These kernels do each in one pass:

  layer_norm   statistics and normalisation in one kernel, a block of rows per program: x is read
               once, and the float32 statistics are two-pass (mean((x - mean)^2)) for free;
  dense_act    x @ w + b followed by the MLP activation in the GEMM's epilogue, in float32 from the
               float32 accumulator, rounded once: fc1's output is written once, activated.
  dense_logsumexp  logsumexp_c (x @ w + b)_c per row, the classes' logits never leaving the kernel:
               the softmax normaliser of predmaps' prediction maps (every patch token through the
               head), whose (rows, C) float32 logits XLA writes and reads back.

All three are pure functions that work under jit, vmap and grad (the backward is the vjp of the plain
XLA computation, `layer_norm_reference` / `dense_act_reference` / `dense_logsumexp_reference`).
Lowered for CUDA they are Triton kernels; for any other platform they are that XLA computation
(`interpret=True` runs the kernels in the Pallas interpreter instead, anywhere: slow, for checking
them). `jaxvit.ViT(kernels="pallas")` uses them in half precision.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu", "identity")


@dataclasses.dataclass(frozen=True)
class LayerNormConfig:
    """Rows per program and warps per program of `layer_norm`."""

    block_rows: int = 8
    num_warps: int = 4


@dataclasses.dataclass(frozen=True)
class DenseConfig:
    """Tile of `dense_act` and `dense_logsumexp`: (block_m x block_n) outputs per program (per step over
    the classes in `dense_logsumexp`), block_k deep steps over K, num_stages loads in flight (Triton's
    software pipelining)."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 4


@dataclasses.dataclass(frozen=True)
class Tiles:
    """The tiles a model's kernels run with; text form "layer_norm=8,4;dense=128,128,64,4,4;head=..."
    (the fields of LayerNormConfig, DenseConfig, DenseConfig in order), as `str()` writes and `parse`
    reads. `head` is `dense_logsumexp`'s."""

    layer_norm: LayerNormConfig = LayerNormConfig()
    dense: DenseConfig = DenseConfig()
    head: DenseConfig = DenseConfig()

    def __str__(self):
        return ";".join(f"{f.name}=" + ",".join(str(v) for v in dataclasses.astuple(getattr(self, f.name)))
                        for f in dataclasses.fields(self))

    @classmethod
    def parse(cls, text: str) -> "Tiles":
        types = {f.name: type(f.default) for f in dataclasses.fields(cls)}  # the configs, from the defaults
        values = {}
        for part in filter(None, (p.strip() for p in text.split(";"))):
            name, _, nums = part.partition("=")
            name = name.strip()
            if name not in types:
                raise ValueError(f"kernel tiles {text!r}: unknown kernel {name!r}; choose from {', '.join(types)}")
            try:
                values[name] = types[name](*(int(v) for v in nums.split(",")))
            except (TypeError, ValueError):
                n = len(dataclasses.fields(types[name]))
                raise ValueError(f"kernel tiles {text!r}: {name} takes up to {n} integers "
                                 f"({', '.join(f.name for f in dataclasses.fields(types[name]))})") from None
        return cls(**values)


def half_precision(dtype) -> bool:
    """Whether the kernels serve this compute dtype: 2-byte floats only (a float32 Triton dot would round
    through TF32, which the float32 model path must not)."""
    return jnp.dtype(dtype).itemsize == 2


def _erf(x):
    """erf for float32 from exp, mul, add and one division (Abramowitz & Stegun 7.1.26: absolute error
    <= 1.5e-7 in exact arithmetic, 5.2e-7 measured in float32): Pallas' Triton lowering has no erf.
    Inside GELU, x/2 (1 + erf), that is a few float32 ulps of 1 + erf, far under the bf16 rounding of
    the result."""
    a = jnp.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    e = 1.0 - poly * jnp.exp(-a * a)
    return jnp.where(x < 0, -e, e)


def _activate(y, act: str):
    """The activation on float32 values (inside a kernel)."""
    if act == "gelu":
        return 0.5 * y * (1.0 + _erf(y * (2 ** -0.5)))
    if act == "gelu_tanh":
        return 0.5 * y * (1.0 + jnp.tanh(0.7978845608028654 * (y + 0.044715 * y * y * y)))
    if act == "quick_gelu":
        return y / (1.0 + jnp.exp(-1.702 * y))
    if act == "identity":
        return y
    raise ValueError(f"unsupported activation {act!r}; choose from {ACTIVATIONS}")


def _kernel_or_reference(kernel_fn, reference_fn, interpret: bool):
    """A function of arrays: kernel_fn(..., interpret=False) where lowered for CUDA, reference_fn for
    other platforms (the choice is made per lowering platform, so one traced function serves both);
    kernel_fn(..., interpret=True) everywhere with `interpret`. Backward: reference_fn's vjp
    (pallas_call has no transpose rule)."""
    def forward(*args):
        if interpret:
            return kernel_fn(*args, interpret=True)
        return jax.lax.platform_dependent(*args, cuda=functools.partial(kernel_fn, interpret=False),
                                          default=reference_fn)

    @jax.custom_vjp
    def f(*args):
        return forward(*args)

    def fwd(*args):
        return forward(*args), args

    def bwd(args, g):
        return jax.vjp(reference_fn, *args)[1](g)

    f.defvjp(fwd, bwd)
    return f


# ---------------------------------------------------------------- LayerNorm


def layer_norm_reference(x, scale, bias, eps: float, out_dtype):
    """The LayerNorm `layer_norm` computes, in plain XLA: float32 two-pass statistics."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps) * scale + bias).astype(out_dtype)


def _load_rows(ref, row_ok):
    """ref[...] with the rows outside the array (row_ok False) read as 0; row_ok None: all inside (Triton
    takes no fill value without a mask)."""
    if row_ok is None:
        return plgpu.load(ref)
    return plgpu.load(ref, mask=row_ok, other=0.0)


def _layer_norm_kernel(x_ref, scale_ref, bias_ref, o_ref, *, eps, block_rows, width):
    rows, d = x_ref.shape
    start = pl.program_id(0) * block_rows
    col_ok = jnp.arange(width) < d
    ok = ((start + jnp.arange(block_rows)) < rows)[:, None] & col_ok[None, :]
    block = (pl.ds(start, block_rows), pl.ds(0, width))
    x = plgpu.load(x_ref.at[block], mask=ok, other=0.0).astype(jnp.float32)
    mean = x.sum(1, keepdims=True) / d
    xc = jnp.where(ok, x - mean, 0.0)
    rstd = jax.lax.rsqrt((xc * xc).sum(1, keepdims=True) / d + eps)
    scale = plgpu.load(scale_ref.at[pl.ds(0, width)], mask=col_ok, other=0.0)
    bias = plgpu.load(bias_ref.at[pl.ds(0, width)], mask=col_ok, other=0.0)
    plgpu.store(o_ref.at[block], (xc * rstd * scale[None, :] + bias[None, :]).astype(o_ref.dtype), mask=ok)


def _layer_norm_pallas(x, scale, bias, *, eps, out_dtype, config, interpret):
    d = x.shape[-1]
    rows = x.size // d
    br = config.block_rows
    call = pl.pallas_call(
        functools.partial(_layer_norm_kernel, eps=eps, block_rows=br, width=pl.next_power_of_2(d)),
        out_shape=jax.ShapeDtypeStruct((rows, d), out_dtype),
        grid=(pl.cdiv(rows, br),),
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps),
        interpret=interpret,
        name="jaxvit_layer_norm",
    )
    return call(x.reshape(rows, d), scale.astype(jnp.float32), bias.astype(jnp.float32)).reshape(x.shape)


def layer_norm(x, scale, bias, eps: float, out_dtype=None, config: LayerNormConfig | None = None,
               interpret: bool = False):
    """LayerNorm over the last axis in one kernel: x (..., D), scale and bias (D,) -> (..., D) in
    out_dtype (default x's). Statistics in float32, two-pass; equals `layer_norm_reference` up to
    the rounding of float32 sums."""
    if x.shape[-1:] != scale.shape or scale.shape != bias.shape:
        raise ValueError(f"layer_norm: scale {scale.shape} and bias {bias.shape} must be (D,) for x {x.shape}")
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    config = config or LayerNormConfig()
    kernel = functools.partial(_layer_norm_pallas, eps=eps, out_dtype=out_dtype, config=config)
    reference = functools.partial(layer_norm_reference, eps=eps, out_dtype=out_dtype)
    return _kernel_or_reference(kernel, reference, interpret)(x, scale, bias)


# ---------------------------------------------------------------- GEMMs: the shared pieces


def _logits_reference(x, w, b):
    """float32 x @ w + b with x's-dtype inputs: what both GEMM kernels compute before their epilogue."""
    z = jnp.einsum("...k,kn->...n", x, w.astype(x.dtype), preferred_element_type=jnp.float32)
    return z + b.astype(jnp.float32)


def _check_chain(name, x, w, b):
    if x.shape[-1:] != w.shape[:1] or b.shape != w.shape[1:]:
        raise ValueError(f"{name}: x {x.shape}, w {w.shape} and b {b.shape} do not chain as (..., K) @ (K, N) + (N,)")


def _row_mask(i, rows, bm):
    """Which of row block i's bm rows lie inside the array: (bm,) bool, or None when all of every block do."""
    return None if rows % bm == 0 else (i * bm + jnp.arange(bm)) < rows


def _tile_logits(x_ref, w_ref, b_ref, m_slice, n_slice, row_ok, config):
    """(block_m, block_n) float32 x[m_slice] @ w[:, n_slice] + b[n_slice], accumulated over K in steps of
    block_k (the loop Triton pipelines)."""
    bk = config.block_k
    mask = None if row_ok is None else row_ok[:, None]

    def step(t, acc):
        k_slice = pl.ds(pl.multiple_of(t * bk, bk), bk)
        xa = _load_rows(x_ref.at[m_slice, k_slice], mask)
        return acc + jnp.dot(xa, plgpu.load(w_ref.at[k_slice, n_slice]), preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, x_ref.shape[1] // bk, step, jnp.zeros((config.block_m, config.block_n), jnp.float32))
    return acc + plgpu.load(b_ref.at[n_slice])[None, :]


# ---------------------------------------------------------------- GEMM + activation


def dense_act_reference(x, w, b, act: str):
    """What `dense_act` computes, in plain XLA: float32 x @ w + b, activated, rounded to x's dtype."""
    return _activate(_logits_reference(x, w, b), act).astype(x.dtype)


def _dense_act_kernel(x_ref, w_ref, b_ref, o_ref, *, act, config, rows):
    bm, bn = config.block_m, config.block_n
    # program_id(0), the fastest-launched axis, walks N: programs running together share x's rows
    # (read from HBM once, then from L2) and the weight (at most a few MiB) stays in L2.
    i, j = pl.program_id(1), pl.program_id(0)
    row_ok = _row_mask(i, rows, bm)
    m_slice, n_slice = pl.ds(i * bm, bm), pl.ds(pl.multiple_of(j * bn, bn), bn)
    y = _activate(_tile_logits(x_ref, w_ref, b_ref, m_slice, n_slice, row_ok, config), act)
    plgpu.store(o_ref.at[m_slice, n_slice], y.astype(o_ref.dtype), mask=None if row_ok is None else row_ok[:, None])


def _dense_act_pallas(x, w, b, *, act, config, interpret):
    k, n = w.shape
    rows = x.size // k
    call = pl.pallas_call(
        functools.partial(_dense_act_kernel, act=act, config=config, rows=rows),
        out_shape=jax.ShapeDtypeStruct((rows, n), x.dtype),
        grid=(n // config.block_n, pl.cdiv(rows, config.block_m)),
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name=f"jaxvit_dense_{act}",
    )
    return call(x.reshape(rows, k), w.astype(x.dtype), b.astype(jnp.float32)).reshape(x.shape[:-1] + (n,))


def dense_act_supported(k: int, n: int, dtype, config: DenseConfig | None = None) -> bool:
    """Whether `dense_act` tiles a (K, N) weight: K and N multiples of the tile, half-precision inputs."""
    config = config or DenseConfig()
    return k % config.block_k == 0 and n % config.block_n == 0 and half_precision(dtype)


def dense_act(x, w, b, act: str = "identity", config: DenseConfig | None = None, interpret: bool = False):
    """act(x @ w + b) in one kernel: x (..., K) in half precision, w (K, N), b (N,) -> (..., N) in x's
    dtype. float32 accumulation, bias and activation; one rounding at the end. act is one of
    ACTIVATIONS ('gelu' is the exact erf form). Raises ValueError where `dense_act_supported` is false."""
    config = config or DenseConfig()
    _check_chain("dense_act", x, w, b)
    if not dense_act_supported(*w.shape, x.dtype, config):
        raise ValueError(f"dense_act: weight {w.shape} with {jnp.dtype(x.dtype).name} inputs does not fit the tile "
                         f"{config}; K, N must be multiples of block_k, block_n and x half precision")
    if act not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {act!r}; choose from {ACTIVATIONS}")
    kernel = functools.partial(_dense_act_pallas, act=act, config=config)
    reference = functools.partial(dense_act_reference, act=act)
    return _kernel_or_reference(kernel, reference, interpret)(x, w, b)


# ---------------------------------------------------------------- GEMM + logsumexp over its columns


def dense_logsumexp_reference(x, w, b):
    """What `dense_logsumexp` computes, in plain XLA: logsumexp_c (x @ w + b)_c, float32."""
    return jax.nn.logsumexp(_logits_reference(x, w, b), axis=-1)


def _dense_logsumexp_kernel(x_ref, w_ref, b_ref, o_ref, *, config, rows):
    bm, bn = config.block_m, config.block_n
    i = pl.program_id(0)
    row_ok = _row_mask(i, rows, bm)
    m_slice = pl.ds(i * bm, bm)

    def n_step(j, carry):  # one block of classes: its logits, merged into the running (max, sum of exp)
        top, total = carry
        n_slice = pl.ds(pl.multiple_of(j * bn, bn), bn)
        z = _tile_logits(x_ref, w_ref, b_ref, m_slice, n_slice, row_ok, config)  # padded classes: -inf
        new_top = jnp.maximum(top, z.max(1))
        total = total * jnp.exp(top - new_top) + jnp.exp(z - new_top[:, None]).sum(1)
        return new_top, total

    init = (jnp.full((bm,), -jnp.inf, jnp.float32), jnp.zeros((bm,), jnp.float32))
    top, total = jax.lax.fori_loop(0, w_ref.shape[1] // bn, n_step, init)
    plgpu.store(o_ref.at[m_slice], top + jnp.log(total), mask=row_ok)


def _dense_logsumexp_pallas(x, w, b, *, config, interpret):
    k, n = w.shape
    rows = x.size // k
    pad = -n % config.block_n
    w = jnp.pad(w.astype(x.dtype), ((0, 0), (0, pad)))
    b = jnp.pad(b.astype(jnp.float32), (0, pad), constant_values=-jnp.inf)
    call = pl.pallas_call(
        functools.partial(_dense_logsumexp_kernel, config=config, rows=rows),
        out_shape=jax.ShapeDtypeStruct((rows,), jnp.float32),
        grid=(pl.cdiv(rows, config.block_m),),
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name="jaxvit_dense_logsumexp",
    )
    return call(x.reshape(rows, k), w, b).reshape(x.shape[:-1])


def dense_logsumexp_supported(k: int, dtype, config: DenseConfig | None = None) -> bool:
    """Whether `dense_logsumexp` tiles a (K, N) weight: K a multiple of block_k (N is padded), x half precision."""
    config = config or DenseConfig()
    return k % config.block_k == 0 and half_precision(dtype)


def dense_logsumexp(x, w, b, config: DenseConfig | None = None, interpret: bool = False):
    """logsumexp over N of x @ w + b in one kernel: x (..., K) in half precision, w (K, N), b (N,) ->
    (...,) float32. float32 accumulation and bias; an online logsumexp over blocks of block_n columns,
    so the (..., N) logits are never written. Raises ValueError where `dense_logsumexp_supported` is false."""
    config = config or DenseConfig()
    _check_chain("dense_logsumexp", x, w, b)
    if not dense_logsumexp_supported(w.shape[0], x.dtype, config):
        raise ValueError(f"dense_logsumexp: K={w.shape[0]} with {jnp.dtype(x.dtype).name} inputs does not fit the "
                         f"tile {config}; K must be a multiple of block_k and x half precision")
    kernel = functools.partial(_dense_logsumexp_pallas, config=config)
    return _kernel_or_reference(kernel, dense_logsumexp_reference, interpret)(x, w, b)
