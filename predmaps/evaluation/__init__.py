"""The paper's evaluation tests, after Chefer et al. 2021b (see /work/shared/evaluation.md).

    from predmaps import evaluation as ev
    images = ev.imagenet_val("/data/imagenet/val", limit=2000)          # ImageFolder tree or flat + labels
    res = ev.perturbation_test(model, params, images, method="predicatt", layer=-1, target="pred")
    res.auc            # {"positive": 17.0, "negative": 56.2}: trapz(acc, steps) * 100
    seg = ev.segmentation_test(model, params, "gtsegs_ijcv.mat", method="predicatt")
    seg.pixel_accuracy, seg.miou, seg.mean_ap

    # offline: every method on generated digit scenes with exact masks (see digit_scenes)
    from predmaps.evaluation import digit_scenes
    print(digit_scenes.run_benchmark(model, params, scenes=1000).markdown())

    # maps made elsewhere (e.g. by the torch code), in Chefer's results.hdf5:
    with ev.CheferResults("results.hdf5") as r:
        res = ev.score_maps(model, params, r, None, None)

Removal order of the perturbation test (`TIE_ORDER`): positive = decreasing map value,
negative = increasing map value; equal values in increasing flat pixel index (y * W + x).
"""

from predmaps.data import IMAGENET_LAYOUTS, DataLayoutError, ImageList, imagenet_val, subset_indices
from predmaps.evaluation.data import PROTOCOL_MEAN, PROTOCOL_STD, mask_transform, unit_transform
from predmaps.evaluation.files import (CheferResults, CheferWriter, ImageNetSegmentation, read_chefer_hdf5,
                                       write_chefer_hdf5, write_segmentation_mat)
from predmaps.evaluation.metrics import (MODES, STEPS, TIE_ORDER, SegmentationTotals, average_precision,
                                         average_precision_numpy, minmax_normalize, num_removed, perturbation_auc,
                                         removal_masks, removal_ranks, remove_pixels, segmentation_counts)
from predmaps.evaluation.perturbation import (PerturbationResult, perturbation_hits,
                                              perturbation_test, perturbation_test_arrays, score_maps)
from predmaps.evaluation.segmentation import (SegmentationResult, resize_mask, segmentation_test,
                                              segmentation_test_arrays)

__all__ = [
    "IMAGENET_LAYOUTS", "MODES", "PROTOCOL_MEAN", "PROTOCOL_STD", "STEPS", "TIE_ORDER", "CheferResults", "CheferWriter",
    "DataLayoutError", "ImageList", "ImageNetSegmentation", "PerturbationResult", "SegmentationResult",
    "SegmentationTotals", "average_precision", "average_precision_numpy", "imagenet_val",
    "mask_transform", "minmax_normalize", "num_removed", "perturbation_auc", "perturbation_hits", "perturbation_test",
    "perturbation_test_arrays", "read_chefer_hdf5", "removal_masks", "removal_ranks", "remove_pixels", "resize_mask",
    "score_maps", "segmentation_counts", "segmentation_test", "segmentation_test_arrays", "subset_indices",
    "unit_transform", "write_chefer_hdf5", "write_segmentation_mat",
]
