"""Text-to-patch maps of a CLIP image tower, the paper's appendix A.5.

A timm CLIP image tower (`vit_*_clip_*.openai`, `.laion2b`, ...) keeps CLIP's image projection
in its `head` (num_classes = the joint embedding size), so nu(x_i) = head(norm(x_i)) embeds every
patch token of every layer in the text space. Its cosine similarity with a text embedding is the
CLIP form of a prediction map. The paper finds the relevant regions show the LOWEST similarity
and displays the map inverted: `maps` is that inverted map (high = relevant, as every other
predmaps map), `similarity` the cosine itself.

The text side is either embeddings from the caller (any CLIP text tower, e.g. open_clip's
`model.encode_text`) or prompts, tokenised and encoded by the JAX text tower (`jaxvit.clip_text`):

    clip = convert.load_clip("openai/clip-vit-base-patch16")            # both towers and the tokenizer
    sim = predmaps.text_similarity_maps(clip.image_model, clip.image_params, images, ["a dog", "a cat"],
                                        text_tower=clip.text_tower)
    sim = predmaps.text_similarity_maps(model, params, images, text_emb)   # or text_emb (K, 512)
    predmaps.upsample(sim.maps[:, -2], (224, 224), normalize=True)       # penultimate layer, (B, K, H, W)

`clip_report` writes the paper's Fig. 18 maps (one overlay per prompt, penultimate layer) and every
layer's maps for a list of photos: the body of `predmaps explain --text`.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxvit import Params, ViT
from jaxvit.clip_text import TextTower
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
                         layers: int | Sequence[int] | None = None,
                         text_tower: TextTower | None = None) -> TextSimilarityMaps:
    """Cosine similarity of each text embedding with every patch token's image embedding, per layer.

    Args:
      model, params: a CLIP image tower whose head is the image projection (num_classes = E).
      images: (B, H, W, C) normalised with the tower's mean and std (`jaxvit.preprocess`).
      text_embeddings: (K, E) for every image, or (B, K, E) per image; any scale (normalised here).
        Or K prompts (a string or a list of strings), encoded by `text_tower`.
      layers: a token layer or layers (0..L, negative from the end); None: all L + 1.
      text_tower: the CLIP text tower of the same model (`convert.load_clip(...).text_tower`), for prompts.
    """
    if isinstance(text_embeddings, str) or (isinstance(text_embeddings, Sequence) and text_embeddings
                                            and all(isinstance(t, str) for t in text_embeddings)):
        if text_tower is None:
            raise ValueError("prompts need the CLIP text tower that encodes them: pass text_tower= "
                             "(convert.load_clip(checkpoint).text_tower), or pass text embeddings")
        text_embeddings = text_tower.encode(text_embeddings)
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


def clip_report(model: ViT, params: Params, text_tower: TextTower, images: Sequence, prompts: Sequence[str],
                out_dir: str | os.PathLike, *, layer: int = -2, cmap: str = "jet", alpha: float = 0.5) -> dict:
    """The paper's A.5 maps for photos and prompts, written into `out_dir` (the body of
    `predmaps explain photo.jpg --model <clip checkpoint> --text "a dog" --text "a cat"`).

    Per photo: `<stem>_<k>_<prompt>.png`, the inverted similarity map of prompt k at `layer` (the
    penultimate token layer by default, as the paper's Fig. 18) over the part of the photo the model
    saw (`alpha`: the map's opacity); `<stem>_layers.png`, every layer's map (rows: prompts, columns:
    layers 0..L). `clip.json` lists the prompts, the layer, the files and, per photo and prompt, each layer's cosine range and
    the shown layer's cosine grid; unreadable photos are listed under "skipped" with the reason (the CLI
    prints them and exits 1 under --strict, as `predmaps explain`). Returns what clip.json holds; ValueError
    when no photo is readable.
    """
    from jaxvit import preprocess, safe_write
    from predmaps import viz

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError("clip_report needs one or more non-empty prompts (--text)")
    viz.check_cmap(cmap)
    cfg = model.config
    shown = core.layer_index(layer, cfg.depth)
    out = safe_write.make_dir(out_dir)
    text = text_tower.encode(prompts)
    transform = preprocess.eval_transform_for(cfg)
    records, skipped, stems = [], [], set()
    for path in images:
        try:
            photo = preprocess.load_image(path)
            x = transform(photo)[None]
        except preprocess.ImageLoadError as e:  # as `predmaps explain`: recorded and skipped, the rest go on
            skipped.append({"image": str(path), "error": str(e)})
            continue
        sim = text_similarity_maps(model, params, x, text)
        maps = np.asarray(sim.maps[0])  # (L + 1, K, gh, gw)
        stem = _slug(Path(str(path)).stem) or "image"
        if stem in stems:  # two photos of one name (other folders): never one overwriting the other
            stem = f"{stem}-{len(records)}"
        stems.add(stem)
        files = []
        for k, prompt in enumerate(prompts):
            name = f"{stem}_{k}_{_slug(prompt)[:40]}.png"
            png = viz.to_png_bytes(viz.show(photo, maps[shown, k], cfg, cmap=cmap, alpha=alpha))
            safe_write.write_bytes(out / name, png, durable=False)
            files.append(name)
        tiles = [maps[layer_, k] for k in range(len(prompts)) for layer_ in range(cfg.depth + 1)]
        titles = [f"{'*' if layer_ == shown else ''}L{layer_} {p[:12]}" for p in prompts for layer_ in range(cfg.depth + 1)]
        seen = viz.show(photo, np.zeros_like(maps[0, 0]), cfg, alpha=0.0)  # the crop the model saw, no overlay
        grid = viz.overlay_grid(seen, tiles, titles, columns=cfg.depth + 1, cell=96, cmap=cmap,
                                extent=cfg.grid_extent())
        layers_name = f"{stem}_layers.png"
        safe_write.write_bytes(out / layers_name, viz.to_png_bytes(grid), durable=False)
        cos = np.asarray(sim.similarity[0])
        records.append({
            "image": str(path), "maps": files, "layers_grid": layers_name,
            "prompts": [{"prompt": p,
                         "cosine_range_per_layer": [[float(cos[i, k].min()), float(cos[i, k].max())]
                                                    for i in range(cfg.depth + 1)],
                         "cosine": np.round(cos[shown, k], 6).tolist()} for k, p in enumerate(prompts)]})
    report = {"model": cfg.name, "prompts": prompts, "layer": shown, "layers": cfg.depth + 1,
              "map": "inverted cosine similarity (high = relevant), as the paper shows it", "images": records,
              "skipped": skipped}
    if not records:
        raise ValueError("no readable image: " + "; ".join(r["error"] for r in skipped[:3]))
    safe_write.write_text(out / "clip.json", json.dumps(report, indent=1))
    return report


def _slug(text: str) -> str:
    """A file-name-safe form of a prompt or stem: letters, digits, '-' and '_'."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-")
