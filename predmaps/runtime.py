"""Process set-up shared by the `predmaps` CLI and `python -m bench`: XLA's default flags, JAX's
persistent compilation cache, and integer option types. Not CLI code, so bench depends on
predmaps' library only, never on the CLI package.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

COMPILE_CACHE_ENV = "PREDMAPS_COMPILE_CACHE"
XLA_DEFAULTS_ENV = "PREDMAPS_XLA_DEFAULTS"
# XLA flags the CLI (and `python -m bench`) add unless XLA_FLAGS already names them; GPU-only (CPU and TPU
# compiles ignore them). cuBLAS for every GEMM: faster than autotuned Triton GEMM fusions (bench/NOTES.md).
XLA_DEFAULT_FLAGS = ("--xla_gpu_enable_triton_gemm=false",)


def configure_xla_flags(environ=None) -> list[str]:
    """Add `XLA_DEFAULT_FLAGS` to XLA_FLAGS, each unless XLA_FLAGS already sets that flag; none with
    PREDMAPS_XLA_DEFAULTS=off. Effective only before JAX starts its backend (the CLI calls this
    first). Returns the flags added."""
    environ = os.environ if environ is None else environ
    if environ.get(XLA_DEFAULTS_ENV, "").lower() == "off":
        return []
    current = environ.get("XLA_FLAGS", "")
    added = [f for f in XLA_DEFAULT_FLAGS if f.split("=")[0] not in current]
    if added:
        environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added


def default_compile_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "predmaps" / "jax"


def configure_compile_cache(setting: str | None = None) -> str | None:
    """Point JAX's persistent compilation cache at a directory, so a second CLI run of the same
    model, batch and method loads its executables instead of compiling them again (the compile
    is seconds per executable on CPU, tens on GPU with autotuning).

    `setting`: a directory, or "off"; default the PREDMAPS_COMPILE_CACHE variable, else
    ~/.cache/predmaps/jax. A cache the user configured for JAX itself (JAX_COMPILATION_CACHE_DIR
    or jax.config) is left as it is. Returns the directory in use, or None.
    """
    import jax

    setting = setting or os.environ.get(COMPILE_CACHE_ENV)
    if setting == "off":
        return None
    current = jax.config.jax_compilation_cache_dir
    if current and setting is None:
        return current
    path = Path(setting) if setting else default_compile_cache()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a read-only home must not stop the job: it only compiles every time
        print(f"warning: no compilation cache ({path}: {e.strerror}); set {COMPILE_CACHE_ENV}=DIR or off",
              file=sys.stderr)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    # Cache every executable: the digits model's compile well under JAX's 1 s default, and with any
    # threshold what gets cached depends on how loaded the machine was during the first run (an
    # executable compiled in 0.19 s there and 0.21 s on the rerun is compiled twice).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return str(path)


def int_at_least(minimum: int):
    """An argparse type: an integer >= minimum (argparse names the option in its error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise argparse.ArgumentTypeError(f"expected {kind}; got {text!r}")
        return value

    parse.__name__ = "int"  # argparse's message for a failing type names it
    return parse

