"""Lists of tensors for the fisher family: the argument checks every multi-tensor op shares, the
grouping of a call by dtypes (one native pass per (data dtype, state dtype) pair) and the table
the kernels read (csrc/fisher/tensor_table.h)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from retain import _native
from retain.ops import _dispatch
from retain.ops._checks import dtype_name

STATE_DTYPES = (torch.float32, torch.float64)


def _what(x) -> str:
    if isinstance(x, (list, tuple)):
        kinds = sorted({type(t).__name__ for t in x if not isinstance(t, Tensor)})
        return f"a {type(x).__name__} holding {', '.join(kinds)}"
    return type(x).__name__


def check_list(op: str, name: str, xs, *, ref_name: str | None = None, ref: Sequence[Tensor] | None = None,
               optional: bool = False) -> list[Tensor] | None:
    """``xs`` is a list (or tuple) of tensors, as long as ``ref`` when given; None only when
    ``optional``. Returns it as a list."""
    if xs is None and optional:
        return None
    if isinstance(xs, Tensor):
        raise TypeError(f"{op}: {name} must be a list of tensors (one per parameter), got a single tensor "
                        f"(wrap it in a list: [{name}])")
    if not isinstance(xs, (list, tuple)) or not all(isinstance(t, Tensor) for t in xs):
        raise TypeError(f"{op}: {name} must be a list of tensors, got {_what(xs)}")
    if ref is not None and len(xs) != len(ref):
        raise ValueError(f"{op}: {name} must have one tensor per tensor of {ref_name} ({len(ref)}), got {len(xs)}")
    return list(xs)


def check_shapes(op: str, name: str, xs: Sequence[Tensor], ref_name: str, ref: Sequence[Tensor]) -> None:
    for i, (t, r) in enumerate(zip(xs, ref)):
        if t.shape != r.shape:
            raise ValueError(f"{op}: {name}[{i}] must have {ref_name}[{i}]'s shape {tuple(r.shape)}, "
                             f"got {tuple(t.shape)}")


def check_device(op: str, lists: dict[str, Sequence[Tensor] | None]) -> torch.device | None:
    """Every tensor of every list on one device (the first tensor's); returns it (None: no tensor)."""
    device, first = None, None
    for name, xs in lists.items():
        for i, t in enumerate(xs or ()):
            if device is None:
                device, first = t.device, f"{name}[{i}]"
            elif t.device != device:
                raise ValueError(f"{op}: every tensor must be on one device ({first}'s {device}), got {t.device} "
                                 f"for {name}[{i}]")
    return device


def check_state(op: str, name: str, xs: Sequence[Tensor] | None, *, updated: bool) -> None:
    """State tensors (Fisher, mu, omega, ...): float32 or float64; contiguous when updated in place."""
    for i, t in enumerate(xs or ()):
        if t.dtype not in STATE_DTYPES:
            raise TypeError(f"{op}: {name}[{i}] must be float32 or float64 (the accumulation dtype), "
                            f"got {dtype_name(t)}")
        if updated and not t.is_contiguous():
            raise ValueError(f"{op}: {name}[{i}] must be contiguous (it is updated in place), got strides "
                             f"{t.stride()} for shape {tuple(t.shape)}")
        if updated and t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{op}: {name}[{i}] requires grad; state updated in place must not (detach it, or "
                             f"call under torch.no_grad())")


def check_data(op: str, name: str, xs: Sequence[Tensor] | None) -> None:
    """Data tensors (gradients, parameters): a dtype the kernels take."""
    for i, t in enumerate(xs or ()):
        if t.dtype not in _native.KERNEL_DTYPES:
            raise TypeError(f"{op}: {name}[{i}] must be a floating tensor "
                            f"({', '.join(dtype_name(d) for d in _native.KERNEL_DTYPES)}), got {dtype_name(t)}")


def check_same_dtype(op: str, name: str, xs: Sequence[Tensor] | None, ref_name: str, ref: Sequence[Tensor]) -> None:
    for i, (t, r) in enumerate(zip(xs or (), ref)):
        if t.dtype != r.dtype:
            raise TypeError(f"{op}: {name}[{i}] must have {ref_name}[{i}]'s dtype {dtype_name(r)}, got {dtype_name(t)}")


def check_samples(op: str, name: str, grads: Sequence[Tensor], ref_name: str, ref: Sequence[Tensor]) -> int:
    """Gradients of ``ref``'s shapes (one each: returns 1) or ``(S, *shape)`` for one S >= 0 (S
    per-sample gradients: returns S)."""
    samples = None
    for i, (g, r) in enumerate(zip(grads, ref)):
        if g.shape == r.shape:
            s = -1  # a single gradient
        elif g.dim() == r.dim() + 1 and g.shape[1:] == r.shape:
            s = g.shape[0]
        else:
            raise ValueError(f"{op}: {name}[{i}] must have {ref_name}[{i}]'s shape {tuple(r.shape)} (one gradient) "
                             f"or (S, *{tuple(r.shape)}) (S per-sample gradients), got {tuple(g.shape)}")
        if samples is None:
            samples, first = s, i
        elif s != samples:
            raise ValueError(f"{op}: {name} must hold one gradient per tensor or the same number of samples S for "
                             f"every tensor, got shape {tuple(grads[first].shape)} for {name}[{first}] and "
                             f"{tuple(g.shape)} for {name}[{i}]")
    return 1 if samples is None or samples < 0 else samples


def groups(data: Sequence[Tensor], state: Sequence[Tensor]) -> dict[tuple[torch.dtype, torch.dtype], list[int]]:
    """The tensor indices of each (data dtype, state dtype) pair, in order of first appearance: one
    native call each."""
    out: dict[tuple[torch.dtype, torch.dtype], list[int]] = {}
    for i, (d, s) in enumerate(zip(data, state)):
        out.setdefault((d.dtype, s.dtype), []).append(i)
    return out


def chunk() -> int:
    return _native.lib().fisher_chunk


def table(slots: Sequence[Sequence[Tensor] | None], idx: Sequence[int], numels: Sequence[int],
          device: torch.device) -> tuple[Tensor, int, int]:
    """(table, n, chunks) for the tensors ``idx`` of each slot's list (None or []: absent), laid out
    as csrc/fisher/tensor_table.h says, on ``device``. The caller holds the table (and every
    listed tensor) until the kernel has run."""
    size = chunk()
    counts = [numels[i] for i in idx]
    first, total = [], 0
    for n in counts:
        first.append(total)
        total += -(-n // size)
    ptrs, present = [], 0
    for k, xs in enumerate(slots):
        ptrs += [xs[i].data_ptr() for i in idx] if xs else [0] * len(idx)
        present |= (1 << k) if xs else 0
    t = torch.tensor(counts + first + [total, present] + ptrs, dtype=torch.int64)
    return (t if device.type == "cpu" else t.to(device)), len(idx), total


def call(entry: str, device: torch.device, tab: tuple[Tensor, int, int], data_dtype: torch.dtype,
         state_dtype: torch.dtype, *args) -> None:
    """The native ``entry`` over the tensors of ``tab`` (from :func:`table`, held by the caller)."""
    t, n, chunks = tab
    _dispatch.run(entry, device, _native.DTYPE_CODES[data_dtype], _native.DTYPE_CODES[state_dtype], t.data_ptr(), n,
                  chunks, *args)


def contiguous(xs: Sequence[Tensor] | None) -> list[Tensor]:
    """Inputs the kernels read: contiguous (a copy where needed); None becomes []."""
    return [t.contiguous() for t in xs] if xs else []
