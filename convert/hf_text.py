"""Hugging Face text classifiers (BERT, RoBERTa, DistilBERT) into `jaxvit.text.TextEncoder` params.

    from convert.hf_text import load_text
    model, params, tokenizer = load_text("path/to/folder")   # config.json + weights + tokenizer files
    model, params, tokenizer = load_text("owner/name")       # a hub repo id (cached; HF_HUB_OFFLINE honoured)

Weights: `model.safetensors` (read without torch) or `pytorch_model.bin` (torch.load with
weights_only=True; torch must be installed), as the ViT path reads them (convert/sources.py). The
architecture comes from config.json's `architectures`; others are refused by name. Strict: every tensor
is consumed and every parameter filled, of config.json's sizes (transformers' defaults where it is silent), else
`CheckpointMismatchError` naming the keys, and the sizes config.json gives that the tensors have not.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from convert.sources import WEIGHT_FILES, download, read_file, read_json
from convert.errors import key_mismatch, other_sizes
from jaxvit.text import TextConfig, TextEncoder, hf_name, init_params
from jaxvit.tokenizer import TOKENIZER_FILES, TextTokenizer

# Each family's tensor (without .weight / .bias) for every TextEncoder parameter; {i} is the layer.
_BERT_LAYER = {
    "query": "encoder.layer.{i}.attention.self.query", "key": "encoder.layer.{i}.attention.self.key",
    "value": "encoder.layer.{i}.attention.self.value", "attn_out": "encoder.layer.{i}.attention.output.dense",
    "attn_norm": "encoder.layer.{i}.attention.output.LayerNorm", "ffn_in": "encoder.layer.{i}.intermediate.dense",
    "ffn_out": "encoder.layer.{i}.output.dense", "ffn_norm": "encoder.layer.{i}.output.LayerNorm",
}
_BERT_EMB = {"word": "embeddings.word_embeddings", "position": "embeddings.position_embeddings",
             "token_type": "embeddings.token_type_embeddings", "emb_norm": "embeddings.LayerNorm"}
NAMES = {
    "bert": dict(prefix="bert.", emb=_BERT_EMB, layer=_BERT_LAYER,
                 head={"head_dense": "bert.pooler.dense", "head_out": "classifier"}),
    "roberta": dict(prefix="roberta.", emb=_BERT_EMB, layer=_BERT_LAYER,
                    head={"head_dense": "classifier.dense", "head_out": "classifier.out_proj"}),
    "distilbert": dict(prefix="distilbert.", emb={k: v for k, v in _BERT_EMB.items() if k != "token_type"},
                       layer={"query": "transformer.layer.{i}.attention.q_lin",
                              "key": "transformer.layer.{i}.attention.k_lin",
                              "value": "transformer.layer.{i}.attention.v_lin",
                              "attn_out": "transformer.layer.{i}.attention.out_lin",
                              "attn_norm": "transformer.layer.{i}.sa_layer_norm",
                              "ffn_in": "transformer.layer.{i}.ffn.lin1", "ffn_out": "transformer.layer.{i}.ffn.lin2",
                              "ffn_norm": "transformer.layer.{i}.output_layer_norm"},
                       head={"head_dense": "pre_classifier", "head_out": "classifier"}),
}
# Buffers older transformers saved (position ids), and RoBERTa's pooler, which its sequence classifier
# never uses (transformers ignores it too): no parameters of the model.
_IGNORED = re.compile(r"^(\w+\.)?embeddings\.(position_ids|token_type_ids)$|^roberta\.pooler\.")


def tensor_names(config: TextConfig) -> dict[str, str]:
    """TextEncoder param path ('layers_0/query') -> the checkpoint's tensor prefix for this family."""
    spec = NAMES[config.family]
    out = {k: spec["prefix"] + v for k, v in spec["emb"].items()}
    if not config.type_vocab_size:
        out.pop("token_type", None)
    for i in range(config.num_layers):
        out.update({f"layers_{i}/{k}": spec["prefix"] + v.format(i=i) for k, v in spec["layer"].items()})
    out.update(spec["head"])
    return out


# The config.json size along each axis of a parameter (flax's layout; a bias has its kernel's last), by BERT's names;
# every other parameter's are hidden_size.
_AXES = {"word": ("vocab_size", "hidden_size"), "position": ("max_position_embeddings", "hidden_size"),
         "token_type": ("type_vocab_size", "hidden_size"), "ffn_in": ("hidden_size", "intermediate_size"),
         "ffn_out": ("intermediate_size", "hidden_size"), "head_out": ("hidden_size", "num_labels")}


def _said(config: TextConfig, size: str) -> tuple[str, int]:
    """(config.json's name of a size of `_AXES`, its value)."""
    value = config.num_classes if size == "num_labels" else getattr(config, size)
    return hf_name(config.family, size), value


# TF-era LayerNorm names, which transformers renames on load: the file's suffix -> transformers'.
_TF_NORM = {".gamma": ".weight", ".beta": ".bias"}


def _normalise_keys(state_dict: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(the state dict with TF-era LayerNorm names (gamma / beta) as weight / bias, each key -> the file's name)."""
    out, spelt = {}, {}
    for k, v in state_dict.items():
        suffix = next((s for s in _TF_NORM if k.endswith(s)), None)
        name = k[:-len(suffix)] + _TF_NORM[suffix] if suffix else k
        out[name], spelt[name] = v, k
    return out, spelt


def params_from_state_dict(state_dict: dict[str, np.ndarray], config: TextConfig, where: str = "the checkpoint"):
    """A transformers state dict -> TextEncoder params (float32 numpy), strictly; keys named as the file names them."""
    sd, spelt = _normalise_keys(state_dict)
    # A TF-era file names every LayerNorm gamma / beta, so an error names a missing one so too.
    tf_suffix = {v: k for k, v in _TF_NORM.items()} if any(n != spelt[n] for n in sd) else {}
    shapes = jax.eval_shape(lambda: init_params(config))
    params: dict[str, Any] = {}
    used, missing, misshapen = set(), [], []
    sizes: dict[str, int] = {}  # a config.json size -> the first other one a misshapen tensor has
    for path, prefix in tensor_names(config).items():
        node = shapes
        for part in path.split("/"):
            node = node[part]
        leaves = {}
        for leaf, spec in node.items():
            suffix = ".weight" if leaf in ("kernel", "embedding", "scale") else ".bias"
            key = prefix + suffix
            if key not in sd:
                missing.append(prefix + tf_suffix[suffix] if tf_suffix and "scale" in node else key)
                continue
            value = np.asarray(sd[key])
            used.add(key)
            if leaf == "kernel":
                value = value.T  # torch Linear (out, in) -> flax (in, out)
            if value.shape != spec.shape:
                want = spec.shape[::-1] if leaf == "kernel" else spec.shape  # in the file's layout, as its shape
                misshapen.append(f"{spelt[key]} {tuple(np.shape(sd[key]))} (the config wants {want})")
                axes = _AXES.get(path.split("/")[-1], ("hidden_size",) * 2)[-value.ndim:] \
                    if value.ndim == len(spec.shape) else ()
                sizes.update({size: got for size, got, want in zip(axes, value.shape, spec.shape)
                              if got != want and size not in sizes})
                continue
            leaves[leaf] = np.asarray(value, np.float32)
        target = params
        for part in path.split("/")[:-1]:
            target = target.setdefault(part, {})
        target[path.split("/")[-1]] = leaves
    unexpected = [spelt[k] for k in sd if k not in used and not _IGNORED.search(k)]
    if missing or unexpected or misshapen:
        # A size config.json gives that the tensors have not: the setting is named, as config.json may be another
        # model's (whose heads, eps and activation these weights would be given).
        raise key_mismatch(f"{where} does not match a {config.architecture} of its config.json", missing=missing,
                           unexpected=unexpected, misshapen=misshapen,
                           advice=other_sizes((*_said(config, size), got) for size, got in sizes.items()))
    return params


def _is_hub_repo_id(source: str) -> bool:
    """'owner/name' or 'hf-hub:owner/name' that is no existing path."""
    name = source.removeprefix("hf-hub:")
    return not os.path.lexists(source) and re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None \
        and not name.endswith((".safetensors", ".bin", ".json"))


def _hub_folder(repo_id: str) -> tuple[Path, dict | None]:
    """The snapshot folder of a hub repo with its weights, config.json and tokenizer files fetched
    (the cache alone when HF_HUB_OFFLINE is set or the hub does not answer)."""
    from huggingface_hub import constants, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, OfflineModeIsEnabled

    from convert.sources import HubUnavailableError, _hub_answers

    try:
        weights, sides = download(repo_id, model_name=repo_id)
    except HubUnavailableError as e:  # its advice names the ViT loader: name this one
        raise HubUnavailableError(str(e).split(", or pass a local file instead")[0] + ", or pass the checkpoint's "
                                  "folder instead: load_text('path/to/folder')") from None
    cache_only = bool(constants.HF_HUB_OFFLINE) or not _hub_answers(hf_hub_url(repo_id, "config.json"))
    for filename in TOKENIZER_FILES:
        try:
            hf_hub_download(repo_id, filename, local_files_only=cache_only)
        except (LocalEntryNotFoundError, OfflineModeIsEnabled, EntryNotFoundError):
            pass  # a repo holds one of the tokenizer layouts; from_folder names what is missing
    return weights.parent, sides.get("config.json")


def load_text(source: str | os.PathLike, *, dtype=jnp.float32) -> tuple[TextEncoder, dict, TextTokenizer]:
    """(TextEncoder, params, TextTokenizer) from a transformers checkpoint: a folder (config.json,
    model.safetensors or pytorch_model.bin, tokenizer.json or vocab files), a weights file inside
    one, or a hub repo id ('owner/name', 'hf-hub:owner/name')."""
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"load_text takes a folder, a weights file or a hub repo id; got a {type(source).__name__}")
    path = Path(source)
    if path.is_dir():
        folder, weights = path, next((path / f for f in WEIGHT_FILES if (path / f).is_file()), None)
        if weights is None:
            raise FileNotFoundError(f"{path} holds none of {', '.join(WEIGHT_FILES)}")
        hf_config = read_json(path / "config.json")
    elif path.is_file():
        folder, weights, hf_config = path.parent, path, read_json(path.parent / "config.json")
    elif _is_hub_repo_id(str(source)):
        repo_id = str(source).removeprefix("hf-hub:")
        folder, hf_config = _hub_folder(repo_id)
        weights = next(folder / f for f in WEIGHT_FILES if (folder / f).is_file())
    else:
        raise FileNotFoundError(f"{source} does not exist (a checkpoint folder, a weights file, or a hub repo id "
                                "'owner/name')")
    if hf_config is None:
        raise FileNotFoundError(f"{folder} has no config.json: a transformers checkpoint folder holds one (it "
                                "names the architecture and the sizes)")
    try:
        config = TextConfig.from_hf(hf_config)
    except ValueError as e:  # ConfigError, UnsupportedArchitectureError: name the file
        raise type(e)(f"{folder / 'config.json'}: {e}") from None
    params = params_from_state_dict(read_file(weights), config, str(weights))
    tokenizer = TextTokenizer.from_folder(folder, config)
    return (TextEncoder(config, dtype=dtype), jax.tree_util.tree_map(jnp.asarray, params), tokenizer)


def export_state_dict(params, config: TextConfig) -> dict[str, np.ndarray]:
    """TextEncoder params -> the family's transformers state dict (numpy): the inverse of
    `params_from_state_dict` (no position-id buffers)."""
    out = {}
    for path, prefix in tensor_names(config).items():
        node = params
        for part in path.split("/"):
            node = node[part]
        for leaf, value in node.items():
            value = np.asarray(value, np.float32)
            out[prefix + (".weight" if leaf in ("kernel", "embedding", "scale") else ".bias")] = \
                np.ascontiguousarray(value.T) if leaf == "kernel" else value
    return out


# model_type values of text encoders: a checkpoint naming one is a text checkpoint even when this module
# refuses its architecture (load_text then names the architecture and what is supported).
_TEXT_MODEL_TYPES = ("bert", "roberta", "distilbert", "xlm-roberta", "camembert", "albert", "electra", "deberta",
                     "deberta-v2", "xlnet", "mpnet", "longformer", "modernbert")


def is_text_checkpoint(source) -> bool:
    """Whether `source` (a folder, a weights file in one, or a hub repo id) is a transformers text classifier
    by its config.json: an architecture of the form *ForSequenceClassification, or a text encoder's model_type.
    False when there is no readable config.json (a hub repo is looked up as `load_text` would, cache first)."""
    if not isinstance(source, (str, os.PathLike)):
        return False
    path = Path(source)
    config_path = path / "config.json" if path.is_dir() else path.parent / "config.json" if path.is_file() else None
    if config_path is None and _is_hub_repo_id(str(source)):
        try:
            from huggingface_hub import hf_hub_download

            config_path = Path(hf_hub_download(str(source).removeprefix("hf-hub:"), "config.json"))
        except Exception:  # noqa: BLE001 - no such repo, offline, no config.json: not a text checkpoint we can tell
            return False
    try:
        hf = read_json(config_path) if config_path is not None else None
    except (ValueError, OSError):
        return False
    if not isinstance(hf, dict):
        return False
    archs = hf.get("architectures") or []
    named = isinstance(archs, list) and any(isinstance(a, str) and a.endswith("ForSequenceClassification")
                                            for a in archs)
    return named or hf.get("model_type") in _TEXT_MODEL_TYPES
