"""retain.ops.gather_rows and scatter_rows_: every dtype and row size (rows split into column
blocks past 4 KiB), -1 skipping a row, the last of repeated indices winning, empty batches, bad
input. The contract (tests/ops/test_contract.py) adds opcheck, compile, threads and the fallback."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from retain.ops import gather_rows, scatter_rows_
from retain.ops.replay import reference as ref
from tests.helpers import DEVICES, assert_bad_input, assert_close

pytestmark = pytest.mark.usefixtures("cpu_capability")

ROW_SHAPES = [(), (3,), (5, 7), (3, 32, 32), (2, 1100)]  # 1 element ... 12 KiB rows; 2 x 1100 spans 3 blocks
DTYPES = [torch.uint8, torch.int64, torch.float32, torch.bfloat16, torch.float64, torch.bool]


def _fields(cap, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape, dtype in zip(ROW_SHAPES + ROW_SHAPES[:1], DTYPES):
        x = torch.randint(0, 200, (cap, *shape), generator=g)
        out.append((x % 2 == 0) if dtype == torch.bool else x.to(dtype))
    return [f.to(device) for f in out]


@pytest.mark.parametrize("device", DEVICES)
def test_gather_equals_index_select(device):
    fields = _fields(37, device)
    idx = torch.tensor([36, 0, 5, 5, 17, 0], device=device)
    for got, want in zip(gather_rows(fields, idx), ref.gather_rows_ref(fields, idx)):
        assert got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_scatter_skips_minus_one_and_the_last_repeat_wins(device):
    fields = _fields(11, device)
    values = _fields(6, device, seed=1)
    idx = torch.tensor([3, -1, 3, 10, 0, 3], device=device)
    want = ref.scatter_rows_ref(fields, idx, values)
    out = scatter_rows_([f.clone() for f in fields], idx, values)
    for got, w in zip(out, want):
        assert torch.equal(got, w)
    assert torch.equal(out[2][3], values[2][5])  # the last of the three writes to slot 3


@given(cap=st.integers(1, 20), k=st.integers(0, 30), seed=st.integers(0, 2**31))
def test_random_scatter_then_gather(cap, k, seed):
    g = torch.Generator().manual_seed(seed)
    fields = _fields(cap, seed=seed)
    idx = torch.randint(-1, cap, (k,), generator=g)
    values = _fields(k, seed=seed + 1) if k else [f[:0] for f in fields]
    want = ref.scatter_rows_ref(fields, idx, values)
    got = scatter_rows_([f.clone() for f in fields], idx, values)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    gi = torch.randint(0, cap, (k,), generator=g)
    assert all(torch.equal(a, b) for a, b in zip(gather_rows(got, gi), ref.gather_rows_ref(got, gi)))


def test_gather_gradients_add_up_at_repeated_indices_to_any_order():
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    y = torch.arange(5)
    idx = torch.tensor([4, 1, 4])
    gx, gy = gather_rows([x, y], idx)
    w = torch.randn(3, 3, dtype=torch.float64)
    (g,) = torch.autograd.grad((gx ** 3 * w).sum(), x, create_graph=True)
    xr = x.detach().clone().requires_grad_()
    (gr,) = torch.autograd.grad((xr.index_select(0, idx) ** 3 * w).sum(), xr, create_graph=True)
    assert_close(g, gr)
    assert_close(torch.autograd.grad(g.square().sum(), x)[0], torch.autograd.grad(gr.square().sum(), xr)[0])
    assert gy.dtype == torch.int64 and not gy.requires_grad


def test_empty_index_and_zero_capacity_rows():
    fields = _fields(4)
    assert [o.shape[0] for o in gather_rows(fields, torch.zeros(0, dtype=torch.long))] == [0] * len(fields)
    scatter_rows_(fields, torch.zeros(0, dtype=torch.long), [f[:0] for f in fields])
    empty = torch.zeros(0, 3)
    assert gather_rows([empty], torch.zeros(0, dtype=torch.long))[0].shape == (0, 3)


_X, _Y = torch.zeros(4, 2), torch.zeros(4, dtype=torch.long)


@pytest.mark.parametrize("case", [
    ("fields type", dict(fields=_X), TypeError, r"fields must be a list of tensors \(one per parameter\), got a single"),
    ("empty fields", dict(fields=[]), ValueError, r"fields must hold at least one tensor"),
    ("scalar field", dict(fields=[torch.tensor(1.0)]), ValueError, r"fields\[0\] must have a first \(row\) dimension"),
    ("rows differ", dict(fields=[_X, torch.zeros(5)]), ValueError, r"every field must have the rows of fields\[0\] \(4\), got 5 for fields\[1\]"),
    ("float index", dict(index=torch.tensor([0.0])), TypeError, r"index must be an integer tensor, got float32"),
    ("2-d index", dict(index=torch.zeros(1, 1, dtype=torch.long)), ValueError, r"index must have 1 dimensions"),
    ("out of range", dict(index=torch.tensor([4])), IndexError, r"index must be in \[0, 4\) \(the fields' rows\), got 4"),
    ("negative", dict(index=torch.tensor([-1])), IndexError, r"index must be in \[0, 4\) \(the fields' rows\), got -1"),
    ("device", dict(fields=[_X.to("meta")]), ValueError, r"fields\[0\] must be on index's device cpu, got meta"),
], ids=lambda c: c[0] if isinstance(c, tuple) else None)
def test_gather_bad_input(case):
    assert_bad_input("retain.ops.gather_rows", gather_rows, dict(fields=[_X, _Y], index=torch.tensor([0, 3])), case)


@pytest.mark.parametrize("case", [
    ("values count", dict(values=[torch.zeros(2, 2)]), ValueError, r"values must have one tensor per tensor of fields \(2\), got 1"),
    ("values shape", dict(values=[torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)]), ValueError,
     r"values\[0\] must have shape \(2, 2\) \(index's length, then fields\[0\]'s row\), got \(2, 3\)"),
    ("values dtype", dict(values=[torch.zeros(2, 2, dtype=torch.float64), torch.zeros(2, dtype=torch.long)]), TypeError,
     r"values\[0\] must have fields\[0\]'s dtype float32, got float64"),
    ("out of range", dict(index=torch.tensor([0, 4])), IndexError, r"index must be in \[-1, 4\) \(the fields' rows\), got 4"),
    ("below -1", dict(index=torch.tensor([0, -2])), IndexError, r"index must be in \[-1, 4\) \(the fields' rows\), got -2"),
    ("non-contiguous", dict(fields=[torch.zeros(2, 4).t(), _Y]), ValueError, r"fields\[0\] must be contiguous \(it is written in place\)"),
], ids=lambda c: c[0] if isinstance(c, tuple) else None)
def test_scatter_bad_input(case):
    base = dict(fields=[_X.clone(), _Y.clone()], index=torch.tensor([0, 3]),
                values=[torch.ones(2, 2), torch.ones(2, dtype=torch.long)])
    assert_bad_input("retain.ops.scatter_rows_", scatter_rows_, base, case)
