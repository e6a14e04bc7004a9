"""The digit-scenes benchmark (`predmaps.evaluation.digit_scenes`, `predmaps eval digits`): a small
version of the published table (docs/digit-benchmark.md) on the shipped checkpoint, the
class-specificity arithmetic, and the array entry points of the two protocol tests."""

from __future__ import annotations

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("sklearn")

import predmaps  # noqa: E402
from predmaps import digits  # noqa: E402
from predmaps import evaluation as ev  # noqa: E402
from predmaps.evaluation import digit_scenes as ds  # noqa: E402
from predmaps.request import check  # noqa: E402

needs_asset = pytest.mark.skipif(not (digits.ASSET_DIR / "model.safetensors").exists(),
                                 reason="digit ViT not shipped")

SCENES = 128  # CI size: a few hundred scenes in all (128 one-digit + 128 two-digit)
PERTURBED = [("predicatt", -1), ("gradcam", -1)]  # the table's rows that run the perturbation test in CI


@pytest.fixture(scope="module")
def shipped():
    return digits.load_model()


@pytest.fixture(scope="module")
def scenes():
    return ds.SceneSet.generate(SCENES)


@pytest.fixture(scope="module")
def table(shipped, scenes):
    model, params = shipped
    # Perturbation (20 forward passes per scene) on two rows, a gradient-free and a gradient method; it is
    # checked exactly against a plain loop in test_array_entry_points_equal_the_protocol_runners, and
    # the other rows are pinned by segmentation and specificity.
    return ds.run_benchmark(model, params, scenes=scenes, batch_size=64, perturbation=PERTURBED)


# ---------------------------------------------------------------- the arithmetic

def test_specificity_shares_wins_and_ties():
    sp = ds.Specificity()
    # mass[j, k]: map of class j on digit k. Scene 1: both maps right. Scene 2: map 0 ties, map 1 wrong.
    sp.update(np.array([[[3.0, 1.0], [0.0, 2.0]],
                        [[1.0, 1.0], [4.0, 0.0]]]))
    assert sp.n == 4
    assert sp.mean_share == pytest.approx((0.75 + 1.0 + 0.5 + 0.0) / 4)
    assert sp.win_rate == pytest.approx((1 + 1 + 0.5 + 0) / 4)
    empty = ds.Specificity()
    empty.update(np.zeros((1, 2, 2)))  # no mass on either digit: a tie, share one half
    assert empty.mean_share == 0.5 and empty.win_rate == 0.5


@needs_asset
def test_masses_are_the_upsampled_maps_on_each_digit(shipped, scenes):
    """The jitted mass step equals explain() + upsample() + a numpy sum over each digit's pixels."""
    model, params = shipped
    unit, labels, masks = scenes.two_unit[:6], scenes.two_labels[:6], scenes.two_masks[:6]
    req = check(model, "predicatt")
    mass = np.asarray(ds._mass_step((model, req, digits.DIGIT_MEAN, digits.DIGIT_STD), params, unit, labels, masks))
    ex = predmaps.explain(model, params, digits.normalize((unit * 255).round().astype(np.uint8)), target=labels)
    up = np.maximum(np.asarray(predmaps.upsample(ex.maps, (64, 64))), 0)
    expected = np.einsum("bjhw,bkhw->bjk", up.astype(np.float64), masks.astype(np.float64))
    np.testing.assert_allclose(mass, expected, rtol=1e-5)


@needs_asset
def test_array_entry_points_equal_the_protocol_runners(shipped, scenes, tmp_path):
    """perturbation_test_arrays == score_maps on the same maps; segmentation_test_arrays ==
    segmentation_test on a gtsegs-style .mat holding the same scenes (64 x 64, nothing resized)."""
    model, params = shipped
    unit, labels, masks = scenes.one_unit[:20], scenes.one_labels[:20], scenes.one_masks[:20]
    mean, std = digits.DIGIT_MEAN, digits.DIGIT_STD
    a = ev.perturbation_test_arrays(model, params, unit, labels, batch_size=8, mean=mean, std=std)
    ex = predmaps.explain(model, params, (unit - 0.5) / 0.5)
    maps = np.asarray(predmaps.upsample(ex.maps[:, 0], (64, 64), normalize=True))
    b = ev.score_maps(model, params, unit, maps, labels, batch_size=8, mean=mean, std=std)
    assert a.correct == b.correct

    images = (unit * 255).round().astype(np.uint8)
    path = ev.write_segmentation_mat(tmp_path / "gtsegs_ijcv.mat", list(images), list(masks.astype(np.uint8)))
    s1 = ev.segmentation_test_arrays(model, params, images / np.float32(255), masks, batch_size=8, mean=mean, std=std)
    s2 = ev.segmentation_test(model, params, path, batch_size=8, image_size=(64, 64), mean=mean, std=std)
    assert (s1.totals.correct, s1.totals.inter.tolist(), s1.totals.union.tolist()) == \
        (s2.totals.correct, s2.totals.inter.tolist(), s2.totals.union.tolist())
    np.testing.assert_allclose(s1.totals.ap, s2.totals.ap, rtol=1e-6)


# ---------------------------------------------------------------- the small table

@pytest.mark.slow
@needs_asset
def test_table_covers_every_method_with_finite_numbers(table):
    rows = {(r.method, r.layer) for r in table.rows}
    depth = table.info["depth"]
    assert {m for m, _ in rows} == set(predmaps.METHODS)
    assert ("predicatt", depth - 1) in rows and ("prediction_map", depth - 1) in rows
    for r in table.rows:
        d = r.to_dict()
        values = [*d["segmentation"].values(), *(d["perturbation"] or {"auc": {}})["auc"].values(),
                  d["specificity"]["mean_correct_share"], d["specificity"]["win_rate"]]
        assert np.all(np.isfinite(values)), d
        assert r.segmentation.n == SCENES and r.specificity.n == 2 * SCENES
        assert (r.perturbation is not None) == ((r.method, -1) in PERTURBED and r.layer in (None, depth))
        assert r.perturbation is None or r.perturbation.n == SCENES
    json.dumps(table.to_dict())  # serialisable as written by --json
    assert "| – | – |" in table.markdown()  # rows without perturbation say so, not NaN


@pytest.mark.slow
@needs_asset
def test_class_agnostic_methods_sit_exactly_at_chance(table):
    agnostic = [r for r in table.rows if not r.class_specific]
    assert {r.method for r in agnostic} == {"raw_attention", "mean_attention", "rollout"}
    for r in agnostic:
        assert r.specificity.win_rate == 0.5, r.method
        assert abs(r.specificity.mean_share - 0.5) < 1e-12, r.method


@pytest.mark.slow
@needs_asset
def test_rerun_is_deterministic(shipped, scenes, table):
    model, params = shipped
    again = ds.run_benchmark(model, params, rows=[("predicatt", -1), ("gradcam", -1)], scenes=scenes, batch_size=64)
    before = {(r.method, r.layer): r.to_dict() for r in table.rows}
    for r in again.rows:
        now, then = r.to_dict(), before[(r.method, r.layer)]
        now.pop("seconds"), then.pop("seconds")
        assert now == then


# Golden values of the shipped checkpoint on the CI scenes (128 each, seed 2024): (pixel accuracy,
# mIoU, mAP) in %, (positive, negative) perturbation AUC (rows of PERTURBED only), (correct share,
# win rate). Layers are 0-based prediction layers (4 = L on this depth-4 model).
# Tolerances: tighter than the gap between any two methods of the table. The closest pair on
# segmentation is weighted_attention / rollout (0.044 points of mAP apart); on perturbation the
# closest pair of the full table is mean_attention / rollout (0.43 AUC); the class-agnostic methods
# share specificity 0.5 by construction. So segmentation 0.02, AUC 0.2, specificity 0.005, and
# test_golden_tolerances_tell_every_two_methods_apart checks that no method could stand in for another.
# Measured drift allowed for: a pixel flipping across the mean threshold moves pixel accuracy by
# 1/(128*4096); one image changing its prediction at one perturbation step moves the AUC by 0.078.
# Wider where measured drift needs it (GOLDEN_TOL): full LRP's segmentation moved 0.14 points of mAP
# when GELU's float32 evaluation changed by rounding (its z-rule divides by near-zero sums); the
# two-digit specificity of the gradient methods moved up to 0.012 between jax 0.10.2 and 0.11.2
# (maps whose non-negative mass is near zero; one win is 1/256 = 0.0039).
GOLDEN: dict[tuple[str, int | None], tuple] = {
    ('predicatt', 4): ((89.731, 64.346, 99.542), (13.164, 54.609), (0.5993, 0.7969)),
    ('prediction_map', 4): ((89.294, 63.526, 99.470), None, (0.5834, 0.7461)),
    ('weighted_attention', 4): ((86.829, 59.902, 99.521), None, (0.5037, 0.5117)),
    ('mean_attention', None): ((86.534, 59.497, 99.489), None, (0.5000, 0.5000)),
    ('raw_attention', None): ((87.248, 60.113, 98.754), None, (0.5000, 0.5000)),
    ('rollout', None): ((86.747, 59.789, 99.552), None, (0.5000, 0.5000)),
    ('gradcam', None): ((80.682, 48.813, 90.596), (20.742, 35.352), (0.4836, 0.4746)),
    ('generic_attention', None): ((87.655, 60.555, 98.549), None, (0.6044, 0.8047)),
    ('transattr', None): ((88.700, 61.236, 97.964), None, (0.6290, 0.7695)),
    ('lrp', None): ((74.935, 45.909, 81.012), None, (0.4859, 0.4805)),
    ('partial_lrp', None): ((86.787, 57.841, 97.186), None, (0.5011, 0.4961)),
    ('predicatt', 3): ((87.895, 61.429, 99.481), None, (0.5444, 0.6641)),
    ('prediction_map', 3): ((74.220, 45.638, 92.337), None, (0.5374, 0.6250)),
}
GOLDEN_TOL = {("lrp", None): {"seg": 0.3},
              **{(m, None): {"spec": 0.02} for m in ("gradcam", "generic_attention", "transattr")}}
TOL = {"seg": 0.02, "auc": 0.2, "spec": 0.005}


def _tol(key) -> dict:
    return {**TOL, **GOLDEN_TOL.get(key, {})}


def test_golden_tolerances_tell_every_two_methods_apart():
    """No row's golden values, within either row's tolerances, could pass as another's: for every
    two rows some number differs by more than the wider tolerance of the two, twice over."""
    groups = ("seg", "auc", "spec")
    for (k1, v1), (k2, v2) in itertools.combinations(GOLDEN.items(), 2):
        t1, t2 = _tol(k1), _tol(k2)
        margins = [np.abs(np.subtract(v1[i], v2[i])).max() / (2 * max(t1[g], t2[g]))
                   for i, g in enumerate(groups) if v1[i] is not None and v2[i] is not None]
        assert max(margins) > 1, (k1, k2, margins)


@needs_asset
def test_golden_values_of_the_shipped_checkpoint(table):
    got = {(r.method, r.layer): r for r in table.rows}
    assert set(GOLDEN) <= set(got)
    for key, (seg, auc, spec) in GOLDEN.items():
        r = got[key]
        s = r.segmentation
        tol = _tol(key)
        np.testing.assert_allclose([100 * s.pixel_accuracy, 100 * s.miou, 100 * s.mean_ap], seg, atol=tol["seg"],
                                   err_msg=str(key))
        if auc is not None:
            np.testing.assert_allclose([r.perturbation.auc["positive"], r.perturbation.auc["negative"]], auc,
                                       atol=tol["auc"], err_msg=str(key))
        np.testing.assert_allclose([r.specificity.mean_share, r.specificity.win_rate], spec, atol=tol["spec"],
                                   err_msg=str(key))


# ---------------------------------------------------------------- the command

@needs_asset
def test_cli_writes_json_and_markdown(tmp_path, capsys):
    from predmaps.cli import main

    js, md = tmp_path / "d.json", tmp_path / "d.md"
    rc = main(["eval", "digits", "--method", "raw_attention", "--scenes", "6", "--batch-size", "4", "--quiet",
               "--json", str(js), "--markdown", str(md)])
    out = capsys.readouterr().out
    assert rc == 0 and "| raw_attention |" in out
    data = json.loads(js.read_text())
    assert data["scenes"] == 6 and data["rows"][0]["specificity"]["win_rate"] == 0.5
    text = md.read_text()
    assert "predmaps eval digits --method raw_attention" in text and "| raw_attention |" in text


@pytest.mark.parametrize("argv, message", [
    (["--scenes", "0"], "--scenes must be positive"),
    (["--method", "nope"], "unknown method 'nope'"),
    (["--method", "all", "--layer", "-2"], "single --method"),
    (["--model-name", "vit_tiny_patch16_224"], "--model-name names the architecture of a --model weights file"),
])
def test_cli_refuses_bad_requests(argv, message, capsys):
    from predmaps.cli import main

    assert main(["eval", "digits", "--quiet", *argv]) == 2
    assert message in capsys.readouterr().err


def test_wrong_model_is_refused():
    from jaxvit import ViT, ViTConfig

    cfg = ViTConfig(name="t", img_size=(32, 32), patch_size=8, embed_dim=16, depth=1, num_heads=2, mlp_dim=32,
                    num_classes=5)
    model = ViT(cfg)
    params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    with pytest.raises(ValueError, match="10-class digits model"):
        ds.run_benchmark(model, params, scenes=2)
