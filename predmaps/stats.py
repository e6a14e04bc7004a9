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
from predmaps import core, targets


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
        targets.check_class_indices(labels, num_classes, "labels (class indices)")
    labels = jnp.asarray(labels, jnp.int32)
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must have shape ({images.shape[0]},); got {labels.shape}")
    return _layer_stats(model, params, images, labels)


def top_head_histogram(top_head_block: jax.Array, depth: int) -> jax.Array:
    """Counts per block (depth,) of `LayerStats.top_head_block` (entries of -1 ignored)."""
    blocks = jnp.asarray(top_head_block)
    return jnp.bincount(jnp.where(blocks >= 0, blocks, depth), length=depth + 1)[:depth]


# A patch "on the object" has at least this share of its pixels in the object's mask; a
# "background" patch has none. Patches in between (the object's rim) are left out of both.
ON_OBJECT_SHARE = 0.25


def patch_cover(masks, patch: int) -> np.ndarray:
    """Share of each patch's pixels inside the mask: masks (B, H, W) bool -> (B, gh * gw) float32,
    patches in row-major order (the order of the patch tokens)."""
    m = np.asarray(masks, np.float32)
    b, h, w = m.shape
    gh, gw = h // patch, w // patch
    m = m[:, :gh * patch, :gw * patch].reshape(b, gh, patch, gw, patch)
    return m.mean((2, 4)).reshape(b, gh * gw)


@functools.partial(jax.jit, static_argnums=(0,))
def _patch_tops(model: ViT, params, images, labels):
    """Per layer l = 0..L and patch: nu(x_i^(l))'s top class (int32), the label's probability, and
    A.6's confidence (logit margin) and entropy (float32). Four (B, L + 1, N) arrays."""
    out = model.apply({"params": params}, images)
    tops, probs, conf, ent = [], [], [], []
    for layer in range(model.config.depth + 1):
        z = core.token_logits(model, params, core.patch_tokens(model, out.tokens[:, layer]))  # (B, N, C)
        _, margin, entropy = _summaries(z, labels[:, None])
        tops.append(jnp.argmax(z, -1).astype(jnp.int32))
        probs.append(jnp.take_along_axis(jax.nn.softmax(z, -1), labels[:, None, None], -1)[..., 0])
        conf.append(margin)
        ent.append(entropy)
    return jnp.stack(tops, 1), jnp.stack(probs, 1), jnp.stack(conf, 1), jnp.stack(ent, 1)


def patch_locality(model: ViT, params, images, labels, masks, *, batch: int = 200,
                   on_object: float = ON_OBJECT_SHARE) -> dict[str, np.ndarray]:
    """Does a patch token predict the object's class where the object is, and not elsewhere?

    images (B, H, W, 3) normalised, one object each; labels (B,); masks (B, H, W) bool, the object's
    pixels. Per layer l = 0..L (arrays of L + 1): `on_accuracy` / `background_accuracy`, the share
    of patch tokens whose top class under the head is the label, over the patches with at least
    `on_object` of their pixels on the object / with none; `on_prob` / `background_prob`, the
    label's mean softmax probability there; `on_confidence` / `background_confidence` and
    `on_entropy` / `background_entropy`, A.6's confidence (largest logit minus the second) and
    entropy (nats) there, split by location; `gap` = on_accuracy - background_accuracy (a
    pretrained ViT's last layers: large; a token that carries only the scene's label: 0). Also the
    patch counts.
    """
    labels = np.asarray(labels)
    cover = patch_cover(masks, model.config.patch_size)
    if cover.shape[1] != model.config.num_patches:
        raise ValueError(f"masks of shape {np.shape(masks)} do not tile into the model's "
                         f"{model.config.num_patches} patches")
    parts = [_patch_tops(model, params, jnp.asarray(images[i:i + batch]), jnp.asarray(labels[i:i + batch], jnp.int32))
             for i in range(0, len(labels), batch)]
    top, probs, conf, ent = (np.concatenate([np.asarray(p[k]) for p in parts]) for k in range(4))  # (B, L + 1, N)
    hits = (top == labels[:, None, None]).astype(np.float32)
    on, bg = cover >= on_object, cover == 0
    mean = lambda a, sel: (a * sel[:, None]).sum((0, 2)) / max(int(sel.sum()), 1)
    res = dict(on_accuracy=mean(hits, on), background_accuracy=mean(hits, bg),
               on_prob=mean(probs, on), background_prob=mean(probs, bg),
               on_confidence=mean(conf, on), background_confidence=mean(conf, bg),
               on_entropy=mean(ent, on), background_entropy=mean(ent, bg),
               on_patches=int(on.sum()), background_patches=int(bg.sum()))
    res["gap"] = res["on_accuracy"] - res["background_accuracy"]
    return res


def object_locality(model: ViT, params, images, labels, masks, *, batch: int = 200,
                    on_object: float = ON_OBJECT_SHARE) -> dict[str, np.ndarray]:
    """On scenes of several objects of different classes: does a patch token predict ITS object's class?

    images (B, H, W, 3) normalised; labels (B, K) int, distinct within a scene; masks (B, K, H, W)
    bool. Per layer l = 0..L: `own_accuracy`, the share of patch tokens on an object (at least
    `on_object` of their pixels) whose top class is that object's class, and `other_accuracy`, the
    share whose top class is another object's of the same scene. A token that reads its location:
    own high, other low; a token that carries the scene's labels: the two alike.
    `patch_locality`'s one-object gap cannot tell those apart."""
    labels = np.asarray(labels)
    masks = np.asarray(masks)
    if labels.ndim != 2 or masks.shape[:2] != labels.shape:
        raise ValueError(f"labels (B, K) and masks (B, K, H, W) must agree; got {labels.shape} and {masks.shape}")
    if any(len(set(row)) != len(row) for row in labels.tolist()):
        raise ValueError("object_locality needs objects of different classes within a scene")
    b, k = labels.shape
    top = np.concatenate([np.asarray(_patch_tops(model, params, jnp.asarray(images[i:i + batch]),
                                                 jnp.asarray(labels[i:i + batch, 0], jnp.int32))[0])
                          for i in range(0, b, batch)])  # (B, L + 1, N): one forward for every object
    hits = [top == labels[:, j, None, None] for j in range(k)]  # per object: is its class the top class
    own = other = 0.0
    count = 0
    for j in range(k):
        on = patch_cover(masks[:, j], model.config.patch_size) >= on_object  # (B, N)
        own = own + (hits[j] * on[:, None]).sum((0, 2))
        other = other + sum((hits[i] * on[:, None]).sum((0, 2)) for i in range(k) if i != j)
        count += int(on.sum())
    count = max(count, 1)
    return dict(own_accuracy=own / count, other_accuracy=other / count, patches=count)

