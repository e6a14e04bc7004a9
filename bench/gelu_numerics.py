"""How far tanh GELU (`jaxvit.ViT(gelu="tanh")`, issue 29) moves the maps: against exact-GELU bf16 and fp32, with
bf16 against fp32 for scale, on the benchmark's models and inputs and on the digits model predmaps ships.

    python -m bench.gelu_numerics [--models tiny,vit_s16,vit_b16] [--batch 8] [--digit-scenes 200] [--out FILE.json]

Variants: fp32 and bf16 (exact erf GELU, the defaults), "tanh" (bf16, gelu="tanh" as XLA runs it where it does
not fold the GELU into a cuBLASLt epilogue: the chain in bf16 with bf16 constants; CPU here) and "tanh_f32" (the
same model with the tanh formula evaluated in float32 and rounded once: the function change alone, and what
cuBLASLt's epilogue computes, except that it also skips the bf16 rounding of fc1's output), and "fp32_tanh" (the
float32 model with tanh GELU, which the option never computes: the approximation's own deviation, free of bf16's
rounding). Same images, classes and measures as bench.fp8_numerics (relative L2 over the batch, max deviation over
max, top-1 agreement).
"""

from __future__ import annotations

import sys
import time

PAIRS = (("tanh", "bf16"), ("tanh_f32", "bf16"), ("tanh", "fp32"), ("bf16", "fp32"), ("fp32_tanh", "fp32"))


def tanh_f32_outputs(model, params, x, classes) -> dict:
    """`outputs` of the gelu='tanh' model with its GELU in float32, rounded once (compiled afresh)."""
    import jax
    import jax.numpy as jnp

    from bench.fp8_numerics import outputs
    from jaxvit import gelu

    spelled = gelu.tanh_gelu
    jax.clear_caches()  # explain's jit would reuse the spelled model's executable (the module compares equal)
    gelu.tanh_gelu = lambda y: spelled(y.astype(jnp.float32)).astype(y.dtype)
    try:
        return outputs(model, params, x, classes)
    finally:
        gelu.tanh_gelu = spelled
        jax.clear_caches()


def fp32_tanh_outputs(model, params, x, classes) -> dict:
    """`outputs` of the float32 model with tanh GELU (`jaxvit.gelu.active` made to ignore the dtype)."""
    import jax

    from bench.fp8_numerics import outputs
    from jaxvit import gelu

    half_only = gelu.active
    jax.clear_caches()
    gelu.active = lambda name, act, dtype: half_only(name, act, "bfloat16")
    try:
        return outputs(model.clone(gelu="tanh"), params, x, classes)
    finally:
        gelu.active = half_only
        jax.clear_caches()


def case(label: str, model, params, x, labels=None) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxvit
    from bench.fp8_numerics import deviations, outputs

    p16 = jaxvit.cast_params(params, jnp.bfloat16)
    p32 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params)
    m32, m16, mt = (model.clone(dtype=jnp.float32), model.clone(dtype=jnp.bfloat16),
                    model.clone(dtype=jnp.bfloat16, gelu="tanh"))
    with jax.default_matmul_precision("highest"):
        classes = np.asarray(m32.apply({"params": p32}, x).logits).argmax(-1)  # what every variant explains
    outs = {"fp32": outputs(m32, p32, x, classes), "bf16": outputs(m16, p16, x, classes),
            "tanh": outputs(mt, p16, x, classes), "tanh_f32": tanh_f32_outputs(mt, p16, x, classes),
            "fp32_tanh": fp32_tanh_outputs(m32, p32, x, classes)}
    res = {"case": label, "images": int(x.shape[0]),
           "pairs": {f"{a} vs {b}": deviations(outs[a], outs[b]) for a, b in PAIRS}}
    if labels is not None:
        res["accuracy"] = {name: float((o["logits"].argmax(-1) == labels).mean()) for name, o in outs.items()}
    return res


def main(argv=None) -> int:
    from bench.fp8_numerics import inputs, numerics_parser, report

    args = numerics_parser("python -m bench.gelu_numerics", __doc__.split("\n\n")[0],
                           ["tiny", "vit_s16", "vit_b16"]).parse_args(argv)
    t0 = time.perf_counter()
    results = []
    for label, model, params, x, labels, _ in inputs(args):
        results.append(case(label, model, params, x, labels))
        print(f"{label}: done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    report(results, t0, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
