"""One interface for every method: `explain(model, params, images, method=..., target=..., layer=...)`.

The whole explanation (the forward, target resolution, the method) is one jitted function of
(params, images, targets), compiled once per (model, method, layer, options, target form and K,
batch shape): given classes are traced, so new classes of the same K reuse the executable.
Default path: fused attention with the exact class-token row and only the requested classes'
columns of the prediction matrix; B x L x N x C is never built unless asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxvit import Params, ViT
from jaxvit.model import fields_repr
from predmaps import baselines, core, lrp
from predmaps.request import METHODS, Method, Request, check, get_method, register
from predmaps.targets import Target, Targets, make_targets

__all__ = ["METHODS", "Explanation", "Method", "explain", "explain_fn", "get_method", "prediction_matrices",
           "request_fn", "upsample"]


@struct.dataclass
class Explanation:
    """Maps for K target classes per image; batch axis first. Token maps are (gh, gw).

    Attributes:
      maps: (B, K, gh, gw) float32, the method's map for each target class.
      classes: (B, K) int32, the class of each map.
      logits: (B, C) float32, the model's output.
      head_weights: (B, K, L, H) alpha~, PredicAtt's weight of each head (sums to 1 over L*H).
      weighted_attention: (B, K, gh, gw) A~(c), the alpha~-weighted class-token attention.
      prediction_map: (B, K, gh, gw) Psi^(layer)(c), the prediction map used.
      method, layer: what produced it (static).
    """

    maps: jax.Array
    classes: jax.Array
    logits: jax.Array
    head_weights: jax.Array | None = None
    weighted_attention: jax.Array | None = None
    prediction_map: jax.Array | None = None
    method: str = struct.field(pytree_node=False, default="")
    layer: int | None = struct.field(pytree_node=False, default=None)

    def __repr__(self) -> str:
        return fields_repr(self)


def _forward(model, params, images):
    return model.apply({"params": params}, images)


def _psi(model, params, tokens, classes, scores, lean):
    if lean:
        return core.prediction_columns(model, params, tokens, classes, scores)
    full = core.prediction_matrix(model, params, tokens, scores)  # (B, N, C)
    return jnp.take_along_axis(full, classes[:, None, :], axis=2).transpose(0, 2, 1)


def _run_predicatt(model, params, images, targets, layer, *, similarity="dot", scores="probs", lean=True):
    out = _forward(model, params, images)
    classes = targets.resolve(out.logits)
    psi = _psi(model, params, out.tokens[:, layer], classes, scores, lean)
    maps, a_tilde, alpha_tilde = core.predicatt(core.cls_attention(model, out.attn_cls), psi, similarity)
    return dict(maps=maps, classes=classes, logits=out.logits, head_weights=alpha_tilde,
                weighted_attention=a_tilde, prediction_map=psi)


def _run_weighted_attention(model, params, images, targets, layer, **options):
    res = _run_predicatt(model, params, images, targets, layer, **options)
    return dict(res, maps=res["weighted_attention"])


def _run_prediction_map(model, params, images, targets, layer, *, scores="probs", lean=True):
    out = _forward(model, params, images)
    classes = targets.resolve(out.logits)
    psi = _psi(model, params, out.tokens[:, layer], classes, scores, lean)
    return dict(maps=psi, classes=classes, logits=out.logits, prediction_map=psi)


def _agnostic(model, params, images, targets, fn, return_attn=False):
    out = model.clone(attention="materialized").apply({"params": params}, images, return_attn=True) \
        if return_attn else _forward(model, params, images)
    classes = targets.resolve(out.logits)
    m = fn(out)  # (B, N): the same map for every class
    return dict(maps=jnp.broadcast_to(m[:, None], (m.shape[0], classes.shape[1], m.shape[1])), classes=classes,
                logits=out.logits)


def _run_raw_attention(model, params, images, targets, layer):
    return _agnostic(model, params, images, targets, lambda out: baselines.raw_attention(model, out.attn_cls))


def _run_mean_attention(model, params, images, targets, layer):
    return _agnostic(model, params, images, targets, lambda out: baselines.mean_attention(model, out.attn_cls))


def _run_rollout(model, params, images, targets, layer, *, start_layer=1):
    return _agnostic(model, params, images, targets, lambda out: baselines.rollout(model, out.attn, start_layer),
                     return_attn=True)


def _run_gradcam(model, params, images, targets, layer):
    logits, classes, maps = baselines.gradient_maps(
        model, params, images, targets, lambda attn, grads: baselines.gradcam(model, attn, grads), blocks=(-1,))
    return dict(maps=maps, classes=classes, logits=logits)


def _run_generic_attention(model, params, images, targets, layer):
    logits, classes, maps = baselines.gradient_maps(
        model, params, images, targets, lambda attn, grads: baselines.generic_attention(model, attn, grads))
    return dict(maps=maps, classes=classes, logits=logits)


def _run_transattr(model, params, images, targets, layer, *, start_layer=1, rule="ours"):
    return lrp.transattr(model, params, images, targets, start_layer, rule=rule)


def _run_lrp(model, params, images, targets, layer, *, rule="orig"):
    return lrp.full_lrp(model, params, images, targets, rule=rule)


def _run_partial_lrp(model, params, images, targets, layer, *, rule="orig"):
    return lrp.partial_lrp(model, params, images, targets, rule=rule)


_PM_OPTIONS = dict(scores="probs", lean=True)
_PM_CHOICES = dict(scores=core.SCORES)
_PA_CHOICES = dict(similarity=core.SIMILARITIES, **_PM_CHOICES)
_LRP_CHOICES = dict(rule=lrp.RULES)
_LRP_HEAD = ("propagates relevance from the class-token read-out", "its relevance would start from a token the "
             "logits do not come from")
_LRP_HEADS = ("token",)  # its rules start from one token's Linear, not the class token + patch-mean head
for _m in [
    Method("predicatt", _run_predicatt, dict(similarity="dot", **_PM_OPTIONS), True, True, True,
           "PredicAtt_i(c) = A~(c) * Psi^(i)(c): head-weighted class-token attention times the prediction map",
           _PA_CHOICES),
    Method("prediction_map", _run_prediction_map, dict(_PM_OPTIONS), True, False, True,
           "Psi^(i)(c): the classifier head applied to every patch token of layer i", _PM_CHOICES),
    Method("weighted_attention", _run_weighted_attention, dict(similarity="dot", **_PM_OPTIONS), True, True, True,
           "A~(c) alone (ablation ii)", _PA_CHOICES),
    Method("mean_attention", _run_mean_attention, {}, False, True, False,
           "mean class-token attention over all heads and blocks (ablation i)"),
    Method("raw_attention", _run_raw_attention, {}, False, True, False,
           "last block's class-token attention, mean over heads"),
    Method("rollout", _run_rollout, dict(start_layer=1), False, True, False,
           "attention rollout (Abnar & Zuidema) from start_layer"),
    Method("gradcam", _run_gradcam, {}, True, True, False, "GradCAM on the last block's attention",
           head_token=("weights heads by the gradient at the last block's class-token row", "every map would be 0")),
    Method("generic_attention", _run_generic_attention, {}, True, True, False,
           "Chefer 2021a: gradient x attention rollout"),
    Method("transattr", _run_transattr, dict(start_layer=1, rule="ours"), True, True, False,
           "Chefer 2021b Transformer Attribution: LRP relevance x gradient of attention, rollout", _LRP_CHOICES,
           _LRP_HEAD, _LRP_HEADS),
    Method("lrp", _run_lrp, dict(rule="orig"), True, True, False,
           "full LRP to the input pixels, summed per patch", _LRP_CHOICES, _LRP_HEAD, _LRP_HEADS),
    Method("partial_lrp", _run_partial_lrp, dict(rule="orig"), True, True, False,
           "partial LRP (Voita et al.): the last block's attention relevance", _LRP_CHOICES, _LRP_HEAD, _LRP_HEADS),
]:
    register(_m)


def _explain_impl(model: ViT, req: Request, params, images, targets: Targets):
    m = METHODS[req.method]
    res = m.run(model, params, images, targets, req.layer, **dict(req.options))
    gh, gw = images.shape[1] // model.config.patch_size, images.shape[2] // model.config.patch_size

    if targets.kind == "given":
        # Traced classes are not checked on the host: an out-of-range one (a negative index would
        # wrap, a large one reads past the head) gives NaN outputs for its maps, in every method.
        classes = res["classes"]
        valid = (classes >= 0) & (classes < model.config.num_classes)  # (B, K)

        def checked(x):
            return None if x is None else jnp.where(valid.reshape(valid.shape + (1,) * (x.ndim - 2)), x, jnp.nan)
    else:
        def checked(x):
            return x

    def grid(x):
        return None if x is None else checked(x.reshape(x.shape[:-1] + (gh, gw)).astype(jnp.float32))

    return Explanation(maps=grid(res["maps"]), classes=res["classes"], logits=res["logits"],
                       head_weights=checked(res.get("head_weights")),
                       weighted_attention=grid(res.get("weighted_attention")),
                       prediction_map=grid(res.get("prediction_map")), method=req.method, layer=req.layer)


_explain_jit = jax.jit(_explain_impl, static_argnums=(0, 1))


def explain(model: ViT, params: Params, images: jax.Array | np.ndarray, *, method: str = "predicatt",
            target: Target = "top", layer: int | None = -1, **options) -> Explanation:
    """Explain a batch: images (B, H, W, 3) normalised float -> `Explanation` with maps (B, K, gh, gw).

    target: "top" (predicted class), "topK" (e.g. "top5"), "all", a class index, a list of
      class indices (same for every image), or an int array (B,) / (B, K) of per-example classes.
    layer: the prediction layer i of prediction-map methods, 0..L, negative from the end; a method
      without one (see `METHODS[name].uses_layer`) refuses any layer but the default.
    images: concrete float images reaching past 10x the normalised range (0..255 pixels) are refused.
    options: the method's own (see `METHODS[name].options`), e.g. similarity="cosine",
      scores="logits", lean=False (materialise the full prediction matrix), start_layer=0.

    Jitted: compiles once per (model, method, layer, options, target form (top, topK, all,
    given) and K, batch shape). Inside your own `jit`, call `explain_fn` instead (no host-side
    checks).
    """
    req = check(model, method, layer, options)
    cfg = model.config
    core.check_pixel_range(images, cfg)
    images = jnp.asarray(images)
    core.check_images(images, cfg)
    targets = make_targets(target, images.shape[0], cfg.num_classes)
    return _explain_jit(model, req, params, images, targets)


def explain_fn(model: ViT, *, method: str = "predicatt", layer: int | None = -1,
               **options) -> Callable[[Params, jax.Array, Targets], Explanation]:
    """A pure function (params, images, targets: Targets) -> Explanation, for composing inside
    the caller's own jit/vmap/shard_map. Build `targets` with `predmaps.make_targets`.

    The request is checked here, as `explain` checks it; each call checks only shapes and types
    (what tracing knows), not class values: a traced class outside 0..C-1 gives NaN maps (and
    NaN head weights, weighted attention and prediction map) for that class, in every method. To
    catch one, check classes on the host before the call (`make_targets` refuses concrete ones out
    of range) or test `jnp.isnan(ex.maps).any()` after it: an in-graph check would need the caller's
    whole function under `jax.experimental.checkify`, and NaN already marks exactly the bad maps."""
    return request_fn(model, check(model, method, layer, options))


def request_fn(model: ViT, req: Request) -> Callable[[Params, jax.Array, Targets], Explanation]:
    """`explain_fn` for a request already checked by `predmaps.request.check`."""
    cfg = model.config

    def fn(params: Params, images: jax.Array, targets: Targets) -> Explanation:
        if not isinstance(targets, Targets):
            raise TypeError(f"targets must be a predmaps.Targets, from predmaps.make_targets(target, batch, "
                            f"num_classes); got {type(targets).__name__}")
        core.check_images(images, cfg)
        b = images.shape[0]
        if targets.kind == "given" and targets.classes.shape[0] not in (1, b):
            raise ValueError(f"targets were made for batch {targets.classes.shape[0]}, images have batch {b}: "
                             f"make_targets(target, {b}, {cfg.num_classes})")
        return _explain_impl(model, req, params, images, targets)

    return fn


def upsample(maps: jax.Array, size: int | tuple[int, int], normalize: bool = False, *, extent=1.0) -> jax.Array:
    """Token maps (..., gh, gw) -> (..., H, W): bilinear with half-pixel centres, equal to torch
    `interpolate(mode="bilinear", align_corners=False)`; optionally min-max normalised per map
    (a constant map becomes 0, as the evaluation protocol sets the reference's NaN to 0). size: (H, W), or
    an int for a square.

    extent: the fraction of the image (a float, or (of height, of width)) that the token grid
    covers from the top-left; the map is resized onto that part and the rest takes the nearest edge
    value (min and max unchanged). Default all of it; for an input size that is no patch multiple
    pass `model.config.grid_extent()` (so400m at 384 / 14: its 27 x 27 grid covers 378 px). Maps
    already at `size` are per pixel and stay as they are.
    """
    from predmaps.viz import covered_size

    maps = jnp.asarray(maps, jnp.float32)
    size = (size, size) if isinstance(size, (int, np.integer)) else tuple(np.atleast_1d(np.asarray(size, object)))
    if len(size) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0
                                 for v in size):
        raise ValueError(f"size must be a positive int (a square) or (height, width); got {size!r}")
    size = (int(size[0]), int(size[1]))
    covered = size if maps.shape[-2:] == size else covered_size(size, extent)  # a per-pixel map stays
    out = jax.image.resize(maps, maps.shape[:-2] + covered, method="linear", antialias=False)
    if covered != size:
        out = jnp.pad(out, [(0, 0)] * (out.ndim - 2) + [(0, size[0] - covered[0]), (0, size[1] - covered[1])],
                      mode="edge")
    if normalize:
        lo = out.min(axis=(-2, -1), keepdims=True)
        hi = out.max(axis=(-2, -1), keepdims=True)
        span = hi - lo
        out = jnp.where(span > 0, (out - lo) / jnp.where(span > 0, span, 1.0), 0.0)
    return out


def prediction_matrices(model: ViT, params: Params, images: jax.Array | np.ndarray, *,
                        layers: int | Sequence[int] | None = None, scores: str = "probs") -> jax.Array:
    """The full Psi for several layers: (B, len(layers), N, C). Materialises B x L x N x C: ask only
    when you need all classes of all layers (e.g. per-layer statistics, figures). layers: a token
    layer or layers (0..L, negative from the end); None: all L + 1."""
    if scores not in core.SCORES:
        raise ValueError(f"scores must be one of {core.SCORES}; got {scores!r}")
    layers = core.layer_indices(layers, model.config.depth)
    images = jnp.asarray(images)
    core.check_images(images, model.config)
    return _prediction_matrices_jit(model, layers, scores, params, images)


def _prediction_matrices_impl(model, layers, scores, params, images):
    out = _forward(model, params, images)
    return jnp.stack([core.prediction_matrix(model, params, out.tokens[:, l], scores) for l in layers], axis=1)


_prediction_matrices_jit = jax.jit(_prediction_matrices_impl, static_argnums=(0, 1, 2))
