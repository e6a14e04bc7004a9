"""The one data layer of `predmaps run`, `predmaps eval` and `predmaps explain`: what the inputs are,
their labels, and how they are decoded ahead of the device.

    inputs    `open_inputs` -> `Inputs` of `Item`s: a folder, glob, list file, one image, or Python objects
    labels    the one label-file reader (`read_label_file`, every layout either command reads; `parse_label_file`
              reads one once, its classes checked later) and
              the one class-range rule (`check_label`)
    decode    the decoding thread pool (`DecodePool`, `prefetch_batches`), `default_workers`, padding
    imagenet  `imagenet_val`: ImageNet validation layouts as an `ImageList` (what `predmaps eval` lists)

Imports go one way: predmaps.pipeline and predmaps.evaluation use this package, never the reverse.
"""

from predmaps.data.decode import (DecodePool, decode_item, default_workers, load_images, prefetch_batches,
                                   stack_padded)
from predmaps.data.imagenet import (IMAGENET_LAYOUTS, LABEL_FILE_NAMES, ImageList, imagenet_root, imagenet_val,
                                    iter_image_list, subset_indices)
from predmaps.data.inputs import IMAGE_EXTENSIONS, Inputs, Item, open_inputs
from predmaps.data.labels import (LABEL_FILE_LIMIT, DataLayoutError, LabelFile, LabelFileError, check_label,
                                   parse_label_file, read_label_file)

__all__ = ["DataLayoutError", "DecodePool", "IMAGENET_LAYOUTS", "IMAGE_EXTENSIONS", "ImageList", "Inputs", "Item",
           "LABEL_FILE_LIMIT", "LABEL_FILE_NAMES", "LabelFile", "LabelFileError", "check_label", "decode_item", "default_workers",
           "imagenet_root", "imagenet_val", "iter_image_list", "load_images", "open_inputs", "parse_label_file", "prefetch_batches",
           "read_label_file",
           "stack_padded", "subset_indices"]
