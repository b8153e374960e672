"""Pure-PyTorch (and pure-Python) references of the replay family: the tests' oracles and the
fallback where no native kernel serves. The random streams are csrc/replay/rng.h's, bit for bit, so
a reference and a kernel given the same seed choose the same slots."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def splitmix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


class Stream:
    """csrc/replay/rng.h's Stream: splitmix64 of seed + i · golden ratio, Lemire's bounded draw."""

    def __init__(self, seed: int):
        self.state = seed & _MASK

    def next(self) -> int:
        self.state = (self.state + _GOLDEN) & _MASK
        return splitmix64(self.state)

    def below(self, bound: int) -> int:
        m = self.next() * bound
        low = m & _MASK
        if low < bound:
            threshold = (-bound % (1 << 64)) % bound
            while low < threshold:
                m = self.next() * bound
                low = m & _MASK
        return m >> 64


def keep_last_writers(slots: list[int]) -> list[int]:
    """An earlier item whose slot a later item of the same call takes gets -1."""
    taken: set[int] = set()
    out = list(slots)
    for j in range(len(out) - 1, -1, -1):
        if out[j] < 0:
            continue
        if out[j] in taken:
            out[j] = -1
        else:
            taken.add(out[j])
    return out


def reservoir_slots_ref(n_seen: int, batch: int, capacity: int, seed: int) -> Tensor:
    """Algorithm R: item i (0-based arrival number) goes to slot i while i < capacity, else to a
    uniform r in [0, i] when r < capacity (kept with probability capacity / (i + 1))."""
    rng = Stream(seed)
    slots = []
    for j in range(batch):
        i = n_seen + j
        if i < capacity:
            slots.append(i)
        else:
            r = rng.below(i + 1)
            slots.append(r if r < capacity else -1)
    return torch.tensor(keep_last_writers(slots), dtype=torch.int64)


def class_balanced_slots_ref(labels: Sequence[int], slot_labels: list[int], counts: list[int], seen: list[int],
                             full: list[int], size: int, seed: int) -> tuple[Tensor, int]:
    """Class-balanced reservoir sampling (CBRS, Chrysakis & Moens 2020) on Python lists, updated in
    place; returns the slots and the new size. csrc/replay/README.md states the rule."""
    rng = Stream(seed)
    capacity, classes = len(slot_labels), len(counts)
    slots = []
    for y in labels:
        seen[y] += 1
        if size < capacity:
            slot_labels[size] = y
            counts[y] += 1
            slots.append(size)
            size += 1
            continue
        largest = max(counts)
        for c in range(classes):
            if counts[c] == largest:
                full[c] = 1
        if not full[y]:
            ties = [c for c in range(classes) if counts[c] == largest]
            victim = ties[rng.below(len(ties))]
        elif rng.below(seen[y]) < counts[y]:
            victim = y
        else:
            slots.append(-1)
            continue
        while True:
            s = rng.below(capacity)
            if slot_labels[s] == victim:
                break
        counts[victim] -= 1
        counts[y] += 1
        slot_labels[s] = y
        slots.append(s)
    return torch.tensor(keep_last_writers(slots), dtype=torch.int64), size


def tree_build_ref(priorities: Tensor, leaves: int, identity: float, combine) -> Tensor:
    """The whole tree (2·leaves float64 nodes, root at 1) over the priorities."""
    tree = torch.full((2 * leaves,), identity, dtype=torch.float64, device=priorities.device)
    tree[leaves:leaves + priorities.numel()] = priorities.to(torch.float64)
    level = leaves
    while level > 1:
        children = tree[level:2 * level].view(-1, 2)
        tree[level // 2:level] = combine(children[:, 0], children[:, 1])
        level //= 2
    return tree


def tree_sample_ref(priorities: Tensor, u: Tensor, stratified: bool) -> tuple[Tensor, Tensor]:
    """Inverse-CDF sampling: the first index whose inclusive prefix sum exceeds the target
    ((j + u_j) · total / n when stratified, else u_j · total), zero priorities never chosen."""
    p = priorities.to(torch.float64)
    n = u.numel()
    cdf = torch.cumsum(p, 0)
    total = cdf[-1]
    j = torch.arange(n, dtype=torch.float64, device=p.device)
    target = (j + u) * (total / n) if stratified else u * total
    idx = torch.searchsorted(cdf, target, right=True).clamp_(max=p.numel() - 1)
    # never a zero priority: move to the nearest positive index at or before (then after) it
    positive = torch.nonzero(p > 0).flatten()
    pos = torch.searchsorted(positive, idx, right=True) - 1
    idx = torch.where(p[idx] > 0, idx, positive[pos.clamp(min=0)])
    return idx, p[idx] / total


def gather_rows_ref(fields: Sequence[Tensor], index: Tensor) -> list[Tensor]:
    return [f.index_select(0, index) for f in fields]


def scatter_rows_ref(fields: Sequence[Tensor], index: Tensor, values: Sequence[Tensor]) -> list[Tensor]:
    """New storage tensors: rows index[j] >= 0 set to values[j], the last of repeated indices winning."""
    out = [f.clone() for f in fields]
    for j in range(index.numel()):
        i = int(index[j])
        if i >= 0:
            for o, v in zip(out, values):
                o[i] = v[j]
    return out
