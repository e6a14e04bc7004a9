"""The results as markdown: tables, the targets and how they read round by round, and the bounds."""

from __future__ import annotations

import statistics

from bench.models import FP8_DTYPES, HEADLINE, INTERLEAVED, METHODS, MODELS, MiB


def _fmt_ms(v):
    return "–" if v is None else (f"{v:.2f}" if v < 100 else f"{v:.0f}")


def _fmt_tput(v):
    return "–" if v is None else (f"{v:,.0f}" if v >= 100 else f"{v:.2f}")


def _fmt_mib(v):
    return "n/a" if v is None else f"{v / MiB:,.0f}" if v >= 10 * MiB else f"{v / MiB:.1f}"


STATIC_JAX_MEMORY = "JAX: XLA's static allocation plan of the executable (temp + outputs)"
MEASURED_JAX_MEMORY = "JAX peak_bytes_in_use - bytes_in_use before (fresh subprocess)"


def _mem_cell(idx, *key):
    """Memory overhead in MiB; '*' marks XLA's static plan rather than a measured peak, '≤' a
    measured reading that is only an upper bound (the device's peak did not rise during the call)."""
    r = idx.get(key)
    v = None if r is None or r.get("error") else r.get("memory_bytes")
    detail = (r or {}).get("memory_detail") or {}
    # no subprocess reading: the static plan, whatever the label (older runs labelled it measured up front)
    static = v is not None and r.get("memory_kind") in (STATIC_JAX_MEMORY, MEASURED_JAX_MEMORY) and not detail
    bound = v is not None and detail.get("exact") is False
    return ("≤" if bound else "") + _fmt_mib(v) + ("*" if static else "")


def _fmt_parity(p):
    if not p:
        return "–"
    err = p.get("rel_err")
    s = p["status"]
    if s == "ref":
        return "ref"
    if err is not None:
        s += f" {err:.1e}"
    if p.get("class_mismatch"):
        s += f" ({p['class_mismatch']} cls≠)"
    return s


METHOD_LABEL = {"forward": "forward (no explanation)", "predicatt_L": "PredicAtt_L", "predicatt_L-1": "PredicAtt_{L-1}",
                HEADLINE: "**PredicAtt_L + PredicAtt_{L-1}** (one forward)", "prediction_map": "prediction map (L)",
                "raw_attention": "raw attention", "rollout": "rollout", "gradcam": "GradCAM",
                "generic_attention": "generic attention", "transattr": "TransAttr (LRP)"}
IMPL_LABEL = {("torch", "forward"): "torch forward (fused SDPA)", ("jax", "forward"): "JAX bare forward"}


def _index(records):
    idx = {}
    for r in records:
        idx[(r["model"], r["dtype"], r["method"], r["impl"], r["batch"])] = r
    return idx


def _get(idx, *key, field="median_ms"):
    r = idx.get(key)
    return None if r is None or r.get("error") else r.get(field)


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def per_round_spread(jax_row: dict, versus_row: dict | None, batch: int, target: float) -> dict | None:
    """How a throughput target reads round by round in the interleaved timing: the versus row's time
    over JAX's in the same round (a ratio target), or JAX's images/s (an absolute one). The median of
    the rounds says where the machine usually was; the quartiles and the rounds that meet the target
    say how far a shared machine's drift moves the verdict (the spread measured: bench/NOTES.md)."""
    if not jax_row.get("interleaved") or not jax_row.get("times_ms"):
        return None
    jt = jax_row["times_ms"]
    if versus_row is None:
        values = [batch / t * 1e3 for t in jt]
    elif versus_row.get("interleaved") and len(versus_row.get("times_ms") or []) == len(jt):
        values = [v / t for v, t in zip(versus_row["times_ms"], jt)]
    else:
        return None
    # quantiles() needs two values; one round is its own median and quartiles
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return {"rounds": len(values), "median": median, "q1": q1, "q3": q3, "min": min(values), "max": max(values),
            "rounds_met": sum(v >= target for v in values)}


def target_checks(records, gpu: bool, bounds: list[dict] | None = None,
                  interleaved: list[dict] | None = None) -> list[dict]:
    """The perf-anchors targets this run can check. Throughputs at the large batch come from the
    interleaved timing of the target rows where the run has it (`source`), else from the separate
    cases. A throughput target also says where the time per call it needs stands against the run's
    measured bounds (`bench.bounds.verdict`)."""
    from bench.bounds import verdict

    idx = _index(records)
    for rec in interleaved or []:
        for row in rec.get("rows", []):
            idx[(rec["model"], rec["dtype"], row["method"], row["impl"], rec["batch"])] = dict(row, interleaved=True)
    bidx = {(b["model"], b["dtype"], b["batch"]): b for b in bounds or []}
    checks = []

    def add(what, value, target, met, mkey=None, dtype=None, batch=None, needed_tput=None, method=HEADLINE,
            versus=None):
        c = {"what": what, "value": value, "target": target, "met": met}
        if needed_tput:
            jrow = idx.get((mkey, dtype, method, "jax", batch)) or {}
            c["source"] = "interleaved timing" if jrow.get("interleaved") else "separate cases"
            vrow = (idx.get((mkey, dtype, versus[1], versus[0], batch)) or {}) if versus else None
            c["per_round"] = per_round_spread(jrow, vrow, batch, target)
            c["needed_ms"] = batch / needed_tput * 1e3
            c["bound"] = verdict(c["needed_ms"], bidx.get((mkey, dtype, batch)),
                                 _get(idx, mkey, dtype, method, "jax", batch),
                                 prediction_layers=1 if method == "predicatt_L" else 2)
        checks.append(c)

    if not gpu:
        for mkey in ("vit_s16", "vit_b16"):
            for batch in sorted({r["batch"] for r in records if r["model"] == mkey and r["batch"] > 1}):
                tj = _get(idx, mkey, "fp32", "predicatt_L", "jax", batch, field="throughput")
                tt = _get(idx, mkey, "fp32", "predicatt_L", "torch", batch, field="throughput")
                th = _get(idx, mkey, "fp32", HEADLINE, "jax", batch, field="throughput")
                if tj is None or tt is None:
                    continue
                name = MODELS[mkey][3]
                add(f"{name} fp32 b{batch}: JAX PredicAtt_L / torch PredicAtt_L throughput >= 1.25x",
                    tj / tt, 1.25, tj / tt >= 1.25, mkey, "fp32", batch, 1.25 * tt, "predicatt_L",
                    versus=("torch", "predicatt_L"))
                if th is not None:
                    add(f"{name} fp32 b{batch}: JAX PredicAtt_L+L-1 / torch PredicAtt_L throughput >= 1.25x",
                        th / tt, 1.25, th / tt >= 1.25, mkey, "fp32", batch, 1.25 * tt, versus=("torch", "predicatt_L"))
    else:
        for batch in sorted({r["batch"] for r in records if r["model"] == "vit_b16" and r["batch"] > 1}):
            th = _get(idx, "vit_b16", "bf16", HEADLINE, "jax", batch, field="throughput")
            tt = _get(idx, "vit_b16", "bf16", "predicatt_L", "torch", batch, field="throughput")
            tf = _get(idx, "vit_b16", "bf16", "forward", "torch", batch, field="throughput")
            if th is None:
                continue
            key = ("vit_b16", "bf16", batch)
            add(f"ViT-B/16 bf16 b{batch}: JAX PredicAtt_L+L-1 >= 11,000 img/s", th, 11000, th >= 11000, *key, 11000)
            if tt:
                add(f"ViT-B/16 bf16 b{batch}: vs torch PredicAtt >= 2.3x", th / tt, 2.3, th / tt >= 2.3, *key,
                    2.3 * tt, versus=("torch", "predicatt_L"))
            if tf:
                add(f"ViT-B/16 bf16 b{batch}: vs torch forward >= 1.2x", th / tf, 1.2, th / tf >= 1.2, *key, 1.2 * tf,
                    versus=("torch", "forward"))
        for dt in FP8_DTYPES:  # issue 29's fp8 target, beside bf16's
            for batch in sorted({r["batch"] for r in records if r["model"] == "vit_b16" and r["batch"] > 1}):
                th = _get(idx, "vit_b16", dt, HEADLINE, "jax", batch, field="throughput")
                if th is not None:
                    add(f"ViT-B/16 {dt} b{batch}: JAX PredicAtt_L+L-1 >= 20,000 img/s", th, 20000, th >= 20000,
                        "vit_b16", dt, batch, 20000)
        lat = _get(idx, "vit_b16", "bf16", HEADLINE, "jax", 1)
        if lat is not None:
            add("ViT-B/16 bf16 b1: JAX PredicAtt_L+L-1 latency <= 1.5 ms", lat, 1.5, lat <= 1.5)
            tl = _get(idx, "vit_b16", "bf16", "predicatt_L", "torch", 1)
            if tl:
                add("ViT-B/16 bf16 b1: torch PredicAtt latency / JAX >= 4x", tl / lat, 4, tl / lat >= 4)
    return checks


def add_missing_spreads(result: dict) -> list[str]:
    """Results written before `per_round_spread` existed keep their stored target checks (`--render`
    re-renders, it does not re-judge), but their interleaved timings are stored: give each such check
    its round-by-round spread from them. Returns the checks that got one."""
    checks = result.get("target_checks") or []
    if all("per_round" in c for c in checks):
        return []
    gpu = result["environment"].get("jax_backend") == "gpu"
    fresh = {c["what"]: c.get("per_round")
             for c in target_checks(result["records"], gpu, result.get("bounds"), result.get("interleaved"))}
    added = []
    for c in checks:
        if "per_round" not in c and fresh.get(c["what"]):
            c["per_round"] = fresh[c["what"]]
            added.append(c["what"])
    return added


def render_markdown(result: dict) -> str:
    env, records = result["environment"], result["records"]
    idx = _index(records)
    lines = [f"# predmaps benchmark: {env['device']}", ""]
    v = env["versions"]
    lines += [f"- date: {env['date']}", f"- command: `{env['command']}`",
              f"- versions: jax {v['jax']} (jaxlib {v['jaxlib']}), flax {v['flax']}, torch {v['torch']}, "
              f"timm {v['timm']}, numpy {v['numpy']}, python {v['python']}",
              f"- JAX backend: {env['jax_backend']} ({env['jax_device_kind']}); torch device: {env['torch_device']}; "
              f"torch threads: {env['threads']['torch_num_threads']}; XLA_FLAGS: `{env['threads']['XLA_FLAGS']}`",
              f"- fp32 precision: JAX {env['precision']['jax_fp32_matmul']}; torch {env['precision']['torch_fp32']}",
              f"- bf16: JAX {env['precision']['jax_bf16']}; torch {env['precision']['torch_bf16']}",
              *([f"- {env['precision']['jax_fp8']}"] if "jax_fp8" in env["precision"] and any(
                  r["dtype"] in FP8_DTYPES for r in result["records"]) else []),
              f"- weights: {env['weights']}; inputs: {env['inputs']}; targets: {env['targets']}",
              f"- timing: {env['timing']}",
              f"- memory: {result['memory_mode']}"]
    load = result.get("load")
    if load:
        lines.append(f"- load average (1/5/15 min) at start {load['start']}, at end {load['end']}, highest 1-min "
                     f"during the run {load['max_1min']} (this benchmark's own threads count in it)")
        if load.get("other_processes_cores_mean") is not None:
            lines.append(f"- other processes' CPU use during the cases (machine busy time minus this benchmark's, "
                         f"in cores): mean {load['other_processes_cores_mean']:.2f}, highest in one case "
                         f"{load['other_processes_cores_max']:.2f} (per case in results.json)")
    for note in result.get("notes", []):
        lines.append(f"- note: {note}")
    lines.append("")

    models = list(dict.fromkeys(r["model"] for r in records))
    dtypes = list(dict.fromkeys(r["dtype"] for r in records))
    methods = [m for m in METHODS if any(r["method"] == m for r in records)]

    def small(mkey):
        return min(r["batch"] for r in records if r["model"] == mkey)

    def big(mkey):
        return max(r["batch"] for r in records if r["model"] == mkey)

    lat_head = ("b1 latency" if all(small(m) == 1 for m in models)
                else "latency at the smallest batch")

    # headline
    lines += ["## Headline: PredicAtt_L + PredicAtt_{L-1} of the predicted class, both from one forward", ""]
    if result.get("interleaved"):
        lines += ["Each row from its own case; the target checks below use the round-robin timing of these rows "
                  "('Target rows, interleaved'), which shares the machine's state.", ""]
    lines += [
              f"| model | dtype | JAX L+L-1, {lat_head} | torch PredicAtt_L, {lat_head} | JAX L+L-1 throughput | "
              "torch PredicAtt_L throughput | torch forward throughput | x torch PredicAtt_L | x torch forward |",
              "|---|---|---|---|---|---|---|---|---|"]
    for mkey in models:
        nb, sb = big(mkey), small(mkey)
        for dt in dtypes:
            jl = _get(idx, mkey, dt, HEADLINE, "jax", sb)
            tl = _get(idx, mkey, dt, "predicatt_L", "torch", sb)
            jt = _get(idx, mkey, dt, HEADLINE, "jax", nb, field="throughput") if nb else None
            tt = _get(idx, mkey, dt, "predicatt_L", "torch", nb, field="throughput") if nb else None
            tf = _get(idx, mkey, dt, "forward", "torch", nb, field="throughput") if nb else None
            if jl is None and jt is None:
                continue
            r1, r2 = _ratio(jt, tt), _ratio(jt, tf)
            lines.append(f"| {MODELS[mkey][3]} | {dt} | {_fmt_ms(jl)} ms | {_fmt_ms(tl)} ms | "
                         f"{_fmt_tput(jt)} img/s (b{nb}) | {_fmt_tput(tt)} img/s | {_fmt_tput(tf)} img/s | "
                         f"{'–' if r1 is None else f'{r1:.2f}x'} | {'–' if r2 is None else f'{r2:.2f}x'} |")
    lines.append("")
    checks = result.get("target_checks") or []
    if checks:
        lines += ["## Targets (perf-anchors.md)", ""]
        for c in checks:
            spread = c.get("per_round")
            fmt = (lambda v: f"{v:,.0f}") if c["target"] >= 100 else (lambda v: f"{v:.2f}")
            lines.append(f"- {c['what']}: **{c['value']:.2f}** -> {'MET' if c['met'] else 'NOT MET'}"
                         + (f" [{c['source']}]" if c.get("source") else "")
                         + (f" [round by round: median {fmt(spread['median'])}, middle half {fmt(spread['q1'])}-"
                            f"{fmt(spread['q3'])}, {spread['rounds_met']} of {spread['rounds']} rounds meet it]"
                            if spread else "")
                         + (f" ({c['bound']})" if c.get("bound") else ""))
        lines.append("")
    inter = [r for r in result.get("interleaved") or [] if r.get("rows")]
    if inter:
        lines += ["## Target rows, interleaved", "",
                  "The rows the targets compare, timed again round-robin at the large batch (per round, each row "
                  "twice, the second call timed), so that they share the machine's state; the targets above use "
                  "these.", "",
                  "| model | dtype | batch | rounds | " + " | ".join(
                      f"{'JAX' if i == 'jax' else 'torch'} {METHOD_LABEL.get(m, m)}" for i, m in INTERLEAVED) + " |",
                  "|---|---|---|---|" + "---|" * len(INTERLEAVED)]
        for r in inter:
            by = {(row["impl"], row["method"]): row for row in r["rows"]}
            cells = [f"{by[k]['median_ms']:.4g} ms, {_fmt_tput(by[k]['throughput'])} img/s" if k in by else "–"
                     for k in INTERLEAVED]
            lines.append(f"| {r.get('model_label', r['model'])} | {r['dtype']} | {r['batch']} | {r['rounds']} | "
                         + " | ".join(cells) + " |")
        lines.append("")
    bounds = result.get("bounds") or []
    if bounds:
        lines += render_bounds(bounds, idx)

    # all rows
    lines += ["## All rows", "",
              "Latency: median ms at batch 1 (or the smallest batch run). Throughput: images/s at the large batch. Memory: overhead in MiB "
              "(peak during the call minus before it; see 'memory' above; * = XLA's static plan, ≤ = an upper bound: "
              "the device's peak was set before the call and did not rise). Parity: ||a-b||/||b|| of the maps "
              "(forward rows: logits) against the torch version's fp32 output; 'ref' = that reference itself; "
              "bf16 torch rows show their own error ('info'), which sets the JAX bf16 tolerance. "
              "JAX/torch: torch latency / JAX latency at the small batch, JAX throughput / torch throughput at the large batch, "
              "same method.", "",
              f"| model | dtype | method | impl | {lat_head} (ms) | mem at that batch (MiB) | throughput (img/s) | mem at batch "
              "(MiB) | parity | JAX/torch (b1 / large) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for mkey in models:
        nb, sb = big(mkey), small(mkey)
        for dt in dtypes:
            for method in methods:
                for impl in ("torch", "jax"):
                    r1, rn = idx.get((mkey, dt, method, impl, sb)), idx.get((mkey, dt, method, impl, nb))
                    if r1 is None and rn is None:
                        continue
                    errs = [r["error"] for r in (r1, rn) if r is not None and r.get("error")]
                    pars = [r["parity"] for r in (r1, rn) if r is not None and r.get("parity")]
                    worst = None
                    for p in pars:
                        if worst is None or p["status"] == "FAIL" or (
                                worst["status"] != "FAIL" and (p.get("rel_err") or 0) > (worst.get("rel_err") or 0)):
                            worst = p
                    speed = "–"
                    if impl == "jax":
                        a = _ratio(_get(idx, mkey, dt, method, "torch", sb), _get(idx, mkey, dt, method, "jax", sb))
                        b = _ratio(_get(idx, mkey, dt, method, "jax", nb, field="throughput"),
                                   _get(idx, mkey, dt, method, "torch", nb, field="throughput"))
                        if a is not None or b is not None:
                            speed = " / ".join("–" if x is None else f"{x:.2f}x" for x in (a, b))
                    label = IMPL_LABEL.get((impl, method), impl)
                    lines.append(
                        f"| {MODELS[mkey][3]} | {dt} | {METHOD_LABEL.get(method, method)} | {label} | "
                        f"{_fmt_ms(_get(idx, mkey, dt, method, impl, sb))} | "
                        f"{_mem_cell(idx, mkey, dt, method, impl, sb)} | "
                        f"{_fmt_tput(_get(idx, mkey, dt, method, impl, nb, field='throughput'))}"
                        f"{f' (b{nb})' if nb else ''} | "
                        f"{_mem_cell(idx, mkey, dt, method, impl, nb)} | "
                        f"{'ERROR: ' + '; '.join(errs) if errs else _fmt_parity(worst)} | {speed} |")
    lines.append("")

    # compile
    lines += ["## Compile time (JAX: trace + lower + XLA compile, s; not included in any time above; torch is eager)",
              "", "| model | dtype | method | smallest batch | large batch |", "|---|---|---|---|---|"]
    for mkey in models:
        nb, sb = big(mkey), small(mkey)
        for dt in dtypes:
            for method in methods:
                c1 = _get(idx, mkey, dt, method, "jax", sb, field="compile_s")
                cn = _get(idx, mkey, dt, method, "jax", nb, field="compile_s") if nb else None
                if c1 is None and cn is None:
                    continue
                lines.append(f"| {MODELS[mkey][3]} | {dt} | {METHOD_LABEL.get(method, method)} | "
                             f"{'–' if c1 is None else f'{c1:.1f}'} | "
                             f"{'–' if cn is None else f'{cn:.1f} (b{nb})'} |")
    lines.append("")
    if result.get("skipped_jax_methods"):
        lines.append(f"JAX methods not available in this checkout (skipped): {', '.join(result['skipped_jax_methods'])}")
        lines.append("")
    return "\n".join(lines)


def render_bounds(bounds: list[dict], idx) -> list[str]:
    burst = all("burst" in g["qkv"] for b in bounds for g in b.get("gemms", {}).values()
                if isinstance(g, dict) and "qkv" in g)
    how = ("each timed alone in bursts of back-to-back calls with one sync (as many as one call of the model "
           "makes, at least 8)" if burst else "each call timed alone and synced (this run predates the bursts: "
           "the sync adds the host's dispatch and wait to every GEMM, which overstates JAX's on GPU)")
    floor_rate = ("the best rate measured (either matmul, or any of the model's GEMMs below where one ran faster; "
                  "the source is in results.json)" if all("peak_source" in b for b in bounds) else
                  "the better of the two matmul rates (this run predates taking the model's own GEMMs into the floor)")
    lines = ["## What bounds it (bench/bounds.py)", "",
             "Measured in this run after each model's cases. Matmul rate: an n x n x n matmul, each library's "
             f"median; the compute floor is the headline's FLOPs at {floor_rate}. Dense GEMMs alone: "
             f"the model's patch embedding and qkv / proj / fc1 / fc2 (with bias) at the benchmark's shapes, {how}, "
             "summed over one call.", "",
             "| model | dtype | batch | headline GFLOP per call | matmul rate JAX / torch (TFLOP/s) | compute floor "
             "(ms per call; img/s) | dense GEMMs alone JAX / torch (ms) | JAX headline (ms) | torch forward (ms) |",
             "|---|---|---|---|---|---|---|---|---|"]

    def rate(part):
        return "–" if not part or part.get("tflops") is None else f"{part['tflops']:.3g}"

    def ms(v):
        return "–" if v is None else f"{v:.4g}"

    for b in bounds:
        key = (b["model"], b["dtype"])
        jh = _get(idx, *key, HEADLINE, "jax", b["batch"])
        tf = _get(idx, *key, "forward", "torch", b["batch"])
        floor = b.get("floor_ms")
        ceiling = "" if not floor else f"; {b['batch'] / floor * 1e3:,.0f}"
        lines.append(
            f"| {b.get('model_label', b['model'])} | {b['dtype']} | {b['batch']} | {b['flops']['total'] / 1e9:.4g} | "
            f"{rate(b['peak'].get('jax'))} / {rate(b['peak'].get('torch'))} | "
            f"{ms(floor)}{ceiling} | "
            f"{ms((b['gemms'].get('jax') or {}).get('total_ms'))} / {ms((b['gemms'].get('torch') or {}).get('total_ms'))} | "
            f"{ms(jh)} | {ms(tf)} |")
    faster = [f"- {b.get('model_label', b['model'])} {b['dtype']} b{b['batch']}: the floor's rate is {b['peak_source']}'s, "
              f"{b['peak_tflops']:.3g} TFLOP/s, faster than either matmul" for b in bounds
              if b.get("peak_source") and "matmul" not in b["peak_source"]]
    if faster:
        lines += [""] + faster
    errs = [f"{b['model']} {b['dtype']} {what} {impl}: {v['error']}" for b in bounds for what in ("peak", "gemms")
            for impl, v in b[what].items() if "error" in v]
    if errs:
        lines += [""] + [f"- not measured: {e}" for e in errs]
    lines.append("")
    return lines
