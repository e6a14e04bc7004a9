"""jaxvit: a timm-faithful Vision Transformer in Flax that exposes its internals.

    from jaxvit import ViT, ViTConfig, get_config, load
    model, params = load("converted_checkpoint_dir")
    out = model.apply({"params": params}, images)   # images (B, H, W, 3), normalised
    out.logits, out.tokens, out.attn_cls           # ViTOutput: (B, C), (B, L + 1, T, D), (B, L, H, T)
"""

from jaxvit.config import ViTConfig, get_config, list_models
from jaxvit.model import ATTENTION_IMPLS, KERNEL_IMPLS, Params, ViT, ViTOutput, cast_params
from jaxvit.checkpoint import load, save

__all__ = ["ATTENTION_IMPLS", "KERNEL_IMPLS", "Params", "ViT", "ViTConfig", "ViTOutput", "cast_params", "get_config",
           "list_models", "load", "save"]
