"""`predmaps run` / predmaps.pipeline: sharded batch jobs on many devices and processes,
resumable, bad inputs recorded; predmaps.results reads them back.

Tiny random ViT (32x32 inputs, 4x4 tokens), tiny images; the multi-device, multi-process and
kill tests run in subprocesses (XLA device flags and jax.distributed are per process).
"""

import dataclasses
import functools
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import convert
import jaxvit
from jaxvit import safe_write
from jaxvit import ViT, ViTConfig, labels as jlabels
from predmaps import pipeline, results, run_cli
from predmaps.data import DecodePool, decode_item
from predmaps.pipeline import ExplainSpec, explain_batches, explain_dataset, open_inputs
from predmaps import iter_results, read_results
from predmaps.results import JobMismatchError

ROOT = Path(__file__).resolve().parents[1]
SPEC = ExplainSpec(methods="predicatt", layers="-1,-2", targets="top2")  # 2 maps of 2 classes per image
CLI_SPEC = ["--method", "predicatt", "--layers", "-1,-2", "--target", "top2"]
N_IMAGES = 13  # not a multiple of 8 (devices) nor of the batch


def random_params(cfg: ViTConfig, seed: int = 0) -> dict:
    """Non-degenerate random weights, drawn in numpy from the shapes alone (no eager JAX op per
    leaf, which costs seconds on a loaded 2-core machine)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if name.endswith("['scale']"):
            return (1 + 0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)
        if name.endswith("['bias']"):
            return (0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)
        fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 1
        return (rng.standard_normal(leaf.shape) * fan_in ** -0.5).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, jaxvit.checkpoint.param_shapes(cfg))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cfg = ViTConfig(name="tiny-run", img_size=(32, 32), patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_dim=64,
                    num_classes=5, label_names=("ant", "bee", "cat", "dog", "eel"), crop_pct=1.0)
    return jaxvit.save(tmp_path_factory.mktemp("ckpt") / "tiny", cfg, random_params(cfg))


@pytest.fixture(scope="module")
def model(ckpt):
    return convert.load(str(ckpt))


def _save_images(folder: Path, n: int, seed: int = 0, nested: bool = True) -> list[str]:
    rng = np.random.default_rng(seed)
    names = []
    for i in range(n):
        sub = folder / ("b" if nested and i % 4 == 1 else "")
        sub.mkdir(parents=True, exist_ok=True)
        img = rng.integers(0, 255, (30 + i % 5 * 3, 34 + i % 3 * 4, 3), dtype=np.uint8)  # resized by the transform
        fmt = "JPEG" if i % 2 else "PNG"
        path = sub / f"im{i:02d}.{'jpg' if fmt == 'JPEG' else 'png'}"
        Image.fromarray(img).save(path, fmt)
        names.append(path.relative_to(folder).as_posix())
    return names


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    _save_images(d, N_IMAGES)
    (d / "notes.txt").write_text("not an image extension: not listed")
    return d


@pytest.fixture(scope="module")
def reference(model, image_dir, tmp_path_factory):
    """The uninterrupted one-device run every other run is compared with."""
    out = tmp_path_factory.mktemp("ref") / "out"
    m, p = model
    s = explain_dataset(m, p, image_dir, out, SPEC, batch_size=4, shard_size=10, devices=jax.devices()[:1],
                        progress=False)
    assert (s.images, s.errors, s.num_shards, s.complete_shards) == (N_IMAGES, 0, 2, 2)
    return out


def _assert_same(res, ref, names=None):
    names = list(ref.names) if names is None else names
    pos = {n: i for i, n in enumerate(ref.names)}
    assert sorted(res.names) == sorted(names) and len(set(res.names)) == len(res.names)
    idx = np.asarray([pos[n] for n in res.names], np.int64)
    np.testing.assert_array_equal(res.pred, ref.pred[idx])
    np.testing.assert_allclose(res.score, ref.score[idx], rtol=1e-5, atol=1e-6)
    assert sorted(res.maps) == sorted(ref.maps)
    for k in ref.maps:
        np.testing.assert_array_equal(res.classes[k], ref.classes[k][idx])
        np.testing.assert_allclose(res.maps[k], ref.maps[k][idx], rtol=1e-4, atol=1e-6)


def _env(devices: int = 1) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("JAX_COORDINATOR_ADDRESS", None)
    return env


def _run_cli_subprocess(args, devices=1, script=None, **kw):
    """`predmaps run ARGS` in a subprocess; `script`: Python source run instead, with ARGS as sys.argv[1:]."""
    cmd = ["-c", script] if script else ["-m", "predmaps.run_cli"]
    return subprocess.Popen([sys.executable, *cmd, *map(str, args)], env=_env(devices),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, **kw)


# --------------------------------------------------------------------------------------
# Devices and hosts
# --------------------------------------------------------------------------------------


def test_eight_devices_equal_one_device(ckpt, image_dir, reference, tmp_path):
    out = tmp_path / "out8"
    proc = _run_cli_subprocess(["--model", ckpt, "--images", image_dir, "--out", out, *CLI_SPEC, "--batch-size", 256,
                                "--shard-size", 10, "--no-progress"], devices=8)
    try:
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert "on 8 device(s) x 1 process(es)" in stdout and f"{N_IMAGES} image(s) explained" in stdout
    # The batch is capped at a shard (10 images: a batch never spans two), then rounded up to a
    # multiple of the 8 devices; both shards end in a padded, masked batch.
    assert "batch 16" in stdout
    res, ref = read_results(out), read_results(reference)
    assert res.complete and len(res) == N_IMAGES
    np.testing.assert_array_equal(res.index, np.arange(N_IMAGES))
    _assert_same(res, ref)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_processes(args, script=None) -> list[tuple[int, str, str]]:
    """`predmaps run ARGS` as two processes of one job, two CPU devices each: (status, stdout, stderr)."""
    port = _free_port()
    procs = [_run_cli_subprocess([*args, "--coordinator", f"127.0.0.1:{port}", "--num-processes", 2,
                                  "--process-id", i], devices=2, script=script) for i in range(2)]
    try:
        outs = [p.communicate(timeout=150) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [(p.returncode, o, e) for p, (o, e) in zip(procs, outs)]


@pytest.mark.slow
def test_two_processes_write_their_own_shards(ckpt, image_dir, reference, tmp_path):
    """Each process explains and records its own shards; and where one process refuses to start (its
    own record belongs to another job), every process stops with one line and status 2."""
    out = tmp_path / "out2p"
    args = ["--model", ckpt, "--images", image_dir, "--out", out, *CLI_SPEC, "--batch-size", 4, "--shard-size", 3,
            "--no-progress"]
    ran = _run_two_processes(args)
    for rc, _, err in ran:
        assert rc == 0, err[-3000:]
    assert "on 4 device(s) x 2 process(es)" in ran[0][1]
    man = json.loads((out / "manifest.json").read_text())
    assert [r["id"] for r in man["shards"]] == [0, 1, 2, 3, 4] and man["num_shards"] == 5
    assert {r["id"]: r["process"] for r in man["shards"]} == {0: 0, 1: 1, 2: 0, 3: 1, 4: 0}
    assert (out / "manifest-p1.json").exists()  # each process records its own shards
    res = read_results(out)
    assert res.complete and len(res) == N_IMAGES  # every image exactly once
    _assert_same(res, read_results(reference))

    # Process 1's shard deleted, then redone by a one-process run: manifest-p1.json keeps the old record,
    # of the same size. The new record describes the file; a later two-process run (process 1 rewrites
    # its part) must not put the old one back into manifest.json.
    (out / "shard-000001.npz").unlink()
    proc = _run_cli_subprocess(args)
    assert proc.communicate(timeout=150) and proc.returncode == 0
    assert read_results(out, verify=True).complete
    for rc, _, err in _run_two_processes(args):
        assert rc == 0, err[-3000:]
    _assert_same(read_results(out, verify=True), read_results(reference))

    # Another job into that folder with manifest.json gone: only process 1 has a record (manifest-p1.json,
    # of the first job) to refuse it by. Process 0 used to end in a RuntimeError traceback, status 1.
    (out / "manifest.json").unlink()
    other = [a if a != "top2" else "top" for a in args]
    (rc0, _, err0), (rc1, _, err1) = _run_two_processes(other)
    assert (rc0, rc1) == (2, 2), (err0[-2000:], err1[-2000:])
    assert "already holds a different job" in err1 and "Traceback" not in err0 + err1
    assert [ln for ln in err0.splitlines() if ln.startswith("error:")] == [
        "error: process(es) [1] could not start this job (see their messages)"]


def _job_without_shards(model, image_dir, folder, shard_size):
    """The job's own folder before any shard is written (its manifest, no shards): predmaps run writes
    into no other, so a folder it cannot write a shard into is made from one."""
    explain_dataset(*model, image_dir, folder, SPEC, batch_size=4, shard_size=shard_size, devices=jax.devices()[:1],
                    progress=False)
    for f in folder.glob("shard-*.npz"):
        f.unlink()
    header = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps(dict(header, shards=[], totals=None)))


@pytest.mark.slow
def test_a_process_failing_mid_run_stops_every_process(ckpt, model, image_dir, reference, tmp_path):
    """A process that fails during the run (here: a shard file it cannot write) flags its next steps
    as its last, so the others stop with it, each with one line and status 2, keeping every finished
    shard: both used to wait in a step the failed one never ran until jax.distributed's shutdown
    barrier timed out (5 minutes) and aborted them. A rerun resumes."""
    args = [*CLI_SPEC, "--model", ckpt, "--images", image_dir, "--batch-size", 4, "--no-progress"]
    # One image per shard, one shard per step: process 0 runs shards 0, 2, .., 12, process 1 shards 1, .., 11.
    # Process 1 fails on writing its first shard (step 0), once step 1 is in flight: it flags steps 2 and 3,
    # and process 0, having seen step 2's flag, ends after step 3, the one in flight (shards 0, 2, 4, 6).
    mid = tmp_path / "mid"
    _job_without_shards(model, image_dir, mid, 1)
    (mid / "shard-000001.npz").mkdir()
    (rc0, _, err0), (rc1, _, err1) = _run_two_processes([*args, "--shard-size", 1, "--out", mid])
    assert (rc0, rc1) == (2, 2), (err0[-2000:], err1[-2000:])
    assert "Traceback" not in err0 + err1
    assert "error: cannot write" in err1 and "shard-000001.npz" in err1
    errors0 = [ln for ln in err0.splitlines() if ln.startswith("error:")]
    assert len(errors0) == 1 and errors0[0].startswith("error: process(es) [1] stopped during the run"), err0[-2000:]
    assert sorted(int(r["id"]) for r in json.loads((mid / "manifest.json").read_text())["shards"]) == [0, 2, 4, 6]

    # Process 0 fails in the last step, which process 1 (idle by then) runs to the end: it learns it
    # when the processes gather their records, and stops too. Shards of 3: process 0 (shards 0, 2, 4)
    # runs 5 steps, process 1 (shards 1, 3) 4 and one idle.
    args += ["--shard-size", 3]
    last = tmp_path / "last"
    _job_without_shards(model, image_dir, last, 3)
    (last / "shard-000004.npz").mkdir()
    (rc0, _, err0), (rc1, _, err1) = _run_two_processes([*args, "--out", last])
    assert (rc0, rc1) == (2, 2), (err0[-2000:], err1[-2000:])
    assert "shard-000004.npz" in err0 and "error: process(es) [0] stopped during the run" in err1
    (last / "shard-000004.npz").rmdir()
    for rc, _, err in _run_two_processes([*args, "--out", last]):
        assert rc == 0, err[-3000:]
    _assert_same(read_results(last, verify=True), read_results(reference))


# `predmaps run` where process 1's XLA compilation of the step runs out of memory, as on a host with
# less device memory than the others.
_COMPILE_FAILS_ON_PROCESS_1 = """
import sys
import jax
from predmaps import run_cli
from predmaps.pipeline import step

class Lowered:
    def compile(self):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 52.22GiB.")

init = step._Engine.__init__
def patched(self, *args, **kw):
    init(self, *args, **kw)
    if jax.process_index() == 1:
        self._lowered = Lowered
step._Engine.__init__ = patched
sys.exit(run_cli.main(sys.argv[1:]))
"""


def test_a_process_failing_to_compile_stops_every_process(ckpt, image_dir, tmp_path):
    """A process whose compilation of the step fails says so in one line (with what to do about an
    out-of-memory compile) and the others stop with it, status 2 each. The failed one used to exit with
    a traceback and the others wait in a first step it never ran: here, on CPU, until Gloo's 30 s
    key-value timeout ended them with a traceback too."""
    out = tmp_path / "out"
    args = [*CLI_SPEC, "--model", ckpt, "--images", image_dir, "--batch-size", 4, "--no-progress", "--out", out]
    (rc0, _, err0), (rc1, _, err1) = _run_two_processes(args, script=_COMPILE_FAILS_ON_PROCESS_1)
    assert (rc0, rc1) == (2, 2), (err0[-2000:], err1[-2000:])
    assert "Traceback" not in err0 + err1
    assert [ln for ln in err1.splitlines() if ln.startswith("error:")] == [
        "error: compiling the explanation step for a global batch of 4 failed: RESOURCE_EXHAUSTED: Out of memory "
        "while trying to allocate 52.22GiB.; a smaller batch size (--batch-size) needs less device memory"]
    errors0 = [ln for ln in err0.splitlines() if ln.startswith("error:")]
    assert len(errors0) == 1 and errors0[0].startswith(
        "error: process(es) [1] stopped during the run (see their messages); 0 finished shard(s) are kept"), err0[-2000:]
    assert json.loads((out / "manifest.json").read_text())["shards"] == []


def test_the_newest_record_of_a_shard_describes_its_file(reference, tmp_path):
    """Two manifest files may record one shard: a part left by a process that a later run (fewer
    processes) did not rewrite keeps the old record, whose size can match the shard written since
    (npz files differ in zip timestamps only). The reader takes the newest record, wherever it is:
    a stale part's record used to win over manifest.json's and fail verification."""
    import shutil

    out = tmp_path / "job"
    shutil.copytree(reference, out)
    main = json.loads((out / "manifest.json").read_text())
    rec = main["shards"][1]
    stale = dict(rec, sha256="0" * 64, written="2001-01-01T00:00:00+0000")  # same size, another file's hash
    (out / "manifest-p1.json").write_text(json.dumps(dict(main, shards=[stale])))
    assert read_results(out, verify=True).complete
    # The other way round (a --retry-failed run interrupted before manifest.json took the new record):
    # the part's newer record describes the file, manifest.json's older one does not.
    (out / "manifest-p1.json").write_text(json.dumps(dict(main, shards=[dict(rec, written="2999-01-01T00:00:00+0000")])))
    main["shards"][1] = stale
    (out / "manifest.json").write_text(json.dumps(main))
    assert read_results(out, verify=True).complete


_KILLED_JOB = """
import sys, time
import convert
from predmaps.pipeline import ExplainSpec, explain_dataset
model, params = convert.load(sys.argv[1])
explain_dataset(model, params, sys.argv[2], sys.argv[3], ExplainSpec("predicatt", "-1,-2", "top2"), batch_size=4,
                shard_size=2, progress=False, on_batch=lambda b: time.sleep(0.4))
print("finished")
"""


def _wait_for_shards(proc, out, n):
    """Until the job in `out` has recorded n finished shards; the process must still be running."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if len(json.loads((out / "manifest.json").read_text())["shards"]) >= n:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-3000:]


def test_killed_job_resumes_to_the_uninterrupted_result(ckpt, model, image_dir, reference, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_JOB, str(ckpt), str(image_dir), str(out)], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_shards(proc, out, 2)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    num_shards = 7
    done = {r["id"] for r in json.loads((out / "manifest.json").read_text())["shards"]}
    assert 2 <= len(done) < num_shards
    # What a crash can leave: a temporary file, and a shard renamed into place but never recorded.
    missing = max(set(range(num_shards)) - done)
    (out / safe_write.temp_name("shard-000000.npz")).write_bytes(b"PK\x03\x04 half a zip")
    (out / f"shard-{missing:06d}.npz").write_bytes(b"PK\x03\x04 half a zip")

    ref = read_results(reference)
    partial = read_results(out)  # only what the manifest lists: never a partial shard
    assert not partial.complete and len(partial) == 2 * len(done) - (num_shards - 1 in done)
    _assert_same(partial, ref, names=[n for i, n in enumerate(ref.names) if i // 2 in done])

    m, p = model
    s = explain_dataset(m, p, image_dir, out, SPEC, batch_size=4, shard_size=2, resume=True, progress=False)
    assert s.skipped_images == len(partial) and s.images == N_IMAGES - len(partial) and s.complete
    res = read_results(out, verify=True)
    assert res.complete
    _assert_same(res, ref)
    assert not list(out.glob(safe_write.TEMP_PREFIX + "*"))
    # Running the finished job again does nothing.
    s = explain_dataset(m, p, image_dir, out, SPEC, batch_size=4, shard_size=2, progress=False)
    assert (s.images, s.skipped_images, s.total_images) == (0, N_IMAGES, N_IMAGES)


# --------------------------------------------------------------------------------------
# Bad inputs, mismatched jobs, input layouts
# --------------------------------------------------------------------------------------


def _jpeg_bytes(rng) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_model_name_reaches_the_loader_for_a_bare_weights_file(ckpt, image_dir, tmp_path, capsys):
    """A bare state dict: without --model-name the error points at the option; with one it is what
    convert.load says of that architecture (here: not this checkpoint's), one line, exit 2."""
    from safetensors.numpy import save_file

    import convert

    _, params = jaxvit.load(ckpt)
    bare = tmp_path / "bare.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in convert.export_state_dict(params).items()}, str(bare))
    args = ["--model", str(bare), "--images", str(image_dir), "--out", str(tmp_path / "o")]
    assert run_cli.main(args) == 2
    assert "(on the command line: --model FILE --model-name NAME)" in capsys.readouterr().err
    assert run_cli.main(args + ["--model-name", "vit_tiny_patch16_224"]) == 2
    assert "checkpoint does not match vit_tiny_patch16_224" in capsys.readouterr().err


def test_bad_inputs_are_recorded_and_skipped(ckpt, tmp_path, capsys):
    d = tmp_path / "in"
    good = _save_images(d, 3, seed=5, nested=False)
    rng = np.random.default_rng(1)
    jpeg = bytearray(_jpeg_bytes(rng))
    dht = jpeg.find(b"\xff\xc4")
    jpeg[dht + 4:dht + 30] = b"\xff" * 26  # Huffman tables smashed: identified as JPEG, fails to decode
    (d / "corrupt.jpg").write_bytes(bytes(jpeg))
    (d / "truncated.jpg").write_bytes(_jpeg_bytes(rng)[:300])
    (d / "empty.jpg").write_bytes(b"")
    (d / "text.jpg").write_text("this is a text file, not a JPEG\n")
    deep = (rng.integers(0, 256, (36, 36)).astype(np.uint16) * 257 + rng.integers(0, 256, (36, 36))).astype(np.uint16)
    Image.fromarray(deep).save(d / "deep16.png")  # 16-bit greyscale: a valid image
    assert Image.open(d / "deep16.png").mode == "I;16"
    Image.fromarray((deep >> 8).astype(np.uint8)).save(d / "deep8.png")  # what it must read as

    out = tmp_path / "out"
    args = ["--model", str(ckpt), "--images", str(d), "--out", str(out), *CLI_SPEC, "--batch-size", "4",
            "--shard-size", "4", "--no-progress"]
    assert run_cli.main(args + ["--strict"]) == 1
    text = capsys.readouterr().out
    assert "5 image(s) explained, 4 error(s)" in text and "errors.tsv" in text
    rows = [line.split("\t") for line in (out / "errors.tsv").read_text().splitlines()[1:]]
    reasons = {name: reason for _, name, _, reason in rows}
    assert sorted(reasons) == ["corrupt.jpg", "empty.jpg", "text.jpg", "truncated.jpg"]
    assert "corrupt" in reasons["corrupt.jpg"] and "broken data stream" in reasons["corrupt.jpg"]
    assert "truncated" in reasons["truncated.jpg"]
    assert "empty (zero bytes)" in reasons["empty.jpg"]
    assert "not an image" in reasons["text.jpg"]
    res = read_results(out)
    assert sorted(res.names) == sorted(good + ["deep16.png", "deep8.png"]) and res.complete
    assert len(res.errors) == 4
    i16, i8 = list(res.names).index("deep16.png"), list(res.names).index("deep8.png")
    for k in res.maps:  # the 16-bit PNG is read as its high byte, not clipped to white
        np.testing.assert_array_equal(res.maps[k][i16], res.maps[k][i8])
    # Without --strict the same job exits 0; nothing is redone.
    assert run_cli.main(args) == 0
    assert "0 image(s) explained" in capsys.readouterr().out


def test_an_unlistable_folder_is_an_input_error_not_fewer_images(ckpt, tmp_path, monkeypatch, capsys):
    """A subfolder that cannot be listed is recorded in errors.tsv (so --strict fails) instead of
    the job silently explaining fewer images; an unlistable images folder is an error that says so."""
    d = tmp_path / "in"
    _save_images(d / "a", 2, seed=1, nested=False)
    _save_images(d / "b", 2, seed=2, nested=False)
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path).name == "b":  # as a chmod 000 folder does to a user without CAP_DAC_OVERRIDE
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    out = tmp_path / "out"
    assert run_cli.main(_cli_args(ckpt, d, out, "--strict")) == 1
    assert "2 image(s) explained, 1 error(s)" in capsys.readouterr().out
    res = read_results(out)
    assert sorted(res.names) == ["a/im00.png", "a/im01.jpg"]
    assert [name for _, name, _, _ in res.errors] == ["b/"]
    assert f"cannot list the folder {(d / 'b').resolve()}: Permission denied" in res.errors[0][3]
    assert "run the job again into a new --out" in res.errors[0][3]
    capsys.readouterr()
    # Listable again: its images are new inputs, which --retry-failed cannot add to this job (refused,
    # nothing changed); a new --out explains them all.
    monkeypatch.setattr(os, "scandir", real_scandir)
    assert run_cli.main(_cli_args(ckpt, d, out, "--retry-failed")) == 2
    assert "already holds a different job (inputs.count, inputs.sha256 differ)" in capsys.readouterr().err
    assert sorted(read_results(out).names) == ["a/im00.png", "a/im01.jpg"]
    assert run_cli.main(_cli_args(ckpt, d, tmp_path / "again")) == 0
    assert len(read_results(tmp_path / "again")) == 4
    monkeypatch.setattr(os, "scandir", scandir)
    assert run_cli.main(_cli_args(ckpt, d / "b", tmp_path / "out2")) == 2
    assert f"cannot list the images folder {(d / 'b').resolve()}: Permission denied" in capsys.readouterr().err


def test_odd_names_binary_lists_and_label_encodings_are_named(model, tmp_path):
    m, p = model
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / "cat [1].png")
    items = list(open_inputs(str(d / "cat [1].png")))  # an existing file, though its name looks like a glob
    assert [it.name for it in items] == [str(d / "cat [1].png")]
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / "flat.gif", "PNG")
    with pytest.raises(ValueError, match=r"flat.gif: not an image with a known extension \(.jpg, .*\) nor a text "
                                         r"list of image paths \(it holds binary data\)"):
        open_inputs(d / "flat.gif")
    (d / "labels.txt").write_bytes("caf\u00e9.png 3\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"labels.txt: not UTF-8 text .*save the label file as UTF-8"):
        open_inputs(d, labels=d / "labels.txt")


def test_a_damaged_shard_is_named_and_a_rerun_redoes_it(model, image_dir, reference, tmp_path):
    """A shard damaged in place (same size, so resuming takes it as done): reading names the file and
    the fix, with verify=True too; deleting it and rerunning restores the job."""
    m, p = model
    out = tmp_path / "out"
    explain_dataset(m, p, image_dir, out, SPEC, batch_size=4, shard_size=4, progress=False)
    shard = out / "shard-000001.npz"
    raw = bytearray(shard.read_bytes())
    raw[200:208] = b"\xff" * 8
    shard.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=f"{re.escape(str(shard))}: unreadable shard .*Delete it and run the same "
                                         "job again"):
        read_results(out)
    with pytest.raises(ValueError, match=f"{re.escape(str(shard))}: sha256 .* corrupt shard. Delete it and run"):
        read_results(out, verify=True)
    shard.unlink()
    explain_dataset(m, p, image_dir, out, SPEC, batch_size=4, shard_size=4, progress=False)
    _assert_same(read_results(out, verify=True), read_results(reference))


def _cli_args(ckpt, images, out, *extra) -> list[str]:
    return ["--model", str(ckpt), "--images", str(images), "--out", str(out), *CLI_SPEC, "--no-progress",
            *map(str, extra)]


def test_retry_failed_recomputes_only_the_shards_of_failed_inputs(ckpt, tmp_path, capsys):
    """Finished shards are skipped on rerun, failed inputs included; --retry-failed (said in the
    summary) recomputes just the shards holding them, once they are fixed."""
    d = tmp_path / "in"
    _save_images(d, 5, seed=2, nested=False)  # im00..im04: shards [im00 im01] [im02 im03] [im04]
    good = (d / "im02.png").read_bytes()
    (d / "im02.png").write_bytes(good[:60])  # truncated
    out = tmp_path / "out"
    args = _cli_args(ckpt, d, out, "--batch-size", 2, "--shard-size", 2)
    assert run_cli.main(args) == 0
    text = capsys.readouterr().out
    assert "4 image(s) explained, 1 error(s)" in text and "rerun with --retry-failed" in text
    (d / "im02.png").write_bytes(good)  # fixed
    others = {f: (out / f).stat().st_mtime_ns for f in ("shard-000000.npz", "shard-000002.npz")}
    # As if a two-process run had written shard 1: process 1's manifest records it too.
    man = json.loads((out / "manifest.json").read_text())
    (out / "manifest-p1.json").write_text(json.dumps(dict(man, shards=[dict(man["shards"][1], process=1)])))
    assert run_cli.main(args) == 0  # a plain rerun keeps the job as it is
    assert "0 image(s) explained" in capsys.readouterr().out and len(read_results(out).errors) == 1
    assert run_cli.main(args + ["--retry-failed"]) == 0
    text = capsys.readouterr().out
    assert "2 image(s) explained, 0 error(s)" in text and "1 shard(s) with failed inputs: recomputed" in text
    assert "3 input(s) in shards already complete: skipped" in text and "errors:" not in text
    assert {f: (out / f).stat().st_mtime_ns for f in others} == others  # untouched
    assert json.loads((out / "manifest-p1.json").read_text())["shards"] == []  # its stale record of shard 1: gone
    res = read_results(out, verify=True)
    assert res.complete and sorted(res.names) == [f"im{i:02d}.png" if i % 2 == 0 else f"im{i:02d}.jpg"
                                                  for i in range(5)]
    assert res.errors == [] and (out / "errors.tsv").read_text().count("\n") == 1  # the header alone


def test_unwritable_out_is_named_not_an_unreadable_manifest(ckpt, image_dir, tmp_path, monkeypatch, capsys):
    """The set-up phase's errors reach a one-process run: an output directory that takes no file
    is said as such (it was reported as 'unreadable manifest ... No such file')."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.access(ro, os.W_OK):  # root: permissions do not bind, so the writes fail as they would
        real = results.atomic_write

        def refuse(path, data):
            if Path(path).parent == ro:
                raise PermissionError(13, "Permission denied", str(path))
            return real(path, data)

        monkeypatch.setattr(results, "atomic_write", refuse)
    try:
        assert run_cli.main(_cli_args(ckpt, image_dir, ro, "--batch-size", 4)) == 2
    finally:
        ro.chmod(0o755)
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(rf"error: cannot write (to )?{re.escape(str(ro))}\S*: Permission denied: choose another "
                        rf"--out, or make {re.escape(str(ro))} writable, then rerun the same command", err), err
    assert not list(ro.iterdir())


def test_a_damaged_manifest_stops_the_job_and_keeps_every_shard(model, image_dir, tmp_path):
    """A process's manifest that does not read (here manifest-p1.json, as a two-process job leaves)
    is an error naming it and what to do, as it is for read_results; a one-process rerun once
    threw every finished shard away and recomputed them."""
    m, p = model
    out = tmp_path / "job"
    run = functools.partial(explain_dataset, m, p, image_dir, out, SPEC, batch_size=4, shard_size=5,
                            devices=jax.devices()[:1], progress=False)
    assert run().complete
    part = out / "manifest-p1.json"
    part.write_text('{"format": "predmaps-run", "shar')  # cut short
    shards = {f.name: f.stat().st_mtime_ns for f in out.glob("shard-*.npz")}
    with pytest.raises(ValueError, match=r"unreadable manifest .*manifest-p1\.json: (.|\n)*restore it, or delete it "
                                         r"and rerun the same command \(manifest\.json lists all 3 shard\(s\)"):
        run()
    with pytest.raises(ValueError, match="unreadable manifest .*manifest-p1.json"):
        read_results(out)  # the job and the reader agree
    assert {f.name: f.stat().st_mtime_ns for f in out.glob("shard-*.npz")} == shards  # nothing redone
    part.unlink()  # what the message says to do
    s = run()
    assert (s.images, s.skipped_images, s.complete) == (0, N_IMAGES, True)
    assert len(read_results(out)) == N_IMAGES
    (out / "manifest.json").write_text('{"format": "predmaps-run"}')  # predmaps's, with its shard list lost
    with pytest.raises(ValueError, match=r"manifest\.json: not a predmaps manifest(.|\n)*restore it, or delete it"):
        run()


def test_a_full_disk_names_the_file_and_the_rerun_resumes(ckpt, image_dir, reference, tmp_path, monkeypatch,
                                                          capsys):
    out = tmp_path / "full"
    real = results.atomic_write

    def no_space(path, data):
        if Path(path).name == "shard-000002.npz":
            raise OSError(28, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(results, "atomic_write", no_space)
    args = _cli_args(ckpt, image_dir, out, "--batch-size", 4, "--shard-size", 3)
    assert run_cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: cannot write {out / 'shard-000002.npz'}: No space left on device. 2 finished shard(s) "
                   f"are kept in {out}: free some space (or raise the quota) and rerun the same command to resume")
    monkeypatch.setattr(results, "atomic_write", real)  # space freed
    assert run_cli.main(args) == 0
    assert "6 input(s) in shards already complete: skipped" in capsys.readouterr().out
    res = read_results(out)
    assert res.complete
    _assert_same(res, read_results(reference))


def test_batch_is_capped_at_what_a_shard_holds(model, image_dir, tmp_path, monkeypatch):
    """A batch never spans two shards: rows past the inputs or a shard are padding, computed and
    held for nothing (5 images at batch 256 took 5x the time and 3x the memory of batch 5).
    Several devices: see test_eight_devices_equal_one_device (capped, then a multiple of 8)."""
    m, p = model
    one = jax.devices()[:1]
    compiled_for = []

    class Engine(pipeline.step._Engine):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            compiled_for.append(self.global_batch)

    monkeypatch.setattr(pipeline.job, "_Engine", Engine)
    five = [str(image_dir / n) for n in ("im00.png", "im02.png", "im03.jpg", "im04.png", "im06.png")]
    s = explain_dataset(m, p, five, tmp_path / "a", SPEC, batch_size=256, devices=one, progress=False)
    assert compiled_for == [5] and (s.batch, s.images) == (5, 5) and "batch 5" in str(s)
    s = explain_dataset(m, p, five, tmp_path / "b", SPEC, batch_size=256, shard_size=2, devices=one, progress=False)
    assert compiled_for[-1] == 2 and (s.batch, s.images, s.num_shards) == (2, 5, 3)
    s = explain_dataset(m, p, five, tmp_path / "c", SPEC, batch_size=3, devices=one, progress=False)
    assert compiled_for[-1] == 3 and s.batch == 3  # smaller batches are kept
    a, b = read_results(tmp_path / "a"), read_results(tmp_path / "c")
    _assert_same(a, b)


_INTERRUPTED_CLI = """
import functools, sys, time
from predmaps import pipeline, run_cli
pipeline.explain_dataset = functools.partial(pipeline.explain_dataset, on_batch=lambda b: time.sleep(0.4))
sys.exit(run_cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_says_what_is_kept_in_one_line(ckpt, image_dir, reference, tmp_path, sig, status):
    """Ctrl-C, and SIGTERM (what a scheduler sends) alike: one line saying what is kept, exit 128 + signal."""
    out = tmp_path / "int"
    proc = subprocess.Popen([sys.executable, "-c", _INTERRUPTED_CLI,
                             *_cli_args(ckpt, image_dir, out, "--batch-size", 2, "--shard-size", 2)],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_shards(proc, out, 2)
        proc.send_signal(sig)
        time.sleep(0.05)
        proc.send_signal(sig)  # impatient: again, while it cleans up
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    done = len(json.loads((out / "manifest.json").read_text())["shards"])
    assert proc.returncode == status and stdout == "", stderr[-3000:]
    assert stderr == (f"interrupted: {done} of 7 shard(s) finished are kept in {out}; rerun the same command to "
                      "resume\n")
    assert 2 <= done < 7
    assert run_cli.main(_cli_args(ckpt, image_dir, out, "--batch-size", 2, "--shard-size", 2)) == 0
    res = read_results(out)
    assert res.complete
    _assert_same(res, read_results(reference))


def test_another_job_in_the_same_directory_is_an_error(ckpt, model, image_dir, reference, tmp_path, capsys):
    before = (reference / "manifest.json").read_bytes()
    m, p = model
    with pytest.raises(JobMismatchError, match=r"spec.targets.*\n  existing: .*'top2'.*\n  this run: .*'top'"):
        explain_dataset(m, p, image_dir, reference, ExplainSpec("predicatt", "-1,-2", "top"), batch_size=4,
                        shard_size=10, progress=False)
    other = jax.tree_util.tree_map(lambda a: a * 1.01, p)
    with pytest.raises(JobMismatchError, match="model.params_fingerprint"):
        explain_dataset(m, other, image_dir, reference, SPEC, batch_size=4, shard_size=10, progress=False)
    with pytest.raises(JobMismatchError, match="model.dtype"):
        explain_dataset(m.clone(dtype=jnp.bfloat16), p, image_dir, reference, SPEC, batch_size=4, shard_size=10,
                        progress=False)
    extra = tmp_path / "more"
    _save_images(extra, N_IMAGES + 1)
    with pytest.raises(JobMismatchError, match="inputs.count.*(\n.*){3}fix them in place.*--retry-failed"):
        explain_dataset(m, p, extra, reference, SPEC, batch_size=4, shard_size=10, progress=False)
    # The same names under other labels: the listing changed too, and the message says labels count.
    relabelled = [(it.name, it.path, (it.label + 1) % m.config.num_classes) for it in open_inputs(image_dir)]
    with pytest.raises(JobMismatchError, match=r"inputs.sha256 differ[\s\S]*\(their names, or their labels\) changed"):
        explain_dataset(m, p, relabelled, reference, SPEC, batch_size=4, shard_size=10, progress=False)
    assert (reference / "manifest.json").read_bytes() == before  # untouched
    # The CLI says so and exits 2.
    assert run_cli.main(["--model", str(ckpt), "--images", str(image_dir), "--out", str(reference), "--target", "top",
                         "--shard-size", "10", "--no-progress"]) == 2
    assert run_cli.main(["--model", str(ckpt), "--images", str(image_dir), "--out", str(tmp_path / "new"),
                         "--resume", "--no-progress"]) == 2
    assert not (tmp_path / "new").exists()  # a refused --resume leaves no empty folder behind
    # --shard-size 0 is an error, not the automatic size (leave the option out for that).
    assert run_cli.main(["--model", str(ckpt), "--images", str(image_dir), "--out", str(tmp_path / "zero"),
                         "--shard-size", "0", "--no-progress"]) == 2
    assert "shard size must be positive; got 0" in capsys.readouterr().err


def test_two_jobs_cannot_write_one_directory_at_once(ckpt, model, image_dir, reference, tmp_path, monkeypatch, capsys):
    """A job on a directory another running job holds fails at once, naming the holder, and writes
    nothing (two writers would remove each other's temporaries and overwrite each other's
    manifest records). The lock lives as long as the job: released on return, dropped by the
    kernel when a job is killed, so the next run goes ahead."""
    import fcntl

    m, p = model
    out = tmp_path / "out"
    out.mkdir()
    running = pipeline.output._OutputLock(out, 0)  # a separate open file: conflicts as another process's would
    running.acquire()
    with pytest.raises(pipeline.OutputInUseError) as e:
        explain_dataset(m, p, image_dir, out, SPEC, batch_size=4, shard_size=10, progress=False)
    assert isinstance(e.value, OSError)  # what callers catching write problems already catch
    assert str(e.value).startswith(f"{out} is in use: another predmaps run is writing to it (pid {os.getpid()} on "
                                   f"{socket.gethostname()}, since ")
    assert str(e.value).endswith("or choose another --out")
    assert run_cli.main(_cli_args(ckpt, image_dir, out, "--batch-size", 4)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out} is in use: ") and err.count("\n") == 1, err
    assert sorted(f.name for f in out.iterdir()) == [".run-p0.lock"]  # nothing of the refused jobs
    running.release()
    assert not (out / ".run-p0.lock").exists()

    # What a killed job leaves: an unlocked lock file. It does not stop the next run.
    (out / ".run-p0.lock").write_text("pid 1 on elsewhere, since long ago")
    s = explain_dataset(m, p, image_dir, out, SPEC, batch_size=4, shard_size=10, progress=False)
    assert s.complete and not (out / ".run-p0.lock").exists()  # released (and removed) on return
    _assert_same(read_results(out), read_results(reference))

    # A file system without flock (some network mounts): the job runs, with a warning that it is unguarded.
    def no_flock(fd, op):
        raise OSError(37, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with pytest.warns(RuntimeWarning, match=r"cannot lock .*\.run-p0\.lock \(No locks available\): nothing stops "
                                            "a second job"):
        s = explain_dataset(m, p, image_dir, tmp_path / "unguarded", SPEC, batch_size=4, shard_size=10,
                            progress=False)
    assert s.complete

def test_input_layouts_and_ground_truth_targets(model, tmp_path):
    m, p = model
    wnids = jlabels.imagenet_wnids()
    # ImageFolder layout with synset folders: labels from the folder names.
    tree = tmp_path / "val"
    for c in (2, 0, 1):
        _save_images(tree / wnids[c], 2, seed=c, nested=False)
    inputs = open_inputs(tree)
    items = list(inputs)
    assert [it.label for it in items] == [0, 0, 1, 1, 2, 2] and items[0].name == f"{wnids[0]}/im00.png"
    assert "WordNet" in inputs.labelled
    batches = list(explain_batches(m, p, tree, ExplainSpec("prediction_map", -1, "top,gt"), batch_size=4))
    gt = np.concatenate([b.classes["prediction_map/L2/gt"][:, 0] for b in batches])
    np.testing.assert_array_equal(gt, [0, 0, 1, 1, 2, 2])
    assert [n for b in batches for n in b.names] == [it.name for it in items]
    # Flat files plus a label file (caffe's val.txt style, and Kaggle's LOC_val_solution.csv style).
    flat = tmp_path / "flat"
    names = _save_images(flat, 3, nested=False)
    (tmp_path / "val.txt").write_text("".join(f"{n} {i}\n" for i, n in enumerate(names)))
    assert [it.label for it in open_inputs(flat, labels=tmp_path / "val.txt")] == [0, 1, 2]
    (tmp_path / "loc.csv").write_text("ImageId,PredictionString\n" + "".join(
        f"{Path(n).stem},{wnids[3 - i]} 1 2 3 4 {wnids[3 - i]} 5 6 7 8\n" for i, n in enumerate(names)))
    assert [it.label for it in open_inputs(flat, labels=tmp_path / "loc.csv")] == [3, 2, 1]
    # Only the first line may be a header: an unreadable label after it is an error, not a skipped line.
    (tmp_path / "bad.csv").write_text("# labels\nImageId,Label\n" + f"{names[0]},cat\n{names[1]},1\n")
    with pytest.raises(ValueError, match=r"bad.csv:3: cannot read a class index or WordNet id in"):
        open_inputs(flat, labels=tmp_path / "bad.csv")
    (tmp_path / "gt.txt").write_text("65\n970\n")
    with pytest.raises(ValueError, match="ambiguous"):
        open_inputs(flat, labels=tmp_path / "gt.txt")
    # A list file (relative to its folder, optional TAB label) and a glob.
    (flat / "list.txt").write_text(f"# comment\n{names[2]}\t{wnids[4]}\n{names[0]}\n")
    listed = list(open_inputs(flat / "list.txt"))
    assert [(it.name, it.label) for it in listed] == [(names[2], 4), (names[0], -1)]
    assert listed[0].path == str((flat / names[2]).resolve())
    assert [Path(it.name).name for it in open_inputs(str(flat / "*.jpg"))] == [n for n in names if n.endswith(".jpg")]
    # A glob lists what a folder lists: images, not the list file beside them.
    assert [Path(it.name).name for it in open_inputs(str(flat / "*"))] == [it.name for it in open_inputs(flat)]
    # 'gt' without labels is a clear error before anything runs.
    with pytest.raises(ValueError, match="'gt' needs a label for every input"):
        explain_dataset(m, p, flat, tmp_path / "nolabels", ExplainSpec(targets="gt"), progress=False)
    with pytest.raises(ValueError, match="unknown method"):
        ExplainSpec(methods="predicatt,nope").combos(m)


@pytest.mark.parametrize("kind", ["list", "generator"])
def test_gt_labels_past_the_classes_are_refused_from_a_stream_too(model, tmp_path, kind):
    """A 'gt' label past the model's classes explains no class (NaN maps). A listing is checked before
    anything runs; a one-pass stream (a generator), which cannot be listed first, is checked shard by
    shard as it comes, with the same error, in both entry points."""
    m, p = model
    rng = np.random.default_rng(0)
    items = [(f"m{i}", rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), label)
             for i, label in enumerate([1, m.config.num_classes + 2, 0])]
    source = (lambda: iter(items)) if kind == "generator" else (lambda: items)
    spec = ExplainSpec("predicatt", "-1", "gt")
    bad = f"labels out of range for a {m.config.num_classes}-class model: \\[\\('m1', {m.config.num_classes + 2}\\)\\]"
    with pytest.raises(ValueError, match=bad):
        explain_dataset(m, p, source(), tmp_path / "job", spec, batch_size=4, progress=False,
                        devices=jax.devices()[:1])
    with pytest.raises(ValueError, match=bad):
        list(explain_batches(m, p, source(), spec, batch_size=4, devices=jax.devices()[:1]))


def test_reader_options_and_in_memory_inputs(model, reference):
    res = read_results(reference)
    assert res.manifest["spec"]["layers"] == [1, 2] and len(res.combos) == 2
    assert res.map("predicatt", layer=-1).shape == (N_IMAGES, 2, 4, 4)
    assert res.key(layer=1) == "predicatt/L1/top2"
    # A depth-2 model has layers 0..2 (-3..-1): -4 used to wrap round to layer 2 (and -5 named layer 1)
    for bad in (-4, -5, 3):
        with pytest.raises(KeyError, match=f"layer {bad} out of range: this model has layers 0..2"):
            res.key(layer=bad)
    assert read_results(reference, upsample=np.int64(8)).maps["predicatt/L2/top2"].shape == (N_IMAGES, 2, 8, 8)
    for bad in (0, -3, (64,), "64", 2.5, True + 0.5):
        with pytest.raises(ValueError, match="upsample must be True .* positive integers; got"):
            read_results(reference, upsample=bad)
    up = read_results(reference, keys="predicatt/L2/top2", upsample=True, normalize=True, dtype=np.float16)
    assert list(up.maps) == ["predicatt/L2/top2"] and up.maps["predicatt/L2/top2"].shape == (N_IMAGES, 2, 32, 32)
    assert up.maps["predicatt/L2/top2"].dtype == np.float16
    assert float(up.maps["predicatt/L2/top2"].min()) == 0.0 and float(up.maps["predicatt/L2/top2"].max()) == 1.0
    parts = list(iter_results(reference))
    assert [len(x) for x in parts] == [10, 3]
    # In memory, from research code: arrays and (name, image) pairs, nothing written.
    m, p = model
    images = [np.asarray(Image.open(Path(res.paths[i]))) for i in range(3)]
    batches = list(explain_batches(m, p, [(res.names[i], images[i]) for i in range(3)], SPEC, batch_size=4,
                                   devices=jax.devices()[:1]))
    assert [len(b) for b in batches] == [3]
    got = np.concatenate([b.maps["predicatt/L2/top2"] for b in batches])
    np.testing.assert_allclose(got, res.maps["predicatt/L2/top2"][:3], rtol=1e-5, atol=1e-7)


def test_maps_read_at_input_size_sit_on_the_pixels_the_grid_covers(image_dir, tmp_path):
    """A model whose own input size is no patch multiple (36 px, 8 px patches: 4 x 4 tokens over
    32 px, as so400m's 384 / 14) records the covered part; read_results(upsample=True) places the
    maps there (predmaps.upsample with that extent), the last 4 rows and columns repeat the edge."""
    import predmaps

    cfg = ViTConfig(name="tiny-36", img_size=(36, 36), patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_dim=64,
                    num_classes=5, crop_pct=1.0)
    m = ViT(cfg)
    spec = dataclasses.replace(SPEC, map_dtype="float16")
    explain_dataset(m, random_params(cfg), image_dir, tmp_path / "out", spec, batch_size=8, progress=False,
                    devices=jax.devices()[:1])
    tokens, up = read_results(tmp_path / "out"), read_results(tmp_path / "out", upsample=True)
    assert up.manifest["grid_extent"] == [32 / 36, 32 / 36] and up.manifest["grid"] == [4, 4]
    key = "predicatt/L2/top2"
    assert tokens.maps[key].shape == (N_IMAGES, 2, 4, 4) and up.maps[key].shape == (N_IMAGES, 2, 36, 36)
    assert up.maps[key].dtype == np.float16  # as stored, upsampled or not
    want = np.asarray(predmaps.upsample(tokens.maps[key], (36, 36), extent=32 / 36)).astype(np.float16)
    np.testing.assert_array_equal(up.maps[key], want)
    assert (up.maps[key][..., 32:, :] == up.maps[key][..., 31:32, :]).all()


def test_a_stream_is_read_a_shard_at_a_time(model, tmp_path):
    m, p = model
    rng = np.random.default_rng(3)
    images = [(f"mem{i:02d}", rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for i in range(30)]
    pulled, at_first_batch = [0], []

    def stream(items):
        for x in items:
            pulled[0] += 1
            yield x

    out = tmp_path / "stream"
    s = explain_dataset(m, p, stream(images), out, SPEC, batch_size=4, shard_size=8, devices=jax.devices()[:1],
                        progress=False, on_batch=lambda b: at_first_batch.append(pulled[0]))
    assert (s.images, s.num_shards, s.complete) == (30, 4, True)
    assert at_first_batch[0] <= 8 + 8  # this shard and the next, whatever the stream's length
    res = read_results(out)
    assert list(res.names) == [n for n, _ in images] and set(res.paths) == {""}
    # A stream has no listing to compare up front: each skipped shard's names are checked instead.
    s = explain_dataset(m, p, stream(images), out, SPEC, batch_size=4, shard_size=8, progress=False)
    assert (s.images, s.skipped_images) == (0, 30)
    with pytest.raises(JobMismatchError, match="shard 0 was made from other inputs"):
        explain_dataset(m, p, stream(images[1:]), out, SPEC, batch_size=4, shard_size=8, progress=False)


def test_decoding_runs_ahead_on_threads_within_its_window():
    live, peak, threads, lock = [0], [0], set(), threading.Lock()

    def transform(source):
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
            threads.add(threading.get_ident())
        time.sleep(0.005)
        if source == 7:
            raise pipeline.ImageLoadError("cannot read image 7: truncated")
        return np.full((2, 2, 3), source, np.float32)

    items = [pipeline.Item(str(i), i) for i in range(30)]
    shards = [pipeline.stream._Shard(0, 0, items[:20]), pipeline.stream._Shard(1, 20, items[20:])]
    work = ((sh, j, item) for sh in shards for j, item in enumerate(sh.items))
    pre = DecodePool(lambda w: decode_item(transform, w[2]), work, workers=3, window=5).start()
    got = []
    for (sh, j, item), (arr, reason, _ident) in pre:
        with lock:
            live[0] -= 1
        got.append((sh.id, sh.first + j, None if arr is None else int(arr[0, 0, 0]), reason))
        time.sleep(0.001)
    assert got[:2] == [(0, 0, 0, None), (0, 1, 1, None)] and got[20][:2] == (1, 20)
    assert [g[1] for g in got] == list(range(30)) and got[7] == (0, 7, None, "cannot read image 7: truncated")
    assert peak[0] <= 5 and len(threads) > 1  # bounded look-ahead, decoded in parallel


def test_spec_and_shard_size():
    s = ExplainSpec("predicatt,rollout", "-1,-2", "top,top5,gt", map_dtype="f16")
    assert s.methods == ("predicatt", "rollout") and s.layers == (-1, -2) and s.map_dtype == "float16"
    assert s.needs_labels
    cfg = ViTConfig(img_size=(32, 32), patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_dim=64, num_classes=5)
    combos = s.combos(ViT(cfg))
    # rollout has no prediction layer: one map per target, not per layer.
    assert [c.key for c in combos] == ["predicatt/L2/top", "predicatt/L2/top5", "predicatt/L2/gt",
                                       "predicatt/L1/top", "predicatt/L1/top5", "predicatt/L1/gt",
                                       "rollout/top", "rollout/top5", "rollout/gt"]
    with pytest.raises(ValueError, match="k must be between"):
        ExplainSpec(targets="top9").combos(ViT(cfg))
    with pytest.raises(ValueError, match="out of range"):
        ExplainSpec(layers=5).combos(ViT(cfg))
    big = ViT(ViTConfig(num_classes=1000))
    assert pipeline.auto_shard_size(big, ExplainSpec(targets="all").combos(big), "float32") == 340
    assert pipeline.auto_shard_size(big, ExplainSpec().combos(big), "float32") == 1024


def test_half_precision_jobs_hold_block_weights_in_that_dtype(model):
    """A bf16 job keeps the block matmul weights on device in bf16 (`jaxvit.cast_params`: the same
    outputs as casting per step, tested in test_jaxvit) and the rest as given."""
    from predmaps.pipeline.step import _Engine

    m, p = model
    m16 = m.clone(dtype=jnp.bfloat16)
    engine = _Engine(m16, p, SPEC, SPEC.combos(m16), 4, jax.devices()[:1])
    assert engine.params["blocks_0"]["attn"]["qkv"]["kernel"].dtype == jnp.bfloat16
    assert engine.params["blocks_1"]["mlp"]["fc2"]["bias"].dtype == jnp.bfloat16
    assert engine.params["head"]["kernel"].dtype == jnp.float32 and engine.params["pos_embed"].dtype == jnp.float32
    assert _Engine(m, p, SPEC, SPEC.combos(m), 4, jax.devices()[:1]).params["blocks_0"]["attn"]["qkv"][
        "kernel"].dtype == jnp.float32


def test_results_give_each_photo_its_crop_box_and_show_draws_the_map_there(reference, model):
    # The manifest records the eval transform: each input's box is the centre crop the model saw,
    # read from the image's own size; viz.show draws a map on that part of the photo, not all of it.
    from jaxvit import preprocess
    from predmaps import viz

    res = read_results(reference)
    boxes = res.crop_boxes()
    cfg = model[0].config
    assert boxes.shape == (len(res), 4)
    for path, box in zip(res.paths, boxes):
        with Image.open(path) as img:
            want = preprocess.eval_crop_box((img.height, img.width), img_size=cfg.img_size, crop_pct=cfg.crop_pct)
        np.testing.assert_array_equal(box, want)
    np.testing.assert_array_equal(res.crop_boxes(cfg), boxes)  # a config given says the same
    shown = viz.show(res.paths[0], res.map(layer=-1)[0, 0], cfg)
    left, top, right, bottom = (round(v) for v in boxes[0])
    assert shown.size == (right - left, bottom - top)
    old = dataclasses.replace(res, manifest={k: v for k, v in res.manifest.items() if k != "eval_transform"})
    with pytest.raises(ValueError, match=r"pass the model's config, crop_boxes\(model.config\)"):
        old.crop_boxes()
