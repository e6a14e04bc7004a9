"""Decoding: the one thread pool that loads and transforms inputs ahead of the device (for `predmaps
run`, `predmaps eval` and `predmaps explain`), and the zero padding of a partial batch.

Decoding and resizing are PIL and numpy C code that release the GIL, so threads scale with free
cores (measurements: bench/NOTES.md, "Decoding threads"). Memory stays bounded whatever the data
set's size: at most `window` inputs are decoded ahead of the consumer, and the pool's workers share
one pixel budget (`jaxvit.preprocess.DECODE_BUDGET`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import os
import time
from collections import deque
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from jaxvit import preprocess
from predmaps.data.inputs import UnlistedFolder


def default_workers() -> int:
    """Decoding threads: one per core (at most 32); decoding releases the GIL, so it scales with cores
    (bench/NOTES.md), and the look-ahead window and pixel budget, not the thread count, bound memory."""
    return max(1, min(32, os.cpu_count() or 1))


def _claimed(fn: Callable, x):
    """fn(x) with what it decodes counted against the process's pixel budget."""
    with preprocess.DECODE_BUDGET.claim():
        return fn(x)


class DecodePool:
    """fn over `items` on a thread pool, results in order, at most `window` items ahead of the
    consumer: `for item, result in pool`. Decoding begins at `start()` (or the first iteration), so
    it can run while the caller does other work (compiling). `wait_s`: time the consumer waited.
    An exception of fn is raised where its result is consumed."""

    def __init__(self, fn: Callable[[Any], Any], items: Iterable, *, workers: int | None = None, window: int = 1):
        self._fn = fn
        self._items = iter(items)
        self._pool = concurrent.futures.ThreadPoolExecutor(max(1, workers or default_workers()),
                                                           thread_name_prefix="predmaps-decode")
        self._window = max(1, window)
        self._queue: deque = deque()
        self._started = False
        self.wait_s = 0.0

    def _fill(self) -> None:
        while len(self._queue) < self._window:
            try:
                item = next(self._items)
            except StopIteration:
                return
            self._queue.append((item, self._pool.submit(_claimed, self._fn, item)))

    def start(self) -> DecodePool:
        self._started = True
        self._fill()
        return self

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        if not self._started:
            self.start()
        try:
            while True:
                self._fill()
                if not self._queue:
                    return
                item, fut = self._queue.popleft()
                t0 = time.perf_counter()
                result = fut.result()
                self.wait_s += time.perf_counter() - t0
                yield item, result
        finally:
            self.close()

    def close(self) -> None:
        for _, fut in self._queue:
            fut.cancel()
        self._queue.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)


def prefetch_batches(n: int, batch_size: int, load: Callable[[int], Any], *, workers: int | None = None,
                     ahead: int = 2) -> Iterator[tuple[int, list]]:
    """Yield (start, [load(i) for i in batch]) for consecutive batches of range(n), loading `ahead`
    batches in advance on the decoding pool."""
    pool = DecodePool(load, range(n), workers=workers, window=(ahead + 1) * batch_size)
    with contextlib.closing(pool):
        rows: list = []
        start = 0
        for i, row in pool:
            rows.append(row)
            if len(rows) == batch_size or i == n - 1:
                yield start, rows
                start, rows = i + 1, []


def stack_padded(rows: Sequence[dict], batch_size: int) -> tuple[dict, np.ndarray]:
    """Stack per-item dicts of arrays into a batch padded with zeros to `batch_size`; returns
    (batch, valid) with valid (batch_size,) bool."""
    b = len(rows)
    out = {}
    for key in rows[0]:
        arr = np.stack([np.asarray(r[key]) for r in rows])
        if b < batch_size:
            arr = np.concatenate([arr, np.zeros((batch_size - b,) + arr.shape[1:], arr.dtype)])
        out[key] = arr
    valid = np.arange(batch_size) < b
    return out, valid


def file_sha256(path: str | os.PathLike) -> bytes:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").digest()


def decode_item(transform: Callable, item, identify: int = 0):
    """(array, None, identity) or (None, reason, None) for an `Item`. identity (for a path, with
    `identify` 1): its (size, mtime_ns, None) as decoded, which a resumed job compares before it skips
    the shard; with 2, (size, mtime_ns, sha256). Hashing costs little next to decoding (bench/NOTES.md),
    yet only --verify-inputs pays it. Any failure is that input's error, never raised."""
    if isinstance(item.source, UnlistedFolder):
        return None, item.source.reason, None
    st = None
    if identify and item.path:
        try:
            st = os.stat(item.source)  # before reading: a later edit shows
        except OSError:
            pass  # the transform says what is wrong with it
    try:
        arr = np.asarray(transform(item.source), np.float32)
        ident = (st.st_size, st.st_mtime_ns, file_sha256(item.path) if identify > 1 else None) \
            if st is not None else None
        return arr, None, ident
    except Exception as e:  # any failure of one input is that input's error, never the job's
        return None, str(e) if isinstance(e, preprocess.ImageLoadError) else f"{type(e).__name__}: {e}", None


def load_images(paths: Iterable, transform: Callable, *, workers: int | None = None,
                window: int = 16) -> Iterator[tuple[Any, Any, tuple[int, int] | None, Exception | None]]:
    """(path, transform(image), image (W, H), None), or (path, None, None, ImageLoadError), for each
    path in order, decoded ahead on the decoding pool (`predmaps explain`'s images)."""
    def load(path):
        try:
            image = preprocess.load_image(path)
            return transform(image), image.size, None
        except preprocess.ImageLoadError as e:
            return None, None, e

    for path, (x, size, error) in DecodePool(load, paths, workers=workers, window=window):
        yield path, x, size, error
