"""The text report and `predmaps explain --text` / `predmaps demo --text` (issue 28): pages written,
well-formed, self-contained and script-free whatever the text holds; the values on a page equal the word
maps of predmaps.text, and those equal the token maps summed over each word's pieces by their character
offsets (a hand computation from the --json file); bad input exits 2 with one line and writes nothing.
A tiny random BERT classifier (hidden 32, 2 layers) built here stands in for a real checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import html
import io
import json
import re
import shutil
import socket
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from convert.hf_text import export_state_dict, is_text_checkpoint, load_text
from jaxvit.text import TextConfig, init_params
from predmaps import cli, report
from predmaps.cli import common
from predmaps.cli import text as text_cli
from predmaps.report import text as text_report
from predmaps.text import explain_text, word_maps

WORDS = ["the", "a", "film", "plot", "was", "wonder", "but", "ending", "dull", "and", "script", "alert", "not",
         "great", "bad", ",", ".", "!", "<", ">", "\"", "'", "&", "(", ")", "/", "##ful", "##s", "##ing"]
LETTERS = list("abcdefghijklmnopqrstuvwxyz")
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + LETTERS + ["##" + c for c in LETTERS]
MAX_POS = 48
INJECTION = "<script>alert(\"x\")</script> the plot & 'ending' was <b>dull</b>"
TEXTS = ["the film was wonderful but the ending was dull", INJECTION]
LONG = " ".join(["the plot was great"] * 16)  # over MAX_POS tokens: truncated


def _hf_config(**overrides) -> dict:
    cfg = dict(architectures=["BertForSequenceClassification"], model_type="bert", vocab_size=len(VOCAB),
               hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, hidden_act="gelu",
               type_vocab_size=2, layer_norm_eps=1e-12, pad_token_id=0, max_position_embeddings=MAX_POS,
               id2label={"0": "negative", "1": "positive"}, label2id={"negative": 0, "positive": 1})
    cfg.update(overrides)
    return cfg


def make_checkpoint(folder: Path, seed: int = 0) -> Path:
    """A transformers BERT sentiment-classifier folder of random weights (unit fan-in scale, so attention
    and the classes differ), written without torch."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    hf = _hf_config()
    (folder / "config.json").write_text(json.dumps(hf))
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    config = TextConfig.from_hf(hf)
    rng = np.random.default_rng(seed)

    def draw(path, v):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return np.float32(1) + 0.2 * rng.standard_normal(v.shape, np.float32)
        if "kernel" in name:
            return (rng.standard_normal(v.shape) / np.sqrt(v.shape[0])).astype(np.float32)
        return rng.standard_normal(v.shape).astype(np.float32) * (1 if "embedding" in name else 0.1)

    params = jax.tree_util.tree_map_with_path(draw, init_params(config))
    save_file(export_state_dict(params, config), str(folder / "model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("bert") / "ckpt")


def run_cli(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def explained(ckpt, tmp_path_factory):
    """One `predmaps explain --text ... --text-file ... --json` run: two --text texts, then a file with an
    empty line, a whitespace-only line and a text too long for the model; PredicAtt_L plus the prediction
    map at layers L and L-1."""
    tmp = tmp_path_factory.mktemp("explain")
    lines = tmp / "texts.txt"
    lines.write_text("not bad\n\n   \n" + LONG + "\n")
    out = tmp / "out"
    args = ["explain", *sum((["--text", t] for t in TEXTS), []), "--text-file", str(lines), "--model", str(ckpt),
            "--method", "prediction_map", "--layers", "-1,-2", "--json", "--out", str(out)]
    rc, stdout, stderr = run_cli(args)
    return rc, stdout, stderr, out


class _WellFormed(HTMLParser):
    """Every element closed in order (void elements excepted); <script>, <iframe>, on* handlers counted."""

    VOID = {"meta", "link", "br", "img", "input", "hr", "wbr", "col", "source"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.errors, self.active = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "iframe", "object", "embed") or any(k.startswith("on") for k, _ in attrs):
            self.active.append(tag)
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()


class _Rows(HTMLParser):
    """Per section (data-method, data-layer) and class row (data-class): the words' data-v and colours."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.sections, self.key, self.cls, self.word = {}, None, None, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section" and "data-method" in a:
            self.key = (a["data-method"], int(a["data-layer"]) if a["data-layer"] else None)
            self.sections[self.key] = {}
        elif tag == "tr" and "data-class" in a and self.key:
            self.cls = int(a["data-class"])
            self.sections[self.key][self.cls] = []
        elif tag == "span" and "data-v" in a and self.cls is not None:
            self.word = [float(a["data-v"]), a["style"], ""]
            self.sections[self.key][self.cls].append(self.word)

    def handle_data(self, data):
        if self.word is not None:
            self.word[2] += data

    def handle_endtag(self, tag):
        if tag == "span":
            self.word = None
        elif tag == "tr":
            self.cls = None
        elif tag == "section":
            self.key = None


def _pages(out: Path) -> list[Path]:
    return sorted((out / "report").glob("0*.html"))


def test_pages_are_written_well_formed_and_self_contained(explained):
    rc, stdout, stderr, out = explained
    assert rc == 0, stderr
    index = out / "report" / "index.html"
    assert f"report: {index.resolve()}" in stdout
    assert report.verify(index) == []  # links resolve, no script, nothing external
    pages = _pages(out)
    assert len(pages) == 4  # two --text, two non-empty lines of the file
    for page in [index, *pages]:
        text = page.read_text()
        checker = _WellFormed()
        checker.feed(text)
        checker.close()
        assert checker.errors == [] and checker.stack == [], page.name
        assert checker.active == [], page.name
        assert "http://" not in text and "https://" not in text and "url(" not in text
    assert all(p.name in index.read_text() for p in pages)


def test_text_is_escaped_so_its_markup_never_becomes_html(explained):
    out = explained[3]
    page = _pages(out)[1].read_text()
    assert "<script" not in page and "<b>" not in page
    assert "&lt;script&gt;" in page and "&lt;b&gt;" in page
    rows = _Rows()
    rows.feed(page)
    words = [w[2] for w in rows.sections[("predicatt", 2)][1]]
    assert " ".join(words) == INJECTION  # the words as written, unescaped by the parser: every character shown
    assert all(html.escape(w) in page for w in INJECTION.split())  # quotes escaped too


def test_page_values_equal_the_word_maps_of_predmaps_text(explained, ckpt):
    out = explained[3]
    data = json.loads((out / text_cli.JSON_NAME).read_text())
    assert [e["text"] for e in data["texts"]] == TEXTS + ["not bad", LONG]
    model, params, tokenizer = load_text(ckpt)
    texts = [e["text"] for e in data["texts"]]
    with pytest.warns(UserWarning, match="truncated"):
        batch = tokenizer(texts)
    for key, name in [(("predicatt", 2), "predicatt_L"), (("prediction_map", 2), "prediction_map_L"),
                      (("prediction_map", 1), "prediction_map_1")]:
        ex = explain_text(model, params, batch, method=key[0], layer=key[1], target="all")
        want = word_maps(ex, batch)
        for i, page in enumerate(_pages(out)):
            rows = _Rows()
            rows.feed(page.read_text())
            shown = rows.sections[key]
            assert sorted(shown) == [0, 1]  # one row per class of the 2-class model
            entry = next(m for m in data["texts"][i]["maps"] if m["name"] == name)
            for c in (0, 1):
                values = np.array([w[0] for w in shown[c]], np.float32)
                assert [w[2] for w in shown[c]] == list(want[i].words)
                # the same 4 texts; the CLI pads them to a bucket length, which changes only summation order
                np.testing.assert_allclose(values, want[i].maps[c], rtol=1e-5, atol=1e-7)
                # the page and the JSON hold the same float32 values, exactly
                np.testing.assert_array_equal(values, np.array(entry["words"][c], np.float32))
                # colour: red at opacity value / the row's largest (the default per-row scale)
                scale = float(np.abs(values).max())
                for v, style, _ in shown[c]:
                    want_style = "transparent" if v == 0 else f"rgba(214,39,40,{abs(v) / scale:.3f})"
                    assert style.split(";")[0] == f"background:{want_style}"
                    assert style.endswith(";color:#fff") == (abs(v) / scale > 0.6)  # legible on dark red


def test_json_word_values_are_the_token_maps_summed_over_each_words_pieces(explained):
    data = json.loads((explained[3] / text_cli.JSON_NAME).read_text())
    assert data["labels"] == ["negative", "positive"] and data["word_reduce"] == "sum"
    for e in data["texts"]:
        assert len(e["tokens"]) == len(e["offsets"]) and e["tokens"][0] == "[CLS]" and e["tokens"][-1] == "[SEP]"
        assert e["classes"] == [0, 1] and abs(sum(e["probs"]) - 1) < 1e-6
        assert [e["text"][s:t] for s, t in e["spans"]] == e["words"]
        for m in e["maps"]:
            tokens = np.array(m["tokens"])  # (K, T)
            assert tokens.shape == (2, len(e["tokens"])) and (tokens[:, [0, -1]] == 0).all()
            by_hand = np.zeros((2, len(e["words"])))
            for j, (s, t) in enumerate(e["offsets"]):
                if t > s:  # a piece belongs to the word whose span holds its characters
                    w = next(k for k, (a, b) in enumerate(e["spans"]) if a <= s < b)
                    by_hand[:, w] += tokens[:, j]
            np.testing.assert_allclose(np.array(m["words"]), by_hand, rtol=1e-5, atol=1e-7)
    assert {m["name"] for m in data["texts"][0]["maps"]} == {"predicatt_L", "prediction_map_L", "prediction_map_1"}


def test_text_file_empty_lines_are_counted_and_truncation_is_said_on_the_page(explained):
    rc, stdout, stderr, out = explained
    assert "note: 2 empty line(s)" in stderr
    assert "2 empty line(s) of" in (out / "report" / "index.html").read_text()
    assert re.search(rf"warning: text 4: this text has \d+ tokens and the model takes {MAX_POS}: truncated", stderr)
    page = _pages(out)[3].read_text()
    assert "<h2>Truncated</h2>" in page and f"the model takes {MAX_POS}: truncated to its first {MAX_POS}" in page
    # the words the model did not see, struck through: in the text shown and in every map row, after the same words
    unseen = re.findall(r"<span class='unseen'[^>]*>([^<]*)</span>", page)
    assert len(unseen) == 1 + 2 * 3 and len(set(unseen)) == 1  # the text, then 2 classes x 3 maps
    data = json.loads((out / text_cli.JSON_NAME).read_text())
    assert LONG.endswith(unseen[0]) and LONG[:-len(unseen[0])].rstrip() == LONG[:data["texts"][3]["spans"][-1][1]]
    data = json.loads((out / text_cli.JSON_NAME).read_text())
    assert [e["truncated"] for e in data["texts"]] == [False, False, False, True]
    assert len(data["texts"][3]["tokens"]) == MAX_POS
    assert "text 4: " in stdout and "(truncated)" in stdout
    assert "Truncated" not in _pages(out)[0].read_text()


def test_the_page_names_the_prediction_and_explains_the_colour_scale(explained):
    out = explained[3]
    data = json.loads((out / text_cli.JSON_NAME).read_text())
    page = _pages(out)[0].read_text()
    pred = data["texts"][0]["predicted"]
    p = data["texts"][0]["probs"][pred]
    assert f"Prediction: {data['labels'][pred]}" in page and f"p = {100 * p:.1f}%" in page
    assert "red = how much of the row's class's map falls on the word" in page
    assert "each row its own scale" in page and "no value on this page is negative" in page
    assert "PredicAtt<sub>L</sub>" in page and "Ψ<sub>L−1</sub>" in page


def _fake_result(i: int, text: str = "good bad") -> text_report.TextResult:
    return text_report.TextResult(index=i, text=text, tokens=("[CLS]", "good", "bad", "[SEP]"),
                                  offsets=((0, 0), (0, 4), (5, 8), (0, 0)), words=("good", "bad"),
                                  spans=((0, 4), (5, 8)), probs=np.array([0.25, 0.75]), classes=np.array([0, 1]),
                                  word_maps={("predicatt", 2): np.array([[0.5, 0.2], [0.2, 0.1]], np.float32)},
                                  token_maps={("predicatt", 2): np.zeros((2, 4), np.float32)})


def test_padding_to_a_bucket_length_leaves_the_maps_as_they_are(ckpt):
    model, params, tokenizer = load_text(ckpt)
    batch = tokenizer(["a film", "the plot was wonderful but the ending was dull"])
    assert text_report.bucket_length(batch.input_ids.shape[1], 48) == 16
    assert [text_report.bucket_length(t, 48) for t in (17, 33, 48)] == [32, 48, 48]
    padded = text_report.pad_batch(batch, 16, tokenizer.config.pad_token_id)
    assert padded.input_ids.shape == (2, 16) and not padded.content_mask[:, batch.input_ids.shape[1]:].any()
    for method in ("predicatt", "rollout"):
        want, got = (word_maps(explain_text(model, params, b, method=method, target="all"), b) for b in (batch, padded))
        for w, g in zip(want, got):
            assert g.words == w.words
            # float32, summation order only: measured <= 1.8e-7 on word values up to 2.1 (2026-12-07, CPU)
            np.testing.assert_allclose(g.maps, w.maps, rtol=1e-5, atol=1e-7)


def test_negative_values_are_blue_and_a_shared_scale_is_said():
    cfg = TextConfig.from_hf(_hf_config())
    r = dataclasses.replace(_fake_result(0), word_maps={
        ("prediction_map", 2): np.array([[0.5, -1.0], [0.2, 0.1]], np.float32)})
    page = text_report.text_page(r, cfg, text_report.TextReportOptions(shared_scale=True), "")
    assert "rgba(31,119,180,1.000)" in page  # -1.0, the largest |value| of the shared scale: full blue
    assert "rgba(214,39,40,0.500)" in page and "rgba(214,39,40,0.100)" in page  # 0.5 and 0.1 of 1.0
    assert "blue marks negative values" in page and "one scale per method and layer" in page


def test_a_run_stopped_midway_still_writes_the_index_of_its_pages(tmp_path):
    cfg = TextConfig.from_hf(_hf_config())

    def results():
        yield _fake_result(0)
        yield _fake_result(1)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        text_report.write_text_report(results(), tmp_path / "r", cfg)
    index = tmp_path / "r" / "index.html"
    assert report.verify(index) == []  # both pages written and linked, no link to a page never made
    assert len(list((tmp_path / "r").glob("0*.html"))) == 2
    assert "Incomplete: this run was interrupted after 2 text(s)" in index.read_text()


def test_the_index_is_split_into_pages_of_per_index_page_rows_as_the_image_reports(tmp_path):
    cfg = TextConfig.from_hf(_hf_config())
    rep = text_report.write_text_report((_fake_result(i, f"text {i}") for i in range(5)), tmp_path / "r", cfg,
                                        text_report.TextReportOptions(per_index_page=2))
    assert report.verify(rep.index) == []  # every index page and text page reachable, no dead link
    assert [p.name for p in rep.index_pages] == ["index.html", "index_2.html", "index_3.html"]
    listed = [re.findall(r"<tr><td><a href='([^']+)'", p.read_text()) for p in rep.index_pages]
    assert listed == [[p.name for p in rep.pages[:2]], [p.name for p in rep.pages[2:4]], [rep.pages[4].name]]
    index = rep.index.read_text()
    assert "Texts (5)" in index and "href='index_3.html'" in index and 'href="index_2.html">next index page' in index
    for i, page in enumerate(rep.pages):  # each text's page leads up to the index page that lists it
        assert f'href="{rep.index_pages[i // 2].name}">↑ index' in page.read_text()


def test_a_bad_index_page_size_is_refused_before_the_folder_is_made(tmp_path):
    """per_index_page < 1 (or not an integer) is refused by name, for the text and the image report alike, and
    leaves no report folder behind."""
    from jaxvit import ViTConfig
    from predmaps.report.html import ReportWriter

    cfg = TextConfig.from_hf(_hf_config())
    for bad in (0, 2.5):
        with pytest.raises(ValueError, match=f"rows per index page must be an integer >= 1; got {bad}"):
            text_report.write_text_report(iter([]), tmp_path / "t", cfg, text_report.TextReportOptions(per_index_page=bad))
        with pytest.raises(ValueError, match="rows per index page must be an integer >= 1"):
            ReportWriter(tmp_path / "i", ViTConfig(), report.ReportOptions(per_index_page=bad))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", ["empty text", "no tokenizer", "unsupported architecture", "not a text model",
                                  "missing text file", "image arguments", "unknown method", "out not ours",
                                  "nothing to explain", "no tokens"])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, ckpt, tmp_path):
    model = str(ckpt)
    argv = ["--text", "a film"]
    out = tmp_path / "out"
    if case == "empty text":
        argv = ["--text", "a film", "--text", "  "]
        want = "--text 2 is empty"
    elif case == "no tokenizer":
        model = str(shutil.copytree(ckpt, tmp_path / "c", ignore=shutil.ignore_patterns("vocab.txt")))
        want = "no tokenizer in"
    elif case == "unsupported architecture":
        model = str(shutil.copytree(ckpt, tmp_path / "c"))
        (tmp_path / "c" / "config.json").write_text(json.dumps(_hf_config(
            architectures=["XLNetForSequenceClassification"], model_type="xlnet")))
        want = "architecture 'XLNetForSequenceClassification' is not supported"
    elif case == "not a text model":
        model = None
        want = "--text and --text-file take texts for a text classifier"
    elif case == "missing text file":
        argv = ["--text-file", str(tmp_path / "nope.txt")]
        want = "--text-file"
    elif case == "image arguments":
        argv = ["cat.jpg", "--text", "a film"]
        want = "image arguments are for images"
    elif case == "no tokens":  # a zero-width space: not whitespace, but BERT's normaliser drops it
        argv = ["--text", "a film", "--text", "\u200b"]
        want = "text 2 ('\\u200b') has no tokens once tokenised"  # the text's repr
    elif case == "nothing to explain":
        argv, model = [], None
        want = "no image given"
    elif case == "unknown method":
        argv += ["--method", "transattr"]
        want = "unknown text method 'transattr'"
    else:
        out.mkdir()
        (out / "mine.txt").write_text("keep")
        want = "is not empty"
    rc, stdout, stderr = run_cli(["explain", *argv, *(["--model", model] if model else []), "--out", str(out)])
    assert rc == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and want in lines[0], stderr
    if case == "out not ours":
        assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    else:
        assert not out.exists()


def test_text_checkpoints_are_told_from_others(ckpt, tmp_path):
    assert is_text_checkpoint(ckpt) and is_text_checkpoint(ckpt / "model.safetensors")
    vit = tmp_path / "vit"
    vit.mkdir()
    (vit / "config.json").write_text(json.dumps({"architectures": ["ViTForImageClassification"],
                                                 "model_type": "vit"}))
    assert not is_text_checkpoint(vit) and not is_text_checkpoint(tmp_path / "missing")
    assert not is_text_checkpoint(common.default_model_path())  # the embedded digit ViT


@pytest.fixture(scope="module")
def demo(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"

    def no_network(*args, **kwargs):
        raise OSError("network access attempted during predmaps demo --text")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(common, "DEFAULT_TEXT_MODEL", ckpt)
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", no_network)
        mp.setattr(socket, "create_connection", no_network)
        rc, stdout, stderr = run_cli(["demo", "--text", "--out", str(out)])
    return rc, stdout, stderr, out


def test_demo_text_runs_offline_on_the_shipped_model_folder(demo):
    rc, stdout, stderr, out = demo
    assert rc == 0, stderr
    index = out / "report" / "index.html"
    assert report.verify(index) == [] and f"report: {index.resolve()}" in stdout
    assert len(_pages(out)) == len(text_cli.DEMO_SENTENCES)
    data = json.loads((out / text_cli.JSON_NAME).read_text())
    assert [e["text"] for e in data["texts"]] == list(text_cli.DEMO_SENTENCES)
    assert "predmaps demo: text classifier" in index.read_text() and "ckpt (shipped with predmaps)" in index.read_text()


def test_demo_text_with_a_model_that_is_no_text_classifier_says_so(tmp_path):
    rc, stdout, stderr = run_cli(["demo", "--text", "--model", str(common.default_model_path()),
                                  "--out", str(tmp_path / "out")])
    assert rc == 2 and "not a text classifier checkpoint" in stderr and not (tmp_path / "out").exists()


def test_demo_text_without_the_shipped_model_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "DEFAULT_TEXT_MODEL", tmp_path / "absent")
    rc, stdout, stderr = run_cli(["demo", "--text", "--out", str(tmp_path / "out")])
    assert rc == 2 and "the shipped text classifier is missing from" in stderr
    assert not (tmp_path / "out").exists()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (Debian: apt-get install chromium; "
                    ".ci/run installs it): the text page is not rendered")
def test_text_page_renders_in_headless_chromium_with_its_words_coloured(explained):
    page = _pages(explained[3])[1]  # the one with markup in its text
    with tempfile.TemporaryDirectory() as profile:
        def chromium(*args):
            proc = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args, page.resolve().as_uri()],
                                  capture_output=True, text=True, timeout=120)
            assert proc.returncode == 0, proc.stderr[-2000:]
            return proc.stdout

        dom = chromium("--dump-dom")
        shot = Path(profile) / "page.png"
        chromium("--window-size=1000,1400", f"--screenshot={shot}")
        arr = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    # the DOM after rendering: the words are there as text, and the text's markup made no element
    assert "<script" not in dom and "&lt;script&gt;alert" in dom and "<b>dull</b>" not in dom
    assert "Prediction:" in dom and "ending" in dom
    # some words are drawn on red: pixels where red clearly dominates
    reddish = (arr[..., 0] > 200) & (arr[..., 1] < 170) & (arr[..., 2] < 170)
    assert reddish.sum() > 100, reddish.sum()


def test_the_method_help_names_the_methods_text_lacks():
    # explain --help says text takes every image method but the LRP ones; kept true here
    from predmaps.explain import METHODS
    from predmaps.text import TEXT_METHODS

    assert set(METHODS) - set(TEXT_METHODS) == {"transattr", "lrp", "partial_lrp"}
    assert set(TEXT_METHODS) <= set(METHODS)
