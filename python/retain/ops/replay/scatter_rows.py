"""``retain.ops.scatter_rows_``: writes a batch into several storage tensors at once, custom op
``retain::scatter_rows_`` (csrc/replay/rows.h)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from retain.ops import _dispatch
from retain.ops._checks import dtype_name
from retain.ops.fisher._lists import check_list
from retain.ops.replay import _rows, reference

_OP = "retain.ops.scatter_rows_"


@torch.library.custom_op("retain::scatter_rows_", mutates_args=("fields",))
def scatter_rows_op(fields: list[Tensor], index: Tensor, values: list[Tensor]) -> None:
    """fields[f][index[j]] = values[f][j] for index[j] >= 0, the last of repeated indices winning.
    This body is the fallback, by the reference."""
    _dispatch.fallback("rows_copy", index)
    _rows.check_range(_OP, index, fields[0].shape[0], -1)
    with torch.no_grad():
        for f, new in zip(fields, reference.scatter_rows_ref(fields, index, values)):
            f.copy_(new)


@scatter_rows_op.register_fake
def _(fields, index, values):
    return None


def _kernel(fields, index, values):
    if any(not f.is_contiguous() for f in fields):  # written in place: the caller's tensor itself
        raise ValueError(f"{_OP}: every field must be contiguous (it is written in place), got strides "
                         f"{[f.stride() for f in fields]}")
    _rows.scatter(fields, index.contiguous(), [v.contiguous() for v in values])


def scatter_rows_(fields: Sequence[Tensor], index: Tensor, values: Sequence[Tensor]) -> Sequence[Tensor]:
    r"""Write row j of every ``values[f]`` into row ``index[j]`` of ``fields[f]``, in place, in one
    native call; ``index[j] = -1`` skips the row (what :func:`reservoir_slots` returns for an item
    not kept), and of repeated indices the last one wins.

    Args:
        fields: contiguous storage tensors ``[capacity, ...]``, one capacity, one device.
        index: integer ``[k]`` on that device, each in ``[-1, capacity)``.
        values: one tensor ``[k, *fields[f].shape[1:]]`` per field, of its dtype.

    Returns:
        ``fields`` (the same list, written).

    Examples::

        >>> x, y = torch.zeros(3, 2), torch.zeros(3, dtype=torch.long)
        >>> retain.ops.scatter_rows_([x, y], torch.tensor([2, -1, 0]),
        ...                          [torch.tensor([[1., 1.], [5., 5.], [2., 2.]]), torch.tensor([7, 8, 9])])
        [tensor([[2., 2.],
                [0., 0.],
                [1., 1.]]), tensor([9, 0, 7])]
    """
    fields = _rows.check_fields(_OP, fields, index)
    values = check_list(_OP, "values", values, ref_name="fields", ref=fields)
    for i, (f, v) in enumerate(zip(fields, values)):
        want = (index.shape[0], *f.shape[1:])
        if tuple(v.shape) != want:
            raise ValueError(f"{_OP}: values[{i}] must have shape {want} (index's length, then fields[{i}]'s row), "
                             f"got {tuple(v.shape)}")
        if v.dtype != f.dtype:
            raise TypeError(f"{_OP}: values[{i}] must have fields[{i}]'s dtype {dtype_name(f)}, got {dtype_name(v)}")
        if v.device != f.device:
            raise ValueError(f"{_OP}: values[{i}] must be on fields[{i}]'s device {f.device}, got {v.device}")
        if not f.is_contiguous():
            raise ValueError(f"{_OP}: fields[{i}] must be contiguous (it is written in place), got strides "
                             f"{f.stride()} for shape {tuple(f.shape)}")
    if index.device.type != "cpu" and not torch.compiler.is_compiling():  # the CPU kernel checks itself
        _rows.check_range(_OP, index, fields[0].shape[0], -1)
    scatter_rows_op(fields, index.to(torch.int64), values)
    return fields


_dispatch.register_kernels(scatter_rows_op, "rows_copy", _kernel)
