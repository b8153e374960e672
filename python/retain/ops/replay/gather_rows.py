"""``retain.ops.gather_rows``: rows of several storage tensors at once (a replay batch), custom op
``retain::gather_rows`` (csrc/replay/rows.h)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from retain.ops import _dispatch
from retain.ops.replay import _rows, reference

_OP = "retain.ops.gather_rows"


@torch.library.custom_op("retain::gather_rows", mutates_args=())
def gather_rows_op(fields: list[Tensor], index: Tensor) -> list[Tensor]:
    """out[f][j] = fields[f][index[j]]. This body is the fallback, by the reference."""
    _dispatch.fallback("rows_copy", index)
    _rows.check_range(_OP, index, fields[0].shape[0], 0)
    return reference.gather_rows_ref(fields, index)


@gather_rows_op.register_fake
def _(fields, index):
    return [f.new_empty((index.shape[0], *f.shape[1:])) for f in fields]


def _setup(ctx, inputs, output):
    fields, index = inputs
    ctx.save_for_backward(index)
    ctx.rows = [(f.shape, f.dtype) for f in fields]


def _backward(ctx, grads):
    """Each field's gradient: the rows' gradients added at their indices (repeats add up). Plain
    PyTorch, so higher derivatives follow."""
    (index,) = ctx.saved_tensors
    out = []
    for (shape, dtype), g in zip(ctx.rows, grads):
        if g is None or not dtype.is_floating_point:
            out.append(None)
        else:
            out.append(g.new_zeros(shape).index_add(0, index, g))
    return out, None


gather_rows_op.register_autograd(_backward, setup_context=_setup)


def _kernel(fields, index):
    return _rows.gather([f.contiguous() for f in fields], index.contiguous())


def gather_rows(fields: Sequence[Tensor], index: Tensor) -> list[Tensor]:
    r"""``[f[index] for f in fields]`` in one native call: the rows of every field of a buffer at
    the sampled indices (threads split the rows; on CUDA one launch for all fields).

    Args:
        fields: storage tensors ``[capacity, ...]``, any dtypes and row shapes, one capacity, one
            device (uint8 quantised activations, int64 labels and float logits alike).
        index: integer ``[k]`` on the fields' device, each in ``[0, capacity)`` (an IndexError
            otherwise; on CUDA a device-side assert).

    Returns:
        one new tensor ``[k, ...]`` per field; differentiable in floating fields (the gradient adds
        each row's gradient at its index), to any order.

    Examples::

        >>> x, y = torch.arange(12.).reshape(4, 3), torch.tensor([10, 11, 12, 13])
        >>> retain.ops.gather_rows([x, y], torch.tensor([3, 0]))
        [tensor([[ 9., 10., 11.],
                [ 0.,  1.,  2.]]), tensor([13, 10])]
    """
    fields = _rows.check_fields(_OP, fields, index)
    if index.device.type != "cpu" and not torch.compiler.is_compiling():  # the CPU kernel checks itself
        _rows.check_range(_OP, index, fields[0].shape[0], 0)
    return gather_rows_op(fields, index.to(torch.int64))


_dispatch.register_kernels(gather_rows_op, "rows_copy", _kernel)
