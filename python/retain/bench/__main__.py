"""``python -m retain.bench [options]``: the same as ``retain bench [options]``."""

import sys

from retain.bench.cli import main

sys.exit(main())
