"""`predmaps run`: explain a whole data set into resumable shards (see `predmaps.pipeline`).

    predmaps run --model NAME|PATH [--model-name NAME] --images DIR|GLOB|LIST --out DIR
                 [--method predicatt[,rollout]] [--layers -1,-2] [--target top|top5|gt[,...]] [--batch-size N] [--dtype bf16]
                 [--map-dtype float16] [--labels FILE] [--shard-size N] [--resume] [--retry-failed] [--strict]

`add_run_parser(subparsers)` registers the subcommand on the `predmaps` parser; `main(argv)`
runs it alone (`python -m predmaps.cli.run ...`). Exit codes: 0 done; 1 `--strict` and some
input could not be read; 2 the job could not run (bad arguments, another job in --out, a full
disk, ...); 130 interrupted (Ctrl-C), 143 terminated (SIGTERM). After 2, 130 or 143, finished shards are
kept: rerun to resume.
Several hosts: start the same command on each (SLURM/mpirun/TPU pods are detected), or pass
--coordinator HOST:PORT --num-processes N --process-id I. If one process fails (compiling or mid-run), the
others stop with it (status 2, naming it) and every finished shard is kept.
"""

from __future__ import annotations

import argparse
import sys

from predmaps.cli.common import (MODEL_NAME_HELP, catch_signals, exit_status, join_negative_layers, load_model,
                                 methods_help, parse_layers, positive_int, restore_signals)

DTYPES = {"f32": "float32", "float32": "float32", "fp32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
          "f16": "float16", "float16": "float16", "fp16": "float16"}


def add_run_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "run", help="explain a whole data set into resumable shards on every device and host",
        description="Stream a data set through every device and host; write explanations as resumable "
                    ".npz shards that predmaps.results.read_results(DIR) reads. Running the same command "
                    "again finishes an interrupted job.")
    p.add_argument("--model", help="timm name, checkpoint file or directory (default: the embedded model)")
    p.add_argument("--model-name", help=MODEL_NAME_HELP)
    p.add_argument("--images", required=True,
                   help="a directory (recursive; an ImageNet class-folder tree gives labels), a glob (quote "
                        "it; like a directory, it lists image extensions only), a text file of paths (optionally "
                        "'path<TAB>label'), or one image")
    p.add_argument("--out", required=True, help="output directory: new or empty (created), or holding this job "
                                                "(resumed); a folder holding other files is refused")
    p.add_argument("--labels", help="label file for flat layouts: 'file label' lines (class index or WordNet id)")
    p.add_argument("--method", default="predicatt", help="method(s), comma-separated, of " + methods_help()[7:] + " (default predicatt)")
    p.add_argument("--layers", type=parse_layers, default=[-1],
                   help="prediction layers of prediction-map methods, e.g. -1,-2 (default -1)")
    p.add_argument("--target", default="top", help="top, topK (e.g. top5), all, gt, or a class index; "
                                                   "comma-separated for several (default top)")
    p.add_argument("--batch-size", type=int, default=64, help="global batch, at most what a shard holds, rounded "
                                                                "up to a multiple of the device count (default 64)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="compute dtype (default float32)")
    p.add_argument("--map-dtype", default="float32", choices=sorted(k for k, v in DTYPES.items() if v != "bfloat16"),
                   help="stored map dtype (default float32; float16 halves the disk)")
    p.add_argument("--shard-size", type=int, help="images per shard (default: up to 1024, 256 MiB of maps)")
    p.add_argument("--workers", type=positive_int, help="decoding threads (default: CPU count)")
    p.add_argument("--prefetch", type=int, default=2, help="batches decoded ahead (default 2)")
    p.add_argument("--resume", action="store_true",
                   help="require a job in --out to continue (without it, a matching job is continued anyway)")
    p.add_argument("--retry-failed", action="store_true",
                   help="recompute the finished shards holding inputs that could not be read (after fixing "
                        "them); other finished shards are kept")
    p.add_argument("--verify-inputs", action="store_true",
                   help="record each input's content hash (sha256) as it is decoded, and before skipping a "
                        "finished shard compare its inputs' content with what was explained (where recorded), "
                        "instead of their size and modification time; either way a shard whose input changed "
                        "(or whose file no longer matches the manifest's sha256) is recomputed, not skipped")
    p.add_argument("--strict", action="store_true", help="exit 1 if any input could not be read")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--distributed", choices=["auto", "on", "off"], default="auto",
                   help="jax.distributed: auto (when a cluster or --coordinator is given), on, off")
    p.add_argument("--coordinator", help="HOST:PORT of process 0, for a multi-process run")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)
    p.set_defaults(fn=cmd_run)
    return p


def cmd_run(args) -> int:
    # Ctrl-C or SIGTERM anywhere (loading, compiling, running) is one line and exit 130 / 143, never a
    # traceback: shards and manifests are written atomically, so whatever finished is kept.
    previous = catch_signals()
    try:
        return _run(args)
    except KeyboardInterrupt as e:
        from predmaps.pipeline import JobInterrupted

        text = str(e) if isinstance(e, JobInterrupted) else \
            f"interrupted: finished shards (if any) are kept in {args.out}; rerun the same command to resume"
        print(text, file=sys.stderr)
        return exit_status()
    finally:
        restore_signals(previous)


def _run(args) -> int:
    from predmaps import pipeline
    from predmaps.results import JobMismatchError

    if not args.out:  # Path("") would put the job in the current directory
        print("error: --out is empty; give a folder (created when missing)", file=sys.stderr)
        return 2
    try:
        pipeline.init_distributed(args.distributed, args.coordinator, args.num_processes, args.process_id)
    except (ValueError, RuntimeError) as e:
        print(f"error: jax.distributed: {e}", file=sys.stderr)
        return 2
    import jax
    import jax.numpy as jnp

    try:
        model, params = load_model(args.model, args.model_name)
        dtype = DTYPES[args.dtype]
        if jnp.dtype(model.dtype) != jnp.dtype(dtype):
            model = model.clone(dtype=jnp.dtype(dtype))
        spec = pipeline.ExplainSpec(methods=args.method, layers=args.layers, targets=args.target,
                                    map_dtype=args.map_dtype)
        summary = pipeline.explain_dataset(
            model, params, args.images, args.out, spec, labels=args.labels, batch_size=args.batch_size,
            shard_size=args.shard_size, resume=True if args.resume else None, workers=args.workers,
            prefetch=args.prefetch, progress=not args.no_progress, retry_failed=args.retry_failed,
            verify_inputs=args.verify_inputs)
    except JobMismatchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError, KeyError, TypeError, pipeline.OtherProcessError,  # the refusing one exits 2 too
            pipeline.StepCompileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if jax.process_index() == 0:
        print(summary)
    return 1 if args.strict and summary.total_errors else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="predmaps")
    add_run_parser(parser.add_subparsers(dest="command", required=True))
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "run":
        argv.insert(0, "run")
    args = parser.parse_args(join_negative_layers(argv))
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
