"""Runs every fuzz case of tests/fuzz/cases.py in this process and prints one line a case:
``ok``, ``clear`` or ``FAIL <why>``. Each case is printed (flushed) before it runs, so the last
line of a child that crashed names the crashing case."""

from __future__ import annotations

import sys
import warnings

import torch

from tests.fuzz.cases import EDGE_NUMBERS, OPS, WRONG_KIND, tensor_variants

CLEAR = (TypeError, ValueError)


def classify(op: str, arg: str, call, kwargs: dict, had_nan: bool) -> str:
    try:
        out = call(**kwargs)
    except CLEAR as e:
        msg = str(e)
        if msg.startswith(f"retain.ops.{op}:") and arg.split("[")[0] in msg and "got" in msg:
            return "clear"
        return f"FAIL unclear {type(e).__name__}: {msg[:160]}"
    except Exception as e:  # noqa: BLE001  (anything else is the finding)
        return f"FAIL {type(e).__name__}: {str(e)[:160]}"
    if isinstance(out, torch.Tensor) and out.is_floating_point() and out.device.type != "meta":
        if had_nan and not out.isnan().any():
            return "FAIL NaN in, no NaN out"
    return "ok"


def main(names) -> int:
    warnings.simplefilter("ignore")
    failures = 0
    for op in names:
        call, valid, args = OPS[op]
        for arg in args:
            base = valid()
            values = ([(repr(v), v) for v in WRONG_KIND + EDGE_NUMBERS] if not isinstance(base[arg], torch.Tensor)
                      else list(tensor_variants(base[arg])) + [(repr(v), v) for v in WRONG_KIND])
            for what, value in values:
                print(f"case {op} {arg}={what}", end=" ", flush=True)
                kwargs = {**valid(), arg: value}
                had_nan = isinstance(value, torch.Tensor) and value.is_floating_point() and \
                    value.device.type != "meta" and bool(value.isnan().any())
                verdict = classify(op, arg, call, kwargs, had_nan)
                failures += verdict.startswith("FAIL")
                print(verdict, flush=True)
    return failures


if __name__ == "__main__":
    sys.exit(1 if main(sys.argv[1:] or list(OPS)) else 0)
