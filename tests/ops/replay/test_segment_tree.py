"""retain.ops.SumTree / MinTree / importance_weights: any capacity, sampling equal to the inverse-CDF
reference (exact sums), proportional to priority by chi-square (stratified and i.i.d.), trees that
equal a rebuild from their leaves after many updates (no drift; zero priorities never drawn), the
last of repeated indices winning, state dicts, the fallback, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from retain import _native
from retain.ops import MinTree, SumTree, importance_weights
from retain.ops.replay import reference as ref
from tests.helpers import DEVICES
from tests.ops.replay.stats import assert_fits

pytestmark = pytest.mark.usefixtures("cpu_capability")

CAPACITIES = [1, 2, 3, 5, 64, 1000, 1025]


def _gen(seed, device="cpu"):
    return torch.Generator(device).manual_seed(seed)


def _rebuilt(t):
    return ref.tree_build_ref(t[:].cpu(), t.leaves, t._identity, t._combine)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("capacity", CAPACITIES)
def test_sampling_matches_the_inverse_cdf_reference(capacity, device):
    g = _gen(capacity)
    p = torch.randint(0, 5, (capacity,), generator=g).to(torch.float64)  # integers: every sum exact
    p[0] = 1.0
    t = SumTree(capacity, device=device)
    t.update(torch.arange(capacity), p)
    assert t.total() == float(p.sum()) and t.leaves >= capacity and t.leaves & (t.leaves - 1) == 0
    for stratified in (True, False):
        idx, prob = t.sample(257, generator=_gen(1), stratified=stratified)
        u = torch.rand(257, dtype=torch.float64, generator=_gen(1))
        want_idx, want_prob = ref.tree_sample_ref(p, u, stratified)
        assert torch.equal(idx.cpu(), want_idx) and torch.equal(prob.cpu(), want_prob)
        assert bool((p[idx.cpu()] > 0).all())


@pytest.mark.parametrize("stratified", [True, False])
def test_samples_are_proportional_to_priority(stratified):
    g = _gen(3)
    p = torch.rand(40, generator=g, dtype=torch.float64) * 3 + 0.2
    t = SumTree(40)
    t.update(torch.arange(40), p)
    n = 40_000
    idx, prob = t.sample(n, generator=g, stratified=stratified)
    assert torch.allclose(prob, p[idx] / p.sum(), rtol=1e-15, atol=0)
    counts = torch.bincount(idx, minlength=40)
    if stratified:  # one draw per stratum: the counts hug n * P(i) within the strata an item spans
        assert bool(((counts - n * p / p.sum()).abs() <= 2).all())
    else:
        assert_fits(counts, n * p / p.sum(), "i.i.d. sum-tree samples")


def test_many_updates_leave_no_drift_and_zero_priorities_are_never_drawn():
    g = _gen(5)
    t = SumTree(1000)
    for _ in range(300):
        idx = torch.randint(0, 1000, (256,), generator=g)
        scale = 10 ** torch.randint(-8, 7, (256,), generator=g).to(torch.float64)
        t.update(idx, torch.rand(256, generator=g, dtype=torch.float64) * scale)
    assert torch.equal(t.tree, _rebuilt(t))  # every inner node is left + right of the current leaves
    assert t.total() == pytest.approx(math.fsum(t[:].tolist()), rel=1e-12)
    t.update(torch.arange(0, 1000, 2), 0.0)
    idx, _ = t.sample(100_000, generator=g)
    assert bool((idx % 2 == 1).all())
    idx, _ = t.sample(100_000, generator=g, stratified=False)
    assert bool((idx % 2 == 1).all())


@given(capacity=st.integers(1, 70), k=st.integers(0, 40), seed=st.integers(0, 2**31))
def test_updates_equal_a_rebuild_and_the_last_repeat_wins(capacity, k, seed):
    g = _gen(seed)
    for tree in (SumTree(capacity), MinTree(capacity)):
        idx = torch.randint(0, capacity, (k,), generator=g)
        v = torch.rand(k, generator=g, dtype=torch.float64)
        tree.update(idx, v)
        want = torch.full((capacity,), tree._identity, dtype=torch.float64)
        for i, x in zip(idx.tolist(), v.tolist()):
            want[i] = x
        assert torch.equal(tree[:], want)
        assert torch.equal(tree.tree, _rebuilt(tree))


def test_min_tree():
    t = MinTree(6)
    assert t.min() == math.inf
    t.update(torch.tensor([1, 4, 5]), torch.tensor([3.0, 0.5, 2.0]))
    assert t.min() == 0.5
    t.update(torch.tensor([4]), math.inf)  # removed
    assert t.min() == 2.0


def test_scalar_priority_broadcasts_and_float32_is_accepted():
    t = SumTree(4)
    t.update(torch.tensor([0, 2], dtype=torch.int32), torch.tensor(1.5, dtype=torch.float32))
    assert t[:].tolist() == [1.5, 0.0, 1.5, 0.0]


def test_state_dict_round_trip_rebuilds_the_inner_nodes():
    a = SumTree(9)
    a.update(torch.arange(9), torch.arange(9, dtype=torch.float64))
    sd = a.state_dict()
    assert set(sd) == {"capacity", "priorities"} and sd["priorities"].device.type == "cpu"
    b = SumTree(9)
    b.load_state_dict(sd)
    assert torch.equal(a.tree, b.tree)
    with pytest.raises(ValueError, match=r"SumTree.load_state_dict: the state is of capacity 9, this tree's is 8"):
        SumTree(8).load_state_dict(sd)
    with pytest.raises(ValueError, match=r"SumTree.load_state_dict: state must be a dict with keys"):
        b.load_state_dict({"priorities": sd["priorities"]})
    bad = dict(sd, priorities=sd["priorities"].clone())
    bad["priorities"][3] = -1.0
    with pytest.raises(ValueError, match=r"SumTree.load_state_dict: priority must be finite and >= 0, got -1.0"):
        b.load_state_dict(bad)


def test_empty_update_and_sample():
    t = SumTree(3)
    t.update(torch.zeros(0, dtype=torch.long), torch.zeros(0))
    t.update(torch.tensor([1]), 2.0)
    idx, prob = t.sample(0)
    assert idx.shape == (0,) and prob.shape == (0,)


@pytest.mark.parametrize("call,exc,pattern", [
    (lambda t: t.update(torch.tensor([4]), 1.0), IndexError, r"SumTree.update: idx must be in \[0, 4\) .*got 4"),
    (lambda t: t.update(torch.tensor([-1]), 1.0), IndexError, r"SumTree.update: idx must be in \[0, 4\) .*got -1"),
    (lambda t: t.update(torch.tensor([0.0]), 1.0), TypeError, r"SumTree.update: idx must be an integer tensor, got float32"),
    (lambda t: t.update(torch.tensor([0]), -0.5), ValueError, r"SumTree.update: priority must be finite and >= 0, got -0.5"),
    (lambda t: t.update(torch.tensor([0]), float("nan")), ValueError, r"SumTree.update: priority must be finite and >= 0, got nan"),
    (lambda t: t.update(torch.tensor([0]), float("inf")), ValueError, r"SumTree.update: priority must be finite"),
    (lambda t: t.update(torch.tensor([0, 1]), torch.ones(3)), ValueError, r"SumTree.update: priority must be a scalar or have idx's shape \(2,\), got \(3,\)"),
    (lambda t: t.update(torch.tensor([0]), torch.tensor([1])), TypeError, r"SumTree.update: priority must be a floating tensor, got int64"),
    (lambda t: t.sample(2), ValueError, r"SumTree.sample: the total priority is 0.0: nothing to sample"),
    (lambda t: t.sample(-1), ValueError, r"SumTree.sample: n must be >= 0, got -1"),
    (lambda t: t.sample(2, generator="g"), TypeError, r"SumTree.sample: generator must be a torch.Generator"),
    (lambda t: SumTree(0), ValueError, r"retain.ops.SumTree: capacity must be >= 1, got 0"),
])
def test_bad_input(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call(SumTree(4))


def test_min_tree_refuses_nan():
    with pytest.raises(ValueError, match=r"MinTree.update: priority must be not NaN"):
        MinTree(2).update(torch.tensor([0]), float("nan"))


def test_the_fallback_equals_the_kernel(monkeypatch):
    g = _gen(9)
    idx = torch.randint(0, 37, (200,), generator=g)
    v = torch.randint(0, 9, (200,), generator=g).to(torch.float64)
    native = SumTree(37)
    native.update(idx, v)
    want = native.sample(64, generator=_gen(2))
    monkeypatch.setattr(_native, "has_kernel", lambda op, dev: False)
    monkeypatch.delenv("RETAIN_FALLBACK", raising=False)
    with pytest.raises(NotImplementedError, match=r"retain::segment_tree: no kernel.*RETAIN_FALLBACK=reference"):
        SumTree(37).update(idx, v)
    monkeypatch.setenv("RETAIN_FALLBACK", "reference")
    fb = SumTree(37)
    fb.update(idx, v)
    assert torch.equal(fb.tree, native.tree)
    got = fb.sample(64, generator=_gen(2))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_importance_weights():
    p = torch.tensor([0.5, 0.25, 0.125], dtype=torch.float64)
    assert importance_weights(p, beta=1.0, min_prob=0.0625).tolist() == [0.125, 0.25, 0.5]
    assert importance_weights(p, beta=0.5).tolist() == pytest.approx([0.5, 2 ** -0.5, 1.0])
    assert importance_weights(p, beta=0.0).tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match=r"retain.ops.importance_weights: beta must be a number in \[0, 1\], got 2"):
        importance_weights(p, beta=2)
