"""Sentiment sentences with known decisive words: human word-valence ratings placed in neutral filler.

The ratings are VADER's lexicon (Hutto & Gilbert 2014: each word's mean valence, -4..4, over ten human
raters; MIT licence, `predmaps/assets/vader_lexicon/LICENSE.txt`). predmaps ships the subset it uses in
`predmaps/assets/vader_lexicon/valence.tsv` (word, mean rating), selected by `SUBSET_RULE`, so the
`vaderSentiment` package is never needed at run time; `python -m predmaps.sentiment --regenerate`
rewrites the file from the installed package (`pip install vaderSentiment`).

A sentence is a template of neutral filler words (`FILLER`: none of them is in VADER's lexicon at all)
with 1-4 rated words inserted at random gaps; lowercase, no punctuation, not always grammatical.

    single: 1-3 rated words, all of one class (negative or positive, 50/50).
    mixed:  1-2 negative and 1-2 positive words (class specificity).

The label rule: s = the sum of the sentence's ratings; label 1 (positive) if s >= MARGIN, 0 (negative)
if s <= -MARGIN; a draw with |s| < MARGIN is ambiguous and drawn again. A single-class sentence always
has |s| >= 2 (every rated word has |rating| >= 2). Everything is seeded: `generate(n, kind, seed)`
returns the same sentences for the same arguments.

    sents = generate(100, "mixed", seed=2024)
    sents[0].text, sents[0].words, sents[0].ratings, sents[0].label
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from pathlib import Path

import numpy as np

LABEL_NAMES = ("negative", "positive")
LEXICON_DIR = Path(__file__).resolve().parent / "assets" / "vader_lexicon"
LEXICON_FILE = LEXICON_DIR / "valence.tsv"
MIN_ABS_RATING = 2.0
MAX_RATER_STD = 0.8
SUBSET_RULE = (f"lowercase alphabetic words of 3+ letters with |mean rating| >= {MIN_ABS_RATING} and a "
               f"standard deviation over raters <= {MAX_RATER_STD}")
MARGIN = 1.0  # |sum of ratings| below this is ambiguous: such a draw is redrawn
KINDS = ("single", "mixed")

# Neutral filler: objects, places, plain motion verbs, prepositions, determiners. None is in VADER's
# lexicon (tests/test_text_benchmark.py checks this against the installed package).
FILLER = {
    "det": ("the", "a", "this", "that", "one", "another", "every", "each"),
    "noun": ("table", "window", "street", "report", "river", "engine", "station", "letter", "garden", "chair",
             "bottle", "corner", "market", "paper", "bridge", "train", "office", "kitchen", "wall", "door", "road",
             "hill", "stone", "field", "bus", "truck", "box", "desk", "lamp", "book", "page", "card", "map", "shelf",
             "floor", "roof", "tower", "valley", "island", "village", "museum", "library", "bakery", "factory",
             "harbor", "schedule", "ticket", "bucket", "list", "file", "folder", "carpet", "pencil", "bicycle",
             "tunnel", "platform", "basket", "jacket", "garage", "ladder"),
    "verb": ("moved", "stood", "turned", "opened", "closed", "crossed", "passed", "carried", "followed", "stayed",
             "waited", "walked", "returned", "arrived", "rolled", "leaned", "sat", "appeared", "remained", "faced"),
    "prep": ("near", "behind", "under", "beside", "across", "along", "through", "past", "toward", "inside",
             "outside", "above", "below", "around", "between"),
    "time": ("on monday", "on tuesday", "at noon", "in march", "last week", "this morning", "at six"),
}
TEMPLATES = (
    "{det} {noun} {verb} {prep} the {noun}",
    "{det} {noun} {verb} {prep} {det} {noun} {time}",
    "{time} the {noun} {verb} {prep} the {noun}",
    "the {noun} and the {noun} {verb} {prep} {det} {noun}",
    "{det} {noun} by the {noun} {verb} {time}",
    "we {verb} {prep} the {noun} {time}",
    "the {noun} {verb} {prep} the {noun} {prep} the {noun}",
)


def filler_words() -> frozenset[str]:
    """Every word a template can produce."""
    words = {w for slot in FILLER.values() for phrase in slot for w in phrase.split()}
    return frozenset(words | {w for t in TEMPLATES for w in t.split() if not w.startswith("{")})


@functools.lru_cache(maxsize=None)
def load_lexicon(path: str | None = None) -> dict[str, float]:
    """The shipped subset: word -> mean rating (`valence.tsv`: a header line, then word<TAB>rating)."""
    p = Path(path) if path else LEXICON_FILE
    lines = p.read_text(encoding="utf-8").splitlines()
    if not lines or lines[0] != "word\tmean_rating":
        raise ValueError(f"{p} is not a valence table (its first line must be 'word<TAB>mean_rating')")
    return {w: float(r) for w, r in (line.split("\t") for line in lines[1:] if line)}


def vader_ratings() -> dict[str, tuple[float, float]]:
    """The installed vaderSentiment package's whole lexicon: token -> (mean, std). ImportError without it."""
    from importlib.resources import files

    text = files("vaderSentiment").joinpath("vader_lexicon.txt").read_text(encoding="utf-8")
    out = {}
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) >= 3:
            out[parts[0]] = (float(parts[1]), float(parts[2]))
    return out


def select_subset(ratings: dict[str, tuple[float, float]]) -> dict[str, float]:
    """`SUBSET_RULE` applied to (mean, std) ratings -> word -> mean, sorted by word."""
    keep = {w: m for w, (m, s) in ratings.items()
            if w.isascii() and w.isalpha() and w.islower() and len(w) >= 3 and abs(m) >= MIN_ABS_RATING
            and s <= MAX_RATER_STD}
    return dict(sorted(keep.items()))


def write_lexicon(path: Path = LEXICON_FILE) -> int:
    """Regenerate the shipped subset from the installed vaderSentiment package; returns its size."""
    subset = select_subset(vader_ratings())
    path.write_text("word\tmean_rating\n" + "".join(f"{w}\t{m:g}\n" for w, m in subset.items()), encoding="utf-8")
    return len(subset)


@dataclasses.dataclass(frozen=True)
class Sentence:
    """words: the sentence's words (text = ' '.join(words)); ratings: each word's rating (0.0 for filler)."""

    words: tuple[str, ...]
    ratings: tuple[float, ...]
    label: int

    @property
    def text(self) -> str:
        return " ".join(self.words)

    @property
    def word_classes(self) -> np.ndarray:
        """(W,) int: 1 for a positive rated word, 0 for a negative one, -1 for filler."""
        r = np.asarray(self.ratings)
        return np.where(r > 0, 1, np.where(r < 0, 0, -1))


def label_of(ratings) -> int | None:
    """The label rule: 1 if sum >= MARGIN, 0 if sum <= -MARGIN, None (ambiguous) otherwise."""
    s = float(np.sum(ratings))
    return 1 if s >= MARGIN else 0 if s <= -MARGIN else None


def _filler(rng: np.random.Generator) -> list[str]:
    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    out = []
    for part in template.split():
        if part.startswith("{"):
            choices = FILLER[part[1:-1]]
            out.extend(choices[rng.integers(len(choices))].split())
        else:
            out.append(part)
    return out


def _draw(rng, kind: str, neg: np.ndarray, pos: np.ndarray, lexicon: dict[str, float]) -> Sentence:
    while True:
        if kind == "single":
            pool = pos if rng.random() < 0.5 else neg
            rated = list(rng.choice(pool, size=rng.integers(1, 4), replace=False))
        else:
            rated = list(rng.choice(neg, size=rng.integers(1, 3), replace=False)) + \
                    list(rng.choice(pos, size=rng.integers(1, 3), replace=False))
        label = label_of([lexicon[w] for w in rated])
        if label is not None:
            break
    words = _filler(rng)
    for w in rng.permutation(rated):  # each at a random gap of the words so far
        words.insert(int(rng.integers(len(words) + 1)), str(w))
    return Sentence(tuple(words), tuple(lexicon.get(w, 0.0) for w in words), label)


def generate(n: int, kind: str = "single", seed: int = 0, lexicon: dict[str, float] | None = None) -> list[Sentence]:
    """n sentences of `kind` ("single" or "mixed"), deterministic in (n, kind, seed, lexicon)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer; got {n!r}")
    lexicon = load_lexicon() if lexicon is None else lexicon
    neg = np.array(sorted(w for w, r in lexicon.items() if r < 0))
    pos = np.array(sorted(w for w, r in lexicon.items() if r > 0))
    rng = np.random.default_rng([seed, KINDS.index(kind)])
    return [_draw(rng, kind, neg, pos, lexicon) for _ in range(n)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m predmaps.sentiment", description=__doc__.splitlines()[0])
    p.add_argument("--regenerate", action="store_true", help=f"rewrite {LEXICON_FILE} from vaderSentiment")
    p.add_argument("--show", type=int, default=0, metavar="N", help="print N single and N mixed sentences")
    args = p.parse_args(argv)
    if args.regenerate:
        try:
            print(f"{write_lexicon()} words ({SUBSET_RULE}) -> {LEXICON_FILE}")
        except ImportError:
            print("error: --regenerate reads the vaderSentiment package: pip install vaderSentiment", file=sys.stderr)
            return 2
    for kind in KINDS:
        for s in generate(args.show, kind, seed=0):
            print(f"{kind}\t{LABEL_NAMES[s.label]}\t{s.text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
