"""Batch composition for replay: a fixed number of replay samples in every global batch."""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch.utils.data import Sampler


def _dist_default(world_size: int | None, rank: int | None) -> tuple[int, int]:
    import torch.distributed as dist

    on = dist.is_available() and dist.is_initialized()
    world = world_size if world_size is not None else (dist.get_world_size() if on else 1)
    r = rank if rank is not None else (dist.get_rank() if on else 0)
    return world, r


class ReplayMixSampler(Sampler[int]):
    """Indices into ``ConcatDataset([replay, task])`` (replay samples first: ``0 … num_replay−1``,
    task samples ``num_replay …``) such that every global batch — ``micro_batch_size ×
    grad_accum × world_size`` samples — holds exactly ``replay_per_batch`` replay samples, spread
    as evenly as possible over its micro-batches. Each rank iterates its own share (use it with
    ``DataLoader(dataset, batch_size=micro_batch_size, sampler=...)`` on every rank, no
    ``DistributedSampler``): global batch ``b`` is the ``grad_accum`` consecutive micro-batches
    of every rank.

    Per epoch, task samples are shuffled and each is seen once; the last global batch is filled
    up with task samples from the start of the same permutation (so every rank yields the same
    number of batches, as DDP needs). Replay samples are drawn without replacement, a fresh
    permutation each time the replay set is used up (GeRe's schedule). Within a micro-batch the
    replay samples come first. All ranks must use the same ``seed`` and call
    :meth:`set_epoch` alike.

    Args:
        num_task: size of the task dataset (> 0).
        num_replay: size of the replay set (> 0).
        micro_batch_size: samples per forward/backward on one rank.
        replay_per_batch: replay samples per global batch, ``0 < k < global batch size`` and at
            most ``micro_batch_size`` per micro-batch after spreading.
        grad_accum: gradient-accumulation steps per optimizer step.
        world_size, rank: default from ``torch.distributed`` when initialised, else 1 and 0.
        seed: base seed; the epoch is added to it.

    Examples::

        >>> s = ReplayMixSampler(num_task=10, num_replay=3, micro_batch_size=4, replay_per_batch=1)
        >>> batches = [list(s)[i:i + 4] for i in range(0, len(s), 4)]
        >>> [sum(i < 3 for i in b) for b in batches]     # one replay index per batch
        [1, 1, 1, 1]
    """

    def __init__(self, num_task: int, num_replay: int, *, micro_batch_size: int, replay_per_batch: int,
                 grad_accum: int = 1, world_size: int | None = None, rank: int | None = None, seed: int = 0):
        name = "retain.cl.ReplayMixSampler"
        for arg, val in (("num_task", num_task), ("num_replay", num_replay), ("micro_batch_size", micro_batch_size),
                         ("grad_accum", grad_accum)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{name}: {arg} must be a positive int, got {val!r}")
        world, r = _dist_default(world_size, rank)
        if world < 1 or not 0 <= r < world:
            raise ValueError(f"{name}: rank must be in [0, world_size), got rank {r} with world_size {world}")
        micro = grad_accum * world
        total = micro_batch_size * micro
        if not isinstance(replay_per_batch, int) or not 0 < replay_per_batch < total:
            raise ValueError(f"{name}: replay_per_batch must be an int in [1, {total - 1}] (global batch of {total} "
                             f"= micro_batch_size {micro_batch_size} x grad_accum {grad_accum} x world_size {world}, "
                             f"at least one task sample), got {replay_per_batch!r}")
        self.num_task, self.num_replay = num_task, num_replay
        self.micro_batch_size, self.replay_per_batch = micro_batch_size, replay_per_batch
        self.grad_accum, self.world_size, self.rank = grad_accum, world, r
        self.seed, self.epoch = seed, 0
        # replay samples in micro-batch m (m = step * world + rank: extras go to the first step of
        # every rank before any rank gets a second one)
        self._replay_in = [replay_per_batch // micro + (m < replay_per_batch % micro) for m in range(micro)]
        self._task_per_batch = total - replay_per_batch
        self.num_batches = math.ceil(num_task / self._task_per_batch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_batches * self.grad_accum * self.micro_batch_size

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        tasks = torch.randperm(self.num_task, generator=g)
        need = self.num_batches * self._task_per_batch
        tasks = tasks.repeat(math.ceil(need / self.num_task))[:need] + self.num_replay
        replay_need = self.num_batches * self.replay_per_batch
        replays = torch.cat([torch.randperm(self.num_replay, generator=g)
                             for _ in range(math.ceil(replay_need / self.num_replay))])[:replay_need]
        ti = ri = 0
        out: list[int] = []
        for _ in range(self.num_batches):
            for step in range(self.grad_accum):
                for rank in range(self.world_size):
                    m = step * self.world_size + rank
                    nr = self._replay_in[m]
                    nt = self.micro_batch_size - nr
                    if rank == self.rank:
                        out += replays[ri:ri + nr].tolist() + tasks[ti:ti + nt].tolist()
                    ri += nr
                    ti += nt
        return iter(out)
