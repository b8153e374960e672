"""``retain.ops.linear_recurrence``: h_t = a_t * h_{t-1} + x_t along dim 1 (custom ops
``retain::linear_recurrence`` and its backward; derivation in csrc/scan/README.md)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from retain import _native
from retain.ops import _dispatch
from retain.ops._checks import check_floating, check_same, check_shape, check_tensor
from retain.ops.scan import reference

_OP = "linear_recurrence"


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


def _sizes(x: Tensor) -> tuple[int, int, int]:
    """[B, T, *] as (B, T, D): the trailing dimensions are one feature axis."""
    return x.shape[0], x.shape[1], math.prod(x.shape[2:])


@torch.library.custom_op("retain::linear_recurrence", mutates_args=())
def linear_recurrence_op(a: Tensor, x: Tensor, initial: Tensor | None, reverse: bool) -> Tensor:
    """h_t = a_t * h_{t-1} + x_t over dim 1 of [B, T, *]; inputs share shape, dtype and device.
    This body is the fallback; the native kernels are registered below."""
    _dispatch.fallback(_OP, x)
    return reference.linear_recurrence_ref(a, x, initial=initial, reverse=reverse).contiguous()


def _forward(a: Tensor, x: Tensor, initial: Tensor | None, reverse: bool) -> Tensor:
    a, x, initial = _dispatch.contiguous(a, x, initial)
    h = _native.empty_like(x)
    if h.numel():
        _dispatch.run("linear_recurrence_fwd", x.device, _dispatch.dtype_code(x), a.data_ptr(), x.data_ptr(),
                      _dispatch.ptr(initial), h.data_ptr(), *_sizes(x), reverse)
    return h


@linear_recurrence_op.register_fake
def _(a: Tensor, x: Tensor, initial: Tensor | None, reverse: bool) -> Tensor:
    return _native.fake_empty_like(x)


@torch.library.custom_op("retain::linear_recurrence_backward", mutates_args=())
def linear_recurrence_backward_op(
    grad_h: Tensor, a: Tensor, h: Tensor, initial: Tensor | None, reverse: bool, need_grad_a: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_x, grad_a, grad_initial) of linear_recurrence. grad_a is empty when not needed,
    grad_initial is empty when ``initial`` is None. This body is the fallback: the same
    recurrence run the other way, in PyTorch."""
    _dispatch.fallback(_OP, h)
    # lambda_t = grad_h_t + a_{t+1} lambda_{t+1}: the recurrence run the other way, a shifted one step.
    a_shift = torch.zeros_like(a)
    h_prev = torch.zeros_like(h)
    if reverse:  # lambda_t = grad_h_t + a_{t-1} lambda_{t-1}, h_prev_t = h_{t+1}
        a_shift[:, 1:] = a[:, :-1]
        h_prev[:, :-1] = h[:, 1:]
        first = (slice(None), slice(-1, None))
    else:
        a_shift[:, :-1] = a[:, 1:]
        h_prev[:, 1:] = h[:, :-1]
        first = (slice(None), slice(0, 1))
    if initial is not None:
        h_prev[first] = initial.unsqueeze(1)
    grad_x = reference.linear_recurrence_ref(a_shift, grad_h, reverse=not reverse)
    grad_a = grad_x * h_prev if need_grad_a else h.new_empty(0)
    grad_initial = (a[first] * grad_x[first]).squeeze(1) if initial is not None else h.new_empty(0)
    return grad_x.contiguous(), grad_a.contiguous(), grad_initial.contiguous()


def _backward_kernel(grad_h, a, h, initial, reverse, need_grad_a):
    grad_h, a, h, initial = _dispatch.contiguous(grad_h, a, h, initial)
    grad_x, grad_a, grad_initial = _grad_buffers(h, initial, need_grad_a, _native.empty_like)
    if h.numel() == 0:  # nothing depends on initial when T == 0
        return grad_x, grad_a, grad_initial.zero_()
    _dispatch.run("linear_recurrence_bwd", h.device, _dispatch.dtype_code(h), a.data_ptr(), h.data_ptr(),
                  _dispatch.ptr(initial), grad_h.data_ptr(), grad_x.data_ptr(), _dispatch.ptr(grad_a),
                  _dispatch.ptr(grad_initial), *_sizes(h), reverse)
    return grad_x, grad_a, grad_initial


@linear_recurrence_backward_op.register_fake
def _(grad_h, a, h, initial, reverse, need_grad_a):
    return _grad_buffers(h, initial, need_grad_a, _native.fake_empty_like)


def _grad_buffers(h, initial, need_grad_a, empty):
    """(grad_x, grad_a, grad_initial) outputs; the unwanted ones are empty tensors."""
    return (empty(h), _dispatch.empty_or_nothing(h, need_grad_a, empty, h),
            _dispatch.empty_or_nothing(initial, True, empty, h))


def _setup_context(ctx, inputs, output):
    a, x, initial, reverse = inputs
    ctx.reverse = reverse
    ctx.has_initial = initial is not None
    ctx.save_for_backward(a, output, initial)


def _backward(ctx, grad_h):
    a, h, initial = ctx.saved_tensors
    need_a, _, need_initial = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    grad_x, grad_a, grad_initial = linear_recurrence_backward_op(grad_h, a, h, initial, ctx.reverse, need_a)
    return (grad_a if need_a else None, grad_x, grad_initial if (ctx.has_initial and need_initial) else None,
            None)


linear_recurrence_op.register_autograd(_backward, setup_context=_setup_context)
_dispatch.register_kernels(linear_recurrence_op, _OP, _forward)
_dispatch.register_kernels(linear_recurrence_backward_op, _OP, _backward_kernel)
