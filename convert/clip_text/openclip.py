"""open_clip's CLIP text tower (`transformer.resblocks.*`, `token_embedding`, ...; under `text.` for CustomTextCLIP
such as SigLIP) onto `jaxvit.clip_text.CLIPText`, and back (`export_open_clip`). The mapping: `convert.clip_text`."""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from convert.clip_text.common import check_consumed, layer_norm, linear, transposed
from convert.errors import CheckpointMismatchError, UnsupportedModelError, key_mismatch, other_sizes
from jaxvit.clip_text import CLIPTextConfig
from jaxvit.config import INT_LIMITS, check_int, is_real

# open_clip text_cfg entries that change the computation beyond what CLIPText implements (refused when set).
_REFUSED_TEXT_CFG = ("hf_model_name", "ls_init_value", "embed_cls", "use_pad_mask", "qk_norm", "block_type",
                     "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc")
# What open_clip builds where open_clip_config.json's text_cfg leaves a setting out (its CLIPTextCfg's defaults), by
# open_clip's names: what the tensors cannot say (heads, pooling, causal mask), and what they must agree with (a
# text_cfg of another model would set another model's heads on these weights).
DEFAULTS = dict(context_length=77, vocab_size=49408, width=512, heads=8, layers=12, mlp_ratio=4.0,
                pool_type="argmax", eos_id=2, no_causal_mask=False, proj_type="linear", proj_bias=False)


# An open_clip text tower's tensors outside its blocks, and each block's.
_OPEN_CLIP_TOP = ("token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias")
_OPEN_CLIP_BLOCK = ("ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
                    "attn.out_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                    "mlp.c_proj.weight", "mlp.c_proj.bias")


def open_clip_prefix(sd: Mapping[str, Any]) -> str | None:
    """The prefix of an open_clip text tower's tensors: "" (CLIP) or `text.` (CustomTextCLIP, e.g. SigLIP); None
    where the state dict holds none (any of its tensors will do: a missing one is named by `_check_open_clip`)."""
    for prefix in ("", "text."):
        if any(k.startswith(tuple(prefix + t for t in (*_OPEN_CLIP_TOP, "transformer.resblocks."))) for k in sd):
            return prefix
    if any(k.startswith("text.transformer.") and not k.startswith("text.transformer.resblocks.") for k in sd):
        raise UnsupportedModelError("this open_clip checkpoint's text tower is a transformers model (hf_model_name, "
                                    "`text.transformer.*`); supported: CLIP's own text transformer (OpenAI, open_clip "
                                    "ViT-*, SigLIP)")
    return None


def _open_clip_settings(text_cfg: Mapping[str, Any]):
    """name -> text_cfg's setting, else open_clip's default."""
    return lambda name: text_cfg.get(name, DEFAULTS[name])


def open_clip_config(sd: Mapping[str, np.ndarray], *, text_cfg: Mapping[str, Any] | None = None,
                     embed_dim: int | None = None, quick_gelu: bool | None = None, heads: int | None = None,
                     name: str = "") -> CLIPTextConfig:
    """The text tower's config: sizes from the tensors; heads, activation, eps and pooling from open_clip's
    `text_cfg` (open_clip_config.json's model_cfg) or the arguments. `quick_gelu` must be said somewhere:
    the tensors of OpenAI's (QuickGELU) and LAION's (GELU) checkpoints look the same. `embed_dim`: model_cfg's;
    given, the tensors must be exactly those of the model text_cfg describes (`_check_open_clip`), of its sizes
    (width, vocab_size, context_length, mlp_ratio, embed_dim), open_clip's defaults where it is silent. Without it
    (no open_clip_config.json) nothing says the sizes but the tensors: there is nothing to compare them with."""
    prefix = open_clip_prefix(sd)
    if prefix is None:
        raise CheckpointMismatchError("no open_clip text tower: the checkpoint has no token_embedding.weight, "
                                      "positional_embedding, transformer.resblocks.* or ln_final.*")
    text_cfg = dict(text_cfg or {})
    setting = _open_clip_settings(text_cfg)
    unsupported = {k: v for k, v in text_cfg.items() if k in _REFUSED_TEXT_CFG and v}
    if setting("proj_type") not in ("linear", "none"):
        unsupported["proj_type"] = text_cfg["proj_type"]
    if unsupported:
        raise UnsupportedModelError(f"open_clip text_cfg {unsupported} is not supported; supported: CLIP's text "
                                    "transformer (argmax/eos/last pooling, causal or not, linear projection)")
    _check_open_clip(sd, prefix, text_cfg, embed_dim, name)
    vocab, width = sd[prefix + "token_embedding.weight"].shape
    layers = len({m.group(1) for k in sd if (m := re.match(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.", k))})
    said = text_cfg.get("quick_gelu")
    if quick_gelu is not None and said is not None and bool(quick_gelu) != bool(said):  # as hf_vision's num_heads
        raise ValueError(f"quick_gelu={quick_gelu!r} contradicts the checkpoint's open_clip config (quick_gelu "
                         f"{said!r}): leave quick_gelu out for a checkpoint with its open_clip_config.json")
    if quick_gelu is None:
        quick_gelu = said
    act_kwargs = text_cfg.get("act_kwargs") or {}
    if quick_gelu is None and not act_kwargs:
        raise ValueError("an open_clip checkpoint does not say its activation: pass quick_gelu=True for OpenAI's "
                         "weights and open_clip's *-quickgelu models, quick_gelu=False for the others (or load it "
                         "from a folder with its open_clip_config.json)")
    act = "quick_gelu" if quick_gelu else ("gelu_tanh" if act_kwargs.get("approximate") == "tanh" else "gelu")
    proj = sd.get(prefix + "text_projection", sd.get(prefix + "text_projection.weight"))
    pool = setting("pool_type")
    if pool not in ("argmax", "eos", "last"):
        raise UnsupportedModelError(f"open_clip text pool_type {pool!r} is not supported; supported: argmax, eos, last")
    context = int(sd[prefix + "positional_embedding"].shape[0])
    mlp = int(sd[f"{prefix}transformer.resblocks.0.mlp.c_fc.weight"].shape[0])
    embed = 0 if proj is None else int(proj.shape[1] if proj.ndim == 2 and prefix + "text_projection" in sd
                                       else proj.shape[0])
    if embed_dim is not None:  # open_clip_config.json's model, whose heads, eps and activation these weights get
        said, ratio = setting("width"), setting("mlp_ratio")
        sizes = [("width", said, width), ("vocab_size", setting("vocab_size"), vocab),
                 ("context_length", setting("context_length"), context),
                 ("MLP width (width * mlp_ratio)", int(said * ratio) if is_real(said) and is_real(ratio) else None,
                  mlp)] + ([("embed_dim", embed_dim, embed)] if embed else [])
        if wrong := other_sizes(sizes, "open_clip_config.json"):
            raise CheckpointMismatchError(f"{name or 'the checkpoint'} does not match its open_clip_config.json: "
                                          f"{wrong}")
    # open_clip builds text_cfg's heads (8 where it is silent); without a config, OpenAI's rule, 64 wide each
    said = setting("heads") if embed_dim is not None else text_cfg.get("heads")
    if heads is not None and said is not None and heads != said:
        raise ValueError(f"heads={heads!r} contradicts the checkpoint's open_clip config ({said} heads"
                         f"{'' if 'heads' in text_cfg else ', open_clip default where text_cfg is silent'}): leave "
                         "heads out for a checkpoint with its open_clip_config.json")
    heads = heads or said or _openai_heads(width)
    return CLIPTextConfig(
        vocab_size=int(vocab), context_length=context, width=int(width), heads=int(heads), layers=layers, mlp_dim=mlp,
        embed_dim=embed, act=act, eps=float((text_cfg.get("norm_kwargs") or {}).get("eps", 1e-5)),
        causal=not setting("no_causal_mask"), pool=pool, eos_token_id=int(setting("eos_id")),
        proj_bias=prefix + "text_projection.bias" in sd, name=name)


def _check_open_clip(sd: Mapping[str, np.ndarray], prefix: str, text_cfg: Mapping[str, Any], embed_dim: int | None,
                     name: str) -> None:
    """Refuses a state dict without exactly the text tensors of its open_clip model, naming them as the file does.
    Before the sizes are read off the tensors, which takes a missing projection for a model without one and counts
    a missing or extra block into the depth. The model: open_clip_config.json's where `embed_dim` is given (open_clip's
    defaults where text_cfg leaves a setting out), else what the tensors imply (every block up to the last found, a
    Linear projection's weight with its bias)."""
    blocks = re.compile(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")
    found = {int(m.group(1)) for k in sd if (m := blocks.match(k))}
    configured = embed_dim is not None
    setting = _open_clip_settings(text_cfg)
    depth = setting("layers") if configured else max(found, default=0) + 1
    check_int("open_clip_config.json: text_cfg's layers", depth, *INT_LIMITS["depth"])  # keys are listed per block
    if configured and (not isinstance(embed_dim, int) or isinstance(embed_dim, bool) or embed_dim < 0):
        raise ValueError(f"open_clip_config.json: embed_dim must be a non-negative integer; got {embed_dim!r}")
    linear = ["text_projection.weight", "text_projection.bias"]  # open_clip makes it a Linear only with a bias
    if configured:
        projects, bias = embed_dim > 0 and setting("proj_type") != "none", setting("proj_bias")
    else:  # nothing but the file says whether the model projects, nor which of open_clip's two forms it has
        bias = any(prefix + k in sd for k in linear)
        projects = bias or prefix + "text_projection" in sd
    proj = (linear if bias else ["text_projection"]) if projects else []
    required = [*_OPEN_CLIP_TOP, *proj] + [f"transformer.resblocks.{i}.{t}" for i in range(depth)
                                           for t in _OPEN_CLIP_BLOCK]
    missing = [prefix + k for k in required if prefix + k not in sd]
    unexpected = [k for k in sd if (m := blocks.match(k)) and int(m.group(1)) >= depth]
    unexpected += [prefix + k for k in ("text_projection", *linear) if k not in proj and prefix + k in sd]
    if not (missing or unexpected):
        return
    if configured:
        what = f"its open_clip_config.json ({depth} layers)"
        advice = "A model of this configuration has exactly these tensors: is the file incomplete, or " \
                 "open_clip_config.json another model's?"
    else:
        what, advice = "an open_clip text tower", "Is the file incomplete?"
    raise key_mismatch(f"{name or 'the checkpoint'} does not match {what}", missing=missing, unexpected=unexpected,
                       advice=advice)


def _openai_heads(width: int) -> int:
    if width < 64:
        raise ValueError(f"an open_clip text tower of width {width} without its open_clip_config.json does not say its "
                         "head count (OpenAI's rule, width // 64, gives none): pass heads=")
    return width // 64


def params_from_open_clip(sd: Mapping[str, np.ndarray], cfg: CLIPTextConfig) -> dict:
    """The text tower's params from an open_clip state dict (the whole model's or the text tower's)."""
    prefix = open_clip_prefix(sd) or ""
    taken: dict[str, np.ndarray] = {}
    missing: list[str] = []

    def take(key: str):
        full = prefix + key
        if full not in sd:
            missing.append(full)
            return None
        taken[full] = sd[full]
        return np.asarray(sd[full])

    params: dict[str, Any] = {"token_embedding": take("token_embedding.weight"),
                              "positional_embedding": take("positional_embedding")}
    for i in range(cfg.layers):
        b = f"transformer.resblocks.{i}."
        params[f"resblocks_{i}"] = {
            "ln_1": layer_norm(take, b + "ln_1"), "ln_2": layer_norm(take, b + "ln_2"),
            "in_proj": {"kernel": transposed(take(b + "attn.in_proj_weight")), "bias": take(b + "attn.in_proj_bias")},
            "out_proj": linear(take, b + "attn.out_proj"), "c_fc": linear(take, b + "mlp.c_fc"),
            "c_proj": linear(take, b + "mlp.c_proj")}
    params["ln_final"] = layer_norm(take, "ln_final")
    if cfg.embed_dim:
        if prefix + "text_projection" in sd:  # nn.Parameter (D, E): x @ text_projection
            params["text_projection"] = {"kernel": take("text_projection")}
        else:  # nn.Linear (SigLIP)
            params["text_projection"] = linear(take, "text_projection", bias=cfg.proj_bias)
    check_consumed(sd, taken, missing)
    return params


def export_open_clip(params, cfg: CLIPTextConfig) -> dict[str, np.ndarray]:
    """The text tower's params as an open_clip state dict (open_clip's names and layouts, text keys only): the
    inverse of `params_from_open_clip`, which open_clip's TextTransformer loads with strict=True."""
    p = {k: v for k, v in params.items()}
    sd = {"token_embedding.weight": p["token_embedding"], "positional_embedding": p["positional_embedding"],
          "ln_final.weight": p["ln_final"]["scale"], "ln_final.bias": p["ln_final"]["bias"]}
    names = {"ln_1": "ln_1", "ln_2": "ln_2", "in_proj": "attn.in_proj_", "out_proj": "attn.out_proj",
             "c_fc": "mlp.c_fc", "c_proj": "mlp.c_proj"}
    for i in range(cfg.layers):
        for ours, theirs in names.items():
            block, key = p[f"resblocks_{i}"][ours], f"transformer.resblocks.{i}.{theirs}"
            sep = "" if ours == "in_proj" else "."
            if ours.startswith("ln_"):
                sd[f"{key}.weight"], sd[f"{key}.bias"] = block["scale"], block["bias"]
            else:
                sd[f"{key}{sep}weight"], sd[f"{key}{sep}bias"] = np.asarray(block["kernel"]).T, block["bias"]
    if cfg.embed_dim:
        proj = p["text_projection"]
        if cfg.proj_bias:
            sd["text_projection.weight"], sd["text_projection.bias"] = np.asarray(proj["kernel"]).T, proj["bias"]
        else:
            sd["text_projection"] = proj["kernel"]
    return {k: np.array(v, np.float32, order="C") for k, v in sd.items()}  # writable C-order copies (safetensors)
