"""Custom-op registrations of the scan family: ``retain::linear_recurrence`` and its backward."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from retain import _native
from retain.ops._checks import kernel_device
from retain.ops.scan import reference

_OP = "linear_recurrence"


def _sizes(x: Tensor) -> tuple[int, int, int]:
    """[B, T, *] as (B, T, D): the trailing dimensions are one feature axis."""
    return x.shape[0], x.shape[1], math.prod(x.shape[2:])


def _ptr(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


@torch.library.custom_op("retain::linear_recurrence", mutates_args=())
def linear_recurrence_op(a: Tensor, x: Tensor, initial: Tensor | None, reverse: bool) -> Tensor:
    """h_t = a_t * h_{t-1} + x_t over dim 1 of [B, T, *]; inputs share shape, dtype and device."""
    device = kernel_device(_OP, x)
    if device is None:
        return reference.linear_recurrence_ref(a, x, initial=initial, reverse=reverse).contiguous()
    a, x = a.contiguous(), x.contiguous()
    initial = initial.contiguous() if initial is not None else None
    h = _native.empty_like(x)
    B, T, D = _sizes(x)
    if h.numel() == 0:
        return h
    C = _native.lib()
    code = _native.DTYPE_CODES[x.dtype]
    if device == "cpu":
        C.linear_recurrence_fwd_cpu(code, a.data_ptr(), x.data_ptr(), _ptr(initial), h.data_ptr(), B, T, D,
                                    reverse, _native.num_threads())
    else:
        C.linear_recurrence_fwd_cuda(code, a.data_ptr(), x.data_ptr(), _ptr(initial), h.data_ptr(), B, T, D,
                                     reverse, _native.cuda_stream(x.device))
    return h


@linear_recurrence_op.register_fake
def _(a: Tensor, x: Tensor, initial: Tensor | None, reverse: bool) -> Tensor:
    return _empty_like(x)


@torch.library.custom_op("retain::linear_recurrence_backward", mutates_args=())
def linear_recurrence_backward_op(
    grad_h: Tensor, a: Tensor, h: Tensor, initial: Tensor | None, reverse: bool, need_grad_a: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_x, grad_a, grad_initial) of linear_recurrence. grad_a is empty when not needed,
    grad_initial is empty when ``initial`` is None (derivation: csrc/scan/README.md)."""
    device = kernel_device(_OP, h)
    if device is None:
        return _backward_ref(grad_h, a, h, initial, reverse, need_grad_a)
    grad_h, a, h = grad_h.contiguous(), a.contiguous(), h.contiguous()
    initial = initial.contiguous() if initial is not None else None
    grad_x, grad_a, grad_initial = _grad_buffers(h, initial, need_grad_a, _native.empty_like)
    B, T, D = _sizes(h)
    if h.numel() == 0:  # nothing depends on initial when T == 0
        return grad_x, grad_a, grad_initial.zero_()
    C = _native.lib()
    args = (_native.DTYPE_CODES[h.dtype], a.data_ptr(), h.data_ptr(), _ptr(initial), grad_h.data_ptr(),
            grad_x.data_ptr(), grad_a.data_ptr() if need_grad_a else 0,
            grad_initial.data_ptr() if initial is not None else 0, B, T, D, reverse)
    if device == "cpu":
        C.linear_recurrence_bwd_cpu(*args, _native.num_threads())
    else:
        C.linear_recurrence_bwd_cuda(*args, _native.cuda_stream(h.device))
    return grad_x, grad_a, grad_initial


@linear_recurrence_backward_op.register_fake
def _(grad_h, a, h, initial, reverse, need_grad_a):
    return _grad_buffers(h, initial, need_grad_a, _empty_like)


def _empty_like(t: Tensor) -> Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def _grad_buffers(h, initial, need_grad_a, empty):
    """(grad_x, grad_a, grad_initial) outputs; the unwanted ones are empty tensors."""
    return (empty(h), empty(h) if need_grad_a else h.new_empty(0),
            empty(initial) if initial is not None else h.new_empty(0))


def _backward_ref(grad_h, a, h, initial, reverse, need_grad_a):
    """Backward by the same recurrence run the other way, in PyTorch (the fallback path)."""
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
