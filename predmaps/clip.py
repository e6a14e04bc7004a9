"""Text-to-patch maps of a CLIP image tower, the paper's appendix A.5.

A timm CLIP image tower (`vit_*_clip_*.openai`, `.laion2b`, ...) keeps CLIP's image projection
in its `head` (num_classes = the joint embedding size), so nu(x_i) = head(norm(x_i)) embeds every
patch token of every layer in the text space. Its cosine similarity with a text embedding is the
CLIP form of a prediction map. The paper finds the relevant regions show the LOWEST similarity
and displays the map inverted: `maps` is that inverted map (high = relevant, as every other
predmaps map), `similarity` the cosine itself.

The text embeddings come from the caller (CLIP's text tower, e.g. open_clip's
`model.encode_text`); this module needs only the image side.

    model, params = convert.load("vit_base_patch16_clip_224.openai")
    sim = predmaps.text_similarity_maps(model, params, images, text_emb)   # text_emb (K, 512)
    predmaps.upsample(sim.maps[:, -1], (224, 224), normalize=True)       # last layer, (B, K, H, W)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import struct

from jaxvit import Params, ViT
from predmaps import core


@struct.dataclass
class TextSimilarityMaps:
    """Per-layer text-to-patch maps; batch axis first.

    Attributes:
      similarity: (B, n_layers, K, gh, gw) float32, cosine between text embedding k and the image
        embedding nu(x_i^(l)) of each patch token.
      maps: (B, n_layers, K, gh, gw) float32, -similarity: the inverted map the paper shows.
      layers: the token layers (0..L) of axis 1 (static).
    """

    similarity: jax.Array
    maps: jax.Array
    layers: tuple[int, ...] = struct.field(pytree_node=False, default=())


def text_similarity_maps(model: ViT, params: Params, images, text_embeddings, *,
                         layers: int | Sequence[int] | None = None) -> TextSimilarityMaps:
    """Cosine similarity of each text embedding with every patch token's image embedding, per layer.

    Args:
      model, params: a CLIP image tower whose head is the image projection (num_classes = E).
      images: (B, H, W, C) normalised with the tower's mean and std (`jaxvit.preprocess`).
      text_embeddings: (K, E) for every image, or (B, K, E) per image; any scale (normalised here).
      layers: a token layer or layers (0..L, negative from the end); None: all L + 1.
    """
    cfg = model.config
    layers = core.layer_indices(layers, cfg.depth)
    images = jnp.asarray(images)
    core.check_images(images, cfg)
    text = jnp.asarray(text_embeddings)
    if not jnp.issubdtype(text.dtype, jnp.floating):
        raise TypeError(f"text_embeddings must be floats; got dtype {text.dtype}")
    if text.ndim not in (2, 3) or (text.ndim == 3 and text.shape[0] != images.shape[0]):
        raise ValueError(f"text_embeddings must be (K, E) or (B, K, E) with B={images.shape[0]}; "
                         f"got shape {text.shape}")
    if cfg.num_classes == 0 or text.shape[-1] != cfg.num_classes:
        raise ValueError(
            f"text embeddings of size {text.shape[-1]} do not match the image embedding of {cfg.name or 'this model'} "
            f"(its head outputs {cfg.num_classes}): use a CLIP image tower whose head is CLIP's image projection "
            "(timm's vit_*_clip_* with its pretrained tag, e.g. vit_base_patch16_clip_224.openai, 512) and the text "
            "embeddings of the same CLIP model")
    return _text_similarity_jit(model, layers, params, images, text)


def _unit(x):
    # torch.nn.functional.normalize's eps: a zero vector gives zero similarity, not NaN.
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _text_similarity_jit(model, layers, params, images, text):
    cfg = model.config
    out = model.apply({"params": params}, images)
    gh, gw = cfg.patch_grid(*images.shape[1:3])
    text = _unit(text.astype(jnp.float32))
    if text.ndim == 2:
        text = jnp.broadcast_to(text, (images.shape[0],) + text.shape)
    sims = []
    for layer in layers:  # one layer's (B, N, E) embeddings at a time: never B x L x N x E
        emb = _unit(core.token_logits(model, params, core.patch_tokens(model, out.tokens[:, layer])))
        sims.append(jnp.einsum("bke,bne->bkn", text, emb, precision=jax.lax.Precision.HIGHEST))
    sim = jnp.stack(sims, axis=1).reshape(images.shape[0], len(layers), text.shape[1], gh, gw)
    return TextSimilarityMaps(similarity=sim, maps=-sim, layers=layers)
