"""Prediction maps and PredicAtt on text classifiers (the paper's appendix A.4), over word pieces.

    from convert.hf_text import load_text
    from predmaps import text
    model, params, tokenizer = load_text("path/to/sentiment-checkpoint")
    batch = tokenizer(["a wonderful, moving film", "dull and far too long"])
    ex = text.explain_text(model, params, batch, method="predicatt", target="top", layer=-1)
    ex.maps                      # (B, K, T): one value per token, 0 at [CLS]/[SEP]/<s>/</s> and padding
    words = text.word_maps(ex, batch)   # per text: its words and (K, W) maps, word pieces summed

The method is predmaps.core's, with the ViT's patch tokens replaced by the text's own tokens: nu is the
model's classification head applied to every token (`TextEncoder.classify`: BERT pooler dense + tanh then
classifier, RoBERTa dense + tanh + out_proj, DistilBERT pre_classifier + ReLU + classifier), Psi^(l) its
softmax over the content tokens, PredicAtt weighting the [CLS] / <s> attention rows of all layers and heads.
The special tokens and padding are masked to zero in A_CLS and Psi before core's functions run, which is
the same as dropping their columns: a padded batch gives each sentence's maps as one by one.

Methods (`TEXT_METHODS`): predicatt, prediction_map, weighted_attention, mean_attention, raw_attention,
rollout, gradcam (the last layer's [CLS] row times its head-mean gradient over content tokens),
generic_attention (Chefer 2021a). Chefer's LRP-based methods (transattr, lrp, partial_lrp) are not carried over.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxvit.model import fields_repr
from jaxvit.text import TextEncoder
from jaxvit.tokenizer import TextBatch
from predmaps import baselines, core
from predmaps.targets import Target, Targets, make_targets

# predmaps.baselines reads only config.num_prefix_tokens from its model: the text maps keep all T columns
# (first token included) and mask the special ones afterwards.
_ALL_COLUMNS = SimpleNamespace(config=SimpleNamespace(num_prefix_tokens=0))
WORD_REDUCTIONS = ("sum", "max")


@struct.dataclass
class TextInputs:
    """A tokenised batch as arrays (B, T): what the jitted explanation takes (`TextInputs.of(batch)`)."""

    input_ids: jax.Array
    attention_mask: jax.Array
    token_type_ids: jax.Array
    content_mask: jax.Array  # the tokens a map covers: not special, not padding

    @classmethod
    def of(cls, batch: TextBatch) -> TextInputs:
        return cls(jnp.asarray(batch.input_ids), jnp.asarray(batch.attention_mask),
                   jnp.asarray(batch.token_type_ids), jnp.asarray(batch.content_mask))


@struct.dataclass
class TextExplanation:
    """Maps for K target classes per text; batch axis first, T tokens (the padded length).

    maps (B, K, T) float32, 0 outside `content_mask`; classes (B, K); logits (B, C); content_mask
    (B, T) bool; head_weights (B, K, L, H) alpha~; weighted_attention and prediction_map (B, K, T)
    (PredicAtt and its parts only); method, layer: what produced it.
    """

    maps: jax.Array
    classes: jax.Array
    logits: jax.Array
    content_mask: jax.Array
    head_weights: jax.Array | None = None
    weighted_attention: jax.Array | None = None
    prediction_map: jax.Array | None = None
    method: str = struct.field(pytree_node=False, default="")
    layer: int | None = struct.field(pytree_node=False, default=None)

    def __repr__(self) -> str:
        return fields_repr(self)


def _forward(model, params, x: TextInputs, return_attn=False):
    return model.apply({"params": params}, x.input_ids, x.attention_mask, x.token_type_ids, return_attn=return_attn)


def _psi(model, params, tokens, classes, scores):
    """Psi^(l)(c) over every token: tokens (B, T, D), classes (B, K) -> (B, K, T)."""
    z = model.apply({"params": params}, tokens, method=TextEncoder.classify)  # (B, T, C)
    p = jax.nn.softmax(z, axis=-1) if scores == "probs" else z
    return jnp.take_along_axis(p, classes[:, None, :], axis=2).transpose(0, 2, 1)


def _run_predicatt(model, params, x, targets, layer, mask, *, similarity="dot", scores="probs"):
    out = _forward(model, params, x)
    classes = targets.resolve(out.logits)
    psi = _psi(model, params, out.tokens[:, layer], classes, scores) * mask[:, None]
    maps, a_tilde, alpha = core.predicatt(out.attn_cls * mask[:, None, None], psi, similarity)
    return dict(maps=maps, classes=classes, logits=out.logits, head_weights=alpha, weighted_attention=a_tilde,
                prediction_map=psi)


def _run_weighted_attention(model, params, x, targets, layer, mask, **options):
    res = _run_predicatt(model, params, x, targets, layer, mask, **options)
    return dict(res, maps=res["weighted_attention"])


def _run_prediction_map(model, params, x, targets, layer, mask, *, scores="probs"):
    out = _forward(model, params, x)
    classes = targets.resolve(out.logits)
    psi = _psi(model, params, out.tokens[:, layer], classes, scores) * mask[:, None]
    return dict(maps=psi, classes=classes, logits=out.logits, prediction_map=psi)


def _agnostic(model, params, x, targets, fn, return_attn=False):
    out = _forward(model, params, x, return_attn)
    classes = targets.resolve(out.logits)
    m = fn(out)  # (B, T): the same map for every class
    return dict(maps=jnp.broadcast_to(m[:, None], (m.shape[0], classes.shape[1], m.shape[1])), classes=classes,
                logits=out.logits)


def _run_raw_attention(model, params, x, targets, layer, mask):
    return _agnostic(model, params, x, targets, lambda out: baselines.raw_attention(_ALL_COLUMNS, out.attn_cls))


def _run_mean_attention(model, params, x, targets, layer, mask):
    # A mean over layers and heads, column by column: masking the special columns afterwards is exact.
    return _agnostic(model, params, x, targets, lambda out: baselines.mean_attention(_ALL_COLUMNS, out.attn_cls))


def _run_rollout(model, params, x, targets, layer, mask, *, start_layer=0):
    # Padding gets no attention from any row, so no path from the first token passes through it.
    return _agnostic(model, params, x, targets, lambda out: baselines.rollout(_ALL_COLUMNS, out.attn, start_layer),
                     return_attn=True)


def _gradient_maps(model, params, x, targets, map_fn, return_attn=False):
    """One forward and its vjp w.r.t. every layer's attention; map_fn(out, grads (B, L, H, T, T)) -> (B, T)
    for one class per example, run class by class (core.BATCHED_VJP_OK). -> logits, classes, maps (B, K, T)."""
    def apply(variables):
        return model.apply(variables, x.input_ids, x.attention_mask, x.token_type_ids, return_attn=return_attn)

    probe = jax.eval_shape(lambda: model.apply({"params": params}, x.input_ids, x.attention_mask, x.token_type_ids,
                                               mutable=["perturbations"]))
    zeros = jax.tree_util.tree_map(lambda s: core.zeros_varying_like(s.shape, s.dtype, x.input_ids),
                                   probe[1]["perturbations"])
    out, vjp_fn = jax.vjp(lambda p: apply({"params": params, "perturbations": p}), zeros)
    classes = targets.resolve(out.logits)
    layers = range(model.config.num_layers)

    def one_class(c):  # c (B,) -> (B, T)
        cot = jax.tree_util.tree_map(jnp.zeros_like, out).replace(
            logits=jax.nn.one_hot(c, out.logits.shape[-1], dtype=out.logits.dtype))
        (g,) = vjp_fn(cot)
        return map_fn(out, jnp.stack([g[f"layers_{i}"]["attn"] for i in layers], axis=1))

    maps = jax.lax.map(one_class, classes.T)
    return dict(maps=jnp.moveaxis(maps, 0, 1), classes=classes, logits=out.logits)


def _run_gradcam(model, params, x, targets, layer, mask):
    """GradCAM on the last layer: per head, weight = mean over content tokens of the first token's row
    of d logit_c / dA; map = mean over heads of A_CLS * weight, clamped at 0."""
    n = jnp.maximum(mask.sum(-1), 1)[:, None, None]  # (B, 1, 1) content tokens

    def cam(out, grads):
        weight = (grads[:, -1, :, 0] * mask[:, None]).sum(-1, keepdims=True) / n  # (B, H, 1)
        return jnp.maximum((out.attn_cls[:, -1] * weight).mean(axis=1), 0.0)

    return _gradient_maps(model, params, x, targets, cam)


def _run_generic_attention(model, params, x, targets, layer, mask):
    """Chefer et al. 2021a (predmaps.baselines.generic_attention): R += mean_h(clamp(grad * A, 0)) R per
    layer, the first token's row. Padding gets no attention, so no path from the first token reaches it."""
    def rule(out, grads):
        return baselines.generic_attention(_ALL_COLUMNS, out.attn, grads[:, None])[:, 0]

    return _gradient_maps(model, params, x, targets, rule, return_attn=True)


@dataclasses.dataclass(frozen=True)
class TextMethod:
    name: str
    run: Callable[..., dict]
    options: dict
    class_specific: bool
    uses_layer: bool


TEXT_METHODS = {m.name: m for m in [
    TextMethod("predicatt", _run_predicatt, dict(similarity="dot", scores="probs"), True, True),
    TextMethod("prediction_map", _run_prediction_map, dict(scores="probs"), True, True),
    TextMethod("weighted_attention", _run_weighted_attention, dict(similarity="dot", scores="probs"), True, True),
    TextMethod("mean_attention", _run_mean_attention, {}, False, False),
    TextMethod("raw_attention", _run_raw_attention, {}, False, False),
    # start_layer 0 for text, as Chefer et al.'s BERT explanation code rolls out from the first layer.
    TextMethod("rollout", _run_rollout, dict(start_layer=0), False, False),
    TextMethod("gradcam", _run_gradcam, {}, True, False),
    TextMethod("generic_attention", _run_generic_attention, {}, True, False),
]}


def check_text_request(model: TextEncoder, method: str, layer, options: dict) -> tuple[int, tuple]:
    """(layer index, sorted options) of a request, or a ValueError naming what is wrong."""
    if method not in TEXT_METHODS:
        raise ValueError(f"unknown text method {method!r}; available: {', '.join(TEXT_METHODS)}")
    m = TEXT_METHODS[method]
    unknown = sorted(set(options) - set(m.options))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {method!r}; it takes {sorted(m.options) or 'none'}")
    opts = {**m.options, **options}
    if opts.get("scores", "probs") not in core.SCORES:
        raise ValueError(f"scores must be one of {core.SCORES}; got {opts['scores']!r}")
    if opts.get("similarity", "dot") not in core.SIMILARITIES:
        raise ValueError(f"similarity must be one of {core.SIMILARITIES}; got {opts['similarity']!r}")
    if model.config.num_classes < 2 and opts.get("scores") == "probs":
        raise ValueError("this model has one output (a regression head): its softmax is 1 everywhere; pass "
                         "scores='logits'")
    depth = model.config.num_layers
    if "start_layer" in opts and not (isinstance(opts["start_layer"], int) and 0 <= opts["start_layer"] < depth):
        raise ValueError(f"start_layer must be a layer 0..{depth - 1}; got {opts['start_layer']!r}")
    if not m.uses_layer and layer not in (None, -1):
        raise ValueError(f"method {method!r} takes no layer; got layer={layer!r}: leave layer out")
    layer_i = core.layer_index(-1 if layer is None else layer, depth) if m.uses_layer else 0
    return layer_i, tuple(sorted(opts.items()))


def _explain_impl(model, method, layer, options, params, x: TextInputs, targets: Targets) -> TextExplanation:
    m = TEXT_METHODS[method]
    mask = x.content_mask.astype(jnp.float32)
    res = m.run(model, params, x, targets, layer, mask, **dict(options))

    def masked(v):
        return None if v is None else (v * mask[:, None]).astype(jnp.float32)

    return TextExplanation(maps=masked(res["maps"]), classes=res["classes"], logits=res["logits"],
                           content_mask=x.content_mask.astype(bool), head_weights=res.get("head_weights"),
                           weighted_attention=masked(res.get("weighted_attention")),
                           prediction_map=masked(res.get("prediction_map")), method=method,
                           layer=layer if m.uses_layer else None)


_explain_jit = jax.jit(_explain_impl, static_argnums=(0, 1, 2, 3))


def explain_text(model: TextEncoder, params, batch: TextBatch | TextInputs, *, method: str = "predicatt",
                 target: Target = "top", layer: int | None = -1, **options) -> TextExplanation:
    """Explain a tokenised batch (`tokenizer(texts)`) -> `TextExplanation` with maps (B, K, T).

    target: as `predmaps.explain`: "top", "topK", "all", a class, a list of classes, or per-example
    classes (B,) / (B, K). layer: the prediction layer of prediction-map methods (0..L, -1 = L).
    options: similarity ("dot" / "cosine") and scores ("probs" / "logits") for the prediction-map
    methods, start_layer for rollout. Jitted: compiles once per (model, method, layer, options,
    target form and K, batch shape)."""
    layer_i, opts = check_text_request(model, method, layer, options)
    if not isinstance(batch, (TextBatch, TextInputs)):
        raise TypeError(f"batch must be a TextBatch (tokenizer(texts)) or TextInputs; got {type(batch).__name__}")
    x = TextInputs.of(batch) if isinstance(batch, TextBatch) else batch
    targets = make_targets(target, x.input_ids.shape[0], model.config.num_classes)
    return _explain_jit(model, method, layer_i, opts, params, x, targets)


def explain_text_fn(model: TextEncoder, *, method: str = "predicatt", layer: int | None = -1,
                    **options) -> Callable[[dict, TextInputs, Targets], TextExplanation]:
    """A pure function (params, TextInputs, Targets) -> TextExplanation for the caller's own jit / vmap;
    the request is checked here, once. Build targets with `predmaps.make_targets(target, B, C)`."""
    layer_i, opts = check_text_request(model, method, layer, options)

    def fn(params, x: TextInputs, targets: Targets) -> TextExplanation:
        return _explain_impl(model, method, layer_i, opts, params, x, targets)

    return fn


@dataclasses.dataclass(frozen=True)
class WordMaps:
    """One text's maps per word: words are its whitespace-separated spans (punctuation stays with its word)
    that hold at least one of the tokens the model saw.

    words: the words as written; spans: their (start, end) characters; maps: (K, W) float32."""

    words: tuple[str, ...]
    spans: tuple[tuple[int, int], ...]
    maps: np.ndarray


def word_maps(ex: TextExplanation, batch: TextBatch, reduce: str = "sum") -> list[WordMaps]:
    """Token maps merged into words by character offsets: a word's value is the sum (default: a word's
    share of the map, which a word split into more pieces does not dilute) or the max of its pieces'."""
    if reduce not in WORD_REDUCTIONS:
        raise ValueError(f"reduce must be one of {WORD_REDUCTIONS}; got {reduce!r}")
    maps = np.asarray(ex.maps)
    if maps.shape[0] != len(batch) or maps.shape[2] != batch.input_ids.shape[1]:
        raise ValueError(f"the explanation's maps {maps.shape} are not of this batch ({len(batch)} texts of "
                         f"{batch.input_ids.shape[1]} tokens): pass the batch that was explained")
    out = []
    for i in range(len(batch)):
        spans, which = batch.word_index(i)
        kept = np.unique(which[which >= 0])  # words the model saw (a truncated text's cut words are absent)
        merged = np.full((maps.shape[1], len(kept)), 0.0 if reduce == "sum" else -np.inf, np.float32)
        for j in np.flatnonzero(which >= 0):
            w = np.searchsorted(kept, which[j])
            merged[:, w] = merged[:, w] + maps[i, :, j] if reduce == "sum" else np.maximum(merged[:, w], maps[i, :, j])
        out.append(WordMaps(tuple(batch.texts[i][spans[w][0]:spans[w][1]] for w in kept),
                            tuple(spans[w] for w in kept), merged))
    return out
