"""Shared test helpers: the one tolerance table and the one comparison every test uses."""

from __future__ import annotations

import re

import pytest
import torch

import retain

# (rtol, atol) per dtype of the tensors compared. Kernels compute bfloat16/float16 in float32
# and round on store, so their error is a few units in the last place of the storage dtype.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (3e-2, 1e-2),
    torch.float16: (4e-3, 1e-3),
}

KERNEL_DTYPES = list(TOLERANCES)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, msg: str = "") -> None:
    """Compare with the tolerance of ``expected``'s dtype (actual is cast to it); NaN never equals NaN."""
    rtol, atol = TOLERANCES[expected.dtype]
    torch.testing.assert_close(
        actual.to(expected.dtype).cpu(), expected.cpu(), rtol=rtol, atol=atol, equal_nan=False,
        msg=(lambda m: f"{msg}\n{m}") if msg else None,
    )


def cuda_kernels_usable() -> bool:
    return torch.cuda.is_available() and "cuda" in retain.capabilities()["kernels"].get("linear_recurrence", [])


DEVICES = ["cpu", "cuda"] if cuda_kernels_usable() else ["cpu"]


def assert_bad_input(op: str, call, base: dict, case) -> None:
    """``case`` = (id, argument overrides, exception type, message pattern): ``call(**base)`` with
    the overrides raises that exception, its message starting with the op's name."""
    _, over, exc, pattern = case
    with pytest.raises(exc, match=re.escape(op) + ": " + pattern):
        call(**{**base, **over})
