"""retain.ops.rank1_coefficient (kernel retain::rank1_dots): against the reference for every dtype
pair and the chunk boundaries, the closed form on collinear gradients (c*·μμᵀ is then the dense
empirical Fisher), gradients, bad input."""

from __future__ import annotations

import pytest
import torch

import retain
from retain.ops.fisher import reference as ref
from retain.ops.fisher.rank1_coefficient import rank1_dots_op
from tests.helpers import assert_close
from tests.ops.fisher.lists import BOUNDARY_SHAPES, DATA_DTYPES, F64, STATE_DTYPES, randn_list

pytestmark = pytest.mark.usefixtures("cpu_capability")


@pytest.mark.parametrize("state_dtype", STATE_DTYPES)
@pytest.mark.parametrize("data_dtype", DATA_DTYPES)
def test_rank1_coefficient_matches_the_reference(data_dtype, state_dtype):
    mu = randn_list(BOUNDARY_SHAPES, state_dtype, seed=1)
    g = randn_list(BOUNDARY_SHAPES, data_dtype, seed=2, samples=3)
    got = retain.ops.rank1_coefficient(mu, g)
    assert got.dtype == F64 and got.shape == ()
    # the dots are summed in float32 within blocks of 256 for float32 state: a relative error of a
    # few float32 ulp on each dot
    want = ref.rank1_coefficient_ref(mu, g)
    assert_close(got.to(state_dtype), want.to(state_dtype))


def test_closed_form_on_collinear_gradients():
    # g_s = a_s u: μ = ā u, so c* = E[(μᵀg)²] / ‖μ‖⁴ = E[a²] / ā², and c*·μμᵀ is exactly the dense
    # empirical Fisher E[g gᵀ] = E[a²] u uᵀ
    u = randn_list([(4, 3), (5,), ()], seed=3)
    a = torch.tensor([0.5, 2.0, -1.0, 3.0], dtype=F64)
    grads = [a.reshape(-1, *([1] * t.dim())) * t for t in u]
    mu = [g.mean(0) for g in grads]
    norm4 = retain.ops.rank1_coefficient(mu, mu)  # μ as its own single sample: ‖μ‖⁴
    assert_close(norm4, sum(m.square().sum() for m in mu).square())
    c = retain.ops.rank1_coefficient(mu, grads) / len(a) / norm4
    assert_close(c, a.square().mean() / a.mean().square())
    flat_mu = torch.cat([m.reshape(-1) for m in mu])
    flat_g = torch.cat([g.reshape(len(a), -1) for g in grads], dim=1)
    assert_close(c * torch.outer(flat_mu, flat_mu), flat_g.T @ flat_g / len(a))


def test_single_gradients_and_no_samples():
    mu = [torch.tensor([1.0, 2.0])]
    assert retain.ops.rank1_coefficient(mu, [torch.tensor([3.0, 1.0])]).item() == 25.0
    assert retain.ops.rank1_coefficient(mu, [torch.zeros(0, 2)]).item() == 0.0


def test_the_projections_are_differentiable():
    mu = [t.requires_grad_() for t in randn_list([(3, 2), ()], seed=4)]
    g = [t.requires_grad_() for t in randn_list([(3, 2), ()], seed=5, samples=4)]
    torch.autograd.gradcheck(lambda *ts: rank1_dots_op(list(ts[:2]), list(ts[2:]), 4), (*mu, *g))
    torch.autograd.gradgradcheck(lambda *ts: retain.ops.rank1_coefficient(list(ts[:2]), list(ts[2:])), (*mu, *g))


def test_bad_input_names_the_op_and_argument():
    with pytest.raises(ValueError, match=r"retain\.ops\.rank1_coefficient: grads\[0\] must have mu\[0\]'s shape"):
        retain.ops.rank1_coefficient([torch.zeros(3)], [torch.zeros(2, 4)])
    with pytest.raises(TypeError, match=r"retain\.ops\.rank1_coefficient: mu\[0\] must be float32 or float64"):
        retain.ops.rank1_coefficient([torch.zeros(3, dtype=torch.float16)], [torch.zeros(3)])
