"""Runs the fuzz cases of tests/fuzz/cases.py for the named ops or strategies in this process and
prints one line a case: ``ok``, ``clear`` or ``FAIL <why>``. Each case is printed (flushed) before it
runs, so the last line of a child that crashed names the crashing case."""

from __future__ import annotations

import sys
import warnings

import torch

from tests.fuzz.cases import EDGE_NUMBERS, OPS, STRATEGIES, WRITTEN, WRONG_KIND, list_variants, tensor_variants

CLEAR = (TypeError, ValueError, IndexError)


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)


def _has_nan(x) -> bool:
    return any(t.is_floating_point() and t.device.type != "meta" and bool(t.isnan().any()) for t in _tensors(x))


def classify(where: str, args, call, kwargs: dict, had_nan: bool, written=()) -> str:
    """The verdict of ``call(**kwargs)``: an error must name ``where`` and one of ``args``."""
    try:
        out = call(**kwargs)
    except CLEAR as e:
        msg = str(e)
        if msg.startswith(where) and any(a in msg for a in args) and "got" in msg:
            return "clear"
        return f"FAIL unclear {type(e).__name__}: {msg[:160]}"
    except Exception as e:  # noqa: BLE001  (anything else is the finding)
        return f"FAIL {type(e).__name__}: {str(e)[:160]}"
    if had_nan and not _has_nan([out, *(kwargs[w] for w in written)]):
        return "FAIL NaN in, no NaN out"
    return "ok"


def variants(value):
    if isinstance(value, torch.Tensor):
        return list(tensor_variants(value)) + [(repr(v), v) for v in WRONG_KIND]
    if isinstance(value, list) and value and all(isinstance(t, torch.Tensor) for t in value):
        return list(list_variants(value)) + [(repr(v), v) for v in WRONG_KIND if not isinstance(v, list)]
    return [(repr(v), v) for v in WRONG_KIND + EDGE_NUMBERS]


def _case(name: str, changes: dict) -> bool:
    """One call of ``name`` with ``changes`` ({arg: (what, value)}) over its valid arguments; prints
    its verdict. An error must name one of the changed arguments. Returns whether it failed."""
    call, valid, _ = OPS[name] if name in OPS else STRATEGIES[name]
    where = f"retain.ops.{name}" if name in OPS else f"retain.cl.{name}"
    print(f"case {name} " + "+".join(f"{a}={w}" for a, (w, _) in changes.items()), end=" ", flush=True)
    kwargs = {**valid(), **{a: v for a, (_, v) in changes.items()}}
    had_nan = any(_has_nan(v) for _, v in changes.values())
    verdict = classify(where, list(changes), call, kwargs, had_nan, WRITTEN.get(name, ()))
    print(verdict, flush=True)
    return verdict.startswith("FAIL")


def _pairs(name: str, examples: int) -> int:
    """Two bad or edge arguments at once, drawn by hypothesis (derandomized: the same cases every run)."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    _, valid, args = OPS[name] if name in OPS else STRATEGIES[name]
    counts = {a: len(variants(valid()[a])) for a in args}
    failures = []

    @settings(max_examples=examples, derandomize=True, database=None, deadline=None)
    @given(st.data())
    def run(data):
        a, b = data.draw(st.lists(st.sampled_from(args), min_size=2, max_size=2, unique=True)) if len(args) > 1 \
            else (args[0], None)
        changes = {}
        for arg in (a, b) if b else (a,):
            changes[arg] = variants(valid()[arg])[data.draw(st.integers(0, counts[arg] - 1))]
        failures.append(_case(name, changes))

    run()
    return sum(failures)


def main(names, pairs: int = 40) -> int:
    warnings.simplefilter("ignore")
    failures = 0
    for name in names:
        _, valid, args = OPS[name] if name in OPS else STRATEGIES[name]
        for arg in args:
            for i in range(len(variants(valid()[arg]))):
                failures += _case(name, {arg: variants(valid()[arg])[i]})
        failures += _pairs(name, pairs)
    return failures


if __name__ == "__main__":
    sys.exit(1 if main(sys.argv[1:] or [*OPS, *STRATEGIES]) else 0)
