"""`python -m bench.probe_table PROBE.json [...]`: a probe's variants as the bench/NOTES.md lever table.

One row per variant and batch, beside the default headline of the same batch and process: median and min ms
per call, images/s, the change against the headline (negative: faster), the output's relative L2 distance from
the default's (maps from the headline's, a bare forward's logits from `forward`'s), compile seconds, and the GEMM
calls XLA made (`gemms`: cuBLAS targets and epilogues, summed; e.g. "lt 36, lt BIAS_GELU 12, lt f8 48"), so a lever's
timing is read with whether XLA did what the lever needs. Errors and skipped variants are listed, not dropped.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# short names of the GEMM custom-call targets (bench.gpu_probe.gemm_epilogues' keys)
_TARGETS = {"__cublas$lt$matmul$f8": "lt f8", "__cublas$lt$matmul": "lt", "__cublas$gemm": "gemm"}


def gemm_summary(gemms: dict) -> str:
    """'lt 24, lt BIAS_GELU 12' from {'__cublas$lt$matmul DEFAULT': 24, '__cublas$lt$matmul BIAS_GELU': 12}:
    targets shortened, DEFAULT epilogues unnamed, counts of the same short name summed; '-' for none."""
    counts: dict[str, int] = {}
    for key, n in gemms.items():
        target, _, epilogue = key.partition(" ")
        name = _TARGETS.get(target, target) + ("" if epilogue in ("", "DEFAULT") else f" {epilogue}")
        counts[name] = counts.get(name, 0) + n
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "-"


def markdown(probe: dict) -> str:
    """The lever table of one probe JSON (bench.gpu_probe's output)."""
    variants = probe.get("variants", {})
    lines = [f"{probe.get('device', '?')}, jax {probe.get('jax', '?')}, {probe.get('date', '?')}, model "
             f"{probe.get('model', '?')} {probe.get('dtype', '?')}, {probe.get('repeats', '?')} repeats",
             "", "| variant | batch | median ms | min ms | img/s | vs headline | output vs default | compile s "
             "| GEMM calls |", "|---|---|---|---|---|---|---|---|---|"]
    rows = sorted(((v.get("batch", 0), k, v) for k, v in variants.items() if "median_ms" in v),
                  key=lambda r: (-r[0], r[1] != f"headline_b{r[0]}", r[1]))
    for batch, key, v in rows:
        base = variants.get(f"headline_b{batch}", {}).get("median_ms")
        change = "-" if base is None or key == f"headline_b{batch}" else f"{100 * (v['median_ms'] / base - 1):+.1f}%"
        dev = v.get("maps_vs_headline", v.get("logits_vs_forward"))
        lines.append(f"| {key.rsplit('_b', 1)[0]} | {batch} | {v['median_ms']:.3f} | {v['min_ms']:.3f} | "
                     f"{v['img_per_s']:,.0f} | {change} | {'-' if dev is None else f'{100 * dev:.2g}%'} | "
                     f"{v.get('compile_s', float('nan')):.1f} | "
                     f"{gemm_summary(v.get('gemms') or {})} |")
    errors = [f"- {k}: {v['error']}" for k, v in variants.items() if "error" in v]
    skipped = [f"- skipped (deadline): {', '.join(probe['skipped'])}"] if probe.get("skipped") else []
    return "\n".join(lines + ([""] + errors if errors else []) + skipped)


def main(argv=None) -> int:
    paths = sys.argv[1:] if argv is None else argv
    if not paths or any(p.startswith("-") for p in paths):
        print("usage: python -m bench.probe_table PROBE.json [...]  (bench.gpu_probe's --out files)", file=sys.stderr)
        return 2
    for path in paths:
        try:
            probe = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            print(f"python -m bench.probe_table: cannot read {path} as a probe JSON: {e}", file=sys.stderr)
            return 2
        print(f"## {path}\n\n{markdown(probe)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
