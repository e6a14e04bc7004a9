"""The one data layer (predmaps.data): `predmaps run` and `predmaps eval` read a label file the same
way, and refuse a bad one with the same message. They used to disagree: the devkit's
ILSVRC2012_validation_ground_truth.txt with meta.mat beside it was read by eval and refused by run,
and a label 5000 was accepted by run and refused by eval. A label past the model's classes is one
rule with one message through run, eval and `predmaps explain --labels` (eval used to check against
ImageNet's 1000 classes while listing, then against the model with a message of its own).

Each layout is read through the two calls the commands make (`open_inputs` with the model's class
count: run; `imagenet_val`: eval), and checked against labels written out by hand here; each bad
file goes through both command lines, which must print the same error line and exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import jaxvit
from jaxvit import ViTConfig
from jaxvit.labels import imagenet_wnids
from predmaps import cli, read_results, run_cli
from predmaps.data import imagenet_val, open_inputs
from test_pipeline import random_params

WN = imagenet_wnids()
STEMS = [f"ILSVRC2012_val_{i:08d}" for i in (1, 2, 3)]  # the devkit's names: its ground truth is in this order


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny random ViT with ImageNet's 1000 classes: the class count labels are checked against."""
    cfg = ViTConfig(name="tiny-1k", img_size=(32, 32), patch_size=8, embed_dim=32, depth=1, num_heads=2, mlp_dim=64,
                    num_classes=1000, crop_pct=1.0)
    return jaxvit.save(tmp_path_factory.mktemp("ckpt") / "tiny1k", cfg, random_params(cfg))


@pytest.fixture
def flat(tmp_path):
    d = tmp_path / "flat"
    d.mkdir()
    rng = np.random.default_rng(0)
    for stem in STEMS:
        Image.fromarray(rng.integers(0, 255, (36, 40, 3), dtype=np.uint8)).save(d / f"{stem}.png")
    return d


def _meta_mat(folder):
    """The devkit's meta.mat for three classes: ILSVRC2012_IDs 1, 2, 3 are wnids 500, 3 and 42 (not synset order)."""
    scipy_io = pytest.importorskip("scipy.io")
    synsets = np.zeros((3,), dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")])
    for j, (sid, widx) in enumerate([(1, 500), (2, 3), (3, 42)]):
        synsets[j] = (sid, WN[widx], 0)
    scipy_io.savemat(folder / "meta.mat", {"synsets": synsets})


# name -> (file name, its text, the labels of STEMS written out by hand)
LAYOUTS = {
    "caffe val.txt: file and class index": ("val.txt", "".join(f"{s}.png {c}\n" for s, c in zip(STEMS, (7, 3, 999))),
                                            [7, 3, 999]),
    "file and WordNet id, tab separated": ("labels.txt", "".join(
        f"{s}.png\t{WN[c]}\n" for s, c in zip(STEMS, (0, 1, 2))), [0, 1, 2]),
    "stems, comma separated, with a header": ("labels.csv", "file,label\n" + "".join(
        f"{s},{c}\n" for s, c in zip(STEMS, (11, 12, 13))), [11, 12, 13]),
    "Kaggle LOC_val_solution.csv": ("LOC_val_solution.csv", "ImageId,PredictionString\n" + "".join(
        f"{s},{WN[c]} 1 2 3 4 {WN[5]} 5 6 7 8\n" for s, c in zip(STEMS, (20, 21, 22))), [20, 21, 22]),
    "devkit ground truth with meta.mat": ("ILSVRC2012_validation_ground_truth.txt", "2\n3\n1\n", [3, 42, 500]),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_label_layout_reads_the_same_through_run_and_eval(layout, flat, tmp_path):
    name, text, expected = LAYOUTS[layout]
    label_file = tmp_path / name
    label_file.write_text(text)
    if "meta.mat" in layout:
        _meta_mat(tmp_path)
    run = [it.label for it in open_inputs(flat, labels=label_file, num_classes=1000)]  # what explain_dataset calls
    ev = imagenet_val(flat, labels_file=label_file).labels.tolist()  # what `predmaps eval perturbation` calls
    assert run == ev == expected


# name -> (file name, its text, the error both commands print)
BAD = {
    "class index past the model's classes": ("labels.txt", f"{STEMS[0]}.png 3\n{STEMS[1]}.png 5000\n",
                                             "labels.txt:2: class index 5000 is out of range (0..999 for a 1000-class "
                                             "model)"),
    "negative class index": ("labels.txt", f"{STEMS[0]}.png -1\n", "labels.txt:1: class index -1 is out of range"),
    "WordNet id outside ImageNet-1k": ("labels.txt", f"{STEMS[0]}.png n99999999\n",
                                       "labels.txt:1: 'n99999999' is not an ImageNet-1k WordNet id"),
    "devkit ground truth without meta.mat (ambiguous)": ("ILSVRC2012_validation_ground_truth.txt", "65\n970\n1\n",
                                                         "one label per line without file names is ambiguous"),
    "a line without a label": ("labels.txt", f"{STEMS[0]}.png 3\n{STEMS[1]}.png\n",
                               f"labels.txt:2: expected 'file label', got '{STEMS[1]}.png'"),
    "an unreadable label after the first line": ("labels.txt", f"{STEMS[0]}.png 3\n{STEMS[1]}.png cat\n",
                                                 "labels.txt:2: cannot read a class index or WordNet id in"),
    "empty": ("labels.txt", "# nothing\n\n", "labels.txt: no labels found"),
}


@pytest.mark.parametrize("case", BAD)
def test_a_bad_label_file_is_refused_the_same_way_by_run_and_eval(case, ckpt, flat, tmp_path, capsys):
    name, text, message = BAD[case]
    label_file = tmp_path / name
    label_file.write_text(text)
    assert run_cli.main(["--model", str(ckpt), "--images", str(flat), "--labels", str(label_file),
                         "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    run_err = capsys.readouterr().err
    assert cli.main(["eval", "perturbation", "--model", str(ckpt), "--data", str(flat),
                     "--labels", str(label_file)]) == 2
    eval_err = capsys.readouterr().err
    assert "Traceback" not in run_err + eval_err
    run_line, eval_line = ([ln for ln in err.splitlines() if ln.startswith("error:")] for err in (run_err, eval_err))
    assert run_line == eval_line and len(run_line) == 1, (run_err, eval_err)
    assert message in run_line[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # refused before any work


def test_eval_reads_a_label_file_once(ckpt, flat, tmp_path, monkeypatch):
    """`predmaps eval perturbation --labels` reads the file once (it read it three times: checked before the
    model loads, listed, range-checked again) and still scores the images with its labels."""
    from jaxvit import safe_write

    label_file = tmp_path / "labels.txt"
    label_file.write_text("".join(f"{s}.png {c}\n" for s, c in zip(STEMS, (7, 3, 999))))
    reads, read_regular = [], safe_write.read_regular

    def counting(path, *args, **kwargs):
        reads.append(Path(path))
        return read_regular(path, *args, **kwargs)

    monkeypatch.setattr(safe_write, "read_regular", counting)
    out = tmp_path / "eval.json"
    assert cli.main(["eval", "perturbation", "--model", str(ckpt), "--data", str(flat), "--labels", str(label_file),
                     "--batch-size", "3", "--mode", "positive", "--quiet", "--json", str(out)]) == 0
    assert reads.count(label_file) == 1, reads
    result = json.loads(out.read_text())
    assert result["n_images"] == 3 and result["layout"] == "flat files + label file labels.txt"


def test_run_reads_the_devkit_ground_truth_end_to_end(ckpt, flat, tmp_path):
    """`predmaps run --labels` with the devkit's ground truth (refused as ambiguous before): the job's
    labels, and its 'gt' maps' classes, are the devkit's classes through meta.mat."""
    gt = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    gt.write_text("2\n3\n1\n")
    _meta_mat(tmp_path)
    out = tmp_path / "out"
    assert run_cli.main(["--model", str(ckpt), "--images", str(flat), "--labels", str(gt), "--target", "gt",
                         "--out", str(out), "--no-progress"]) == 0
    res = read_results(out)
    assert res.labels.tolist() == [3, 42, 500]
    assert res.classes[next(iter(res.classes))][:, 0].tolist() == [3, 42, 500]


def _tiny(tmp_path_factory, num_classes):
    cfg = ViTConfig(name=f"tiny-{num_classes}", img_size=(32, 32), patch_size=8, embed_dim=32, depth=1, num_heads=2,
                    mlp_dim=64, num_classes=num_classes, crop_pct=1.0)
    return jaxvit.save(tmp_path_factory.mktemp("ckpt") / cfg.name, cfg, random_params(cfg))


@pytest.fixture(scope="module")
def ckpt10(tmp_path_factory):
    """A tiny random ViT with 10 classes, as the embedded digits model: ImageNet labels are past its classes."""
    return _tiny(tmp_path_factory, 10)


def _error_lines(err: str) -> list[str]:
    assert "Traceback" not in err
    return [ln for ln in err.splitlines() if ln.startswith("error:")]


# model classes, the bad label as written, the span the message gives (written out by hand)
OUT_OF_RANGE = [(1000, "5000", 5000, "0..999 for a 1000-class model"), (1000, "-1", -1, "0..999 for a 1000-class model"),
                (10, "12", 12, "0..9 for a 10-class model"), (10, WN[500], 500, "0..9 for a 10-class model")]


@pytest.mark.parametrize("classes, written, value, span", OUT_OF_RANGE)
def test_a_label_past_the_models_classes_is_one_message_through_run_eval_and_explain(
        classes, written, value, span, ckpt, ckpt10, flat, tmp_path, capsys):
    model = ckpt if classes == 1000 else ckpt10
    label_file = tmp_path / "labels.txt"
    label_file.write_text(f"{STEMS[0]}.png 3\n{STEMS[1]}.png {written}\n{STEMS[2]}.png 4\n")
    expected = (f"class index {value} is out of range ({span}): give each input its class index in the model's "
                "class order, or its ImageNet WordNet id")
    assert run_cli.main(["--model", str(model), "--images", str(flat), "--labels", str(label_file),
                         "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    run_lines = _error_lines(capsys.readouterr().err)
    assert cli.main(["eval", "perturbation", "--model", str(model), "--data", str(flat),
                     "--labels", str(label_file)]) == 2
    eval_lines = _error_lines(capsys.readouterr().err)
    assert run_lines == eval_lines == [f"error: {label_file}:2: {expected}"]
    images = [str(flat / f"{s}.png") for s in STEMS]
    assert cli.main(["explain", *images, "--model", str(model), "--labels", f"3,{written},4",
                     "--out", str(tmp_path / "explain")]) == 2
    assert _error_lines(capsys.readouterr().err) == [f"error: --labels: {expected}"]
    assert not (tmp_path / "explain").exists()  # refused before anything is written


def test_class_folders_past_a_small_model_are_refused_alike_by_run_and_eval(ckpt10, tmp_path, capsys):
    """ImageNet class folders give labels up to 999: a 10-class model refuses them, run (maps for the
    ground truth) and eval (its accuracy is against the ground truth) with the same line."""
    root = tmp_path / "val"
    rng = np.random.default_rng(0)
    for c in (2, 500):
        (root / WN[c]).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / WN[c] / "a.png")
    assert run_cli.main(["--model", str(ckpt10), "--images", str(root), "--target", "gt", "--out", str(tmp_path / "o"),
                         "--no-progress"]) == 2
    run_lines = _error_lines(capsys.readouterr().err)
    assert cli.main(["eval", "perturbation", "--model", str(ckpt10), "--data", str(root)]) == 2
    eval_lines = _error_lines(capsys.readouterr().err)
    assert run_lines == eval_lines == [f"error: labels out of range for a 10-class model: [('{WN[500]}/a.png', 500)]"]
