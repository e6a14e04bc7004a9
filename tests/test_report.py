"""HTML reports: content equals `explain`, pages are self-contained and bounded, and they open in
headless Chromium without console errors; `predmaps demo` runs offline and writes one; viz helpers."""

import contextlib
import io
import re
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

import jaxvit
import predmaps
from jaxvit import ViT, ViTConfig
from jaxvit.checkpoint import param_shapes
from predmaps import cli, report, viz
from predmaps.cli import common, explain

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars", "--enable-logging=stderr",
                  "--v=0"]
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (Debian: apt-get "
                                    "install chromium; .ci/run installs it): the report is not rendered")


def render(page: Path, png: Path, size=(1280, 2400)) -> list[str]:
    """Screenshot a page with headless Chromium in a fresh profile; returns its console messages
    (console.*, uncaught exceptions, failed loads)."""
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                               f"--window-size={size[0]},{size[1]}", f"--screenshot={png}", page.resolve().as_uri()],
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [line for line in proc.stderr.splitlines()
            if re.search(r":CONSOLE|Uncaught|Failed to load resource|Not allowed to load", line)]


def assert_not_blank(png: Path):
    arr = np.asarray(Image.open(png).convert("RGB")).astype(np.int16)
    assert arr.shape[0] > 500 and arr.shape[1] > 500
    distinct = len(np.unique(arr[::4, ::4].reshape(-1, 3), axis=0))
    background = np.all(np.abs(arr - arr[-1, -1]) < 8, axis=-1).mean()
    assert distinct > 200, f"{png}: only {distinct} colours"
    assert background < 0.9, f"{png}: {100 * background:.0f}% background"


def random_params(cfg, seed=0):
    """Non-degenerate random weights without running (or compiling) `init`."""
    rng = np.random.default_rng(seed)

    def draw(path, s):
        x = rng.normal(size=s.shape).astype(np.float32)
        if len(s.shape) >= 2:
            return x * np.prod(s.shape[:-1]) ** -0.5
        return 1 + 0.1 * x if "scale" in jax.tree_util.keystr(path) else 0.1 * x

    return jax.tree_util.tree_map_with_path(draw, param_shapes(cfg))


@pytest.fixture(scope="module")
def tiny():
    cfg = ViTConfig(name="tiny-test", img_size=(32, 32), patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_dim=64,
                    num_classes=5, label_names=("ant", "bee", "cat", "dog", "eel"), crop_pct=1.0)
    return ViT(cfg), random_params(cfg)


@pytest.fixture(scope="module")
def built(tiny, tmp_path_factory):
    """Three images in batches of two (the last one padded), labels (one image has two), three
    classes each, two index pages."""
    model, params = tiny
    rng = np.random.default_rng(0)
    unit = rng.uniform(size=(3, 32, 32, 3)).astype(np.float32)
    x = (unit - 0.5) / 0.5
    names = ["a/cat 1.png", "b/dog<&>.jpg", "c/third.png"]
    labels = np.array([[1, -1], [2, 3], [4, -1]])
    batches = [report.Batch(names[:2], unit[:2], x[:2], labels[:2]), report.Batch(names[2:], unit[2:], x[2:], labels[2:])]
    results = []
    opts = report.ReportOptions(target="top3", layers=(-1,), batch_size=2, per_index_page=2, heads=2)
    out = tmp_path_factory.mktemp("report")
    rep = report.write_report(model, params, batches, out, opts, on_result=results.append)
    return model, params, x, labels, rep, results, out


def test_report_content_equals_explain(built):
    model, params, x, labels, rep, results, _ = built
    xs = [x[:2], np.concatenate([x[2:], np.zeros_like(x[2:])])]  # the report's batches: same shapes, no compiles

    def run(**kw):
        return [jax.tree_util.tree_map(np.asarray, predmaps.explain(model, params, xb, **kw)) for xb in xs]

    def at(outs, i, field):
        return getattr(outs[i // 2], field)[i % 2]

    ex_l, ex_l1 = run(method="predicatt", target="top3", layer=-1), run(method="predicatt", target="top3", layer=-2)
    raw, roll = run(method="raw_attention", target="top"), run(method="rollout", target="top")
    psi = predmaps.prediction_matrices(model, params, x)  # (B, L+1, N, C)
    out = jax.jit(model.apply)({"params": params}, x)
    assert [r.index for r in results] == [0, 1, 2]
    for i, r in enumerate(results):
        np.testing.assert_array_equal(r.classes, at(ex_l, i, "classes"))
        np.testing.assert_allclose(r.maps[("predicatt", 2)], at(ex_l, i, "maps"), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(r.maps[("predicatt", 1)], at(ex_l1, i, "maps"), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(r.agnostic["raw_attention"], at(raw, i, "maps")[0], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(r.agnostic["rollout"], at(roll, i, "maps")[0], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(r.head_weights, at(ex_l, i, "head_weights"), rtol=1e-5, atol=1e-7)
        assert r.map_class == int(at(ex_l, i, "classes")[0])
        np.testing.assert_allclose(r.layer_maps.reshape(3, -1), psi[i, :, :, r.map_class], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(r.head_attention.reshape(2, 2, -1), out.attn_cls[i, :, :, 1:], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(r.probs, jax.nn.softmax(out.logits[i]), rtol=1e-4, atol=1e-6)
        # accuracy counts a patch right when it predicts any of the image's labels
        want = np.isin(np.argmax(psi[i, -1], -1), labels[i][labels[i] >= 0]).mean()
        assert r.stats["patch_accuracy"][-1] == pytest.approx(want)
        assert r.stats["patch_entropy"].shape == (3,)
    assert len(rep.lines) == 3 and rep.lines[0].startswith("a/cat 1.png: ")


def test_report_pages_are_self_contained_and_complete(built):
    model, _, _, _, rep, results, out = built
    assert report.verify(rep.index) == []
    assert rep.index == out / "index.html"
    assert [p.name for p in rep.index_pages] == ["index.html", "index_2.html"]
    assert [p.name for p in rep.pages] == ["0000_cat_1.html", "0001_dog.html", "0002_third.html"]
    index = rep.index.read_text()
    assert "0000_cat_1.html" in index and "0001_dog.html" in index and "0002_third.html" not in index
    assert "b/dog&lt;&amp;&gt;.jpg" in index and "<&>" not in index  # names escaped
    assert "Per-layer statistics" in index and "Top-1 accuracy of the model" in index and "/3)" in index
    assert "0002_third.html" in (out / "index_2.html").read_text()
    for r, page in zip(results, rep.pages):
        text = page.read_text()
        for heading in ["Prediction</h2>", "Explanations per class", "PredicAtt<sub>L</sub>", "PredicAtt<sub>L−1</sub>",
                        "Raw attention", "Rollout", "at every layer", "Heads ranked by α̃", "most contributing",
                        "least contributing", "Per-layer statistics"]:
            assert heading in text, (page.name, heading)
        for j, c in enumerate(np.argsort(-r.probs)[:5]):  # top-5 with probabilities and names
            assert re.search(rf"<td>{j + 1}</td><td[^>]*>{model.config.class_name(c)}", text), (page.name, c)
            assert f"{100 * r.probs[c]:.1f}%" in text
        assert text.count("<img") == 1 + 3 * 2 + 2 + 3 + 3 * (1 + 2 + 2) + 1  # input, maps, layers, heads, stats
        assert "<script" not in text.lower() and "http://" not in text and "https://" not in text
        assert page.stat().st_size < 1_500_000
    first, last = rep.pages[0].read_text(), rep.pages[-1].read_text()
    assert 'href="0001_dog.html">next' in first and '<span class="off">← previous' in first
    assert 'href="index_2.html">↑ index' in last and '<span class="off">next' in last


def test_report_without_labels_options_and_errors(tiny, tmp_path):
    model, params = tiny
    x = np.zeros((1, 32, 32, 3), np.float32)
    batch = report.Batch(["z.png"], np.full((1, 32, 32, 3), 0.5), x)
    opts = report.ReportOptions(target=[3, 1], method="rollout", map_class=4, cmap="viridis", shared_scale=True,
                                alpha=0.8, batch_size=2)
    rep = report.write_report(model, params, [batch], tmp_path / "r", opts)
    text = rep.pages[0].read_text()
    assert "Per-layer statistics" not in text and "Per-layer statistics" not in rep.index.read_text()
    assert "c = eel" in text and "one scale per method" in text and "viridis" in text
    assert report.verify(rep.index) == []
    assert report.plan_columns("gradcam", [-1, -2], 12) == [("predicatt", 12), ("predicatt", 11), ("gradcam", None)]
    assert report.plan_columns("predicatt", [-1, 5], 12) == [("predicatt", 12), ("predicatt", 11), ("predicatt", 5)]
    for bad, msg in [(dict(cmap="nope"), "unknown colour map"), (dict(alpha=2.0), "opacity"),
                     (dict(layers=(9,)), "layer 9 out of range"), (dict(method="nope"), "unknown method"),
                     (dict(map_class=7), "map class 7 out of range")]:
        with pytest.raises(ValueError, match=msg):
            report.write_report(model, params, [batch], tmp_path / "bad", report.ReportOptions(**bad))


def test_overlays_of_a_size_that_is_no_patch_multiple_cover_the_seen_pixels(tmp_path):
    """36 px inputs with 8 px patches: the 4 x 4 grid covers the top-left 32 px (as so400m's 384 / 14);
    the report's results carry that extent and the PNG overlays place the maps there."""
    cfg = ViTConfig(name="tiny-36", img_size=(36, 36), patch_size=8, embed_dim=32, depth=2, num_heads=2,
                    mlp_dim=64, num_classes=5, crop_pct=1.0)
    model, params = ViT(cfg), random_params(cfg)
    unit = np.random.default_rng(0).uniform(size=(1, 36, 36, 3)).astype(np.float32)
    opts = report.ReportOptions(target="top2", layers=(-1,), batch_size=1)
    [r] = report.analyse(model, params, report.Batch(["a.png"], unit, (unit - 0.5) / 0.5), opts)
    assert r.extent == (32 / 36, 32 / 36)
    report.write_pngs(r, cfg, tmp_path, "predicatt", [-1])
    png = np.asarray(Image.open(tmp_path / f"a_predicatt_L_{cfg.class_name(r.classes[0])}.png"))
    want = viz.overlay(r.image, r.maps[("predicatt", 2)][0], extent=(32 / 36, 32 / 36))
    np.testing.assert_array_equal(png, np.asarray(want))
    assert not np.array_equal(png, np.asarray(viz.overlay(r.image, r.maps[("predicatt", 2)][0])))


def test_png_grids_wrap_at_ten_classes_and_are_skipped_past_a_hundred_overlays(tmp_path):
    # --classes all on an ImageNet model wrote one 1000-tile-wide grid PNG of 65 MB (CLI audit).
    cfg = ViTConfig(name="tiny-64", img_size=(32, 32), patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_dim=64,
                    num_classes=64, crop_pct=1.0)
    model, params = ViT(cfg), random_params(cfg)
    unit = np.random.default_rng(0).uniform(size=(1, 32, 32, 3)).astype(np.float32)
    for k, layers, grid in [(12, [-1], True), (51, [-1, -2], False)]:
        opts = report.ReportOptions(target=f"top{k}", layers=tuple(layers), batch_size=1)
        [r] = report.analyse(model, params, report.Batch([f"k{k}.png"], unit, (unit - 0.5) / 0.5), opts)
        report.write_pngs(r, cfg, tmp_path, "predicatt", layers)
        assert len(list(tmp_path.glob(f"k{k}_predicatt_L*.png"))) == k * len(layers)
        assert (tmp_path / f"k{k}_predicatt_grid.png").exists() == grid
    tile = Image.new("RGB", (32, 32))
    want = viz.grid([tile] * 12, ["x"] * 12, columns=10, cell=128).size  # two rows of at most ten
    assert Image.open(tmp_path / "k12_predicatt_grid.png").size == want


def test_verify_finds_broken_reports(tmp_path):
    good = viz.to_data_uri(Image.new("RGB", (4, 4), "red"))
    (tmp_path / "index.html").write_text(
        f'<html><body><img src="{good}"><img src="gone.png"><img src="data:image/png;base64,AAAA">'
        '<a href="p.html">p</a><a href="nowhere.html">x</a><script>1</script></body></html>')
    (tmp_path / "p.html").write_text('<html><body><img src="https://example.com/a.png"></body></html>')
    problems = report.verify(tmp_path / "index.html")
    assert any("gone.png" in p for p in problems)
    assert any("does not decode" in p for p in problems)
    assert any("nowhere.html" in p for p in problems)
    assert any("<script>" in p for p in problems)
    assert any("p.html: external reference" in p for p in problems)


@needs_chromium
def test_report_opens_in_headless_chromium(built, tmp_path):
    rep = built[4]
    for page in [rep.index, rep.pages[1]]:
        shot = tmp_path / f"{page.stem}.png"
        assert render(page, shot) == [], page.name
        assert_not_blank(shot)
    # the harness itself: a page with a script error and a console message is caught
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><h1>x</h1><script>console.error('boom'); missing_fn();</script></body></html>")
    console = render(bad, tmp_path / "bad.png", size=(600, 600))
    assert any("boom" in line for line in console) and any("Uncaught" in line for line in console)


# ---- predmaps demo: the embedded model, offline ----

@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    if not common.default_model_path().joinpath("config.json").is_file():
        pytest.fail(f"the embedded model is missing from {common.default_model_path()}")
    out = tmp_path_factory.mktemp("demo")
    stdout = io.StringIO()

    def no_network(*args, **kwargs):
        raise OSError("network access attempted during predmaps demo")

    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", no_network)
        mp.setattr(socket, "create_connection", no_network)
        rc = cli.main(["demo", "--out", str(out), "--n", "2"])
    return rc, stdout.getvalue(), out


def test_demo_runs_offline_and_writes_the_report(demo):
    rc, stdout, out = demo
    assert rc == 0, stdout
    index = out / "report" / "index.html"
    assert f"report: {index.resolve()}" in stdout
    # where it writes, said before anything is computed
    assert stdout.splitlines()[0] == f"demo: writing scenes, PNG overlays and an HTML report to {out.resolve()}"
    assert report.verify(index) == []
    pages = sorted((out / "report").glob("0*.html"))
    assert len(pages) == 2 and len(list((out / "scenes").glob("*.png"))) == 2
    text = pages[0].read_text()
    a, b = re.search(r"digits_(\d)_(\d)", pages[0].name).groups()
    assert "ground truth: " in text and "Per-layer statistics" in text
    assert f"c = {a}" in text  # the prediction map of the first digit at every layer
    assert "Top-1 accuracy of the model" in index.read_text() and "/2)" in index.read_text()
    # the first screen says what to look for and how far the embedded model was measured to be trustworthy
    first = index.read_text()
    assert first.index("What to look for") < first.index("Per-layer statistics")
    assert "How far to trust these maps: on 1000 held-out two-digit scenes" in first
    assert re.search(r"PredicAtt_L puts more of its mass on the digit of the class it explains than on the other "
                     r"digit in \d+\.\d% of cases", first)
    assert f"<span class='note'>c = {a}</span>" in first  # the thumbnail names the class it shows


def test_demo_names_the_real_photo_demo_it_did_not_run(demo):
    assert explain.REAL_PHOTOS_HINT in demo[1]


def test_demo_with_a_model_explains_the_bundled_photos_with_imagenet_names(tmp_path, capsys):
    """`predmaps demo --model CKPT`: the three bundled photos, offline, with a timm-format checkpoint
    (random weights of a 2-block vit_tiny_patch16_224, as `convert.save_timm` writes a timm export)."""
    import dataclasses

    import convert
    from jaxvit.checkpoint import param_shapes

    cfg = dataclasses.replace(jaxvit.get_config("vit_tiny_patch16_224"), depth=2)
    assert cfg.num_classes == 1000 and cfg.label_names[281] == "tabby cat"
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda s: (0.05 * rng.normal(size=s.shape)).astype(np.float32),
                                    param_shapes(cfg))
    ckpt = convert.save_timm(params, cfg, tmp_path / "ckpt")
    photos = explain.demo_photos()
    assert [p.name for p in photos] == ["cat.jpg", "coffee.jpg", "rocket.jpg"]
    assert (photos[0].parent / "LICENSE.md").is_file()
    out = tmp_path / "demo"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        rc = cli.main(["demo", "--model", str(ckpt), "--out", str(out)])
    text = capsys.readouterr()
    assert rc == 0, text.err
    index = out / "report" / "index.html"
    assert report.verify(index) == []
    pages = sorted((out / "report").glob("0*.html"))
    assert [p.name.split("_", 1)[1] for p in pages] == ["cat.html", "coffee.html", "rocket.html"]
    page = pages[0].read_text()
    assert any(f"c = {n}" in page for n in cfg.label_names), "the report names no ImageNet class"
    assert len(list(out.glob("cat_predicatt_L*.png"))) == 6  # the top 3 classes x layers L, L-1
    assert explain.REAL_PHOTOS_HINT not in text.out
    assert "How far to trust these maps: not measured for this model" in index.read_text()


@needs_chromium
def test_demo_report_opens_in_headless_chromium(demo, tmp_path):
    out = demo[2]
    page = sorted((out / "report").glob("0*.html"))[0]
    shot = tmp_path / "demo.png"
    assert render(page, shot) == []
    assert_not_blank(shot)


# ---- viz ----

def test_overlay_sizes_inputs_scale_and_upsampling():
    rng = np.random.default_rng(0)
    m = rng.normal(size=(4, 6)).astype(np.float32)
    for image in [Image.new("RGB", (90, 70), "gray"), np.zeros((70, 90, 3), np.uint8), np.full((70, 90, 3), 0.5)]:
        assert viz.overlay(image, m).size == (90, 70)
    # the numpy upsampling is predmaps.upsample's
    np.testing.assert_allclose(viz._resize_map(m, (70, 90)), predmaps.upsample(m, (70, 90)), atol=1e-5)
    big = rng.normal(size=(64, 64)).astype(np.float32)
    np.testing.assert_allclose(viz._resize_map(big, (20, 30)), predmaps.upsample(big, (20, 30)), atol=1e-4)
    # alpha: 0 is the image, 1 the heat map; a shared scale keeps a weak map cold
    img = np.full((8, 8, 3), 100, np.uint8)
    np.testing.assert_array_equal(np.asarray(viz.overlay(img, m, alpha=0.0)), img)
    weak = np.asarray(viz.overlay(img, np.full((2, 2), 0.1), alpha=1.0, vmin=0, vmax=1))
    strong = np.asarray(viz.overlay(img, np.full((2, 2), 0.9), alpha=1.0, vmin=0, vmax=1))
    assert weak[..., 2].mean() > weak[..., 0].mean() and strong[..., 0].mean() > strong[..., 2].mean()
    with pytest.raises(ValueError, match="opacity"):
        viz.overlay(img, m, alpha=1.5)
    # extent (the part of the image the grid covers): the same placement as predmaps.upsample's
    for extent in [(0.8, 0.9), 0.5]:
        np.testing.assert_allclose(viz._resize_map(m, (70, 90), extent),
                                   predmaps.upsample(m, (70, 90), extent=extent), atol=1e-5)
    hot_corner = np.zeros((4, 4), np.float32)
    hot_corner[-1, -1] = 1.0
    edge = np.asarray(viz.overlay(np.zeros((40, 40, 3), np.uint8), hot_corner, alpha=1.0, extent=0.5))
    assert (edge[20:, 20:] == edge[39, 39]).all()  # the hot cell ends at the covered part's corner and extends
    assert not (edge[15, 15] == edge[39, 39]).all()
    tiled = viz.overlay_grid(img, [m, 2 * m], ["a", "b"], columns=2, cell=16, shared_scale=True)
    assert tiled.size == (2 * 20 + 4, 16 + 14 + 8)
    assert viz.fit(Image.new("RGB", (64, 32)), 160).size == (160, 80)


def test_plots_render():
    curves = {"accuracy": {"class token": [0, 0.5, 1.0], "patch tokens": [np.nan] * 3}, "entropy": {"x": [2, 1, 0]}}
    assert viz.layer_curves(curves, title="t").size[0] > 300
    assert viz.head_weight_map(np.random.default_rng(0).uniform(size=(6, 4)), mark=[(0, 1)]).size[1] > 100
    assert viz.histogram([1, 0, 3], xlabel="block").size[0] > 100
    assert viz.cmap_css_gradient("jet").startswith("linear-gradient(to right, rgb(0,0,128) 0%")


def test_a_run_stopped_midway_still_writes_the_index_of_its_pages(tiny, tmp_path):
    """Ctrl-C (or any error) after the first batch: the exception reaches the caller, and index.html
    lists the pages already written and says the run is incomplete."""
    model, params = tiny
    unit = np.random.default_rng(0).uniform(size=(2, 32, 32, 3)).astype(np.float32)
    opts = report.ReportOptions(target="top2", layers=(-1,), batch_size=2)

    def batches(error):
        yield report.Batch(["a.png", "b.png"], unit, (unit - 0.5) / 0.5)
        raise error

    for error, said in [(KeyboardInterrupt(), "was interrupted"), (RuntimeError("disk on fire"), "disk on fire")]:
        out = tmp_path / type(error).__name__
        with pytest.raises(type(error)):
            report.write_report(model, params, batches(error), out, opts)
        index = (out / "index.html").read_text()
        assert report.verify(out / "index.html") == []
        assert "0000_a.html" in index and "0001_b.html" in index and "Incomplete" in index and said in index


def test_shared_scale_pngs_use_one_scale_over_the_methods_layers_and_classes(tmp_path):
    """--shared-scale PNGs: a value of 1 where another layer of the method reaches 100 is drawn cold,
    as on the report's pages (they were scaled per layer: both layers' peaks came out red)."""
    cfg = ViTConfig(name="tiny-test", img_size=(32, 32), patch_size=8, embed_dim=32, depth=2, num_heads=2,
                    mlp_dim=64, num_classes=5, crop_pct=1.0)
    last, before = np.zeros((2, 4, 4), np.float32), np.zeros((2, 4, 4), np.float32)
    last[:, 0, 0], before[:, 0, 0] = 1.0, 100.0
    r = report.ImageResult(index=0, name="x.png", image=np.full((32, 32, 3), 128, np.uint8), probs=np.full(5, 0.2),
                           classes=np.array([3, 1]), maps={("predicatt", 2): last, ("predicatt", 1): before},
                           agnostic={}, map_class=3, layer_maps=None, head_weights=None, head_attention=None)
    report.write_pngs(r, cfg, tmp_path, "predicatt", [-1, -2], shared_scale=True, alpha=1.0)
    for tag, m in [("L", last), ("L-1", before)]:
        png = np.asarray(Image.open(tmp_path / f"x_predicatt_{tag}_{cfg.class_name(3)}.png"))
        np.testing.assert_array_equal(png, np.asarray(viz.overlay(r.image, m[0], alpha=1.0, vmin=0, vmax=100)))


def test_colour_scale_uses_finite_values_greys_nan_and_draws_near_constant_maps_flat():
    """Colours: the scale spans the finite values only (+inf drawn at the top, NaN mid grey, not the
    lowest colour), a map constant to within float rounding is one colour, an all-NaN map warns
    nothing, and a shared scale ignores NaN whichever map comes first."""
    import warnings

    m = np.arange(16, dtype=np.float32).reshape(4, 4)
    nan, inf = m.copy(), m.copy()
    nan[0, 0], inf[0, 0] = np.nan, np.inf
    cells = np.ones((4, 4), bool)
    cells[0, 0] = False
    want = viz.colorize(m, vmin=1, vmax=15)
    got = viz.colorize(nan)
    np.testing.assert_array_equal(got[cells], want[cells])
    assert tuple(got[0, 0]) == viz.NAN_RGB
    got = viz.colorize(inf)
    np.testing.assert_array_equal(got[cells], want[cells])
    np.testing.assert_array_equal(got[0, 0], viz.colorize(m)[3, 3])  # the top colour
    flat = np.full((4, 4), 0.3, np.float32)
    flat[1, 1] = np.nextafter(np.float32(0.3), np.float32(1))
    assert len(np.unique(viz.colorize(flat).reshape(-1, 3), axis=0)) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert (viz.colorize(np.full((4, 4), np.nan, np.float32)) == viz.NAN_RGB).all()
    assert viz.finite_range([nan, m]) == viz.finite_range([m, nan]) == (0.0, 15.0)
    img = np.full((32, 32, 3), 128, np.uint8)
    for maps in ([m, nan], [nan, m]):
        tiles = viz.overlay_grid(img, maps, shared_scale=True, columns=2)
        alone = viz.overlay_grid(img, [m], shared_scale=False)
        clean = 0 if maps[0] is m else 1
        x = 4 + clean * 36
        np.testing.assert_array_equal(np.asarray(tiles)[4:36, x:x + 32], np.asarray(alone)[4:36, 4:36])


def test_the_input_caption_says_which_part_of_the_image_the_model_and_overlays_see():
    """The input's caption gives the eval transform's real geometry (the overlays cover only that):
    a centre crop of the resized image with the share of each side shown, a squash, or a border
    pad with the mean colour, with crop_pct and the filter."""
    import dataclasses

    cfg = ViTConfig(name="t", img_size=(224, 224), patch_size=16, embed_dim=32, depth=1, num_heads=2, mlp_dim=64,
                    num_classes=5, crop_pct=0.9)
    assert report.input_caption(773, 170, cfg) == (
        "model input: centre crop 224×224 of the 773×170 image resized to 1127×248, 20% of its width and 90% of its "
        f"height shown (crop_pct 0.9, {cfg.interpolation})")
    squash = report.input_caption(773, 170, dataclasses.replace(cfg, crop_mode="squash"))
    assert "773×170 image squashed to 248×248 (aspect ratio not kept), 90% of each side shown" in squash
    hf_squash = report.input_caption(773, 170, dataclasses.replace(cfg, crop_mode="hf_squash"))  # transformers'
    assert "773×170 image squashed to 249×249 (aspect ratio not kept)" in hf_squash  # round(224 / 0.9), not floor
    border = report.input_caption(773, 170, dataclasses.replace(cfg, crop_mode="border"))
    assert "resized to 248×55, cut to its centre 224×55 and padded to 224×224 with the mean colour" in border
    assert report.input_caption(224, 224, dataclasses.replace(cfg, crop_pct=1.0)).startswith(
        "model input: the 224×224 image (crop_pct 1,")
