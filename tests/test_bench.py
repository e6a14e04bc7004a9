"""`python -m bench --tiny`: the benchmark runs end to end, writes its table and JSON, and every row
has numbers and passes parity with the torch version."""

import json
import statistics
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("timm")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "bench", "--tiny", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_writes_markdown_and_json(tiny_run):
    out, proc = tiny_run
    md = (out / "results.md").read_text()
    res = json.loads((out / "results.json").read_text())
    assert "## Headline" in md and "## All rows" in md and "## Compile time" in md
    env = res["environment"]
    for key in ("device", "date", "versions", "precision"):
        assert env[key]
    assert {"jax", "torch", "timm", "flax"} <= set(env["versions"])
    assert "fp32" in env["precision"]["jax_fp32_matmul"] or "highest" in env["precision"]["jax_fp32_matmul"]
    assert md in proc.stdout  # the table is printed too


def test_every_row_has_numbers_and_parity(tiny_run):
    out, _ = tiny_run
    res = json.loads((out / "results.json").read_text())
    rows = res["records"]
    methods = {r["method"] for r in rows}
    assert {"forward", "predicatt_L", "predicatt_L-1", "predicatt_L+L-1", "prediction_map", "raw_attention",
            "rollout", "gradcam", "generic_attention"} <= methods
    assert {r["impl"] for r in rows} == {"jax", "torch"}
    measured_memory = res["memory_mode"] != "not measured"
    for r in rows:
        name = f"{r['impl']} {r['method']} b{r['batch']}"
        assert not r.get("error"), f"{name}: {r['error']}"
        assert r["median_ms"] > 0 and r["throughput"] > 0 and r["repeats"] >= 1, name
        if measured_memory:
            assert isinstance(r["memory_bytes"], int) and r["memory_bytes"] >= 0, name
        if r["impl"] == "jax":
            assert r["compile_s"] > 0, name
        status = r["parity"]["status"]
        if r["method"] == "transattr":  # JAX only: the torch version has no LRP
            assert status in ("n/a", "PASS"), name
        elif r["impl"] == "jax" or r["method"] == "predicatt_L+L-1":
            assert status == "PASS", f"{name}: {r['parity']}"
        else:
            assert status == "ref", name  # the torch version's own fp32 output is the reference


def test_headline_shares_the_forward(tiny_run):
    """PredicAtt at L and L-1 in one jit: XLA keeps one forward (its scratch memory stays that of one)."""
    out, _ = tiny_run
    rows = json.loads((out / "results.json").read_text())["records"]
    static = {r["method"]: r.get("xla_static_memory") for r in rows if r["impl"] == "jax"}
    one, both = static["predicatt_L"], static["predicatt_L+L-1"]
    if one is None or both is None:
        pytest.skip("this backend reports no XLA memory analysis")
    assert both["temp_bytes"] <= 1.25 * one["temp_bytes"]


def test_merge_keeps_every_row_once_and_refuses_other_devices(tiny_run, tmp_path):
    """--merge: runs of one device become one table (a row measured twice kept once, the later),
    with every command and the targets recomputed; runs of two devices are refused."""
    from bench.run import main, merge_results

    out, _ = tiny_run
    res = json.loads((out / "results.json").read_text())
    later = json.loads(json.dumps(res))
    later["environment"]["command"] = "python -m bench --again"
    later["records"][0]["median_ms"] = 123.0
    merged = merge_results([res, later])
    assert len(merged["records"]) == len(res["records"])
    assert merged["environment"]["commands"] == [res["environment"]["command"], "python -m bench --again"]
    key = ("model", "dtype", "method", "impl", "batch")
    first = tuple(res["records"][0][k] for k in key)
    assert [r["median_ms"] for r in merged["records"] if tuple(r[k] for k in key) == first] == [123.0]
    assert merged["environment"]["precision"] == res["environment"]["precision"]
    # a run with other model options (here --gelu tanh) keeps its own line beside the first run's
    later["environment"]["precision"]["jax_bf16"] += "; gelu=tanh"
    bf16 = merge_results([res, later])["environment"]["precision"]["jax_bf16"]
    assert bf16 == (f"run 1: {res['environment']['precision']['jax_bf16']} | "
                    f"run 2: {res['environment']['precision']['jax_bf16']}; gelu=tanh")
    (tmp_path / "a.json").write_text(json.dumps(res))
    (tmp_path / "b.json").write_text(json.dumps(later))
    assert main(["--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(tmp_path / "m")]) == 0
    assert "## Headline" in (tmp_path / "m" / "results.md").read_text()
    other = json.loads(json.dumps(res))
    other["environment"]["device"] = "another card"
    with pytest.raises(SystemExit, match="one device"):
        merge_results([res, other])


def test_run_measures_its_bounds(tiny_run):
    """Each model's large batch gets its bounds in the same run: both libraries' matmul rate and dense
    GEMMs alone, and the compute floor: the headline's FLOPs at the fastest of those rates. Its table
    says which rate the floor took, and a run stored before the model's GEMMs counted says so too."""
    from bench.render import render_markdown

    out, _ = tiny_run
    res = json.loads((out / "results.json").read_text())
    md = (out / "results.md").read_text()
    assert "## What bounds it" in md and "FLOPs at the best rate measured (either matmul, or any" in md
    older = json.loads(json.dumps(res))
    for b in older["bounds"]:
        del b["peak_source"]
    assert "FLOPs at the better of the two matmul rates (this run predates" in render_markdown(older)
    (b,) = res["bounds"]
    assert (b["model"], b["dtype"], b["batch"]) == ("tiny", "fp32", 2)
    for impl in ("jax", "torch"):
        assert b["peak"][impl]["tflops"] > 0, b["peak"][impl]
        gemms = b["gemms"][impl]
        assert set(gemms) == {"patch_embed", "qkv", "proj", "fc1", "fc2", "total_ms"}, gemms
        assert gemms["total_ms"] == pytest.approx(sum(v["ms"] * v["times_per_call"] for k, v in gemms.items()
                                                      if k != "total_ms"))
    rates = [b["peak"][i]["tflops"] for i in ("jax", "torch")] + [
        v["tflops"] for i in ("jax", "torch") for k, v in b["gemms"][i].items() if k != "total_ms"]
    assert b["peak_tflops"] == max(rates) and b["peak_source"].split()[0] in ("jax", "torch")
    assert b["floor_ms"] == pytest.approx(b["flops"]["total"] / b["peak_tflops"] / 1e9)


def test_the_floor_takes_the_fastest_gemm_measured_not_only_the_square_matmul():
    """A model GEMM that outruns the n^3 matmul sets the rate: the floor from the square matmul alone read
    above JAX's whole call on a 2-core AMD EPYC (ViT-B/16 b8: 1495 ms against 1484 ms)."""
    from bench.bounds import best_rate

    res = {"peak": {"jax": {"tflops": 0.191}, "torch": {"tflops": 0.185}, "torch_failed": {"error": "x"}},
           "gemms": {"jax": {"fc2": {"shape": [1576, 3072, 768], "tflops": 0.206}, "total_ms": 1336.0},
                     "torch": {"error": "OOM"}}}
    assert best_rate(res, 2048) == (0.206, "jax fc2 (1576x3072x768)")
    res["gemms"]["jax"]["fc2"]["tflops"] = 0.15
    assert best_rate(res, 2048) == (0.191, "jax 2048^3 matmul")
    assert best_rate({"peak": {}, "gemms": {}}, 2048) == (None, None)


def test_headline_flops_match_the_known_vit_b16_count():
    """ViT-B/16 at 224: 17.56 G multiply-adds per image for the forward (the usual published count),
    plus N*D*C per prediction matrix (the softmax over classes reads every logit)."""
    from bench.bounds import headline_flops
    from jaxvit import get_config

    f = headline_flops(get_config("vit_base_patch16_224"), batch=4)
    forward_macs = (f["patch_embed"] + f["dense"] + f["attention"] + f["head"]) / 2 / 4
    assert forward_macs == pytest.approx(17.56e9, rel=5e-3)
    assert f["prediction_matrices"] == 2 * 4 * 2 * 196 * 768 * 1000
    assert f["total"] == sum(v for k, v in f.items() if k != "total")


def test_bound_verdicts():
    """A target's time per call is judged against the floor first, then against JAX's GEMMs alone."""
    from bench.bounds import verdict

    bound = {"batch": 8, "floor_ms": 100.0, "gemms": {"jax": {"total_ms": 150.0}}}
    assert "out of reach for any implementation" in verdict(90.0, bound)
    assert "111% of the best matmul rate" in verdict(90.0, bound)
    assert "out of reach with the GEMMs XLA emits" in verdict(120.0, bound)
    ok = verdict(200.0, bound, jax_ms=230.0)
    assert "leaves 50 ms" in ok and "JAX spends 80 ms there now" in ok
    assert verdict(200.0, None) is None
    # PredicAtt_L computes one prediction matrix of the headline's two: its floor counts one (it was
    # judged against the headline's, e.g. 1.6% high for ViT-S/16)
    flops = {"total": 1000.0, "prediction_matrices": 100.0}
    one = verdict(90.0, dict(bound, flops=flops), prediction_layers=1)
    assert "every FLOP of the call at 106% of the best matmul rate measured here (compute floor 95 ms)" in one


def test_bounds_gemms_run_at_the_benchmarks_fp32_precision(monkeypatch):
    """With --fp32-precision tf32 the rows' JAX GEMMs run at default precision: the bounds' GEMMs must
    too (they were always 'highest'), and say which they ran at."""
    import jax.numpy as jnp

    from bench import bounds
    from jaxvit import ViTConfig

    seen = []
    real_dot = jnp.dot
    monkeypatch.setattr(jnp, "dot", lambda a, b, precision=None: seen.append(precision) or real_dot(a, b))
    cfg = ViTConfig(img_size=(32, 32), patch_size=16, embed_dim=32, depth=1, num_heads=2, mlp_dim=64, num_classes=5)
    for precision, want in (("highest", "highest"), ("tf32", None)):
        seen.clear()
        res = bounds.measure(cfg, 2, "fp32", gpu=False, torch_device=None, torch_sync=None, warmup=0, repeats=1,
                             peak_n=32, impls=("jax",), fp32_precision=precision)
        assert res["fp32_precision"] == precision and seen and set(seen) == {want}


def test_target_checks_carry_their_bound():
    from bench.render import target_checks

    def rec(method, impl, tput):
        return {"model": "vit_s16", "dtype": "fp32", "method": method, "impl": impl, "batch": 8,
                "median_ms": 8 / tput * 1e3, "throughput": tput}

    records = [rec("predicatt_L", "torch", 20.0), rec("predicatt_L", "jax", 24.0), rec("predicatt_L+L-1", "jax", 23.0)]
    bounds = [{"model": "vit_s16", "dtype": "fp32", "batch": 8, "floor_ms": 200.0,
               "gemms": {"jax": {"total_ms": 250.0}}}]
    checks = target_checks(records, gpu=False, bounds=bounds)
    assert [c["met"] for c in checks] == [False, False]
    assert checks[0]["needed_ms"] == pytest.approx(8 / 25.0 * 1e3)  # 1.25 x torch's 20 img/s
    assert "leaves 70 ms" in checks[0]["bound"]
    assert all(c.get("bound") is None for c in target_checks(records, gpu=False))


class FakeAllocator:
    """A device allocator as XLA's BFC reports it: bytes in use, and a peak that never resets."""

    def __init__(self):
        self.in_use = self.peak = 0

    def alloc(self, n):
        self.in_use += n
        self.peak = max(self.peak, self.in_use)

    def free(self, n):
        self.in_use -= n

    def stats(self):
        return {"bytes_in_use": self.in_use, "peak_bytes_in_use": self.peak}


def test_call_memory_reads_a_call_under_an_earlier_peak_exactly():
    """The first call also allocates a 300-unit workspace it frees; later calls use 12 units. The
    second call alone reads only an upper bound (the peak never rises); the balloon read is exact."""
    from bench.measure import call_memory
    from bench.models import MiB

    dev = FakeAllocator()
    dev.alloc(1000)  # weights and inputs
    calls = []

    def call():
        first = not calls
        calls.append(1)
        dev.alloc(12)
        if first:
            dev.alloc(300)
            dev.free(300)
        dev.free(12)

    held = []

    def balloon(n):
        dev.alloc(n)
        held.append(n)
        return n

    r = call_memory(dev.stats, call, balloon)
    assert r["first_call"]["overhead"] == 312 and r["first_call"]["exact"]
    assert r["second_call"]["overhead"] == 312 and not r["second_call"]["exact"]  # the bound it replaces
    assert r["overhead"] == 12 and r["exact"] and r["read"].startswith("third call")
    assert held == [312 + MiB]  # lifts bytes in use just past the first call's peak


def test_call_memory_keeps_an_exact_second_read():
    """A second call that lifts the peak by itself is read directly, without a balloon."""
    from bench.measure import call_memory

    dev = FakeAllocator()
    sizes = iter([50, 60])

    def call():
        n = next(sizes)
        dev.alloc(n)
        dev.free(n)

    r = call_memory(dev.stats, call, lambda n: pytest.fail("no balloon needed"))
    assert r["overhead"] == 60 and r["exact"] and r["read"] == "second call"


def test_run_times_the_target_rows_interleaved(tiny_run):
    """At the large batch the rows the targets compare are timed again round-robin, so their ratios
    come from the same machine state."""
    out, _ = tiny_run
    res = json.loads((out / "results.json").read_text())
    (rec,) = res["interleaved"]
    assert (rec["model"], rec["batch"]) == ("tiny", 2) and not rec.get("error")
    rows = {(r["impl"], r["method"]) for r in rec["rows"]}
    assert rows == {("torch", "forward"), ("torch", "predicatt_L"), ("jax", "predicatt_L"), ("jax", "predicatt_L+L-1")}
    assert all(r["repeats"] == rec["rounds"] and r["median_ms"] > 0 for r in rec["rows"])
    assert "## Target rows, interleaved" in (out / "results.md").read_text()


def test_target_checks_prefer_the_interleaved_timing():
    from bench.render import target_checks

    def rec(method, impl, tput):
        return {"model": "vit_b16", "dtype": "fp32", "method": method, "impl": impl, "batch": 8,
                "median_ms": 8 / tput * 1e3, "throughput": tput}

    records = [rec("predicatt_L", "torch", 8.0), rec("predicatt_L", "jax", 6.0)]
    inter = [{"model": "vit_b16", "dtype": "fp32", "batch": 8, "rounds": 3,
              "rows": [dict(rec("predicatt_L", "torch", 7.0), repeats=3), dict(rec("predicatt_L", "jax", 7.7), repeats=3)]}]
    (plain,) = target_checks(records, gpu=False)
    (paired,) = target_checks(records, gpu=False, interleaved=inter)
    assert plain["value"] == pytest.approx(0.75) and plain["source"] == "separate cases"
    assert paired["value"] == pytest.approx(1.1) and paired["source"] == "interleaved timing"


def test_target_checks_say_how_the_rounds_spread():
    """On a shared VM one run's median ratio can land either side of a target: each throughput check
    from interleaved timing also gives the per-round ratio (the versus row's time over JAX's in the same
    round) or JAX's per-round img/s, its quartiles and how many rounds meet the target."""
    from bench.models import HEADLINE
    from bench.render import render_markdown, target_checks

    def row(method, impl, times):
        return {"impl": impl, "method": method, "median_ms": statistics.median(times), "repeats": len(times),
                "throughput": 8 / statistics.median(times) * 1e3, "times_ms": times}

    def case(model, dtype, batch, method, impl):
        return {"model": model, "dtype": dtype, "method": method, "impl": impl, "batch": batch, "median_ms": 400.0,
                "throughput": batch / 0.4}

    plain = [case("vit_s16", "fp32", 8, "predicatt_L", i) for i in ("torch", "jax")]
    torch_t, jax_t = [500.0, 520, 480, 600, 500], [400.0, 400, 400, 400, 500]  # ratios 1.25 1.3 1.2 1.5 1.0
    inter = [{"model": "vit_s16", "dtype": "fp32", "batch": 8, "rounds": 5,
              "rows": [row("predicatt_L", "torch", torch_t), row("predicatt_L", "jax", jax_t)]}]
    (check,) = target_checks(plain, gpu=False, interleaved=inter)
    spread = check["per_round"]
    assert spread["rounds"] == 5 and spread["rounds_met"] == 3
    assert (spread["min"], spread["q1"], spread["median"], spread["q3"], spread["max"]) == pytest.approx(
        (1.0, 1.2, 1.25, 1.3, 1.5))
    gpu_inter = [{"model": "vit_b16", "dtype": "bf16", "batch": 256, "rounds": 3,
                  "rows": [row("predicatt_L", "torch", [60.0, 60, 60]), row("forward", "torch", [30.0, 30, 30]),
                           row(HEADLINE, "jax", [23.0, 24, 22])]}]
    gpu_plain = [case("vit_b16", "bf16", 256, m, i) for m, i in (("predicatt_L", "torch"), ("forward", "torch"),
                                                                  (HEADLINE, "jax"))]
    gpu = {c["what"]: c["per_round"] for c in target_checks(gpu_plain, gpu=True, interleaved=gpu_inter)}
    absolute = gpu["ViT-B/16 bf16 b256: JAX PredicAtt_L+L-1 >= 11,000 img/s"]
    assert absolute["median"] == pytest.approx(256 / 23 * 1e3) and absolute["rounds_met"] == 2
    assert gpu["ViT-B/16 bf16 b256: vs torch forward >= 1.2x"]["median"] == pytest.approx(30 / 23)
    (separate,) = target_checks(plain, gpu=False)
    assert separate["per_round"] is None
    res = _results()
    res["target_checks"] = [check]
    assert "[round by round: median 1.25, middle half 1.20-1.30, 3 of 5 rounds meet it]" in render_markdown(res)


def test_render_gives_stored_checks_their_spread_and_keeps_their_verdicts(tmp_path, capsys):
    """--render of a results.json written before the spread existed: each interleaved check gets its
    round-by-round spread from the stored timings; its stored value, verdict and bound stay as written,
    and a check from separate cases gets none."""
    from bench.run import main

    def row(method, impl, times):
        return {"impl": impl, "method": method, "median_ms": statistics.median(times), "repeats": len(times),
                "throughput": 8 / statistics.median(times) * 1e3, "times_ms": times}

    res = _results()
    res["records"] = [{"model": m, "dtype": "fp32", "method": "predicatt_L", "impl": i, "batch": 8,
                       "median_ms": 400.0, "throughput": 20.0} for m in ("vit_s16", "vit_b16") for i in ("torch", "jax")]
    res["interleaved"] = [{"model": "vit_s16", "dtype": "fp32", "batch": 8, "rounds": 4,
                           "rows": [row("predicatt_L", "torch", [500.0, 520, 480, 600]),
                                    row("predicatt_L", "jax", [400.0, 400, 400, 400])]}]
    what_s = "ViT-S/16 fp32 b8: JAX PredicAtt_L / torch PredicAtt_L throughput >= 1.25x"
    what_b = "ViT-B/16 fp32 b8: JAX PredicAtt_L / torch PredicAtt_L throughput >= 1.25x"
    res["target_checks"] = [  # as an older run stored them: no per_round, its own bound text
        {"what": what_s, "value": 1.27, "target": 1.25, "met": True, "source": "interleaved timing",
         "needed_ms": 406.0, "bound": "as stored"},
        {"what": what_b, "value": 1.0, "target": 1.25, "met": False, "source": "separate cases"}]
    path = tmp_path / "results.json"
    path.write_text(json.dumps(res))
    assert main(["--render", str(path)]) == 0
    assert "round-by-round spread added to 1 stored target check(s)" in capsys.readouterr().err
    stored = {c["what"]: c for c in json.loads(path.read_text())["target_checks"]}
    s, b = stored[what_s], stored[what_b]
    assert (s["value"], s["met"], s["bound"]) == (1.27, True, "as stored")
    assert s["per_round"]["rounds"] == 4 and s["per_round"]["rounds_met"] == 3  # 1.25 1.3 1.2 1.5
    assert s["per_round"]["median"] == pytest.approx(1.275)
    assert b.get("per_round") is None
    md = (tmp_path / "results.md").read_text()
    assert "**1.27** -> MET [interleaved timing] [round by round: median 1.27" in md and "3 of 4 rounds" in md
    assert md.count("round by round") == 1


def test_probe_flag_sets_replace_the_cli_defaults():
    """A probe flag set replaces a same-named flag already in XLA_FLAGS (last word wins, once)."""
    from bench.gpu_probe import merge_xla_flags

    merged = merge_xla_flags("--xla_gpu_enable_triton_gemm=false --xla_dump_to=/tmp/d",
                             "--xla_gpu_enable_triton_gemm=true --xla_gpu_enable_cublaslt=true")
    assert merged.split() == ["--xla_dump_to=/tmp/d", "--xla_gpu_enable_triton_gemm=true",
                              "--xla_gpu_enable_cublaslt=true"]
    assert merge_xla_flags("", "--a=1") == "--a=1"


def test_best_flag_set_needs_a_margin_at_the_largest_batch():
    """The GPU session re-times the table under a flag set only when its headline beat the baseline
    by the margin at the largest batch; batch-1 wins, other variants and failed sets do not count."""
    from bench.gpu_probe import best_flag_set

    def run(batch, ms):
        return {"batch": batch, "median_ms": ms}

    probe = {"variants": {"headline_b256": run(256, 25.0), "headline_b1": run(1, 1.2),
                          "forward_b256": run(256, 20.0)},
             "flag_sets": {
                 "--a=1": {"headline_b256": run(256, 24.8), "headline_b1": run(1, 0.5), "XLA_FLAGS": "--a=1"},
                 "--b=1": {"headline_b256": run(256, 23.0), "XLA_FLAGS": "--x=0 --b=1"},
                 "--c=1": {"headline_b256": run(256, 22.0), "headline_ln_twopass_b256": run(256, 21.0),
                           "XLA_FLAGS": "--c=1"},
                 "--d=1": {"error": "rc 1", "XLA_FLAGS": "--d=1"}}}
    assert best_flag_set(probe) == "--c=1"
    assert best_flag_set(probe, margin=0.15) is None
    del probe["flag_sets"]["--c=1"]
    assert best_flag_set(probe) == "--x=0 --b=1"  # the set's full XLA_FLAGS, as its subprocess ran
    assert best_flag_set({"variants": {}, "flag_sets": probe["flag_sets"]}) is None


def test_best_kernels_needs_a_margin_at_the_largest_batch():
    """The GPU session re-times the table with ViT(kernels=...) only when a headline_pallas* variant beat
    the headline by the margin at the largest batch, and with the tiles the probe tuned."""
    from bench.gpu_probe import best_kernels

    def run(batch, ms):
        return {"batch": batch, "median_ms": ms}

    probe = {"variants": {"headline_b256": run(256, 23.0), "headline_b1": run(1, 1.3),
                          "headline_pallas_b256": run(256, 22.0), "headline_pallas_b1": run(1, 0.9),
                          "headline_pallas_mlp_b256": run(256, 21.5), "headline_pallas_layernorm_b256": {"error": "x"}},
             "kernels": {"tiles": "layer_norm=8,4;dense=128,256,64,8,3"}}
    assert best_kernels(probe) == ("pallas_mlp", "layer_norm=8,4;dense=128,256,64,8,3")
    assert best_kernels(probe, margin=0.07) is None  # 21.5 ms is 6.5% under 23.0
    del probe["variants"]["headline_pallas_mlp_b256"]
    assert best_kernels(probe) == ("pallas", "layer_norm=8,4;dense=128,256,64,8,3")
    probe["variants"]["headline_pallas_b256"] = run(256, 22.8)  # under 2%: not worth a table run
    assert best_kernels(probe) is None
    assert best_kernels({"variants": {}}) is None


@pytest.mark.slow
def test_probe_times_variants_under_a_flag_set(tmp_path):
    """`python -m bench.gpu_probe` on CPU: the variants, then each flag set's variants in a subprocess
    whose XLA_FLAGS carry the set instead of the CLI default it overrides; the trace at --profile-batch."""
    out = tmp_path / "probe.json"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu_probe", "--model", "tiny", "--batches", "2,1", "--variants",
         "headline,headline_ln_twopass,headline_pallas", "--b1-variants", "headline,headline_gelu_tanh_cublaslt", "--repeats", "2", "--warmup", "1",
         "--xla-flags-sets=--xla_gpu_enable_triton_gemm=true", "--flag-set-variants", "headline,headline_ln_twopass",
         "--profile", "--profile-batch", "1", "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert {"headline_b2", "headline_ln_twopass_b2", "headline_pallas_b2", "headline_b1"} <= set(res["variants"])
    for v in res["variants"].values():
        assert v["median_ms"] > 0
    # a variant with its own XLA options compiles with them (a GPU option is a no-op on CPU: no cuBLAS calls)
    lt = res["variants"]["headline_gelu_tanh_cublaslt_b1"]
    assert lt["compile_options"] == {"xla_gpu_enable_cublaslt": True} and lt["gemms"] == {}
    assert res["variants"]["headline_b1"]["compile_options"] is None
    # each variant's output against the default's: the same function, so within bf16-vs-bf16 rounding
    assert res["variants"]["headline_ln_twopass_b2"]["maps_vs_headline"] < 5e-2
    # the trace at the batch asked for (here the smaller one), with the default headline
    assert (res["profile"]["batch"], res["profile"]["variant"]) == (1, "headline") and res["profile"]["lines"]
    # a headline_pallas* variant tunes the kernels' tiles first (on CPU: the XLA reference of each)
    from jaxvit.kernels import Tiles

    kern = res["kernels"]
    Tiles.parse(kern["tiles"])
    assert all("ms" in kern[kind]["xla"] for kind in ("layer_norm", "dense", "head"))
    timed = [e for kind in ("layer_norm", "dense", "head") for k, e in kern[kind].items()
             if k != "xla" and isinstance(e, dict) and "ms" in e]
    assert timed and all(e["ok"] for e in timed)
    (flags, entry), = res["flag_sets"].items()
    assert flags == "--xla_gpu_enable_triton_gemm=true"
    assert "error" not in entry, entry
    assert entry["XLA_FLAGS"].split().count("--xla_gpu_enable_triton_gemm=true") == 1
    assert "--xla_gpu_enable_triton_gemm=false" not in entry["XLA_FLAGS"]
    assert entry["headline_ln_twopass_b2"]["median_ms"] > 0 and entry["headline_b1"]["median_ms"] > 0
    # the flag set's run warms up as the parent does (it used to take its own default, 3)
    child = json.loads((tmp_path / "probe_flags0.json").read_text())
    assert (child["warmup"], child["repeats"]) == (1, 2) and res["fp32_matmul_precision"] is None


def test_probe_reads_gemm_epilogues_from_optimised_hlo():
    """Custom-call lines as XLA:GPU prints them (gemm_rewriter_test.cc's expectations): counted by target and
    epilogue; other custom calls and ops are not GEMMs."""
    from bench.gpu_probe import gemm_epilogues

    text = "\n".join([
        '  %cublas-lt-matmul.1 = (bf16[394,3072]{1,0}, s8[4194304]{0}) custom-call(%p0, %p1, %b), '
        'custom_call_target="__cublas$lt$matmul", backend_config={"operation_queue_id":"0","gemm_backend_config":'
        '{"alpha_real":1,"beta":0,"epilogue":"BIAS_GELU","grad_x":false}}',
        '  %cublas-lt-matmul.2 = (bf16[394,768]{1,0}, s8[0]{0}) custom-call(%a, %w, %c), '
        'custom_call_target="__cublas$lt$matmul", backend_config={"gemm_backend_config":{"beta":1,"epilogue":"BIAS"}}',
        '  %cublas-gemm.3 = (bf16[394,768]{1,0}, s8[0]{0}) custom-call(%a, %w), custom_call_target="__cublas$gemm", '
        'backend_config={"gemm_backend_config":{"beta":0,"epilogue":"DEFAULT"}}',
        '  %fmha = (bf16[2,12,197,64]{3,2,1,0}) custom-call(%q, %k, %v), custom_call_target="__cudnn$fmhaSoftmax"',
        '  %add.4 = bf16[394,768]{1,0} add(%x, %y)'])
    assert gemm_epilogues(text) == {"__cublas$lt$matmul BIAS_GELU": 1, "__cublas$lt$matmul BIAS": 1,
                                    "__cublas$gemm DEFAULT": 1}
    assert gemm_epilogues("") == {}


def test_gpu_session_names_only_what_its_tools_know():
    """bench/gpu_session.sh runs on a lent GPU, minutes at a time, and no CI runs it there: a typo in a probe variant,
    a bench dtype or method or a numerics layout would cost a session. Every name it passes is known to the tool
    it passes it to (read from the tools' own argument types), and bash parses the script."""
    import argparse
    import re

    from bench.fp8_numerics import _layout_choices
    from bench.gpu_probe import _variants_arg
    from bench.run import build_parser

    path = REPO / "bench" / "gpu_session.sh"
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    text = path.read_text()
    for var in ("PALLAS", "MOSAIC"):
        text = text.replace(f"${var}", re.search(rf"^{var}=(\S+)", text, re.M).group(1))
    variants = re.findall(r"--(?:b1-|flag-set-)?variants[ =](\S+)", text) + re.findall(r"--profile-variant (\S+)", text)
    assert len(variants) >= 10 and "headline_ln_fold" in ",".join(variants) and "headline_mosaic_mlp," in ",".join(variants)
    for names in variants:
        _variants_arg(names)  # raises argparse.ArgumentTypeError naming an unknown variant
    parser = build_parser()
    types = {a.dest: a.type for a in parser._actions if a.dest in ("dtypes", "methods", "memory_check")}
    for flag, dest in (("--dtypes", "dtypes"), ("--methods", "methods"), ("--memory-check", "memory_check")):
        values = re.findall(rf"{flag} (\S+)", text)
        assert values, flag
        for value in values:
            try:
                types[dest](value)
            except argparse.ArgumentTypeError as e:
                raise AssertionError(f"gpu_session.sh: {flag} {value}: {e}") from None
    for value in re.findall(r"--layouts (\S+)", text):
        assert set(value.split(",")) <= set(_layout_choices()), value


def test_probe_table_reads_each_variant_against_its_batchs_headline():
    """bench.probe_table: one row per variant and batch, largest batch first, headline first within it; the
    change is against the same batch's headline (19 vs 20 ms: -5.0%), and so is the output (maps 1.2% from the
    headline's, '-' where not compared); GEMM calls summed by short target name with DEFAULT epilogues unnamed; an
    errored variant and the deadline's skips are listed."""
    from bench.probe_table import gemm_summary, markdown

    row = lambda batch, ms, gemms=None: {"batch": batch, "median_ms": ms, "min_ms": ms - 1, "img_per_s": batch / ms * 1e3,
                                         "compile_s": 2.0, "gemms": gemms or {}}
    probe = {"device": "H100", "jax": "0.11.2", "variants": {
        "headline_b1": row(1, 1.4), "headline_gelu_tanh_cublaslt_b256": dict(row(256, 19.0, {
            "__cublas$lt$matmul DEFAULT": 24, "__cublas$lt$matmul BIAS": 12, "__cublas$lt$matmul BIAS_GELU": 12}),
            maps_vs_headline=0.0123),
        "headline_b256": row(256, 20.0), "headline_materialized_b1": row(1, 1.05),
        "headline_fp8_b256": {"error": "XlaRuntimeError: no fp8"}}, "skipped": ["headline_no_graphs_b1"]}
    text = markdown(probe)
    table = [ln for ln in text.splitlines() if ln.startswith("| headline")]
    assert [ln.split(" | ")[0:2] for ln in table] == [["| headline", "256"], ["| headline_gelu_tanh_cublaslt", "256"],
                                                      ["| headline", "1"], ["| headline_materialized", "1"]]
    assert " | -5.0% | 1.2% | " in table[1] and " | -25.0% | - | " in table[3]
    assert table[0].split(" | ")[5:7] == ["-", "-"]
    assert "lt 24, lt BIAS 12, lt BIAS_GELU 12" in table[1]
    assert "- headline_fp8_b256: XlaRuntimeError: no fp8" in text and "skipped (deadline): headline_no_graphs_b1" in text
    assert gemm_summary({"__cublas$lt$matmul$f8 DEFAULT": 36, "__cublas$lt$matmul$f8": 12}) == "lt f8 48"
    assert gemm_summary({}) == "-"


def test_probe_compares_each_variants_output_with_the_defaults():
    """bench.gpu_probe.output_deviation: `headline` and `forward` set the batch's references; a later variant gets
    its maps' (or logits') relative L2 distance from them; nothing where there is no reference of that shape."""
    import numpy as np

    from bench.gpu_probe import output_deviation

    refs, maps = {}, np.ones((2, 2, 4, 4))
    assert output_deviation("headline", {"maps": maps, "classes": np.zeros(2)}, refs) == {}
    assert output_deviation("forward", {"logits": np.ones((2, 10))}, refs) == {}
    got = output_deviation("headline_stack", {"maps": maps * 1.01}, refs)
    assert got.keys() == {"maps_vs_headline"} and abs(got["maps_vs_headline"] - 0.01) < 1e-12
    assert output_deviation("forward_scan", {"logits": np.zeros((2, 10))}, refs) == {"logits_vs_forward": 1.0}
    assert output_deviation("headline_x", {"maps": np.ones((3, 2, 4, 4))}, refs) == {}


def test_probe_scanned_forward_equals_the_unrolled_one():
    """The probe's `forward_scan` variant (blocks under lax.scan over stacked parameters) computes the
    same logits as the model's unrolled forward: same ops per block, so equal to float32 rounding."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from bench.probe_variants import build_variant, config_for, jaxvit_model, random_params

    cfg = config_for("tiny")
    params32 = random_params(jaxvit_model(cfg), cfg.img_size[0])
    x = jax.random.normal(jax.random.key(5), (3,) + cfg.img_size + (3,))
    logits = {}
    for name in ("forward", "forward_scan"):
        fn, params, ctx = build_variant(name, cfg, jnp.float32, params32)
        with ctx():
            logits[name] = np.asarray(fn(params, x)["logits"])
    assert logits["forward"].shape == (3, cfg.num_classes)
    np.testing.assert_allclose(logits["forward_scan"], logits["forward"], rtol=1e-6, atol=1e-6)


def test_probe_ln_fold_variant_is_the_same_function():
    """The probe's headline_ln_fold (norm2 folded into fc1: the GEMM on the raw residual stream, LayerNorm's
    statistics applied to its output) is the model's function: in float32 its maps equal the headline's to float32
    rounding (1e-6 of the maps' max; a fold without the mean term or the shift is off by 1.5e-3 / 2.4e-3 of it), and
    jaxvit's LayerNorm and Mlp are themselves again after the variant's context."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxvit.model as jm
    from bench.probe_variants import build_variant, config_for, jaxvit_model, random_params

    cfg = config_for("tiny")
    params32 = random_params(jaxvit_model(cfg), cfg.img_size[0])
    x = jax.random.normal(jax.random.key(5), (4,) + cfg.img_size + (3,))
    before = (jm.LayerNorm.__call__, jm.Mlp.__call__)
    maps = {}
    for name in ("headline", "headline_ln_fold"):
        fn, params, ctx = build_variant(name, cfg, jnp.float32, params32)
        with ctx():
            maps[name] = np.asarray(fn(params, x)["maps"])
    assert (jm.LayerNorm.__call__, jm.Mlp.__call__) == before
    assert "kernel_folded" in params["blocks_1"]["mlp"]["fc1"]
    np.testing.assert_allclose(maps["headline_ln_fold"], maps["headline"], rtol=1e-6, atol=1e-6 * np.abs(maps["headline"]).max())


def test_probe_fp8_variants_load_as_the_benchmark_rows():
    """The probe's fp8 variants run ViT(gemm=...) on the benchmark's fp8 params: e4m3 weights and calibrated
    input scales for exactly the layout's GEMMs (fp8_mlp: fc1, fc2 of every block), tanh GELU where named;
    their maps stay within the benchmark's fp8 parity tolerance of the bf16 headline (a broken path: ~1.0).
    A float32 probe refuses them (fp8 acts in half precision only)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from bench.probe_variants import build_variant, config_for, jaxvit_model, random_params
    from bench.models import FP8_TOL

    cfg = config_for("tiny")
    params32 = random_params(jaxvit_model(cfg), cfg.img_size[0])
    x = jax.random.normal(jax.random.key(5), (4,) + cfg.img_size + (3,))
    fn, params, _ = build_variant("headline", cfg, jnp.bfloat16, params32)
    want = np.asarray(fn(params, x)["maps"], np.float32)
    for name, layers, gelu in (("headline_fp8_mlp", {"fc1", "fc2"}, "erf"),
                               ("headline_fp8_gelu_tanh", {"qkv", "proj", "fc1", "fc2"}, "tanh")):
        fn, params, _ = build_variant(name, cfg, jnp.bfloat16, params32)
        stored = {(blk, layer) for blk in params if blk.startswith("blocks_") for part in params[blk].values()
                  for layer, leaves in part.items() if isinstance(leaves, dict) and "kernel_e4m3" in leaves
                  and "input_scale" in leaves}
        assert stored == {(f"blocks_{i}", layer) for i in range(cfg.depth) for layer in layers}, name
        got = np.asarray(fn(params, x)["maps"], np.float32)
        assert 0 < np.linalg.norm(got - want) / np.linalg.norm(want) < FP8_TOL, name
    with pytest.raises(ValueError, match="the fp8 variants need --dtype bf16"):
        build_variant("headline_fp8", cfg, jnp.float32, params32)


def test_probe_stack_variants_combine_the_levers_they_name():
    """The probe's stacks run the levers together with what each does alone: headline_stack = tanh GELU + the
    Pallas LayerNorm and normaliser at their tuned tiles (+ cuBLASLt), headline_fp8_stack the same with fp8
    GEMMs on the benchmark's fp8 params, headline_materialized_all_triton = materialised attention (+ the
    all-Triton flag). Their maps stay within the benchmark's parity tolerance of the bf16 headline (bf16's 5e-2;
    fp8's 0.15), so a stack that lost a lever's correctness would not be timed as a win. headline_mosaic_stack is
    the exact-GELU stack: all three Pallas kernels, fc1 + GELU as bench/mosaic_mlp.py's (its reference off a GPU;
    tests/test_mosaic_mlp.py runs the kernel itself)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from bench.models import BF16_TOL, FP8_TOL
    from bench.probe_variants import (COMPILE_OPTIONS, STACK_TILES, build_variant, config_for, jaxvit_model,
                                      random_params, variant_options)
    from jaxvit.kernels import Tiles

    stack = variant_options("headline_stack")
    assert (stack["gelu"], stack["kernels"], stack["gemm"], stack["kernel_tiles"]) == \
        ("tanh", "pallas_layernorm_head", "dtype", Tiles.parse(STACK_TILES))
    assert variant_options("headline_fp8_stack") == dict(stack, gemm="fp8")
    assert variant_options("headline_materialized_all_triton") == dict(variant_options("headline"),
                                                                       attention="materialized")
    assert COMPILE_OPTIONS["headline_stack"] == {"xla_gpu_enable_cublaslt": True}
    assert COMPILE_OPTIONS["headline_materialized_all_triton"] == {"xla_gpu_experimental_all_fusions_with_triton": True}

    cfg = config_for("tiny")
    params32 = random_params(jaxvit_model(cfg), cfg.img_size[0])
    x = jax.random.normal(jax.random.key(5), (4,) + cfg.img_size + (3,))
    fn, params, _ = build_variant("headline", cfg, jnp.bfloat16, params32)
    want = np.asarray(fn(params, x)["maps"], np.float32)
    assert variant_options("headline_mosaic_stack") == dict(stack, gelu="erf", kernels="pallas")
    for name, tol in (("headline_stack", BF16_TOL), ("headline_fp8_stack", FP8_TOL),
                      ("headline_materialized_all_triton", BF16_TOL), ("headline_mosaic_stack", BF16_TOL)):
        fn, params, ctx = build_variant(name, cfg, jnp.bfloat16, params32)
        assert ("kernel_e4m3" in params["blocks_0"]["mlp"]["fc1"]) == (name == "headline_fp8_stack"), name
        with ctx():
            got = np.asarray(fn(params, x)["maps"], np.float32)
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < tol, name


# -- bad input: a one-line error naming the problem, exit status 2 (argparse's), no traceback; no benchmark runs


def _results(device="test cpu"):
    """The smallest results.json that `python -m bench` renders and merges."""
    env = {"device": device, "date": "2024-01-01T00:00:00+00:00", "command": "python -m bench --tiny",
           "jax_backend": "cpu", "jax_device_kind": "cpu", "torch_device": "cpu",
           "versions": {k: "0" for k in ("python", "jax", "jaxlib", "flax", "torch", "timm", "numpy")},
           "threads": {"torch_num_threads": 1, "XLA_FLAGS": ""},
           "precision": {k: "x" for k in ("jax_fp32_matmul", "torch_fp32", "jax_bf16", "torch_bf16")},
           "weights": "w", "inputs": "i", "targets": "t", "timing": "t"}
    return {"environment": env, "memory_mode": "not measured", "records": [], "notes": [], "target_checks": []}


def _bench_fails(argv, capsys) -> str:
    from bench.run import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert "Traceback" not in err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("python -m bench: error:")]
    return line


@pytest.mark.parametrize("argv, message", [
    (["--tiny", "--batch", "x"], "argument --batch: takes comma-separated positive batch sizes like 1,8; got 'x'"),
    (["--batch", "0,8"], "positive batch sizes"),
    (["--models", "vit_h14"], "unknown model 'vit_h14'; choose from vit_s16"),
    (["--models", ","], "give at least one model"),
    (["--methods", "lrp"], "unknown method 'lrp'; choose from forward"),
    (["--dtypes", "fp16"], "unknown dtype 'fp16'; choose from fp32, bf16"),
    (["--impls", "cuda"], "unknown impl 'cuda'; choose from torch, jax"),
    (["--repeats", "0"], "argument --repeats: expected a positive integer; got '0'"),
    (["--large-repeats", "many"], "argument --large-repeats: expected a positive integer"),
    (["--warmup", "-1"], "argument --warmup: expected an integer >= 0"),
    (["--fp32-precision", "fp64"], "argument --fp32-precision: invalid choice"),
    (["--memory", "vram"], "argument --memory: invalid choice"),
    (["--device-label", "../x"], "argument --device-label: takes a folder name without path separators"),
    (["--wait-quiet", "nan"], "argument --wait-quiet: takes a number of cores >= 0"),
    (["--wait-quiet-max", "-5"], "argument --wait-quiet-max: takes a number of seconds >= 0"),
    (["--bf16-weights", "fp8"], "argument --bf16-weights: invalid choice"),
    (["--kernels", "cuda"], "argument --kernels: invalid choice"),
    (["--gelu", "quick"], "argument --gelu: invalid choice"),
    (["--gelu", "tanh", "--kernels", "pallas"], "--gelu tanh with --kernels pallas: gelu='tanh' computes fc1's GELU"),
    (["--dtypes", "bf16,fp8", "--kernels", "pallas_mlp"], "the fp8 rows quantise fc1, which that kernel set runs as"),
    (["--kernel-tiles", "dense=a"], "argument --kernel-tiles: kernel tiles 'dense=a': dense takes up to"),
    (["--memory-check", "lrp"], "unknown method 'lrp'; choose from forward"),
    (["--deadline", "soon"], "argument --deadline: takes a number of seconds"),
    (["--seed", "1.5"], "argument --seed: takes an integer"),
    (["--render", "/nonexistent/results.json"], "cannot read /nonexistent/results.json: No such file or directory"),
    (["--merge", "/nonexistent/results.json", "--out", "/nonexistent/m"], "argument --merge: cannot read"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
])
def test_bad_arguments_fail_at_parse_time(argv, message, capsys):
    assert message in _bench_fails(argv, capsys)


def test_bad_results_files_are_named(tmp_path, capsys):
    """--render and --merge read their files at parse time: missing, unreadable, not JSON or not a
    results.json each stop the run with the file's name; --merge needs --out and runs of one device."""
    files = {"broken.json": "{", "list.json": "[1, 2]", "shape.json": '{"environment": {}}',
             "binary.json": b"\xff\xfe\x00"}
    for name, text in files.items():
        (tmp_path / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    assert "broken.json is not JSON" in _bench_fails(["--render", str(tmp_path / "broken.json")], capsys)
    assert "binary.json is not JSON" in _bench_fails(["--render", str(tmp_path / "binary.json")], capsys)
    assert "list.json is not a results.json of python -m bench: holds a JSON list" in _bench_fails(
        ["--render", str(tmp_path / "list.json")], capsys)
    assert "shape.json is not a results.json of python -m bench: has no 'records' list" in _bench_fails(
        ["--merge", str(tmp_path / "shape.json"), "--out", str(tmp_path / "m")], capsys)
    assert f"cannot read {tmp_path}: Is a directory" in _bench_fails(["--render", str(tmp_path)], capsys)
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_results("card A")))
    b.write_text(json.dumps(_results("card B")))
    assert "--merge needs --out DIR" in _bench_fails(["--merge", str(a)], capsys)
    line = _bench_fails(["--merge", str(a), str(b), "--out", str(tmp_path / "m")], capsys)
    assert "--merge takes runs on one device" in line and str(b) in line
    assert "not allowed with argument" in _bench_fails(["--render", str(a), "--merge", str(b)], capsys)
    (tmp_path / "file").write_text("")
    assert "is a file, not a folder" in _bench_fails(["--merge", str(a), "--out", str(tmp_path / "file")], capsys)
    assert not (tmp_path / "m").exists()


def test_render_and_merge_of_good_files_still_work(tmp_path, capsys):
    from bench.run import main

    a = tmp_path / "a" / "results.json"
    a.parent.mkdir()
    a.write_text(json.dumps(_results()))
    assert main(["--render", str(a), "--note", "re-rendered"]) == 0
    assert json.loads(a.read_text())["notes"] == ["re-rendered"]
    assert "re-rendered" in (tmp_path / "a" / "results.md").read_text()
    assert main(["--merge", str(a), str(a), "--out", str(tmp_path / "m")]) == 0
    assert "# predmaps benchmark: test cpu" in (tmp_path / "m" / "results.md").read_text()


def test_device_memory_needs_a_gpu(tmp_path, capsys):
    """--memory device on a CPU backend would label GPU statistics it cannot read: refused before any case."""
    import jax

    if jax.default_backend() == "gpu":
        pytest.skip("a GPU backend reads device memory")
    line = _bench_fails(["--memory", "device", "--out", str(tmp_path / "o")], capsys)
    assert "--memory device reads GPU memory statistics" in line and "--memory rss" in line
    assert not (tmp_path / "o").exists()


def test_rss_memory_where_it_cannot_be_read_is_refused(tmp_path, capsys, monkeypatch):
    """--memory rss where /proc does not let the process reset its peak resident set was silently
    'not measured'; asked for by name it is refused before any case (auto still falls back to off)."""
    from bench import run

    monkeypatch.setattr(run, "rss_supported", lambda: False)
    line = _bench_fails(["--memory", "rss", "--out", str(tmp_path / "o")], capsys)
    assert "--memory rss resets and reads this process's peak resident set" in line and "--memory off" in line
    assert not (tmp_path / "o").exists()
    assert "--_memory-child takes the JSON case spec" in _bench_fails(["--_memory-child", "{"], capsys)


@pytest.mark.parametrize("argv, message", [
    (["--batches", "256,x"], "argument --batches: takes comma-separated positive batch sizes"),
    (["--variants", "headline,warp"], "argument --variants: unknown variant 'warp'; choose from headline"),
    (["--b1-variants", "nope"], "argument --b1-variants: unknown variant 'nope'"),
    (["--flag-set-variants", "nope"], "argument --flag-set-variants: unknown variant 'nope'"),
    (["--repeats", "0"], "argument --repeats: expected a positive integer; got '0'"),
    (["--warmup", "-1"], "argument --warmup: expected an integer >= 0"),
    (["--matmul-n", "big"], "argument --matmul-n: expected a positive integer"),
    (["--deadline", "soon"], "argument --deadline: takes a number of seconds"),
    (["--kernel-tiles", "dense=a"], "argument --kernel-tiles: kernel tiles 'dense=a'"),
    (["--model", "vit_h14"], "argument --model: invalid choice"),
    (["--profile", "--profile-batch", "8", "--batches", "256,1"], "--profile-batch 8 is not one of --batches 256,1"),
    (["--profile-batch", "0"], "argument --profile-batch: expected a positive integer"),
])
def test_gpu_probe_bad_arguments_fail_at_parse_time(argv, message, tmp_path, capsys):
    """The GPU probe runs inside a device session's few minutes: a bad option stops it at once with
    the option named (unknown variants used to stop it after JAX started; a bad batch list, repeats
    of 0 or an unwritable --out crashed it with a traceback, the last after its first measurement)."""
    from bench.gpu_probe import main

    with pytest.raises(SystemExit) as exc:
        main(argv + ["--out", str(tmp_path / "p.json")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert message in err, err


def test_gpu_probe_out_must_be_a_writable_file_path(tmp_path, capsys):
    from bench.gpu_probe import main

    for out, message in ((tmp_path, "takes a JSON file path; got a folder"),
                         (tmp_path / "missing" / "p.json", "missing is not a folder; create it first")):
        with pytest.raises(SystemExit) as exc:
            main(["--out", str(out)])
        assert exc.value.code == 2 and message in capsys.readouterr().err


def test_profile_summary_reads_xla_ops_on_a_cpu_backend(tmp_path):
    """A CPU trace has no device plane (the summary was empty there): the host threads' events that carry
    an XLA op are summed instead, and Python and thread-pool bookkeeping are left out."""
    import jax
    import jax.numpy as jnp

    from bench.gpu_probe import profile_summary

    if jax.default_backend() != "cpu":
        pytest.skip("the device plane is read on accelerators")
    fn = jax.jit(lambda a: jnp.tanh(a @ a) @ a)
    res = profile_summary(fn, (jnp.ones((256, 256)),), 2, str(tmp_path / "trace"))
    assert "error" not in res and "/host:CPU" in res["planes"]
    assert res["lines"] and all(k.startswith("/host:CPU | ") for k in res["lines"])
    assert res["top_ops"] and sum(v["ms_per_call"] for v in res["by_kind"].values()) > 0
    assert not any("Pjit" in o["op"] or "Threadpool" in o["op"] for o in res["top_ops"]), res["top_ops"]


def test_jax_memory_without_the_subprocess_reading_is_marked_static():
    """A JAX row's memory is XLA's static plan until the memory check's subprocess measures it; a
    run stopped before that check (--deadline, or killed) used to show the plan under the measured
    label, unmarked. It now carries the static label, and renders with '*' whatever the label."""
    from bench import render

    key = ("vit_b16", "jax", "bf16", "predicatt_L", 256)
    plan = {"memory_bytes": 123 << 20, "memory_kind": render.MEASURED_JAX_MEMORY}
    assert render._mem_cell({key: plan}, *key) == "123*"
    assert render._mem_cell({key: dict(plan, memory_kind=render.STATIC_JAX_MEMORY)}, *key) == "123*"
    measured = dict(plan, memory_detail={"overhead": 123 << 20, "exact": True})
    assert render._mem_cell({key: measured}, *key) == "123"
    torch_row = {"memory_bytes": 123 << 20, "memory_kind": "torch.cuda max_memory_allocated - memory_allocated before"}
    assert render._mem_cell({key: torch_row}, *key) == "123"


def test_fp8_rows_load_e4m3_weights_and_calibrated_scales_unless_fp32_weights():
    """bf16_weights='cast' (the default) gives an fp8 row the stored e4m3 weights and input scales of its layout's
    GEMMs only (fp8_mlp: fc1, fc2); 'fp32' leaves the params as the bf16 row's fp32 ones (scales per call)."""
    import jax.numpy as jnp

    from bench.models import build_timm, load_jax

    tmodel, _ = build_timm("tiny", 0)
    model, params = load_jax(tmodel, "fp8_mlp")
    assert model.gemm == "fp8_mlp" and model.dtype == jnp.bfloat16
    for blk in ("blocks_0", "blocks_1"):
        fc1 = params[blk]["mlp"]["fc1"]
        assert fc1["kernel_e4m3"].dtype == jnp.float8_e4m3fn and fc1["input_scale"] > 0
        assert "input_scale" in params[blk]["mlp"]["fc2"] and "kernel_e4m3" not in params[blk]["attn"]["qkv"]
    _, per_call = load_jax(tmodel, "fp8_mlp", "fp32")
    assert set(per_call["blocks_0"]["mlp"]["fc1"]) == {"kernel", "bias"}


def test_gelu_tanh_rows_load_the_approximation_and_keep_bf16_parity():
    """--gelu tanh gives the bf16 and fp8 rows jaxvit.ViT(gelu="tanh") (fp8: calibrated through it), whose logits
    stay within the bf16 rows' tolerance of timm's fp32 model (the approximation moves them ~1e-4, bf16 ~1e-2);
    the default rows keep exact GELU."""
    import jax.numpy as jnp
    import numpy as np
    import torch

    from bench.models import BF16_TOL, build_timm, load_jax, make_images

    tmodel, size = build_timm("tiny", 0)
    x = make_images(4, size)
    with torch.no_grad():
        want = tmodel(torch.from_numpy(x)).numpy()
    model, params = load_jax(tmodel, "bf16", gelu="tanh")
    assert (model.gelu, model.dtype) == ("tanh", jnp.bfloat16) and load_jax(tmodel, "bf16")[0].gelu == "erf"
    got = np.asarray(model.apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1))).logits, np.float32)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < BF16_TOL
    fp8_model, fp8_params = load_jax(tmodel, "fp8_mlp", gelu="tanh")
    assert (fp8_model.gelu, fp8_model.gemm) == ("tanh", "fp8_mlp") and "input_scale" in fp8_params["blocks_0"]["mlp"]["fc1"]


def test_fp8_rows_are_held_to_the_fp8_tolerance():
    """An fp8 row's maps pass within FP8_TOL of the fp32 reference and fail beyond it; bf16's tighter
    tolerance would fail the same maps (the two are told apart)."""
    import numpy as np

    from bench.measure import parity
    from bench.models import FP8_DTYPES, FP8_TOL

    ref = {"maps": np.ones((2, 1, 4)), "classes": np.zeros((2, 1), int)}
    for dtype in FP8_DTYPES:
        for factor, want in ((0.9, "PASS"), (1.1, "FAIL")):
            got = {"maps": ref["maps"] * (1 + factor * FP8_TOL), "classes": ref["classes"]}
            res = parity(got, ref, dtype, "highest")
            assert (res["status"], res["tol"]) == (want, FP8_TOL), (dtype, factor, res)
    assert parity({"maps": ref["maps"] * (1 + 0.9 * FP8_TOL), "classes": ref["classes"]}, ref, "bf16",
                  "highest")["status"] == "FAIL"
