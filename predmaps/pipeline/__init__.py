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

Inputs, labels and decoding are `predmaps.data`'s (`open_inputs` is re-exported here). Modules, in the
order a batch meets them:
    spec         `ExplainSpec` (methods x layers x targets) and `model_identity`
    distributed  `init_distributed` and the multi-process agreements (fail, stop, finish together)
    step         the device step: one AOT-compiled, batch-sharded program per job
    stream       shards, the decoding pool and the loop that yields `ResultBatch`es
    output       the job folder: lock, ownership, manifests read back, shard records written
    job          `explain_batches`, `explain_dataset`, `RunSummary`
"""

from jaxvit.preprocess import ImageLoadError
from predmaps.data import IMAGE_EXTENSIONS, LABEL_FILE_LIMIT, Inputs, Item, open_inputs, read_label_file
from predmaps.pipeline.distributed import OtherProcessError, init_distributed
from predmaps.pipeline.job import RunSummary, auto_shard_size, decode_throughput, explain_batches, explain_dataset
from predmaps.pipeline.output import JobInterrupted, OutputInUseError, OutputWriteError
from predmaps.pipeline.spec import Combo, ExplainSpec, model_identity, params_fingerprint
from predmaps.pipeline.step import StepCompileError
from predmaps.pipeline.stream import ResultBatch
from predmaps.results import JobMismatchError

__all__ = ["ExplainSpec", "IMAGE_EXTENSIONS", "Inputs", "Item", "JobInterrupted", "JobMismatchError",
           "OutputInUseError", "OutputWriteError", "ResultBatch", "RunSummary", "decode_throughput", "explain_batches",
           "explain_dataset", "OtherProcessError", "init_distributed", "model_identity", "open_inputs",
           "params_fingerprint"]
