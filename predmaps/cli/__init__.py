"""The `predmaps` command: `explain`, `demo` (predmaps.cli.explain), `run` (predmaps.cli.run) and
`eval` (predmaps.cli.eval); shared helpers in predmaps.cli.common.
"""

from __future__ import annotations

import argparse
import sys

from predmaps.cli.common import join_negative_layers, use_formatter
from predmaps.runtime import (COMPILE_CACHE_ENV, XLA_DEFAULT_FLAGS, XLA_DEFAULTS_ENV, configure_compile_cache,
                              configure_xla_flags, default_compile_cache)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="predmaps", description="Prediction maps and PredicAtt for ViTs, in JAX",
                                     epilog=f"Compiled executables are cached in {default_compile_cache()} "
                                            f"(set {COMPILE_CACHE_ENV}=DIR to move it, or =off). XLA_FLAGS gets "
                                            f"{' '.join(XLA_DEFAULT_FLAGS)} unless it sets that flag itself "
                                            f"({XLA_DEFAULTS_ENV}=off: none).")
    sub = parser.add_subparsers(dest="command", required=True)

    from predmaps.cli.eval import add_eval_parser
    from predmaps.cli.explain import add_demo_parser, add_explain_parser
    from predmaps.cli.run import add_run_parser

    add_explain_parser(sub)
    add_demo_parser(sub)
    add_eval_parser(sub)
    add_run_parser(sub)
    use_formatter(parser)

    args = parser.parse_args(join_negative_layers(list(sys.argv[1:] if argv is None else argv)))
    configure_xla_flags()
    configure_compile_cache()
    try:
        return args.fn(args)
    except (OSError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

