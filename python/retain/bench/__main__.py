"""``python -m retain.bench``: the same as ``retain bench``."""

import sys

from retain.bench.harness import main

sys.exit(main())
