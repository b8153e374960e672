"""Scan family: associative-memory recurrences (memory_scan and its named ops) and the
first-order linear recurrence."""

from __future__ import annotations

import torch

from retain.ops._checks import check_floating, check_same, check_shape, check_tensor
from retain.ops.scan._memory import delta_rule, gated_delta_rule, linear_attn, memory_scan, titans_linear
from retain.ops.scan._ops import linear_recurrence_op

__all__ = ["delta_rule", "gated_delta_rule", "linear_attn", "linear_recurrence", "memory_scan", "titans_linear"]


def linear_recurrence(
    a: torch.Tensor, x: torch.Tensor, *, initial: torch.Tensor | None = None, reverse: bool = False
) -> torch.Tensor:
    r"""First-order linear recurrence along dim 1: :math:`h_t = a_t \odot h_{t-1} + x_t`.

    The scan behind Titans' momentum, Mamba-style selective state updates and minGRU.

    Args:
        a: gates ``[B, T, *]``; same shape, dtype and device as ``x``. To share a gate across
            features, pass ``a.expand_as(x)`` (it is copied; gradients reduce through the expand).
        x: inputs ``[B, T, *]`` (at least 2 dimensions), float32, float64, bfloat16 or float16.
            bfloat16/float16 are computed with a float32 state and rounded on store.
        initial: optional state before the first step, ``[B, *]``, with gradient.
        reverse: scan from t = T-1 down to 0: :math:`h_t = a_t \odot h_{t+1} + x_t`.

    Returns:
        ``h`` with the shape and dtype of ``x``. The final state is ``h[:, -1]`` (``h[:, 0]`` when
        ``reverse``).

    Gradients flow to ``a``, ``x`` and ``initial``; the backward pass is the same recurrence run in
    the other direction (one fused native pass; derivation in ``csrc/scan/README.md``).
    Non-contiguous inputs are copied to contiguous memory first. ``T == 0`` (or any empty
    dimension) returns an empty result. NaN and Inf propagate as IEEE arithmetic dictates; nothing
    is checked or clamped.

    Examples::

        >>> a = torch.full((1, 4, 2), 0.5)
        >>> x = torch.ones(1, 4, 2)
        >>> retain.ops.linear_recurrence(a, x)[0, :, 0]
        tensor([1.0000, 1.5000, 1.7500, 1.8750])
    """
    op = "retain.ops.linear_recurrence"
    check_tensor(op, "x", x, ndim_min=2)
    check_tensor(op, "a", a)
    check_floating(op, "x", x)
    check_same(op, "x", x, a=a)
    check_shape(op, "a", a, x.shape, "the shape of x")
    if initial is not None:
        check_tensor(op, "initial", initial)
        check_same(op, "x", x, initial=initial)
        check_shape(op, "initial", initial, (x.shape[0], *x.shape[2:]), "x.shape without the time dimension 1")
    if not isinstance(reverse, bool):
        raise TypeError(f"{op}: reverse must be a bool, got {type(reverse).__name__}")
    return linear_recurrence_op(a, x, initial, reverse)
