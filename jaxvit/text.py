"""A Flax text encoder that computes what Hugging Face `transformers` computes for
`BertForSequenceClassification`, `RobertaForSequenceClassification` and
`DistilBertForSequenceClassification` (the paper's appendix A.4), returning what an explanation needs.

    from convert.hf_text import load_text
    model, params, tokenizer = load_text("path/to/checkpoint")     # a folder or a hub repo id
    batch = tokenizer(["a fine film", "dull"])
    out = model.apply({"params": params}, batch.input_ids, batch.attention_mask, batch.token_type_ids)
    out.logits, out.tokens, out.attn_cls    # (B, C), (B, L + 1, T, D), (B, L, H, T)

The three families share one post-LayerNorm encoder; they differ in the embeddings (BERT: word +
position + token type; RoBERTa: positions counted from padding_idx + 1 over non-padding tokens;
DistilBERT: no token types), the LayerNorm eps, and the classification head `nu` (`classify`).
Parameter names are family-neutral ('layers_0/query', 'head_out'); convert/hf_text.py maps each family's
tensors onto them (a transpose per Linear, nothing else). Numerics: padding keys get finfo.min added
before the softmax, as transformers' eager attention does, so they get exactly zero attention.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxvit.config import ConfigError
from jaxvit.model import LayerNorm, ViTOutput, _gelu_erf

# The architectures a config.json may name -> the family this module computes.
ARCHITECTURES = {
    "BertForSequenceClassification": "bert",
    "RobertaForSequenceClassification": "roberta",
    "DistilBertForSequenceClassification": "distilbert",
}
# transformers' ACT2FN names this encoder implements (exact erf GELU vs the tanh approximations).
ACTIVATIONS = {
    "gelu": _gelu_erf,
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}
# What each family's config.json leaves out when it equals transformers' default (save_pretrained writes only what
# differs from the config class's), by transformers' names; the tensors must have the sizes it gives.
_BERT_DEFAULTS = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072, hidden_act="gelu", max_position_embeddings=512, type_vocab_size=2,
                      layer_norm_eps=1e-12, pad_token_id=0, num_labels=2)
HF_DEFAULTS = {"bert": _BERT_DEFAULTS, "roberta": dict(_BERT_DEFAULTS, vocab_size=50265, pad_token_id=1),
               "distilbert": dict(vocab_size=30522, dim=768, n_layers=6, n_heads=12, hidden_dim=3072,
                                  activation="gelu", max_position_embeddings=512, pad_token_id=0, num_labels=2)}
# DistilBERT's config.json names for BERT's settings (transformers' DistilBertConfig); the other families use BERT's.
DISTILBERT_NAMES = {"hidden_size": "dim", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
                    "intermediate_size": "hidden_dim", "hidden_act": "activation"}


def hf_name(family: str, name: str) -> str:
    """config.json's name, in `family`, of the setting BERT's config.json calls `name`."""
    return DISTILBERT_NAMES.get(name, name) if family == "distilbert" else name


# The classification head of each family: its hidden layer's activation (nu = out(act(dense(t)))).
HEAD_ACTIVATIONS = {"bert": jnp.tanh, "roberta": jnp.tanh, "distilbert": nn.relu}


class UnsupportedArchitectureError(ValueError):
    """A checkpoint whose config.json names an architecture this encoder does not compute."""


def supported() -> str:
    return ", ".join(ARCHITECTURES)


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """What fixes the encoder's computation, read from a transformers config.json (`from_hf`)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int  # 0: no token-type embeddings (DistilBERT)
    layer_norm_eps: float
    hidden_act: str
    pad_token_id: int
    labels: tuple[str, ...]  # one name per class, id2label's order

    @property
    def family(self) -> str:
        return ARCHITECTURES[self.architecture]

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def max_tokens(self) -> int:
        """The longest input, special tokens included: RoBERTa's positions start at pad_token_id + 1."""
        if self.family == "roberta":
            return self.max_position_embeddings - self.pad_token_id - 1
        return self.max_position_embeddings

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise UnsupportedArchitectureError(
                f"architecture {self.architecture!r} is not supported; supported: {supported()}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer; got {value!r}")
        if isinstance(self.type_vocab_size, bool) or not isinstance(self.type_vocab_size, int) \
                or self.type_vocab_size < 0:
            raise ConfigError(f"type_vocab_size must be a non-negative integer; got {self.type_vocab_size!r}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden size {self.hidden_size} is not divisible by {self.num_heads} heads")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
        if isinstance(self.pad_token_id, bool) or not isinstance(self.pad_token_id, int) \
                or not 0 <= self.pad_token_id < self.vocab_size:
            raise ConfigError(f"pad_token_id must be a token id 0..{self.vocab_size - 1}; got {self.pad_token_id!r}")
        if self.max_tokens < 2:
            raise ConfigError(f"max_position_embeddings {self.max_position_embeddings} leaves no room for a text")
        if not self.labels:
            raise ConfigError("the checkpoint has no classes (num_labels / id2label)")

    @classmethod
    def from_hf(cls, hf: dict) -> TextConfig:
        """A transformers config.json dict -> TextConfig. Refuses other architectures by name, and
        options that change the computation beyond what this encoder does (relative positions)."""
        if not isinstance(hf, dict):
            raise ConfigError(f"a config.json is a JSON object; got a {type(hf).__name__}")
        archs = hf.get("architectures")
        if not isinstance(archs, list) or len(archs) != 1 or not isinstance(archs[0], str):
            raise UnsupportedArchitectureError(
                f"config.json names no single architecture (architectures={archs!r}); supported: {supported()}")
        arch = archs[0]
        if arch not in ARCHITECTURES:
            raise UnsupportedArchitectureError(f"architecture {arch!r} is not supported; supported: {supported()}")
        family = ARCHITECTURES[arch]
        pos_type = hf.get("position_embedding_type", "absolute")
        if pos_type != "absolute":
            raise UnsupportedArchitectureError(f"position_embedding_type {pos_type!r} is not supported (only "
                                               "'absolute' position embeddings)")
        def said(name):  # config.json's value of BERT's setting `name`, transformers' default where it is silent
            name = hf_name(family, name)
            return hf.get(name, HF_DEFAULTS[family][name])

        sizes = dict(hidden_size=said("hidden_size"), num_layers=said("num_hidden_layers"),
                     num_heads=said("num_attention_heads"), intermediate_size=said("intermediate_size"),
                     hidden_act=said("hidden_act"))
        if family == "distilbert":  # no token types; its LayerNorm eps fixed by transformers' code
            sizes.update(type_vocab_size=0, layer_norm_eps=1e-12)
        else:
            sizes.update(type_vocab_size=said("type_vocab_size"), layer_norm_eps=said("layer_norm_eps"))
        eps = sizes["layer_norm_eps"]
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
            raise ConfigError(f"layer_norm_eps must be a small positive number; got {eps!r}")
        sizes["layer_norm_eps"] = float(eps)
        return cls(architecture=arch, vocab_size=said("vocab_size"),
                   max_position_embeddings=said("max_position_embeddings"), pad_token_id=said("pad_token_id"),
                   labels=_labels(hf, HF_DEFAULTS[family]["num_labels"]), **sizes)


def _labels(hf: dict, default: int) -> tuple[str, ...]:
    """Class names in index order: id2label when it names every class, else LABEL_i, as transformers
    (`default`: transformers' num_labels, where config.json says neither)."""
    id2label = hf.get("id2label")
    n = hf.get("num_labels", len(id2label) if isinstance(id2label, dict) and id2label else default)
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ConfigError(f"num_labels must be a positive integer; got {n!r}")
    if isinstance(id2label, dict) and id2label:
        try:
            table = {int(k): str(v) for k, v in id2label.items()}
        except (TypeError, ValueError):
            raise ConfigError(f"id2label keys must be class indices; got {sorted(id2label)[:3]}") from None
        if sorted(table) == list(range(len(table))):
            return tuple(table[i] for i in range(len(table)))
        raise ConfigError(f"id2label must name classes 0..{len(table) - 1}; got indices {sorted(table)[:5]}")
    return tuple(f"LABEL_{i}" for i in range(n))


def _dense(features: int, dtype, name: str) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, kernel_init=nn.initializers.normal(0.02), name=name)


class Layer(nn.Module):
    """One post-LN encoder layer: x = LN(x + attn(x)); x = LN(x + ffn(x)). Returns (x, probs (B, H, T, T))."""

    config: TextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, key_mask):
        cfg = self.config
        b, t, d = x.shape
        h = cfg.num_heads
        dh = d // h

        def heads(name):  # (B, H, T, dh)
            return _dense(d, self.dtype, name)(x).reshape(b, t, h, dh).transpose(0, 2, 1, 3)

        q, k, v = heads("query"), heads("key"), heads("value")
        logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) * (dh ** -0.5)
        # transformers adds finfo.min at padding keys: their attention is exactly 0, never a NaN.
        logits = logits + jnp.where(key_mask, 0.0, jnp.finfo(jnp.float32).min)[:, None, None, :]
        probs = jax.nn.softmax(logits, axis=-1)
        # Identity unless the caller passes a 'perturbations' collection (gradient baselines: d out / dA).
        probs = self.perturb("attn", probs)
        ctx = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(self.dtype), v).transpose(0, 2, 1, 3).reshape(b, t, d)
        x = LayerNorm(cfg.layer_norm_eps, self.dtype, name="attn_norm")(x + _dense(d, self.dtype, "attn_out")(ctx))
        y = ACTIVATIONS[cfg.hidden_act](_dense(cfg.intermediate_size, self.dtype, "ffn_in")(x))
        x = LayerNorm(cfg.layer_norm_eps, self.dtype, name="ffn_norm")(x + _dense(d, self.dtype, "ffn_out")(y))
        return x, probs


class TextEncoder(nn.Module):
    """BERT / RoBERTa / DistilBERT sequence classifier. `__call__(input_ids, attention_mask,
    token_type_ids=None, return_attn=False)` -> `jaxvit.ViTOutput` with T = the padded length:

      logits (B, C) float32; pre_logits (B, D) what the last Linear reads (BERT: the pooler's tanh
      output; RoBERTa: tanh(dense(<s>)); DistilBERT: relu(pre_classifier([CLS]))); tokens (B, L + 1, T, D)
      (the embeddings after their LayerNorm, then each layer's output: transformers' hidden_states);
      attn_cls (B, L, H, T) float32, every head's attention row of the first token ([CLS] / <s>), zero
      at padding; attn (B, L, H, T, T) only with return_attn=True.

    Tokens at padding positions are computed (as transformers does) but never attended to.
    """

    config: TextConfig
    dtype: Any = jnp.float32

    def setup(self):
        cfg = self.config
        d = cfg.hidden_size
        emb = nn.initializers.normal(0.02)
        self.word = nn.Embed(cfg.vocab_size, d, embedding_init=emb, name="word")
        self.position = nn.Embed(cfg.max_position_embeddings, d, embedding_init=emb, name="position")
        self.token_type = (nn.Embed(cfg.type_vocab_size, d, embedding_init=emb, name="token_type")
                           if cfg.type_vocab_size else None)
        self.emb_norm = LayerNorm(cfg.layer_norm_eps, self.dtype, name="emb_norm")
        self.layers = [Layer(cfg, self.dtype, name=f"layers_{i}") for i in range(cfg.num_layers)]
        self.head_dense = _dense(d, self.dtype, "head_dense")
        self.head_out = _dense(cfg.num_classes, self.dtype, "head_out")

    def position_ids(self, input_ids):
        """transformers' positions: 0..T-1, RoBERTa's counted over non-padding tokens from pad + 1."""
        cfg = self.config
        if cfg.family == "roberta":
            keep = (input_ids != cfg.pad_token_id).astype(jnp.int32)
            return jnp.cumsum(keep, axis=1) * keep + cfg.pad_token_id
        return jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, return_attn: bool = False):
        cfg = self.config
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (B, T) token ids; got shape {input_ids.shape}")
        t = input_ids.shape[1]
        if t > cfg.max_tokens:
            raise ValueError(f"{t} tokens, and this model takes at most {cfg.max_tokens} (its position embeddings): "
                             "truncate the text (the tokenizer does, with a warning)")
        key_mask = jnp.ones(input_ids.shape, bool) if attention_mask is None else attention_mask.astype(bool)
        x = self.word(input_ids) + self.position(self.position_ids(input_ids))
        if self.token_type is not None:
            types = jnp.zeros_like(input_ids) if token_type_ids is None else token_type_ids
            x = x + self.token_type(types)
        x = self.emb_norm(x.astype(self.dtype))
        tokens, rows, full = [x], [], []
        for layer in self.layers:
            x, probs = layer(x, key_mask)
            tokens.append(x)
            rows.append(probs[:, :, 0])
            if return_attn:
                full.append(probs)
        pooled = self.pool(x[:, 0])
        return ViTOutput(logits=self.head_out(pooled).astype(jnp.float32), pre_logits=pooled,
                         tokens=jnp.stack(tokens, axis=1), attn_cls=jnp.stack(rows, axis=1),
                         attn=jnp.stack(full, axis=1) if return_attn else None)

    def pool(self, t):
        """The head's hidden layer on tokens t (..., D): BERT's pooler, RoBERTa's dense, DistilBERT's
        pre_classifier, each with its own activation."""
        return HEAD_ACTIVATIONS[self.config.family](self.head_dense(t.astype(self.dtype)))

    def classify(self, t):
        """nu: the model's own classification head applied to tokens t (..., D) -> (..., C) float32."""
        return self.head_out(self.pool(t)).astype(jnp.float32)


def init_params(config: TextConfig, seed: int = 0):
    """Randomly initialised params (tests, shapes)."""
    model = TextEncoder(config)
    ids = jnp.zeros((1, 2), jnp.int32)
    return model.init(jax.random.PRNGKey(seed), ids, jnp.ones((1, 2), bool))["params"]
