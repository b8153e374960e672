"""retain.ops.view_batch_indices: every sample active exactly `repeats` consecutive epochs out of
every `repeats + rest`, the ranks' shares covering the active set with equal lengths, determinism,
bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from retain.ops import view_batch_indices


@given(n=st.integers(1, 60), repeats=st.integers(1, 4), rest=st.integers(0, 4), world=st.integers(1, 4),
       seed=st.integers(0, 1000))
def test_each_sample_works_repeats_epochs_then_rests(n, repeats, rest, world, seed):
    period = repeats + rest
    epochs = 3 * period
    active = torch.zeros(epochs, n, dtype=torch.bool)
    for e in range(epochs):
        shares = [view_batch_indices(n, repeats, e, r, world, rest=rest, seed=seed) for r in range(world)]
        assert len({s.numel() for s in shares}) == 1  # equal steps on every rank
        union = torch.cat(shares).unique()
        active[e, union] = True
        per_rank = shares[0].numel()
        assert per_rank == -(-int(active[e].sum()) // world)
    for i in range(n):
        on = active[:, i].tolist()
        assert sum(on[:period]) == repeats and on[period:2 * period] == on[:period]
        # the active epochs of one period are consecutive (cyclically)
        starts = [e for e in range(period) if on[e] and not on[(e - 1) % period]]
        assert len(starts) == (1 if rest else 0) or (rest == 0 and all(on))


def test_a_balanced_share_of_samples_each_epoch_and_shuffled():
    sizes = [view_batch_indices(100, 3, e, rest=1).numel() for e in range(8)]
    assert sizes == [75] * 8
    a, b = view_batch_indices(100, 3, 0), view_batch_indices(100, 3, 1)
    assert not torch.equal(a.sort().values, a) or not torch.equal(b.sort().values, b)
    assert torch.equal(view_batch_indices(100, 3, 2, seed=4), view_batch_indices(100, 3, 2, seed=4))


def test_empty_buffer_gives_nothing():
    assert view_batch_indices(0, 2, 0).numel() == 0


@pytest.mark.parametrize("kwargs,exc,pattern", [
    (dict(n=-1), ValueError, r"n must be >= 0, got -1"),
    (dict(repeats=0), ValueError, r"repeats must be >= 1, got 0"),
    (dict(rank=2, world=2), ValueError, r"rank must be < world \(2\), got 2"),
    (dict(rest=-1), ValueError, r"rest must be >= 0, got -1"),
    (dict(epoch=1.0), TypeError, r"epoch must be an integer, got float"),
])
def test_bad_input(kwargs, exc, pattern):
    args = dict(n=10, repeats=2, epoch=0, rank=0, world=1) | kwargs
    with pytest.raises(exc, match=r"retain.ops.view_batch_indices: " + pattern):
        view_batch_indices(args.pop("n"), args.pop("repeats"), args.pop("epoch"), args.pop("rank"), args.pop("world"),
                           **args)
