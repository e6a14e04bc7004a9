"""`python -m bench`: the JAX explanations against the torch version, same device, same run.

See `bench/run.py` (or `python -m bench --help`) for what is measured and how.
"""

import os

# Before JAX starts: JAX and torch share the GPU in this process, so JAX must not take 75% of
# the card up front (its allocator then grows on demand, and its peak statistics stay exact).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

# The JAX rows run with the XLA flags the predmaps CLI sets (recorded in the results' environment).
from predmaps.runtime import configure_xla_flags  # noqa: E402

configure_xla_flags()

from bench.run import main  # noqa: E402

raise SystemExit(main())
