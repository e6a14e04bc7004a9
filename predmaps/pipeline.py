"""Explain a whole data set: batches streamed through every device and host, resumable.

    import convert, predmaps
    from predmaps.pipeline import ExplainSpec, explain_batches, explain_dataset

    model, params = convert.load("vit_base_patch16_224.orig_in21k_ft_in1k")
    spec = ExplainSpec(methods=("predicatt",), layers=(-1, -2), targets=("top", "gt"))

    # In research code: host numpy batches, in input order, nothing written.
    for b in explain_batches(model, params, "imagenet/val", spec, batch_size=256):
        b.names, b.pred, b.score, b.maps["predicatt/L12/top"]       # (n, 1, 14, 14)

    # A job: shards on disk, resumable, errors recorded (what `predmaps run` calls).
    summary = explain_dataset(model, params, "imagenet/val", "out/", spec, batch_size=256)
    res = predmaps.results.read_results("out/")

Inputs (`open_inputs`): a directory (recursive, image extensions only, sorted); a glob (image
extensions only, sorted); a text file of paths (one per line, relative to the file's folder,
optionally `<TAB>label`); one image; or, from Python, a sequence/iterable of paths, `Item`s, `(name,
image)` pairs or images (PIL / uint8 arrays). ImageNet layouts give labels: a class-folder tree
whose folders are WordNet ids (torchvision's ImageFolder layout of `val/`) through
`jaxvit.labels.wnid_to_index`, or flat files plus a label file (`labels=`: lines `file label`, label
a class index or a WordNet id; caffe's `val.txt` and Kaggle's `LOC_val_solution.csv` both read as
they are).

Devices: one `jax.jit`, compiled ahead of time, over a 1-D mesh ("batch") of every device of
every process: images, labels and a validity mask `NamedSharding(mesh, P("batch"))`, params
replicated. The global batch is rounded up to a multiple of the device count (`explain_dataset`
first caps it at what a shard holds: a batch never spans two); a partial batch is zero-padded
and its padding rows masked out. Several hosts: call `init_distributed()`
(or `predmaps run --distributed on|auto`) before anything touches JAX; the inputs are cut
into shards of `shard_size` images, shard j belongs to process j % P, each process feeds its
slice with `jax.make_array_from_process_local_data` and writes its own shards. All processes
run the same number of steps (idle ones feed masked batches), agreed once at the start.

Host side: decoding and resizing (PIL, `jaxvit.preprocess`) run on a thread pool that keeps
`prefetch` batches decoded ahead of the device, and the device's result for batch t is copied
back while batch t+1 runs. Memory is bounded whatever the data set's size: inputs are listed
lazily (one directory's listing at a time), about `prefetch + 2` batches of images and two
batches of results are alive on the host and one batch on the devices, and one shard of
results (with its list of inputs) is buffered before it is written.

Measured 2026-11-26 on this project's dev VM (2 cores of an Intel Xeon, shared with other
jobs; Python 3.11.7, Pillow 13.0, numpy 2.4) with `decode_throughput`: 200 generated 500x375
JPEGs -> 224x224 (ViT-Ti/16's eval transform: bicubic, crop 0.9), median of 6 interleaved
trials at load average ~4: 1 thread 219 img/s, 2 threads 357 img/s (x1.63), 4 threads 337.
That matches the profile: 68% of an image's time is PIL decoding, resampling and copying (C
code that releases the GIL) and 13% numpy normalisation (GIL released in its loops), which
bounds the speedup on k free cores near 1/(0.2 + 0.8/k): 1.6x on 2, 2.5x on 4, 4x on 16.
(At load average ~7 the same trials gave 164 / 144 / 191 img/s: other jobs took the cores.)
End to end (ViT-Ti/16, random weights, batch 32, XLA on the same 2 cores, 200 images), the
device loop waited on decoding 0.0-0.3 s of 6-8 s wall (<5%): decoding stays ahead.

Size: one module of several concepts (job spec, distributed protocol, stream, job driver) under
banner comments; issue 25 splits it into a package along those banners, not yet done.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import errno
import functools
import glob as _glob
import hashlib
import io
import json
import math
import os
import re
import stat
import sys
import time
import zipfile
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from jaxvit import safe_write
from jaxvit.preprocess import DECODE_BUDGET, ImageLoadError, eval_settings
from predmaps import results as _results
from predmaps.results import JobMismatchError

__all__ = ["ExplainSpec", "IMAGE_EXTENSIONS", "Inputs", "Item", "JobInterrupted", "JobMismatchError",
           "OutputInUseError", "OutputWriteError", "ResultBatch", "RunSummary", "decode_throughput", "explain_batches", "explain_dataset",
           "OtherProcessError", "init_distributed", "model_identity", "open_inputs", "params_fingerprint"]

# torchvision's IMG_EXTENSIONS: what ImageFolder lists.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_WNID = re.compile(r"^n\d{8}$")
_SHARD_BUDGET_BYTES = 256 << 20
# ImageNet's 1.28M training labels take ~60 MB as 'path label' lines: a file past this is not a label file
LABEL_FILE_LIMIT = 256 << 20  # results buffered per shard, for the automatic shard size


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Item:
    """One input. name: its stable identity (path relative to the input root, the list file's
    line, or a caller's name); source: a path (str) or an in-memory image; label: class or -1."""

    name: str
    source: Any
    label: int = -1

    @property
    def path(self) -> str:
        return self.source if isinstance(self.source, str) else ""


class Inputs:
    """An ordered, lazily listed collection of `Item`s. Iterating lists it again (path sources
    and sequences); a one-shot iterator can be iterated once (`reiterable` False)."""

    def __init__(self, make_iter: Callable[[], Iterator[Item]], source: str, *, labelled: str = "",
                 reiterable: bool = True):
        self._make = make_iter
        self.source = source
        self.labelled = labelled  # how labels were found ("" when none)
        self.reiterable = reiterable
        self._used = False

    def __iter__(self) -> Iterator[Item]:
        if not self.reiterable:
            if self._used:
                raise RuntimeError(f"inputs {self.source} are a one-shot iterator, already consumed")
            self._used = True
        return self._make()

    def __repr__(self) -> str:
        return f"Inputs({self.source!r}{', labelled by ' + self.labelled if self.labelled else ''})"


def _has_magic(s: str) -> bool:
    return any(c in s for c in "*?[")


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


class _UnlistedFolder:
    """The source of a folder that could not be listed: an input error like an unreadable image's,
    so the job counts it (and --strict fails) instead of silently explaining fewer images."""

    def __init__(self, path: Path, error: OSError):
        # Its images, once listed, change the job's listing, which --retry-failed keeps fixed: say so here.
        self.reason = (f"cannot list the folder {path}: {error.strerror or error}; its images were not explained. "
                       "Once it can be listed they are inputs this job did not list, which --retry-failed cannot "
                       "add: run the job again into a new --out")


def _walk(root: Path, rel: str = "", seen: set | None = None) -> Iterator[tuple[str, Path | _UnlistedFolder]]:
    """(relative posix name, path) of every image-extension file under root, sorted per
    directory, depth first; hidden entries skipped; directory symlinks followed once. A subfolder
    that cannot be listed comes as ("sub/", _UnlistedFolder); the root itself raises."""
    seen = set() if seen is None else seen
    try:
        real = os.path.realpath(root)
        if real in seen:
            return
        seen.add(real)
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as e:
        if not rel:
            raise OSError(e.errno, f"cannot list the images folder {root}: {e.strerror or e}") from e
        yield rel, _UnlistedFolder(root, e)
        return
    for e in entries:
        if e.name.startswith("."):
            continue
        name = f"{rel}{e.name}"
        try:
            is_dir = e.is_dir()
        except OSError:
            continue
        if is_dir:
            yield from _walk(Path(e.path), name + "/", seen)
        elif _is_image_name(e.name):
            yield name, Path(e.path)


def _class_folder_labels(root: Path) -> dict[str, int] | None:
    """{folder: class} when root is an ImageNet class-folder tree (every visible subfolder a
    WordNet id, no images at the top), else None."""
    try:
        entries = [e for e in os.scandir(root) if not e.name.startswith(".")]
    except OSError:
        return None
    dirs = [e.name for e in entries if e.is_dir()]
    if not dirs or not all(_WNID.match(d) for d in dirs) or any(_is_image_name(e.name) for e in entries
                                                                if not e.is_dir()):
        return None
    from jaxvit import labels as _labels

    index = {w: i for i, w in enumerate(_labels.imagenet_wnids())}
    return {d: index.get(d, -1) for d in dirs}


def _parse_label(text: str) -> int | None:
    text = text.strip()
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    if _WNID.match(text):
        from jaxvit import labels as _labels

        try:
            return _labels.wnid_to_index(text)
        except KeyError:
            raise ValueError(f"{text!r} is not an ImageNet-1k WordNet id") from None
    return None


def read_label_file(path: str | os.PathLike) -> dict[str, int]:
    """{file name: class} from lines `name label` (whitespace or comma separated; label a class
    index or an ImageNet WordNet id; further fields ignored: Kaggle's LOC_val_solution.csv and
    caffe's val.txt read as they are). A header line is skipped."""
    path = Path(path)
    out: dict[str, int] = {}
    try:
        text = safe_write.read_regular(path, LABEL_FILE_LIMIT, "label file").decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e}); save the label file as UTF-8") from None
    first = True  # the first line with content may be a header
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        is_first, first = first, False
        fields = line.split(",", 1) if "," in line else line.split(None, 1)
        if len(fields) < 2:
            if re.fullmatch(r"\d+", line):
                raise ValueError(
                    f"{path}: one label per line without file names (like the ILSVRC2012 devkit's "
                    "validation_ground_truth.txt, whose ids are not class indices) is ambiguous: give "
                    "'file label' lines, label a class index (0..999, sorted WordNet ids) or a WordNet id")
            raise ValueError(f"{path}:{n}: expected 'file label', got {line!r}")
        label = _parse_label(fields[1].split()[0] if fields[1].split() else "")
        if label is None:
            if is_first:  # a header such as "ImageId,PredictionString"
                continue
            raise ValueError(f"{path}:{n}: cannot read a class index or WordNet id in {line!r}")
        out[fields[0].strip()] = label
    if not out:
        raise ValueError(f"{path}: no labels found")
    return out


def _lookup(label_map: dict[str, int] | None, name: str) -> int:
    if not label_map:
        return -1
    for key in (name, os.path.basename(name), os.path.splitext(os.path.basename(name))[0]):
        if key in label_map:
            return label_map[key]
    return -1


def _check_list_file(path: Path) -> None:
    """A file without an image extension is read as a list of paths; refuse one that holds binary
    data (an image under another extension, e.g. .gif or .jpe) rather than explain its bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(8192)
    except OSError as e:
        raise OSError(e.errno, f"images {path}: cannot read it: {e.strerror or e}") from e
    if b"\0" in head:
        raise ValueError(f"images {path}: not an image with a known extension ({', '.join(IMAGE_EXTENSIONS)}) "
                         "nor a text list of image paths (it holds binary data): convert or rename it, or put "
                         "its path in a list file")


def open_inputs(images: Any, *, labels: str | os.PathLike | dict | None = None) -> Inputs:
    """Resolve what to explain into `Inputs` (see the module docstring). `labels`: a label file,
    or a {name: class} dict, matched by name, base name or stem."""
    if isinstance(images, Inputs):
        return images
    label_map = read_label_file(labels) if isinstance(labels, (str, os.PathLike)) else labels
    how = "label file" if label_map else ""
    if isinstance(images, (str, os.PathLike)):
        s = os.fspath(images)
        p = Path(s)
        if p.is_dir():
            root = p.resolve()
            folders = None if label_map else _class_folder_labels(root)

            def walk_dir():
                for name, path in _walk(root):
                    label = folders.get(name.split("/", 1)[0], -1) if folders else _lookup(label_map, name)
                    yield Item(name, path if isinstance(path, _UnlistedFolder) else str(path), label)

            return Inputs(walk_dir, s, labelled="class folders (ImageNet WordNet ids)" if folders else how)
        if p.is_file():  # before the glob test: an existing "cat [1].png" is that file
            if _is_image_name(p.name):
                return Inputs(lambda: iter([Item(s, str(p.resolve()), _lookup(label_map, s))]), s, labelled=how)
            _check_list_file(p)
            base = p.resolve().parent

            def walk_list():
                with open(p, encoding="utf-8", errors="surrogateescape") as f:
                    for line in f:
                        line = line.rstrip("\r\n")
                        if not line.strip() or line.lstrip().startswith("#"):
                            continue
                        name, _, lab = line.partition("\t")
                        label = _parse_label(lab) if lab.strip() else None
                        if lab.strip() and label is None:
                            raise ValueError(f"{p}: cannot read the label of line {line!r}")
                        name = name.strip()
                        yield Item(name, str(base / name), _lookup(label_map, name) if label is None else label)

            return Inputs(walk_list, s, labelled=how or "list file")
        if _has_magic(s):
            def walk_glob():
                for m in sorted(_glob.glob(s, recursive=True)):
                    if _is_image_name(m) and os.path.isfile(m):  # as a folder lists: "dir/*" skips its notes.txt
                        yield Item(m, os.path.abspath(m), _lookup(label_map, m))

            return Inputs(walk_glob, s, labelled=how)
        raise FileNotFoundError(f"images {s!r}: no such directory or file, and not a glob pattern")

    def to_item(i: int, x: Any) -> Item:
        if isinstance(x, Item):
            return x
        if isinstance(x, (str, os.PathLike)):
            x = os.fspath(x)
            return Item(x, os.path.abspath(x), _lookup(label_map, x))
        if isinstance(x, tuple) and len(x) in (2, 3) and isinstance(x[0], str):
            return Item(x[0], x[1], int(x[2]) if len(x) == 3 else _lookup(label_map, x[0]))
        return Item(f"#{i}", x, -1)

    if isinstance(images, np.ndarray):  # a stack of uint8 images (B, H, W[, C])
        images = list(images)
    if isinstance(images, Sequence) and not isinstance(images, (bytes, bytearray)):
        seq = images
        return Inputs(lambda: (to_item(i, x) for i, x in enumerate(seq)), f"<{len(seq)} inputs>", labelled=how)
    if isinstance(images, Iterable):
        it = iter(images)
        return Inputs(lambda: (to_item(i, x) for i, x in enumerate(it)), "<iterator>", labelled=how,
                      reiterable=False)
    raise TypeError(f"cannot read inputs from {type(images).__name__}")


# --------------------------------------------------------------------------------------
# What to explain
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Combo:
    id: int
    method: str
    layer: int | None  # resolved 0..L; None for methods without a prediction layer
    target: str
    k: int

    @property
    def key(self) -> str:
        return f"{self.method}/L{self.layer}/{self.target}" if self.layer is not None else \
            f"{self.method}/{self.target}"


def _as_tuple(x, cast=str) -> tuple:
    if isinstance(x, str):
        x = [s for s in x.split(",") if s.strip()]
    elif isinstance(x, (int, np.integer)):
        x = [x]
    return tuple(cast(v.strip()) if isinstance(v, str) else cast(v) for v in x)


@dataclasses.dataclass(frozen=True)
class ExplainSpec:
    """Methods x layers x targets, and how maps are stored.

    methods: names from `predmaps.METHODS` ("predicatt", "prediction_map", "rollout", ...).
    layers: prediction layers (negative from the end); used by prediction-map methods only.
    targets: "top", "topK" (e.g. "top5"), "all", "gt" (the input's label), or a class index.
    map_dtype: "float32" or "float16" (half the disk; ~3 significant digits).
    options: method options, e.g. (("similarity", "cosine"),), each given to the methods taking it.
    Strings with commas are accepted: ExplainSpec("predicatt,rollout", "-1,-2", "top,gt").
    """

    methods: tuple[str, ...] = ("predicatt",)
    layers: tuple[int, ...] = (-1,)
    targets: tuple[str, ...] = ("top",)
    map_dtype: str = "float32"
    options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "methods", _as_tuple(self.methods))
        object.__setattr__(self, "layers", _as_tuple(self.layers, int))
        object.__setattr__(self, "targets", _as_tuple(self.targets))
        opts = self.options.items() if isinstance(self.options, dict) else self.options
        object.__setattr__(self, "options", tuple(sorted((str(k), v) for k, v in opts)))
        if self.map_dtype in ("f16", "half", "fp16"):
            object.__setattr__(self, "map_dtype", "float16")
        if self.map_dtype in ("f32", "fp32"):
            object.__setattr__(self, "map_dtype", "float32")
        if self.map_dtype not in ("float16", "float32"):
            raise ValueError(f"map_dtype must be float16 or float32; got {self.map_dtype!r}")
        if not self.methods or not self.targets or not self.layers:
            raise ValueError("an ExplainSpec needs at least one method, one layer and one target")

    @property
    def needs_labels(self) -> bool:
        return "gt" in self.targets

    def combos(self, model) -> list[Combo]:
        """Every (method, layer, target) to compute, validated against the model."""
        from predmaps import core
        from predmaps.explain import get_method
        from predmaps.targets import make_targets

        cfg = model.config
        if cfg.num_classes <= 0:
            raise ValueError("this model has no classifier head (num_classes=0): prediction maps need one")
        layers = []
        for l in self.layers:
            li = core.layer_index(l, cfg.depth)
            if li not in layers:
                layers.append(li)
        ks = {}
        for t in self.targets:
            if t == "gt":
                ks[t] = 1
            elif re.fullmatch(r"\d+", t):
                make_targets(int(t), 1, cfg.num_classes)
                ks[t] = 1
            else:
                ks[t] = make_targets(t, 1, cfg.num_classes).k
        taken = set()
        for name in self.methods:
            m = get_method(name)
            if m.needs_class_token:
                core.check_class_token(model, name)
            taken |= set(m.options)
        unknown = sorted({k for k, _ in self.options} - taken)
        if unknown:
            raise ValueError(f"option(s) {unknown} are taken by none of the methods {list(self.methods)}")
        out = []
        for name in dict.fromkeys(self.methods):
            m = get_method(name)
            for layer in (layers if m.uses_layer else [None]):
                for t in dict.fromkeys(self.targets):
                    out.append(Combo(len(out), name, layer, t, ks[t]))
        return out

    def to_dict(self, model) -> dict:
        combos = self.combos(model)
        return {"methods": list(dict.fromkeys(self.methods)),
                "layers": sorted({c.layer for c in combos if c.layer is not None}),
                "targets": list(dict.fromkeys(self.targets)), "map_dtype": self.map_dtype,
                "options": [[k, v] for k, v in self.options], "maps": [c.key for c in combos]}


def _as_spec(spec) -> ExplainSpec:
    if spec is None:
        return ExplainSpec()
    if isinstance(spec, ExplainSpec):
        return spec
    if isinstance(spec, dict):
        return ExplainSpec(**spec)
    raise TypeError(f"spec must be an ExplainSpec or a dict; got {type(spec).__name__}")


# --------------------------------------------------------------------------------------
# Model identity
# --------------------------------------------------------------------------------------


def params_fingerprint(params) -> str:
    """A hash of every leaf's path, shape and dtype and a strided sample of 256 of its values (plus
    its last 8): changes with any retraining or conversion, costs one host copy of the params."""
    import jax

    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        a = np.asarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)}:{a.shape}:{a.dtype}".encode())
        flat = a.reshape(-1)
        h.update(np.ascontiguousarray(flat[::max(1, flat.size // 256)][:256]).tobytes())
        h.update(np.ascontiguousarray(flat[-8:]).tobytes())
    return h.hexdigest()[:20]


def model_identity(model, params) -> dict:
    """What makes two models the same for a job: config JSON hash, params fingerprint, compute dtype."""
    import jax.numpy as jnp

    cfg = model.config
    return {"name": cfg.name, "config_sha256": hashlib.sha256(cfg.to_json().encode()).hexdigest(),
            "params_fingerprint": params_fingerprint(params), "dtype": jnp.dtype(model.dtype).name,
            "depth": cfg.depth, "num_classes": cfg.num_classes}


# --------------------------------------------------------------------------------------
# Distributed
# --------------------------------------------------------------------------------------


def _cluster_detected() -> bool:
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True

    def n(var):
        try:
            return int(env.get(var, "1") or 1)
        except ValueError:
            return 1

    if "SLURM_PROCID" in env and "SLURM_JOB_ID" in env and max(n("SLURM_NTASKS"), n("SLURM_STEP_NUM_TASKS")) > 1:
        return True
    if "OMPI_MCA_orte_hnp_uri" in env and n("OMPI_COMM_WORLD_SIZE") > 1:
        return True
    return "," in env.get("TPU_WORKER_HOSTNAMES", "") or "," in env.get("TPU_PROCESS_ADDRESSES", "")


def init_distributed(mode: str = "auto", coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> bool:
    """Join a multi-process JAX job: `jax.distributed.initialize`, before any other JAX call.

    mode "on": always (arguments, else JAX's cluster detection: SLURM, Open MPI, TPU pods, ...);
    "auto": when arguments are given or such a cluster is detected (JAX_COORDINATOR_ADDRESS,
    a SLURM or mpirun job of more than one task, a multi-host TPU slice); "off": never.
    On CPU, cross-process collectives use gloo. Returns whether JAX is now distributed."""
    import jax

    if jax.distributed.is_initialized():
        return True
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"distributed mode must be auto, on or off; got {mode!r}")
    if mode == "off" or (mode == "auto" and coordinator is None and num_processes is None
                         and not _cluster_detected()):
        return False
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    return True


def _allgather(values: np.ndarray) -> np.ndarray:
    """(P, ...) every process's `values` (same shape everywhere)."""
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return np.asarray(values)[None]
    return np.asarray(multihost_utils.process_allgather(np.asarray(values)))


def _allgather_json(obj) -> list:
    """Every process's JSON-able `obj`, in process order."""
    data = np.frombuffer(_results.dumps(obj), np.uint8)
    sizes = _allgather(np.array([data.size], np.int64))[:, 0]
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:data.size] = data
    return [json.loads(bytes(row[:n]).decode("utf-8", "surrogateescape"))
            for row, n in zip(_allgather(padded), sizes)]


class OtherProcessError(RuntimeError):
    """Another process of a multi-process job failed where this one did not (its own message says why)."""


class StepCompileError(RuntimeError):
    """XLA could not compile the explanation step (most often: too little device memory for the batch)."""


class _agreement:
    """`with _agreement(P) as a: ...; a.share(x)` then `a.result()`: every process learns whether
    any failed inside the block (one collective), so all raise together instead of some waiting
    forever in a collective the failed ones never reach. `result()` re-raises this process's own
    error, or raises for another's, else returns every process's shared value (P,)."""

    def __init__(self, pcount: int):
        self.pcount, self.error, self.value = pcount, None, 0

    def __enter__(self):
        return self

    def share(self, value: int):
        self.value = int(value)

    def __exit__(self, kind, error, tb):
        self.error = error
        return isinstance(error, Exception)  # held until result(); KeyboardInterrupt etc. go through

    def result(self) -> np.ndarray:
        if self.pcount == 1:
            if self.error is not None:
                raise self.error
            return np.array([self.value])
        flags = _allgather(np.array([self.error is not None, self.value], np.int64))
        if self.error is not None:
            raise self.error
        if flags[:, 0].any():
            raise OtherProcessError(f"process(es) {np.nonzero(flags[:, 0])[0].tolist()} could not start this job "
                                    "(see their messages)")
        return flags[:, 1]


# --------------------------------------------------------------------------------------
# The device step
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _step_fn(model, combos: tuple, options: tuple, map_dtype: str, mesh):
    """The jitted step for (model, combos, options, storage dtype, mesh); cached so that runs of
    the same job in one process (a resume, a test) reuse the compiled program."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from predmaps.explain import explain_fn, get_method
    from predmaps.targets import Targets

    num_classes = model.config.num_classes
    dtype = jnp.dtype(map_dtype)

    def opts(method):
        return {k: v for k, v in options if k in get_method(method).options}

    fns = {(c.method, c.layer): explain_fn(model, method=c.method, layer=-1 if c.layer is None else c.layer,
                                           **opts(c.method)) for c in combos}

    def targets_for(c: Combo, labels):
        if c.target == "gt":
            return Targets(classes=labels[:, None].astype(jnp.int32), kind="given", k=1)
        if c.target.isdigit():
            return Targets(classes=jnp.full((labels.shape[0], 1), int(c.target), jnp.int32), kind="given", k=1)
        if c.target == "all":
            return Targets(kind="all", k=num_classes)
        if c.target in ("top", "top1", "pred"):
            return Targets(kind="top")
        return Targets(kind="topk", k=c.k)

    def step(params, images, labels, mask, stop):
        out, logits = {}, None
        for c in combos:
            ex = fns[(c.method, c.layer)](params, images, targets_for(c, labels))
            out[f"maps_{c.id}"] = jnp.where(mask[:, None, None, None], ex.maps, 0).astype(dtype)
            out[f"classes_{c.id}"] = ex.classes.astype(jnp.int32)
            logits = ex.logits if logits is None else logits
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        pred = jnp.argmax(probs, axis=-1)
        out["pred"] = pred.astype(jnp.int32)
        out["score"] = jnp.take_along_axis(probs, pred[:, None], axis=1)[:, 0]
        out["stop"] = stop  # replicated: every process learns, at the same step, which processes stop
        return out

    data, rep = NamedSharding(mesh, P("batch")), NamedSharding(mesh, P())
    outs = {"pred": data, "score": data, "stop": rep,
            **{f"{kind}_{c.id}": data for c in combos for kind in ("maps", "classes")}}
    return jax.jit(step, in_shardings=(rep, data, data, data, data), out_shardings=outs)


class _Engine:
    """The whole explanation of one global batch as one AOT-compiled, batch-sharded program."""

    def __init__(self, model, params, spec: ExplainSpec, combos: list[Combo], batch_size: int, devices=None):
        import jax
        import jax.numpy as jnp
        from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

        self.nproc = jax.process_count()
        if devices is None:
            devices = jax.devices()
        elif self.nproc > 1:
            raise ValueError("devices= is for single-process runs; a multi-process run uses every device")
        devices = list(devices)
        n_dev = len(devices)
        if n_dev % self.nproc or jax.local_device_count() * self.nproc != jax.device_count():
            raise ValueError(f"every process needs the same number of devices; {n_dev} devices, {self.nproc} processes")
        if batch_size < 1:
            raise ValueError(f"batch size must be positive; got {batch_size}")
        self.devices = devices
        self.global_batch = -(-batch_size // n_dev) * n_dev
        self.local_batch = self.global_batch // self.nproc
        self.mesh = jax.make_mesh((n_dev,), ("batch",), axis_types=(AxisType.Auto,), devices=devices)
        self.data = NamedSharding(self.mesh, P("batch"))
        rep = NamedSharding(self.mesh, P())
        cfg = model.config
        self.image_shape = (cfg.img_size[0], cfg.img_size[1], cfg.in_chans)

        def replicate(a):
            host = np.asarray(a)
            return jax.make_array_from_callback(host.shape, rep, lambda idx: host[idx])

        if jnp.dtype(model.dtype).itemsize < 4:  # same outputs, no per-step weight conversion
            from jaxvit.model import cast_params

            params = cast_params(params, model.dtype)
        self.params = jax.tree_util.tree_map(replicate, params)
        jitted = _step_fn(model, tuple(combos), spec.options, spec.map_dtype, self.mesh)
        gb = self.global_batch

        def sds(shape, dtype):
            return jax.ShapeDtypeStruct(shape, dtype, sharding=self.data)

        self._lowered = lambda: jitted.lower(self.params, sds((gb, *self.image_shape), jnp.float32),
                                             sds((gb,), jnp.int32), sds((gb,), jnp.bool_), sds((gb,), jnp.int32))
        self.compiled = None
        self.compile_s = 0.0

    def compile(self):
        import jax

        t0 = time.perf_counter()
        try:
            self.compiled = self._lowered().compile()
        except jax.errors.JaxRuntimeError as e:
            hint = ("; a smaller batch size (--batch-size) needs less device memory"
                    if "RESOURCE_EXHAUSTED" in str(e) else "")
            raise StepCompileError(f"compiling the explanation step for a global batch of {self.global_batch} "
                                   f"failed: {e}{hint}") from e
        self.compile_s = time.perf_counter() - t0

    def dispatch(self, images: np.ndarray, labels: np.ndarray, mask: np.ndarray, stop: int = 0):
        """Start one step on this process's rows (local batch); returns the (async) global outputs.
        stop: 0, or this process's index + 1 to tell every process that it stops (`stopped`)."""
        import jax

        if self.compiled is None:
            self.compile()
        gb = self.global_batch
        put = lambda x: jax.make_array_from_process_local_data(self.data, x, (gb, *x.shape[1:]))  # noqa: E731
        return self.compiled(self.params, put(images), put(labels), put(mask),
                             put(np.full((self.local_batch,), stop, np.int32)))

    def fetch(self, out) -> dict[str, np.ndarray]:
        """This process's rows of a step's outputs, as numpy (blocks until the step is done)."""
        import jax

        rows = {k: v for k, v in out.items() if k != "stop"}
        if self.nproc == 1:
            return {k: np.asarray(v) for k, v in rows.items()}
        from jax.experimental import multihost_utils
        from jax.sharding import PartitionSpec as P

        local = multihost_utils.global_array_to_host_local_array(rows, self.mesh, P("batch"))
        return {k: np.asarray(v) for k, v in local.items()}

    @staticmethod
    def stopped(out) -> list[int]:
        """The processes that flagged a step as their last (blocks until the step is done)."""
        return sorted(int(v) - 1 for v in set(np.asarray(out["stop"]).tolist()) if v)


# --------------------------------------------------------------------------------------
# Shards, decoding, the loop
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Shard:
    id: int
    first: int
    items: list[Item]


def _shards(inputs: Inputs, shard_size: int) -> Iterator[_Shard]:
    buf, first, sid = [], 0, 0
    for item in inputs:
        buf.append(item)
        if len(buf) == shard_size:
            yield _Shard(sid, first, buf)
            first += len(buf)
            sid += 1
            buf = []
    if buf:
        yield _Shard(sid, first, buf)


def _shard_digest(items: list[Item]) -> str:
    return _results.shard_names_digest([it.name for it in items], [it.label for it in items])


@dataclasses.dataclass
class _Plan:
    count: int
    sha256: str
    digests: dict[int, tuple[int, int, str]]  # shard id -> (first, count, digest)
    unlabelled: list[str]
    bad_labels: list[tuple[str, int]]


def _plan(inputs: Inputs, shard_size: int, num_classes: int) -> _Plan:
    """One listing pass (no decoding): counts, per-shard name digests, label checks."""
    h = hashlib.sha256()
    digests, unlabelled, bad, count = {}, [], [], 0
    for sh in _shards(inputs, shard_size):
        d = _shard_digest(sh.items)
        digests[sh.id] = (sh.first, len(sh.items), d)
        h.update(d.encode())
        count += len(sh.items)
        for it in sh.items:
            if it.label < 0 and isinstance(it.source, _UnlistedFolder):
                continue  # an input error of its own (see _decode), not a missing label
            if it.label < 0 and len(unlabelled) < 5:
                unlabelled.append(it.name)
            elif it.label >= num_classes and len(bad) < 5:  # an error only when 'gt' is asked for
                bad.append((it.name, it.label))
    return _Plan(count, h.hexdigest(), digests, unlabelled, bad)


def _check_labels(plan: _Plan | None, inputs: Inputs, spec: ExplainSpec, num_classes: int) -> None:
    if plan is None:
        return
    if spec.needs_labels and plan.bad_labels:
        raise ValueError(f"labels out of range for a {num_classes}-class model: {plan.bad_labels}")
    if spec.needs_labels and plan.unlabelled:
        raise ValueError(
            f"target 'gt' needs a label for every input; {inputs.source} has none for {plan.unlabelled}"
            f"{' (the first 5)' if len(plan.unlabelled) == 5 else ''}. Labels come from an ImageNet class-folder "
            "tree (folders named by WordNet id, e.g. val/n01440764/*.JPEG), a label file (--labels FILE: 'file label' "
            "lines), or 'path<TAB>label' lines of a list file")


def _decode(transform, item: Item, identify: int = 0):
    """(array, None, identity) or (None, reason, None). identity (for a path, with `identify` 1): its
    (size, mtime_ns, None) as decoded, which a resumed job compares before it skips the shard; with 2,
    (size, mtime_ns, sha256). The hash took 0.29 ms per 110 KB file (2026-12-06, 2-core AMD EPYC at load
    ~10), against ~4.6 ms to decode a 500x375 JPEG (the module docstring's 219 img/s): only
    --verify-inputs pays it."""
    if isinstance(item.source, _UnlistedFolder):
        return None, item.source.reason, None
    st = None
    if identify and item.path:
        try:
            st = os.stat(item.source)  # before reading: a later edit shows
        except OSError:
            pass  # the transform says what is wrong with it
    try:
        with DECODE_BUDGET.claim():  # the pool's workers share one pixel budget
            arr = np.asarray(transform(item.source), np.float32)
        ident = (st.st_size, st.st_mtime_ns, _file_sha256(item.path) if identify > 1 else None) \
            if st is not None else None
        return arr, None, ident
    except Exception as e:  # any failure of one input is that input's error, never the job's
        return None, str(e) if isinstance(e, ImageLoadError) else f"{type(e).__name__}: {e}", None


def _file_sha256(path: str | os.PathLike) -> bytes:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").digest()


class _Prefetcher:
    """Decodes items on a thread pool, in order, at most `window` ahead of the consumer."""

    def __init__(self, shards: Iterator[_Shard], transform, workers: int, window: int, identify: int = 0):
        self._shards = shards
        self._identify = identify
        self._transform = transform
        self._pool = concurrent.futures.ThreadPoolExecutor(max(1, workers), thread_name_prefix="predmaps-decode")
        self._window = max(1, window)
        self._queue: deque = deque()
        self._pending_items: Iterator = iter(())
        self.wait_s = 0.0

    def _work(self):
        for sh in self._shards:
            for j, item in enumerate(sh.items):
                yield sh, j, item

    def _fill(self):
        while len(self._queue) < self._window:
            try:
                sh, j, item = next(self._pending_items)
            except StopIteration:
                return False
            self._queue.append((sh, j, item, self._pool.submit(_decode, self._transform, item, self._identify)))
        return True

    def start(self):
        self._pending_items = self._work()
        self._fill()

    def __iter__(self):
        try:
            while True:
                self._fill()
                if not self._queue:
                    return
                sh, j, item, fut = self._queue.popleft()
                t0 = time.perf_counter()
                arr, reason, ident = fut.result()
                self.wait_s += time.perf_counter() - t0
                yield sh, j, item, arr, reason, ident
        finally:
            self.close()

    def close(self):
        for *_, fut in self._queue:
            fut.cancel()
        self._queue.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)


@dataclasses.dataclass
class ResultBatch:
    """Explanations of one batch of this process's inputs, on the host, in input order.

    index: (n,) int64 input positions; names, paths: lists of str; labels: (n,) int32 (-1: none);
    pred: (n,) int32 predicted class; score: (n,) float32 its softmax probability;
    maps: {combo key: (n, K, gh, gw)}; classes: {combo key: (n, K) int32};
    errors: [(index, name, path, reason)] of this batch's unreadable inputs (not in the arrays);
    shard: the shard it belongs to; last_in_shard: whether the shard is now complete.
    identities: per row, the input's (size, mtime_ns, sha256) as decoded (jobs only; else empty).
    """

    index: np.ndarray
    names: list[str]
    paths: list[str]
    labels: np.ndarray
    pred: np.ndarray
    score: np.ndarray
    maps: dict[str, np.ndarray]
    classes: dict[str, np.ndarray]
    errors: list[tuple[int, str, str, str]]
    shard: int
    last_in_shard: bool
    identities: list = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.index)


@dataclasses.dataclass
class _Stats:
    images: int = 0
    errors: int = 0
    steps: int = 0
    wall_s: float = 0.0
    compile_s: float = 0.0
    input_wait_s: float = 0.0


def _stream(engine: _Engine, combos: list[Combo], shards: Iterator[_Shard], *, transform, workers: int,
            prefetch: int, total_steps: int | None, stats: _Stats, bar=None, on_batch=None,
            identify: int = 0) -> Iterator[ResultBatch]:
    """Run this process's shards through the engine; yield one ResultBatch per batch. With
    `total_steps` (multi-process), pad with masked steps up to it so every process runs alike.

    Multi-process, one step is in flight while the previous one is finished. A process that stops
    early (an error here or in the consumer, Ctrl-C, or the consumer closing this generator) flags
    its next steps as its last (`_stop_together`); every process reads each step's flags as it
    finishes it, so all see the first flagged step together, finish the one step in flight after it
    and end there: none is left waiting in a step another never runs. The others then raise
    OtherProcessError, after yielding their finished batches."""
    lb = engine.local_batch
    pre = _Prefetcher(shards, transform, workers, window=lb * max(1, prefetch), identify=identify)
    pre.start()  # decoding starts before (and during) compilation
    try:
        _compile_together(engine)
    except BaseException:
        pre.close()
        raise
    stats.compile_s = engine.compile_s
    blank = (np.zeros((lb, *engine.image_shape), np.float32), np.zeros((lb,), np.int32), np.zeros((lb,), bool))

    def steps():  # (images, labels, mask, (shard, rows, last)), then padding steps: (..., None)
        rows = []
        for sh, j, item, arr, reason, ident in pre:
            rows.append((sh.first + j, item, arr, reason, ident))
            last = j == len(sh.items) - 1
            if len(rows) == lb or last:  # a batch never spans two shards
                images, labels, mask = (np.zeros_like(a) for a in blank)
                for i, (_, it, a, _, _) in enumerate(rows):
                    if a is not None:
                        images[i], labels[i], mask[i] = a, max(it.label, 0), True
                yield images, labels, mask, (sh, rows, last)
                rows = []
        while total_steps is not None and stats.steps < total_steps:
            yield (*blank, None)  # an idle process's share of a global step

    def finish(out, meta) -> ResultBatch | None:
        if meta is None:
            return None
        sh, rows, last = meta
        host = engine.fetch(out)
        ok = [i for i, r in enumerate(rows) if r[2] is not None]
        sel = np.asarray(ok, np.int64)
        errors = [(r[0], r[1].name, r[1].path, r[3]) for r in rows if r[2] is None]
        b = ResultBatch(index=np.asarray([rows[i][0] for i in ok], np.int64),
                        names=[rows[i][1].name for i in ok], paths=[rows[i][1].path for i in ok],
                        labels=np.asarray([rows[i][1].label for i in ok], np.int32),
                        pred=host["pred"][sel], score=host["score"][sel],
                        maps={c.key: host[f"maps_{c.id}"][sel] for c in combos},
                        classes={c.key: host[f"classes_{c.id}"][sel] for c in combos},
                        errors=errors, shard=sh.id, last_in_shard=last, identities=[rows[i][4] for i in ok])
        stats.images += len(ok)
        stats.errors += len(errors)
        if bar is not None:
            bar.update(len(rows))
            if stats.errors:
                bar.set_postfix(errors=stats.errors, refresh=False)
        if on_batch is not None:
            on_batch(b)
        return b

    inflight: deque = deque()  # dispatched, not finished: (outputs, meta); the older one is finished next
    stopped: list[int] = []  # the processes that flagged the first flagged step finished

    def finish_oldest() -> ResultBatch | None:
        nonlocal stopped
        out, meta = inflight.popleft()
        if total_steps is not None and not stopped:
            stopped = engine.stopped(out)
        return finish(out, meta)

    try:
        for images, labels, mask, meta in steps():
            inflight.append((engine.dispatch(images, labels, mask), meta))
            stats.steps += 1
            if len(inflight) == 2:
                b = finish_oldest()
                if b is not None:
                    yield b
                if stopped:
                    break
        while inflight:  # the last step; after a stop, the one every process has in flight
            b = finish_oldest()
            if b is not None:
                yield b
        if stopped:
            raise OtherProcessError(f"process(es) {stopped} stopped during the run (see their messages)")
    except BaseException:
        if total_steps is not None and not stopped:
            _stop_together(engine, inflight, blank, total_steps, stats)
        raise
    finally:
        pre.close()
        stats.input_wait_s = pre.wait_s


def _compile_together(engine: _Engine) -> None:
    """Compile the step. Multi-process, every process then learns whether all did (one collective):
    a process whose compilation failed (too little memory on its host, say) would otherwise leave the
    others waiting in a first step it never runs. It raises its own error, the others OtherProcessError."""
    if engine.compiled is None:
        with _agreement(engine.nproc) as compiled:
            engine.compile()
        compiled.result()


def _stop_together(engine: _Engine, inflight: deque, blank: tuple, total_steps: int, stats: _Stats) -> None:
    """This process stops early: run blank steps flagged as its last, keeping one in flight as every
    process does, until a flagged step finishes; then finish the one in flight after it. Every
    process has then run the same steps (see `_stream`)."""
    import jax

    me = jax.process_index() + 1
    while True:
        while len(inflight) < 2 and stats.steps < total_steps:
            inflight.append((engine.dispatch(*blank, stop=me), None))
            stats.steps += 1
        if not inflight:
            return
        out, _ = inflight.popleft()
        if engine.stopped(out):
            for out, _ in inflight:
                engine.stopped(out)  # waits for it
            inflight.clear()
            return


def _default_workers() -> int:
    return max(1, min(32, os.cpu_count() or 1))


def _process_shards(inputs: Inputs, shard_size: int, pidx: int, pcount: int, skip: Callable[[_Shard], bool],
                    label_classes: int | None = None):
    """This process's shards. `label_classes`: the model's class count where inputs that were not
    planned (a one-pass stream) need a valid label each ('gt'); each shard is checked as it comes, as
    `_check_labels` checks a planned listing (a label past the classes would explain no class: NaN maps)."""
    for sh in _shards(inputs, shard_size):
        if sh.id % pcount == pidx and not skip(sh):
            if label_classes is not None:
                missing = [it.name for it in sh.items if it.label < 0]
                if missing:
                    raise ValueError(f"target 'gt' needs a label for every input; none for {missing[:5]}")
                bad = [(it.name, it.label) for it in sh.items if it.label >= label_classes]
                if bad:
                    raise ValueError(f"labels out of range for a {label_classes}-class model: {bad[:5]}")
            yield sh


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def explain_batches(model, params, images, spec: ExplainSpec | dict | None = None, *, labels=None,
                    batch_size: int = 64, workers: int | None = None, prefetch: int = 2, devices=None,
                    progress: bool = False) -> Iterator[ResultBatch]:
    """Explain every input, yielding host-side `ResultBatch`es of this process's inputs in order.

    images: anything `open_inputs` takes. spec: `ExplainSpec` (default PredicAtt, last layer,
    top class). batch_size: global batch (rounded up to a multiple of the device count).
    workers: decoding threads (default: CPU count). prefetch: batches decoded ahead.
    devices: a subset of devices (single process); default every device of every process.
    Unreadable inputs are reported in each batch's `errors`, never raised.
    In a multi-process job each process gets its own slice (chunks of 16 local batches, round
    robin); the inputs must then be re-iterable (a path source or a sequence). A process that ends
    its loop early must close the generator (`with contextlib.closing(explain_batches(...)) as it:`):
    the others then stop at the same step with `OtherProcessError` instead of waiting for it (or
    finish, where it stopped in the last step).
    """
    import jax

    spec = _as_spec(spec)
    inputs = open_inputs(images, labels=labels)
    combos = spec.combos(model)
    engine = _Engine(model, params, spec, combos, batch_size, devices)
    chunk = engine.local_batch * 16
    cfg = model.config
    total_steps = None
    plan = _plan(inputs, chunk, cfg.num_classes) if (inputs.reiterable and (spec.needs_labels or engine.nproc > 1)) \
        else None
    if engine.nproc > 1 and plan is None:
        raise ValueError("a multi-process run needs re-iterable inputs (a path source or a sequence), not an iterator")
    _check_labels(plan, inputs, spec, cfg.num_classes)
    pidx, pcount = jax.process_index(), engine.nproc
    if pcount > 1:
        mine = sum(-(-n // engine.local_batch) for sid, (_, n, _) in plan.digests.items() if sid % pcount == pidx)
        total_steps = int(_allgather(np.array([mine], np.int64)).max())
    from jaxvit.preprocess import eval_transform_for

    transform = eval_transform_for(cfg)

    def generate():  # arguments are checked above, at the call; the work starts on iteration
        stats = _Stats()
        bar = _progress_bar(progress and pidx == 0, plan.count if plan else None, pcount)
        try:
            unplanned = cfg.num_classes if spec.needs_labels and plan is None else None
            yield from _stream(engine, combos, _process_shards(inputs, chunk, pidx, pcount, lambda sh: False, unplanned),
                               transform=transform, workers=workers or _default_workers(), prefetch=prefetch,
                               total_steps=total_steps, stats=stats, bar=bar)
        finally:
            if bar is not None:
                bar.close()

    return generate()


def _progress_bar(enabled: bool, total: int | None, pcount: int, initial: int = 0):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="img", desc="explain" if pcount == 1 else "explain (process 0)",
                dynamic_ncols=True, smoothing=0.1, file=sys.stderr)


class OutputWriteError(OSError):
    """Writing a job's output failed (disk full, read-only, no permission). The message names the
    file and what to do; shards finished before stay recorded, so a rerun resumes after them."""

    def __init__(self, path: Path, error: OSError, out: Path, kept: int | None = None, action: str = "",
                 folder: Path | None = None):
        super().__init__(error.errno, error.strerror or str(error))
        self.filename, self.kept = str(path), kept or 0
        reason = error.strerror or str(error)
        action = action or (f"write to {path}" if path == out else f"write {path}")
        folder = folder or out
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            fix = new = "free some space (or raise the quota)"
        elif error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            fix, new = f"make {folder} writable", f"choose another --out, or make {folder} writable"
        elif error.errno in (errno.EEXIST, errno.ENOTDIR, errno.ENOENT) and not kept:  # not a directory
            fix = new = "choose another --out"
        else:
            fix = new = "fix that"
        if kept:  # the job resumes only in the same directory
            self.message = (f"cannot {action}: {reason}. {kept} finished shard(s) are kept in {out}: {fix} and "
                            "rerun the same command to resume")
        else:
            self.message = f"cannot {action}: {reason}: {new}, then rerun the same command"

    def __str__(self) -> str:
        return self.message


class JobInterrupted(KeyboardInterrupt):
    """A job stopped by Ctrl-C (a KeyboardInterrupt): says what it kept. Every shard finished
    before is recorded (shards and manifests are written atomically), so a rerun resumes."""

    def __init__(self, out: Path, kept: int, num_shards: int | None):
        self.out, self.kept, self.num_shards = str(out), kept, num_shards
        of = f" of {num_shards}" if num_shards is not None else ""
        if kept:
            text = f"interrupted: {kept}{of} shard(s) finished are kept in {out}; rerun the same command to resume"
        else:
            text = f"interrupted before any{of} shard(s) finished; rerun the same command to run the job"
        super().__init__(text)


def _atomic_write(path: Path, data: bytes, out: Path, kept: int | None = None) -> None:
    try:
        _results.atomic_write(path, data)
    except OSError as e:
        raise OutputWriteError(path, e, out, kept) from e


def _check_writable(out: Path) -> None:
    """Create and remove a temporary file in out: a read-only or foreign directory is an error
    before any work, not after the first shard (the name is one remove_temporaries matches)."""
    probe = out / safe_write.temp_name("write-probe")
    try:
        os.close(safe_write.create_new(probe))
    except OSError as e:
        raise OutputWriteError(out, e, out) from e
    try:
        probe.unlink()
    except OSError:
        pass


_LOCK_RE = re.compile(r"^\.run-p\d+\.lock$")


def _check_owned(out: Path, pidx: int) -> None:
    """A job writes only into a folder it owns: one holding a predmaps manifest (this job's, checked
    later), or one holding nothing but what predmaps makes before its manifest (lock files,
    temporaries). Anything else is a user's folder: refused, nothing in it touched."""
    try:
        names = [e.name for e in os.scandir(out)]
    except OSError as e:
        raise OutputWriteError(out, e, out, action=f"list {out}") from e
    parts = sorted(n for n in names if _results._PART_RE.match(n))  # any process's manifest marks a job
    for name in parts:
        _check_predmaps_manifest(out / name, out)
    if parts:
        return
    foreign = sorted(n for n in names if not (_LOCK_RE.match(n) or safe_write.is_own_temporary(n)))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise FileExistsError(f"{out} is not empty ({shown}) and holds no predmaps job: predmaps run writes only "
                              "into an empty folder or one holding its own job, so nothing of yours is overwritten. "
                              "Choose another --out (a new or empty folder)")


def _check_predmaps_manifest(path: Path, out: Path) -> None:
    """`path` (a manifest name in out) is a regular file that a predmaps job wrote, or an error that
    says it is not a predmaps job (and never advises deleting what may be a user's file)."""
    not_job = (f"{path} is not a predmaps job's manifest, so {out} is not a predmaps job folder; it is left as it "
               "is. Choose another --out (a new or empty folder)")
    if not path.is_file() or path.is_symlink():
        raise FileExistsError(f"{not_job} ({path.name} is {'a symlink' if path.is_symlink() else 'no regular file'})")
    if path.stat().st_size > 1 << 30:  # no job's manifest is that large: not read
        raise FileExistsError(not_job)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return  # unreadable: _read_manifest_file says it is damaged (predmaps writes it atomically: rare)
    if not isinstance(data, dict) or data.get("format") != _results.FORMAT:
        raise FileExistsError(not_job)


class OutputInUseError(OSError):
    """Another job (or another process of this one with the same index) is writing to the same
    output directory: two writers would remove each other's temporaries and overwrite each
    other's manifest records."""

    def __str__(self) -> str:
        return str(self.args[0])


class _OutputLock:
    """One process's advisory lock on a job directory: `out/.run-pP.lock`, flock-ed while the job
    runs. The kernel drops a flock when its process exits, however it exits, so a killed job
    leaves at most an unlocked file behind, never a stale lock. Release unlinks the file; a lock
    taken on a file unlinked meanwhile is retried on the new one, so two jobs never both hold one."""

    def __init__(self, out: Path, pidx: int):
        self.path, self.out, self.fd = out / f".run-p{pidx}.lock", out, None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # no flock (Windows): unguarded
            return
        while True:
            try:
                fd = safe_write.open_lock(self.path)  # a symlink there is refused, never followed
            except safe_write.UnsafePathError:
                raise
            except OSError as e:
                raise OutputWriteError(self.path, e, self.out) from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 300).decode("utf-8", "replace").strip() or "another process"
                os.close(fd)
                raise OutputInUseError(f"{self.out} is in use: another predmaps run is writing to it ({holder}). "
                                       "Wait for that job to end (rerun this command then to resume it), or choose "
                                       "another --out") from None
            except OSError as e:  # a file system without flock (some network / FUSE mounts)
                os.close(fd)
                import warnings

                warnings.warn(f"cannot lock {self.path} ({e.strerror or e}): nothing stops a second job from "
                              f"writing to {self.out} at the same time", RuntimeWarning, stacklevel=3)
                return
            try:
                current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)  # the holder released (and unlinked) it between our open and flock: again
        import socket

        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                 .encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink()  # while still locked: a waiter then sees it is gone and retries
        except OSError:
            pass
        os.close(self.fd)  # closing the descriptor releases the flock
        self.fd = None


def _manifest_parts(out: Path) -> list[Path]:
    """Every manifest file of out (manifest.json and each process's manifest-pP.json)."""
    try:
        return _results.manifest_parts(out)
    except OSError:
        return []


def _read_manifest_file(path: Path, out: Path) -> dict:
    """One manifest file, checked, or an error that names it and says what to do. A damaged file
    is never skipped: it may be the only record of finished shards, and read_results refuses it."""
    try:
        data = _results._load_json(path)
        shards = data.get("shards") if isinstance(data, dict) else None
        if not isinstance(shards, list) or not all(isinstance(r, dict) and {"id", "file", "bytes"} <= r.keys()
                                                   for r in shards):
            raise ValueError(f"unreadable manifest {path}: not a predmaps manifest (no list of shard records)")
        _results.check_manifest_fields(data, path)
    except ValueError as e:
        main = out / _results.MANIFEST
        if path == main:
            raise ValueError(f"{e}\nIf predmaps wrote it, it describes the job and records the shards process 0 "
                             "finished: restore it, or delete it and rerun the same command to start the job again "
                             "(every shard is recomputed). If predmaps did not write it, this is not a predmaps job: "
                             "choose another --out.") from None
        try:  # what deleting it would keep: the shards manifest.json lists (consolidated at a job's end)
            header = _results._load_json(main)
            listed = sum((out / r["file"]).is_file() and (out / r["file"]).stat().st_size == r["bytes"]
                         for r in header.get("shards", []))
            total = header.get("num_shards")
            keeps = (f"{_results.MANIFEST} lists all {total} shard(s) of the job: none is recomputed" if listed == total
                     else f"{_results.MANIFEST} lists {listed} of the job's {total or '?'} shard(s): they are kept, "
                          "the others recomputed")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            keeps = f"the shards that {_results.MANIFEST} lists are kept, the others recomputed"
        raise ValueError(f"{e}\nIt records the shards one process of a multi-process run finished, and results "
                         f"cannot be read without it: restore it, or delete it and rerun the same command "
                         f"({keeps}).") from None
    return data


@dataclasses.dataclass
class RunSummary:
    """How a job went. `images`/`errors`: this run (all processes); `total_*`: the whole job so
    far (earlier runs included); `skipped_images`: inputs of shards already complete;
    `retried_shards`: complete shards with failed inputs recomputed (`retry_failed`);
    `batch`: the global batch run (capped at what the inputs and shards can fill)."""

    out: str
    images: int
    errors: int
    skipped_images: int
    total_images: int
    total_errors: int
    num_shards: int
    complete_shards: int
    wall_s: float
    compile_s: float
    input_wait_s: float
    devices: int
    processes: int
    errors_file: str
    batch: int = 0
    retried_shards: int = 0
    recomputed: list = dataclasses.field(default_factory=list)  # this process's shards found stale: "file: why"

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def complete(self) -> bool:
        return self.complete_shards == self.num_shards

    def __str__(self) -> str:
        lines = [f"{self.images} image(s) explained, {self.errors} error(s) in {self.wall_s:.1f}s "
                 f"({self.images_per_s:.1f} img/s; compile {self.compile_s:.1f}s; waited on input "
                 f"{self.input_wait_s:.1f}s) on {self.devices} device(s) x {self.processes} process(es), "
                 f"batch {self.batch}"]
        if self.retried_shards:
            lines.append(f"{self.retried_shards} shard(s) with failed inputs: recomputed")
        if self.recomputed:
            more = f" (and {len(self.recomputed) - 3} more)" if len(self.recomputed) > 3 else ""
            lines.append(f"{len(self.recomputed)} finished shard(s) recomputed, not trusted: "
                         + "; ".join(self.recomputed[:3]) + more)
        if self.skipped_images:
            lines.append(f"{self.skipped_images} input(s) in shards already complete: skipped")
        lines.append(f"job: {self.total_images} image(s), {self.total_errors} error(s), {self.complete_shards}/"
                     f"{self.num_shards} shard(s) in {self.out}" + ("" if self.complete else " (incomplete)"))
        if self.total_errors:  # finished shards are skipped on rerun: retrying failed inputs is explicit
            lines.append(f"errors: {self.errors_file} (once those inputs are fixed, rerun with --retry-failed to "
                         "recompute only their shards)")
        return "\n".join(lines)


def auto_shard_size(model, combos: list[Combo], map_dtype: str) -> int:
    """Images per shard: 1024, fewer when one shard's results would pass 256 MiB."""
    gh, gw = model.config.grid_size
    per_image = sum(c.k * (gh * gw * np.dtype(map_dtype).itemsize + 4) for c in combos) + 64
    return int(min(1024, max(16, _SHARD_BUDGET_BYTES // per_image)))


def explain_dataset(model, params, images, out: str | os.PathLike, spec: ExplainSpec | dict | None = None, *,
                    labels=None, batch_size: int = 64, shard_size: int | None = None, resume: bool | None = None,
                    workers: int | None = None, prefetch: int = 2, devices=None, progress: bool = True,
                    on_batch: Callable[[ResultBatch], None] | None = None, retry_failed: bool = False,
                    verify_inputs: bool = False) -> RunSummary:
    """Explain every input into shards under `out` (format: `predmaps.results`); returns a summary.

    Resumable: run it again and complete shards (those the manifest lists) are skipped, the rest
    done; results equal an uninterrupted run. `out` holding another job (a different model,
    spec, inputs or shard size) raises `JobMismatchError`. resume: None (default) continues a
    matching job or starts one; True requires a job to continue; False requires `out` to hold none.
    Unreadable inputs are recorded (shard records, `errors.tsv`) and skipped, never raised;
    retry_failed=True recomputes the complete shards holding such inputs (once they are fixed).
    Before a finished shard is skipped it is checked: its file's sha256 against the manifest, and
    each of its inputs' size and modification time against those it was explained from
    (verify_inputs=True: their content's sha256 instead, reading every input, where the shard was
    written with verify_inputs=True too, which records them). A shard that fails
    either check is recomputed (`RunSummary.recomputed` says which and why), never trusted.
    Writing out failing raises `OutputWriteError`, Ctrl-C `JobInterrupted` (a KeyboardInterrupt):
    both say how many finished shards are kept; a rerun resumes after them. A job on an `out` that
    another running job holds raises `OutputInUseError` before touching it. The batch is capped
    at what a shard can fill (a batch never spans two shards).
    shard_size: images per shard (default `auto_shard_size`: <= 1024, <= 256 MiB of results).
    on_batch: called with each ResultBatch (e.g. to throttle or observe). Other arguments as
    `explain_batches`. Multi-process: every process calls it alike (after `init_distributed`); one
    process failing mid-run raises its error there and `OtherProcessError` in the others, which stop
    at the same step, all keeping their finished shards.
    """
    import jax

    t_start = time.perf_counter()
    spec = _as_spec(spec)
    inputs = open_inputs(images, labels=labels)
    combos = spec.combos(model)
    cfg = model.config
    out = Path(out)
    # 0 is a mistake to report, not a request for the automatic size (None is)
    shard_size = int(shard_size if shard_size is not None else auto_shard_size(model, combos, spec.map_dtype))
    if shard_size < 1:
        raise ValueError(f"shard size must be positive; got {shard_size}")
    pidx, pcount = jax.process_index(), jax.process_count()
    plan = _plan(inputs, shard_size, cfg.num_classes) if inputs.reiterable else None
    if pcount > 1 and plan is None:
        raise ValueError("a multi-process run needs re-iterable inputs (a path source or a sequence), not an iterator")
    _check_labels(plan, inputs, spec, cfg.num_classes)
    if plan is not None and plan.count == 0:
        raise ValueError(f"no inputs: {inputs.source} lists no image (files ending {', '.join(IMAGE_EXTENSIONS)})")
    # A batch never spans two shards, so no process fills more rows per step than its largest shard
    # holds: a bigger batch only computes (and holds in memory) padding. _Engine still rounds the
    # capped batch up to a multiple of the device count.
    if batch_size >= 1:
        batch_size = min(batch_size, pcount * min(shard_size, plan.count if plan is not None else shard_size))
    engine = _Engine(model, params, spec, combos, batch_size, devices)
    num_shards = len(plan.digests) if plan else None
    header = {"format": _results.FORMAT, "version": _results.VERSION,
              "model": model_identity(model, params), "spec": spec.to_dict(model),
              "inputs": {"source": inputs.source, "count": plan.count if plan else None,
                         "sha256": plan.sha256 if plan else None, "labels": inputs.labelled},
              "shard_size": shard_size, "num_shards": num_shards,
              "combos": [dict(id=c.id, key=c.key, method=c.method, layer=c.layer, target=c.target, k=c.k)
                         for c in combos],
              "image_size": list(cfg.img_size), "grid": list(cfg.grid_size), "grid_extent": list(cfg.grid_extent()),
              "eval_transform": eval_settings(cfg),  # where each map lies on its photo (Results.crop_boxes)
              "label_names": list(cfg.label_names) if cfg.label_names is not None else None,
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "shards": []}

    # Check or create the job, every process alike. Phase 1 only reads (and probes that out takes a
    # file), so every process sees the directory as it was; process 0 writes a new job's manifest
    # in phase 2. Both phases raise on every process alike, whatever the process count.
    lock = _OutputLock(out, pidx)
    try:
        main, own = out / _results.MANIFEST, out / _results.manifest_file(pidx)
        existed = False
        with _agreement(pcount) as phase1:
            if resume is True and not main.exists():  # before mkdir: a refused --resume leaves no empty folder
                raise FileNotFoundError(f"--resume: {out} holds no job to resume ({_results.MANIFEST} is missing)")
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise OutputWriteError(out, e, out, action=f"create {out}",
                                       folder=Path(e.filename).parent if e.filename else out.parent) from e
            _check_writable(out)
            lock.acquire()  # before reading anything: another writer could change it under us
            _check_owned(out, pidx)
            existed = main.exists()
            if resume is False and existed:
                raise FileExistsError(f"{out} already holds a job; choose another output directory")
            # Every manifest file must read: a damaged one may be the only record of finished shards.
            parts = {part: _read_manifest_file(part, out)  # manifest.json first: its error matters most
                     for part in sorted(_manifest_parts(out), key=lambda part: part != main)}
            if existed:
                _results.check_same_job(parts[main], header, out)
            if own in parts and own != main:
                _results.check_same_job(parts[own], header, out)
        phase1.result()
        mine_records, complete, retry, todo_steps, skipped, stale = {}, {}, set(), 0, 0, {}
        with _agreement(pcount) as phase2:
            if pidx == 0:
                _results.remove_temporaries(out)
                if not existed:
                    _atomic_write(main, _results.dumps(header), out)
            if existed:
                complete = _results.read_manifest(out)["shards"]
                if own.exists():  # the records of this part that describe the files (a later run's may)
                    mine_records = {int(r["id"]): r for r in _results._load_json(own).get("shards", [])
                                    if complete.get(int(r["id"])) == r}
                if retry_failed:  # complete shards holding failed inputs are done again, whole
                    retry = {sid for sid, rec in complete.items() if rec.get("errors")}
            if plan is not None:
                for sid, rec in complete.items():
                    if sid in plan.digests and rec.get("names_sha256") != plan.digests[sid][2]:
                        raise JobMismatchError(f"{out}: shard {sid} was made from other inputs than this run lists")
                if any(sid % pcount == pidx and sid not in retry for sid in complete):
                    for sh in _shards(inputs, shard_size):  # a listing pass, only to resume
                        if sh.id % pcount == pidx and sh.id in complete and sh.id not in retry:
                            why = _stale_reason(out, complete[sh.id], sh, verify_inputs)
                            if why:
                                stale[sh.id] = why
            for sid in stale:
                del complete[sid]
            redo = (retry | set(stale)) & set(mine_records)
            if redo:  # drop their records before any is rewritten: a kill then leaves them unlisted, never
                # a listed record describing a file being replaced (the rerun recomputes them)
                _drop_records(out, redo, pidx, pcount, lambda path, data: _atomic_write(path, data, out))
                for sid in redo:
                    mine_records.pop(sid, None)
            if plan is not None:
                for sid, (first, n, _) in plan.digests.items():
                    if sid % pcount != pidx:
                        continue
                    if sid in complete and sid not in retry:
                        skipped += n
                    else:
                        todo_steps += -(-n // engine.local_batch)
            phase2.share(todo_steps)
        # Every process runs the same number of global steps: the most any process has to do.
        steps = phase2.result()  # on one process too: it re-raises the block's error
        total_steps = int(steps.max()) if pcount > 1 else None

        streamed_skips = [0]

        def skip(sh: _Shard) -> bool:
            if sh.id not in complete:
                return False
            if plan is None:  # a stream: no listing was compared up front, so compare this shard's names
                if complete[sh.id].get("names_sha256") != _shard_digest(sh.items):
                    raise JobMismatchError(f"{out}: shard {sh.id} was made from other inputs than this run lists")
                if sh.id not in retry:  # one process (streams are): no step count to keep agreed
                    why = _stale_reason(out, complete[sh.id], sh, verify_inputs)
                    if why:
                        stale[sh.id] = why
                        del complete[sh.id]
                        mine_records.pop(sh.id, None)
                        return False
                    streamed_skips[0] += len(sh.items)
            return sh.id not in retry

        def kept() -> int:  # shards recorded as finished, for messages
            return len(complete.keys() | mine_records.keys())

        from jaxvit.preprocess import eval_transform_for

        stats = _Stats()
        own_header = dict(_results._load_json(out / _results.MANIFEST)) if pidx == 0 else dict(header)
        todo = None if plan is None else sum(n for sid, (_, n, _) in plan.digests.items()
                                             if sid % pcount == pidx and (sid not in complete or sid in retry))
        bar = _progress_bar(progress and pidx == 0, todo, pcount)
        buf: list[ResultBatch] = []
        streamed_shards: dict[int, tuple[int, int, str]] = {}
        written: set[int] = set()

        def shards_tracked():
            unplanned = cfg.num_classes if spec.needs_labels and plan is None else None
            for sh in _process_shards(inputs, shard_size, pidx, pcount, skip, unplanned):
                streamed_shards[sh.id] = (sh.first, len(sh.items), _shard_digest(sh.items))
                yield sh

        def write(path: Path, data: bytes) -> None:
            _atomic_write(path, data, out, kept())

        try:
            stopped_by: BaseException | None = None  # multi-process: what ended this process's loop early
            try:
                stream = _stream(engine, combos, shards_tracked(), transform=eval_transform_for(cfg),
                                 workers=workers or _default_workers(), prefetch=prefetch, total_steps=total_steps,
                                 stats=stats, bar=bar, on_batch=on_batch, identify=2 if verify_inputs else 1)
                with contextlib.closing(stream):  # closed at once on an error here, so peers stop with it
                    for b in stream:
                        buf.append(b)
                        if b.last_in_shard:
                            first, n, digest = streamed_shards.pop(b.shard)
                            rec = _write_shard(out, b.shard, first, n, digest, buf, combos, pidx, write)
                            buf = []
                            records = {**mine_records, b.shard: rec}
                            own_header["shards"] = [records[k] for k in sorted(records)]
                            write(own, _results.dumps(own_header))
                            mine_records[b.shard] = rec  # finished once recorded
                            written.add(b.shard)
            except (Exception, KeyboardInterrupt) as e:
                if pcount == 1:
                    raise
                stopped_by = e  # every process (stopped together, see _stream) still gathers the records
            finally:
                if bar is not None:
                    bar.close()

            # Consolidate: every process's records into manifest.json (no shared file system needed for
            # the list itself), errors.tsv; totals over all processes.
            counters = np.array([stats.images, stats.errors, skipped + streamed_skips[0],
                                 round(stats.input_wait_s * 1e3), len(retry & written),
                                 stopped_by is not None and not isinstance(stopped_by, OtherProcessError)], np.int64)
            if pcount > 1:
                all_records = _allgather_json([mine_records[k] for k in sorted(mine_records)])
                gathered = _allgather(counters)
                failed, counters = np.nonzero(gathered[:, 5])[0].tolist(), gathered.sum(0)
            else:
                all_records = [[mine_records[k] for k in sorted(mine_records)]]
            everything = dict(complete)
            for recs in all_records:
                for r in recs:
                    everything[int(r["id"])] = r
            if num_shards is None:
                num_shards = (max(everything) + 1) if everything else 0
                if streamed_shards:
                    num_shards = max(num_shards, max(streamed_shards) + 1)
            n_errors = sum(len(r.get("errors", [])) for r in everything.values())
            if pidx == 0:
                try:
                    final = dict(_results._load_json(out / _results.MANIFEST))
                    final["shards"] = [everything[k] for k in sorted(everything)]
                    final["num_shards"] = num_shards
                    final["totals"] = {"images": sum(r["images"] for r in everything.values()), "errors": n_errors}
                    write(out / _results.MANIFEST, _results.dumps(final))
                    _drop_superseded_records(out, everything, write)
                    try:
                        _results.write_errors_file(out, everything)
                    except OSError as e:
                        raise OutputWriteError(out / _results.ERRORS_FILE, e, out, len(everything)) from e
                except (OSError, ValueError):
                    if stopped_by is None:  # else this process's own error (raised below) is the one to tell
                        raise
            if stopped_by is not None and not isinstance(stopped_by, OtherProcessError):
                raise stopped_by
            if pcount > 1 and failed:  # also where it stopped in the last step, which the others ran to the end
                raise OtherProcessError(f"process(es) {failed} stopped during the run (see their messages); "
                                        f"{len(everything)} finished shard(s) are kept in {out}: rerun the same "
                                        "command to resume") from None
        except KeyboardInterrupt:  # shards and manifests are written atomically: every recorded one is kept
            try:  # what a rerun will find (exact even when Ctrl-C fell between a write and the bookkeeping)
                n = len(_results.read_manifest(out)["shards"])
            except (OSError, ValueError, KeyError, TypeError):
                n = kept()
            raise JobInterrupted(out, n, num_shards) from None
        return RunSummary(out=str(out), images=int(counters[0]), errors=int(counters[1]), skipped_images=int(counters[2]),
                          total_images=sum(r["images"] for r in everything.values()), total_errors=n_errors,
                          num_shards=num_shards, complete_shards=len(everything), wall_s=time.perf_counter() - t_start,
                          compile_s=stats.compile_s, input_wait_s=counters[3] / 1e3 / pcount,
                          devices=len(engine.devices), processes=pcount,
                          errors_file=str(out / _results.ERRORS_FILE), batch=engine.global_batch,
                          retried_shards=int(counters[4]),
                          recomputed=[f"{_results.shard_file(sid)}: {why}" for sid, why in sorted(stale.items())])
    finally:
        lock.release()


def _stale_reason(out: Path, rec: dict, sh: _Shard, verify_inputs: bool) -> str | None:
    """Why a finished shard must not be skipped, or None. Its file's sha256 against the manifest:
    measured 2026-12-06 on the 2-core AMD EPYC dev VM at load average ~10, 1.2 ms for the 1.6 MiB
    shard of 1024 images x ViT-B/16 PredicAtt_L + PredicAtt_{L-1} (top class, float32), 0.56-0.60 s
    for a 256 MiB shard (the most `auto_shard_size` makes, e.g. target "all"): well under the
    device work a skip saves. Then each input's size and mtime (a stat) against those recorded when
    it was decoded, or, with verify_inputs where recorded, its content's sha256. Shards written
    before inputs were recorded are checked by their own sha256 only."""
    path = out / rec["file"]
    try:
        if _file_sha256(path).hex() != rec.get("sha256"):
            return "its sha256 differs from the manifest's (damaged on disk)"
        with np.load(path, allow_pickle=False) as z:
            if "input_size" not in z.files:
                return None
            index, size, mtime = (z[k] for k in ("index", "input_size", "input_mtime_ns"))
            sha = z["input_sha256"] if verify_inputs and "input_sha256" in z.files else None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        return f"unreadable ({type(e).__name__}: {e})"
    by_content = sha is not None  # else (hashes not recorded: a run without --verify-inputs) by size and mtime
    for pos, n, t, digest in zip(index.tolist(), size.tolist(), mtime.tolist(), sha if by_content else size):
        j = pos - sh.first
        item = sh.items[j] if 0 <= j < len(sh.items) else None
        if item is None or not item.path:
            continue
        try:
            st = os.stat(item.path)
            if not stat.S_ISREG(st.st_mode):  # hashing a FIFO would wait forever
                return f"its input {item.name} is no longer a regular file"
            changed = (_file_sha256(item.path) != digest.tobytes()) if by_content else \
                (st.st_size, st.st_mtime_ns) != (n, t)
        except OSError as e:
            return f"its input {item.name} cannot be read now ({e.strerror or e})"
        if changed:
            how = "content" if by_content else "size or modification time"
            return f"its input {item.name} changed since it was explained ({how})"
    return None


def _drop_records(out: Path, sids: set[int], pidx: int, pcount: int, write: Callable[[Path, bytes], None]) -> None:
    """Remove the records of shards `sids` from this process's manifest file, and (process 0) from
    the files of processes this run does not have (an earlier run's): no writer races those."""
    for part in _manifest_parts(out):
        m = _results._PART_RE.match(part.name)
        index = int(m.group(1) or 0)
        if index != pidx and not (pidx == 0 and index >= pcount):
            continue
        data = _results._load_json(part)
        keep = [r for r in data.get("shards", []) if int(r["id"]) not in sids]
        if len(keep) != len(data.get("shards", [])):
            write(part, _results.dumps(dict(data, shards=keep)))


def _drop_superseded_records(out: Path, everything: dict[int, dict], write: Callable[[Path, bytes], None]) -> None:
    """Remove, from other processes' manifest files, records of shards recomputed since (by another
    process count): readers take those files' records first, and a stale one of the same size
    would pass for the new shard."""
    for part in _manifest_parts(out):
        if part.name == _results.MANIFEST:
            continue
        data = _results._load_json(part)
        keep = [r for r in data.get("shards", [])
                if int(r["id"]) not in everything or everything[int(r["id"])].get("sha256") == r.get("sha256")]
        if len(keep) != len(data.get("shards", [])):
            write(part, _results.dumps(dict(data, shards=keep)))


def _write_shard(out: Path, sid: int, first: int, count: int, digest: str, batches: list[ResultBatch],
                 combos: list[Combo], pidx: int, write: Callable[[Path, bytes], None] = _results.atomic_write) -> dict:
    def cat(get, dtype, shape=()):
        parts = [get(b) for b in batches]
        parts = [np.asarray(p) for p in parts if len(p)]
        return np.concatenate(parts) if parts else np.zeros((0, *shape), dtype)

    arrays = {"index": cat(lambda b: b.index, np.int64), "name": np.asarray(sum((b.names for b in batches), []), str),
              "path": np.asarray(sum((b.paths for b in batches), []), str), "label": cat(lambda b: b.labels, np.int32),
              "pred": cat(lambda b: b.pred, np.int32), "score": cat(lambda b: b.score, np.float32)}
    if arrays["name"].size == 0:
        arrays["name"] = arrays["path"] = np.zeros((0,), "<U1")
    for c in combos:
        first_b = batches[0]
        shape = first_b.maps[c.key].shape[1:]
        arrays[f"maps_{c.id}"] = cat(lambda b: b.maps[c.key], first_b.maps[c.key].dtype, shape)
        arrays[f"classes_{c.id}"] = cat(lambda b: b.classes[c.key], np.int32, (c.k,))
    idents = [x for b in batches for x in b.identities]
    if idents and all(x is not None for x in idents) and len(idents) == arrays["index"].size:
        # what resume compares before it skips this shard (`_stale_reason`)
        arrays["input_size"] = np.asarray([x[0] for x in idents], np.int64)
        arrays["input_mtime_ns"] = np.asarray([x[1] for x in idents], np.int64)
        if all(x[2] is not None for x in idents):
            arrays["input_sha256"] = np.frombuffer(b"".join(x[2] for x in idents), np.uint8).reshape(-1, 32)
    bio = io.BytesIO()
    np.savez(bio, **arrays)
    data = bio.getvalue()
    name = _results.shard_file(sid)
    write(out / name, data)
    errors = [list(e) for b in batches for e in b.errors]
    return {"id": sid, "file": name, "first": first, "count": count, "images": int(arrays["index"].size),
            "errors": errors, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "names_sha256": digest, "process": pidx, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def decode_throughput(images, config, workers: Sequence[int] = (1, 2), repeat: int = 1) -> dict[int, float]:
    """Images/s of load + eval transform over `images` (anything `open_inputs` takes) with each
    number of threads: what the prefetching pool buys over decoding in the loop."""
    from jaxvit.preprocess import eval_transform_for

    items = list(open_inputs(images))
    transform = eval_transform_for(config)
    out = {}
    for w in workers:
        best = math.inf
        for _ in range(repeat):
            t0 = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(w) as pool:
                for _ in pool.map(lambda it: _decode(transform, it), items):
                    pass
            best = min(best, time.perf_counter() - t0)
        out[w] = len(items) / best
    return out
