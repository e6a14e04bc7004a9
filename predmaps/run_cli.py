"""`predmaps run` on its own, where it was before issue 25 split the CLI into predmaps.cli:
`python -m predmaps.run_cli --model ... --images ... --out ...` and `from predmaps import run_cli;
run_cli.main(argv)` keep working. The command itself is predmaps.cli.run.
"""

import sys

from predmaps.cli.run import add_run_parser, cmd_run, main

__all__ = ["add_run_parser", "cmd_run", "main"]

if __name__ == "__main__":
    sys.exit(main())
