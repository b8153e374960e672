"""pytest-benchmark suite for ``retain.ops.linear_recurrence`` (python/retain/ops/scan) against the
eager reference, torch.compile and peers: the implementations of ``retain.bench``'s
``linear_recurrence`` case.

    pytest bench/scan/test_linear_recurrence.py --benchmark-only
    RETAIN_BENCH_SIZE=small pytest bench/ --benchmark-only -k "retain or numba"
"""

import pytest

from retain.bench.registry import DIRECTIONS, REGISTRY

CASE = REGISTRY["linear_recurrence"]


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("impl", list(CASE.impls))
def test_linear_recurrence(run_bench, impl, direction):
    run_bench(CASE.name, impl, direction)
