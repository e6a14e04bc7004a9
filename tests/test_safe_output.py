"""Hostile output folders and resumes (issue 24): nothing is written through a planted symlink or
outside --out, no user file is deleted or overwritten, and a resumed job checks what it skips.

Every crafted file is made here in tmp_path; the model is a tiny random ViT (32x32 inputs)."""

import hashlib
import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

import convert
import jaxvit
from jaxvit import ViTConfig, safe_write
from jaxvit.checkpoint import param_shapes
from predmaps import cli, pipeline, read_results, results, run_cli
from predmaps.pipeline import ExplainSpec, explain_dataset

SPEC = ExplainSpec(methods="predicatt", layers="-1", targets="top")


def _random_params(cfg: ViTConfig) -> dict:
    rng = np.random.default_rng(0)
    return jax.tree_util.tree_map(lambda leaf: (0.3 * rng.standard_normal(leaf.shape)).astype(np.float32),
                                  param_shapes(cfg))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cfg = ViTConfig(name="tiny-sec", img_size=(32, 32), patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_dim=64,
                    num_classes=5, label_names=("ant", "bee", "cat", "dog", "eel"), crop_pct=1.0)
    return jaxvit.save(tmp_path_factory.mktemp("ckpt") / "tiny", cfg, _random_params(cfg))


@pytest.fixture(scope="module")
def model(ckpt):
    return convert.load(str(ckpt))


def _images(folder: Path, n: int, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 36, 3), dtype=np.uint8)).save(folder / f"im{i:02d}.png")
    return folder


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under folder (symlinks as their target text), to show nothing changed."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(folder))] = b"-> " + os.readlink(p).encode()
        elif p.is_file():
            out[str(p.relative_to(folder))] = p.read_bytes()
    return out


def _run(model, images, out, **kw):
    m, p = model
    return explain_dataset(m, p, images, out, SPEC, batch_size=4, shard_size=2, progress=False, **kw)


# --------------------------------------------------------------------------------------
# The one write helper
# --------------------------------------------------------------------------------------


def test_writes_replace_a_planted_symlink_never_its_target(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("user data")
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "a.json").symlink_to(victim)
    (folder / "dangling.json").symlink_to(tmp_path / "elsewhere.json")
    safe_write.write_bytes(folder / "a.json", b"new")
    safe_write.write_text(folder / "dangling.json", "new")
    assert victim.read_text() == "user data" and not (tmp_path / "elsewhere.json").exists()
    assert not (folder / "a.json").is_symlink() and (folder / "a.json").read_bytes() == b"new"
    assert (folder / "dangling.json").read_text() == "new"
    # a lock file that is a symlink (dangling or not) is an error, never followed
    (folder / ".run-p0.lock").symlink_to(victim)
    with pytest.raises(safe_write.UnsafePathError, match="is a symlink"):
        safe_write.open_lock(folder / ".run-p0.lock")
    (folder / ".run-p1.lock").symlink_to(tmp_path / "nowhere.lock")
    with pytest.raises(safe_write.UnsafePathError, match="is a symlink"):
        safe_write.open_lock(folder / ".run-p1.lock")
    assert victim.read_text() == "user data" and not (tmp_path / "nowhere.lock").exists()
    # a sub-folder the project names itself may not be a symlink
    (folder / "report").symlink_to(tmp_path)
    with pytest.raises(safe_write.UnsafePathError, match="report is a symlink"):
        safe_write.make_dir(folder / "report", own=True)
    # clean-up removes the project's own temporaries only
    for name in (".thesis.tex.tmp-1", ".notes.tmp-99-abcdef12", safe_write.temp_name("shard-000001.npz"),
                 ".shard-000003.npz.tmp-123-0123abcd"):
        (folder / name).write_text("x")
    assert safe_write.remove_temporaries(folder) == 2
    assert sorted(p.name for p in folder.glob(".*tmp*")) == [".notes.tmp-99-abcdef12", ".thesis.tex.tmp-1"]


def test_jaxvit_save_and_to_timm_export_do_not_write_through_symlinks(model, tmp_path):
    m, p = model
    victim = tmp_path / "victim.txt"
    victim.write_text("user data")
    out = tmp_path / "export"
    out.mkdir()
    (out / "config.json").symlink_to(victim)
    (out / "model.safetensors").symlink_to(tmp_path / "dangling.safetensors")
    convert.save_timm(p, m.config, out)
    assert victim.read_text() == "user data" and not (tmp_path / "dangling.safetensors").exists()
    assert json.loads((out / "config.json").read_text())["num_classes"] == 5
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "params.msgpack").symlink_to(victim)
    jaxvit.save(ck, m.config, p)
    assert victim.read_text() == "user data" and not (ck / "params.msgpack").is_symlink()


# --------------------------------------------------------------------------------------
# predmaps run: --out ownership
# --------------------------------------------------------------------------------------


def test_run_refuses_a_symlinked_lock_and_a_folder_it_does_not_own(ckpt, model, tmp_path, capsys):
    images = _images(tmp_path / "in", 3)
    victim = tmp_path / "victim.txt"
    victim.write_text("user data")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".run-p0.lock").symlink_to(victim)
    args = ["--model", str(ckpt), "--images", str(images), "--out", str(out), "--no-progress"]
    assert run_cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ".run-p0.lock is a symlink" in err, err
    assert victim.read_text() == "user data" and sorted(p.name for p in out.iterdir()) == [".run-p0.lock"]

    # A user's folder: their errors.tsv, a hidden temporary of another program, a shard-named file.
    user = tmp_path / "thesis"
    user.mkdir()
    for name, text in (("errors.tsv", "mine"), (".thesis.tex.tmp-1", "draft"), ("shard-000000.npz", "not ours")):
        (user / name).write_text(text)
    before = _tree(user)
    assert run_cli.main(["--model", str(ckpt), "--images", str(images), "--out", str(user), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "is not empty (.thesis.tex.tmp-1, errors.tsv, shard-000000.npz) and holds no predmaps job" in err
    assert "Choose another --out" in err and err.count("\n") == 1
    assert _tree(user) == before  # nothing deleted, overwritten or added (the lock is released and removed)

    # A foreign manifest.json: not a predmaps job (never "delete it").
    (user / "manifest.json").write_text(json.dumps({"name": "my-web-app", "version": "1.0"}))
    before = _tree(user)
    assert run_cli.main(["--model", str(ckpt), "--images", str(images), "--out", str(user), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "manifest.json is not a predmaps job's manifest" in err and "choose another --out" in err.lower()
    assert "delete" not in err and _tree(user) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out", "thesis", "victim.txt"]  # nothing outside

    # An empty folder, and the job's own folder on a rerun, are fine.
    s = _run(model, images, out.parent / "fresh")
    assert s.complete and _run(model, images, out.parent / "fresh").skipped_images == 3


# --------------------------------------------------------------------------------------
# Resume checks what it skips
# --------------------------------------------------------------------------------------


def test_resume_recomputes_a_damaged_shard_and_changed_inputs(model, tmp_path):
    images = _images(tmp_path / "in", 5)
    out = tmp_path / "out"
    _run(model, images, out)
    fresh = read_results(out, verify=True)
    shard = out / "shard-000001.npz"
    raw = bytearray(shard.read_bytes())
    raw[-300:-284] = bytes(b ^ 0xFF for b in raw[-300:-284])  # 16 flipped bytes, same size
    shard.write_bytes(bytes(raw))
    s = _run(model, images, out)
    assert s.images == 2 and s.recomputed == ["shard-000001.npz: its sha256 differs from the manifest's "
                                              "(damaged on disk)"]
    assert "1 finished shard(s) recomputed, not trusted: shard-000001.npz" in str(s)
    np.testing.assert_array_equal(read_results(out, verify=True).maps["predicatt/L2/top"],
                                  fresh.maps["predicatt/L2/top"])

    # An input replaced after the job finished: its shard is recomputed, the others skipped.
    Image.fromarray(np.full((32, 36, 3), 200, np.uint8)).save(images / "im04.png")
    s = _run(model, images, out)
    assert (s.images, s.skipped_images) == (1, 4)
    assert s.recomputed == ["shard-000002.npz: its input im04.png changed since it was explained (size or "
                            "modification time)"]
    _run(model, images, tmp_path / "ref")
    np.testing.assert_array_equal(read_results(out).maps["predicatt/L2/top"],
                                  read_results(tmp_path / "ref").maps["predicatt/L2/top"])

    # An edit that keeps size and modification time: only --verify-inputs (content hashes, recorded by a
    # run with it) sees it.
    out = tmp_path / "hashed"
    _run(model, images, out, verify_inputs=True)
    path = images / "im00.png"
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[-20] ^= 1  # inside the IEND/IDAT tail: same size
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert _run(model, images, out).images == 0
    s = _run(model, images, out, verify_inputs=True)
    assert s.recomputed == ["shard-000000.npz: its input im00.png changed since it was explained (content)"]


def test_a_kill_between_a_retried_shard_and_its_record_leaves_a_state_the_rerun_repairs(model, tmp_path,
                                                                                       monkeypatch):
    """--retry-failed drops the retried shard's record before it rewrites the file: killed right after the
    rename (before the new record), the job lists no record that contradicts the file, and a plain rerun
    recomputes the shard to the result of an uninterrupted run."""
    images = _images(tmp_path / "in", 4)
    good = (images / "im02.png").read_bytes()
    (images / "im02.png").write_bytes(good[:50])  # truncated: an input error in shard 1
    out = tmp_path / "out"
    assert _run(model, images, out).errors == 1
    (images / "im02.png").write_bytes(good)  # fixed
    real = results.atomic_write
    renamed = []

    def killed_after_the_shard(path, data):
        if renamed:  # the write after the shard's rename: the process dies here
            raise KeyboardInterrupt
        real(path, data)
        if Path(path).name.startswith("shard-"):
            renamed.append(path)

    monkeypatch.setattr(results, "atomic_write", killed_after_the_shard)
    with pytest.raises(pipeline.JobInterrupted):
        _run(model, images, out, retry_failed=True)
    monkeypatch.setattr(results, "atomic_write", real)
    assert [Path(p).name for p in renamed] == ["shard-000001.npz"]
    listed = {r["id"]: r for r in json.loads((out / "manifest.json").read_text())["shards"]}
    assert 1 not in listed  # no record describing a file that is being replaced
    res = read_results(out, verify=True)  # readable meanwhile: the other shard only, nothing contradictory
    assert sorted(res.names) == ["im00.png", "im01.png"] and res.errors == []
    s = _run(model, images, out)  # a plain rerun repairs it
    assert s.complete and s.images == 2
    _run(model, images, tmp_path / "ref")
    res, ref = read_results(out, verify=True), read_results(tmp_path / "ref")
    assert res.errors == [] and list(res.names) == list(ref.names)
    np.testing.assert_array_equal(res.maps["predicatt/L2/top"], ref.maps["predicatt/L2/top"])


# --------------------------------------------------------------------------------------
# explain / demo report folders
# --------------------------------------------------------------------------------------


def test_explain_owns_its_out_and_never_writes_through_a_symlinked_report(ckpt, tmp_path, capsys):
    image = _images(tmp_path / "in", 1) / "im00.png"
    victim = tmp_path / "victim.html"
    victim.write_text("user page")
    base = ["explain", str(image), "--model", str(ckpt)]
    out = tmp_path / "out"
    assert cli.main([*base, "--out", str(out)]) == 0
    (out / "report" / "index.html").unlink()
    (out / "report" / "index.html").symlink_to(victim)
    (out / "im00_predicatt_grid.png").unlink()
    (out / "im00_predicatt_grid.png").symlink_to(tmp_path / "dangling.png")
    assert cli.main([*base, "--out", str(out)]) == 0  # its own folder: rerun in place
    assert victim.read_text() == "user page" and not (tmp_path / "dangling.png").exists()
    assert "<html" in (out / "report" / "index.html").read_text()
    capsys.readouterr()

    # A symlinked report/ folder is refused, not written into.
    other = tmp_path / "other"
    assert cli.main([*base, "--out", str(other)]) == 0
    target = tmp_path / "target"
    target.mkdir()
    os.rename(other / "report", tmp_path / "old-report")
    (other / "report").symlink_to(target)
    assert cli.main([*base, "--out", str(other)]) == 2
    assert "report is a symlink" in capsys.readouterr().err and not list(target.iterdir())

    # A user's non-empty folder that explain did not make: refused, untouched.
    user = tmp_path / "user"
    user.mkdir()
    (user / "im00_predicatt_grid.png").write_bytes(b"my own picture")
    before = _tree(user)
    assert cli.main([*base, "--out", str(user)]) == 2
    err = capsys.readouterr().err
    assert "is not empty (im00_predicatt_grid.png) and was not made by predmaps explain/demo" in err
    assert _tree(user) == before


# --------------------------------------------------------------------------------------
# Crafted manifests, errors.tsv, explain's skip messages
# --------------------------------------------------------------------------------------


def test_crafted_manifest_fields_are_named_and_shard_files_stay_inside_out(model, tmp_path):
    images = _images(tmp_path / "in", 3)
    out = tmp_path / "out"
    _run(model, images, out)
    other = tmp_path / "other"
    other.mkdir()
    (other / "shard.npz").write_bytes((out / "shard-000000.npz").read_bytes())
    good = json.loads((out / "manifest.json").read_text())

    def crafted(change):
        data = json.loads(json.dumps(good))
        change(data)
        (out / "manifest.json").write_text(json.dumps(data))

    size = (other / "shard.npz").stat().st_size
    crafted(lambda d: d["shards"][0].update(file="../other/shard.npz", bytes=size))
    with pytest.raises(ValueError, match=r"manifest\.json: field shards\[0\]\.file is str '\.\./other/shard\.npz', not "
                                         r"a shard file name \(shard-NNNNNN\.npz, in the job folder itself\)"):
        read_results(out)
    with pytest.raises(ValueError, match=r"manifest\.json: field shards\[0\]\.file"):
        _run(model, images, out)  # the job refuses it too, reading nothing from outside
    for change, field in ((lambda d: d["shards"][0].update(bytes="12"), r"shards\[0\]\.bytes is str '12', not an integer"),
                          (lambda d: d.update(version="1"), r"version is str '1', not an integer"),
                          (lambda d: d["shards"][1].update(id=None), r"shards\[1\]\.id is NoneType"),
                          (lambda d: d.update(combos={"a": 1}), r"combos is dict")):
        crafted(change)
        with pytest.raises(ValueError, match=rf"{str(out / 'manifest.json')}: field {field}"):
            read_results(out)
    crafted(lambda d: None)
    assert len(read_results(out, verify=True)) == 3


def test_errors_tsv_escapes_bytes_that_are_not_utf8(model, tmp_path):
    images = _images(tmp_path / "in", 2)
    raw = os.fsencode(str(images)) + b"/caf\xe9.png"
    try:
        with open(raw, "wb") as f:
            f.write(b"not a png")
    except (OSError, UnicodeError):
        pytest.skip("this file system does not take a file name that is not UTF-8")
    out = tmp_path / "out"
    assert _run(model, images, out).errors == 1
    text = (out / "errors.tsv").read_bytes().decode("utf-8")  # valid UTF-8: no raw \xe9 byte
    assert "caf\\xe9.png" in text and "\udce9" not in text


def test_explain_skip_messages_name_the_file(ckpt, tmp_path, capsys, monkeypatch):
    from jaxvit import preprocess

    good = _images(tmp_path / "in", 1) / "im00.png"
    real = preprocess.eval_transform_for

    def failing_transform(cfg):  # the transform's own errors name a PIL image, not the file
        def transform(image):
            raise preprocess.ImageLoadError("cannot use image <PIL image mode=RGB size=(36, 32)>: crafted")
        return transform

    monkeypatch.setattr(preprocess, "eval_transform_for", failing_transform)
    assert cli.main(["explain", str(good), "--model", str(ckpt), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"skipped: {good}: cannot use image <PIL image" in err
    monkeypatch.setattr(preprocess, "eval_transform_for", real)
