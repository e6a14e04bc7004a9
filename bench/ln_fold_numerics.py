"""`python -m bench.ln_fold_numerics`: what folding norm2 into fc1 would cost in bf16 (issue 29's LayerNorm lever).

LN(x) W + b = rstd * (x W') - rstd * mu * 1^T W' + (beta W + b), with W' = diag(gamma) W: the GEMM reads the raw
residual stream and a per-row epilogue (rstd, mu) replaces LayerNorm's apply pass. cuBLASLt epilogues take a
per-column bias only, so through XLA the per-row part is an elementwise pass on fc1's output, which the GELU pass
can absorb; the question this measures is whether fc1's output can stay bf16 when x W' (large: x has the row's
mean in it) is rounded before the mean is taken back out.

For each block's fc1 of a float32 model's forward: rel. L2 error against the float32 pre-activation of
  bf16      what the bf16 model computes: LN in float32 rounded to bf16, bf16 GEMM, float32 accumulation, bf16 out
  fold_bf16 the fold with the GEMM's output in bf16, the epilogue in float32
  fold_f32  the fold with the GEMM's output in float32 (twice the bytes of fc1's output written and read)
and, for the maps (PredicAtt_L + PredicAtt_{L-1} of the predicted class, the probe's headline), rel. L2 of the bf16
headline and of the probe's bf16 `headline_ln_fold` (fold_bf16 as XLA would run it) against the float32 headline.
"""

from __future__ import annotations

import sys
import time

LAYERS = ("bf16", "fold_bf16", "fold_f32")


def fc1_errors(model, params, x) -> list[dict]:
    """Per block: {variant: rel. L2 error of fc1's pre-activation} and |mean| / std of the rows of its input."""
    import jax.numpy as jnp

    from jaxvit.model import INTERMEDIATES

    _, state = model.apply({"params": params}, x, mutable=[INTERMEDIATES])
    inter, eps = state[INTERMEDIATES], model.config.norm_eps
    bf = lambda a: a.astype(jnp.bfloat16)
    out = []
    for i in range(model.config.depth):
        blk = params[f"blocks_{i}"]
        mid = inter[f"blocks_{i}"]["mid"][0].astype(jnp.float32)
        gamma, beta = blk["norm2"]["scale"], blk["norm2"]["bias"]
        w, b = blk["mlp"]["fc1"]["kernel"], blk["mlp"]["fc1"]["bias"]
        mu = mid.mean(-1, keepdims=True)
        rstd = 1 / jnp.sqrt(((mid - mu) ** 2).mean(-1, keepdims=True) + eps)
        ln = (mid - mu) * rstd * gamma + beta
        exact = ln @ w + b
        std_bf16 = jnp.matmul(bf(ln), bf(w), preferred_element_type=jnp.float32)
        w_fold = bf(gamma[:, None] * w)
        xw = jnp.matmul(bf(mid), w_fold, preferred_element_type=jnp.float32)
        colsum = w_fold.astype(jnp.float32).sum(0)
        shift = beta @ w + b
        fold = lambda y: rstd * (y - mu * colsum) + shift
        err = lambda y: float(jnp.linalg.norm(y - exact) / jnp.linalg.norm(exact))
        out.append({"block": i, "bf16": err(bf(std_bf16 + b).astype(jnp.float32)),
                    "fold_bf16": err(fold(bf(xw).astype(jnp.float32))), "fold_f32": err(fold(xw)),
                    "mean_over_std": float(jnp.median(jnp.abs(mu) * rstd))})
    return out


def maps_errors(model, params, x) -> dict:
    """{variant: rel. L2 of its bf16 maps from the float32 headline's}: the probe's headline and headline_ln_fold."""
    import jax.numpy as jnp
    import numpy as np

    from bench.probe_variants import build_variant

    def maps(name, dtype):
        fn, p, ctx = build_variant(name, model.config, dtype, params)
        with ctx():
            return np.asarray(fn(p, x)["maps"], np.float32)

    want = maps("headline", jnp.float32)
    return {name: float(np.linalg.norm(maps(name, jnp.bfloat16) - want) / np.linalg.norm(want))
            for name in ("headline", "headline_ln_fold")}


def main(argv=None) -> int:
    from bench.fp8_numerics import inputs, numerics_parser

    args = numerics_parser("python -m bench.ln_fold_numerics", __doc__.split("\n\n")[0],
                           ["tiny", "vit_s16", "vit_b16"]).parse_args(argv)
    t0 = time.perf_counter()
    cases = [(label, fc1_errors(model, params, x), maps_errors(model, params, x))
             for label, model, params, x, _, _ in inputs(args)]
    print("| case | block | bf16 | fold_bf16 | fold_f32 | median |mean|/std of fc1's input rows |")
    print("|---|---|---|---|---|---|")
    for label, rows, _ in cases:
        for r in rows:
            print(f"| {label} | {r['block']} | " + " | ".join(f"{r[k]:.2e}" for k in LAYERS)
                  + f" | {r['mean_over_std']:.3f} |")
    print("\n| case | maps: bf16 headline vs fp32 | bf16 headline_ln_fold vs fp32 |\n|---|---|---|")
    for label, _, m in cases:
        print(f"| {label} | {m['headline']:.2e} | {m['headline_ln_fold']:.2e} |")
    print(f"\n({time.perf_counter() - t0:.0f} s)")
    if args.out:
        import json
        from pathlib import Path

        Path(args.out).write_text(json.dumps([{"case": c, "fc1": rows, "maps": m} for c, rows, m in cases], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
