"""``retain.ops.view_batch_indices``: a replay schedule that revisits each sample for a few
consecutive epochs and then rests it (the recall interval of the view-batch model)."""

from __future__ import annotations

import torch
from torch import Tensor

from retain.ops._checks import check_int

_OP = "retain.ops.view_batch_indices"


def view_batch_indices(n: int, repeats: int, epoch: int, rank: int = 0, world: int = 1, *, rest: int | None = None,
                       seed: int = 0) -> Tensor:
    r"""This rank's indices into ``n`` stored samples for one epoch of a spaced-replay schedule:
    every sample is trained in ``repeats`` consecutive epochs, then rests for ``rest`` epochs
    (default ``repeats``), after "Do Your Best and Get Enough Rest for Continual Learning" (Kang et
    al., CVPR 2025), whose view-batch model lengthens the recall interval between visits of a sample.

    The samples are dealt, by a permutation fixed by ``seed``, into ``P = repeats + rest`` groups of
    (almost) equal size; group ``g`` is active in epoch ``e`` when ``(e - g) mod P < repeats``, so about
    ``n · repeats / P`` samples are active per epoch, each exactly ``repeats`` epochs in a row out of
    every ``P``. The active indices are shuffled (by ``seed`` and ``epoch``) and split between ranks
    as ``torch.utils.data.DistributedSampler`` does: rank ``r`` takes every ``world``-th from ``r``,
    the list padded by wrapping so that every rank gets the same number (DDP needs equal steps).

    Args:
        n: samples in the buffer (>= 0).
        repeats: consecutive epochs a sample is trained (>= 1).
        epoch: the epoch (>= 0).
        rank, world: this process and the number of processes (0 <= rank < world).
        rest: epochs a sample rests after its repeats (>= 0; 0 trains every sample every epoch).
        seed: fixes the grouping and the shuffles; the same on every rank.

    Returns:
        int64 ``[m]``: this rank's indices, ``m = ceil(active / world)`` (0 when nothing is active).

    Examples::

        >>> e = [set(retain.ops.view_batch_indices(8, 2, epoch).tolist()) for epoch in range(4)]
        >>> [len(s) for s in e]                       # half the samples each epoch (rest = repeats = 2)
        [4, 4, 4, 4]
        >>> all(len(e[t] & e[t + 2]) == 0 for t in range(2))   # a sample seen in epoch t rests in t + 2
        True
    """
    n = check_int(_OP, "n", n, minimum=0)
    repeats = check_int(_OP, "repeats", repeats, minimum=1)
    epoch = check_int(_OP, "epoch", epoch, minimum=0)
    world = check_int(_OP, "world", world, minimum=1)
    rank = check_int(_OP, "rank", rank, minimum=0)
    if rank >= world:
        raise ValueError(f"{_OP}: rank must be < world ({world}), got {rank}")
    rest = repeats if rest is None else check_int(_OP, "rest", rest, minimum=0)
    seed = check_int(_OP, "seed", seed)
    period = repeats + rest
    g = torch.Generator().manual_seed(seed)
    group = torch.empty(n, dtype=torch.int64)
    group[torch.randperm(n, generator=g)] = torch.arange(n) % period
    active = torch.nonzero((epoch - group) % period < repeats).flatten()
    if active.numel() == 0:
        return active
    g.manual_seed(seed + 1_000_003 * (epoch + 1))
    active = active[torch.randperm(active.numel(), generator=g)]
    per_rank = -(-active.numel() // world)
    padded = active.repeat(-(-per_rank * world // active.numel()))[:per_rank * world]
    return padded[rank::world].clone()
