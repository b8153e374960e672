"""retain.ops.linear_recurrence: kernel vs reference (forward and every gradient), closed forms,
opcheck, torch.compile, hypothesis over shapes and gate values, bad input."""

from __future__ import annotations

import importlib
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from retain import _native
from retain.ops import linear_recurrence
from retain.ops.scan.reference import linear_recurrence_ref
from tests.helpers import DEVICES, KERNEL_DTYPES, assert_close

_ops = importlib.import_module("retain.ops.scan.linear_recurrence")  # the package re-exports the function

# Kernel tests: each runs under every CPU capability this machine supports (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("cpu_capability")

OP = "retain.ops.linear_recurrence"


def make_inputs(shape, dtype=torch.float64, device="cpu", *, initial=True, gate="uniform", seed=0):
    """Gates in [0, 1) (or fixed at 0 / 1), inputs N(0, 1), optional initial state; all leaf tensors
    that require grad, created in float64 and rounded to ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    if gate == "uniform":
        a = torch.rand(shape, generator=g, dtype=torch.float64)
    else:
        a = torch.full(shape, float(gate), dtype=torch.float64)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    h0 = torch.randn((shape[0], *shape[2:]), generator=g, dtype=torch.float64) if initial else None
    leaf = lambda t: None if t is None else t.to(dtype=dtype, device=device).requires_grad_()  # noqa: E731
    return leaf(a), leaf(x), leaf(h0)


def check_against_reference(a, x, h0, reverse, seed=1):
    """Forward and the gradients of a, x and initial, kernel vs reference from the same inputs."""
    h = linear_recurrence(a, x, initial=h0, reverse=reverse)
    h_ref = linear_recurrence_ref(a, x, initial=h0, reverse=reverse)
    assert h.shape == x.shape and h.dtype == x.dtype and h.device == x.device
    assert_close(h, h_ref)
    if h.numel() == 0:
        return
    grad = torch.randn(h.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    grad = grad.to(dtype=h.dtype, device=h.device)
    inputs = [t for t in (a, x, h0) if t is not None]
    got = torch.autograd.grad(h, inputs, grad)
    want = torch.autograd.grad(h_ref, inputs, grad)
    for name, g_got, g_want in zip(("a", "x", "initial"), got, want):
        assert_close(g_got, g_want, msg=f"gradient of {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("with_initial", [False, True])
def test_linear_recurrence_matches_reference(device, dtype, reverse, with_initial):
    a, x, h0 = make_inputs((3, 37, 5, 7), dtype, device, initial=with_initial)
    check_against_reference(a, x, h0, reverse)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("D", [1, 15, 63, 64, 65, 1023, 1024, 1025, 2049])
@pytest.mark.parametrize("B", [1, 5])
def test_linear_recurrence_feature_block_boundaries(device, D, B):
    # The CPU kernel splits features into blocks of 64..1024 depending on B and the thread count.
    a, x, h0 = make_inputs((B, 9, D), torch.float32, device)
    check_against_reference(a, x, h0, reverse=False)


def test_linear_recurrence_gradcheck_float64():
    a, x, h0 = make_inputs((2, 6, 3), torch.float64)
    for reverse in (False, True):
        assert torch.autograd.gradcheck(lambda a, x, h0: linear_recurrence(a, x, initial=h0, reverse=reverse),
                                        (a, x, h0))


@pytest.mark.parametrize("threads", [1, 2])
def test_linear_recurrence_same_bits_for_any_thread_count(threads):
    a, x, h0 = make_inputs((3, 50, 300), torch.float32, initial=True)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        h1 = linear_recurrence(a, x, initial=h0)
        torch.set_num_threads(threads)
        h2 = linear_recurrence(a, x, initial=h0)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(h1, h2)


def test_linear_recurrence_closed_forms():
    a, x, h0 = make_inputs((2, 20, 4), torch.float64, gate=1.0)
    # a = 1: a running sum from the initial state
    assert_close(linear_recurrence(a, x, initial=h0), h0.unsqueeze(1) + x.cumsum(1))
    assert_close(linear_recurrence(a, x, reverse=True), x.flip(1).cumsum(1).flip(1))
    # a = 0: no memory at all
    assert_close(linear_recurrence(torch.zeros_like(a), x, initial=h0), x)
    # constant decay c, a single impulse at t = 0: h_t = c^t
    c = 0.9
    impulse = torch.zeros(1, 12, 1, dtype=torch.float64)
    impulse[0, 0, 0] = 1.0
    h = linear_recurrence(torch.full_like(impulse, c), impulse)
    assert_close(h[0, :, 0], c ** torch.arange(12, dtype=torch.float64))


def test_linear_recurrence_gradient_closed_form():
    # h_t = a h_{t-1} + x_t with constant a: dh_{T-1}/dx_t = a^(T-1-t), dh_{T-1}/dinitial = a^T.
    T, c = 7, 0.5
    a, x, h0 = make_inputs((1, T, 1), torch.float64, gate=c)
    h = linear_recurrence(a, x, initial=h0)
    gx, gh0 = torch.autograd.grad(h[0, -1, 0], (x, h0))
    assert_close(gx[0, :, 0], c ** torch.arange(T - 1, -1, -1, dtype=torch.float64))
    assert_close(gh0[0, 0], torch.tensor(c**T, dtype=torch.float64))


@given(
    B=st.integers(1, 3),
    T=st.sampled_from([1, 2, 3, 17, 63, 64, 65, 130]),
    feature_shape=st.sampled_from([(), (1,), (3,), (2, 5), (63,), (65,), (4, 33)]),
    gate=st.sampled_from(["uniform", 0.0, 1.0]),
    reverse=st.booleans(),
    with_initial=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_linear_recurrence_hypothesis_float64(B, T, feature_shape, gate, reverse, with_initial, seed):
    a, x, h0 = make_inputs((B, T, *feature_shape), torch.float64, initial=with_initial, gate=gate, seed=seed)
    check_against_reference(a, x, h0, reverse, seed=seed + 1)


@given(
    shape=st.sampled_from([(1, 1, 1), (2, 65, 3), (1, 33, 130)]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    reverse=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_linear_recurrence_hypothesis_low_precision(shape, dtype, reverse, seed):
    a, x, h0 = make_inputs(shape, dtype, initial=True, seed=seed)
    check_against_reference(a, x, h0, reverse, seed=seed + 1)


def test_linear_recurrence_non_contiguous_inputs():
    base_a, base_x, _ = make_inputs((4, 6, 10), torch.float64)
    a = base_a.transpose(0, 2)[:, :, ::2]  # [10, 6, 2], strided
    x = base_x.transpose(0, 2)[:, :, ::2]
    h0 = torch.randn(4, 10, dtype=torch.float64).t()[:, ::2].requires_grad_()  # [10, 2], strided
    assert not a.is_contiguous() and not x.is_contiguous() and not h0.is_contiguous()
    check_against_reference(a, x, h0, reverse=False)
    # broadcast gate through expand, the documented way to share a gate over features
    gate = torch.rand(4, 6, 1, dtype=torch.float64, requires_grad=True)
    h = linear_recurrence(gate.expand(4, 6, 10), base_x)
    h_ref = linear_recurrence_ref(gate.expand(4, 6, 10), base_x)
    assert_close(h, h_ref)
    assert_close(torch.autograd.grad(h.sum(), gate)[0], torch.autograd.grad(h_ref.sum(), gate)[0])


@pytest.mark.parametrize("shape", [(2, 0, 3), (0, 4, 3), (2, 4, 0)])
def test_linear_recurrence_empty(shape):
    a, x, h0 = make_inputs(shape, torch.float64)
    h = linear_recurrence(a, x, initial=h0)
    assert h.shape == shape
    ga, gx, gh0 = torch.autograd.grad(h.sum(), (a, x, h0), allow_unused=True)
    for g, t in ((ga, a), (gx, x), (gh0, h0)):
        assert g is None or (g.shape == t.shape and not g.isnan().any() and (g == 0).all())


def test_linear_recurrence_nan_propagates_only_forward_in_time():
    a, x, _ = make_inputs((1, 6, 3), torch.float64, initial=False)
    x = x.detach().clone()
    x[0, 2, 1] = float("nan")
    h = linear_recurrence(a.detach(), x)
    assert not h[0, :2].isnan().any()  # before the NaN
    assert h[0, 2:, 1].isnan().all()  # its lane from then on
    assert not h[0, :, 0].isnan().any() and not h[0, :, 2].isnan().any()  # other lanes untouched
    x[0, 2, 1] = float("inf")
    assert torch.isinf(linear_recurrence(torch.ones_like(x), x)[0, 2:, 1]).all()


def test_poisoned_outputs_are_really_poisoned():
    # The autouse fixture must make fresh outputs NaN, otherwise the suite's unwritten-element
    # checks prove nothing.
    assert _native.poison_outputs
    assert _native.empty_like(torch.zeros(3)).isnan().all()


@pytest.mark.parametrize("with_initial", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_linear_recurrence_opcheck(dtype, reverse, with_initial):
    a, x, h0 = make_inputs((2, 5, 3), dtype, initial=with_initial)
    torch.library.opcheck(_ops.linear_recurrence_op, (a, x, h0, reverse))
    h = _ops.linear_recurrence_op(a, x, h0, reverse)
    grad = torch.randn_like(h)
    torch.library.opcheck(_ops.linear_recurrence_backward_op, (grad, a.detach(), h.detach(),
                                                                None if h0 is None else h0.detach(), reverse, True))


def test_linear_recurrence_torch_compile_fullgraph():
    torch._dynamo.reset()

    def model(a_logit, x, h0):
        h = linear_recurrence(torch.sigmoid(a_logit), x * 2.0, initial=h0)
        return (h * h).mean()

    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    a, x, h0 = make_inputs((2, 16, 8), torch.float32)
    got = compiled(a, x, h0)
    want = model(a, x, h0)
    assert_close(got, want)
    grads_got = torch.autograd.grad(got, (a, x, h0))
    grads_want = torch.autograd.grad(want, (a, x, h0))
    for g_got, g_want in zip(grads_got, grads_want):
        assert_close(g_got, g_want)


def test_linear_recurrence_torch_export():
    class Scan(torch.nn.Module):
        def forward(self, a, x):
            return linear_recurrence(a, x, reverse=True)

    a, x, _ = make_inputs((2, 5, 3), torch.float32, initial=False)
    exported = torch.export.export(Scan(), (a.detach(), x.detach()))
    assert "retain.linear_recurrence" in str(exported.graph)
    assert_close(exported.module()(a.detach(), x.detach()), linear_recurrence_ref(a, x, reverse=True))


BAD_INPUTS = [
    # (description, kwargs builder, exception, message pattern)
    ("1-D x", lambda a, x: dict(a=a[0, 0], x=x[0, 0]), ValueError, "x must have at least 2 dimensions"),
    ("shape mismatch", lambda a, x: dict(a=a[:, :-1], x=x), ValueError, r"a must have shape \(2, 5, 3\)"),
    ("integer x", lambda a, x: dict(a=a.long(), x=x.long()), TypeError, "x must be a floating tensor"),
    ("mixed dtypes", lambda a, x: dict(a=a.float(), x=x), TypeError, "a must have x's dtype float64, got float32"),
    ("mixed devices", lambda a, x: dict(a=a.to("meta"), x=x), ValueError, "a must be on x's device cpu, got meta"),
    ("not a tensor", lambda a, x: dict(a=a.tolist(), x=x), TypeError, "a must be a torch.Tensor, got list"),
    ("initial shape", lambda a, x: dict(a=a, x=x, initial=x[:, 0, :2]), ValueError,
     r"initial must have shape \(2, 3\).*got \(2, 2\)"),
    ("initial dtype", lambda a, x: dict(a=a, x=x, initial=x[:, 0].float()), TypeError,
     "initial must have x's dtype"),
    ("reverse type", lambda a, x: dict(a=a, x=x, reverse=1), TypeError, "reverse must be a bool, got int"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_linear_recurrence_bad_input(case):
    _, build, exc, pattern = case
    a, x, _ = make_inputs((2, 5, 3), torch.float64, initial=False)
    kwargs = build(a.detach(), x.detach())
    with pytest.raises(exc, match=re.escape(OP) + ": " + pattern):
        linear_recurrence(kwargs.pop("a"), kwargs.pop("x"), **kwargs)
