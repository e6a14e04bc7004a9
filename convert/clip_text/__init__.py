"""CLIP text towers from open_clip and transformers checkpoints onto `jaxvit.clip_text.CLIPText`.

Key mapping (open_clip, optionally under `text.` for CustomTextCLIP such as SigLIP; transformers under
`text_model.`, or at the top level where transformers 5 saved a CLIPTextModel / SiglipTextModel):
  token_embedding.weight            | embeddings.token_embedding.weight     -> token_embedding
  positional_embedding              | embeddings.position_embedding.weight  -> positional_embedding
  transformer.resblocks.{i}.        | encoder.layers.{i}.
    ln_1, ln_2                      |   layer_norm1, layer_norm2            -> ln_1, ln_2
    attn.in_proj_weight/bias        |   self_attn.{q,k,v}_proj (stacked)    -> in_proj
    attn.out_proj, mlp.c_fc, c_proj |   self_attn.out_proj, mlp.fc1, fc2    -> out_proj, c_fc, c_proj
  ln_final                          | final_layer_norm                      -> ln_final
  text_projection (D, E) or Linear  | text_projection (CLIP) / head (SigLIP) -> text_projection
Every other key must belong to the image tower (`visual.*`, `vision_model.*`, `visual_projection.*`) or be
one of the scalars/buffers named in `common.IGNORED`; anything else is an unexpected key, named. Before the sizes are
read off the tensors, the text tensors are checked against the model the config describes (its layers, whether
it projects), so that a missing or extra one is named rather than read as another model.
What the tensors cannot say (heads, activation, eps, pooling) comes from the checkpoint's config
(transformers' config.json, open_clip's open_clip_config.json) or from the caller, so the sizes read off the
tensors must be the config's (its library's defaults where it is silent): another model's config is refused, naming
the setting. A bare open_clip state dict has no config: nothing but its tensors says its sizes.
Modules: `openclip` (open_clip's layout, and export to it), `hf` (transformers'), `common` (what both share); here,
reading a source (state dict, file, folder, hub repo) and its tokenizer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import jax.numpy as jnp
import numpy as np

from convert.clip_text.common import check_shapes
from convert.clip_text.hf import HF_TYPES, check_hf_class, hf_config, hf_prefix, params_from_hf
from convert.clip_text.openclip import export_open_clip, open_clip_config, open_clip_prefix, params_from_open_clip
from convert.errors import CheckpointMismatchError, UnsupportedModelError
from convert.sources import download, is_file_name, read_file, read_json
from convert.timm_vit import clean_state_dict
from jaxvit.clip_text import CLIPText, CLIPTextConfig, TextTower
from jaxvit.clip_tokenizer import CLIPTokenizer

__all__ = ["CLIP", "load_clip_text", "export_open_clip", "hf_config", "open_clip_config", "check_shapes"]

OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
HF_FILES = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def load_clip_text(source: Any, *, quick_gelu: bool | None = None, heads: int | None = None,
                   tokenizer: Any = None, dtype=jnp.float32) -> tuple[CLIPText, dict, CLIPTokenizer | None]:
    """A CLIP text tower as (module, params, tokenizer).

    `source`: an open_clip or transformers state dict (the whole CLIP model's or the text tower's); a
    weights file (.safetensors without torch; .bin/.pth need torch); a folder holding a transformers CLIP /
    SigLIP checkpoint (config.json + model.safetensors, tokenizer.json) or an open_clip one
    (open_clip_model.safetensors + open_clip_config.json); or a hub repo id, read through huggingface_hub's
    cache (HF_HUB_OFFLINE honoured). `quick_gelu`, `heads`: what an open_clip checkpoint without its
    open_clip_config.json does not say (where the checkpoint's config says them, a different value is refused). `tokenizer`: a CLIPTokenizer, a tokenizer.json (or its folder) or
    CLIP BPE merges file, or False (none: the caller brings token ids); default: the checkpoint folder's tokenizer.json, else (CLIP's 49,408-token
    vocabulary) OpenAI's BPE as open_clip tokenises. Strict: missing or unexpected keys are named.
    """
    sd, folder, where = _read(source)
    if (prefix := hf_prefix(sd)) is not None:
        config = read_json(folder / "config.json") if folder else None
        if not isinstance(config, dict):
            raise ValueError(f"{where}: transformers CLIP weights need their config.json (heads, activation, eos "
                             "token) beside them: load the checkpoint's folder")
        check_hf_class(sd, config, prefix=prefix, name=where)
        cfg = hf_config(sd, config, prefix=prefix, name=where)
        for arg, given, said in (("heads", heads, cfg.heads), ("quick_gelu", quick_gelu, cfg.act == "quick_gelu")):
            if given is not None and given != said:  # config.json says it: a contradiction is refused, not obeyed
                raise ValueError(f"{arg}={given!r} contradicts {where}'s config.json ({arg} {said!r}): leave {arg} "
                                 "out for a transformers checkpoint")
        params = params_from_hf(sd, cfg, prefix=prefix)
    elif open_clip_prefix(sd) is not None:
        oc = read_json(folder / "open_clip_config.json") if folder else None
        model_cfg = (oc or {}).get("model_cfg") or {}
        text_cfg = dict(model_cfg.get("text_cfg") or {})
        if oc is not None:  # open_clip's own default: GELU unless the model config says quick_gelu
            text_cfg["quick_gelu"] = bool(model_cfg.get("quick_gelu", False))
        if tokenizer is None and (text_cfg.get("hf_tokenizer_name") or text_cfg.get("tokenizer_kwargs")):
            raise UnsupportedModelError(
                f"{where}: open_clip tokenises this model with {text_cfg.get('hf_tokenizer_name') or 'its'} tokenizer "
                f"and text cleaning {text_cfg.get('tokenizer_kwargs')}, which predmaps does not reproduce: load the "
                "transformers version of the checkpoint (its tokenizer.json), or pass tokenizer=")
        cfg = open_clip_config(sd, text_cfg=text_cfg, embed_dim=model_cfg.get("embed_dim"), quick_gelu=quick_gelu,
                               heads=heads, name=where)
        params = params_from_open_clip(sd, cfg)
    else:
        raise CheckpointMismatchError(f"{where} holds no CLIP text tower: expected open_clip's token_embedding.weight "
                                      "or transformers' text_model.embeddings.token_embedding.weight")
    params = check_shapes(params, cfg)
    return CLIPText(cfg, dtype=dtype), params, _tokenizer(tokenizer, folder, cfg, where)


def _tokenizer(tokenizer, folder: Path | None, cfg: CLIPTextConfig, where: str) -> CLIPTokenizer | None:
    n = cfg.context_length
    if tokenizer is False:  # the caller brings token ids
        return None
    if isinstance(tokenizer, CLIPTokenizer):
        return tokenizer
    if tokenizer is not None:
        path = Path(tokenizer)
        if path.is_dir() or path.suffix == ".json":
            return CLIPTokenizer.from_tokenizer_json(path, context_length=n)
        return CLIPTokenizer.from_bpe(path, context_length=n)
    if folder is not None and (folder / "tokenizer.json").is_file():
        return CLIPTokenizer.from_tokenizer_json(folder, context_length=n)
    if cfg.vocab_size == 49408 and cfg.pool == "argmax":  # OpenAI's vocabulary, as open_clip tokenises it
        return CLIPTokenizer.from_bpe(context_length=n)
    raise ValueError(f"{where}: no tokenizer.json beside the checkpoint and a vocabulary of {cfg.vocab_size} tokens "
                     "(not CLIP's 49,408): pass tokenizer= (the checkpoint's tokenizer.json)")


def _read(source: Any) -> tuple[dict[str, np.ndarray], Path | None, str]:
    """(state dict, the folder its config and tokenizer files are in or None, a description)."""
    if isinstance(source, Mapping):
        return clean_state_dict(source), None, "state dict"
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"cannot load a CLIP text tower from a {type(source).__name__}: pass a state dict, a file, "
                        "a folder or a hub repo id")
    path = Path(source)
    if path.is_file():
        return read_file(path), path.parent, str(path)
    if not path.is_dir():
        repo_id = str(source).removeprefix("hf-hub:")
        # A hub repo id is owner/name; anything else that does not exist is a missing local path.
        if os.path.lexists(path) or is_file_name(str(source)) or "/" not in repo_id:
            raise FileNotFoundError(f"CLIP checkpoint {source} does not exist (a folder, a weights file or a hub "
                                    "repo id such as openai/clip-vit-base-patch16)")
        path = _hub_folder(repo_id)  # HubUnavailableError when offline and not cached
    config = read_json(path / "config.json")
    hf_first = isinstance(config, dict) and config.get("model_type") in HF_TYPES
    order = HF_FILES + OPEN_CLIP_FILES if hf_first or not (path / OPEN_CLIP_FILES[0]).exists() else OPEN_CLIP_FILES
    for name in order + HF_FILES:
        if (path / name).is_file():
            return read_file(path / name), path, str(path / name)
    raise FileNotFoundError(f"{path} holds none of {HF_FILES + OPEN_CLIP_FILES}")


def _hub_folder(repo_id: str) -> Path:
    """The huggingface_hub cache folder holding a repo's weights and JSON files (`sources.download`, as
    `convert.load` fetches them) and its tokenizer files. HF_HUB_OFFLINE honoured; a hub that does not answer
    is asked once, without huggingface_hub's retries, and then the tokenizer files come from the cache alone."""
    from huggingface_hub import constants, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, OfflineModeIsEnabled

    from convert.sources import _hub_answers

    weights = download(repo_id, model_name=repo_id)[0]
    cache_only = bool(constants.HF_HUB_OFFLINE)
    for name in TOKENIZER_FILES:
        try:
            hf_hub_download(repo_id, name, local_files_only=True)
            continue
        except (LocalEntryNotFoundError, EntryNotFoundError, OfflineModeIsEnabled):  # not cached
            pass
        cache_only = cache_only or not _hub_answers(hf_hub_url(repo_id, name))
        if not cache_only:
            try:
                hf_hub_download(repo_id, name)
            except EntryNotFoundError:  # the repo has no such file
                pass
    return weights.parent


class CLIP(NamedTuple):
    """Both towers of a CLIP checkpoint and its tokenizer (`load_clip`)."""

    image_model: Any  # jaxvit.ViT whose head is CLIP's image projection
    image_params: Any
    text_model: CLIPText
    text_params: Any
    tokenizer: CLIPTokenizer | None

    @property
    def text_tower(self) -> TextTower:
        return TextTower(self.text_model, self.text_params, self.tokenizer)
