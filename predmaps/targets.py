"""Which classes a map is for: the predicted class, the top-k, given classes, or all of them.

A `Targets` is resolved against the logits inside the jitted computation, so "top" costs no
extra forward pass. Its static part (kind, k) is hashable and keys the compilation; the
class array of kind "given" is traced.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import TypeAlias, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


@struct.dataclass
class Targets:
    """kind: "top" (K=1), "topk" (K=k), "all" (K=C) or "given" (`classes` (B, K) int32)."""

    classes: jax.Array | None = None
    kind: str = struct.field(pytree_node=False, default="top")
    k: int = struct.field(pytree_node=False, default=1)

    def resolve(self, logits: jax.Array) -> jax.Array:
        """(B, K) int32 class indices for these logits (B, C)."""
        b, c = logits.shape
        if self.kind == "top":
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)[:, None]
        if self.kind == "topk":
            return jax.lax.top_k(logits, self.k)[1].astype(jnp.int32)
        if self.kind == "all":
            return jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (b, c))
        return jnp.broadcast_to(self.classes, (b, self.classes.shape[-1])).astype(jnp.int32)


# What `explain`'s target takes: "top", "topK", "all", a class, a list of classes, or per-example classes.
Target: TypeAlias = Union[str, int, Sequence[int], np.ndarray, jax.Array]

_FORMS = ("use 'top', 'topK' (e.g. 'top5'), 'all', a class index, a list of class indices, or an array of "
          "per-example classes (B,) or (B, K)")


@dataclasses.dataclass(frozen=True)
class TargetForm:
    """A target without its classes' values: hashable, so a request (and a compilation) can hold it.

    kind: "top" (K=1), "topk" (K=k), "all" (K=C), "given" (classes given with the target: the same
    for every example, or per example) or "labels" (each example's own label, e.g. the ground truth,
    given when the targets are built: `make_targets(..., labels=...)`).
    """

    kind: str
    k: int = 1


def _unknown(target) -> ValueError:
    return ValueError(f"unknown target {target!r}: {_FORMS}")


def _parse(target: Target, num_classes: int, batch: int | None):
    """(TargetForm, the classes as a (1 or B, K) array or None): every check a target gets."""
    if isinstance(target, str):
        if target in ("top", "pred", "top1"):
            return TargetForm("top"), None
        if target == "all":
            return TargetForm("all", num_classes), None
        if target == "gt":
            return TargetForm("labels"), None
        m = re.fullmatch(r"top(\d+)", target)
        if m:
            k = int(m.group(1))
            if not 1 <= k <= num_classes:
                raise ValueError(f"target {target!r}: k must be between 1 and {num_classes}")
            return TargetForm("topk", k), None
        if not re.fullmatch(r"\d+", target):  # a class index as text (a command line's --target 3)
            raise _unknown(target)
        target = int(target)
    if target is None or isinstance(target, (bool, np.bool_, float, np.floating)):
        raise _unknown(target)
    if isinstance(target, (int, np.integer)):
        arr = np.full((1, 1), int(target))
    else:
        shared = False
        if isinstance(target, (list, tuple)):
            try:
                arr = np.asarray(target)
            except ValueError:  # ragged
                raise _unknown(target) from None
            shared = arr.ndim == 1  # the same classes for every image
            if shared:
                arr = arr[None, :]
        elif hasattr(target, "ndim") and hasattr(target, "shape"):
            arr = target
            shared = arr.ndim == 0  # one class, as an array scalar
            if shared:
                arr = arr.reshape(1, 1)
            elif arr.ndim == 1:  # one class per image
                arr = arr[:, None]
        else:
            raise _unknown(target)
        if arr.ndim != 2 or (batch is not None and arr.shape[0] != batch and not shared):
            raise ValueError(f"per-example targets must have shape (B,) or (B, K) with B={batch}; got "
                             f"{tuple(np.shape(arr))}")
        if arr.shape[-1] == 0:
            raise ValueError(f"target {target!r} names no class: {_FORMS}")
    if not isinstance(arr, jax.core.Tracer):
        check_class_indices(arr, num_classes, "target classes", "class index")
    return TargetForm("given", int(arr.shape[-1])), arr


def check_class_indices(values, num_classes: int, what: str = "labels", each: str = "labels") -> None:
    """Refuse concrete class indices that are not integers in [0, num_classes): a shifted label set
    scores 0 silently. `what` names them in the dtype error, `each` in the range error."""
    host = np.asarray(values)
    if not np.issubdtype(host.dtype, np.integer):
        raise ValueError(f"{what} must be integers; got dtype {host.dtype}")
    if host.size and (host.min() < 0 or host.max() >= num_classes):
        bad = sorted({int(v) for v in host[(host < 0) | (host >= num_classes)].ravel()})[:5]
        raise ValueError(f"{each} out of range: {bad}; the model has {num_classes} classes (0..{num_classes - 1})")


def target_form(target: Target, num_classes: int, batch: int | None = None) -> TargetForm:
    """The form of a target, checked as `make_targets` checks it (batch None: any batch)."""
    return _parse(target, num_classes, batch)[0]


def make_targets(target: Target, batch: int, num_classes: int, *, labels=None) -> Targets:
    """Parse a user's target: "top" (or "pred"), "top5", "all", an int (or its digits), a list of
    ints (same classes for every image), an array (B,) / (B, K) of per-example classes, or "gt":
    each example's label from `labels` (B,) (e.g. the ground truth). The one place a `Targets` is
    built. Concrete classes are range-checked here; traced ones (inside jit) cannot be, and an
    out-of-range one gives NaN maps (see `explain_fn`)."""
    form, arr = _parse(target, num_classes, batch)
    if form.kind == "labels":
        if labels is None:
            raise ValueError(f"target {target!r} is each example's label, and none were given: pass the labels "
                             "themselves as the target, an int array (B,)")
        labels = labels if hasattr(labels, "ndim") else np.asarray(labels)
        if labels.ndim != 1:
            raise ValueError(f"labels must hold one class per example, shape (B,); got {tuple(labels.shape)}")
        form, arr = _parse(labels, num_classes, batch)
    if form.kind == "given":
        return Targets(classes=jnp.asarray(arr, jnp.int32), kind="given", k=form.k)
    return Targets(kind=form.kind, k=form.k)
