import sys

from predmaps.cli import main

sys.exit(main())
