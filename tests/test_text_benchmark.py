"""The offline text benchmark: the sentence generator's rule, its lexicon subset, the scores on hand-made
maps, and the shipped text classifier (predmaps/assets/text_sentiment)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from predmaps import sentiment
from predmaps.evaluation import text_scenes
from predmaps.sentiment import Sentence

MODEL_DIR = text_scenes.DEFAULT_MODEL


def _tsv(path) -> dict[str, float]:
    """The shipped valence table read by hand (independent of sentiment.load_lexicon)."""
    rows = path.read_text().splitlines()[1:]
    return {w: float(r) for w, r in (line.split("\t") for line in rows)}


@pytest.mark.parametrize("ratings, label", [
    ([2.5], 1), ([-2.1], 0), ([-2.1, 2.6], None),  # sum 0.5: ambiguous
    ([-3.0, 2.0], 0), ([2.0, -2.5, 2.0], 1),         # sums -1.0 (the margin, inclusive) and +1.5
    ([2.4, -3.3], None),                              # -0.9
])
def test_label_rule_by_hand(ratings, label):
    assert sentiment.label_of(ratings) == label


@pytest.mark.parametrize("kind", sentiment.KINDS)
def test_generated_labels_follow_the_rule(kind):
    lex = _tsv(sentiment.LEXICON_FILE)
    sents = sentiment.generate(300, kind, seed=11)
    for s in sents:
        ratings = [lex.get(w, 0.0) for w in s.words]
        assert list(s.ratings) == ratings
        total = sum(ratings)
        assert abs(total) >= sentiment.MARGIN and s.label == (1 if total > 0 else 0), s.text
        signs = {np.sign(r) for r in ratings if r}
        assert signs == ({-1.0, 1.0} if kind == "mixed" else {1.0 if s.label else -1.0}), s.text
        assert 1 <= sum(r != 0 for r in ratings) <= (4 if kind == "mixed" else 3)
        assert s.text == " ".join(s.words) and s.text == s.text.lower()
    assert {s.label for s in sents} == {0, 1}
    assert [s.text for s in sentiment.generate(20, kind, seed=11)] == [s.text for s in sents[:20]]
    assert [s.text for s in sentiment.generate(20, kind, seed=12)] != [s.text for s in sents[:20]]


def test_fillers_carry_no_rating():
    fillers = sentiment.filler_words()
    assert fillers and not fillers & set(_tsv(sentiment.LEXICON_FILE))
    for s in sentiment.generate(100, "mixed", seed=3):
        for w, r in zip(s.words, s.ratings):
            assert (r == 0.0) == (w in fillers), w


def test_fillers_are_not_in_vaders_whole_lexicon():
    pytest.importorskip("vaderSentiment")
    assert not sentiment.filler_words() & set(sentiment.vader_ratings())


def test_shipped_lexicon_subset_equals_the_package():
    pytest.importorskip("vaderSentiment")
    from importlib.resources import files

    # The package's file parsed here, the subset rule applied by hand.
    expected = {}
    for line in files("vaderSentiment").joinpath("vader_lexicon.txt").read_text(encoding="utf-8").splitlines():
        word, mean, std = line.split("\t")[:3]
        if word.isascii() and word.isalpha() and word.islower() and len(word) >= 3 and abs(float(mean)) >= 2.0 \
                and float(std) <= 0.8:
            expected[word] = float(mean)
    assert _tsv(sentiment.LEXICON_FILE) == expected
    assert (sentiment.LEXICON_DIR / "LICENSE.txt").read_text().startswith("The MIT License")


def test_scores_on_hand_made_maps():
    decisive = np.array([False, True, True, False])
    assert text_scenes.decisive_share([1.0, -2.0, 3.0, 0.0], decisive) == pytest.approx(3 / 4)
    assert text_scenes.decisive_share([-1.0, -2.0, 0.0, 0.0], decisive) == 0.0  # no positive mass
    # top-2 of [0.1, 0.9, 0.5, 0.7] are words 1 and 3; only word 3 is decisive
    assert text_scenes.topk_hit([0.1, 0.9, 0.5, 0.7], [True, False, False, True]) == 0.5
    assert text_scenes.topk_hit([1.0, 1.0, 1.0], [False, False, True]) == 0.0  # ties: the earlier word first
    classes = np.array([-1, 0, 1, 1])
    maps = np.array([[5.0, 2.0, 1.0, -4.0],    # class 0: 2 on its word, 1 on class 1's (the -4 is not mass)
                     [0.0, 3.0, 0.5, 0.5]])    # class 1: 1 on its words, 3 on class 0's
    np.testing.assert_allclose(text_scenes.class_masses(maps, classes), [[2.0, 1.0], [3.0, 1.0]])


def test_score_aggregates_by_hand():
    single = [Sentence(("the", "awful", "box"), (0.0, -2.5, 0.0), 0),
              Sentence(("great", "lamp", "superb"), (3.1, 0.0, 2.9), 1)]
    single_maps = [np.array([[1.0, 1.0, 2.0], [9.0, 0.0, 0.0]]),   # pred 0: share 1/4, top-1 is "box": 0
                   np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 2.0]])]   # pred 1: share 3/4, top-2 "superb", "great": 1
    mixed = [Sentence(("awful", "lamp", "great"), (-2.5, 0.0, 3.1), 1)]
    mixed_maps = [np.array([[2.0, 9.0, 1.0], [1.0, 0.0, 1.0]])]    # class 0 wins (2 > 1), class 1 ties (1 = 1)
    share, hit, spec = text_scenes.score(single, single_maps, [0, 1], mixed, mixed_maps)
    assert share == pytest.approx((1 / 4 + 3 / 4) / 2)
    assert hit == pytest.approx((0 + 1) / 2)
    assert spec.n == 2 and spec.win_rate == pytest.approx((1 + 0.5) / 2)
    assert spec.mean_share == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert text_scenes.no_mass([np.array([[0.0, -1.0], [1.0, 0.0]]), np.array([[0.0, 2.0], [0.0, 0.0]])], [0, 1]) == 1.0
    assert text_scenes.no_mass(single_maps, [0, 1]) == 0.0


def test_bounds_are_one_and_chance():
    single, mixed = sentiment.generate(50, "single", 5), sentiment.generate(50, "mixed", 5)
    rng = np.random.default_rng(0)
    oracle = text_scenes.score(single, text_scenes.bound_maps("lexicon oracle", single, rng), [s.label for s in single],
                               mixed, text_scenes.bound_maps("lexicon oracle", mixed, rng))
    assert oracle[0] == 1.0 and oracle[1] == 1.0 and oracle[2].win_rate == 1.0
    # A constant map spreads its mass evenly: share = rated words / words.
    flat = [np.ones((2, len(s.words))) for s in single]
    share, _, _ = text_scenes.score(single, flat, [s.label for s in single], [], [])
    assert share == pytest.approx(np.mean([np.mean(s.word_classes >= 0) for s in single]))


def test_shipped_model_loads_and_classifies():
    from convert.hf_text import load_text

    cfg = json.loads((MODEL_DIR / "config.json").read_text())
    assert cfg["architectures"] == ["BertForSequenceClassification"]
    assert cfg["id2label"] == {"0": "negative", "1": "positive"}
    assert sum(f.stat().st_size for f in MODEL_DIR.iterdir()) < 4e6  # small: a few MB at most
    model, params, tok = load_text(MODEL_DIR)
    sents = [Sentence(tuple(t.split()), (), label) for t, label in [
        ("the lamp stood near the wonderful garden", 1), ("we walked past the horrible bridge at noon", 0),
        ("a brilliant chair and a lovely desk", 1), ("the tragic report sat beside the disgusting box", 0)]]
    sents += sentiment.generate(16, "single", seed=123456)
    batch = tok([s.text for s in sents])
    logits = np.asarray(model.apply({"params": params}, batch.input_ids, batch.attention_mask).logits)
    assert logits.argmax(-1).tolist() == [s.label for s in sents]


def test_shipped_model_reads_in_transformers_with_the_same_logits():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from convert.hf_text import load_text

    texts = ["the lamp stood near the wonderful garden", "we walked past the horrible bridge at noon"]
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(MODEL_DIR).eval()
    enc = transformers.AutoTokenizer.from_pretrained(MODEL_DIR)(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = hf(**enc).logits.numpy()
    model, params, tok = load_text(MODEL_DIR)
    batch = tok(texts)
    assert batch.input_ids.tolist() == enc["input_ids"].tolist()
    ours = np.asarray(model.apply({"params": params}, batch.input_ids, batch.attention_mask).logits)
    # Same float32 computation in two libraries: 1e-4 covers summation-order differences, far below the logits' scale.
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    assert hf.config.id2label == {0: "negative", 1: "positive"}


def test_benchmark_on_the_shipped_model_small():
    from convert.hf_text import load_text

    model, params, tok = load_text(MODEL_DIR)
    res = text_scenes.run_benchmark(model, params, tok, sentences=8, batch_size=4, rows=[("predicatt", -1)])
    names = [r.method for r in res.rows]
    assert names == ["predicatt", "random", "lexicon oracle"]
    oracle = res.rows[-1]
    assert oracle.mass_share == 1.0 and oracle.specificity.win_rate == 1.0
    assert 0.0 <= res.rows[0].mass_share <= 1.0 and res.rows[0].specificity.n == 16
    assert "| predicatt | L | yes |" in res.markdown()


def test_cli_refuses_a_missing_model(tmp_path, capsys):
    assert text_scenes.main(["--model", str(tmp_path / "nothing"), "--sentences", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --model") and err.count("\n") == 1


@pytest.mark.slow
def test_train_text_writes_a_checkpoint_load_text_reads(tmp_path):
    from convert.hf_text import load_text
    from predmaps import train_text

    r = train_text.train(tmp_path / "m", steps=2, warmup=1, batch=8, hidden=16, layers=1, heads=2, vocab_size=300,
                         log_every=1, command="test",
                         corpus_sentences=200, eval_sentences=20)
    assert len(r["log"]) == 2 and 0.0 <= r["accuracy_single"] <= 1.0
    model, params, tok = load_text(tmp_path / "m")
    assert model.config.labels == ("negative", "positive") and model.config.num_layers == 1
    assert "steps x batch | 2 x 8" in (tmp_path / "m" / "TRAINING.md").read_text()


def test_shipped_model_gradcam_equals_torch_reference_and_chefers_pooling():
    # GradCAM's empty maps on the shipped model (docs/text-benchmark.md) are the method's, not ours: on benchmark
    # sentences ours equals the torch reference (<= 1e-6: float32 maps of scale ~1e-2, same computation in two
    # libraries), and Chefer's BERT generate_attn_gradcam pooling (per head the mean of the gradient over all
    # T x T entries, clamp(mean_h(A * w)), [CLS] row), written here in numpy on transformers' autograd, is
    # positive on exactly the same tokens.
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from bench.torch_text_reference import gradcam
    from convert.hf_text import load_text
    from predmaps import text as ptext

    model, params, tok = load_text(MODEL_DIR)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(MODEL_DIR, attn_implementation="eager").eval()
    seed = text_scenes.DEFAULT_SEED
    sents = sentiment.generate(8, "single", seed) + sentiment.generate(8, "mixed", seed)
    batch = tok([s.text for s in sents])
    ours = np.asarray(ptext.explain_text(model, params, batch, method="gradcam", target="all").maps)
    ids, mask = torch.as_tensor(batch.input_ids).long(), torch.as_tensor(batch.attention_mask).long()
    want = gradcam(hf, ids, mask, target=torch.arange(2).expand(len(ids), 2)).numpy()
    np.testing.assert_allclose(ours, want, atol=1e-6, rtol=0)
    out = hf(input_ids=ids, attention_mask=mask, output_attentions=True)
    real = batch.attention_mask.astype(bool)
    pair = (real[:, None, :, None] & real[:, None, None, :]).astype(np.float32)
    a = out.attentions[-1].detach().numpy()
    for c in (0, 1):
        (g,) = torch.autograd.grad(out.logits[:, c].sum(), out.attentions[-1], retain_graph=True)
        w = (g.numpy() * pair).sum((2, 3), keepdims=True) / pair.sum((2, 3), keepdims=True)
        chefer = np.maximum((a * w).mean(1), 0)[:, 0] * batch.content_mask
        np.testing.assert_array_equal(chefer > 0, ours[:, c] > 0)
    predicted = ours[np.arange(len(sents)), np.asarray(out.logits.argmax(-1))]
    assert (ours > 0).any(-1).sum() >= 8  # the parity above compares non-empty maps too
    assert (predicted[:8] > 0).any(-1).sum() <= 1  # single-class, predicted class: empty (99.0% of 1000 in the doc)
