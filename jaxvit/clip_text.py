"""CLIP's text tower in Flax: what open_clip's `encode_text` and transformers' `get_text_features` compute.

token embedding + position embedding -> L pre-LN transformer blocks (causal for CLIP, bidirectional
for SigLIP) -> final LayerNorm -> one token pooled -> projection into the joint embedding space.

Pooling, per checkpoint family:
  "argmax": the position of the largest token id (OpenAI CLIP, open_clip: the end-of-text token has
            the largest id of the vocabulary); transformers' CLIP does this too when its
            `eos_token_id` is the legacy 2.
  "eos":    the first position holding `eos_token_id` (transformers' CLIP with a real eos_token_id).
  "last":   the last position (SigLIP: the tokenizer pads every prompt to the context length).

Parameter names follow open_clip's (`resblocks_3/attn/in_proj/kernel` <-> `transformer.resblocks.3.attn.
in_proj_weight`); `convert.clip_text` maps both open_clip and transformers checkpoints onto them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from jaxvit.model import LayerNorm, activation, fields_repr

POOLS = ("argmax", "eos", "last")
ACTS = ("quick_gelu", "gelu", "gelu_tanh")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The shape and numerics of a CLIP (or SigLIP) text tower.

    embed_dim: size of the joint embedding (the projection's output); 0: no projection (transformers'
    CLIPTextModel), the pooled feature is the output. eos_token_id: read only by pool="eos".
    """

    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_dim: int = 2048
    embed_dim: int = 512
    act: str = "quick_gelu"
    eps: float = 1e-5
    causal: bool = True
    pool: str = "argmax"
    eos_token_id: int = 49407
    proj_bias: bool = False
    name: str = ""

    def __post_init__(self):
        for field in ("vocab_size", "context_length", "width", "heads", "layers", "mlp_dim"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"CLIPTextConfig.{field} must be a positive integer; got {value!r}")
        if not isinstance(self.embed_dim, int) or self.embed_dim < 0:
            raise ValueError(f"CLIPTextConfig.embed_dim must be an integer >= 0; got {self.embed_dim!r}")
        if self.width % self.heads:
            raise ValueError(f"CLIPTextConfig: width {self.width} is not a multiple of heads {self.heads}")
        if self.act not in ACTS:
            raise ValueError(f"CLIPTextConfig.act {self.act!r} is not supported; choose from {ACTS}")
        if self.pool not in POOLS:
            raise ValueError(f"CLIPTextConfig.pool {self.pool!r} is not supported; choose from {POOLS}")
        if not (isinstance(self.eps, float) and 0 < self.eps < 1):
            raise ValueError(f"CLIPTextConfig.eps must be a float in (0, 1); got {self.eps!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPTextConfig":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"CLIPTextConfig has no field(s) {sorted(unknown)}")
        return cls(**d)


@struct.dataclass
class CLIPTextOutput:
    """What `CLIPText.__call__` returns; batch axis first.

    Attributes:
      features: (B, E) the text embedding (open_clip `encode_text`, transformers `get_text_features`;
        not normalised); (B, D) the pooled feature when the tower has no projection.
      pooled: (B, D) the pooled token after the final LayerNorm, before the projection.
      tokens: (B, T, D) every token after the final LayerNorm (transformers' last_hidden_state).
    """

    features: jax.Array
    pooled: jax.Array
    tokens: jax.Array

    def __repr__(self) -> str:
        return fields_repr(self)


def pool_index(ids, pool: str, eos_token_id: int):
    """(B,) the position each prompt is pooled at (see the module docstring)."""
    if pool == "argmax":
        return jnp.argmax(ids, axis=-1)  # first maximum, as torch.argmax
    if pool == "eos":
        return jnp.argmax(ids == eos_token_id, axis=-1)  # first match; 0 when none, as transformers
    return jnp.full(ids.shape[:1], ids.shape[1] - 1)


class _Block(nn.Module):
    cfg: CLIPTextConfig
    dtype: Any

    @nn.compact
    def __call__(self, x, mask):
        cfg = self.cfg
        b, t, d = x.shape
        dh = d // cfg.heads
        h = LayerNorm(cfg.eps, self.dtype, name="ln_1")(x)
        qkv = nn.Dense(3 * d, dtype=self.dtype, param_dtype=jnp.float32, name="in_proj")(h)
        q, k, v = (a.reshape(b, t, cfg.heads, dh).swapaxes(1, 2) for a in jnp.split(qkv, 3, axis=-1))
        logits = jnp.einsum("bhqd,bhkd->bhqk", q * dh ** -0.5, k, preferred_element_type=jnp.float32)
        if mask is not None:
            logits = jnp.where(mask, logits, -jnp.inf)
        attn = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        o = jnp.einsum("bhqk,bhkd->bhqd", attn, v).swapaxes(1, 2).reshape(b, t, d)
        x = x + nn.Dense(d, dtype=self.dtype, param_dtype=jnp.float32, name="out_proj")(o)
        h = LayerNorm(cfg.eps, self.dtype, name="ln_2")(x)
        h = nn.Dense(cfg.mlp_dim, dtype=self.dtype, param_dtype=jnp.float32, name="c_fc")(h)
        h = nn.Dense(d, dtype=self.dtype, param_dtype=jnp.float32, name="c_proj")(activation(cfg.act)(h))
        return x + h


class CLIPText(nn.Module):
    """CLIP's text tower: `model.apply({"params": params}, ids)` with ids (B, T) int, T <= context_length
    (a shorter T uses the first T position embeddings, as open_clip and transformers do)."""

    config: CLIPTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, ids) -> CLIPTextOutput:
        cfg = self.config
        ids = jnp.asarray(ids)
        if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"token ids must be a (B, T) integer array; got {ids.dtype} of shape {ids.shape}")
        t = ids.shape[1]
        if t > cfg.context_length:
            raise ValueError(f"{t} tokens per prompt exceed the tower's context length {cfg.context_length}: "
                             "tokenise with its tokenizer, which truncates")
        table = self.param("token_embedding", nn.initializers.normal(0.02), (cfg.vocab_size, cfg.width), jnp.float32)
        pos = self.param("positional_embedding", nn.initializers.normal(0.01), (cfg.context_length, cfg.width),
                         jnp.float32)
        x = (jnp.take(table, ids, axis=0) + pos[:t]).astype(self.dtype)
        mask = jnp.tril(jnp.ones((t, t), bool)) if cfg.causal else None
        for i in range(cfg.layers):
            x = _Block(cfg, self.dtype, name=f"resblocks_{i}")(x, mask)
        tokens = LayerNorm(cfg.eps, self.dtype, name="ln_final")(x)
        pooled = tokens[jnp.arange(ids.shape[0]), pool_index(ids, cfg.pool, cfg.eos_token_id)]
        features = pooled
        if cfg.embed_dim:
            features = nn.Dense(cfg.embed_dim, use_bias=cfg.proj_bias, dtype=self.dtype, param_dtype=jnp.float32,
                                name="text_projection")(pooled)
        return CLIPTextOutput(features=features.astype(jnp.float32), pooled=pooled, tokens=tokens)


class TextTower(NamedTuple):
    """A text tower with its params and tokenizer: `tower.encode(["a dog", "a cat"])` -> (2, E) float32."""

    model: CLIPText
    params: Any
    tokenizer: Any  # jaxvit.clip_tokenizer.CLIPTokenizer

    def encode(self, prompts) -> jax.Array:
        if self.tokenizer is None:
            raise ValueError("this text tower was loaded without a tokenizer (tokenizer=False): pass token ids to "
                             "tower.model.apply, or load it with its tokenizer")
        return _encode(self.model, self.params, jnp.asarray(self.tokenizer(prompts)))


@functools.partial(jax.jit, static_argnums=0)
def _encode(model, params, ids):
    return model.apply({"params": params}, ids).features
