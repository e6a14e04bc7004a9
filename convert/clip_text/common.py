"""What the open_clip and transformers CLIP text readers share: the keys neither reads, and the taken tensors as
`jaxvit.clip_text.CLIPText` params, strictly (every text key consumed, every parameter the config's shape)."""

from __future__ import annotations

import jax.numpy as jnp

from convert.errors import CheckpointMismatchError, key_mismatch
from jaxvit.clip_text import CLIPText, CLIPTextConfig

# Scalars and buffers that are no part of the text tower's computation.
IGNORED = {"attn_mask", "logit_scale", "logit_bias", "text_model.embeddings.position_ids", "embeddings.position_ids",
           "text.attn_mask"}
VISION_PREFIXES = ("visual.", "vision_model.", "visual_projection.")


def transposed(w):
    return None if w is None else w.T


def layer_norm(take, key):
    return {"scale": take(key + ".weight"), "bias": take(key + ".bias")}


def linear(take, key, bias: bool = True):
    out = {"kernel": transposed(take(key + ".weight"))}
    if bias:
        out["bias"] = take(key + ".bias")
    return out


def check_consumed(sd, taken, missing) -> None:
    """Strict: every text key consumed, every parameter found; image-tower keys are left for the image reader."""
    unexpected = [k for k in sd if k not in taken and k not in IGNORED and not k.startswith(VISION_PREFIXES)]
    if missing or unexpected:
        raise key_mismatch("the CLIP text tower does not match the checkpoint", missing=missing, unexpected=unexpected)


def check_shapes(params, cfg: CLIPTextConfig) -> dict:
    """The params as float32 jax arrays, each the shape the config's module declares (else named)."""
    import jax

    expected = jax.eval_shape(lambda: CLIPText(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
    flat_e = {"/".join(str(p.key) for p in path): v.shape
              for path, v in jax.tree_util.tree_flatten_with_path(expected)[0]}
    flat_p = {"/".join(str(p.key) for p in path): v for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    wrong = [f"{k}: {tuple(flat_p[k].shape)} vs {tuple(s)}" for k, s in flat_e.items()
             if k in flat_p and tuple(flat_p[k].shape) != tuple(s)]
    if wrong or set(flat_e) != set(flat_p):
        raise CheckpointMismatchError("CLIP text tower tensors of the wrong shape (checkpoint vs config): "
                                      + "; ".join(wrong[:5] + sorted(set(flat_e) ^ set(flat_p))[:5]))
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params)
