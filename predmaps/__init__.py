"""predmaps: Prediction Maps and PredicAtt, per-class gradient-free ViT explanations, in JAX.

    import convert, predmaps
    model, params = convert.load("vit_base_patch16_224.orig_in21k_ft_in1k")
    ex = predmaps.explain(model, params, images, method="predicatt", target="top", layer=-1)
    ex.maps            # (B, K, 14, 14)
    predmaps.upsample(ex.maps, (224, 224), normalize=True)
"""

from predmaps.clip import TextSimilarityMaps, text_similarity_maps
from predmaps.explain import (METHODS, Explanation, Method, explain, explain_fn, get_method, prediction_matrices,
                              upsample)
from predmaps.results import iter_results, read_results
from predmaps.targets import Target, Targets, make_targets

__all__ = ["METHODS", "Explanation", "Method", "Target", "Targets", "TextSimilarityMaps", "explain", "explain_fn", "get_method",
           "iter_results", "make_targets", "prediction_matrices", "read_results", "text_similarity_maps", "upsample"]
