"""One check of an explanation request against a model, and the frozen request it returns.

`check(model, method, layer, options, target)` is the only place that decides whether a method,
its prediction layer, its options and a target form fit a model: `explain`, `explain_fn`, the
report, LRP, the evaluation and the batch pipeline all call it, so one bad request gets one message
everywhere. The method registry (`Method`, `METHODS`) lives here too: it is what a request may
name; `predmaps.explain` registers the methods with the functions that run them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from predmaps import core
from predmaps.targets import Target, TargetForm, target_form


@dataclasses.dataclass(frozen=True)
class Method:
    """A registered explanation method.

    `run(model, params, images, targets, layer, **options)` returns a dict with `maps`
    (B, K, N), `classes` (B, K), `logits` (B, C) and optional extras. `choices`: the values an
    option may take, where they are few; `head_token`: (why, what would go wrong) when the method
    needs a head that reads the class token (global_pool='token'), empty when it does not;
    `head_inputs`: the `ViTConfig.head_input` values it supports (None: all).
    """

    name: str
    run: Callable[..., dict]
    options: dict[str, Any]
    class_specific: bool
    needs_class_token: bool
    uses_layer: bool
    description: str
    choices: dict[str, tuple] = dataclasses.field(default_factory=dict)
    head_token: tuple[str, str] | tuple[()] = ()
    head_inputs: tuple[str, ...] | None = None


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


@dataclasses.dataclass(frozen=True)
class Request:
    """A checked request: hashable, so it keys compilations and caches.

    method: a name in `METHODS`. layer: the token layer 0..L of a method with a prediction layer,
    None for the others. options: every option of the method, defaults filled, sorted (name, value)
    pairs. target: the form of a target fixed with the request (a job's "top5", "gt", a class), None
    where each call brings its own (`explain_fn`).
    """

    method: str
    layer: int | None
    options: tuple[tuple[str, Any], ...]
    target: TargetForm | None = None


def _check_model(model, method: str) -> Method:
    """What `method` needs of the model: a classifier head, a class token for the attention methods,
    a head reading the class token for the methods that start from that read-out."""
    m = get_method(method)
    cfg = model.config
    if cfg.num_classes <= 0:
        raise ValueError("this model has no classifier head (num_classes=0): prediction maps need one")
    if m.needs_class_token:
        core.check_class_token(model, method)
    if m.head_token and cfg.global_pool != "token":
        why, consequence = m.head_token
        raise ValueError(f"{method} {why}, which a head pooling with global_pool={cfg.global_pool!r} never reads: "
                         f"{consequence}. Use generic_attention or prediction_map")
    if m.head_inputs is not None and cfg.head_input not in m.head_inputs:
        raise ValueError(f"{method} does not support head_input={cfg.head_input!r} (a classifier reading the class "
                         "token and the patch-token mean, as DINOv2's): its relevance rules start from the class token "
                         "alone. Use predicatt, prediction_map or generic_attention")
    return m


def check_options(model, m: Method, options: dict | None) -> tuple[tuple[str, Any], ...]:
    """The method's options with defaults filled, sorted; refuses unknown names and bad values."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(m.options))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {m.name!r}; it takes {sorted(m.options) or 'none'}")
    for name, value in options.items():  # a flag given as "no" would read as True
        if isinstance(m.options[name], bool) and not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"{name} must be True or False; got {value!r}")
    opts = {**m.options, **options}
    for name, allowed in m.choices.items():
        if opts[name] not in allowed:
            raise ValueError(f"{name} must be one of {allowed}; got {opts[name]!r}")
    if "start_layer" in opts:
        s, depth = opts["start_layer"], model.config.depth
        if isinstance(s, (bool, np.bool_)) or not isinstance(s, (int, np.integer)) or not 0 <= s < depth:
            raise ValueError(f"start_layer {s!r} out of range 0..{depth - 1}: the first block whose attention is "
                             "rolled out")
    return tuple(sorted(opts.items()))


def layer_ignored(method: str, layer: int | None) -> bool:
    """Whether `method` would ignore `layer`: a method without a prediction layer takes only None and the
    default -1. Needs no model, so a command line can refuse such a layer before its model loads."""
    return not get_method(method).uses_layer and layer not in (None, -1)


def check(model, method: str = "predicatt", layer: int | None = -1, options: dict | None = None,
          target: Target | None = None, *, words: tuple[str, ...] | None = None) -> Request:
    """Check a request against `model` and return it as a `Request`.

    layer: the prediction layer of a prediction-map method (0..L, negative from the end); a method
    without one refuses any layer but None and the default -1. target: a fixed target ("top", "top5",
    "all", "gt", a class index), None when each call brings its own; `words`: the only target words
    the caller offers (the evaluation's "pred" and "gt"). Raises ValueError naming the problem and
    what to do: unknown method or option, bad option value, layer out of range, a layer for a method
    that has none, no classifier head, an attention method on a model without a class token, a
    method that starts from the class-token read-out on a model whose head pools.
    """
    m = _check_model(model, method)
    opts = check_options(model, m, options)
    if layer_ignored(method, layer):
        raise ValueError(f"method {method!r} takes no layer (it reads the attention of every block it needs); got "
                         f"layer={layer!r}: leave layer out. The methods with a prediction layer: "
                         f"{', '.join(n for n, x in METHODS.items() if x.uses_layer)}")
    layer_i = core.layer_index(-1 if layer is None else layer, model.config.depth) if m.uses_layer else None
    form = None
    if target is not None:
        if words is not None and (not isinstance(target, str) or target not in words):
            raise ValueError(f"target must be {' or '.join(map(repr, words))}; got {target!r}")
        form = target_form(target, model.config.num_classes)
    return Request(method, layer_i, opts, form)
