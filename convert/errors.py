"""The errors every strict loader in `convert` raises, in one place: each format's reader names its keys
the same way (missing / unexpected / wrong shapes), whatever the file."""

from __future__ import annotations


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


class UnsupportedModelError(ValueError):
    """A timm model whose architecture jaxvit does not implement."""
