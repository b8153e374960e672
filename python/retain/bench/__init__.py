"""``retain bench`` (being split into modules; for now everything lives in ``harness``)."""

from retain.bench.harness import *  # noqa: F401,F403
from retain.bench.harness import main  # noqa: F401
