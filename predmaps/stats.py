"""Per-layer statistics of the paper's appendix A.6: what each layer's tokens predict.

For each layer l = 0..L, separately for the class token and the patch tokens (mean over
patches): top-1 accuracy against the label, confidence = largest logit minus the second
largest, and the entropy of the softmax. Plus, for the predicted class's final-layer
prediction map, the block that holds the head with the largest alpha.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxvit import ViT
from predmaps import core


@struct.dataclass
class LayerStats:
    """Per image and layer; average over the batch axis for the paper's curves.

    Attributes (all (B, L + 1) float32 unless noted; index 0 is x^(0), index l block l's output):
      cls_accuracy, cls_confidence, cls_entropy: of nu(class token). NaN for models without one.
      patch_accuracy, patch_confidence, patch_entropy: mean over the N patch tokens.
      top_head_block: (B,) int32, 0-based block of the head whose attention is most similar
        (largest alpha) to the predicted class's final-layer prediction map; -1 without a class token.
    """

    cls_accuracy: jax.Array
    cls_confidence: jax.Array
    cls_entropy: jax.Array
    patch_accuracy: jax.Array
    patch_confidence: jax.Array
    patch_entropy: jax.Array
    top_head_block: jax.Array


def _summaries(z, labels):
    """z (..., C) logits, labels broadcastable to z[..., 0] -> accuracy, confidence, entropy (...)."""
    top2 = jax.lax.top_k(z, 2)[0]
    logp = jax.nn.log_softmax(z, axis=-1)
    entropy = -(jnp.exp(logp) * logp).sum(-1)
    acc = (jnp.argmax(z, -1) == labels).astype(jnp.float32)
    return acc, top2[..., 0] - top2[..., 1], entropy


@functools.partial(jax.jit, static_argnums=(0,))
def _layer_stats(model: ViT, params, images, labels) -> LayerStats:
    out = model.apply({"params": params}, images)
    b = images.shape[0]
    cls_rows, patch_rows = [], []
    for layer in range(model.config.depth + 1):
        tokens = out.tokens[:, layer]
        z = core.token_logits(model, params, core.patch_tokens(model, tokens))  # (B, N, C): one layer at a time
        acc, conf, ent = _summaries(z, labels[:, None])
        patch_rows.append((acc.mean(1), conf.mean(1), ent.mean(1)))
        if model.config.class_token:
            cls_rows.append(_summaries(core.token_logits(model, params, tokens[:, 0]), labels))
    stack = lambda rows, i: jnp.stack([r[i] for r in rows], axis=1)
    nan = jnp.full((b, model.config.depth + 1), jnp.nan)
    if model.config.class_token:
        pred = jnp.argmax(out.logits, -1)[:, None].astype(jnp.int32)
        psi = core.prediction_columns(model, params, out.tokens[:, -1], pred)
        alpha = core.head_similarity(core.cls_attention(model, out.attn_cls), psi)[:, 0]  # (B, L, H)
        top_block = (jnp.argmax(alpha.reshape(b, -1), -1) // model.config.num_heads).astype(jnp.int32)
    else:
        top_block = jnp.full((b,), -1, jnp.int32)
    return LayerStats(
        cls_accuracy=stack(cls_rows, 0) if cls_rows else nan,
        cls_confidence=stack(cls_rows, 1) if cls_rows else nan,
        cls_entropy=stack(cls_rows, 2) if cls_rows else nan,
        patch_accuracy=stack(patch_rows, 0), patch_confidence=stack(patch_rows, 1),
        patch_entropy=stack(patch_rows, 2), top_head_block=top_block)


def layer_statistics(model: ViT, params, images, labels) -> LayerStats:
    """Statistics for images (B, H, W, 3) with ground-truth labels (B,) int."""
    images = jnp.asarray(images)
    core.check_images(images, model.config)
    num_classes = model.config.num_classes
    if num_classes <= 0:
        raise ValueError("per-layer statistics need a classifier head (num_classes > 0)")
    if not isinstance(labels, jax.core.Tracer):  # concrete: checked, as a shifted label set scores 0 silently
        host = np.asarray(labels)
        if host.dtype.kind not in "iu":
            raise ValueError(f"labels must be integer class indices; got dtype {host.dtype}")
        bad = sorted({int(v) for v in host.ravel() if not 0 <= v < num_classes})
        if bad:
            raise ValueError(f"labels out of range: {bad[:5]}; the model has {num_classes} classes "
                             f"(0..{num_classes - 1})")
    labels = jnp.asarray(labels, jnp.int32)
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must have shape ({images.shape[0]},); got {labels.shape}")
    return _layer_stats(model, params, images, labels)


def top_head_histogram(top_head_block: jax.Array, depth: int) -> jax.Array:
    """Counts per block (depth,) of `LayerStats.top_head_block` (entries of -1 ignored)."""
    blocks = jnp.asarray(top_head_block)
    return jnp.bincount(jnp.where(blocks >= 0, blocks, depth), length=depth + 1)[:depth]
