"""A job folder written by the code at 8ddc185 (before the results format's reader and writer moved
into predmaps/results/) still reads and resumes: tests/fixtures/job_8ddc185, made by
tests/fixtures/make_job_8ddc185.py with that commit's packages. Its shards are that code's bytes,
so the reference here is independent of today's writer."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import convert
from predmaps import iter_results, read_results
from predmaps.pipeline import ExplainSpec, explain_dataset

FIXTURE = Path(__file__).parent / "fixtures" / "job_8ddc185"
SPEC = ExplainSpec(methods="predicatt,rollout", layers="-1", targets="top,gt")  # as the fixture's job


@pytest.fixture
def old_job(tmp_path, monkeypatch):
    d = tmp_path / "job_8ddc185"
    shutil.copytree(FIXTURE, d)
    # git keeps no modification times: give each input the one its shard recorded when it was explained
    for shard in (d / "job").glob("shard-*.npz"):
        with np.load(shard) as z:
            for name, mtime in zip(z["name"], z["input_mtime_ns"].tolist()):
                os.utime(d / "images" / str(name), ns=(mtime, mtime))
    monkeypatch.chdir(d)  # the job recorded its inputs as the relative "images"
    return d


def _run(out: str):
    model, params = convert.load("model")
    return explain_dataset(model, params, "images", out, SPEC, labels="labels.txt", batch_size=2, shard_size=2,
                           progress=False)


def test_an_old_job_reads_as_today_computes_it(old_job):
    old = read_results("job", verify=True)
    assert old.complete and old.names.tolist() == [f"im{i}.png" for i in range(5)]
    assert old.labels.tolist() == [0, 1, 2, 3, 0]  # labels.txt, as the old reader read it
    assert sum(len(part) for part in iter_results("job")) == 5
    _run("new")
    new = read_results("new")
    assert list(new.maps) == list(old.maps) == ["predicatt/L2/top", "predicatt/L2/gt", "rollout/top", "rollout/gt"]
    np.testing.assert_array_equal(new.pred, old.pred)
    for key in old.maps:  # the same float32 program on the same backend: equal up to XLA's reassociation
        np.testing.assert_allclose(new.maps[key], old.maps[key], rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(new.classes[key], old.classes[key])


def test_an_old_job_resumes_where_it_stopped(old_job):
    kept = {f.name: f.read_bytes() for f in (old_job / "job").glob("shard-00000[01].npz")}
    (old_job / "job" / "shard-000002.npz").unlink()  # as if killed before its last shard
    s = _run("job")
    assert (s.images, s.skipped_images, s.complete, s.recomputed) == (1, 4, True, [])
    assert {f: (old_job / "job" / f).read_bytes() for f in kept} == kept  # finished shards are not rewritten
    res = read_results("job", verify=True)
    assert res.complete and len(res) == 5
