"""``retain bench``: every op timed against its eager reference, torch.compile and peers.

Modules, each importing only those above it:

- ``registry``: ``Case``, ``Impl``, ``Runner``, ``register``, ``REGISTRY`` (what is measured);
- ``harness``: ``autograd_runner``, ``Unsupported``, checking each implementation against
  retain's result, timing, the load meter, ``run_case``;
- ``machine``: heap mode, machine facts, measured ceilings (copy bandwidth, matmul rate);
- ``report``: the JSON report and its markdown tables;
- ``<family>`` (``margin``, ``scan``, ...): the cases of ``retain.ops.<family>``;
- ``cli``: ``FAMILIES`` (it imports each family module), the options, ``run_cli``, ``main``.

Importing any of them imports this package, which loads the CLI and so every family:
``REGISTRY`` always holds every case.
"""

from retain.bench.cli import FAMILIES, main
from retain.bench.registry import REGISTRY

__all__ = ["FAMILIES", "REGISTRY", "main"]
