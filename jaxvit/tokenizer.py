"""Tokenisation for the text encoder, with Hugging Face's `tokenizers` library (never hand-written).

A checkpoint folder's `tokenizer.json` is read as it is; without one, BERT's `vocab.txt` (WordPiece,
lowercased unless tokenizer_config.json says do_lower_case=false) or RoBERTa's `vocab.json` +
`merges.txt` (byte-level BPE with <s> ... </s>) is built the way transformers' fast tokenizers build it.

Texts longer than the model's positions are TRUNCATED, with a warning that names the text and how many
tokens were dropped (the closing [SEP] / </s> is kept); `TextBatch.truncated` records which. Refusing
would make every long review unexplainable; the maps cover the words the model saw, and only those.
Empty (or whitespace-only) texts are refused.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from pathlib import Path

import numpy as np

from jaxvit.text import TextConfig

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json")


class MissingTokenizerError(FileNotFoundError):
    """A checkpoint folder without the files a tokenizer is built from."""


@dataclasses.dataclass(frozen=True)
class TextBatch:
    """Texts tokenised and padded to the batch's longest; arrays (B, T).

    input_ids int32; attention_mask bool (False at padding); token_type_ids int32 (zeros); special
    bool (True at [CLS]/[SEP]/<s>/</s> and padding: no map covers them); tokens: each text's token
    strings (unpadded); offsets: each token's (start, end) characters in its original text ((0, 0) for
    special tokens); truncated: whether the text was cut to the model's length.
    """

    texts: tuple[str, ...]
    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray
    special: np.ndarray
    tokens: tuple[tuple[str, ...], ...]
    offsets: tuple[tuple[tuple[int, int], ...], ...]
    truncated: tuple[bool, ...]

    @property
    def content_mask(self) -> np.ndarray:
        """(B, T) bool: the tokens a map covers (the text's own word pieces)."""
        return self.attention_mask & ~self.special

    def __len__(self) -> int:
        return len(self.texts)

    def word_index(self, i: int) -> tuple[list[tuple[int, int]], np.ndarray]:
        """Text i's words, as whitespace-separated (start, end) character spans, and each token's word
        (T,) int (-1: special, padding, or a piece with no characters of its own)."""
        text = self.texts[i]
        spans = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
        starts = np.array([s for s, _ in spans])
        which = np.full(self.input_ids.shape[1], -1)
        for j, (s, e) in enumerate(self.offsets[i]):
            if self.content_mask[i, j] and e > s:
                w = int(np.searchsorted(starts, s, side="right")) - 1  # the last word starting at or before s
                if w >= 0 and s < spans[w][1]:
                    which[j] = w
        return spans, which


class TextTokenizer:
    """`tokenizer(texts)` -> `TextBatch`, for one checkpoint (`from_folder`)."""

    def __init__(self, tokenizer, config: TextConfig):
        self._tok = tokenizer
        self._tok.no_padding()
        self._tok.no_truncation()
        self.config = config

    @classmethod
    def from_folder(cls, folder: str | Path, config: TextConfig) -> TextTokenizer:
        folder = Path(folder)
        files = {f: folder / f for f in TOKENIZER_FILES if (folder / f).is_file()}
        try:
            if "tokenizer.json" in files:
                from tokenizers import Tokenizer

                return cls(Tokenizer.from_file(str(files["tokenizer.json"])), config)
            options = _read_options(files.get("tokenizer_config.json"))
            if "vocab.txt" in files and config.family != "roberta":
                from tokenizers.implementations import BertWordPieceTokenizer

                return cls(BertWordPieceTokenizer(str(files["vocab.txt"]), lowercase=bool(options.get("do_lower_case",
                                                                                                   True))), config)
            if "vocab.json" in files and "merges.txt" in files and config.family == "roberta":
                return cls(_roberta_bpe(files["vocab.json"], files["merges.txt"], options), config)
        except MissingTokenizerError:
            raise
        except Exception as e:  # the library's own errors for a damaged file: one line naming the folder
            raise ValueError(f"cannot read the tokenizer in {folder}: {type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}") from None
        wanted = ("vocab.json + merges.txt (RoBERTa byte-level BPE)" if config.family == "roberta"
                  else "vocab.txt (BERT WordPiece)")
        raise MissingTokenizerError(f"no tokenizer in {folder}: it needs tokenizer.json or {wanted}; copy the "
                                    "tokenizer files that came with the checkpoint into the folder")

    def __call__(self, texts) -> TextBatch:
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts:
            raise ValueError("no texts given: pass at least one")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text {i} is a {type(text).__name__}, not a str")
            if not text.strip():
                raise ValueError(f"text {i} is empty: give at least one word to explain")
        limit = self.config.max_tokens
        encodings = self._tok.encode_batch(texts)
        long = [i for i, e in enumerate(encodings) if len(e.ids) > limit]
        if long:
            for i in long:
                warnings.warn(f"text {i} has {len(encodings[i].ids)} tokens and the model takes {limit}: truncated "
                              f"to its first {limit} (the maps cover those words only)", UserWarning, stacklevel=2)
            self._tok.enable_truncation(limit)
            try:
                for i in long:
                    encodings[i] = self._tok.encode(texts[i])
            finally:
                self._tok.no_truncation()
        for i, e in enumerate(encodings):
            if not any(m == 0 for m in e.special_tokens_mask):
                raise ValueError(f"text {i} ({texts[i][:40]!r}) has no tokens once tokenised (only characters the "
                                 "tokenizer drops): give words")
        top = max(max(e.ids) for e in encodings)
        if top >= self.config.vocab_size:  # an embedding look-up would clamp it silently
            raise ValueError(f"the tokenizer gave token id {top} and the model has {self.config.vocab_size} "
                             "embeddings: the tokenizer files belong to another checkpoint")
        t = max(len(e.ids) for e in encodings)
        b = len(texts)
        ids = np.full((b, t), self.config.pad_token_id, np.int32)
        mask = np.zeros((b, t), bool)
        types = np.zeros((b, t), np.int32)
        special = np.ones((b, t), bool)
        for i, e in enumerate(encodings):
            n = len(e.ids)
            ids[i, :n] = e.ids
            mask[i, :n] = True
            types[i, :n] = e.type_ids
            special[i, :n] = np.asarray(e.special_tokens_mask, bool)
        return TextBatch(tuple(texts), ids, mask, types, special, tuple(tuple(e.tokens) for e in encodings),
                         tuple(tuple(tuple(o) for o in e.offsets) for e in encodings),
                         tuple(i in long for i in range(b)))


def _read_options(path: Path | None) -> dict:
    if path is None:
        return {}
    try:
        options = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    return options if isinstance(options, dict) else {}


def _roberta_bpe(vocab: Path, merges: Path, options: dict):
    """transformers' RobertaTokenizerFast from vocab.json + merges.txt: byte-level BPE, <s> X </s>."""
    from tokenizers import processors
    from tokenizers.implementations import ByteLevelBPETokenizer

    prefix = bool(options.get("add_prefix_space", False))
    tok = ByteLevelBPETokenizer(str(vocab), str(merges), add_prefix_space=prefix, trim_offsets=True)
    ids = {s: tok.token_to_id(s) for s in ("<s>", "</s>")}
    missing = [s for s, i in ids.items() if i is None]
    if missing:
        raise MissingTokenizerError(f"{vocab} lacks the special tokens {missing} RoBERTa's input needs")
    # Whole tokens, never split by BPE, as transformers marks them (only those the vocabulary holds).
    tok.add_special_tokens([s for s in ("<s>", "</s>", "<pad>", "<unk>", "<mask>") if tok.token_to_id(s) is not None])
    tok.post_processor = processors.RobertaProcessing(("</s>", ids["</s>"]), ("<s>", ids["<s>"]),
                                                      trim_offsets=True, add_prefix_space=prefix)
    return tok
