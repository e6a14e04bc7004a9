"""Where timm weights come from: a module, a state dict, a file, or the Hugging Face hub.

Each reader returns (state dict of numpy arrays, timm-style config.json dict or None).
safetensors files are read with safetensors' numpy loader, so torch is never imported for
them; `.pth`/`.bin` need torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from convert.timm_vit import clean_state_dict

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


class HubUnavailableError(OSError):
    """The hub could not be reached and the files are not in the local cache."""


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"cannot read {path} as safetensors: {e}") from None


def read_torch_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise ImportError(f"reading {path} needs torch (pip install 'predmaps[torch]'); "
                          "a .safetensors file converts without it") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read {path} as a torch checkpoint: {e}") from None
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return clean_state_dict(obj)


def read_file(path: Path) -> dict[str, np.ndarray]:
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if path.suffix in TORCH_SUFFIXES:
        return read_torch_file(path)
    raise ValueError(f"don't know how to read {path}: expected .safetensors, {', '.join(TORCH_SUFFIXES)}, "
                     "a directory holding model.safetensors, or a jaxvit checkpoint directory")


def read_json(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def is_file_name(name: str) -> bool:
    """Whether a path that does not exist names a checkpoint file (by a separator or a weight file's
    suffix) rather than a hub model: it is then reported missing, never looked up on the hub."""
    return (os.sep in name and not name.startswith(("hf-hub:", "timm/"))
            or Path(name).suffix in (".safetensors",) + TORCH_SUFFIXES)


def hub_repo_id(name: str, hf_hub_id: str | None = None) -> str:
    """'hf-hub:timm/x', 'timm/x' or a timm name (with its pretrained cfg's hub id) -> repo id."""
    if name.startswith("hf-hub:"):
        return name[len("hf-hub:"):]
    if "/" in name:
        return name
    return hf_hub_id or f"timm/{name}"


def download(repo_id: str, *, model_name: str | None = None) -> tuple[Path, dict | None]:
    """Fetch (or find in the cache) a timm hub repo's weights and config.json.

    Honours huggingface_hub's cache (HF_HUB_CACHE / HF_HOME) and HF_HUB_OFFLINE=1.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError)

    from huggingface_hub import constants

    def unavailable(filename: str) -> HubUnavailableError:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub cannot be reached"
        return HubUnavailableError(
            f"cannot load {repo_id}/{filename}: {why} and it is not in the local cache ({constants.HF_HUB_CACHE}). "
            f"Download it where the hub is reachable (`hf download {repo_id}`) and copy the cache over, or pass "
            f"a local file instead: convert.load('path/to/model.safetensors', model_name="
            f"'{model_name or repo_id.split('/')[-1]}').")

    cache_misses = []

    def fetch(filename: str) -> str | None:
        """The file's local path; None when the repo (or the cache, offline) lacks this file."""
        try:
            return hf_hub_download(repo_id, filename)
        except (LocalEntryNotFoundError, OfflineModeIsEnabled):  # subclass of EntryNotFoundError: first
            cache_misses.append(filename)
            return None
        except EntryNotFoundError:
            return None
        except RepositoryNotFoundError:
            raise HubUnavailableError(f"no such Hugging Face hub repository {repo_id!r} (or it is private)") from None

    weights = None
    for filename in WEIGHT_FILES:
        found = fetch(filename)
        if found is not None:
            weights = Path(found)
            break
    if weights is None:
        if cache_misses:
            raise unavailable(cache_misses[0])
        raise FileNotFoundError(f"hub repository {repo_id} has none of {WEIGHT_FILES}")
    config_path = fetch("config.json")
    return weights, (read_json(Path(config_path)) if config_path else None)


def read_source(source: Any, *, hf_hub_id: str | None = None) -> tuple[dict[str, np.ndarray], dict | None, str]:
    """(state dict, timm config.json or None, a description) for a path, a hub name or a state dict."""
    if isinstance(source, Mapping):
        return clean_state_dict(source), None, "state dict"
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"cannot load weights from a {type(source).__name__}: pass a timm nn.Module, a state dict, "
                        "a file path or a hub model name")
    path = Path(source)
    if path.is_dir():
        for filename in WEIGHT_FILES:
            if (path / filename).exists():
                return read_file(path / filename), read_json(path / "config.json"), str(path / filename)
        raise FileNotFoundError(f"directory {path} holds none of {WEIGHT_FILES} (nor a jaxvit checkpoint)")
    if path.is_file():
        if path.stat().st_size == 0:
            raise ValueError(f"checkpoint file {path} is empty")
        return read_file(path), read_json(path.parent / "config.json"), str(path)
    name = str(source)
    if is_file_name(name):
        raise FileNotFoundError(f"checkpoint file {name} does not exist")
    repo_id = hub_repo_id(name, hf_hub_id)
    weights, config = download(repo_id, model_name=repo_id.split("/")[-1])
    return read_file(weights), config, f"hub:{repo_id}"
