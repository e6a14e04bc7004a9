"""The device step: the whole explanation of one global batch as one AOT-compiled program.

Devices: one `jax.jit`, compiled ahead of time, over a 1-D mesh ("batch") of every device of
every process: images, labels and a validity mask `NamedSharding(mesh, P("batch"))`, params
replicated. The global batch is rounded up to a multiple of the device count (`explain_dataset`
first caps it at what a shard holds: a batch never spans two); a partial batch is zero-padded
and its padding rows masked out.
"""

from __future__ import annotations

import functools
import time

import numpy as np

from predmaps.pipeline.spec import Combo, ExplainSpec


class StepCompileError(RuntimeError):
    """XLA could not compile the explanation step (most often: too little device memory for the batch)."""


@functools.lru_cache(maxsize=16)
def _step_fn(model, combos: tuple, map_dtype: str, mesh):
    """The jitted step for (model, combos (each with its checked request), storage dtype, mesh); cached
    so that runs of the same job in one process (a resume, a test) reuse the compiled program."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from predmaps.explain import request_fn
    from predmaps.targets import make_targets

    num_classes = model.config.num_classes
    dtype = jnp.dtype(map_dtype)
    fns = {(c.method, c.layer): request_fn(model, c.request) for c in combos}

    def step(params, images, labels, mask, stop):
        out, logits = {}, None
        for c in combos:
            targets = make_targets(c.target, labels.shape[0], num_classes, labels=labels)  # 'gt': traced labels
            ex = fns[(c.method, c.layer)](params, images, targets)
            out[f"maps_{c.id}"] = jnp.where(mask[:, None, None, None], ex.maps, 0).astype(dtype)
            out[f"classes_{c.id}"] = ex.classes.astype(jnp.int32)
            logits = ex.logits if logits is None else logits
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        pred = jnp.argmax(probs, axis=-1)
        out["pred"] = pred.astype(jnp.int32)
        out["score"] = jnp.take_along_axis(probs, pred[:, None], axis=1)[:, 0]
        out["stop"] = stop  # replicated: every process learns, at the same step, which processes stop
        return out

    data, rep = NamedSharding(mesh, P("batch")), NamedSharding(mesh, P())
    outs = {"pred": data, "score": data, "stop": rep,
            **{f"{kind}_{c.id}": data for c in combos for kind in ("maps", "classes")}}
    return jax.jit(step, in_shardings=(rep, data, data, data, data), out_shardings=outs)


class _Engine:
    """The whole explanation of one global batch as one AOT-compiled, batch-sharded program."""

    def __init__(self, model, params, spec: ExplainSpec, combos: list[Combo], batch_size: int, devices=None):
        import jax
        import jax.numpy as jnp
        from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

        self.nproc = jax.process_count()
        if devices is None:
            devices = jax.devices()
        elif self.nproc > 1:
            raise ValueError("devices= is for single-process runs; a multi-process run uses every device")
        devices = list(devices)
        n_dev = len(devices)
        if n_dev % self.nproc or jax.local_device_count() * self.nproc != jax.device_count():
            raise ValueError(f"every process needs the same number of devices; {n_dev} devices, {self.nproc} processes")
        if batch_size < 1:
            raise ValueError(f"batch size must be positive; got {batch_size}")
        self.devices = devices
        self.global_batch = -(-batch_size // n_dev) * n_dev
        self.local_batch = self.global_batch // self.nproc
        self.mesh = jax.make_mesh((n_dev,), ("batch",), axis_types=(AxisType.Auto,), devices=devices)
        self.data = NamedSharding(self.mesh, P("batch"))
        rep = NamedSharding(self.mesh, P())
        cfg = model.config
        self.image_shape = (cfg.img_size[0], cfg.img_size[1], cfg.in_chans)

        def replicate(a):
            host = np.asarray(a)
            return jax.make_array_from_callback(host.shape, rep, lambda idx: host[idx])

        if jnp.dtype(model.dtype).itemsize < 4:  # same outputs, no per-step weight conversion
            from jaxvit.model import cast_params

            params = cast_params(params, model.dtype)
        self.params = jax.tree_util.tree_map(replicate, params)
        jitted = _step_fn(model, tuple(combos), spec.map_dtype, self.mesh)
        gb = self.global_batch

        def sds(shape, dtype):
            return jax.ShapeDtypeStruct(shape, dtype, sharding=self.data)

        self._lowered = lambda: jitted.lower(self.params, sds((gb, *self.image_shape), jnp.float32),
                                             sds((gb,), jnp.int32), sds((gb,), jnp.bool_), sds((gb,), jnp.int32))
        self.compiled = None
        self.compile_s = 0.0

    def compile(self):
        import jax

        t0 = time.perf_counter()
        try:
            self.compiled = self._lowered().compile()
        except jax.errors.JaxRuntimeError as e:
            hint = ("; a smaller batch size (--batch-size) needs less device memory"
                    if "RESOURCE_EXHAUSTED" in str(e) else "")
            raise StepCompileError(f"compiling the explanation step for a global batch of {self.global_batch} "
                                   f"failed: {e}{hint}") from e
        self.compile_s = time.perf_counter() - t0

    def dispatch(self, images: np.ndarray, labels: np.ndarray, mask: np.ndarray, stop: int = 0):
        """Start one step on this process's rows (local batch); returns the (async) global outputs.
        stop: 0, or this process's index + 1 to tell every process that it stops (`stopped`)."""
        import jax

        if self.compiled is None:
            self.compile()
        gb = self.global_batch
        put = lambda x: jax.make_array_from_process_local_data(self.data, x, (gb, *x.shape[1:]))  # noqa: E731
        return self.compiled(self.params, put(images), put(labels), put(mask),
                             put(np.full((self.local_batch,), stop, np.int32)))

    def fetch(self, out) -> dict[str, np.ndarray]:
        """This process's rows of a step's outputs, as numpy (blocks until the step is done)."""
        import jax

        rows = {k: v for k, v in out.items() if k != "stop"}
        if self.nproc == 1:
            return {k: np.asarray(v) for k, v in rows.items()}
        from jax.experimental import multihost_utils
        from jax.sharding import PartitionSpec as P

        local = multihost_utils.global_array_to_host_local_array(rows, self.mesh, P("batch"))
        return {k: np.asarray(v) for k, v in local.items()}

    @staticmethod
    def stopped(out) -> list[int]:
        """The processes that flagged a step as their last (blocks until the step is done)."""
        return sorted(int(v) - 1 for v in set(np.asarray(out["stop"]).tolist()) if v)
