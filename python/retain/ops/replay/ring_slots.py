"""``retain.ops.ring_slots``: first-in first-out slots (a ring buffer)."""

from __future__ import annotations

import torch
from torch import Tensor

from retain.ops._checks import check_int

_OP = "retain.ops.ring_slots"


def ring_slots(n_seen: int, batch: int, capacity: int, *, device: torch.device | str | None = None) -> Tensor:
    r"""The slot of each of ``batch`` new items in a ring buffer: item ``i`` (arrival number
    ``n_seen + j``) goes to ``i mod capacity``, overwriting the oldest. In a batch longer than the
    ring the later of two items with the same slot wins and the earlier gets -1 (the slots returned
    are distinct, as :func:`reservoir_slots`').

    Args:
        n_seen: items that arrived before this batch (>= 0).
        batch: items arriving now (>= 0).
        capacity: slots in the ring (>= 1).
        device: where the returned tensor lives.

    Returns:
        int64 ``[batch]``.

    Examples::

        >>> retain.ops.ring_slots(3, 4, 4)
        tensor([3, 0, 1, 2])
        >>> retain.ops.ring_slots(0, 6, 4)          # the first two are overwritten in the same batch
        tensor([-1, -1,  2,  3,  0,  1])
    """
    n_seen = check_int(_OP, "n_seen", n_seen, minimum=0)
    batch = check_int(_OP, "batch", batch, minimum=0)
    capacity = check_int(_OP, "capacity", capacity, minimum=1)
    i = torch.arange(n_seen, n_seen + batch, dtype=torch.int64, device=device)
    return torch.where(i >= n_seen + batch - capacity, i % capacity, -1)
