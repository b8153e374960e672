"""retain.cl.ReplayMixSampler: k replay samples in every global batch, for any world size and
gradient accumulation."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, strategies as st
from torch.utils.data import ConcatDataset, DataLoader, TensorDataset

from retain.cl import ReplayMixSampler


def shares(num_task, num_replay, mb, k, accum, world, seed=0, epoch=0):
    out = []
    for r in range(world):
        s = ReplayMixSampler(num_task, num_replay, micro_batch_size=mb, replay_per_batch=k, grad_accum=accum,
                             world_size=world, rank=r, seed=seed)
        s.set_epoch(epoch)
        out.append(list(s))
        assert len(out[-1]) == len(s)
    return out


def global_batches(per_rank, mb, accum, world):
    """Reassemble global batches: batch b is micro-batches b*accum ... of every rank."""
    n = len(per_rank[0]) // (mb * accum)
    for b in range(n):
        yield [per_rank[r][(b * accum + j) * mb:(b * accum + j + 1) * mb] for j in range(accum) for r in range(world)]


@given(num_task=st.integers(1, 60), num_replay=st.integers(1, 9), mb=st.integers(1, 5), accum=st.integers(1, 3),
       world=st.integers(1, 3), data=st.data())
def test_every_global_batch_holds_k_replay_samples(num_task, num_replay, mb, accum, world, data):
    total = mb * accum * world
    if total < 2:
        return
    k = data.draw(st.integers(1, total - 1))
    per_rank = shares(num_task, num_replay, mb, k, accum, world)
    assert len({len(p) for p in per_rank}) == 1, "every rank must yield the same number of samples"
    seen_task = []
    replay_stream = []
    for micro in global_batches(per_rank, mb, accum, world):
        flat = [i for m in micro for i in m]
        assert len(flat) == total
        assert sum(i < num_replay for i in flat) == k
        counts = [sum(i < num_replay for i in m) for m in micro]
        assert max(counts) - min(counts) <= 1, "replay samples are spread evenly over micro-batches"
        for m in micro:  # replay first within a micro-batch
            c = sum(i < num_replay for i in m)
            assert all(i < num_replay for i in m[:c])
        seen_task += [i for i in flat if i >= num_replay]
        replay_stream += [i for m in micro for i in m if i < num_replay]
    # every task sample exactly once, then padding from the same permutation
    assert sorted(set(seen_task)) == list(range(num_replay, num_replay + num_task))
    assert seen_task[num_task:] == seen_task[:len(seen_task) - num_task]
    assert len(seen_task) - num_task < total - k
    # replay without replacement until the replay set is used up
    for start in range(0, len(replay_stream) - num_replay + 1, num_replay):
        assert sorted(replay_stream[start:start + num_replay]) == list(range(num_replay))


def test_epochs_reshuffle_deterministically():
    a0 = shares(50, 4, 4, 2, 2, 2, seed=3, epoch=0)
    a0_again = shares(50, 4, 4, 2, 2, 2, seed=3, epoch=0)
    a1 = shares(50, 4, 4, 2, 2, 2, seed=3, epoch=1)
    assert a0 == a0_again
    assert a0 != a1


def test_k_below_the_number_of_micro_batches():
    # 1 replay sample over 6 micro-batches: exactly one micro-batch of the global batch carries it
    per_rank = shares(40, 5, 2, 1, 3, 2)
    for micro in global_batches(per_rank, 2, 3, 2):
        assert sorted(sum(i < 5 for i in m) for m in micro) == [0, 0, 0, 0, 0, 1]


def test_with_a_dataloader_over_concat_dataset():
    replay = TensorDataset(torch.arange(3))
    task = TensorDataset(torch.arange(100, 110))
    s = ReplayMixSampler(len(task), len(replay), micro_batch_size=4, replay_per_batch=1)
    batches = [b[0].tolist() for b in DataLoader(ConcatDataset([replay, task]), batch_size=4, sampler=s)]
    assert all(sum(v < 100 for v in b) == 1 for b in batches)
    assert {v for b in batches for v in b if v >= 100} == set(range(100, 110))


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_task=0), "num_task must be a positive int"),
    (dict(num_replay=0), "num_replay must be a positive int"),
    (dict(micro_batch_size=0), "micro_batch_size must be a positive int"),
    (dict(replay_per_batch=0), r"replay_per_batch must be an int in \[1, 7\]"),
    (dict(replay_per_batch=8), r"replay_per_batch must be an int in \[1, 7\]"),
    (dict(rank=2), r"rank must be in \[0, world_size\)"),
])
def test_bad_arguments(kwargs, match):
    args = dict(num_task=10, num_replay=3, micro_batch_size=4, replay_per_batch=1, grad_accum=1, world_size=2, rank=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ReplayMixSampler(args.pop("num_task"), args.pop("num_replay"), **args)


def test_no_index_outside_the_concatenated_dataset():
    for nt, nr in itertools.product((1, 7), (1, 3)):
        for p in shares(nt, nr, 3, 2, 2, 2):
            assert all(0 <= i < nt + nr for i in p)
