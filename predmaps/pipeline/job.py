"""The public API: `explain_batches` (host batches, nothing written) and `explain_dataset` (a
resumable job on disk), with the job's summary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from jaxvit.preprocess import eval_settings
from predmaps import results as _results
from predmaps.data import IMAGE_EXTENSIONS, DecodePool, decode_item, default_workers, open_inputs
from predmaps.pipeline.distributed import OtherProcessError, _agreement, _allgather, _allgather_json
from predmaps.pipeline.output import (JobInterrupted, OutputWriteError, _atomic_write, _check_owned, _check_writable,
                                      _drop_records, _drop_superseded_records, _manifest_parts, _OutputLock,
                                      _read_manifest_file, _stale_reason, _write_shard)
from predmaps.pipeline.spec import Combo, ExplainSpec, _as_spec, model_identity
from predmaps.pipeline.step import _Engine
from predmaps.pipeline.stream import (ResultBatch, _plan, _check_labels, _process_shards,
                                      _progress_bar, _shard_digest, _Shard, _shards, _Stats, _stream)
from predmaps.results import JobMismatchError


_SHARD_BUDGET_BYTES = 256 << 20  # results buffered per shard, for the automatic shard size


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
    inputs = open_inputs(images, labels=labels, num_classes=model.config.num_classes)
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
                               transform=transform, workers=workers or default_workers(), prefetch=prefetch,
                               total_steps=total_steps, stats=stats, bar=bar)
        finally:
            if bar is not None:
                bar.close()

    return generate()


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
    inputs = open_inputs(images, labels=labels, num_classes=model.config.num_classes)
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
                                 workers=workers or default_workers(), prefetch=prefetch, total_steps=total_steps,
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
            for _ in DecodePool(lambda it: decode_item(transform, it), items, workers=w, window=len(items)):
                pass
            best = min(best, time.perf_counter() - t0)
        out[w] = len(items) / best
    return out
