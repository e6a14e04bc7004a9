"""Prediction matrices and PredicAtt (paper Eq. 2-5), batched over images, classes, layers, heads.

Shapes: B images, K target classes, L blocks, H heads, P prefix tokens, N = gh*gw patches,
C classes, D width. Every function here is a pure function of arrays and is traced inside the
jitted `predmaps.explain` (or the caller's own jit).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxvit import ViT
from jaxvit import kernels as pallas_kernels
from jaxvit.model import pallas_parts

SCORES = ("probs", "logits")
SIMILARITIES = ("dot", "cosine")
# Class chunk of the lean softmax normaliser: bounds the (B, N, chunk) logits held at once.
_NORMALISER_CHUNK = 256


# XLA in jax < 0.11 miscompiles a vjp vmapped over several cotangents once the activations grow
# (ViT-S/16 at 224, 8 images x 4 classes: gradients 16-36% off; a ViT of 65 tokens from 16 images x
# 4 classes; exact in jax 0.11.2, and exact class by class in both). There the gradient methods
# take one class per backward pass.
BATCHED_VJP_OK = jax.__version_info__ >= (0, 11)


def varying_like(x: jax.Array, like: jax.Array) -> jax.Array:
    """`x` marked varying over the same shard_map mesh axes as `like` (`x` itself elsewhere).

    Inside a `shard_map`, an array made from constants is the same on every device; one that must
    hold per-device values (a scan carry that data enters, a perturbation whose cotangent is the
    device's own) has to be marked varying like the data, or tracing rejects or sums it."""
    aval = jax.typeof(like)
    manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.10; older releases named the set `vma`
    axes = tuple(sorted(manual.varying if manual is not None else getattr(aval, "vma", ()) or ()))
    return jax.lax.pcast(x, axes, to="varying") if axes else x


def zeros_varying_like(shape, dtype, like: jax.Array) -> jax.Array:
    """Zeros that vary over the same shard_map mesh axes as `like` (plain zeros elsewhere).

    The gradient methods differentiate with respect to zero perturbations of the attention. Inside
    a `shard_map`, constant zeros are the same on every device, so their cotangent would be summed
    over the mesh axis: every device would get the whole mesh's gradients. Marked varying like the
    images, each device keeps its own."""
    return varying_like(jnp.zeros(shape, dtype), like)


def layer_index(layer: int, depth: int) -> int:
    """Token layer 0..L (negative from the end: -1 = L, the last block's output)."""
    if isinstance(layer, (bool, np.bool_)) or not isinstance(layer, (int, np.integer)):
        raise ValueError(f"layer must be an integer (0..{depth}, or -{depth + 1}..-1 from the end); got {layer!r}")
    if not -(depth + 1) <= layer <= depth:
        raise ValueError(f"layer {layer} out of range: this model has layers 0..{depth} "
                         f"(or -{depth + 1}..-1 from the end)")
    return layer % (depth + 1)


def layer_indices(layers, depth: int) -> tuple[int, ...]:
    """`layers` as token layer indices: None for all L + 1, one layer, or a non-empty sequence."""
    if layers is None:
        return tuple(range(depth + 1))
    if isinstance(layers, (int, np.integer)) and not isinstance(layers, (bool, np.bool_)):
        layers = (layers,)
    layers = tuple(layers)
    if not layers:
        raise ValueError(f"layers is empty; give token layers (0..{depth}, negative from the end), or None for all")
    return tuple(layer_index(layer, depth) for layer in layers)


def layer_name(index: int, depth: int) -> str:
    """The paper's name of token layer `index` (0..L): "L", "L-1", ..., "L-{depth}" (the embeddings)."""
    return "L" if index == depth else f"L-{depth - index}"


def check_class_token(model: ViT, method: str) -> None:
    if not model.config.class_token:
        raise ValueError(f"method {method!r} reads class-token attention, and {model.config.name or 'this model'} has "
                         "no class token; use 'prediction_map' (it works for any ViT)")


def check_images(images, cfg) -> None:
    """Images must be a (B, H, W, C) channels-last batch (the model checks dtype and size)."""
    if images.ndim != 4 or images.shape[-1] != cfg.in_chans:
        raise ValueError(f"images must be (B, H, W, {cfg.in_chans}) channels-last, normalised; "
                         f"got shape {images.shape}")


def check_pixel_range(images, cfg) -> None:
    """Refuse concrete float images that hold 0..255 pixels, not normalised ones (uint8 the model refuses).

    One max over the batch on the host, skipped under tracing: normalised pixels lie within
    max(mean, 1 - mean) / std of 0 (2.6 for ImageNet's statistics), 0..255 ones reach far past ten times that."""
    if isinstance(images, getattr(jax.core, "Tracer", ())) or not getattr(images, "is_fully_addressable", True):
        return
    arr = images if isinstance(images, jax.Array) else np.asarray(images)
    if arr.size == 0 or not jnp.issubdtype(arr.dtype, jnp.floating):
        return
    bound = max(max(m, 1 - m) / s for m, s in zip(cfg.mean, cfg.std))
    try:
        top = float(jnp.max(jnp.abs(arr)) if isinstance(arr, jax.Array) else np.max(np.abs(arr)))
    except jax.errors.ConcretizationTypeError:  # traced after all (explain called inside the caller's jit)
        return
    if np.isfinite(top) and top > 10 * bound:
        raise ValueError(f"images reach {top:g}, and normalised pixels lie within +-{bound:.2f} for this model: they "
                         "look like 0..255 pixels. Divide by 255 and normalise with the config's mean and std "
                         "(jaxvit.preprocess.normalize, or load_batch)")


def patch_tokens(model: ViT, tokens: jax.Array) -> jax.Array:
    """(..., T, D) -> (..., N, D): drop the P prefix tokens."""
    return tokens[..., model.config.num_prefix_tokens:, :]


def cls_attention(model: ViT, attn_cls: jax.Array) -> jax.Array:
    """A_CLS: (B, L, H, T) class-token rows -> (B, L, H, N), prefix columns dropped."""
    return attn_cls[..., model.config.num_prefix_tokens:]


def token_logits(model: ViT, params, tokens: jax.Array) -> jax.Array:
    """nu(x_i) for every token: (..., D) -> (..., C) float32."""
    return model.apply({"params": params}, tokens, method=ViT.classify)


def prediction_matrix(model: ViT, params, tokens: jax.Array, scores: str = "probs") -> jax.Array:
    """Psi^(l): (B, T, D) tokens of one layer -> (B, N, C) over patch tokens (all classes)."""
    z = token_logits(model, params, patch_tokens(model, tokens))
    return jax.nn.softmax(z, axis=-1) if scores == "probs" else z


def prediction_columns(model: ViT, params, tokens: jax.Array, classes: jax.Array, scores: str = "probs") -> jax.Array:
    """Psi^(l)(c) for the requested classes only: tokens (B, T, D), classes (B, K) -> (B, K, N).

    The lean path: the head's columns of the K classes give their logits; the softmax
    normaliser logsumexp_c nu(x_i)_c is accumulated over class chunks, so the (B, N, C)
    prediction matrix is never materialised (with the model's 'head' Pallas kernel in half
    precision, `jaxvit.kernels.dense_logsumexp`, the chunks' logits never leave the kernel).
    """
    cfg = model.config
    x = _head_input(model, params, patch_tokens(model, tokens))  # (B, N, D) after norm / fc_norm
    w, b = _head_weights(params, cfg)  # (D, C), (C,)
    wk = jnp.take(w, classes, axis=1)  # (D, B, K)
    zk = jnp.einsum("bnd,dbk->bkn", x, wk.astype(x.dtype), preferred_element_type=jnp.float32)
    zk = zk + jnp.take(b, classes)[..., None]
    if scores == "logits":
        return zk
    if ("head" in pallas_parts(model.kernels)
            and pallas_kernels.dense_logsumexp_supported(x.shape[-1], x.dtype, model.kernel_tiles.head)):
        lse = pallas_kernels.dense_logsumexp(x, w, b, model.kernel_tiles.head)
    else:
        lse = _logsumexp_chunked(x, w, b)
    return jnp.exp(zk - lse[:, None, :])


def _head_input(model: ViT, params, x):
    """The head's input for tokens x: norm then fc_norm, as `ViT.classify` applies them."""
    def fn(mdl, t):
        t = t.astype(mdl.dtype)
        if mdl.norm is not None:
            t = mdl.norm(t)
        if mdl.fc_norm is not None:
            t = mdl.fc_norm(t)
        return t

    return model.apply({"params": params}, x, method=fn)


def _head_weights(params, cfg):
    """(D, C) kernel and (C,) bias of nu's final linear map (DeiT distilled: the two heads averaged,
    which equals averaging their logits since both read the same normalised token; head_input
    'token_and_patch_mean': the (2D, C) kernel's two halves summed, nu(t) = head([t, t]) as `ViT.classify`)."""
    w, b = params["head"]["kernel"], params["head"]["bias"]
    if cfg.head_input == "token_and_patch_mean":
        w = w[:cfg.embed_dim] + w[cfg.embed_dim:]
    if cfg.distilled:
        w = (w + params["head_dist"]["kernel"]) / 2
        b = (b + params["head_dist"]["bias"]) / 2
    return w.astype(jnp.float32), b.astype(jnp.float32)


def _logsumexp_chunked(x, w, b):
    """logsumexp over classes of x @ w + b, chunked over classes: (B, N, D) -> (B, N) float32."""
    c = w.shape[1]
    if c <= _NORMALISER_CHUNK:
        z = jnp.einsum("bnd,dc->bnc", x, w.astype(x.dtype), preferred_element_type=jnp.float32) + b
        return jax.nn.logsumexp(z, axis=-1)
    n_chunks = -(-c // _NORMALISER_CHUNK)
    pad = n_chunks * _NORMALISER_CHUNK - c
    wp = jnp.pad(w, ((0, 0), (0, pad))).reshape(w.shape[0], n_chunks, _NORMALISER_CHUNK).transpose(1, 0, 2)
    bp = jnp.pad(b, (0, pad), constant_values=-jnp.inf).reshape(n_chunks, _NORMALISER_CHUNK)

    def step(carry, chunk):
        wc, bc = chunk
        z = jnp.einsum("bnd,dc->bnc", x, wc.astype(x.dtype), preferred_element_type=jnp.float32) + bc
        return jnp.logaddexp(carry, jax.nn.logsumexp(z, axis=-1)), None

    # The carry takes x's per-device values: under shard_map it must start varying like x.
    init = varying_like(jnp.full(x.shape[:2], -jnp.inf, jnp.float32), x)
    return jax.lax.scan(step, init, (wp, bp))[0]


def head_similarity(a_cls: jax.Array, psi: jax.Array, similarity: str = "dot") -> jax.Array:
    """alpha_{l,h}(c) = <A_CLS^(l,h), Psi(c)>: a_cls (B, L, H, N), psi (B, K, N) -> (B, K, L, H)."""
    alpha = jnp.einsum("blhn,bkn->bklh", a_cls, psi, precision="highest")
    if similarity == "cosine":
        na = jnp.linalg.norm(a_cls, axis=-1)[:, None]  # (B, 1, L, H)
        npsi = jnp.linalg.norm(psi, axis=-1)[:, :, None, None]  # (B, K, 1, 1)
        alpha = alpha / jnp.maximum(na * npsi, 1e-12)
    elif similarity != "dot":
        raise ValueError(f"unknown similarity {similarity!r}; choose from {SIMILARITIES}")
    return alpha


def head_weights(alpha: jax.Array) -> jax.Array:
    """alpha~: one softmax over all L*H heads jointly. (B, K, L, H) -> (B, K, L, H)."""
    b, k, l, h = alpha.shape
    return jax.nn.softmax(alpha.reshape(b, k, l * h), axis=-1).reshape(b, k, l, h)


def weighted_attention(a_cls: jax.Array, alpha_tilde: jax.Array) -> jax.Array:
    """A~(c) = sum_{l,h} alpha~_{l,h}(c) A_CLS^(l,h): -> (B, K, N)."""
    return jnp.einsum("bklh,blhn->bkn", alpha_tilde, a_cls, precision="highest")


def predicatt(a_cls: jax.Array, psi: jax.Array, similarity: str = "dot"):
    """PredicAtt_i(c) = A~(c) * Psi^(i)(c). Returns (map (B,K,N), A~ (B,K,N), alpha~ (B,K,L,H))."""
    alpha_tilde = head_weights(head_similarity(a_cls, psi, similarity))
    a_tilde = weighted_attention(a_cls, alpha_tilde)
    return a_tilde * psi, a_tilde, alpha_tilde
