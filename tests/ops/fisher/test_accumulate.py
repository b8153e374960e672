"""retain.ops.fisher_accumulate_, mas_accumulate_ and rank1_accumulate_ (one native kernel,
retain::grad_moments_): every data × state dtype, shapes at the chunk boundaries, per-sample and
single gradients, hypothesis over lists of shapes and edge factors, NaN, in-place semantics,
thread counts, bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import retain
from retain.ops.fisher import reference as ref
from tests.helpers import assert_bad_input, assert_close
from tests.ops.fisher.lists import BOUNDARY_SHAPES, DATA_DTYPES, F64, STATE_DTYPES, clones, randn_list

pytestmark = pytest.mark.usefixtures("cpu_capability")


@pytest.mark.parametrize("state_dtype", STATE_DTYPES)
@pytest.mark.parametrize("data_dtype", DATA_DTYPES)
@pytest.mark.parametrize("samples", [None, 1, 3])
def test_fisher_accumulate_matches_the_reference(data_dtype, state_dtype, samples):
    F = randn_list(BOUNDARY_SHAPES, state_dtype, seed=1, positive=True)
    g = randn_list(BOUNDARY_SHAPES, data_dtype, seed=2, samples=samples)
    want = ref.fisher_accumulate_ref(F, g, decay=0.9, scale=0.25)
    got = retain.ops.fisher_accumulate_(clones(F), g, decay=0.9, scale=0.25)
    for a, b in zip(got, want):
        assert a.dtype == state_dtype and a.shape == b.shape
        assert_close(a, b)


@pytest.mark.parametrize("state_dtype", STATE_DTYPES)
@pytest.mark.parametrize("data_dtype", [torch.float32, torch.bfloat16])
def test_mas_and_rank1_accumulate_match_the_reference(data_dtype, state_dtype):
    W = randn_list(BOUNDARY_SHAPES, state_dtype, seed=1, positive=True)
    mu = randn_list(BOUNDARY_SHAPES, state_dtype, seed=3)
    g = randn_list(BOUNDARY_SHAPES, data_dtype, seed=2, samples=2)
    for a, b in zip(retain.ops.mas_accumulate_(clones(W), g, decay=0.5, scale=3.0),
                    ref.mas_accumulate_ref(W, g, decay=0.5, scale=3.0)):
        assert_close(a, b)
    got_mu, got_sq = retain.ops.rank1_accumulate_(clones(mu), clones(W), g)
    want_mu, want_sq = ref.rank1_accumulate_ref(mu, W, g)
    for a, b in zip(got_mu + got_sq, want_mu + want_sq):
        assert_close(a, b)
    only_mu, none = retain.ops.rank1_accumulate_(clones(mu), None, g)
    assert none is None
    for a, b in zip(only_mu, want_mu):
        assert_close(a, b)


def test_the_state_is_updated_in_place_and_the_list_returned():
    F = [torch.zeros(4), torch.zeros(())]
    ptrs = [t.data_ptr() for t in F]
    out = retain.ops.fisher_accumulate_(F, [torch.ones(4), torch.tensor(2.0)])
    assert out is F and [t.data_ptr() for t in F] == ptrs
    assert torch.equal(F[0], torch.ones(4)) and F[1].item() == 4.0


def test_a_sum_over_samples_equals_one_call_per_sample():
    g = randn_list([(33,), (4, 5)], seed=4, samples=5)
    F_batched = retain.ops.fisher_accumulate_([torch.zeros(33, dtype=F64), torch.zeros(4, 5, dtype=F64)], g)
    F_loop = [torch.zeros(33, dtype=F64), torch.zeros(4, 5, dtype=F64)]
    for s in range(5):
        retain.ops.fisher_accumulate_(F_loop, [t[s] for t in g])
    for a, b in zip(F_batched, F_loop):
        assert_close(a, b)


def test_zero_samples_only_decay():
    F = [torch.full((3,), 2.0)]
    retain.ops.fisher_accumulate_(F, [torch.zeros(0, 3)], decay=0.5)
    assert torch.equal(F[0], torch.full((3,), 1.0))


def test_nan_in_a_gradient_gives_nan_in_its_element_only():
    F = [torch.zeros(5), torch.zeros(3)]
    g = [torch.ones(2, 5), torch.ones(2, 3)]
    g[0][1, 2] = float("nan")
    retain.ops.mas_accumulate_(F, g)
    assert torch.isnan(F[0][2]) and torch.isfinite(F[0][[0, 1, 3, 4]]).all() and torch.isfinite(F[1]).all()


def test_results_do_not_depend_on_the_thread_count():
    g = randn_list(BOUNDARY_SHAPES, torch.float32, seed=5, samples=2)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            F = randn_list(BOUNDARY_SHAPES, torch.float32, seed=6, positive=True)
            results.append(retain.ops.fisher_accumulate_(F, g, decay=0.3, scale=0.7))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(*results))


shapes_st = st.lists(st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple), min_size=1, max_size=5)
factor_st = st.sampled_from([0.0, 1.0, -1.0, 0.5, 1e-30, 3e10])


@settings(max_examples=40, deadline=None)
@given(shapes=shapes_st, samples=st.sampled_from([None, 0, 1, 4]), decay=factor_st, scale=factor_st,
       data_dtype=st.sampled_from(DATA_DTYPES), state_dtype=st.sampled_from(STATE_DTYPES), seed=st.integers(0, 99))
def test_hypothesis_lists_of_shapes_and_edge_factors(shapes, samples, decay, scale, data_dtype, state_dtype, seed):
    F = randn_list(shapes, state_dtype, seed=seed, positive=True)
    g = randn_list(shapes, data_dtype, seed=seed + 1, samples=samples)
    for a, b in zip(retain.ops.fisher_accumulate_(clones(F), g, decay=decay, scale=scale),
                    ref.fisher_accumulate_ref(F, g, decay=decay, scale=scale)):
        assert_close(a, b)


def _base():
    return dict(fisher=[torch.zeros(3), torch.zeros(2, 2)], grads=[torch.ones(3), torch.ones(2, 2)])


BAD = [
    ("single tensor", dict(fisher=torch.zeros(3)), TypeError, r"fisher must be a list of tensors .* got a single tensor"),
    ("not tensors", dict(grads=[1.0, 2.0]), TypeError, r"grads must be a list of tensors, got a list holding float"),
    ("lengths", dict(grads=[torch.ones(3)]), ValueError, r"grads must have one tensor per tensor of fisher \(2\), got 1"),
    ("shape", dict(grads=[torch.ones(4), torch.ones(2, 2)]), ValueError,
     r"grads\[0\] must have fisher\[0\]'s shape \(3,\) \(one gradient\) or \(S, \*\(3,\)\) .* got \(4,\)"),
    ("samples differ", dict(grads=[torch.ones(2, 3), torch.ones(3, 2, 2)]), ValueError,
     r"grads must hold one gradient per tensor or the same number of samples S for every tensor"),
    ("state dtype", dict(fisher=[torch.zeros(3, dtype=torch.bfloat16), torch.zeros(2, 2)]), TypeError,
     r"fisher\[0\] must be float32 or float64 \(the accumulation dtype\), got bfloat16"),
    ("grad dtype", dict(grads=[torch.ones(3, dtype=torch.int64), torch.ones(2, 2)]), TypeError,
     r"grads\[0\] must be a floating tensor \(float32, float64, bfloat16, float16\), got int64"),
    ("non-contiguous", dict(fisher=[torch.zeros(3), torch.zeros(2, 2).t()]), ValueError,
     r"fisher\[1\] must be contiguous \(it is updated in place\)"),
    ("device", dict(grads=[torch.ones(3), torch.ones(2, 2, device="meta")]), ValueError,
     r"every tensor must be on one device \(fisher\[0\]'s cpu\), got meta for grads\[1\]"),
    ("decay nan", dict(decay=float("nan")), ValueError, r"decay must be finite, got nan"),
    ("scale type", dict(scale="1"), TypeError, r"scale must be a real number, got str"),
    ("requires grad", dict(fisher=[torch.zeros(3, requires_grad=True), torch.zeros(2, 2)]), ValueError,
     r"fisher\[0\] requires grad; state updated in place must not"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_is_an_error_naming_the_op_and_argument(case):
    assert_bad_input("retain.ops.fisher_accumulate_", retain.ops.fisher_accumulate_, _base(), case)


def test_rank1_accumulate_bad_input_names_its_arguments():
    mu = [torch.zeros(3)]
    with pytest.raises(ValueError, match=r"retain\.ops\.rank1_accumulate_: sq_sum must have one tensor per tensor "
                                         r"of mu_sum \(1\), got 2"):
        retain.ops.rank1_accumulate_(mu, [torch.zeros(3), torch.zeros(1)], [torch.ones(3)])
    with pytest.raises(TypeError, match=r"retain\.ops\.rank1_accumulate_: sq_sum\[0\] must have mu_sum\[0\]'s dtype "
                                        r"float32, got float64"):
        retain.ops.rank1_accumulate_(mu, [torch.zeros(3, dtype=F64)], [torch.ones(3)])
