"""predmaps.lrp against maps stored from Chefer et al.'s published code (tests/fixtures/
chefer_lrp_reference.npz, written by tests/fixtures/make_chefer_reference.py, which records the
upstream commit): Transformer Attribution, full LRP and partial LRP under both of Chefer's rule sets.
Runs in every clean clone, without Chefer's code or torch; tests/test_lrp.py compares live when that
code is present.

float64 on both sides: equal up to rounding (~1e-12); a changed rule, order or normalisation shows
as 1e-2 or worse (tests/test_lrp.py), so 1e-9 tells them apart. float32 (the path users run): the
rules' divisions by small pre-activations amplify rounding, measured up to ~1e-3 relative (full LRP),
so 5e-3, still below what a changed rule gives.
"""

import functools
import json
from pathlib import Path

import jax
import numpy as np
import pytest

import convert
from conftest import rel_err
from predmaps import lrp
from predmaps.targets import make_targets

FIXTURE = Path(__file__).parent / "fixtures" / "chefer_lrp_reference.npz"


@pytest.fixture(scope="module")
def reference():
    ref = np.load(FIXTURE)
    state = {k[2:]: ref[k] for k in ref.files if k.startswith("w/")}
    config = json.loads(str(ref["config"]))
    model, params = convert.load(state, num_heads=config["num_heads"])
    images = ref["images"].transpose(0, 2, 3, 1)  # NCHW -> NHWC
    return ref, model, params, images


@functools.partial(jax.jit, static_argnums=0, static_argnames=("rule",))
def _maps(model, params, images, targets, start_layer, rule=None):
    """Every method in one compilation (start_layer traced); rule None: each method's default."""
    kw = {} if rule is None else {"rule": rule}
    return {"grad": lrp.transattr(model, params, images, targets, start_layer, **kw)["maps"],
            "full": lrp.full_lrp(model, params, images, targets, **kw)["pixel_maps"],
            "last_layer": lrp.partial_lrp(model, params, images, targets, **kw)["maps"],
            "last_layer_ablation": lrp.partial_lrp(model, params, images, targets, grad=True, **kw)["maps"]}


def test_fixture_names_its_source_and_model(reference):
    ref, model, _, _ = reference
    assert len(str(ref["chefer_commit"])) == 40, "the fixture must record the upstream commit it ran"
    assert model.config.depth == 2 and model.config.num_heads == 3 and model.config.patch_size == 8
    assert FIXTURE.stat().st_size < 1_000_000
    # The two rule sets' maps lie 0.79-0.98 apart here, so the 1e-9 below tells them apart.
    for key in ("grad_s0", "grad_s1", "full", "last_layer"):
        assert rel_err(ref[f"ours/{key}"], ref[f"orig/{key}"]) > 0.5, key


@pytest.mark.parametrize("rule", ["ours", "orig"])
def test_matches_stored_chefer_maps_float64(reference, rule):
    """Three images x three classes, every method; transformer attribution from start_layer 0 and 1;
    with 'orig' also partial LRP's is_ablation variant (relevance x gradient)."""
    ref, model, params, images = reference
    classes = ref["classes"]
    with jax.enable_x64(True):
        x = images.astype(np.float64)
        targets = make_targets(classes, len(classes), model.config.num_classes)
        by_start = [_maps(model, params, x, targets, s, rule=rule) for s in (0, 1)]
    assert by_start[0]["grad"].dtype == np.float64
    ours = {"grad_s0": by_start[0]["grad"], "grad_s1": by_start[1]["grad"], "full": by_start[0]["full"],
            "last_layer": by_start[0]["last_layer"]}
    if rule == "orig":  # Chefer's is_ablation exists in ViT_orig_LRP only
        ours["last_layer_ablation"] = by_start[0]["last_layer_ablation"]
    for key, mine in ours.items():
        want = ref[f"{rule}/{key}"]
        mine = np.asarray(mine).reshape(want.shape)
        for i in range(want.shape[0]):
            for j in range(want.shape[1]):
                assert rel_err(mine[i, j], want[i, j]) <= 1e-9, (rule, key, i, j)


def test_matches_stored_chefer_maps_float32(reference):
    """The defaults users run (transattr 'ours' from start_layer 1; full and partial LRP 'orig'),
    float32, image 0's predicted class."""
    ref, model, params, images = reference
    x = images[:1]
    logits = model.apply({"params": params}, x).logits
    assert int(np.argmax(logits)) == int(ref["f32/class"])
    targets = make_targets([int(ref["f32/class"])], 1, model.config.num_classes)
    got = _maps(model, params, x, targets, 1)
    for key in ("grad", "full", "last_layer"):
        mine = got[key]
        assert np.asarray(mine).dtype == np.float32
        assert rel_err(np.asarray(mine).reshape(-1), ref[f"f32/{key}"]) <= 5e-3, key
