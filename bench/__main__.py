"""`python -m bench`: the JAX explanations against the torch version, same device, same run.

See `bench/run.py` (or `python -m bench --help`) for what is measured and how.
"""

import os

# Before JAX starts: JAX and torch share the GPU in this process, so JAX must not take 75% of
# the card up front (its allocator then grows on demand, and its peak statistics stay exact).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

from bench.run import main  # noqa: E402

raise SystemExit(main())
