"""``retain.ops.reservoir_slots``: exact reservoir sampling (Algorithm R) for a batch of arrivals,
decided natively in one call (csrc/replay/slots.h)."""

from __future__ import annotations

import torch
from torch import Tensor

from retain import _native
from retain.ops._checks import check_int
from retain.ops.replay import _common, reference

_OP = "retain.ops.reservoir_slots"


def reservoir_slots(n_seen: int, batch: int, capacity: int, *, generator: torch.Generator | None = None,
                    device: torch.device | str | None = None) -> Tensor:
    r"""The buffer slot of each of ``batch`` new items under reservoir sampling, -1 for an item not
    kept.

    Item ``i`` (its 0-based arrival number, ``n_seen + j`` for the j-th of the batch) goes to slot
    ``i`` while the buffer fills (``i < capacity``), afterwards to a slot drawn uniformly from
    ``[0, i]`` when it falls below ``capacity`` — Vitter's Algorithm R, so after ``n`` arrivals every
    item seen is in the buffer with probability ``min(1, capacity / n)``. The bounded draws are exact
    (no modulo or floating-point bias). When two items of the batch draw the same slot the later one
    wins and the earlier gets -1, so the slots returned are distinct.

    Args:
        n_seen: items that arrived before this batch (>= 0); the caller adds ``batch`` afterwards.
        batch: items arriving now (>= 0).
        capacity: slots in the buffer (>= 1).
        generator: the source of randomness (one 63-bit seed is drawn from it per call; torch's
            default generator when None), so a seed fixes the result and restoring the generator's
            state resumes the sampling exactly.
        device: where the returned tensor lives (the decision is made on the CPU).

    Returns:
        int64 ``[batch]``: the slot of each item, or -1.

    Examples::

        >>> g = torch.Generator().manual_seed(0)
        >>> retain.ops.reservoir_slots(0, 3, 4, generator=g)      # filling: the first free slots
        tensor([0, 1, 2])
        >>> s = retain.ops.reservoir_slots(100, 1000, 4, generator=g)
        >>> bool(((s >= -1) & (s < 4)).all()), int((s >= 0).sum()) <= 4
        (True, True)
    """
    n_seen = check_int(_OP, "n_seen", n_seen, minimum=0)
    batch = check_int(_OP, "batch", batch, minimum=0)
    capacity = check_int(_OP, "capacity", capacity, minimum=1)
    _common.check_generator(_OP, generator)
    seed = _common.draw_seed(generator)
    if _common.native(_OP, "reservoir_slots"):
        slots = torch.empty(batch, dtype=torch.int64)
        _native.lib().reservoir_slots_cpu(n_seen, batch, capacity, seed, slots.data_ptr() if batch else 0,
                                          _native.num_threads())
    else:
        slots = reference.reservoir_slots_ref(n_seen, batch, capacity, seed)
    return slots if device is None else slots.to(device)
