"""The on-disk format of `predmaps run` / `predmaps.pipeline.explain_dataset`: its reader and its
writer, in one place.

    res = predmaps.results.read_results("out/")          # every complete shard, in input order
    res.paths, res.pred, res.score, res.labels           # per image
    res.maps["predicatt/L12/top"]                        # (N, K, gh, gw) token maps
    res.map("predicatt", layer=-1, target="top")         # the same, chosen by parts
    read_results("out/", upsample=True)                  # maps at the model's input size
    for part in iter_results("out/"): ...                # one shard at a time: bounded memory

Layout of an output directory:

    manifest.json          the job (format, model identity, spec, inputs, shard plan) and the
                           shards process 0 completed; consolidated with every process's at the end
    manifest-p{P}.json     the same header and the shards process P > 0 completed (multi-host runs)
    shard-{J:06d}.npz      input positions [J*S, (J+1)*S): one complete, atomically renamed file
    errors.tsv             every input that could not be read: index, name, path, reason

File format: `.npz` shards, not HDF5. Every shard is written whole, once, then renamed into
place, so HDF5's strengths (chunked partial writes and reads inside one big growing file) buy
nothing here, while its costs are real: a native dependency, a file that a crash mid-write can
leave unreadable (the reason to shard and rename anyway), HDF5 file locking that fails on some
network file systems, and h5py's one global lock around every HDF5 call, several of which
(file close, object look-ups) also hold the GIL, stalling the decoding threads. An `.npz` is a
zip of `.npy` members: numpy alone reads it, lazily member by member, on any machine. A
shard's size is bounded (S images), so reading a whole member is cheap. Members are stored
uncompressed: token maps are dense floats that compress poorly, and writing stays fast.

A shard holds, for its n readable images, in input order:
    index (n,) int64 global input position; name, path (n,) str; label (n,) int32 (-1 unknown);
    pred (n,) int32 predicted class; score (n,) float32 its softmax probability;
    maps_{c} (n, K_c, gh, gw) float16/float32 and classes_{c} (n, K_c) int32 for each
    combination c of (method, layer, target) listed in the manifest's "combos".
A shard counts only when the manifest lists it and its size matches: a temporary file, or a
shard renamed into place just before a crash but never recorded, is never read.

Modules: `manifest` (names, the job header and its identity, shard records), `reader` (`Results`,
`read_results`, `iter_results`), `writer` (shards and records, the resume checks, errors.tsv) and
`folder` (owning and locking the output folder, atomic writes, the errors that say what was kept).
"""

from predmaps.results.folder import (JobInterrupted, OutputInUseError, OutputLock, OutputWriteError, atomic_write,
                                     remove_temporaries)
from predmaps.results.manifest import (ERRORS_FILE, FORMAT, IDENTITY_FIELDS, MANIFEST, VERSION, JobMismatchError,
                                       check_manifest_fields, check_same_job, describe_identity, dumps,
                                       identity_differences, load_json, manifest_file, manifest_parts, read_manifest,
                                       shard_file, shard_names_digest)
from predmaps.results.reader import Results, iter_results, read_results
from predmaps.results.writer import write_errors_file

__all__ = ["FORMAT", "JobMismatchError", "Results", "iter_results", "read_manifest", "read_results"]
