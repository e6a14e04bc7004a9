"""The predmaps command line: explain writes overlays and the HTML report, skips unreadable images;
labels; errors; viz helpers. (`predmaps demo` is tested with the reports, in test_report.py.)"""

import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

import jaxvit
from jaxvit import ViTConfig
from jaxvit.checkpoint import param_shapes
from predmaps import cli, report, viz
from predmaps.cli import common, explain


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    cfg = ViTConfig(name="tiny-test", img_size=(32, 32), patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_dim=64,
                    num_classes=5, label_names=("ant", "bee", "cat", "dog", "eel"), crop_pct=1.0)
    rng = np.random.default_rng(0)  # random weights without running (and compiling) init

    def draw(path, s):
        x = rng.normal(size=s.shape).astype(np.float32)
        if len(s.shape) >= 2:
            return x * np.prod(s.shape[:-1]) ** -0.5
        return 1 + 0.1 * x if "scale" in jax.tree_util.keystr(path) else 0.1 * x

    params = jax.tree_util.tree_map_with_path(draw, param_shapes(cfg))
    return jaxvit.save(tmp_path_factory.mktemp("ckpt") / "tiny", cfg, params)


def test_explain_writes_overlays_and_skips_bad_files(tiny_checkpoint, tmp_path, capsys):
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(good)
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    out = tmp_path / "out"
    rc = cli.main(["explain", str(good), str(bad), "--model", str(tiny_checkpoint), "--classes", "top3",
                   "--layers", "-1,-2", "--out", str(out), "--labels", "1+2,3+4", "--cmap", "magma", "--alpha", "0.7",
                   "--shared-scale", "--map-class", "2"])
    assert rc == 0
    text = capsys.readouterr()
    assert "bad.jpg" in text.err and "skipped" in text.err
    assert "good.png:" in text.out and "1 skipped" in text.out
    index = out / "report" / "index.html"
    assert f"report: {index.resolve()}" in text.out
    assert report.verify(index) == []
    page = (out / "report" / "0000_good.html").read_text()
    assert "magma" in page and "opacity 0.7" in page and "one scale per method" in page and "c = cat" in page
    assert re.search(r"ground truth: bee <span class='note'>\(1\)</span>, cat <span class='note'>\(2\)</span>", page)
    assert "Per-layer statistics" in page
    # the 50x40 image goes to 40x32 and is cropped to the model's 32x32: the overlays cover only that
    assert "model input: centre crop 32×32 of the 50×40 image resized to 40×32, 80% of its width shown" in page
    assert not list((out / "report").glob("*bad*"))
    pngs = sorted(p.name for p in out.glob("good_predicatt_L*.png"))
    assert len(pngs) == 6  # 3 classes x 2 layers
    assert {n.split("_")[2] for n in pngs} == {"L", "L-1"}  # layers -1, -2 named as the paper does
    assert Image.open(out / pngs[0]).size == (32, 32)  # the model's input after the eval transform
    assert (out / "good_predicatt_grid.png").exists()
    assert cli.main(["explain", str(good), str(bad), "--model", str(tiny_checkpoint), "--out", str(out),
                     "--strict"]) == 1


def test_explain_errors(tiny_checkpoint, tmp_path, capsys):
    good = tmp_path / "g.png"
    Image.new("RGB", (32, 32), "red").save(good)
    assert cli.main(["explain", str(good), "--model", str(tiny_checkpoint), "--layers", "7", "--out",
                     str(tmp_path / "o")]) == 2
    assert "layer 7 out of range" in capsys.readouterr().err
    assert cli.main(["explain", str(tmp_path / "missing.png"), "--model", str(tiny_checkpoint), "--out",
                     str(tmp_path / "o")]) == 2
    assert "no readable image" in capsys.readouterr().err
    assert cli.main(["explain", str(good), "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "error:" in capsys.readouterr().err
    assert cli.main(["explain", str(good), "--model", str(tiny_checkpoint), "--labels", "1,2", "--out",
                     str(tmp_path / "o")]) == 2
    assert "2 label(s) for 1 image(s)" in capsys.readouterr().err
    assert cli.main(["explain", str(good), "--model", str(tiny_checkpoint), "--labels", "9", "--out",
                     str(tmp_path / "o")]) == 2
    assert "error: --labels: class index 9 is out of range (0..4 for a 5-class model)" in capsys.readouterr().err
    assert cli.main(["explain", str(good), "--model", str(tiny_checkpoint), "--cmap", "nope", "--out",
                     str(tmp_path / "o")]) == 2
    assert "unknown colour map" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["explain", str(good), "--labels", "x"])
    assert "--labels takes one class index per image" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a WordNet id is read as a label file's is: one of ImageNet-1k's
        cli.main(["explain", str(good), "--labels", "n99999999"])
    assert "--labels: 'n99999999' is not an ImageNet-1k WordNet id" in capsys.readouterr().err


def test_explain_model_errors_are_one_line_and_model_name_reaches_the_loader(tiny_checkpoint, tmp_path, capsys):
    """A weights file the loader cannot use is an `error:` line with exit 2, not a traceback; a bare
    state dict that does not say its architecture points at --model-name, which reaches convert.load."""
    from safetensors.numpy import save_file

    import convert

    good = tmp_path / "g.png"
    Image.new("RGB", (32, 32), "red").save(good)
    _, params = jaxvit.load(tiny_checkpoint)
    bare = tmp_path / "bare.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in convert.export_state_dict(params).items()}, str(bare))
    args = ["explain", str(good), "--model", str(bare), "--out", str(tmp_path / "o")]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and "(on the command line: --model FILE --model-name NAME)" in err
    assert cli.main(args + ["--model-name", "vit_tiny_patch16_224"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint does not match vit_tiny_patch16_224" in err and "Traceback" not in err
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(bare.read_bytes()[:100])
    assert cli.main(["explain", str(good), "--model", str(broken), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_explain_gives_overlays_of_images_with_the_same_stem_their_own_names(tiny_checkpoint, tmp_path, capsys):
    paths = [tmp_path / "a" / "cat.png", tmp_path / "b" / "cat.png", tmp_path / "cat.jpg"]
    for i, p in enumerate(paths):
        p.parent.mkdir(exist_ok=True)
        Image.new("RGB", (32, 32), (40 * i, 90, 200 - 40 * i)).save(p)
    out = tmp_path / "out"
    assert cli.main(["explain", *map(str, paths), "--model", str(tiny_checkpoint), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "its overlays are cat-2_*.png" in err and "its overlays are cat-3_*.png" in err
    assert sorted(p.name for p in out.glob("*_grid.png")) == ["cat-2_predicatt_grid.png", "cat-3_predicatt_grid.png",
                                                               "cat_predicatt_grid.png"]
    # A legal 245-character name made overlay names over the 255-byte limit: the run stopped there
    # and lost the images after it. The stem is shortened (to 120 bytes, whole UTF-8 characters).
    long = tmp_path / ("é" * 122 + ".png")  # 244 bytes + ".png"
    Image.new("RGB", (32, 32), "green").save(long)
    last = tmp_path / "z_last.png"
    Image.new("RGB", (32, 32), "blue").save(last)
    out = tmp_path / "out2"
    assert cli.main(["explain", str(paths[0]), str(long), str(last), "--model", str(tiny_checkpoint),
                     "--out", str(out), "--batch-size", "1"]) == 0
    assert "over 120 bytes, shortened; its overlays are " + "é" * 60 + "_*.png" in capsys.readouterr().err
    assert sorted(p.name for p in out.glob("*_grid.png")) == ["cat_predicatt_grid.png", "z_last_predicatt_grid.png",
                                                               "é" * 60 + "_predicatt_grid.png"]
    assert (out / "report" / "index.html").exists()


def test_explain_rejects_empty_and_out_of_range_layers_for_every_method(tiny_checkpoint, tmp_path, capsys):
    good = tmp_path / "g.png"
    Image.new("RGB", (32, 32), "red").save(good)
    # `explain` and `run` share one --layers parser: an empty list is refused by both, naming the flag
    # (`run` took it and failed later in ExplainSpec without naming --layers)
    for command in (["explain", str(good)], ["run", "--images", str(good), "--out", str(tmp_path / "r")]):
        for empty in (",", ""):
            with pytest.raises(SystemExit) as e:
                cli.main([*command, "--model", str(tiny_checkpoint), "--layers", empty])
            assert e.value.code == 2
            assert "--layers takes comma-separated integers" in capsys.readouterr().err, (command, empty)
    # rollout has no prediction layer: any --layers but the default is a mistake to report, said as such
    assert cli.main(["explain", str(good), "--model", str(tiny_checkpoint), "--method", "rollout", "--layers", "50",
                     "--out", str(tmp_path / "o")]) == 2
    assert "--layers: rollout takes no prediction layer" in capsys.readouterr().err
    assert cli.main(["explain", str(good), "--model", str(tiny_checkpoint), "--layers", "50",
                     "--out", str(tmp_path / "o")]) == 2
    assert "--layers: layer 50 out of range" in capsys.readouterr().err


def test_option_values_that_would_fail_late_or_be_ignored_are_refused_up_front(tiny_checkpoint, tmp_path, capsys):
    # Found by a CLI audit: a negative seed ended 'demo' in a numpy traceback; --workers -3 named no
    # option; --model-name without --model was silently ignored; an --out that is a file gave
    # "[Errno 17] File exists"; a bad --cmap failed only after the demo had written its scenes.
    for argv, message in [
        (["demo", "--seed", "-5"], "argument --seed: expected an integer >= 0; got '-5'"),
        (["eval", "digits", "--seed", "-1"], "argument --seed: expected an integer >= 0"),
        (["eval", "perturbation", "--model", "m", "--workers", "-3"], "argument --workers: expected a positive"),
        (["run", "--images", str(tmp_path), "--out", str(tmp_path / "o"), "--workers", "0"],
         "argument --workers: expected a positive integer"),
    ]:
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err, argv
    image = tmp_path / "a.png"
    Image.new("RGB", (32, 32), "red").save(image)
    for argv, message in [
        (["explain", str(image), "--model-name", "vit_base_patch16_224", "--out", str(tmp_path / "o")],
         "--model-name names the architecture of a --model weights file; give --model too"),
        (["explain", str(image), "--model", str(tiny_checkpoint), "--model-name", "vit_base_patch16_224",
          "--out", str(tmp_path / "o")], "is a jaxvit checkpoint, whose config.json names its model: leave "
                                         "--model-name out"),
        (["explain", str(image), "--out", str(image)], f"--out {image} is a file; give a folder"),
        (["explain", str(image), "--json", "--out", str(tmp_path / "o")],
         "--json writes a text classifier's maps (with --text)"),
        (["explain", str(image), "--method", "rollout", "--layers=-1,-2", "--out", str(tmp_path / "o")],
         "--layers: rollout takes no prediction layer"),
        (["demo", "--cmap", "nosuch", "--out", str(tmp_path / "demo")], "unknown colour map 'nosuch'"),
        (["demo", "--alpha", "2", "--out", str(tmp_path / "demo")], "--alpha (the heat map's opacity) must be in"),
    ]:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err, argv
    assert not (tmp_path / "demo").exists() and not (tmp_path / "o").exists()


def test_overlay_keeps_size_and_puts_heat_on_the_hot_cell():
    image = np.full((64, 96, 3), 128, np.uint8)
    token_map = np.zeros((4, 6), np.float32)
    token_map[1, 4] = 1.0  # rows 16..31, columns 64..79 of the image
    out = np.asarray(viz.overlay(image, token_map, cmap="jet", alpha=1.0))
    assert out.shape == (64, 96, 3)
    red = out[..., 0].astype(int) - out[..., 2].astype(int)  # jet: hot is red, cold is blue
    y, x = np.unravel_index(np.argmax(red), red.shape)
    assert 16 <= y < 32 and 64 <= x < 80
    with pytest.raises(ValueError, match="unknown colour map"):
        viz.overlay(image, token_map, cmap="no-such-map")


def test_compilation_cache_is_written_then_reused(tmp_path):
    """A second identical CLI run compiles nothing new: every executable comes from the cache
    directory the first run filled (PREDMAPS_COMPILE_CACHE), and the numbers are the same."""
    import os
    import subprocess
    import sys

    pytest.importorskip("sklearn")
    cache = tmp_path / "cache"
    env = {**os.environ, "PREDMAPS_COMPILE_CACHE": str(cache), "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "predmaps", "eval", "digits", "--method", "predicatt", "--scenes", "3",
           "--batch-size", "3", "--quiet", "--json"]

    def run(i):
        out = tmp_path / f"r{i}.json"
        subprocess.run(cmd + [str(out)], env=env, check=True, capture_output=True, timeout=600)
        data = json.loads(out.read_text())
        for r in data["rows"]:
            r.pop("seconds")
        data.pop("seconds")
        return data, sorted(p.name for p in cache.rglob("*") if p.is_file())

    first, files1 = run(1)
    assert files1, "the first run wrote no cache entries"
    second, files2 = run(2)
    assert files2 == files1
    assert first == second
    off = subprocess.run(cmd + [str(tmp_path / "off.json")], env={**env, "PREDMAPS_COMPILE_CACHE": "off",
                                                                       "HOME": str(tmp_path / "home")},
                         capture_output=True, timeout=600)
    assert off.returncode == 0 and not (tmp_path / "home" / ".cache" / "predmaps").exists()


def test_xla_flag_defaults_are_added_unless_the_user_set_them():
    """The CLI adds its GPU XLA defaults to XLA_FLAGS, keeps whatever the user put there, never
    overrides a flag the user set either way, and adds nothing with PREDMAPS_XLA_DEFAULTS=off."""
    from predmaps.runtime import XLA_DEFAULT_FLAGS, configure_xla_flags

    env = {}
    assert configure_xla_flags(env) == list(XLA_DEFAULT_FLAGS)
    assert env["XLA_FLAGS"] == " ".join(XLA_DEFAULT_FLAGS)
    assert configure_xla_flags(env) == [] and env["XLA_FLAGS"] == " ".join(XLA_DEFAULT_FLAGS)  # idempotent

    env = {"XLA_FLAGS": "--xla_dump_to=/tmp/d"}
    configure_xla_flags(env)
    assert env["XLA_FLAGS"].startswith("--xla_dump_to=/tmp/d ") and XLA_DEFAULT_FLAGS[0] in env["XLA_FLAGS"]

    name = XLA_DEFAULT_FLAGS[0].split("=")[0]
    env = {"XLA_FLAGS": f"{name}=true"}
    assert configure_xla_flags(env) == [] and env["XLA_FLAGS"] == f"{name}=true"

    env = {"PREDMAPS_XLA_DEFAULTS": "off"}
    assert configure_xla_flags(env) == [] and "XLA_FLAGS" not in env


def test_explain_shows_a_name_that_is_not_utf8_with_replacement_characters(tiny_checkpoint, tmp_path, capsys):
    """A file name that is not valid UTF-8 (b'caf\\xe9.png' on Linux) is explained like any other: its
    page, the index and stdout show it with U+FFFD, its overlays are named after that, and there is no
    note about a stem collision that did not happen. It used to end the run writing the page."""
    import os

    raw = os.fsencode(str(tmp_path)) + b"/caf\xe9.png"
    try:
        Image.new("RGB", (32, 32), "red").save(os.fsdecode(raw))
    except (OSError, UnicodeError):
        pytest.skip("this file system does not take a file name that is not UTF-8")
    other = tmp_path / "other.png"
    Image.new("RGB", (32, 32), "blue").save(other)
    out = tmp_path / "out"
    assert cli.main(["explain", os.fsdecode(raw), str(other), "--model", str(tiny_checkpoint), "--out", str(out),
                     "--batch-size", "1"]) == 0
    text = capsys.readouterr()
    assert "caf\ufffd.png: " in text.out and "note:" not in text.err
    assert report.verify(out / "report" / "index.html") == []
    assert "caf\ufffd.png" in (out / "report" / "index.html").read_text(encoding="utf-8")
    assert "caf\ufffd.png" in (out / "report" / "0000_caf.html").read_text(encoding="utf-8")
    assert sorted(p.name for p in out.glob("*_grid.png")) == ["caf\ufffd_predicatt_grid.png",
                                                               "other_predicatt_grid.png"]


def test_explain_interrupted_keeps_an_index_says_so_in_one_line_and_exits_130(tiny_checkpoint, tmp_path, capsys,
                                                                              monkeypatch):
    """Ctrl-C mid-run (here: while the second image's overlays are written) ends `explain` and `demo`
    with one line naming what was kept, exit 130 as `predmaps run`, and an index of the finished pages."""
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    for p in paths:
        Image.new("RGB", (32, 32), "red").save(p)
    real = report.write_pngs

    def write_pngs(r, *args, **kwargs):
        if r.index == 1:
            raise KeyboardInterrupt
        return real(r, *args, **kwargs)

    monkeypatch.setattr(report, "write_pngs", write_pngs)
    out = tmp_path / "out"
    try:
        rc = cli.main(["explain", *map(str, paths), "--model", str(tiny_checkpoint), "--out", str(out),
                       "--batch-size", "1"])
    except KeyboardInterrupt:  # uncaught, it would end the pytest session
        pytest.fail("Ctrl-C escaped `predmaps explain` as a traceback")
    assert rc == 130
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("interrupted: ") and str(out / "report" / "index.html") in err
    index = (out / "report" / "index.html").read_text()
    assert "0000_a.html" in index and "was interrupted" in index
    # `predmaps demo` alike (it used to end in a traceback)
    try:
        rc = cli.main(["demo", "--out", str(tmp_path / "demo"), "--n", "2"])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped `predmaps demo` as a traceback")
    err = capsys.readouterr().err.strip()
    assert rc == 130 and err.count("\n") == 0 and err.startswith("interrupted: ")
    assert "was interrupted" in (tmp_path / "demo" / "report" / "index.html").read_text()


def test_empty_arguments_are_kept_and_refused_as_what_they_are(tiny_checkpoint, tmp_path, capsys):
    """An empty argument is not dropped: an empty image path is that image's read error and an empty
    --out is refused (it would have been the current folder); --layers -1,-2 still parses."""
    good = tmp_path / "g.png"
    Image.new("RGB", (32, 32), "red").save(good)
    assert common.join_negative_layers(["explain", "", "--layers", "-1,-2", "--out", ""]) == \
        ["explain", "", "--layers=-1,-2", "--out", ""]
    out = tmp_path / "out"
    assert cli.main(["explain", "", str(good), "--model", str(tiny_checkpoint), "--layers", "-1,-2",
                     "--out", str(out), "--strict"]) == 1
    err = capsys.readouterr().err
    assert "skipped: cannot read image '': the path is empty" in err
    assert cli.main(["explain", str(good), "--model", str(tiny_checkpoint), "--out", ""]) == 2
    assert capsys.readouterr().err == "error: --out is empty; give a folder (created when missing)\n"
    assert cli.main(["run", "--images", str(good), "--out", ""]) == 2
    assert "error: --out is empty" in capsys.readouterr().err


def test_an_out_folder_that_cannot_be_written_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """A read-only --out is one line naming it, before the model is loaded (it failed after the first
    batch with a bare '[Errno 13] Permission denied'). As root a mode-0555 folder is still writable:
    then /sys (sysfs refuses new files to everyone) stands in, or the test is skipped."""
    import os
    from pathlib import Path

    image = tmp_path / "a.png"
    Image.new("RGB", (32, 32), "red").save(image)
    def refuses_writes(folder):
        try:
            (Path(folder) / ".probe").touch()
        except OSError:
            return True
        (Path(folder) / ".probe").unlink()
        return False

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if not refuses_writes(ro):
        if not (os.path.isdir("/sys") and refuses_writes("/sys")):
            pytest.skip("running as root without a folder that refuses writes: a read-only --out cannot be made")
        ro = "/sys"

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(explain, "load_model", no_load)
    for command in (["explain", str(image)], ["demo"]):
        assert cli.main([*command, "--out", str(ro)]) == 2, command
        err = capsys.readouterr().err
        assert err == f"error: cannot write to {ro}: Permission denied; choose another --out\n", command


def test_explain_refuses_bad_option_values_by_name_before_the_model_loads_or_out_is_made(tiny_checkpoint, tmp_path,
                                                                                         capsys, monkeypatch):
    """--method, --cmap and --alpha are refused before the model loads; --classes and --map-class,
    which need its class count, before --out is created. Each message names the option (they were
    checked inside the report, after the model load and the folder: 'opacity must be in [0, 1]')."""
    image = tmp_path / "a.png"
    Image.new("RGB", (32, 32), "red").save(image)
    out = tmp_path / "out"
    base = ["explain", str(image), "--model", str(tiny_checkpoint), "--out", str(out)]
    real_load = explain.load_model
    monkeypatch.setattr(explain, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    for extra, message in [(["--method", "nope"], "error: --method: unknown method 'nope'"),
                           (["--cmap", "nope"], "error: --cmap: unknown colour map 'nope'"),
                           (["--alpha", "1.5"], "error: --alpha (the heat map's opacity) must be in [0, 1]; got 1.5")]:
        assert cli.main(base + extra) == 2, extra
        assert capsys.readouterr().err.startswith(message), extra
    with pytest.raises(SystemExit):
        cli.main(base + ["--classes", "topx"])
    assert "--classes takes top, topK, all or indices" in capsys.readouterr().err
    monkeypatch.setattr(explain, "load_model", real_load)
    for extra, message in [(["--classes", "top9"], "error: --classes top9: K must be 1..5 for a 5-class model (0..4)"),
                           (["--classes", "1,7"], "error: --classes 7 out of range for a 5-class model (0..4)"),
                           (["--map-class", "99"], "error: --map-class 99 out of range for a 5-class model (0..4)")]:
        assert cli.main(base + extra) == 2, extra
        assert capsys.readouterr().err == message + "\n", extra
    assert not out.exists()


def test_help_shows_defaults_and_methods_and_no_internal_docstring(capsys):
    def help_of(*command):
        with pytest.raises(SystemExit) as e:
            cli.main([*command, "--help"])
        assert e.value.code == 0
        return " ".join(capsys.readouterr().out.split())  # unwrapped

    text = help_of("explain")
    for shown in ("top5), all, or class indices like 281,285 (default: top)", "(default: -1)",
                  "report/index.html (default: predmaps-out)", "one of predicatt, prediction_map,", "(default: 8)"):
        assert shown in text, shown
    assert "(default: predmaps-demo)" in help_of("demo") and "scene seed (default: 0)" in help_of("demo")
    text = help_of("eval")
    assert "add_eval_parser" not in text and "predmaps eval TEST --help" in text
    assert "one of predicatt," in help_of("eval", "perturbation") and "(default: both)" in help_of("eval", "perturbation")
    assert "comma-separated, of predicatt," in help_of("run")


def test_ci_runs_the_readme_test_command():
    """.ci/run ends with exactly the README's test command (skip reasons shown with -rs, a worker per
    core with -n auto)."""
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    command = next(line for line in readme.splitlines() if "-m pytest -q -rs" in line)
    assert (root / ".ci" / "run").read_text().strip().splitlines()[-1] == command
