"""Shards, decoding and the loop: this process's inputs through the engine as host `ResultBatch`es.

Host side: decoding and resizing (PIL, `jaxvit.preprocess`) run on the data layer's thread pool
(`predmaps.data.DecodePool`), which keeps `prefetch` batches decoded ahead of the device (it stays
ahead: bench/NOTES.md, "Decoding threads"), and the device's result for batch t is copied back
while batch t+1 runs. Memory is bounded whatever the data set's size: inputs are listed lazily
(one directory's listing at a time), about `prefetch + 2` batches of images and two batches of
results are alive on the host and one batch on the devices, and one shard of results (with its
list of inputs) is buffered before it is written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
from collections import deque
from typing import Callable, Iterator

import numpy as np

from predmaps import results as _results
from predmaps.pipeline.distributed import OtherProcessError, _compile_together, _stop_together
from predmaps.data.decode import DecodePool, decode_item, stack_padded
from predmaps.data.inputs import Inputs, Item, UnlistedFolder
from predmaps.data.labels import out_of_range
from predmaps.pipeline.spec import Combo, ExplainSpec
from predmaps.pipeline.step import _Engine


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
            if it.label < 0 and isinstance(it.source, UnlistedFolder):
                continue  # an input error of its own (see decode_item), not a missing label
            if it.label < 0 and len(unlabelled) < 5:
                unlabelled.append(it.name)
            elif it.label >= num_classes and len(bad) < 5:  # an error only when 'gt' is asked for
                bad.append((it.name, it.label))
    return _Plan(count, h.hexdigest(), digests, unlabelled, bad)


def _check_labels(plan: _Plan | None, inputs: Inputs, spec: ExplainSpec, num_classes: int) -> None:
    if plan is None:
        return
    if spec.needs_labels and plan.bad_labels:
        raise out_of_range(plan.bad_labels, num_classes)
    if spec.needs_labels and plan.unlabelled:
        raise ValueError(
            f"target 'gt' needs a label for every input; {inputs.source} has none for {plan.unlabelled}"
            f"{' (the first 5)' if len(plan.unlabelled) == 5 else ''}. Labels come from an ImageNet class-folder "
            "tree (folders named by WordNet id, e.g. val/n01440764/*.JPEG), a label file (--labels FILE: 'file label' "
            "lines), or 'path<TAB>label' lines of a list file")


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
    work = ((sh, j, item) for sh in shards for j, item in enumerate(sh.items))
    pre = DecodePool(lambda w: decode_item(transform, w[2], identify), work, workers=workers,
                     window=lb * max(1, prefetch)).start()  # decoding starts before (and during) compilation
    try:
        _compile_together(engine)
    except BaseException:
        pre.close()
        raise
    stats.compile_s = engine.compile_s
    blank = (np.zeros((lb, *engine.image_shape), np.float32), np.zeros((lb,), np.int32), np.zeros((lb,), bool))

    def steps():  # (images, labels, mask, (shard, rows, last)), then padding steps: (..., None)
        rows = []
        for (sh, j, item), (arr, reason, ident) in pre:
            rows.append((sh.first + j, item, arr, reason, ident))
            last = j == len(sh.items) - 1
            if len(rows) == lb or last:  # a batch never spans two shards
                decoded = [{"images": a, "labels": np.int32(max(it.label, 0))} for _, it, a, _, _ in rows
                           if a is not None]  # unreadable inputs leave no row: finish() lists them as errors
                if decoded:
                    batch, mask = stack_padded(decoded, lb)  # the data layer's zero padding, as eval's batches
                    yield batch["images"], batch["labels"], mask, (sh, rows, last)
                else:
                    yield (*blank, (sh, rows, last))
                rows = []
        while total_steps is not None and stats.steps < total_steps:
            yield (*blank, None)  # an idle process's share of a global step

    def finish(out, meta) -> ResultBatch | None:
        if meta is None:
            return None
        sh, rows, last = meta
        host = engine.fetch(out)
        ok = [i for i, r in enumerate(rows) if r[2] is not None]
        sel = np.arange(len(ok))  # the decoded rows lead the batch, in order (steps())
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
                    raise out_of_range(bad, label_classes)
            yield sh


def _progress_bar(enabled: bool, total: int | None, pcount: int, initial: int = 0):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="img", desc="explain" if pcount == 1 else "explain (process 0)",
                dynamic_ncols=True, smoothing=0.1, file=sys.stderr)
