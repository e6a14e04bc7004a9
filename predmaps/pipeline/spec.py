"""What a job explains (`ExplainSpec`: methods x layers x targets, as `Combo`s) and which model
explains it (`model_identity`), both recorded in a job's manifest.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from predmaps.request import Request


@dataclasses.dataclass(frozen=True)
class Combo:
    id: int
    method: str
    layer: int | None  # resolved 0..L; None for methods without a prediction layer
    target: str
    k: int
    request: Request  # the checked (method, layer, options, target form) that computes it

    @property
    def key(self) -> str:
        return f"{self.method}/L{self.layer}/{self.target}" if self.layer is not None else \
            f"{self.method}/{self.target}"


def _as_tuple(x, cast=str) -> tuple:
    if isinstance(x, str):
        x = [s for s in x.split(",") if s.strip()]
    elif isinstance(x, (int, np.integer)):
        x = [x]
    return tuple(cast(v.strip()) if isinstance(v, str) else cast(v) for v in x)


@dataclasses.dataclass(frozen=True)
class ExplainSpec:
    """Methods x layers x targets, and how maps are stored.

    methods: names from `predmaps.METHODS` ("predicatt", "prediction_map", "rollout", ...).
    layers: prediction layers (negative from the end); used by prediction-map methods only.
    targets: "top", "topK" (e.g. "top5"), "all", "gt" (the input's label), or a class index.
    map_dtype: "float32" or "float16" (half the disk; ~3 significant digits).
    options: method options, e.g. (("similarity", "cosine"),), each given to the methods taking it.
    Strings with commas are accepted: ExplainSpec("predicatt,rollout", "-1,-2", "top,gt").
    """

    methods: tuple[str, ...] = ("predicatt",)
    layers: tuple[int, ...] = (-1,)
    targets: tuple[str, ...] = ("top",)
    map_dtype: str = "float32"
    options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "methods", _as_tuple(self.methods))
        object.__setattr__(self, "layers", _as_tuple(self.layers, int))
        object.__setattr__(self, "targets", _as_tuple(self.targets))
        opts = self.options.items() if isinstance(self.options, dict) else self.options
        object.__setattr__(self, "options", tuple(sorted((str(k), v) for k, v in opts)))
        if self.map_dtype in ("f16", "half", "fp16"):
            object.__setattr__(self, "map_dtype", "float16")
        if self.map_dtype in ("f32", "fp32"):
            object.__setattr__(self, "map_dtype", "float32")
        if self.map_dtype not in ("float16", "float32"):
            raise ValueError(f"map_dtype must be float16 or float32; got {self.map_dtype!r}")
        if not self.methods or not self.targets or not self.layers:
            raise ValueError("an ExplainSpec needs at least one method, one layer and one target")

    @property
    def needs_labels(self) -> bool:
        return "gt" in self.targets

    def combos(self, model) -> list[Combo]:
        """Every (method, layer, target) to compute, each checked by `predmaps.request.check`.

        Layers are resolved for every method that has a prediction layer (and checked even when none
        has); options go to the methods that take them, and one taken by none is refused."""
        from predmaps import core
        from predmaps.request import check, get_method

        layers = list(dict.fromkeys(core.layer_index(l, model.config.depth) for l in self.layers))
        methods = {name: get_method(name) for name in dict.fromkeys(self.methods)}
        unknown = sorted({k for k, _ in self.options} - {k for m in methods.values() for k in m.options})
        if unknown:
            raise ValueError(f"option(s) {unknown} are taken by none of the methods {list(self.methods)}")
        out = []
        for name, m in methods.items():
            opts = {k: v for k, v in self.options if k in m.options}
            for layer in (layers if m.uses_layer else [None]):
                for t in dict.fromkeys(self.targets):
                    req = check(model, name, layer, opts, t)
                    out.append(Combo(len(out), name, req.layer, t, req.target.k, req))
        return out

    def to_dict(self, model) -> dict:
        combos = self.combos(model)
        return {"methods": list(dict.fromkeys(self.methods)),
                "layers": sorted({c.layer for c in combos if c.layer is not None}),
                "targets": list(dict.fromkeys(self.targets)), "map_dtype": self.map_dtype,
                "options": [[k, v] for k, v in self.options], "maps": [c.key for c in combos]}


def _as_spec(spec) -> ExplainSpec:
    if spec is None:
        return ExplainSpec()
    if isinstance(spec, ExplainSpec):
        return spec
    if isinstance(spec, dict):
        return ExplainSpec(**spec)
    raise TypeError(f"spec must be an ExplainSpec or a dict; got {type(spec).__name__}")


def params_fingerprint(params) -> str:
    """A hash of every leaf's path, shape and dtype and a strided sample of 256 of its values (plus
    its last 8): changes with any retraining or conversion, costs one host copy of the params."""
    import jax

    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        a = np.asarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)}:{a.shape}:{a.dtype}".encode())
        flat = a.reshape(-1)
        h.update(np.ascontiguousarray(flat[::max(1, flat.size // 256)][:256]).tobytes())
        h.update(np.ascontiguousarray(flat[-8:]).tobytes())
    return h.hexdigest()[:20]


def model_identity(model, params) -> dict:
    """What makes two models the same for a job: config JSON hash, params fingerprint, compute dtype."""
    import jax.numpy as jnp

    cfg = model.config
    return {"name": cfg.name, "config_sha256": hashlib.sha256(cfg.to_json().encode()).hexdigest(),
            "params_fingerprint": params_fingerprint(params), "dtype": jnp.dtype(model.dtype).name,
            "depth": cfg.depth, "num_classes": cfg.num_classes}
