"""What every `predmaps` sub-command shares: the --model loader, option types and help, and the
argv fix for negative --layers."""

from __future__ import annotations

import argparse
import os
import signal
import threading
from importlib import resources
from pathlib import Path

from predmaps.runtime import int_at_least

DEFAULT_MODEL = "vit_digits_patch8_64"
# The small sentiment classifier `predmaps demo --text` explains (a transformers-format folder in assets).
DEFAULT_TEXT_MODEL = Path(str(resources.files("predmaps").joinpath("assets", "text_sentiment")))


def default_model_path() -> Path:
    """The embedded default: a small ViT trained on digit scenes (predmaps/assets)."""
    return Path(str(resources.files("predmaps").joinpath("assets", DEFAULT_MODEL)))


def load_model(spec: str | None, model_name: str | None = None):
    """The CLI's --model (a timm name, a checkpoint file or directory; None: the embedded default)
    and --model-name (the timm architecture of a bare weights file that does not say)."""
    import convert

    if spec is None or spec == DEFAULT_MODEL:
        if model_name:  # it would be ignored: the embedded model says what it is
            raise ValueError("--model-name names the architecture of a --model weights file; give --model too")
        return convert.load(default_model_path())
    refusal = convert._model_name_refusal(spec, model_name, "--model-name")  # in this CLI's words
    if refusal:
        raise ValueError(refusal)
    try:
        return convert.load(spec, model_name=model_name)
    except (ValueError, OSError) as e:
        text = str(e)
        if "pass model_name" in text or "model_name=" in text:  # the library's advice, as this CLI's option
            raise ValueError(f"{text} (on the command line: --model FILE --model-name NAME)") from e
        raise


MODEL_NAME_HELP = ("the timm name of a bare weights file (.safetensors/.pth state dict) that does not say which "
                   "architecture it is, e.g. vit_base_patch16_224")


def parse_layers(text: str) -> list[int]:
    """--layers of explain and run: comma-separated integers, at least one (an empty list would be
    refused later with no flag named, or explain nothing)."""
    try:
        layers = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        layers = []
    if not layers:
        raise argparse.ArgumentTypeError(f"--layers takes comma-separated integers like -1,-2; got {text!r}")
    return layers


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)  # e.g. a seed: numpy refuses negative ones


def join_negative_layers(argv: list[str]) -> list[str]:
    """argv with "--layers -1,-2" as "--layers=-1,-2" (argparse takes -1,-2 for an option). A new
    list, every other argument kept as it is, the empty string included."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--layers" and i + 1 < len(argv) and argv[i + 1].startswith("-"):
            out.append(f"--layers={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default (unless the help says it already, or there is none)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (action.option_strings and "default" not in text and default is not None and default is not False
                and default is not argparse.SUPPRESS and not (isinstance(default, list) and not default)):
            shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else default
            text += f" (default: {shown})"
        return text


def use_formatter(parser: argparse.ArgumentParser) -> None:
    """`HelpFormatter` for `parser` and every subcommand under it."""
    parser.formatter_class = HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                use_formatter(sub)


def methods_help() -> str:
    from predmaps.explain import METHODS

    return "one of " + ", ".join(METHODS)


_received: list[int] = []  # the signal that stopped the command: its exit status is 128 + it (130, 143)


def _interrupt_once(signum, frame):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not break the clean-up (ours, JAX's)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _received.append(signum)
    raise KeyboardInterrupt


def catch_signals() -> dict:
    """SIGINT and SIGTERM as KeyboardInterrupt (the same one-line message, exit 130 / 143); returns the
    handlers to restore (empty off the main thread, where handlers cannot be set)."""
    _received.clear()
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, _interrupt_once) for sig in (signal.SIGINT, signal.SIGTERM)}


def exit_status() -> int:
    """128 + the signal that interrupted the command (SIGTERM: 143), 130 for a KeyboardInterrupt otherwise."""
    return 128 + (_received[-1] if _received else signal.SIGINT)


def restore_signals(previous: dict) -> None:
    for sig, handler in previous.items():
        if signal.getsignal(sig) is _interrupt_once:  # not once a signal came: it stays ignored while exiting
            signal.signal(sig, handler)


# ---- explain and demo (images and texts): --classes against the model, and the --out folder they own ----

def check_class_options(args, num_classes: int) -> None:
    """--classes and --map-class against the model's classes; ValueError naming the option."""
    model = f"a {num_classes}-class model (0..{num_classes - 1})"
    if isinstance(args.classes, str) and args.classes[3:].isdigit() and not 1 <= int(args.classes[3:]) <= num_classes:
        raise ValueError(f"--classes {args.classes}: K must be 1..{num_classes} for {model}")
    if isinstance(args.classes, list):
        bad = [c for c in args.classes if not 0 <= c < num_classes]
        if bad:
            raise ValueError(f"--classes {','.join(map(str, bad))} out of range for {model}")
    if args.map_class is not None and not 0 <= args.map_class < num_classes:
        raise ValueError(f"--map-class {args.map_class} out of range for {model}")


def check_out(path: str) -> Path:
    """--out as a folder that is missing, or writable and explain/demo's own (see `_check_owned`), or a
    ValueError that says why it cannot be one; creates nothing (cheap: for before the model loads)."""
    if not path:  # Path("") would be the current directory
        raise ValueError("--out is empty; give a folder (created when missing)")
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder (created when missing)")
    if out.is_dir():
        _probe_writable(out)
        _check_owned(out)
    return out


def _probe_writable(out: Path) -> None:
    # A file made and removed: os.access misses read-only mounts and ACLs, and a read-only --out
    # otherwise failed after the model load and the first batch with a bare "[Errno 13]".
    import tempfile

    try:
        fd, probe = tempfile.mkstemp(dir=out, prefix=".predmaps-tmp-write-probe-")
    except OSError as e:
        raise ValueError(f"cannot write to {out}: {e.strerror or e}; choose another --out") from None
    os.close(fd)
    os.unlink(probe)


# explain/demo mark the folders they write: they overwrite their own overlays and report on a rerun, never a
# user's files in a folder predmaps did not make.
OUT_MARKER = ".predmaps-out"


def _check_owned(out: Path) -> bool:
    """Whether the existing folder out carries explain/demo's marker; False for an empty folder; a
    ValueError for any other (a user's files, or a marker that is a symlink)."""
    marker = out / OUT_MARKER
    if os.path.islink(marker) or (os.path.lexists(marker) and not marker.is_file()):
        raise ValueError(f"--out {out}: {marker} is not the marker file predmaps writes (a symlink or folder); "
                         "choose another --out")
    if marker.is_file():
        return True
    try:
        held = sorted(e.name for e in os.scandir(out))
    except OSError as e:
        raise ValueError(f"cannot list --out {out}: {e.strerror or e}; choose another --out") from None
    if held:
        shown = ", ".join(held[:5]) + (f" and {len(held) - 5} more" if len(held) > 5 else "")
        raise ValueError(f"--out {out} is not empty ({shown}) and was not made by predmaps explain/demo: they "
                         "write only into a new or empty folder (or one they made), so nothing of yours is "
                         "overwritten. Choose another --out")
    return False


def make_out(path: str) -> Path:
    """--out as a created, writable folder that explain/demo own (empty, or marked by an earlier run),
    or a ValueError that says why it cannot be one."""
    from jaxvit import safe_write

    out = check_out(path)  # an existing folder is probed and checked there
    if not out.is_dir():
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"--out {out} cannot be created ({e.strerror or e}); choose another folder") from None
        _probe_writable(out)
    if not _check_owned(out):
        try:
            safe_write.write_text(out / OUT_MARKER, "predmaps explain/demo output folder: reruns may overwrite "
                                                    "its overlays and report/\n")
        except OSError as e:
            raise ValueError(f"cannot write to {out}: {e.strerror or e}; choose another --out") from None
    return out


def check_view_options(args) -> None:
    """The options that need no model, checked before it loads; ValueError naming the option."""
    from predmaps import viz
    from predmaps.explain import get_method

    if hasattr(args, "method"):
        try:
            get_method(args.method)
        except ValueError as e:
            raise ValueError(f"--method: {e}") from None
    try:
        viz.check_cmap(args.cmap)
    except ValueError as e:
        raise ValueError(f"--cmap: {e}") from None
    if not 0 <= args.alpha <= 1:
        raise ValueError(f"--alpha (the heat map's opacity) must be in [0, 1]; got {args.alpha}")
