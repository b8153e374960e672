"""retain.ops.segment_mean: whole-segment and causal means against loops, T not a multiple of L,
gradients (to second order: plain PyTorch), bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from retain.ops import segment_mean
from tests.helpers import assert_close


@given(T=st.integers(1, 20), L=st.integers(1, 8), seed=st.integers(0, 1000))
def test_means_equal_loops(T, L, seed):
    x = torch.randn(2, T, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    whole = torch.stack([x[:, i:i + L].mean(1) for i in range(0, T, L)], 1)
    causal = torch.stack([x[:, (t // L) * L:t + 1].mean(1) for t in range(T)], 1)
    assert_close(segment_mean(x, L), whole)
    assert_close(segment_mean(x, L, causal=True), causal)


def test_causal_means_see_no_later_token():
    x = torch.randn(1, 9, 4, dtype=torch.float64)
    y = x.clone()
    y[:, 5:] += 1.0
    a, b = segment_mean(x, 4, causal=True), segment_mean(y, 4, causal=True)
    assert torch.equal(a[:, :5], b[:, :5]) and not torch.equal(a[:, 5:], b[:, 5:])


def test_gradients_to_second_order():
    x = torch.randn(2, 7, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: segment_mean(t, 3, causal=True), (x,))
    assert torch.autograd.gradgradcheck(lambda t: segment_mean(t, 3).square(), (x,))


@pytest.mark.parametrize("kwargs,exc,pattern", [
    (dict(x=torch.zeros(4)), ValueError, r"x must have at least 2 dimensions"),
    (dict(x=torch.zeros(2, 4, dtype=torch.long)), TypeError, r"x must be a floating tensor, got int64"),
    (dict(segment_len=0), ValueError, r"segment_len must be an int >= 1, got 0"),
    (dict(segment_len=2.0), ValueError, r"segment_len must be an int >= 1, got 2.0"),
    (dict(causal="yes"), TypeError, r"causal must be a bool, got str"),
])
def test_bad_input(kwargs, exc, pattern):
    args = dict(x=torch.zeros(2, 4), segment_len=2, causal=False) | kwargs
    with pytest.raises(exc, match=r"retain.ops.segment_mean: " + pattern):
        segment_mean(args["x"], args["segment_len"], causal=args["causal"])
