"""retain.ops.ewc_penalty and ewc_penalty_grad_: value and gradients against the dense quadratic
form ½·lam·Δᵀ(diag(F) + c·μμᵀ)Δ, every data × state dtype, chunk boundaries, hypothesis over
lists, anchors' gradient, .grad accumulation, torch.compile of a training step, bad input."""

from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import retain
from retain.ops.fisher import reference as ref
from tests.helpers import assert_bad_input, assert_close
from tests.ops.fisher.lists import BOUNDARY_SHAPES, DATA_DTYPES, F64, STATE_DTYPES, randn_list

pytestmark = pytest.mark.usefixtures("cpu_capability")


def make(shapes, data_dtype=F64, state_dtype=F64, seed=0):
    params = randn_list(shapes, data_dtype, seed=seed)
    anchors = [(p.to(F64) + t).to(data_dtype) for p, t in zip(params, randn_list(shapes, seed=seed + 1, scale=0.3))]
    diag = randn_list(shapes, state_dtype, seed=seed + 2, positive=True)
    mu = randn_list(shapes, state_dtype, seed=seed + 3)
    return params, anchors, diag, mu


def dense(params, anchors, diag, mu, c, lam):
    """The penalty and its gradient from the dense matrix diag(F) + c μμᵀ (float64)."""
    flat = lambda ts: torch.cat([t.to(F64).reshape(-1) for t in ts])  # noqa: E731
    d = flat(params) - flat(anchors)
    M = torch.zeros(d.numel(), d.numel(), dtype=F64)
    if diag is not None:
        M += torch.diag(flat(diag))
    if mu is not None:
        M += c * torch.outer(flat(mu), flat(mu))
    value = lam / 2 * d @ M @ d
    grad = lam * M @ d
    sizes = [p.numel() for p in params]
    return value, [g.reshape(p.shape) for g, p in zip(grad.split(sizes), params)]


SMALL = [(3, 4), (), (0, 2), (5,)]


@pytest.mark.parametrize("kind", ["diag", "rank1", "both"])
def test_value_and_gradient_equal_the_dense_quadratic_form(kind):
    params, anchors, diag, mu = make(SMALL)
    kw = dict(diag=diag if kind != "rank1" else None, mu=mu if kind != "diag" else None,
              c=0.8 if kind != "diag" else None, lam=1.7)
    want_value, want_grads = dense(params, anchors, kw["diag"], kw["mu"], kw["c"] or 0.0, 1.7)
    leaves = [p.clone().requires_grad_() for p in params]
    value = retain.ops.ewc_penalty(leaves, anchors, **kw)
    assert value.dtype == F64
    assert_close(value, want_value)
    for a, b in zip(torch.autograd.grad(value, leaves), want_grads):
        assert_close(a, b)
    grads = [torch.full_like(p, 0.5) for p in params]
    value2 = retain.ops.ewc_penalty_grad_(params, anchors, **kw, grads=grads)
    assert_close(value2, want_value)
    for a, b in zip(grads, want_grads):
        assert_close(a, b + 0.5)  # added into what was there


@pytest.mark.parametrize("state_dtype", STATE_DTYPES)
@pytest.mark.parametrize("data_dtype", DATA_DTYPES)
def test_every_dtype_pair_at_the_chunk_boundaries(data_dtype, state_dtype):
    params, anchors, diag, mu = make(BOUNDARY_SHAPES, data_dtype, state_dtype)
    kw = dict(diag=diag, mu=mu, c=0.05, lam=0.9)
    leaves = [p.clone().requires_grad_() for p in params]
    value = retain.ops.ewc_penalty(leaves, anchors, **kw)
    want = ref.ewc_penalty_ref(params, anchors, **kw)
    # the sums are taken in the state dtype within blocks: compare at its precision
    assert_close(value.to(state_dtype), want.to(state_dtype))
    got_grads = torch.autograd.grad(value, leaves)
    want_grads = ref.ewc_penalty_grads_ref(params, anchors, **kw)
    for a, b in zip(got_grads, want_grads):
        assert a.dtype == data_dtype
        assert_close(a, b)
    grads = [torch.zeros_like(p) for p in params]
    assert_close(retain.ops.ewc_penalty_grad_(params, anchors, **kw, grads=grads).to(state_dtype), want.to(state_dtype))
    for a, b in zip(grads, want_grads):
        assert_close(a, b)


def test_anchors_get_the_negated_gradient_and_mixed_groups_add_up():
    params, anchors, diag, mu = make(SMALL)
    params = [params[0].float(), params[1], params[2].bfloat16(), params[3]]  # three dtype groups
    anchors = [a.to(p.dtype) for a, p in zip(anchors, params)]
    diag = [diag[0], diag[1], diag[2].float(), diag[3].float()]
    mu = [m.to(d.dtype) for m, d in zip(mu, diag)]
    p_leaves = [p.clone().requires_grad_() for p in params]
    a_leaves = [a.clone().requires_grad_() for a in anchors]
    value = retain.ops.ewc_penalty(p_leaves, a_leaves, diag=diag, mu=mu, c=1.5, lam=2.0)
    assert_close(value.float(), ref.ewc_penalty_ref(params, anchors, diag=diag, mu=mu, c=1.5, lam=2.0).float())
    gp = torch.autograd.grad(value, p_leaves + a_leaves)
    for a, b in zip(gp[:4], gp[4:]):
        assert torch.equal(a, -b)


def test_grad_form_starts_a_missing_grad_at_zero_and_adds_to_an_existing_one():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    v = torch.nn.Parameter(torch.tensor(3.0))
    v.grad = torch.tensor(10.0)
    value = retain.ops.ewc_penalty_grad_([w, v], [torch.zeros(2), torch.tensor(1.0)],
                                         diag=[torch.ones(2), torch.tensor(2.0)], lam=1.0)
    assert value.item() == pytest.approx((1 + 4 + 8) / 2)
    assert torch.equal(w.grad, torch.tensor([1.0, 2.0])) and v.grad.item() == 14.0


def test_nan_in_a_parameter_gives_a_nan_penalty():
    params, anchors, diag, mu = make(SMALL)
    params[3][1] = float("nan")
    assert torch.isnan(retain.ops.ewc_penalty(params, anchors, diag=diag))
    grads = [torch.zeros_like(p) for p in params]
    assert torch.isnan(retain.ops.ewc_penalty_grad_(params, anchors, mu=mu, c=1.0, grads=grads))
    assert all(torch.isnan(g).all() for g in grads if g.numel())  # μᵀΔ is NaN: every μ-term


def test_a_compiled_training_step_with_the_penalty():
    torch.manual_seed(0)
    # float64 throughout: a float32 model's loss rounds differently under inductor (CPU-dependent)
    # and would be compared at the float64 penalty's tolerance
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()
    params = list(model.parameters())
    anchors = [p.detach().clone() + 0.1 for p in params]
    diag = [torch.rand_like(p) for p in params]
    mu = [torch.randn_like(p) for p in params]
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)

    def loss_fn():
        loss = torch.nn.functional.mse_loss(model(x), y)
        return loss + retain.ops.ewc_penalty(params, anchors, diag=diag, mu=mu, c=0.3, lam=5.0)

    def step(fn):  # forward (compiled or not) and backward, as a training step runs them
        for p in params:
            p.grad = None
        loss = fn()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in params]

    torch._dynamo.reset()
    (l1, g1), (l2, g2) = step(loss_fn), step(torch.compile(loss_fn, fullgraph=True))
    assert_close(l2, l1)
    for a, b in zip(g2, g1):
        assert_close(a, b)


@settings(max_examples=30, deadline=None)
@given(shapes=st.lists(st.lists(st.integers(0, 4), max_size=3).map(tuple), min_size=1, max_size=4),
       kind=st.sampled_from(["diag", "rank1", "both"]), c=st.sampled_from([0.0, 1.0, 1e-8, 50.0]),
       lam=st.sampled_from([0.0, 1.0, 1e4]), seed=st.integers(0, 99))
def test_hypothesis_lists_of_shapes(shapes, kind, c, lam, seed):
    params, anchors, diag, mu = make(shapes, seed=seed)
    kw = dict(diag=diag if kind != "rank1" else None, mu=mu if kind != "diag" else None,
              c=c if kind != "diag" else None, lam=lam)
    want_value, want_grads = dense(params, anchors, kw["diag"], kw["mu"], kw["c"] or 0.0, lam)
    leaves = [p.clone().requires_grad_() for p in params]
    value = retain.ops.ewc_penalty(leaves, anchors, **kw)
    assert_close(value, want_value)
    for a, b in zip(torch.autograd.grad(value, leaves), want_grads):
        assert_close(a, b)


def _base():
    params, anchors, diag, mu = make([(3,), (2, 2)])
    return dict(params=params, anchors=anchors, diag=diag, mu=None, c=None)


BAD = [
    ("neither", dict(diag=None), ValueError, r"give diag \(the diagonal Fisher\), mu .* or both, got neither"),
    ("c without mu", dict(c=1.0), ValueError, r"c \(the rank-1 scale\) goes with mu: got mu=None and c=1.0"),
    ("mu without c", dict(mu=[torch.zeros(3, dtype=F64), torch.zeros(2, 2, dtype=F64)]), ValueError,
     r"c \(the rank-1 scale\) goes with mu"),
    ("anchors length", dict(anchors=[torch.zeros(3, dtype=F64)]), ValueError,
     r"anchors must have one tensor per tensor of params \(2\), got 1"),
    ("anchors dtype", dict(anchors=[torch.zeros(3), torch.zeros(2, 2)]), TypeError,
     r"anchors\[0\] must have params\[0\]'s dtype float64, got float32"),
    ("diag shape", dict(diag=[torch.zeros(3, dtype=F64), torch.zeros(4, dtype=F64)]), ValueError,
     r"diag\[1\] must have params\[1\]'s shape \(2, 2\), got \(4,\)"),
    ("diag dtype", dict(diag=[torch.zeros(3, dtype=torch.bfloat16), torch.zeros(2, 2)]), TypeError,
     r"diag\[0\] must be float32 or float64"),
    ("diag requires grad", dict(diag=[torch.zeros(3, dtype=F64, requires_grad=True), torch.zeros(2, 2, dtype=F64)]),
     ValueError, r"diag requires grad; the penalty is differentiated with respect to params and anchors only"),
    ("lam", dict(lam=float("inf")), ValueError, r"lam must be finite, got inf"),
    ("params type", dict(params=(1, 2)), TypeError, r"params must be a list of tensors, got a tuple holding int"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_is_an_error_naming_the_op_and_argument(case):
    assert_bad_input("retain.ops.ewc_penalty", lambda **kw: retain.ops.ewc_penalty(
        kw.pop("params"), kw.pop("anchors"), **kw), _base(), case)


def test_grad_form_bad_grads():
    params, anchors, diag, _ = make([(3,)])
    with pytest.raises(TypeError, match=r"retain\.ops\.ewc_penalty_grad_: grads\[0\] must have params\[0\]'s dtype"):
        retain.ops.ewc_penalty_grad_(params, anchors, diag=diag, grads=[torch.zeros(3)])
    with pytest.raises(ValueError, match=r"retain\.ops\.ewc_penalty_grad_: grads\[0\] must be contiguous"):
        retain.ops.ewc_penalty_grad_(params, anchors, diag=diag, grads=[torch.zeros(6, dtype=F64)[::2]])


def test_the_forward_computes_the_gradient_and_the_backward_hands_it_out(monkeypatch):
    # with parameters requiring grad the forward writes ∂P/∂θ in its passes (diagonal only: one
    # pass); the backward scales it by the incoming gradient instead of recomputing
    module = importlib.import_module("retain.ops.fisher.ewc_penalty")  # the package re-exports the function

    calls = []
    orig = module.ewc_penalty_backward_op
    monkeypatch.setattr(module, "ewc_penalty_backward_op", lambda *a: calls.append(1) or orig(*a))
    params, anchors, diag, mu = make(SMALL)
    for kw in (dict(diag=diag), dict(diag=diag, mu=mu, c=0.4), dict(mu=mu, c=0.4)):
        leaves = [p.clone().requires_grad_() for p in params]
        value = retain.ops.ewc_penalty(leaves, anchors, **kw, lam=1.5)
        got = torch.autograd.grad(2.5 * value, leaves)
        assert not calls
        want = ref.ewc_penalty_grads_ref(params, anchors, **kw, lam=1.5)
        for a, b in zip(got, want):
            assert_close(a, 2.5 * b)
    # building a graph of the backward recomputes through the backward op (which refuses a second
    # derivative by name)
    leaves = [p.clone().requires_grad_() for p in params]
    first = torch.autograd.grad(retain.ops.ewc_penalty(leaves, anchors, diag=diag), leaves, create_graph=True)
    assert calls and all(g.requires_grad for g in first)
