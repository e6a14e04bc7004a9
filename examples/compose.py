"""Composing `explain_fn` with vmap, jit on a sharded batch, and shard_map.

    python examples/compose.py

On a CPU the script asks XLA for 4 simulated devices (set before JAX starts); on GPUs or TPUs it uses
the real ones. `predmaps.explain` is already jitted; `explain_fn` is the pure function to put inside
your own transformations (jax.grad through the maps works too).
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")  # CPU only; before jax

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import convert  # noqa: E402
import predmaps  # noqa: E402
from predmaps import digits  # noqa: E402


def main() -> None:
    model, params = convert.load(digits.ASSET_DIR)
    n_dev = len(jax.devices())
    images, labels, _ = digits.two_digit_scenes(2 * n_dev, "test", seed=1)
    x = jnp.asarray(digits.normalize(images))
    reference = predmaps.explain(model, params, x, target="top").maps

    fn = predmaps.explain_fn(model, method="predicatt", layer=-1)
    top = predmaps.make_targets("top", x.shape[0], model.config.num_classes)

    # 1. vmap: one image at a time under vmap (a batch of 1 inside), here over the batch axis.
    one = predmaps.make_targets("top", 1, model.config.num_classes)
    vmapped = jax.jit(jax.vmap(lambda im: fn(params, im[None], one).maps[0]))(x)

    # 2. jit on a sharded batch: put the batch across devices, replicate the params; XLA partitions the rest.
    mesh = Mesh(np.array(jax.devices()), ("data",))
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    ps = jax.device_put(params, NamedSharding(mesh, P()))
    sharded = jax.jit(lambda p, im: fn(p, im, top).maps)(ps, xs)

    # 3. shard_map: each device explains its own slice; targets are made for the per-device batch.
    local = predmaps.make_targets("top", x.shape[0] // n_dev, model.config.num_classes)
    per_device = jax.jit(jax.shard_map(lambda p, im: fn(p, im, local).maps, mesh=mesh,
                                       in_specs=(P(), P("data")), out_specs=P("data")))(ps, xs)

    for name, maps in [("vmap", vmapped), ("sharded jit", sharded), ("shard_map", per_device)]:
        err = float(jnp.abs(maps - reference).max() / jnp.abs(reference).max())
        print(f"{name:12s} maps {tuple(maps.shape)} on {len(maps.sharding.device_set)} device(s), "
              f"max relative difference to predmaps.explain {err:.1e}")
        assert err < 1e-5, name


if __name__ == "__main__":
    main()
