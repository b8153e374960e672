"""retain.ops.reservoir_slots, class_balanced_slots and ring_slots: the native kernels equal the
references bit for bit (same random stream), Algorithm R's inclusion probabilities and CBRS's class
balance by chi-square, the last writer of a slot winning, determinism for a seed, the fallback
policy, bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from retain import _native
from retain.ops import ClassBalancedState, class_balanced_slots, reservoir_slots, ring_slots
from retain.ops.replay import reference as ref
from tests.helpers import assert_bad_input
from tests.ops.replay.stats import assert_fits

pytestmark = pytest.mark.usefixtures("cpu_capability")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _seed_of(seed):
    """The seed reservoir_slots draws from a generator seeded with ``seed``."""
    return int(torch.randint(0, 2**63 - 1, (), generator=_gen(seed), dtype=torch.int64))


@given(n_seen=st.integers(0, 300), batch=st.integers(0, 70), capacity=st.integers(1, 40), seed=st.integers(0, 2**31))
def test_reservoir_kernel_equals_the_reference(n_seen, batch, capacity, seed):
    got = reservoir_slots(n_seen, batch, capacity, generator=_gen(seed))
    want = ref.reservoir_slots_ref(n_seen, batch, capacity, _seed_of(seed))
    assert got.dtype == torch.int64 and torch.equal(got, want)
    kept = got[got >= 0]
    assert kept.unique().numel() == kept.numel() and bool((kept < capacity).all())


def test_reservoir_fills_first_then_samples():
    s = reservoir_slots(0, 5, 8, generator=_gen(0))
    assert s.tolist() == [0, 1, 2, 3, 4]
    s = reservoir_slots(5, 3, 8, generator=_gen(0))
    assert s.tolist() == [5, 6, 7]
    s = reservoir_slots(8, 10_000, 8, generator=_gen(0))  # many replacements, at most one kept per slot
    kept = s[s >= 0]
    assert 0 < kept.numel() <= 8 and kept.unique().numel() == kept.numel()


def test_reservoir_inclusion_probability_is_capacity_over_n():
    # 200 items in batches of 13 into 20 slots, 3000 times: each item ends in the buffer with
    # probability 20 / 200, so about 300 times
    n, cap, trials = 200, 20, 3000
    g = _gen(1)
    hits = torch.zeros(n, dtype=torch.int64)
    for _ in range(trials):
        buf = torch.full((cap,), -1, dtype=torch.int64)
        for start in range(0, n, 13):
            b = min(13, n - start)
            s = reservoir_slots(start, b, cap, generator=g)
            keep = s >= 0
            buf[s[keep]] = torch.arange(start, start + b)[keep]
        hits[buf] += 1
    assert int(hits.sum()) == trials * cap
    assert_fits(hits, torch.full((n,), trials * cap / n), "reservoir inclusion")


def test_the_last_writer_of_a_slot_wins():
    # capacity 1 past the fill: every kept item takes slot 0, so only the last kept one is reported
    s = reservoir_slots(1, 50, 1, generator=_gen(3))
    want = ref.reservoir_slots_ref(1, 50, 1, _seed_of(3))
    assert torch.equal(s, want) and int((s == 0).sum()) == 1
    assert int(torch.nonzero(s == 0)) == max(j for j in range(50) if _raw_slot(1 + j, 3, 50) == 0)


def _raw_slot(i, seed, batch):
    """Item i's draw before the last-writer rule (the reference's stream, capacity 1)."""
    rng = ref.Stream(_seed_of(seed))
    r = None
    for item in range(1, 1 + batch):
        r = rng.below(item + 1)
        if item == i:
            return 0 if r < 1 else -1


def test_reservoir_is_deterministic_for_a_seed_and_resumes_from_the_generator_state():
    g = _gen(7)
    reservoir_slots(0, 50, 10, generator=g)
    state = g.get_state()
    a = reservoir_slots(50, 50, 10, generator=g)
    g.set_state(state)
    assert torch.equal(reservoir_slots(50, 50, 10, generator=g), a)
    assert not torch.equal(reservoir_slots(50, 50, 10, generator=g), a)  # the generator advanced


def test_reservoir_device_and_default_generator():
    torch.manual_seed(0)
    a = reservoir_slots(0, 4, 2, device="cpu")
    torch.manual_seed(0)
    assert torch.equal(reservoir_slots(0, 4, 2), a)


@pytest.mark.parametrize("case", [
    ("negative n_seen", dict(n_seen=-1), ValueError, r"n_seen must be >= 0, got -1"),
    ("float batch", dict(batch=2.5), TypeError, r"batch must be an integer, got float"),
    ("bool batch", dict(batch=True), TypeError, r"batch must be an integer, got bool"),
    ("zero capacity", dict(capacity=0), ValueError, r"capacity must be >= 1, got 0"),
    ("generator", dict(generator=3), TypeError, r"generator must be a torch.Generator or None, got int"),
], ids=lambda c: c[0] if isinstance(c, tuple) else None)
def test_reservoir_bad_input(case):
    assert_bad_input("retain.ops.reservoir_slots", lambda **kw: reservoir_slots(
        kw.pop("n_seen"), kw.pop("batch"), kw.pop("capacity"), **kw), dict(n_seen=0, batch=3, capacity=4), case)


def test_without_the_kernel_the_fallback_policy_applies(monkeypatch):
    monkeypatch.setattr(_native, "has_kernel", lambda op, dev: False)
    monkeypatch.delenv("RETAIN_FALLBACK", raising=False)
    with pytest.raises(NotImplementedError, match=r"reservoir_slots.*RETAIN_FALLBACK=reference"):
        reservoir_slots(0, 3, 4)
    monkeypatch.setenv("RETAIN_FALLBACK", "reference")
    assert torch.equal(reservoir_slots(10, 30, 4, generator=_gen(2)), ref.reservoir_slots_ref(10, 30, 4, _seed_of(2)))
    st_a, st_b = ClassBalancedState.empty(6, 3), ClassBalancedState.empty(6, 3)
    labels = torch.randint(0, 3, (40,), generator=_gen(4))
    a = class_balanced_slots(labels, st_a, generator=_gen(5))
    monkeypatch.undo()
    b = class_balanced_slots(labels, st_b, generator=_gen(5))
    assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(st_a.state_dict().values(),
                                                                       st_b.state_dict().values()))


@given(capacity=st.integers(1, 30), classes=st.integers(1, 6), batches=st.lists(st.integers(0, 25), max_size=6),
       seed=st.integers(0, 2**31))
def test_class_balanced_kernel_equals_the_reference(capacity, classes, batches, seed):
    state = ClassBalancedState.empty(capacity, classes)
    lists = [[-1] * capacity, [0] * classes, [0] * classes, [0] * classes]
    size = 0
    g, g_ref = _gen(seed), _gen(seed)
    for i, b in enumerate(batches):
        weights = torch.linspace(1, 4, classes) ** 2  # imbalanced
        labels = torch.multinomial(weights, b, replacement=True, generator=_gen(seed + i)) if b else \
            torch.zeros(0, dtype=torch.int64)
        got = class_balanced_slots(labels, state, generator=g)
        want, size = ref.class_balanced_slots_ref(labels.tolist(), *lists, size, _common_seed(g_ref))
        assert torch.equal(got, want)
        assert state.slot_labels.tolist() == lists[0] and state.counts.tolist() == lists[1]
        assert state.seen.tolist() == lists[2] and [int(f) for f in state.full.tolist()] == lists[3]
        assert int(state.size) == size
        stored = state.slot_labels[state.slot_labels >= 0]
        assert torch.equal(torch.bincount(stored, minlength=classes), state.counts)
        kept = got[got >= 0]
        assert kept.unique().numel() == kept.numel()
        assert torch.equal(state.slot_labels[kept], labels[got >= 0])  # each kept item's slot holds its class


def _common_seed(g):
    return int(torch.randint(0, 2**63 - 1, (), generator=g, dtype=torch.int64))


def test_class_balanced_memory_balances_an_imbalanced_stream():
    g = _gen(11)
    probs = torch.tensor([0.8, 0.1, 0.05, 0.03, 0.02])
    labels = torch.multinomial(probs, 5000, replacement=True, generator=g)
    state = ClassBalancedState.empty(100, 5)
    for chunk in labels.split(64):
        class_balanced_slots(chunk, state, generator=g)
    assert int(state.counts.sum()) == 100
    assert int(state.counts.max() - state.counts.min()) <= 1, state.counts
    # plain reservoir sampling would keep about 80 of class 0
    assert int(state.counts[0]) <= 21


def test_class_balanced_keeps_a_rare_class_entirely():
    # class 1 arrives 10 times among 2000: all 10 stay (a class below its share is never evicted)
    labels = torch.zeros(2000, dtype=torch.int64)
    labels[torch.arange(10) * 197 + 5] = 1
    state = ClassBalancedState.empty(50, 2)
    for chunk in labels.split(100):
        class_balanced_slots(chunk, state, generator=_gen(0))
    assert state.counts.tolist() == [40, 10]


def test_class_balanced_inclusion_is_uniform_inside_a_class():
    # two classes alternating, 120 items each, 20 slots: each class keeps 10 and every item of a
    # class is in memory with probability 10 / 120
    trials, cap = 2000, 20
    labels = torch.arange(240) % 2
    hits = torch.zeros(240, dtype=torch.int64)
    g = _gen(5)
    for _ in range(trials):
        state = ClassBalancedState.empty(cap, 2)
        owner = torch.full((cap,), -1, dtype=torch.int64)
        for start in range(0, 240, 16):
            s = class_balanced_slots(labels[start:start + 16], state, generator=g)
            keep = s >= 0
            owner[s[keep]] = torch.arange(start, start + 16)[keep]
        hits[owner] += 1
    assert int(hits.sum()) == trials * cap
    # the first 20 items fill the memory; later arrivals make the schedule exact reservoir per class
    for c in (0, 1):
        h = hits[labels == c]
        assert_fits(h, torch.full_like(h, trials * 10 / 120, dtype=torch.float64), f"class {c} inclusion")


@pytest.mark.parametrize("case", [
    ("label range", dict(labels=torch.tensor([0, 3])), ValueError, r"labels must be in \[0, 3\) .*got 3"),
    ("negative label", dict(labels=torch.tensor([-1])), ValueError, r"labels must be in \[0, 3\) .*got -1"),
    ("float labels", dict(labels=torch.tensor([0.0])), TypeError, r"labels must be an integer tensor, got float32"),
    ("2-d labels", dict(labels=torch.zeros(2, 2, dtype=torch.long)), ValueError, r"labels must have 1 dimensions"),
    ("state", dict(state={}), TypeError, r"state must be a retain.ops.ClassBalancedState, got dict"),
], ids=lambda c: c[0] if isinstance(c, tuple) else None)
def test_class_balanced_bad_input(case):
    assert_bad_input("retain.ops.class_balanced_slots", lambda labels, state: class_balanced_slots(labels, state),
                     dict(labels=torch.tensor([0, 1]), state=ClassBalancedState.empty(4, 3)), case)


def test_a_hand_built_state_of_the_wrong_dtype_or_size_is_refused():
    st = ClassBalancedState.empty(4, 3)
    bad = ClassBalancedState(st.slot_labels.int(), st.counts, st.seen, st.full, st.size)
    with pytest.raises(TypeError, match=r"class_balanced_slots: state.slot_labels must be a contiguous CPU int64"):
        class_balanced_slots(torch.tensor([0]), bad)
    bad = ClassBalancedState(st.slot_labels, st.counts, st.seen[:2], st.full, st.size)
    with pytest.raises(ValueError, match=r"class_balanced_slots: state.seen has shape \(2,\), inconsistent"):
        class_balanced_slots(torch.tensor([0]), bad)


def test_class_balanced_state_dict_round_trip_and_mismatch():
    a = ClassBalancedState.empty(8, 3)
    class_balanced_slots(torch.tensor([0, 1, 2, 2, 2, 2, 2, 2, 2, 1]), a, generator=_gen(0))
    b = ClassBalancedState.empty(8, 3)
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(ValueError, match=r"ClassBalancedState.load_state_dict: counts must be a int64 tensor of shape \(4,\)"):
        ClassBalancedState.empty(8, 4).load_state_dict(a.state_dict())


@pytest.mark.parametrize("n_seen,batch,capacity", [(0, 3, 4), (3, 4, 4), (0, 9, 4), (7, 1, 1), (5, 0, 3)])
def test_ring_slots(n_seen, batch, capacity):
    s = ring_slots(n_seen, batch, capacity)
    want = [(n_seen + j) % capacity if j >= batch - capacity else -1 for j in range(batch)]
    assert s.tolist() == want


def test_ring_bad_input():
    with pytest.raises(ValueError, match=r"retain.ops.ring_slots: capacity must be >= 1, got 0"):
        ring_slots(0, 1, 0)
