"""Where timm weights come from: a module, a state dict, a file, or the Hugging Face hub.

Each reader returns (state dict of numpy arrays, timm-style config.json dict or None).
safetensors files are read with safetensors' numpy loader, so torch is never imported for
them; `.pth`/`.bin` need torch.
"""

from __future__ import annotations

import json
import os
import re
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
        # torch's weights-only refusals come as several lines with terminal escapes, advising
        # weights_only=False: the one fact they carry is kept, the advice is ours.
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if found:  # a pickled class (a whole nn.Module, a training script's objects): its code would run
            raise ValueError(f"{path} is not a plain state dict: it holds a pickled {found.group(1)}, which "
                             "convert.load does not unpickle (that could run arbitrary code). If you trust the file, "
                             "load it in Python and save only its weights with torch.save(model.state_dict(), "
                             "'weights.pth'), or pass the nn.Module itself to convert.load") from None
        detail = re.search(r"WeightsUnpickler error:(.*?)(Check the documentation|$)", text, re.S)
        detail = " ".join((detail.group(1) if detail else text).split())
        raise ValueError(f"cannot read {path} as a torch checkpoint ({type(e).__name__}: {detail}): the file is "
                         "damaged or not made by torch.save; re-create it with torch.save(model.state_dict(), "
                         "path)") from None
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

    Honours huggingface_hub's cache (HF_HUB_CACHE / HF_HOME) and HF_HUB_OFFLINE=1. A hub that does
    not answer fails at once (or is served from the cache) instead of after huggingface_hub's retries.
    """
    from huggingface_hub import constants, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import (EntryNotFoundError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError)

    def unavailable(filename: str) -> HubUnavailableError:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub cannot be reached"
        return HubUnavailableError(
            f"cannot load {repo_id}/{filename}: {why} and it is not in the local cache ({constants.HF_HUB_CACHE}). "
            f"Download it where the hub is reachable (`hf download {repo_id}`) and copy the cache over, or pass "
            f"a local file instead: convert.load('path/to/model.safetensors', model_name="
            f"'{model_name or repo_id.split('/')[-1]}').")

    # hf_hub_download retries a request that gets no answer 5 times (about 25 s, more on timeouts) for
    # every file not in the cache, and offers no argument or setting to retry less. So one request
    # without retries first: if the hub does not answer it, every file comes from the cache alone.
    cache_only = bool(constants.HF_HUB_OFFLINE) or not _hub_answers(hf_hub_url(repo_id, WEIGHT_FILES[0]))
    cache_misses = []

    def fetch(filename: str) -> str | None:
        """The file's local path; None when the repo (or the cache, offline) lacks this file."""
        nonlocal cache_only
        try:
            return hf_hub_download(repo_id, filename, local_files_only=cache_only)
        except (LocalEntryNotFoundError, OfflineModeIsEnabled):  # subclass of EntryNotFoundError: first
            # Not cached, and the hub is off limits or did not answer (after its retries): asking it
            # for the next file would fail the same way, slowly. The cache may still hold that one.
            cache_only = True
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


def _hub_answers(url: str) -> bool:
    """Whether the hub answers a request for `url` at all (any HTTP status), asked once, without retries.

    False only for the HTTP client's own errors (refused connection, unknown host, timeout, proxy,
    TLS); anything else is left to hf_hub_download to handle as it always does."""
    from huggingface_hub import constants, get_hf_file_metadata
    from huggingface_hub.errors import HfHubHTTPError

    try:
        get_hf_file_metadata(url, timeout=constants.HF_HUB_ETAG_TIMEOUT)  # documented: no retries by default
    except HfHubHTTPError:  # 404, 401, 5xx...: an answer
        return True
    except Exception as e:
        # httpx2 (huggingface_hub 2), httpx (1.x) or requests (0.x): their errors are no HTTP answer.
        client = type(e).__module__.partition(".")[0]
        return not (isinstance(e, OSError) or client in ("httpx2", "httpx", "httpcore", "requests", "urllib3"))
    return True


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
