"""Shared machinery of the pytest-benchmark suites in bench/ (not collected by the test run).

Each suite parametrises over the implementations and directions of one ``retain.bench`` case, so
``retain bench`` and ``pytest bench/`` time exactly the same callables. Environment:

- ``RETAIN_BENCH_SIZE``: ``default`` (default) or ``small``;
- ``RETAIN_BENCH_DEVICE``: ``cpu`` (default) or ``cuda``;
- ``RETAIN_BENCH_COLD_HEAP=1``: leave glibc's malloc alone (see ``retain bench --cold-heap``);
- ``RETAIN_BENCH_BUDGET``: seconds per benchmark, which sets the number of rounds (default 2);
- ``RETAIN_BENCH_MAX_CALL_S``: skip an implementation whose first call takes longer (default 10).
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("pytest_benchmark")

from retain.bench import harness, machine, registry  # noqa: E402

SIZE = os.environ.get("RETAIN_BENCH_SIZE", "default")
DEVICE = os.environ.get("RETAIN_BENCH_DEVICE", "cpu")
BUDGET_S = float(os.environ.get("RETAIN_BENCH_BUDGET", "2"))
MAX_CALL_S = float(os.environ.get("RETAIN_BENCH_MAX_CALL_S", "10"))


def pytest_configure(config):
    if os.environ.get("RETAIN_BENCH_COLD_HEAP", "") not in ("1", "true", "yes"):
        machine.warm_heap()


_INPUTS: dict = {}
_EXPECTED: dict = {}


def _inputs(case, params):
    key = (case.name, SIZE, DEVICE)
    if key not in _INPUTS:
        _INPUTS.clear()  # one op's inputs at a time
        _EXPECTED.clear()
        _INPUTS[key] = case.make_inputs(params, DEVICE)
    return _INPUTS[key]


def _expected(case, params, inputs, direction):
    key = (case.name, SIZE, DEVICE, direction)
    if key not in _EXPECTED:
        _, _, _EXPECTED[key] = harness.warm_up(case, case.reference, direction, inputs, params, DEVICE)
    return _EXPECTED[key]


@pytest.fixture
def run_bench(benchmark):
    """``run_bench(op, impl, direction)``: warm up (timed, checked against the reference), then let
    pytest-benchmark time the call for about ``RETAIN_BENCH_BUDGET`` seconds."""

    def run(op: str, impl: str, direction: str) -> None:
        if DEVICE == "cuda":
            import torch

            if not torch.cuda.is_available():
                pytest.skip("RETAIN_BENCH_DEVICE=cuda but no GPU")
        case = registry.REGISTRY[op]
        params = case.sizes[SIZE]
        inputs = _inputs(case, params)
        expected = None if impl == case.reference else _expected(case, params, inputs, direction)
        try:
            fn, warm, _ = harness.warm_up(case, impl, direction, inputs, params, DEVICE, expected)
        except (ImportError, harness.Unsupported) as exc:
            pytest.skip(harness.status_of(exc))
        if warm > MAX_CALL_S:
            pytest.skip(f"first call took {warm:.1f} s (> RETAIN_BENCH_MAX_CALL_S={MAX_CALL_S:g})")
        first = harness.time_calls(fn, DEVICE, reps=1, budget_s=0, min_reps=1)[0]
        rounds = max(3, min(100, int(BUDGET_S / max(first, 1e-9))))
        benchmark.group = f"{op} {case.describe(params)} {DEVICE} {direction}"
        benchmark.extra_info.update(warmup_s=warm, impl=impl, direction=direction, note=case.impls[impl].note)
        if DEVICE == "cuda":
            import torch

            def target():
                fn()
                torch.cuda.synchronize()
        else:
            target = fn
        benchmark.pedantic(target, rounds=rounds, iterations=1, warmup_rounds=0)
        if direction in case.bytes_model and benchmark.stats is not None:
            median = benchmark.stats.stats.median
            benchmark.extra_info["GB/s"] = round(case.bytes_model[direction](params) / median / 1e9, 2)

    return run
