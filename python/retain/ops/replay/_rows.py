"""What gather_rows and scatter_rows_ share: the checks of a buffer's fields and the native call
over the table of their pointers (csrc/replay/rows.h)."""

from __future__ import annotations

import math
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
            raise ValueError(f"{op}: every field must have the rows of fields[0] ({cap}), got {f.shape[0]} for "
                             f"fields[{i}]")
        if f.device != index.device:
            raise ValueError(f"{op}: fields[{i}] must be on index's device {index.device}, got {f.device}")
    return fields


def check_range(op: str, index: Tensor, capacity: int, lowest: int) -> None:
    """Indices in [lowest, capacity): a host check on the CPU, an asynchronous device assert on CUDA
    (the CPU kernel checks them itself before copying anything)."""
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
    """The native row copy between the fields and the batch tensors (both contiguous; on CUDA the
    indices in range and, for scatters, distinct apart from -1)."""
    device = index.device
    table = []
    for f, b in zip(fields, batch):
        table += (f.data_ptr() if f.numel() else 0, b.data_ptr() if b.numel() else 0,
                  math.prod(f.shape[1:]) * f.element_size())
    tab = torch.tensor(table, dtype=torch.int64)
    k = index.numel()
    if device.type == "cpu":
        bad = _native.lib().rows_copy_cpu(tab.data_ptr(), len(fields), index.data_ptr() if k else 0, k,
                                          fields[0].shape[0], scatter, _native.num_threads())
        if bad:  # nothing was copied
            op = "retain.ops.scatter_rows_" if scatter else "retain.ops.gather_rows"
            check_range(op, index, fields[0].shape[0], -1 if scatter else 0)
    else:
        tab = tab.to(device)
        _dispatch.run("rows_copy", device, tab.data_ptr(), len(fields), index.data_ptr() if k else 0, k, scatter)


def gather(fields: Sequence[Tensor], index: Tensor) -> list[Tensor]:
    """The rows of contiguous ``fields`` at ``index`` (int64, contiguous, in range on CUDA)."""
    out = [torch.empty((index.shape[0], *f.shape[1:]), dtype=f.dtype, device=f.device) for f in fields]
    copy(fields, index, out, scatter=False)
    return out


def _last_writers(index: Tensor) -> Tensor:
    """``index`` with all but the last of repeated values replaced by -1."""
    pos = torch.arange(index.numel(), device=index.device)
    uniq, inverse = torch.unique(torch.where(index >= 0, index, 0), return_inverse=True)
    last = torch.full((uniq.numel(),), -1, dtype=torch.int64, device=index.device)
    last.scatter_reduce_(0, inverse, pos, reduce="amax", include_self=True)
    return torch.where((index >= 0) & (last[inverse] == pos), index, -1)


def scatter(fields: Sequence[Tensor], index: Tensor, values: Sequence[Tensor], *, distinct: bool = False) -> None:
    """``fields[f][index[j]] = values[f][j]`` (contiguous tensors, int64 index). CUDA blocks copy
    rows concurrently, so there repeated indices are first reduced to their last occurrence unless
    the caller knows them ``distinct`` (slots from the slot functions are); the CPU kernel keeps the
    order itself."""
    if index.device.type != "cpu" and not distinct:
        index = _last_writers(index)
    copy(fields, index, values, scatter=True)
