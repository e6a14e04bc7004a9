"""Attention and gradient baselines the paper compares against (Chefer et al. 2021b protocol).

Definitions: ../shared/method.md, "Baselines". All functions take the full attention
matrices or class-token rows from one jaxvit forward; gradient methods take d logit_c / dA
from one vjp for all K classes (cotangents in chunks of classes): `gradient_maps` reduces each class's
gradients to its map inside the class loop, `attention_and_grads` returns them all.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxvit import ViT
from predmaps.core import BATCHED_VJP_OK, zeros_varying_like
from predmaps.targets import Targets

# Classes in chunks: K x B x L x H x T x T gradients of all 1000 classes would not fit; and in
# jax < 0.11 a vjp vmapped over classes miscompiles (core.BATCHED_VJP_OK): one class per pass there.
_CLASS_CHUNK = 32  # classes per backward pass of gradient methods, at most
_CHUNK_GRAD_BYTES = 1 << 31  # and at most this many bytes of one chunk's attention gradients


def _class_chunk(attn: jax.Array, num_blocks: int) -> int:
    """Classes per backward pass: 32, fewer where their gradients (num_blocks x attn's B x H x T x T
    each) would pass 2 GiB, e.g. ViT-B/16 at batch 64 with every block: 1."""
    if not BATCHED_VJP_OK:
        return 1
    b, _, h, t, _ = attn.shape
    per_class = b * num_blocks * h * t * t * jnp.dtype(attn.dtype).itemsize
    return max(1, min(_CLASS_CHUNK, _CHUNK_GRAD_BYTES // per_class))


def raw_attention(model: ViT, attn_cls: jax.Array) -> jax.Array:
    """Last block, mean over heads, class-token row, patch columns: (B, L, H, T) -> (B, N)."""
    return attn_cls[:, -1, :, model.config.num_prefix_tokens:].mean(axis=1)


def mean_attention(model: ViT, attn_cls: jax.Array) -> jax.Array:
    """Ablation (i): mean of A_CLS over all L*H heads: -> (B, N)."""
    return attn_cls[..., model.config.num_prefix_tokens:].mean(axis=(1, 2))


def rollout(model: ViT, attn: jax.Array, start_layer: int = 1) -> jax.Array:
    """Abnar & Zuidema rollout as in Chefer's code: per block mean over heads, + I, rows
    normalised, multiplied from `start_layer` on (later blocks on the left); class-token row.

    attn (B, L, H, T, T) -> (B, N).
    """
    a = attn.mean(axis=2)  # (B, L, T, T)
    t = a.shape[-1]
    a = a + jnp.eye(t, dtype=a.dtype)
    a = a / a.sum(axis=-1, keepdims=True)
    joint = a[:, start_layer]
    for layer in range(start_layer + 1, a.shape[1]):
        joint = jnp.einsum("bij,bjk->bik", a[:, layer], joint, precision="highest")
    return joint[:, 0, model.config.num_prefix_tokens:]


def _attention_vjp(model: ViT, params, images: jax.Array, targets: Targets, blocks: Sequence[int] | None):
    """One forward with materialised attention -> (logits, classes, attn, grads_for, chunk), where
    grads_for(c) with c (B,) one class per image gives d logit_c / dA of `blocks` (default all):
    (B, len(blocks), H, T, T), and chunk is how many classes one backward pass takes (`_class_chunk`)."""
    depth = model.config.depth
    blocks = tuple(range(depth)) if blocks is None else tuple(b % depth for b in blocks)
    mat = model.clone(attention="materialized")
    init = jax.eval_shape(lambda: mat.apply({"params": params}, images, return_attn=True, mutable=["perturbations"]))
    zeros = jax.tree_util.tree_map(lambda s: zeros_varying_like(s.shape, s.dtype, images), init[1]["perturbations"])

    def f(perturbations):
        out = mat.apply({"params": params, "perturbations": perturbations}, images, return_attn=True)
        return out.logits, out.attn

    (logits, attn), vjp_fn = jax.vjp(f, zeros)
    classes = targets.resolve(logits)

    def grads_for(c):
        (g,) = vjp_fn((jax.nn.one_hot(c, logits.shape[-1], dtype=logits.dtype), jnp.zeros_like(attn)))
        return jnp.stack([g[f"blocks_{i}"]["attn"]["attn"] for i in blocks], axis=1)

    return logits, classes, attn, grads_for, _class_chunk(attn, len(blocks))


def attention_and_grads(model: ViT, params, images: jax.Array, targets: Targets,
                        blocks: Sequence[int] | None = None):
    """One forward with materialised attention, and d logit_c / dA for each target class.

    `blocks`: the blocks whose attention gradients are wanted (default all, in order). Ask only
    for what is used: the per-class backward runs inside a loop, where XLA cannot prune the
    gradients of unused blocks, and the last block alone needs a backward through one block, not L.
    Holds every class's gradients at once; `gradient_maps` keeps only one chunk's.

    Returns logits (B, C), classes (B, K), attn (B, L, H, T, T), grads (B, K, len(blocks), H, T, T).
    """
    logits, classes, attn, grads_for, chunk = _attention_vjp(model, params, images, targets, blocks)
    grads = jax.lax.map(grads_for, classes.T, batch_size=chunk)  # (K, B, L', H, T, T)
    return logits, classes, attn, jnp.moveaxis(grads, 0, 1)


def gradient_maps(model: ViT, params, images: jax.Array, targets: Targets, map_fn,
                  blocks: Sequence[int] | None = None):
    """A gradient method's maps, each class's attention gradients reduced to its map inside the class
    loop, so at most one chunk of classes' gradients (up to 32 x B x L' x H x T x T, 2 GiB) exists at a time.

    map_fn(attn (B, L, H, T, T), grads (B, 1, L', H, T, T)) -> (B, 1, N), as `gradcam` and
    `generic_attention` take them. Returns logits (B, C), classes (B, K), maps (B, K, N).
    """
    logits, classes, attn, grads_for, chunk = _attention_vjp(model, params, images, targets, blocks)
    maps = jax.lax.map(lambda c: map_fn(attn, grads_for(c)[:, None])[:, 0], classes.T, batch_size=chunk)
    return logits, classes, jnp.moveaxis(maps, 0, 1)


def gradcam(model: ViT, attn: jax.Array, grads: jax.Array) -> jax.Array:
    """GradCAM for ViT (Chefer's baseline): last block; per head weight = mean over patch
    entries of the class-token row of the gradient; map = mean_h(A_CLS * weight), clamped at 0.

    attn (B, L, H, T, T), grads (B, K, L', H, T, T) whose last entry on L' is the last block's
    (all blocks, or only the last one) -> (B, K, N).
    """
    p = model.config.num_prefix_tokens
    a_cls = attn[:, -1, :, 0, p:]  # (B, H, N)
    g_cls = grads[:, :, -1, :, 0, p:]  # (B, K, H, N)
    weight = g_cls.mean(axis=-1, keepdims=True)  # (B, K, H, 1)
    return jnp.maximum((a_cls[:, None] * weight).mean(axis=2), 0.0)


def generic_attention(model: ViT, attn: jax.Array, grads: jax.Array) -> jax.Array:
    """Chefer 2021a self-attention rule: R = I; per block R += mean_h(clamp(grad * A, 0)) @ R;
    map = R[cls, patches]. attn (B, L, H, T, T), grads (B, K, L, H, T, T) -> (B, K, N).

    Only R's class-token row is read, and R = (I + C_L) ... (I + C_1), so that row is rolled out as
    a vector from the left, r <- r + r C_l for l = L..1: T^2 per block instead of T^3 (Chefer's
    matrix product, the same sum in another order)."""
    cams = jnp.maximum(grads * attn[:, None], 0.0).mean(axis=3)  # (B, K, L, T, T)
    b, k, l, t, _ = cams.shape
    r = jnp.broadcast_to(jax.nn.one_hot(0, t, dtype=cams.dtype), (b, k, t))
    for layer in reversed(range(l)):
        r = r + jnp.einsum("bki,bkij->bkj", r, cams[:, :, layer], precision="highest")
    return r[:, :, model.config.num_prefix_tokens:]
