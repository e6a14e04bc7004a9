"""examples/ run as a user runs them (a fresh interpreter each, offline, tiny sizes): CI keeps them working."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, env=None) -> str:
    full = dict(os.environ, JAX_PLATFORMS="cpu", PREDMAPS_COMPILE_CACHE="off", **(env or {}))
    full["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], env=full, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_quickstart_explains_and_draws(tmp_path):
    out = _run("quickstart.py", "--out", str(tmp_path / "q"), "--n", "2")
    assert "Explanation(maps=float32[2,2,8,8]" in out
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == ["scene0.png", "scene0_heat.png", "scene1.png"]


@pytest.mark.slow
def test_compose_agrees_under_vmap_sharded_jit_and_shard_map():
    out = _run("compose.py", env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    lines = [ln for ln in out.splitlines() if "max relative difference" in ln]
    assert [ln.split("maps")[0].strip() for ln in lines] == ["vmap", "sharded jit", "shard_map"], out
    assert "on 4 device(s)" in lines[2], out  # each device explained its own slice


def test_read_results_plots_maps_on_the_crops(tmp_path):
    out = _run("read_results.py", "--out", str(tmp_path / "r"), "--n", "3")
    assert "3 images" in out and "complete: True" in out
    assert (tmp_path / "r" / "job").is_dir() and Image.open(tmp_path / "r" / "maps.png").size[0] > 3 * 128
    assert not (Path.cwd() / "photos").exists()  # nothing outside the folder it was given
