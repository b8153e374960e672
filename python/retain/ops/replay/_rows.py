"""What gather_rows and scatter_rows_ share: the checks of a buffer's fields and the native call
over the table of their pointers (csrc/replay/rows.h)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from retain import _native
from retain.ops import _dispatch
from retain.ops._checks import check_tensor, dtype_name
from retain.ops.fisher._lists import check_list


def check_fields(op: str, fields, index) -> list[Tensor]:
    """Contiguous storage tensors ``[capacity, ...]`` (one capacity) on one device, and an integer
    index ``[k]`` there."""
    fields = check_list(op, "fields", fields)
    if not fields:
        raise ValueError(f"{op}: fields must hold at least one tensor, got an empty list")
    check_tensor(op, "index", index, ndim=1)
    if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        raise TypeError(f"{op}: index must be an integer tensor, got {dtype_name(index)}")
    cap = None
    for i, f in enumerate(fields):
        if f.dim() == 0:
            raise ValueError(f"{op}: fields[{i}] must have a first (row) dimension, got a 0-d tensor")
        if cap is None:
            cap = f.shape[0]
        elif f.shape[0] != cap:
            raise ValueError(f"{op}: every field must have fields[0]'s {cap} rows, fields[{i}] has {f.shape[0]}")
        if f.device != index.device:
            raise ValueError(f"{op}: fields[{i}] must be on index's device {index.device}, got {f.device}")
    return fields


def check_range(op: str, index: Tensor, capacity: int, lowest: int) -> None:
    """Indices in [lowest, capacity): a host check on the CPU, an asynchronous device assert on CUDA."""
    if index.numel() == 0:
        return
    if index.device.type == "cpu":
        lo, hi = int(index.min()), int(index.max())
        if lo < lowest or hi >= capacity:
            raise IndexError(f"{op}: index must be in [{lowest}, {capacity}) (the fields' rows), got "
                             f"{lo if lo < lowest else hi}")
    else:
        torch._assert_async(((index >= lowest) & (index < capacity)).all(),
                            f"{op}: index must be in [{lowest}, {capacity})")


def copy(fields: Sequence[Tensor], index: Tensor, batch: Sequence[Tensor], scatter: bool) -> None:
    """The native row copy between the fields and the batch tensors (both contiguous)."""
    device = index.device
    rows = [(f.data_ptr() if f.numel() else 0, b.data_ptr() if b.numel() else 0,
             (f[0].numel() if f.shape[0] else 0) * f.element_size()) for f, b in zip(fields, batch)]
    table = torch.tensor(rows, dtype=torch.int64).reshape(-1)
    if device.type == "cpu":
        bad = _native.lib().rows_copy_cpu(table.data_ptr(), len(rows), _dispatch.ptr(index), index.numel(),
                                          fields[0].shape[0], scatter, _native.num_threads())
        if bad:
            op = "retain.ops.scatter_rows_" if scatter else "retain.ops.gather_rows"
            raise IndexError(f"{op}: {bad} index value(s) out of range [{-1 if scatter else 0}, {fields[0].shape[0]})")
    else:
        table = table.to(device)
        _dispatch.run("rows_copy", device, table.data_ptr(), len(rows), _dispatch.ptr(index), index.numel(), scatter)
