"""CLIP's tokenizer through Hugging Face's `tokenizers`: prompts -> (K, context_length) token ids.

Two sources, each reproducing the tokenizer its checkpoints were trained with:
- a transformers folder's own `tokenizer.json` (CLIPTokenizerFast; SigLIP's where the folder has one),
  read as it is: its normaliser, pre-tokeniser, BPE and special tokens;
- OpenAI CLIP's BPE merges (`bpe_simple_vocab_16e6.txt.gz`, the file OpenAI's and open_clip's
  SimpleTokenizer read; bundled here under its MIT licence, jaxvit/data/CLIP_BPE_LICENSE) for open_clip
  and OpenAI checkpoints, which carry no tokenizer: the same BPE model transformers builds from it, with
  open_clip's text cleaning first (ftfy.fix_text, HTML unescaping, whitespace collapsing, lowercase).

Every prompt becomes [start] + tokens + [end], padded to the context length (open_clip pads with 0,
transformers with its pad token); a longer prompt is cut to context_length - 2 tokens and keeps its end
token, with a warning.
"""

from __future__ import annotations

import gzip
import html
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

BUNDLED_BPE = Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
# CLIP's pre-tokeniser split: contractions, letter runs, single digits, runs of other non-space characters.
_CLIP_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# OpenAI's vocabulary: 256 bytes, 256 bytes + "</w>", 48,894 merges, then the two special tokens.
_N_MERGES = 49152 - 256 - 2


class CLIPTokenizer:
    """Tokenise prompts for a CLIP text tower: `tokenizer(["a dog", "a cat"])` -> (2, context_length) int32.

    Build one with `from_tokenizer_json` (a transformers folder) or `from_bpe` (open_clip / OpenAI).
    """

    def __init__(self, tokenizer, *, context_length: int, pad_id: int, clean=None, name: str = ""):
        if not isinstance(context_length, int) or context_length < 2:
            raise ValueError(f"context_length must be an integer >= 2 (start and end tokens); got {context_length!r}")
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.pad_id = pad_id
        self.clean = clean
        self.name = name
        tokenizer.no_padding()
        # Room for the special tokens the post-processor adds: the tokenizers library reserves it itself.
        tokenizer.enable_truncation(context_length)
        tokenizer.enable_padding(length=context_length, pad_id=pad_id,
                                 pad_token=tokenizer.id_to_token(pad_id) or "")

    def __call__(self, prompts: str | Sequence[str]) -> np.ndarray:
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        bad = [p for p in prompts if not isinstance(p, str)]
        if bad or not prompts:
            raise TypeError("prompts must be a non-empty list of strings"
                            + (f"; got a {type(bad[0]).__name__}" if bad else ""))
        texts = [self.clean(p) for p in prompts] if self.clean else prompts
        encodings = self.tokenizer.encode_batch(texts)
        cut = [p for p, e in zip(prompts, encodings) if e.overflowing]
        if cut:
            warnings.warn(f"{len(cut)} prompt(s) longer than the text tower's {self.context_length} tokens were "
                          f"truncated, e.g. {cut[0][:60]!r}: only their first tokens are encoded", stacklevel=2)
        return np.asarray([e.ids for e in encodings], dtype=np.int32)

    @classmethod
    def from_tokenizer_json(cls, path: str | os.PathLike, *, context_length: int = 77,
                            pad_token: str | None = None) -> "CLIPTokenizer":
        """A transformers folder's `tokenizer.json` (or the file itself). The pad token: `pad_token`, else
        the folder's `tokenizer_config.json` / `special_tokens_map.json`, else the end-of-text token."""
        from tokenizers import Tokenizer

        path = Path(path)
        folder = path if path.is_dir() else path.parent
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"{folder} has no tokenizer.json: pass a transformers CLIP folder (it holds "
                                    "tokenizer.json) or, for open_clip/OpenAI checkpoints, use CLIPTokenizer.from_bpe()")
        try:
            tok = Tokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise ValueError(f"cannot read {file} as a tokenizers tokenizer.json: {e}") from None
        pad_token = pad_token or _special_token(folder, "pad_token") or _special_token(folder, "eos_token")
        pad_id = tok.token_to_id(pad_token) if pad_token else None
        if pad_id is None:
            pad_id = tok.token_to_id("<|endoftext|>")
        if pad_id is None:
            raise ValueError(f"{file}: cannot tell its padding token (no pad_token in tokenizer_config.json and no "
                             "<|endoftext|>); pass pad_token=")
        return cls(tok, context_length=context_length, pad_id=pad_id, name=str(file))

    @classmethod
    def from_bpe(cls, path: str | os.PathLike | None = None, *, context_length: int = 77) -> "CLIPTokenizer":
        """OpenAI/open_clip's tokenizer from its BPE merges file (default: the bundled one), as open_clip's
        SimpleTokenizer: start 49406, end 49407, padding 0, its text cleaning."""
        from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, processors
        from tokenizers.models import BPE

        path = Path(path) if path is not None else BUNDLED_BPE
        try:
            with gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8") as f:
                lines = f.read().split("\n")
        except (OSError, UnicodeDecodeError, EOFError) as e:
            raise ValueError(f"cannot read CLIP BPE merges from {path}: {e}") from None
        merges = [tuple(line.split()) for line in lines[1:_N_MERGES + 1]]
        if len(merges) != _N_MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(f"{path} is no CLIP BPE merges file: expected a header line and {_N_MERGES} merges "
                             "of two symbols (bpe_simple_vocab_16e6.txt.gz)")
        symbols = list(_bytes_to_unicode().values())
        vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
        vocab_list += ["<start_of_text>", "<end_of_text>"]
        vocab = {token: i for i, token in enumerate(vocab_list)}
        tok = Tokenizer(BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>", fuse_unk=False))
        # No normaliser: open_clip's cleaning (`_open_clip_clean`) runs first, in Python, as open_clip runs it.
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens(["<start_of_text>", "<end_of_text>"])
        sot, eot = vocab["<start_of_text>"], vocab["<end_of_text>"]
        tok.post_processor = processors.TemplateProcessing(
            single="<start_of_text> $A <end_of_text>", special_tokens=[("<start_of_text>", sot), ("<end_of_text>", eot)])
        return cls(tok, context_length=context_length, pad_id=0, clean=_open_clip_clean, name=str(path))


def _special_token(folder: Path, key: str) -> str | None:
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        try:
            value = json.loads((folder / name).read_text()).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, dict):  # an AddedToken written out
            value = value.get("content")
        if isinstance(value, str):
            return value
    return None


def _open_clip_clean(text: str) -> str:
    """open_clip's default cleaning ('lower'): ftfy's fixes (mojibake, curly quotes, ligatures, NFC), HTML
    entities unescaped twice, whitespace runs collapsed, lowercase."""
    import ftfy

    return " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).split()).lower()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's byte -> printable character table (the ByteLevel alphabet), in CLIP's vocabulary order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))
