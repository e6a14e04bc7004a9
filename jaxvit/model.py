"""A Flax (linen) Vision Transformer that computes what timm's `VisionTransformer` computes.

One module, `ViT`, configured by a `ViTConfig`, that returns the intermediates an
explanation needs: every layer's tokens and every head's class-token attention row.
Parameter names mirror timm's (`blocks_3/attn/qkv/kernel` <-> `blocks.3.attn.qkv.weight`)
so the conversion in `convert` is a transpose per tensor and nothing else. (Over 600 lines: the
layers of one forward in reading order, each with the numerics it owns, read best as one file.)

Explainers that need more than `ViTOutput` (predmaps' LRP) read the inputs of every layer from
the `INTERMEDIATES` collection, sown only when asked: `apply(..., mutable=[INTERMEDIATES])`
(`intermediates`); a default apply has the same jaxpr as without it.

Numerics that decide parity with timm: LayerNorm eps from the config (1e-6 for most timm
ViTs, 1e-5 for CLIP), exact erf GELU unless the config says quick_gelu, q scaled by
dh^-0.5 before q k^T, softmax and LayerNorm statistics in float32 whatever the compute dtype.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping, TypeAlias

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from jaxvit import fp8
from jaxvit import gelu as gelu_opt
from jaxvit import kernels as pallas_kernels
from jaxvit.config import ViTConfig
from jaxvit.posemb import resample_abs_pos_embed, sincos2d

# The flax collection the model sows its layers' inputs into (free unless passed as mutable).
INTERMEDIATES = "intermediates"

# The params pytree: nested dicts of arrays named like timm's tensors, as `model.init(...)["params"]`.
Params: TypeAlias = Mapping[str, Any]

ATTENTION_IMPLS = ("fused", "materialized")
PALLAS_PARTS = ("layernorm", "mlp", "head")
# "pallas_layernorm_head": the two that each paid alone on a GPU (bench/NOTES.md), together
KERNEL_IMPLS = ("xla", "pallas", "pallas_layernorm", "pallas_mlp", "pallas_head", "pallas_layernorm_head")


def pallas_parts(kernels: str) -> frozenset[str]:
    """The steps `ViT.kernels` runs as Pallas kernels in half precision: 'layernorm' (every LayerNorm),
    'mlp' (fc1 + activation), 'head' (the softmax normaliser of predmaps' prediction maps)."""
    if kernels not in KERNEL_IMPLS:
        raise ValueError(f"unknown kernels {kernels!r}; choose from {KERNEL_IMPLS}")
    if kernels == "xla":
        return frozenset()
    return frozenset(PALLAS_PARTS) if kernels == "pallas" else frozenset(kernels[len("pallas_"):].split("_"))

_dense_init = nn.initializers.truncated_normal(0.02)


def _wide(dtype):
    """The dtype of statistics, softmax and logits: float32, or float64 for a float64 model (x64)."""
    return jnp.promote_types(dtype, jnp.float32)


def _sow(module: nn.Module, name: str, value) -> None:
    """Stores `value` in the `INTERMEDIATES` collection when the caller made it mutable; else nothing."""
    module.sow(INTERMEDIATES, name, value)


@struct.dataclass
class ViTOutput:
    """What `ViT.__call__` returns; batch axis first.

    T = P + N tokens: P prefix tokens (class, distillation, registers: see `ViTConfig`)
    then N = gh * gw patch tokens, row-major.

    Attributes:
      logits: (B, C) float32 classifier output (DeiT distilled: mean of both heads); None
        for a model without a head (num_classes=0).
      pre_logits: (B, D) the pooled, normalised features the head reads (timm's
        `forward_head(x, pre_logits=True)`; (B, 2D) with head_input='token_and_patch_mean').
      tokens: (B, L + 1, T, D): x^(0) (embeddings after `norm_pre`, the first block's input)
        and the output of each of the L blocks, before the final norm.
      attn_cls: (B, L, H, T) float32, the class token's attention row of every head of every
        block (softmax over all T columns). None for models without a class token.
      attn: (B, L, H, T, T) float32 full attention matrices, only with `return_attn=True`.
    """

    logits: jax.Array | None
    pre_logits: jax.Array
    tokens: jax.Array
    attn_cls: jax.Array | None
    attn: jax.Array | None = None

    def __repr__(self) -> str:
        return fields_repr(self)


def fields_repr(obj) -> str:
    """A dataclass of arrays as its arrays' dtypes and shapes, e.g. `ViTOutput(logits=float32[2,10], ...)`:
    the default repr printed every value of every array."""
    import dataclasses

    def one(v):
        if hasattr(v, "shape") and hasattr(v, "dtype"):
            return f"{v.dtype}[{','.join(map(str, v.shape))}]"
        return repr(v)

    return f"{type(obj).__name__}({', '.join(f'{f.name}={one(getattr(obj, f.name))}' for f in dataclasses.fields(obj))})"


class LayerNorm(nn.Module):
    """LayerNorm with float32 statistics; output in the compute dtype.

    float32 output: two-pass variance, mean((x - mean)^2), for parity with timm. Half-precision
    output: one-pass E[x^2] - mean^2, so both statistics come from one read of x (faster on GPU:
    bench/NOTES.md). Its float32 cancellation error, ~6e-8 * (1 + mean^2 / var) relative, stays
    under the bf16 rounding of the output (2^-9) while a row's |mean| is under ~100 standard deviations.

    kernels="pallas" or "pallas_layernorm" in half precision (`pallas_parts`): one kernel
    (`jaxvit.kernels.layer_norm`, two-pass statistics).
    """

    eps: float
    dtype: Any = jnp.float32
    kernels: str = "xla"
    kernel_tiles: pallas_kernels.Tiles = pallas_kernels.Tiles()

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (d,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (d,), jnp.float32)
        if "layernorm" in pallas_parts(self.kernels) and pallas_kernels.half_precision(self.dtype):
            return pallas_kernels.layer_norm(x, scale, bias, self.eps, self.dtype, self.kernel_tiles.layer_norm)
        x32 = x.astype(_wide(self.dtype))
        mean = x32.mean(-1, keepdims=True)
        if jnp.dtype(self.dtype).itemsize < 4:
            var = jnp.maximum(jnp.square(x32).mean(-1, keepdims=True) - jnp.square(mean), 0.0)
        else:
            var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias
        return y.astype(self.dtype)


def _gelu_erf(x):
    """Exact GELU, x/2 (1 + erf(x/sqrt 2)), evaluated in at least float32 and rounded once.

    torch's kernels compute this erf form in float32 for half inputs. `jax.nn.gelu` instead
    evaluates erfc(-x/sqrt 2) in the input dtype: erfc costs both of XLA's erf branches plus an
    exp, which made GELU a large share of the bf16 forward on GPU (bench/NOTES.md).
    """
    wide = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return (0.5 * wide * (1.0 + jax.lax.erf(wide * (2 ** -0.5)))).astype(x.dtype)


def activation(name: str):
    """The MLP activation named by `ViTConfig.act` (also used by predmaps' LRP forward)."""
    if name == "gelu":
        return _gelu_erf
    if name == "gelu_tanh":
        return lambda x: nn.gelu(x, approximate=True)
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    raise ValueError(f"unsupported activation {name!r}")


def patchify(images, p: int):
    """(B, H, W, C) -> (B, N, p*p*C): patches row-major, each flattened (row, col, channel), the
    order of a (p, p, C, D) conv kernel reshaped to (p*p*C, D)."""
    b, h, w, c = images.shape
    x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


class PatchEmbed(nn.Module):
    """timm's stride-p conv patch embedding as one GEMM over patchified pixels, in the compute dtype
    (as torch autocast runs timm's conv), with float32 accumulation.

    Parameters keep the conv layout (kernel (p, p, C, D), bias (D,)). cuDNN ran the strided float32
    conv with layout conversions, slower than this GEMM, and in bf16 the pixels and the output move
    half the bytes (bench/NOTES.md).
    """

    features: int
    patch_size: int
    use_bias: bool = True
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, images):
        p, c = self.patch_size, images.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (p, p, c, self.features), jnp.float32)
        x = jnp.matmul(patchify(images.astype(self.dtype), p),
                       kernel.reshape(p * p * c, self.features).astype(self.dtype), precision=self.precision)
        if self.use_bias:
            x = x + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(self.dtype)
        return x


def _heads_first(x):
    """(B, T, H, dh) -> (B, H, T, dh): each head's T x dh block contiguous, so the two attention
    matmuls are plain batched GEMMs (XLA:CPU ran the bqhd einsums several times slower: bench/NOTES.md)."""
    return jnp.swapaxes(x, 1, 2)


def _cudnn_attention(dtype) -> bool:
    """Whether fused attention goes through cuDNN: on GPU in half precision."""
    return jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)


def _fused_attention(q, k, v, scale, dtype, precision=None):
    """softmax(q k^T * scale) v for (B, T, H, dh) inputs without returning the probabilities.

    cuDNN flash attention on GPU in half precision. Elsewhere: exp(logits - rowmax) @ v, divided
    by the row sums afterwards (T x dh divisions instead of T x T; the same value up to rounding),
    with float32 logits and sums.
    """
    if _cudnn_attention(dtype):
        try:
            return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
        except Exception as e:  # cuDNN absent or this shape unsupported: the path below is exact too
            _warn_cudnn_fallback(e)
    return _heads_first_attention(q, k, v, scale, dtype, precision)


_CUDNN_FALLBACKS_WARNED: set = set()


def _warn_cudnn_fallback(e: Exception) -> None:
    """Says once per kind of failure that attention left cuDNN: exact, but slower, unseen otherwise."""
    what = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if what not in _CUDNN_FALLBACKS_WARNED:
        _CUDNN_FALLBACKS_WARNED.add(what)
        warnings.warn(f"jaxvit: cuDNN fused attention failed ({what}); using jaxvit's own attention kernel "
                      "(the same maps, slower)", RuntimeWarning, stacklevel=2)


def _heads_first_attention(q, k, v, scale, dtype, precision=None):
    """jaxvit's own kernel: (B, T, H, dh) in and out, heads-first inside, deferred normalisation."""
    q, k, v = _heads_first(q), _heads_first(k), _heads_first(v)
    logits = jnp.einsum("bhqd,bhkd->bhqk", q * jnp.asarray(scale, q.dtype), k, precision=precision,
                        preferred_element_type=_wide(dtype))
    e = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
    out = jnp.einsum("bhqk,bhkd->bhqd", e.astype(dtype), v, precision=precision, preferred_element_type=_wide(dtype))
    out = out / e.sum(-1, keepdims=True)
    return jnp.swapaxes(out, 1, 2).astype(dtype)


def _cls_logits(q0, k):
    """q0 (B, H, dh) . k (B, T, H, dh) -> (B, H, T) float32, as a multiply-reduce.

    One pass over k in its (B, T, H, dh) layout, float32 products and sums (exact products for
    half inputs, like a dot with float32 accumulation); as fast as a (b, h)-batched dot (bench/NOTES.md)."""
    prod = q0.astype(jnp.float32)[:, None] * k.astype(jnp.float32)
    return jnp.swapaxes(prod.sum(-1), 1, 2)


class QKV(nn.Module):
    """timm's qkv Linear (kernel (D, 3*H*dh), bias (3*H*dh,)) -> q, k, v, each (B, T, H, dh).

    `separate`: one GEMM per slice of the kernel instead of one GEMM split afterwards. cuDNN's
    attention wants q, k and v as dense arrays, so XLA copies each slice of a (B, T, 3, H, dh)
    product; three GEMMs write them where they are read. Elsewhere the attention transposes q, k, v
    anyway and one wide GEMM is faster (both measured: bench/NOTES.md). Same arithmetic as
    `nn.Dense` either way: inputs, kernel and bias in the compute dtype.
    """

    num_heads: int
    dim_head: int
    use_bias: bool = True
    dtype: Any = jnp.float32
    separate: bool = False
    precision: Any = None
    gemm: str = "dtype"

    @nn.compact
    def __call__(self, x):
        b, t, d = x.shape
        hd = self.num_heads * self.dim_head
        kernel = self.param("kernel", _dense_init, (d, 3 * hd), jnp.float32).astype(self.dtype)
        bias = self.param("bias", nn.initializers.zeros, (3 * hd,), jnp.float32) if self.use_bias else None
        bias = None if bias is None else bias.astype(self.dtype)
        x = x.astype(self.dtype)
        mm = lambda a, b: jnp.matmul(a, b, precision=self.precision)  # noqa: E731
        if fp8.active(self.gemm, self.dtype, "qkv"):  # x and kernel quantised once; the slices of `separate` follow
            x, kernel = fp8.operands(self, x, kernel, self.dtype)
            mm = lambda a, b: fp8.matmul(a, b, self.gemm)  # noqa: E731
        if not self.separate:
            y = mm(x, kernel) if bias is None else mm(x, kernel) + bias
            return tuple(jnp.moveaxis(y.reshape(b, t, 3, self.num_heads, self.dim_head), 2, 0))
        outs = []
        for i in range(3):
            y = mm(x, kernel[:, i * hd:(i + 1) * hd])
            if bias is not None:
                y = y + bias[i * hd:(i + 1) * hd]
            outs.append(y.reshape(b, t, self.num_heads, self.dim_head))
        return tuple(outs)


class Attention(nn.Module):
    """Sows (when asked) q, k, v (B, T, H, dh) after any q/k norm, `probs` (B, H, T, T) (materialized
    only, after the perturbation) and `proj_in`, the input of the output projection."""

    config: ViTConfig
    dtype: Any = jnp.float32
    attention: str = "fused"
    kernels: str = "xla"
    kernel_tiles: pallas_kernels.Tiles = pallas_kernels.Tiles()
    precision: Any = None
    gemm: str = "dtype"

    @nn.compact
    def __call__(self, x, *, want_cls: bool, want_full: bool):
        cfg = self.config
        b, t, _ = x.shape
        h, dh = cfg.num_heads, cfg.dim_head
        separate = self.attention == "fused" and not want_full and _cudnn_attention(self.dtype)
        qkv = QKV(h, dh, cfg.qkv_bias, self.dtype, separate, self.precision, self.gemm, name="qkv")
        q, k, v = qkv(x)  # (B, T, H, dh)
        if cfg.qk_norm:
            q = LayerNorm(cfg.norm_eps, self.dtype, self.kernels, self.kernel_tiles, name="q_norm")(q)
            k = LayerNorm(cfg.norm_eps, self.dtype, self.kernels, self.kernel_tiles, name="k_norm")(k)
        for name, a in (("q", q), ("k", k), ("v", v)):
            _sow(self, name, a)
        scale = dh ** -0.5
        attn_cls = attn = None
        if self.attention == "materialized" or want_full:
            logits = jnp.einsum("bhqd,bhkd->bhqk", _heads_first(q) * jnp.asarray(scale, q.dtype), _heads_first(k),
                                precision=self.precision, preferred_element_type=_wide(self.dtype))
            probs = jax.nn.softmax(logits, axis=-1)  # (B, H, T, T) float32
            # Identity unless the caller passes a 'perturbations' collection: then the gradient
            # w.r.t. that zero variable is d(output)/d(attention), which gradient methods need.
            probs = self.perturb("attn", probs)
            _sow(self, "probs", probs)
            out = jnp.swapaxes(jnp.einsum("bhqk,bhkd->bhqd", probs.astype(self.dtype), _heads_first(v),
                                          precision=self.precision), 1, 2)
            attn = probs if want_full else None
            attn_cls = probs[:, :, 0] if want_cls else None
        elif self.attention == "fused":
            out = _fused_attention(q, k, v, scale, self.dtype, self.precision)
            if want_cls:  # the one row we need, exactly: softmax(q_cls k^T / sqrt(dh))
                attn_cls = jax.nn.softmax(_cls_logits(q[:, 0] * jnp.asarray(scale, q.dtype), k), axis=-1)
        else:
            raise ValueError(f"unknown attention implementation {self.attention!r}; choose from {ATTENTION_IMPLS}")
        out = out.reshape(b, t, h * dh)
        if cfg.scale_attn_norm:
            out = LayerNorm(cfg.norm_eps, self.dtype, self.kernels, self.kernel_tiles, name="norm")(out)
        _sow(self, "proj_in", out)
        out = fp8.dense(self.gemm, self.dtype, "proj")(cfg.embed_dim, use_bias=cfg.proj_bias, dtype=self.dtype,
                                                       precision=self.precision, kernel_init=_dense_init, name="proj")(out)
        return out, attn_cls, attn


class DenseAct(nn.Module):
    """act(x @ kernel + bias) as one kernel (`jaxvit.kernels.dense_act`: the activation in the GEMM's
    epilogue), with `nn.Dense`'s parameters (kernel (in, out), bias (out,)). Inputs, kernel and bias
    are cast to the compute dtype as `nn.Dense` casts them; the sum and the activation stay float32
    and are rounded once (nn.Dense + activation rounds the pre-activation too)."""

    features: int
    act: str
    use_bias: bool = True
    dtype: Any = jnp.bfloat16
    tile: pallas_kernels.DenseConfig = pallas_kernels.DenseConfig()

    @nn.compact
    def __call__(self, x):
        k = x.shape[-1]
        kernel = self.param("kernel", _dense_init, (k, self.features), jnp.float32).astype(self.dtype)
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(self.dtype)
        else:
            bias = jnp.zeros((self.features,), self.dtype)
        return pallas_kernels.dense_act(x.astype(self.dtype), kernel, bias, self.act, self.tile)


class Mlp(nn.Module):
    """fc1, activation, (norm), fc2. kernels="pallas" or "pallas_mlp" in half precision (`pallas_parts`):
    fc1 and the activation as one kernel (`DenseAct`) where the tile fits the weight. Sows `fc2_in`."""

    config: ViTConfig
    dtype: Any = jnp.float32
    kernels: str = "xla"
    kernel_tiles: pallas_kernels.Tiles = pallas_kernels.Tiles()
    precision: Any = None
    gemm: str = "dtype"
    gelu: str = "erf"

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        k, tile = x.shape[-1], self.kernel_tiles.dense
        if ("mlp" in pallas_parts(self.kernels) and cfg.act in pallas_kernels.ACTIVATIONS
                and pallas_kernels.dense_act_supported(k, cfg.mlp_dim, self.dtype, tile)):
            x = DenseAct(cfg.mlp_dim, cfg.act, cfg.proj_bias, self.dtype, tile, name="fc1")(x)
        else:
            x = fp8.dense(self.gemm, self.dtype, "fc1")(cfg.mlp_dim, use_bias=cfg.proj_bias, dtype=self.dtype,
                                                        precision=self.precision, kernel_init=_dense_init, name="fc1")(x)
            x = (gelu_opt.tanh_gelu if gelu_opt.active(self.gelu, cfg.act, self.dtype) else activation(cfg.act))(x)
        if cfg.scale_mlp_norm:
            x = LayerNorm(cfg.norm_eps, self.dtype, self.kernels, self.kernel_tiles, name="norm")(x)
        _sow(self, "fc2_in", x)
        return fp8.dense(self.gemm, self.dtype, "fc2")(cfg.embed_dim, use_bias=cfg.proj_bias, dtype=self.dtype,
                                                       precision=self.precision, kernel_init=_dense_init, name="fc2")(x)


class LayerScale(nn.Module):
    init_value: float = 1e-5

    @nn.compact
    def __call__(self, x):
        gamma = self.param("gamma", nn.initializers.constant(self.init_value), (x.shape[-1],), jnp.float32)
        return x * gamma.astype(x.dtype)


class Block(nn.Module):
    """x + attn(norm1 x) = mid, mid + mlp(norm2 mid). Sows (when asked) the values of both residual
    adds and both norms: `x`, `attn_in` (norm1's output), `attn_out` (after ls1), `mid`, `mlp_in`,
    `mlp_out` (after ls2)."""

    config: ViTConfig
    dtype: Any = jnp.float32
    attention: str = "fused"
    kernels: str = "xla"
    kernel_tiles: pallas_kernels.Tiles = pallas_kernels.Tiles()
    precision: Any = None
    gemm: str = "dtype"
    gelu: str = "erf"

    @nn.compact
    def __call__(self, x, *, want_cls: bool, want_full: bool):
        cfg = self.config
        _sow(self, "x", x)
        y = LayerNorm(cfg.norm_eps, self.dtype, self.kernels, self.kernel_tiles, name="norm1")(x)
        _sow(self, "attn_in", y)
        attention = Attention(cfg, self.dtype, self.attention, self.kernels, self.kernel_tiles, self.precision,
                              self.gemm, name="attn")
        y, attn_cls, attn = attention(y, want_cls=want_cls, want_full=want_full)
        if cfg.layer_scale:
            y = LayerScale(name="ls1")(y)
        _sow(self, "attn_out", y)
        x = x + y
        _sow(self, "mid", x)
        y = LayerNorm(cfg.norm_eps, self.dtype, self.kernels, self.kernel_tiles, name="norm2")(x)
        _sow(self, "mlp_in", y)
        y = Mlp(cfg, self.dtype, self.kernels, self.kernel_tiles, self.precision, self.gemm, self.gelu, name="mlp")(y)
        if cfg.layer_scale:
            y = LayerScale(name="ls2")(y)
        _sow(self, "mlp_out", y)
        return x + y, attn_cls, attn


def cast_params(params: Params, dtype) -> Params:
    """The params with every block's Dense kernel and bias (qkv, proj, fc1, fc2: ~99% of a ViT's
    weights) stored in `dtype`, the rest (embeddings, LayerNorms, head) as they were.

    For a module whose compute dtype is `dtype` this changes no output bit: flax's `Dense` casts its
    kernel and bias to the compute dtype on every call anyway. Storing them cast saves that
    per-call conversion (at batch 1 in bf16, reading 4 and writing 2 bytes per weight is a
    sizeable part of the call) and halves their device memory. The head stays float32 because
    predmaps' lean prediction columns add its bias in float32. predmaps' LRP methods (transattr,
    lrp, partial_lrp) are the exception: they run the model in float32 from the stored weights,
    so give them the uncast params.
    """
    dtype = jnp.dtype(dtype)

    def cast(path, leaf):
        keys = [getattr(k, "key", None) for k in path]
        in_block = bool(keys) and isinstance(keys[0], str) and keys[0].startswith("blocks_")
        if in_block and len(keys) >= 2 and keys[-1] in ("kernel", "bias") and keys[-2] in ("qkv", "proj", "fc1", "fc2"):
            return leaf.astype(dtype)
        return leaf

    return jax.tree_util.tree_map_with_path(cast, params)


class ViT(nn.Module):
    """timm `VisionTransformer` (and DeiT `VisionTransformerDistilled`) at inference.

    Attributes:
      config: the architecture (`ViTConfig`).
      dtype: compute dtype, float32 or bfloat16. Parameters stay as stored; LayerNorm
        statistics, attention softmax and logits are float32 either way.
      attention: "fused" (`jax.nn.dot_product_attention`, cuDNN on GPU in half precision,
        with the class-token row computed exactly on the side: the T x T matrix is never
        built) or "materialized" (explicit softmax; the only way to get `attn`).
      kernels: "xla" (XLA's fusions) or "pallas": in half precision, every LayerNorm, fc1 with its
        activation, and predmaps' prediction-map normaliser as one Pallas kernel each
        (`jaxvit.kernels`; Triton on CUDA, the same arithmetic through XLA on other platforms);
        "pallas_layernorm" / "pallas_mlp" / "pallas_head": only that one; "pallas_layernorm_head":
        those two (`pallas_parts`).
        float32 compute is the same either way.
      kernel_tiles: the tiles of those kernels (`jaxvit.kernels.Tiles`).
      precision: `jax.lax.Precision` of every matmul (None: the backend's default, TF32 for float32
        on recent GPUs; predmaps' LRP asks for HIGHEST, since its rules divide by pre-activations).
      gelu: "erf" (exact GELU, timm's) or, opt-in, "tanh": in half precision, GELU models compute the tanh
        approximation, spelled so that XLA:GPU can fold it into fc1's cuBLASLt epilogue (`jaxvit.gelu`).
      gemm: "dtype" (every GEMM in the compute dtype) or, opt-in, "fp8" / "fp8_fast": in half precision, the
        blocks' qkv, proj, fc1 and fc2 with e4m3 inputs and weights, per-tensor scales, float32 (or
        cuBLASLt's fast) accumulation (`jaxvit.fp8`); "fp8_mlp" / "fp8_mlp_fast": fc1 and fc2 only; or a
        `jaxvit.fp8.Layout`. float32 compute is the same either way, as for `kernels`.

    `__call__(images, return_attn=False)` takes images (B, H, W, C), normalised float, at the
    config's img_size or any multiple of the patch size (`ViTConfig.patch_grid`); another
    resolution than the config's resamples the position embeddings like timm's dynamic image
    size. Returns a `ViTOutput`.
    Under `jit`, outputs the caller ignores are removed by XLA's dead-code elimination.

    With `mutable=[INTERMEDIATES]` the apply also returns the inputs of every layer (one-element
    tuples, as flax's `sow` stores them): at the top `images` (cropped to whole patches), `patches`
    (the embeddings the position embedding is added to) and `posemb` (when the model has one),
    `head_in` (tokens after the final norm) and `pooled` (the head's input; DeiT distilled:
    `logits_cls` and `logits_dist`, each head's logits); per block, see `Block`, `Attention` and `Mlp`.
    """

    config: ViTConfig
    dtype: Any = jnp.float32
    attention: str = "fused"
    kernels: str = "xla"
    kernel_tiles: pallas_kernels.Tiles = pallas_kernels.Tiles()
    precision: Any = None
    gemm: str = "dtype"
    gelu: str = "erf"

    def __post_init__(self):
        # At construction, so convert.load(..., attention="flash") fails where it is asked.
        if not isinstance(self.config, ViTConfig):
            raise TypeError(f"ViT(config=...) takes a jaxvit.ViTConfig; got {type(self.config).__name__}")
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attention implementation {self.attention!r}; choose from {ATTENTION_IMPLS}")
        fp8.check(self.gemm, pallas_parts(self.kernels))  # an unknown name fails here, with the choices
        gelu_opt.check(self.gelu, pallas_parts(self.kernels))
        if not jnp.issubdtype(jnp.dtype(self.dtype), jnp.floating):
            raise ValueError(f"ViT dtype must be a float dtype (float32, bfloat16); got {self.dtype!r}")
        super().__post_init__()

    def setup(self):
        cfg = self.config
        d = cfg.embed_dim
        self.patch_embed = PatchEmbed(d, cfg.patch_size, cfg.patch_bias, self.dtype, self.precision,
                                      name="patch_embed")
        tiny = nn.initializers.normal(1e-6)
        self.cls_token = self.param("cls_token", tiny, (1, 1, d)) if cfg.class_token else None
        self.dist_token = self.param("dist_token", _dense_init, (1, 1, d)) if cfg.distilled else None
        self.reg_token = self.param("reg_token", tiny, (1, cfg.reg_tokens, d)) if cfg.reg_tokens else None
        if cfg.pos_embed and cfg.posemb == "learn":
            length = cfg.num_patches + (0 if cfg.no_embed_class else cfg.num_prefix_tokens)
            self.pos_embed = self.param("pos_embed", _dense_init, (1, length, d))
        ln = lambda name: LayerNorm(cfg.norm_eps, self.dtype, self.kernels, self.kernel_tiles, name=name)
        self.norm_pre = ln("norm_pre") if cfg.pre_norm else None
        self.blocks = [Block(cfg, self.dtype, self.attention, self.kernels, self.kernel_tiles, self.precision,
                             fp8.block_gemm(self.gemm, i, cfg.depth), self.gelu, name=f"blocks_{i}")
                       for i in range(cfg.depth)]
        use_fc_norm = cfg.final_norm and cfg.fc_norm
        self.norm = ln("norm") if cfg.final_norm and not cfg.fc_norm else None
        self.fc_norm = ln("fc_norm") if use_fc_norm else None
        if cfg.num_classes > 0:
            # Zero head as big_vision's head_zeroinit (training starts from uniform logits); converted
            # checkpoints overwrite it. A fresh init therefore explains nothing until trained.
            dense = lambda name: nn.Dense(cfg.num_classes, dtype=self.dtype, precision=self.precision,
                                          kernel_init=nn.initializers.zeros, name=name)
            self.head = dense("head")
            self.head_dist = dense("head_dist") if cfg.distilled else None
        else:
            self.head = self.head_dist = None

    def embed(self, images):
        """Images (B, H, W, C) -> x^(0) (B, T, D) in the compute dtype."""
        cfg = self.config
        if images.ndim != 4 or images.shape[-1] != cfg.in_chans:
            raise ValueError(f"images must be (B, H, W, {cfg.in_chans}) channels-last; got shape {images.shape}")
        p = cfg.patch_size
        grid = cfg.patch_grid(*images.shape[1:3])
        images = images[:, :grid[0] * p, :grid[1] * p]
        _sow(self, "images", images)
        b = images.shape[0]
        x = self.patch_embed(images)  # (B, N, D) in the compute dtype
        prefix = [t for t in (self.cls_token, self.dist_token, self.reg_token) if t is not None]
        prefix = [jnp.broadcast_to(t, (b,) + t.shape[1:]) for t in prefix]
        if cfg.pos_embed:
            # sincos2d: computed for this input's grid (a constant), as big_vision does, not resampled
            pe = jnp.asarray(sincos2d(grid, cfg.embed_dim)) if cfg.posemb == "sincos2d" else \
                resample_abs_pos_embed(self.pos_embed, grid, cfg.grid_size,
                                       0 if cfg.no_embed_class else cfg.num_prefix_tokens)
            _sow(self, "posemb", pe)
            if cfg.no_embed_class:
                _sow(self, "patches", x)
                x = jnp.concatenate(prefix + [x + pe], axis=1)
            else:
                x = jnp.concatenate(prefix + [x], axis=1)
                _sow(self, "patches", x)
                x = x + pe
        else:
            x = jnp.concatenate(prefix + [x], axis=1)
        x = x.astype(self.dtype)
        if self.norm_pre is not None:
            x = self.norm_pre(x)
        return x

    def classify(self, tokens):
        """The head nu applied to any tokens (..., D) -> float32 logits (..., C).

        nu(t) = head(fc_norm(norm(t))) with absent norms as identity; for DeiT distilled,
        (head(norm t) + head_dist(norm t)) / 2. The final norm is re-applied per token, which
        is what makes every layer's tokens decodable (prediction maps).
        head_input='token_and_patch_mean' (DINOv2's classifiers): nu(t) = head([norm t, norm t]), what the head
        would say if the class token and every patch token were t (the paper defines nu for one-token heads only).
        """
        if self.head is None:
            raise ValueError("this model has no classifier head (num_classes=0)")
        x = tokens.astype(self.dtype)
        if self.norm is not None:
            x = self.norm(x)
        if self.fc_norm is not None:
            x = self.fc_norm(x)
        if self.config.head_input == "token_and_patch_mean":
            x = jnp.concatenate([x, x], axis=-1)
        logits = self.head(x).astype(_wide(self.dtype))
        if self.head_dist is not None:
            logits = (logits + self.head_dist(x).astype(_wide(self.dtype))) / 2
        return logits

    def pool(self, x):
        """Final tokens (B, T, D) -> the pooled (B, D) the head reads (before `norm`/`fc_norm`); with
        head_input='token_and_patch_mean', (B, 2D): the class token and the mean of the patch tokens (registers
        excluded, as transformers' Dinov2(WithRegisters)ForImageClassification)."""
        cfg = self.config
        if cfg.head_input == "token_and_patch_mean":
            return jnp.concatenate([x[:, 0], x[:, cfg.num_prefix_tokens:].mean(1)], axis=-1)
        if cfg.global_pool == "token":
            return x[:, 0]
        x = x if cfg.pool_include_prefix else x[:, cfg.num_prefix_tokens:]
        if cfg.global_pool == "avg":
            return x.mean(1)
        if cfg.global_pool == "max":
            return x.max(1)
        return 0.5 * (x.max(1) + x.mean(1))  # avgmax

    def head_logits(self, x):
        """(pre_logits (B, D), logits (B, C) float32 or None) from the last block's tokens (B, T, D).

        As timm: norm every token, pool, fc_norm, head; DeiT distilled averages the class-token
        head and the distillation-token head.
        """
        if self.norm is not None:
            x = self.norm(x)
        _sow(self, "head_in", x)
        wide = _wide(self.dtype)
        if self.config.distilled:
            pre = (x[:, 0] + x[:, 1]) / 2
            if self.head is None:
                return pre, None
            z_cls, z_dist = self.head(x[:, 0]).astype(wide), self.head_dist(x[:, 1]).astype(wide)
            _sow(self, "logits_cls", z_cls)
            _sow(self, "logits_dist", z_dist)
            return pre, (z_cls + z_dist) / 2
        x = self.pool(x)
        if self.fc_norm is not None:
            x = self.fc_norm(x)
        _sow(self, "pooled", x)
        return x, (self.head(x).astype(wide) if self.head is not None else None)

    def __call__(self, images, *, return_attn: bool = False) -> ViTOutput:
        cfg = self.config
        images = jnp.asarray(images)
        if not jnp.issubdtype(images.dtype, jnp.floating):
            # 8-bit pixels would run, and explain nothing: the weights expect normalised floats.
            raise TypeError(f"images must be normalised floats (B, H, W, C); got dtype {images.dtype}. Use "
                            "jaxvit.preprocess (load_batch, or pixels / 255 then normalize with the config's "
                            "mean and std)")
        x = self.embed(images)
        tokens, rows, mats = [x], [], []
        for block in self.blocks:
            x, attn_cls, attn = block(x, want_cls=cfg.class_token, want_full=return_attn)
            tokens.append(x)
            rows.append(attn_cls)
            mats.append(attn)
        pre_logits, logits = self.head_logits(x)
        return ViTOutput(
            logits=logits,
            pre_logits=pre_logits,
            tokens=jnp.stack(tokens, axis=1),
            attn_cls=jnp.stack(rows, axis=1) if cfg.class_token else None,
            attn=jnp.stack(mats, axis=1) if return_attn else None,
        )
