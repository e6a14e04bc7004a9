"""The errors every strict loader in `convert` raises, in one place: each format's reader names its keys
the same way (missing / unexpected / wrong shapes), whatever the file."""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable


class CheckpointMismatchError(ValueError):
    """A state dict that does not fill a jaxvit ViT exactly (missing, unexpected or misshapen keys)."""


def key_mismatch(what: str, *, missing=(), unexpected=(), misshapen=(), advice: str = "",
                 noun: str = "keys") -> CheckpointMismatchError:
    """The strict loaders' one error: `what` (e.g. "checkpoint does not match vit_base"), then the missing,
    unexpected and misshapen keys (`noun`: what the format calls them), each sorted, the first 12 named and
    the rest counted, then `advice` (what to do)."""
    def some(keys) -> str:
        keys = sorted(keys)
        return str(keys) if len(keys) <= 12 else f"{keys[:12]} and {len(keys) - 12} more"

    parts = [f"{label} {some(keys)}" for label, keys in ((f"missing {noun}", missing), (f"unexpected {noun}", unexpected),
                                                        ("wrong shapes", misshapen)) if keys]
    return CheckpointMismatchError(f"{what}: " + "; ".join(parts) + (f". {advice}" if advice else ""))


def other_sizes(sizes: Iterable[tuple[str, Any, Any]], config: str = "config.json") -> str:
    """What a reader says of tensors of other sizes than their config file's: each (setting, the config's value,
    the tensors' value) that differs (a config value of None, which says nothing, is not compared), then why it
    matters; "" where all agree."""
    wrong = [f"{name} {want} in {config}, {got} in the tensors" for name, want, got in sizes
             if want is not None and want != got]
    return "; ".join(wrong) + (f". Is {config} another model's? Its heads, eps and activation would be applied to "
                               "these weights" if wrong else "")


class UnsupportedModelError(ValueError):
    """A timm model whose architecture jaxvit does not implement."""


def sibling_name(timm_key: str, source_keys: Iterable[str], timm_names_of: Callable[[str], Iterable[str]]) -> str:
    """A missing block tensor's name in the file's own scheme, read off the same tensor of another block:
    `blocks.1.mlp.fc2.bias` -> `vit.encoder.layer.1.output.dense.bias` where the file holds
    `vit.encoder.layer.0.output.dense.bias`. `timm_names_of(key)`: the timm names one source key converts to
    (empty if it cannot alone, e.g. q of a q/k/v triple). Other keys, or none found: `timm_key` itself."""
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", timm_key)
    if not m:
        return timm_key
    for source in source_keys:
        for name in timm_names_of(source):
            other = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
            if other and other.group(2) == m.group(2) and other.group(1) != m.group(1) \
                    and len(re.findall(rf"\.{other.group(1)}\.", f".{source}.")) == 1:
                return re.sub(rf"(^|\.){other.group(1)}\.", rf"\g<1>{m.group(1)}.", source, count=1)
    return timm_key
