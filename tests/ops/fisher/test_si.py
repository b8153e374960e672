"""retain.ops.si_accumulate_ and si_consolidate_ (Synaptic Intelligence): against the reference
for every dtype pair and the chunk boundaries, SGD's path integral, consolidation with ξ, bad
input."""

from __future__ import annotations

import pytest
import torch

import retain
from retain.ops.fisher import reference as ref
from tests.helpers import assert_close
from tests.ops.fisher.lists import BOUNDARY_SHAPES, DATA_DTYPES, F64, STATE_DTYPES, clones, randn_list

pytestmark = pytest.mark.usefixtures("cpu_capability")


@pytest.mark.parametrize("state_dtype", STATE_DTYPES)
@pytest.mark.parametrize("data_dtype", DATA_DTYPES)
def test_si_ops_match_the_reference(data_dtype, state_dtype):
    omega = randn_list(BOUNDARY_SHAPES, state_dtype, seed=1)
    big = randn_list(BOUNDARY_SHAPES, state_dtype, seed=2, positive=True)
    grads = randn_list(BOUNDARY_SHAPES, data_dtype, seed=3)
    before = randn_list(BOUNDARY_SHAPES, data_dtype, seed=4)
    after = [(b.to(F64) + s).to(data_dtype) for b, s in zip(before, randn_list(BOUNDARY_SHAPES, seed=5, scale=0.1))]
    for a, b in zip(retain.ops.si_accumulate_(clones(omega), grads, before, after),
                    ref.si_accumulate_ref(omega, grads, before, after)):
        assert a.dtype == state_dtype
        assert_close(a, b)
    w = clones(omega)
    for a, b in zip(retain.ops.si_consolidate_(clones(big), w, after, before, xi=0.05),
                    ref.si_consolidate_ref(big, omega, after, before, xi=0.05)):
        assert_close(a, b)
    assert all((t == 0).all() for t in w)
    w = clones(omega)
    retain.ops.si_consolidate_(clones(big), w, after, before, reset=False)
    assert all(torch.equal(a, b) for a, b in zip(w, omega))


def test_sgd_path_integral_is_lr_times_squared_gradients():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5, dtype=F64))
    opt = torch.optim.SGD([w], lr=0.1)
    omega, expected = [torch.zeros(5, dtype=F64)], torch.zeros(5, dtype=F64)
    for _ in range(4):
        opt.zero_grad()
        (w.square().sum() + w.sum()).backward()
        before = w.detach().clone()
        expected += 0.1 * w.grad.square()
        opt.step()
        retain.ops.si_accumulate_(omega, [w.grad], [before], [w.detach()])
    assert_close(omega[0], expected)


def test_bad_input_names_the_op_and_argument():
    with pytest.raises(ValueError, match=r"retain\.ops\.si_consolidate_: xi must be > 0"):
        retain.ops.si_consolidate_([torch.zeros(2)], [torch.zeros(2)], [torch.zeros(2)], [torch.zeros(2)], xi=0.0)
    with pytest.raises(TypeError, match=r"retain\.ops\.si_accumulate_: params_after\[0\] must have "
                                        r"params_before\[0\]'s dtype float32, got float64"):
        retain.ops.si_accumulate_([torch.zeros(2)], [torch.zeros(2)], [torch.zeros(2)], [torch.zeros(2, dtype=F64)])
    with pytest.raises(ValueError, match=r"retain\.ops\.si_accumulate_: grads\[0\] must have omega\[0\]'s shape"):
        retain.ops.si_accumulate_([torch.zeros(2)], [torch.zeros(3)], [torch.zeros(2)], [torch.zeros(2)])
