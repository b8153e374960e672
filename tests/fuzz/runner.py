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


def classify(where: str, arg: str, call, kwargs: dict, had_nan: bool, written=()) -> str:
    try:
        out = call(**kwargs)
    except CLEAR as e:
        msg = str(e)
        if msg.startswith(where) and arg.split("[")[0] in msg and "got" in msg:
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


def main(names) -> int:
    warnings.simplefilter("ignore")
    failures = 0
    for name in names:
        call, valid, args = OPS[name] if name in OPS else STRATEGIES[name]
        where = f"retain.ops.{name}" if name in OPS else f"retain.cl.{name}"
        for arg in args:
            for what, value in variants(valid()[arg]):
                print(f"case {name} {arg}={what}", end=" ", flush=True)
                verdict = classify(where, arg, call, {**valid(), arg: value}, _has_nan(value), WRITTEN.get(name, ()))
                failures += verdict.startswith("FAIL")
                print(verdict, flush=True)
    return failures


if __name__ == "__main__":
    sys.exit(1 if main(sys.argv[1:] or [*OPS, *STRATEGIES]) else 0)
