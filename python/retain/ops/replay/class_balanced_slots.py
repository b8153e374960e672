"""``retain.ops.class_balanced_slots``: class-balanced reservoir sampling (CBRS), decided natively in
one call (csrc/replay/slots.h), and the state it keeps between calls."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from retain import _native
from retain.ops._checks import check_tensor, dtype_name
from retain.ops._checks import check_int
from retain.ops.replay import _common, reference

_OP = "retain.ops.class_balanced_slots"


@dataclass
class ClassBalancedState:
    """What :func:`class_balanced_slots` remembers between calls (CPU tensors, updated in place):
    ``slot_labels`` int64 ``[capacity]`` (the class in each slot, -1 while empty), ``counts`` and
    ``seen`` int64 ``[classes]`` (stored and arrived per class), ``full`` bool ``[classes]`` (classes
    that were the largest once the memory was full; they stay full), ``size`` int64 ``[]`` (slots filled)."""

    slot_labels: Tensor
    counts: Tensor
    seen: Tensor
    full: Tensor
    size: Tensor

    @classmethod
    def empty(cls, capacity: int, classes: int) -> ClassBalancedState:
        capacity = check_int("retain.ops.ClassBalancedState", "capacity", capacity, minimum=1)
        classes = check_int("retain.ops.ClassBalancedState", "classes", classes, minimum=1)
        z = torch.zeros(classes, dtype=torch.int64)
        return cls(torch.full((capacity,), -1, dtype=torch.int64), z, z.clone(), torch.zeros(classes, dtype=torch.bool),
                   torch.zeros((), dtype=torch.int64))

    @property
    def capacity(self) -> int:
        return self.slot_labels.numel()

    @property
    def classes(self) -> int:
        return self.counts.numel()

    def check(self, op: str) -> None:
        """The tensors the kernel writes through raw pointers: CPU, contiguous, of their dtypes and
        consistent sizes (a hand-built state must not corrupt memory)."""
        specs = (("slot_labels", torch.int64, None), ("counts", torch.int64, self.classes),
                 ("seen", torch.int64, self.classes), ("full", torch.bool, self.classes), ("size", torch.int64, None))
        for name, dtype, n in specs:
            t = getattr(self, name)
            if not isinstance(t, Tensor) or t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous():
                raise TypeError(f"{op}: state.{name} must be a contiguous CPU {dtype_name(dtype)} tensor, got "
                                f"{t.dtype if isinstance(t, Tensor) else type(t).__name__}")
            if (n is not None and t.shape != (n,)) or (name == "size" and t.dim() != 0) or \
                    (name == "slot_labels" and (t.dim() != 1 or t.numel() < 1)):
                raise ValueError(f"{op}: state.{name} has shape {tuple(t.shape)}, inconsistent with the state "
                                 f"(build it with ClassBalancedState.empty)")

    def state_dict(self) -> dict[str, Tensor]:
        return {k: getattr(self, k).clone() for k in ("slot_labels", "counts", "seen", "full", "size")}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for k in ("slot_labels", "counts", "seen", "full", "size"):
            want = getattr(self, k)
            got = state.get(k) if isinstance(state, dict) else None
            if not isinstance(got, Tensor) or got.shape != want.shape or got.dtype != want.dtype:
                raise ValueError(f"retain.ops.ClassBalancedState.load_state_dict: {k} must be a {dtype_name(want)} "
                                 f"tensor of shape {tuple(want.shape)}, got "
                                 f"{got.dtype if isinstance(got, Tensor) else type(got).__name__} "
                                 f"{tuple(got.shape) if isinstance(got, Tensor) else ''}")
            want.copy_(got)


def class_balanced_slots(labels: Tensor, state: ClassBalancedState, *, generator: torch.Generator | None = None,
                         device: torch.device | str | None = None) -> Tensor:
    r"""The buffer slot of each new item under class-balanced reservoir sampling (CBRS, Chrysakis &
    Moens, ICML 2020), -1 for an item not kept; ``state`` is updated in place.

    While the memory fills every item is stored. Once it is full, the currently largest classes are
    marked *full* (and stay so). An item of a class that is not full replaces a uniformly random
    stored item of a largest class (uniform among tied classes): memory moves to the classes that
    have less. An item of a full class ``c`` is kept with probability ``counts[c] / seen[c]`` and
    then replaces a random stored item of its own class (reservoir sampling inside the class). As
    in :func:`reservoir_slots`, the later of two items of the batch with the same slot wins.

    Args:
        labels: integer ``[batch]``, each in ``[0, state.classes)``.
        state: a :class:`ClassBalancedState` (``ClassBalancedState.empty(capacity, classes)``).
        generator: randomness, one seed per call (torch's default generator when None).
        device: where the returned tensor lives (the decision is made on the CPU).

    Returns:
        int64 ``[batch]``.

    Examples::

        >>> st = retain.ops.ClassBalancedState.empty(capacity=4, classes=2)
        >>> g = torch.Generator().manual_seed(0)
        >>> retain.ops.class_balanced_slots(torch.tensor([0, 0, 0, 0]), st, generator=g)
        tensor([0, 1, 2, 3])
        >>> s = retain.ops.class_balanced_slots(torch.tensor([1, 1]), st, generator=g)  # class 1 takes from class 0
        >>> st.counts.tolist(), bool((s >= 0).all())
        ([2, 2], True)
    """
    check_tensor(_OP, "labels", labels, ndim=1, data=True)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{_OP}: labels must be an integer tensor, got {dtype_name(labels)}")
    if not isinstance(state, ClassBalancedState):
        raise TypeError(f"{_OP}: state must be a retain.ops.ClassBalancedState, got {type(state).__name__}")
    state.check(_OP)
    _common.check_generator(_OP, generator)
    y = labels.to("cpu", torch.int64).contiguous()
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= state.classes):
        bad = y[(y < 0) | (y >= state.classes)][0]
        raise ValueError(f"{_OP}: labels must be in [0, {state.classes}) (the state's classes), got {int(bad)}")
    seed = _common.draw_seed(generator)
    if _common.native(_OP, "class_balanced_slots"):
        slots = torch.empty(y.numel(), dtype=torch.int64)
        p = lambda t: t.data_ptr()  # noqa: E731
        _native.lib().class_balanced_slots_cpu(p(y) if y.numel() else 0, y.numel(), state.classes, state.capacity,
                                               p(state.slot_labels), p(state.counts), p(state.seen), p(state.full),
                                               p(state.size), seed, p(slots) if y.numel() else 0, _native.num_threads())
    else:
        lists = [state.slot_labels.tolist(), state.counts.tolist(), state.seen.tolist(),
                 [int(f) for f in state.full.tolist()]]
        slots, size = reference.class_balanced_slots_ref(y.tolist(), *lists, int(state.size), seed)
        for t, v in zip((state.slot_labels, state.counts, state.seen, state.full), lists):
            t.copy_(torch.tensor(v, dtype=t.dtype))
        state.size.fill_(size)
    return slots if device is None else slots.to(device)
