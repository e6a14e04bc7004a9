"""Where weights come from: a module, a state dict, a file, or the Hugging Face hub.

Each reader returns (state dict of numpy arrays, the JSON files beside the weights: config.json,
preprocessor_config.json, open_clip_config.json, each a dict or None). safetensors files are read
with safetensors' numpy loader, so torch is never imported for them; `.pth`/`.bin` need torch;
`.npz` archives (Google's JAX checkpoints) are read with numpy, pickles refused. Which format the
weights are in is decided by their keys, not here.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from convert.timm_vit import clean_state_dict

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
OPEN_CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
SIDE_FILES = ("config.json", "preprocessor_config.json", "open_clip_config.json")
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
        with warnings.catch_warnings():  # torch warns of pickle protocols it did not write: our message says more
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        # torch's weights-only refusals come as several lines with terminal escapes, advising
        # weights_only=False; their wording changes between releases. So the file itself says
        # whether it holds code: the callables its pickle names, read without unpickling anything.
        code = [name for name in pickle_globals(path) if not _is_tensor_global(name)]
        if code:
            names = ", ".join(code[:3]) + (f" and {len(code) - 3} more" if len(code) > 3 else "")
            raise ValueError(f"{path} contains code: its pickle references {names}, beyond tensors (a pickled model "
                             "or object, or a crafted file), so convert.load refuses it and runs nothing from it. If "
                             "you made it, save only the weights: torch.save(model.state_dict(), 'weights.pth'), or "
                             "pass the nn.Module itself to convert.load") from None
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
        detail = re.search(r"WeightsUnpickler error:(.*?)(Check the documentation|$)", text, re.S)
        detail = " ".join((detail.group(1) if detail else text).split())
        if "weights_only" in detail:  # torch's advice, never ours
            detail = "not a weights-only pickle"
        raise ValueError(f"cannot read {path} as a torch checkpoint ({type(e).__name__}: {detail}): the file is "
                         "damaged or not made by torch.save; re-create it with torch.save(model.state_dict(), "
                         "path)") from None
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return clean_state_dict(obj)


def _is_tensor_global(name: str) -> bool:
    """Whether a pickle global is one torch.save writes for tensors and state dicts (no other code)."""
    module, _, attr = name.rpartition(".")
    if module == "torch._utils":
        return attr.startswith("_rebuild_")
    if module == "torch":
        return attr.endswith("Storage") or attr in ("Size", "device") or attr in _TORCH_DTYPES
    return name == "collections.OrderedDict"


_TORCH_DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")
_STRING_OPS = ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING")
_PUT_OPS = ("PUT", "BINPUT", "LONG_BINPUT")
_GET_OPS = ("GET", "BINGET", "LONG_BINGET")


def pickle_globals(path: str | os.PathLike, *, max_ops: int = 1_000_000) -> list[str]:
    """The callables (module.name) a torch file's pickles import, in order, read with pickletools'
    opcode parser: nothing is unpickled or run. A zip (torch.save's format) is read at its data.pkl;
    any other file as the legacy format's pickles, one after another. Stops at what it cannot parse."""
    import zipfile

    found: list[str] = []
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                members = [n for n in archive.namelist() if n.endswith("data.pkl")]
                if not members:
                    return found
                stream = archive.open(members[0])
                _scan_pickles(stream, found, max_ops)
        else:
            with open(path, "rb") as stream:
                _scan_pickles(stream, found, max_ops)
    except Exception:  # a damaged file: what was found so far is what it names
        pass
    return list(dict.fromkeys(found))


def _scan_pickles(stream, found: list[str], max_ops: int) -> None:
    import pickletools

    ops = 0
    for _ in range(16):  # the legacy format writes a few pickles in a row
        strings: list[str] = []  # recent string pushes: STACK_GLOBAL's module and name
        memo: dict[int, str] = {}
        for op, arg, _ in pickletools.genops(stream):
            ops += 1
            if ops > max_ops:
                return
            name = op.name
            if name in ("GLOBAL", "INST"):
                found.append(".".join(str(arg).split(" ", 1)))
            elif name == "STACK_GLOBAL":
                found.append(".".join(strings[-2:]) if len(strings) >= 2 else "a callable")
            elif name in _STRING_OPS:
                strings.append(arg.decode("latin-1") if isinstance(arg, bytes) else str(arg))
            elif name in _PUT_OPS and strings:
                memo[arg] = strings[-1]
            elif name == "MEMOIZE" and strings:
                memo[len(memo)] = strings[-1]
            elif name in _GET_OPS and arg in memo:
                strings.append(memo[arg])
            strings = strings[-2:]


def read_file(path: Path) -> dict[str, np.ndarray]:
    from convert import google_npz

    if google_npz.is_npz(path):  # by content: np.savez names nothing
        return google_npz.read_npz(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if path.suffix in TORCH_SUFFIXES:
        return read_torch_file(path)
    raise ValueError(f"don't know how to read {path}: expected .safetensors, .npz, {', '.join(TORCH_SUFFIXES)}, "
                     "a directory holding model.safetensors, or a jaxvit checkpoint directory")


def read_json(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def is_file_name(name: str) -> bool:
    """Whether a path that does not exist names a checkpoint file (by a separator, other than a hub repo
    id's one, or a weight file's suffix) rather than a hub model: it is then reported missing, never
    looked up on the hub."""
    if Path(name).suffix in (".safetensors", ".npz") + TORCH_SUFFIXES:
        return True
    return os.sep in name and not (name.startswith(("hf-hub:", "timm/")) or _REPO_ID.fullmatch(name))


# A hub repo id as transformers and open_clip name theirs ("google/vit-base-patch16-224"): one slash,
# relative; when no such local path exists it is looked up in the hub cache, as from_pretrained does.
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def hub_repo_id(name: str, hf_hub_id: str | None = None) -> str:
    """'hf-hub:timm/x', 'timm/x' or a timm name (with its pretrained cfg's hub id) -> repo id."""
    if name.startswith("hf-hub:"):
        return name[len("hf-hub:"):]
    if "/" in name:
        return name
    return hf_hub_id or f"timm/{name}"


def download(repo_id: str, *, model_name: str | None = None) -> tuple[Path, dict[str, dict | None]]:
    """Fetch (or find in the cache) a hub repo's weights and the JSON files beside them (`SIDE_FILES`:
    config.json; preprocessor_config.json for a transformers config; open_clip_config.json beside
    open_clip weights or without config.json), as {file name: its JSON or None}.

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
    for filename in WEIGHT_FILES + OPEN_CLIP_WEIGHT_FILES:
        found = fetch(filename)
        if found is not None:
            weights = Path(found)
            break
    if weights is None:
        if cache_misses:
            raise unavailable(cache_misses[0])
        raise FileNotFoundError(f"hub repository {repo_id} has none of {WEIGHT_FILES + OPEN_CLIP_WEIGHT_FILES}")
    sides: dict[str, dict | None] = dict.fromkeys(SIDE_FILES)
    for filename in SIDE_FILES:
        wanted = (filename == "config.json"
                  or filename == "preprocessor_config.json" and isinstance(sides["config.json"], dict)
                  and "model_type" in sides["config.json"]
                  or filename == "open_clip_config.json" and (weights.name in OPEN_CLIP_WEIGHT_FILES
                                                              or sides["config.json"] is None))
        path = fetch(filename) if wanted else None
        sides[filename] = read_json(Path(path)) if path else None
    return weights, sides


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


def config_file_of(where: str) -> str:
    """The config.json that `read_source` read beside the weights it describes as `where`, for messages."""
    if where.startswith("hub:"):
        return f"config.json of hub repository {where[len('hub:'):]}"
    return str(Path(where).parent / "config.json")


def read_source(source: Any, *, hf_hub_id: str | None = None) -> tuple[dict[str, np.ndarray], dict | None, str]:
    """(state dict, config.json or None, a description) for a path, a hub name or a state dict."""
    state_dict, sides, where = read_source_files(source, hf_hub_id=hf_hub_id)
    return state_dict, sides["config.json"], where


def _sides_beside(folder: Path) -> dict[str, dict | None]:
    return {name: read_json(folder / name) for name in SIDE_FILES}


def read_source_files(source: Any, *, hf_hub_id: str | None = None
                      ) -> tuple[dict[str, np.ndarray], dict[str, dict | None], str]:
    """(state dict, {side file: JSON or None}, a description) for a path, a hub name or a state dict."""
    if isinstance(source, Mapping):
        return clean_state_dict(source), dict.fromkeys(SIDE_FILES), "state dict"
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"cannot load weights from a {type(source).__name__}: pass a timm nn.Module, a state dict, "
                        "a file path or a hub model name")
    path = Path(source)
    if path.is_dir():
        for filename in WEIGHT_FILES + OPEN_CLIP_WEIGHT_FILES:
            if (path / filename).exists():
                return read_file(path / filename), _sides_beside(path), str(path / filename)
        raise FileNotFoundError(f"directory {path} holds none of {WEIGHT_FILES + OPEN_CLIP_WEIGHT_FILES} (nor a "
                                "jaxvit checkpoint)")
    if path.is_file():
        if path.stat().st_size == 0:
            raise ValueError(f"checkpoint file {path} is empty")
        return read_file(path), _sides_beside(path.parent), str(path)
    if path.is_symlink():  # a link to nothing: the user meant a file, never a hub model of that name
        raise FileNotFoundError(f"{path} is a broken symbolic link: it points to {os.readlink(path)}, which does not "
                                "exist")
    name = str(source)
    if is_file_name(name):
        raise FileNotFoundError(f"checkpoint file {name} does not exist")
    repo_id = hub_repo_id(name, hf_hub_id)
    weights, sides = download(repo_id, model_name=repo_id.split("/")[-1])
    return read_file(weights), sides, f"hub:{repo_id}"
