"""`predmaps run` read back with `read_results` equals `predmaps.explain` on the same files, loaded
with the library's own preprocessing: maps, classes, predicted class and its score, for every method
the command offers. The pipeline's other tests compare runs only with its own one-device run.

Tolerance: the run batches images differently from one `explain` call, so float32 results differ by
rounding; 1e-5 relative per map (1e-4 and 5e-3 for the LRP rules, which amplify rounding), far below
the difference between two methods' maps (checked below).
"""

import jax
import numpy as np
import pytest

import convert
import jaxvit
import predmaps
from conftest import rel_err
from jaxvit import ViTConfig, preprocess
from predmaps import read_results
from predmaps.cli import run as run_cli
from test_pipeline import _save_images, random_params

METHODS = sorted(predmaps.METHODS)
# Measured here (jax 0.10.2, 2-core CPU): 1e-7..7e-7 relative for the attention and gradient methods,
# 2e-6 transattr, 7e-6 partial LRP, 1.4e-3 full LRP (its divisions by small pre-activations amplify
# the rounding of another batch shape; tests/test_lrp.py measures the same against Chefer's float32).
TOLERANCE = {"transattr": 1e-4, "partial_lrp": 1e-4, "lrp": 5e-3}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cfg = ViTConfig(name="tiny-run", img_size=(32, 32), patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_dim=64,
                    num_classes=5, label_names=("ant", "bee", "cat", "dog", "eel"), crop_pct=0.875)
    return jaxvit.save(tmp_path_factory.mktemp("ckpt") / "tiny", cfg, random_params(cfg, seed=3))


def test_run_results_equal_explain_on_the_same_files(ckpt, tmp_path):
    images = tmp_path / "images"
    _save_images(images, 3, seed=5)
    out = tmp_path / "out"
    assert run_cli.main(["--model", str(ckpt), "--images", str(images), "--out", str(out), "--method", ",".join(METHODS),
                         "--layers", "-1", "--target", "top2", "--batch-size", "2", "--no-progress"]) == 0
    res = read_results(out, verify=True)
    assert res.complete and len(res.names) == 3 and not res.errors

    model, params = convert.load(str(ckpt))
    x = preprocess.load_batch([str(images / n) for n in res.names], model.config)
    probs = jax.nn.softmax(model.apply({"params": params}, x).logits.astype(np.float32), -1)
    np.testing.assert_array_equal(res.pred, np.argmax(probs, -1))
    np.testing.assert_allclose(res.score, np.max(probs, -1), rtol=1e-5)

    seen = set()
    for combo in res.combos:
        method, layer = combo["method"], combo["layer"]
        layer_arg = {} if layer is None else {"layer": int(layer)}
        ex = predmaps.explain(model, params, x, method=method, target="top2", **layer_arg)
        key = combo["key"]
        np.testing.assert_array_equal(res.classes[key], ex.classes, err_msg=key)
        got = np.asarray(res.maps[key])
        assert got.shape == ex.maps.shape, key
        want = np.asarray(ex.maps)
        tol = TOLERANCE.get(method, 1e-5)
        for i in range(3):
            for j in range(2):
                if np.any(want[i, j]):
                    assert rel_err(got[i, j], want[i, j]) <= tol, (key, i, j)
                else:  # GradCAM's clamp can leave a map all zero
                    np.testing.assert_array_equal(got[i, j], 0, err_msg=key)
        seen.add(method)
    assert seen == set(METHODS)
    # The tolerance tells methods apart: every two methods' maps differ by far more than 1e-3.
    first = {c["method"]: np.asarray(res.maps[c["key"]]) for c in res.combos}
    for a in METHODS:
        for b in METHODS:
            if a < b and first[a].shape == first[b].shape:
                assert rel_err(first[a], first[b]) > 1e-2, (a, b)
