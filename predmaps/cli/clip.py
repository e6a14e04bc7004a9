"""`predmaps explain PHOTO... --model <CLIP checkpoint> --text PROMPT [--text PROMPT ...]`: the paper's A.5 maps.

One inverted text-to-patch similarity map per photo and prompt at one token layer (the penultimate by default,
as the paper's Fig. 18), every layer's maps in one grid per photo, and clip.json (`predmaps.clip.clip_report`).
Both towers and the tokenizer are JAX (`convert.load_clip`): no torch needed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# transformers model_type of a checkpoint that holds both towers (CLIPModel, SiglipModel; their vision-
# or text-only classes have model_type clip_vision_model, clip_text_model, ...).
_BOTH_TOWERS = ("clip", "siglip")
# The text tower's first tensor in open_clip (CLIP, CustomTextCLIP) and transformers checkpoints.
_TEXT_KEYS = ("token_embedding.weight", "text.token_embedding.weight", "text_model.embeddings.token_embedding.weight")
CLIP_DEFAULT_LAYER = -2  # the penultimate token layer, as the paper's Fig. 18
TEXT_NEEDS = ("--text and --text-file take texts for a text classifier (a transformers BERT, RoBERTa or DistilBERT "
              "sequence-classification folder or hub repo); --text also takes prompts for a CLIP checkpoint that "
              "holds both towers (an open_clip folder or hub repo with open_clip_config.json, or a transformers "
              "CLIPModel folder or hub repo id such as openai/clip-vit-base-patch16)")


def is_clip_checkpoint(source: str | os.PathLike | None) -> bool:
    """Whether --model names a CLIP checkpoint with both towers, told by its files without reading its tensors:
    a folder or hub repo with open_clip's open_clip_config.json or weights, or transformers' config.json of
    model_type clip/siglip; a weights file holding a CLIP text tower (keys read from the file). False for the
    embedded model, timm names (timm's CLIP models are image towers only) and other checkpoints. A hub repo
    that is neither cached nor reachable raises HubUnavailableError (an OSError), as `convert.load` does; an
    unreadable weights file the readers' ValueError."""
    from convert.sources import (OPEN_CLIP_WEIGHT_FILES, _REPO_ID, download, is_file_name, read_file, read_json)

    if source is None:
        return False
    path = Path(source)
    if path.is_dir():
        config = read_json(path / "config.json")
        return (_says_both_towers(config) or (path / "open_clip_config.json").is_file()
                or any((path / name).is_file() for name in OPEN_CLIP_WEIGHT_FILES))
    if path.is_file():
        if path.suffix == ".safetensors":  # the header alone: the tensors stay on disk
            from safetensors import safe_open

            try:
                with safe_open(str(path), framework="numpy") as f:
                    keys = set(f.keys())
            except Exception:  # SafetensorError is no ValueError: the full reader's ValueError names the file
                keys = set(read_file(path))
        elif path.suffix == ".npz":  # Google's ViTs: image towers only
            return False
        else:
            keys = set(read_file(path))
        return any(k in keys for k in _TEXT_KEYS)
    repo_id = str(source).removeprefix("hf-hub:")
    if os.path.lexists(path) or is_file_name(str(source)) or not _REPO_ID.fullmatch(repo_id):
        return False  # a timm name, or a missing file that convert.load names
    # The weights come into the hub cache here, where load_clip then finds them: nothing is fetched twice.
    weights, sides = download(repo_id, model_name=repo_id)
    return (_says_both_towers(sides.get("config.json")) or sides.get("open_clip_config.json") is not None
            or weights.name in OPEN_CLIP_WEIGHT_FILES)


def _says_both_towers(config) -> bool:
    return isinstance(config, dict) and config.get("model_type") in _BOTH_TOWERS


def text_refusal(model: str | None) -> str:
    """The one-line error for --text with a model that is no CLIP checkpoint."""
    what = "the embedded digit model" if model is None else repr(model)
    hint = ""
    if model is not None and "clip" in str(model).lower() and "/" not in str(model):
        hint = " (timm's CLIP models are image towers alone: use the open_clip or transformers checkpoint of that model)"
    return f"{TEXT_NEEDS}; {what} is not one{hint}"


def _unused_options(args) -> list[str]:
    """explain's options that mean nothing for CLIP maps, where given (an error, never silently ignored)."""
    given = {"--labels": args.labels is not None, "--map-class": args.map_class is not None,
             "--classes": args.classes not in (None, "top"), "--method": args.method != "predicatt",
             "--shared-scale": args.shared_scale}
    return [name for name, on in given.items() if on]


def explain_clip(args, progress: dict) -> int:
    """The CLIP path of `predmaps explain` (--text with a CLIP --model): 0, 1 under --strict when photos were
    skipped, 2 with one line for bad input; writes only into --out."""
    from predmaps.cli.common import check_out, check_view_options, make_out
    from predmaps.core import layer_index

    def error(text: str) -> int:
        print(f"error: {text}", file=sys.stderr)
        return 2

    prompts = list(args.text or [])
    if not prompts or any(not p.strip() for p in prompts):
        return error("--text needs a non-empty prompt, e.g. --text 'a dog' --text 'a cat'")
    unused = _unused_options(args)
    if unused:
        return error(f"{', '.join(unused)} do(es) not apply to CLIP maps (--text with a CLIP model): leave "
                     f"{'it' if len(unused) == 1 else 'them'} out")
    layers = [CLIP_DEFAULT_LAYER] if args.layers is None else args.layers
    if len(layers) != 1:
        return error(f"--layers: CLIP maps take one token layer (every layer is in each photo's layers grid); got "
                     f"{','.join(map(str, layers))}")
    try:  # before the model loads
        check_view_options(args)
        check_out(args.out)
    except ValueError as e:
        return error(str(e))
    import convert

    try:
        clip = convert.load_clip(args.model, model_name=args.model_name)
    except (ValueError, OSError) as e:  # the formats' errors (CheckpointMismatchError, ...) say what to do
        return error(str(e))
    try:
        layer = layer_index(layers[0], clip.image_model.config.depth)
    except ValueError as e:
        return error(f"--layers: {e}")
    try:
        out = make_out(args.out)
    except ValueError as e:
        return error(str(e))
    from predmaps.clip import clip_report

    try:
        report = clip_report(clip.image_model, clip.image_params, clip.text_tower, args.images, prompts, out,
                             layer=layer, cmap=args.cmap, alpha=args.alpha)
    except ValueError as e:  # no readable photo
        return error(str(e))
    for skipped in report["skipped"]:
        reason = skipped["error"]  # as explain: the path first unless the reason names it
        print(f"skipped: {reason if skipped['image'] in reason else skipped['image'] + ': ' + reason}", file=sys.stderr)
    for rec in report["images"]:
        print(f"{rec['image']}: {', '.join(rec['maps'])}; every layer: {rec['layers_grid']}")
    print(f"{len(report['images'])} image(s) x {len(prompts)} prompt(s): inverted similarity maps of token layer "
          f"{layer} of 0..{report['layers'] - 1} in {out}; cosines in {out / 'clip.json'}"
          + (f"; {len(report['skipped'])} skipped" if report["skipped"] else ""))
    return 1 if report["skipped"] and args.strict else 0
