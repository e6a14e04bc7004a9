"""ImageNet-1k class names and WordNet ids, bundled so outputs read "tabby cat", not "281"."""

from __future__ import annotations

import functools
from importlib import resources

IMAGENET_1K = "imagenet-1k"


@functools.lru_cache(maxsize=1)
def _imagenet_rows() -> tuple[tuple[str, str, str], ...]:
    text = resources.files("jaxvit").joinpath("data/imagenet_1k.tsv").read_text()
    rows = []
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        _, wnid, name, lemmas = line.split("\t")
        rows.append((wnid, name, lemmas))
    assert len(rows) == 1000, "corrupt bundled imagenet_1k.tsv"
    return tuple(rows)


def imagenet_names() -> tuple[str, ...]:
    """Short readable names of the 1000 ImageNet-1k classes, in class-index order."""
    return tuple(r[1] for r in _imagenet_rows())


def imagenet_wnids() -> tuple[str, ...]:
    """WordNet ids (n01440764, ...) in class-index order (sorted, as timm and torchvision)."""
    return tuple(r[0] for r in _imagenet_rows())


def imagenet_lemmas() -> tuple[str, ...]:
    """Full WordNet lemma strings ("tabby, tabby cat") in class-index order."""
    return tuple(r[2] for r in _imagenet_rows())


def wnid_to_index(wnid: str) -> int:
    index = {w: i for i, w in enumerate(imagenet_wnids())}
    if wnid not in index:
        raise KeyError(f"{wnid!r} is not an ImageNet-1k WordNet id")
    return index[wnid]


def named_label_set(name: str) -> tuple[str, ...]:
    if name == IMAGENET_1K:
        return imagenet_names()
    raise KeyError(f"unknown label set {name!r}; bundled: {IMAGENET_1K!r}")
