"""Regenerate jaxvit's bundled table of timm ViT configs from an installed timm.

    python -m convert.registry [--out jaxvit/data/timm_vit_configs.json]

Every registered timm architecture that jaxvit implements is built on the meta device (no
weights, no download) and described by `config_from_timm_module`; every pretrained tag adds
its data settings (normalisation, eval transform, classes, input size, hub id). Without timm,
`jaxvit.get_config` reads this table, so model names resolve offline and torch-free.
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from pathlib import Path

from convert.errors import UnsupportedModelError
from convert.timm_vit import config_from_timm_module
from jaxvit import labels

ARCH_FIELDS_EXCLUDED = ("name", "mean", "std", "interpolation", "crop_pct", "crop_mode", "label_names", "hf_hub_id")
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "jaxvit" / "data" / "timm_vit_configs.json"


def _data_entry(pcfg: dict) -> dict:
    entry = {}
    for key in ("mean", "std"):
        if pcfg.get(key) is not None:
            entry[key] = [float(x) for x in pcfg[key]]
    for key in ("interpolation", "crop_mode", "hf_hub_id"):
        if pcfg.get(key):
            entry[key] = pcfg[key]
    if pcfg.get("crop_pct"):
        entry["crop_pct"] = float(pcfg["crop_pct"])
    if pcfg.get("num_classes") is not None:
        entry["num_classes"] = int(pcfg["num_classes"])
    if pcfg.get("input_size"):
        entry["img_size"] = [int(pcfg["input_size"][1]), int(pcfg["input_size"][2])]
    entry["label_names"] = labels.IMAGENET_1K if entry.get("num_classes") == 1000 else None
    return entry


def build_table() -> dict:
    import timm
    import torch
    from timm.models import get_arch_pretrained_cfgs, get_pretrained_cfg

    archs, pretrained, skipped = {}, {}, {}
    # Only these modules define VisionTransformer / VisionTransformerDistilled variants.
    for arch in timm.list_models(module=["vision_transformer", "deit"]):
        try:
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = timm.create_model(arch, pretrained=False)
        except Exception as e:  # architectures that need arguments or external code
            skipped[arch] = f"build failed: {type(e).__name__}"
            continue
        try:
            cfg = config_from_timm_module(model, name=arch)
        except UnsupportedModelError as e:
            skipped[arch] = str(e).split(": ", 1)[-1]
            continue
        entry = {k: v for k, v in cfg.to_dict().items() if k not in ARCH_FIELDS_EXCLUDED}
        # timm's own order: the first is the default tag (list_pretrained sorts alphabetically).
        # Untrained-only architectures still get their 'untrained' data settings.
        tags = list(get_arch_pretrained_cfgs(arch))
        if tags:
            entry["default_tag"] = tags[0].partition(".")[2]
        archs[arch] = entry
        for full in tags:
            pcfg = get_pretrained_cfg(full)
            pretrained[full] = _data_entry(pcfg.to_dict() if hasattr(pcfg, "to_dict") else dict(pcfg))
    return {"timm_version": timm.__version__, "architectures": archs, "pretrained": pretrained,
            "num_skipped": len(skipped)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)
    table = build_table()
    from jaxvit import safe_write

    safe_write.write_text(args.out, json.dumps(table, indent=0, sort_keys=True) + "\n")
    print(f"{len(table['architectures'])} architectures, {len(table['pretrained'])} pretrained tags "
          f"(timm {table['timm_version']}; {table['num_skipped']} other timm models skipped) -> {args.out}")


if __name__ == "__main__":
    main()
