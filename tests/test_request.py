"""One request check (predmaps.request) and one target builder (predmaps.targets.make_targets).

A bad request must get the same one-line error through every entry point (explain, explain_fn,
the report, the batch pipeline's spec, the evaluation), because they all call `request.check`;
and every target form (words, classes, per-example arrays, ground truth from labels, traced labels)
must build through `make_targets`, which no other module in predmaps/ bypasses.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import predmaps
from jaxvit import ViT, ViTConfig
from predmaps import report
from predmaps.evaluation import perturbation_test_arrays
from predmaps.pipeline import ExplainSpec
from predmaps.request import Request, check
from predmaps.targets import TargetForm, Targets, make_targets, target_form

C = 10


def _model(**kw):
    cfg = ViTConfig(img_size=(16, 16), patch_size=8, embed_dim=16, depth=2, num_heads=2, mlp_dim=32, num_classes=C,
                    **kw)
    model = ViT(cfg)
    return model, model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]


def _errors(model, params, method, **options):
    """The message each entry point gives for (model, method, options), or None where it accepts."""
    x = np.zeros((2, 16, 16, 3), np.float32)

    def message(call):
        try:
            call()
        except ValueError as e:
            return str(e)
        return None

    batch = report.Batch(["a.png", "b.png"], np.full((2, 16, 16, 3), 0.5), x)
    return {
        "explain": message(lambda: predmaps.explain(model, params, x, method=method, **options)),
        "explain_fn": message(lambda: predmaps.explain_fn(model, method=method, **options)),
        "report": None if options else message(
            lambda: report.analyse(model, params, batch, report.ReportOptions(method=method, batch_size=2))),
        "pipeline": message(lambda: ExplainSpec(methods=method, options=options).combos(model)),
        "perturbation": message(lambda: perturbation_test_arrays(model, params, x * 0 + 0.5, np.zeros(2, int),
                                                                 method=method, method_options=options)),
        "check": message(lambda: check(model, method, -1, options)),
    }


@pytest.mark.parametrize("kw, method, options, match", [
    (dict(), "predicat", {}, "unknown method 'predicat'; available: "),
    (dict(class_token=False, global_pool="avg"), "predicatt", {}, "'predicatt' reads class-token attention.*no class "
                                                                  "token; use 'prediction_map'"),
    (dict(global_pool="avg"), "gradcam", {}, "gradcam weights heads .* global_pool='avg' never reads: every map would "
                                             "be 0. Use generic_attention or prediction_map"),
    (dict(global_pool="avg"), "transattr", {}, "transattr propagates relevance .* global_pool='avg' never reads"),
    (dict(), "rollout", dict(start_layer=2), r"start_layer 2 out of range 0\.\.1"),
    (dict(), "lrp", dict(rule="z"), r"rule must be one of \('ours', 'orig'\); got 'z'"),
    (dict(), "predicatt", dict(scores="prob"), r"scores must be one of \('probs', 'logits'\); got 'prob'"),
])
def test_a_bad_request_gets_the_same_error_everywhere(kw, method, options, match):
    model, params = _model(**kw)
    errors = _errors(model, params, method, **options)
    assert errors["check"] is not None and "\n" not in errors["check"]
    assert re.search(match, errors["check"]), errors["check"]
    for where, msg in errors.items():
        if where == "report" and options:
            continue  # the report takes no method options
        assert msg == errors["check"], (where, msg)


def test_the_request_is_frozen_resolved_and_hashable():
    model, _ = _model()
    req = check(model, "predicatt", -2, dict(similarity="cosine"), "top3")
    assert req == Request("predicatt", 1, (("lean", True), ("scores", "probs"), ("similarity", "cosine")),
                          TargetForm("topk", 3))
    assert hash(req) == hash(check(model, "predicatt", 1, dict(similarity="cosine"), "top3"))
    with pytest.raises(AttributeError):
        req.layer = 0
    assert check(model, "rollout").layer is None and check(model, "rollout").options == (("start_layer", 1),)
    assert check(model, "rollout", None, None, "gt").target == TargetForm("labels", 1)
    with pytest.raises(ValueError, match="target must be 'pred' or 'gt'; got 'top'"):
        check(model, "predicatt", target="top", words=("pred", "gt"))
    with pytest.raises(ValueError, match=r"method 'rollout' takes no layer.*leave layer out"):
        check(model, "rollout", 1)


def test_every_target_form_builds_through_make_targets():
    labels = np.array([3, 7, 1])
    cases = [  # (target, kind, k, classes as resolved for 3 images with logits favouring class 9 then 8)
        ("top", "top", 1, [[9]] * 3), ("pred", "top", 1, [[9]] * 3), ("top1", "top", 1, [[9]] * 3),
        ("top2", "topk", 2, [[9, 8]] * 3), ("all", "all", C, [list(range(C))] * 3),
        (4, "given", 1, [[4]] * 3), ("4", "given", 1, [[4]] * 3), (np.int64(4), "given", 1, [[4]] * 3),
        ([2, 5], "given", 2, [[2, 5]] * 3), (labels, "given", 1, [[3], [7], [1]]),
        (np.stack([labels, labels]).T, "given", 2, [[3, 3], [7, 7], [1, 1]]),
        ("gt", "given", 1, [[3], [7], [1]]),
    ]
    logits = jnp.broadcast_to(jnp.arange(C, dtype=jnp.float32), (3, C))
    for target, kind, k, classes in cases:
        t = make_targets(target, 3, C, labels=labels)
        assert isinstance(t, Targets) and (t.kind, t.k) == (kind, k), target
        assert t.resolve(logits).tolist() == classes, target
        form = target_form(target, C)
        assert form.k == k and form.kind == ("labels" if isinstance(target, str) and target == "gt" else kind)
    # Ground truth as a traced per-example target: labels inside jit reuse one executable.
    resolve = jax.jit(lambda lab: make_targets("gt", 3, C, labels=lab).resolve(logits))
    assert resolve(jnp.asarray(labels)).tolist() == [[3], [7], [1]]
    assert resolve(jnp.asarray([0, 0, 2])).tolist() == [[0], [0], [2]] and resolve._cache_size() == 1
    with pytest.raises(ValueError, match="target 'gt' is each example's label, and none were given"):
        make_targets("gt", 3, C)
    with pytest.raises(ValueError, match=r"class index out of range: \[10\]"):
        make_targets("gt", 3, C, labels=np.array([1, 10, 2]))
    with pytest.raises(ValueError, match=r"labels must hold one class per example, shape \(B,\)"):
        make_targets("gt", 3, C, labels=np.zeros((3, 2), int))
    with pytest.raises(ValueError, match="unknown target 'best'"):
        target_form("best", C)


def test_no_module_in_predmaps_or_bench_builds_targets_itself():
    """`Targets(...)` is constructed in predmaps/targets.py only; everything else (bench too) calls make_targets."""
    root = Path(predmaps.__file__).parent
    offenders = []
    for path in [*root.rglob("*.py"), *(root.parent / "bench").rglob("*.py")]:
        if path.name == "targets.py" and path.parent == root:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "Targets":
                offenders.append(f"{path.relative_to(root.parent)}:{node.lineno}")
    assert offenders == []
