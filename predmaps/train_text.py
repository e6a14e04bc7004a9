"""Train the small sentiment BERT that predmaps ships (`predmaps/assets/text_sentiment/`).

    python -m predmaps.train_text --out predmaps/assets/text_sentiment

A `BertForSequenceClassification` of a few layers (hidden 64 by default), trained from scratch with
AdamW (linear warm-up, cosine decay) on the sentences of `predmaps.sentiment` (VADER-rated words in
neutral filler), drawn fresh every step from the training seed: half single-class, half mixed. Its
WordPiece vocabulary is trained with Hugging Face `tokenizers` on the lexicon, the filler words and
20,000 training sentences. Accuracy is measured on sentences of a held-out seed (`EVAL_SEED`).

The folder written is a Hugging Face checkpoint: config.json (architectures
["BertForSequenceClassification"], id2label negative / positive), model.safetensors with transformers'
tensor names (`convert.hf_text.export_state_dict`), tokenizer.json + tokenizer_config.json; read by
`convert.load_text(out)` and by `transformers.AutoModelForSequenceClassification.from_pretrained(out)`.
TRAINING.md records the command, seed, time and accuracy.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from convert.hf_text import export_state_dict
from jaxvit import safe_write
from jaxvit.text import TextConfig, TextEncoder, init_params
from jaxvit.tokenizer import TextTokenizer
from predmaps import sentiment
from predmaps.machine import cpu_name

EVAL_SEED = 999_999_937  # held out: training draws seeds seed * 1_000_003 + step (0..steps-1 for seed 0)
EVAL_SENTENCES = 1000
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # [PAD] = id 0 = pad_token_id
MAX_TOKENS = 48  # every training batch is padded to this (one compiled shape)


def build_tokenizer(vocab_size: int, seed: int, sentences: int = 10_000):
    """A BERT-style WordPiece tokenizer (lowercase, [CLS] X [SEP]) trained on the lexicon, the filler and
    `sentences` training sentences of each kind."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    corpus = sorted(sentiment.load_lexicon()) + sorted(sentiment.filler_words())
    corpus += [s.text for kind in sentiment.KINDS for s in sentiment.generate(sentences, kind, seed=seed)]
    tok.train_from_iterator(corpus, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS)))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tok


def hf_config(cfg: TextConfig) -> dict:
    """The transformers config.json of a BertForSequenceClassification with these sizes."""
    return {
        "architectures": ["BertForSequenceClassification"], "model_type": "bert", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.intermediate_size, "hidden_act": cfg.hidden_act,
        "max_position_embeddings": cfg.max_position_embeddings, "type_vocab_size": cfg.type_vocab_size,
        "layer_norm_eps": cfg.layer_norm_eps, "pad_token_id": cfg.pad_token_id, "position_embedding_type": "absolute",
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02,
        "classifier_dropout": None, "problem_type": "single_label_classification",
        "id2label": {str(i): n for i, n in enumerate(cfg.labels)}, "label2id": {n: i for i, n in enumerate(cfg.labels)},
    }


def encode(tokenizer: TextTokenizer, texts, length: int = MAX_TOKENS):
    """(input_ids, attention_mask) (B, length), padded; refuses a text longer than `length` tokens."""
    b = tokenizer(texts)
    t = b.input_ids.shape[1]
    if t > length:
        raise ValueError(f"a training sentence has {t} tokens, more than {length}")
    pad = ((0, 0), (0, length - t))
    return np.pad(b.input_ids, pad), np.pad(b.attention_mask, pad)


def batch_at(tokenizer, n: int, seed: int, step: int):
    """One step's sentences (half single, half mixed), deterministic in (seed, step)."""
    s = seed * 1_000_003 + step
    sents = sentiment.generate(n // 2, "single", seed=s) + sentiment.generate(n - n // 2, "mixed", seed=s)
    ids, mask = encode(tokenizer, [x.text for x in sents])
    return ids, mask, np.array([x.label for x in sents], np.int32)


def accuracy(model, params, tokenizer, kind: str, n: int = EVAL_SENTENCES, seed: int = EVAL_SEED,
             batch: int = 250) -> float:
    """Share of n held-out sentences of `kind` classified as their label."""
    sents = sentiment.generate(n, kind, seed=seed)
    fwd = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m).logits)
    hits = 0
    for start in range(0, n, batch):
        chunk = sents[start:start + batch]
        ids, mask = encode(tokenizer, [s.text for s in chunk])
        hits += int((np.asarray(fwd(params, ids, mask)).argmax(-1) == [s.label for s in chunk]).sum())
    return hits / n


def train(out: str | os.PathLike, *, steps: int = 2000, seed: int = 0, batch: int = 64, lr: float = 2e-3,
          warmup: int = 100, weight_decay: float = 0.01, hidden: int = 64, layers: int = 3, heads: int = 4,
          vocab_size: int = 2000, log_every: int = 100, command: str | None = None,
          corpus_sentences: int = 10_000, eval_sentences: int = EVAL_SENTENCES) -> dict:
    """Train, evaluate, save the Hugging Face folder and TRAINING.md; returns the record."""
    out = safe_write.make_dir(out)
    t0 = time.perf_counter()
    hf_tok = build_tokenizer(vocab_size, seed, corpus_sentences)
    cfg = TextConfig(architecture="BertForSequenceClassification", vocab_size=hf_tok.get_vocab_size(),
                     hidden_size=hidden, num_layers=layers, num_heads=heads, intermediate_size=4 * hidden,
                     max_position_embeddings=64, type_vocab_size=2, layer_norm_eps=1e-12, hidden_act="gelu",
                     pad_token_id=hf_tok.token_to_id("[PAD]"), labels=sentiment.LABEL_NAMES)
    tokenizer = TextTokenizer(hf_tok, cfg)
    model = TextEncoder(cfg)
    params = init_params(cfg, seed)
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, steps, lr * 0.01)
    decay = jax.tree_util.tree_map(lambda a: a.ndim >= 2, params)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=weight_decay, mask=decay))
    opt_state = opt.init(params)

    @jax.jit
    def step_fn(params, opt_state, ids, mask, labels):
        def loss_fn(p):
            logits = model.apply({"params": p}, ids, mask).logits
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, (logits.argmax(-1) == labels).mean()

    log = []
    losses, accs = [], []
    for step in range(steps):
        ids, mask, labels = batch_at(tokenizer, batch, seed, step)
        params, opt_state, loss, acc = step_fn(params, opt_state, ids, mask, labels)
        losses.append(float(loss))
        accs.append(float(acc))
        if (step + 1) % log_every == 0 or step + 1 == steps:
            line = (f"step {step + 1}/{steps} loss {np.mean(losses):.4f} batch acc {np.mean(accs):.3f} "
                    f"lr {float(schedule(step)):.2e} {time.perf_counter() - t0:.0f}s")
            print(line, flush=True)
            log.append(line)
            losses, accs = [], []
    train_seconds = time.perf_counter() - t0
    record = {"steps": steps, "seed": seed, "batch": batch, "lr": lr, "warmup": warmup, "weight_decay": weight_decay,
              "hidden": hidden, "layers": layers, "heads": heads, "vocab_size": cfg.vocab_size,
              "train_seconds": round(train_seconds, 1), "log": log, "eval_seed": EVAL_SEED,
              "accuracy_single": accuracy(model, params, tokenizer, "single", eval_sentences),
              "accuracy_mixed": accuracy(model, params, tokenizer, "mixed", eval_sentences),
              "eval_sentences": eval_sentences,
              "command": command or "python -m predmaps.train_text " + " ".join(map(shlex.quote, sys.argv[1:])),
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    save(out, cfg, params, hf_tok)
    _write_record(out, record)
    return record


def save(out: Path, cfg: TextConfig, params, hf_tok) -> None:
    """The Hugging Face folder: config.json, model.safetensors, tokenizer.json, tokenizer_config.json."""
    from safetensors.numpy import save

    safe_write.write_text(out / "config.json", json.dumps(hf_config(cfg), indent=2) + "\n")
    safe_write.write_bytes(out / "model.safetensors", save(export_state_dict(params, cfg), metadata={"format": "pt"}))
    safe_write.write_text(out / "tokenizer.json", hf_tok.to_str())
    tok_cfg = {"tokenizer_class": "BertTokenizerFast", "do_lower_case": True, "model_max_length": cfg.max_tokens,
               "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
               "mask_token": "[MASK]"}
    safe_write.write_text(out / "tokenizer_config.json", json.dumps(tok_cfg, indent=2) + "\n")


def _write_record(out: Path, r: dict) -> None:
    import flax
    import tokenizers

    text = f"""# text_sentiment: how it was made

A BertForSequenceClassification ({r['layers']} layers, hidden {r['hidden']}, {r['heads']} heads, WordPiece
vocabulary of {r['vocab_size']}) trained from scratch by `predmaps/train_text.py` on the sentences of
`predmaps/sentiment.py`: VADER-rated words ({sentiment.SUBSET_RULE}) placed in neutral filler,
labelled by the sign of the sum of their ratings (|sum| < {sentiment.MARGIN} redrawn). Half of each batch
single-class sentences, half mixed (words of both classes).

    {r['command']}

| | |
|---|---|
| date | {r['date']} |
| steps x batch | {r['steps']} x {r['batch']} (fresh sentences every step, seed {r['seed']}) |
| optimiser | AdamW, peak lr {r['lr']}, {r['warmup']} warm-up steps, cosine decay, weight decay {r['weight_decay']}, clip 1.0 |
| wall time | {r['train_seconds']} s (tokenizer + training, before the evaluation) |
| accuracy, held-out seed {r['eval_seed']} | single-class {100 * r['accuracy_single']:.1f}%, mixed {100 * r['accuracy_mixed']:.1f}% ({r['eval_sentences']} sentences each) |
| machine | {os.cpu_count()}-core CPU ({cpu_name()}), {platform.system()} {platform.machine()}, shared with other jobs |
| software | python {platform.python_version()}, jax {jax.__version__}, flax {flax.__version__}, optax {optax.__version__}, tokenizers {tokenizers.__version__} |

The held-out sentences use the same lexicon words as training (the model learns each word's valence; the
benchmark tests the explanations, not generalisation to unseen words).

Training log:

    {chr(10).join('    ' + line for line in r['log']).strip()}
"""
    safe_write.write_text(out / "TRAINING.md", text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m predmaps.train_text", description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output folder (config.json, model.safetensors, tokenizer.json, "
                                                 "TRAINING.md)")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab-size", type=int, default=2000)
    ap.add_argument("--log-every", type=int, default=100)
    a = ap.parse_args(argv)
    for name in ("steps", "batch", "hidden", "layers", "heads", "vocab_size", "log_every"):
        if getattr(a, name) <= 0:
            print(f"error: --{name.replace('_', '-')} must be positive", file=sys.stderr)
            return 2
    if a.hidden % a.heads:
        print(f"error: --hidden {a.hidden} is not divisible by --heads {a.heads}", file=sys.stderr)
        return 2
    r = train(a.out, steps=a.steps, seed=a.seed, batch=a.batch, lr=a.lr, warmup=a.warmup, hidden=a.hidden,
              layers=a.layers, heads=a.heads, vocab_size=a.vocab_size, log_every=a.log_every)
    print(f"accuracy (held-out seed {EVAL_SEED}): single {r['accuracy_single']:.4f}, mixed {r['accuracy_mixed']:.4f}; "
          f"{r['train_seconds']} s -> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
