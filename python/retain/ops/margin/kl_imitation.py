"""``retain.ops.kl_imitation``: per-token KL(softmax(z_ref / T) || softmax(z / T)) over the
vocabulary, fused (custom ops ``retain::kl_imitation``, its backward and the reduced loss with its
gradient from the forward; derivation in csrc/margin/README.md)."""

from __future__ import annotations

import torch
from torch import Tensor

from retain import _native
from retain.ops import _dispatch
from retain.ops._checks import check_floating, check_like, check_number, check_tensor
from retain.ops.margin import reference
from retain.ops.margin._token_loss import check_reduction, check_token_mask, reduced_denominator, token_loss

_OP = "kl_imitation"


def kl_imitation(z: Tensor, z_ref: Tensor, *, temperature: float = 1.0, mask: Tensor | None = None,
                 reduction: str = "mean") -> Tensor:
    r"""Per-token KL(softmax(z_ref / T) ‖ softmax(z / T)) over the vocabulary, fused: no
    ``[tokens, vocab]`` probability tensor is made, forward or backward (two passes over each row
    forward, one backward; the forward keeps two log-sum-exps per token for the backward).

    Args:
        z: current logits ``[..., V]``; z_ref: reference logits, same shape, dtype and device
            (float32/float64/bfloat16/float16; 16-bit computed in float32).
        temperature: T > 0. The loss is not multiplied by T² (multiply it yourself for Hinton's
            gradient scale).
        mask: ``[...]`` bool: tokens that count.
        reduction: 'mean' over counted tokens (0 when none), 'sum', or 'none' (per token, ``[...]``,
            masked tokens 0).

    Returns:
        float32 (float64 for float64 logits). Gradients flow to ``z`` and, when it requires grad,
        ``z_ref``: ∂/∂z = (p − p_ref)/T, ∂/∂z_ref = p_ref (log p_ref − log p − KL)/T per token.
        On the CPU in eager mode with 'mean'/'sum', the forward computes the gradient as well
        (no second pass over the logits in the backward; the gradient tensor exists from the
        forward on).

    Examples::

        >>> z = torch.tensor([[0.0, 0.0]])
        >>> retain.ops.kl_imitation(z, torch.tensor([[0.0, 0.0]])).item()
        0.0
    """
    op = "retain.ops.kl_imitation"
    check_tensor(op, "z", z, ndim_min=1)
    check_floating(op, "z", z)
    check_like(op, "z_ref", z_ref, "z", z)
    if z.shape[-1] == 0:
        raise ValueError(f"{op}: the vocabulary (last) dimension of z must not be empty")
    temperature = check_number(op, "temperature", temperature, positive=True)
    mask = check_token_mask(op, mask, "z", z)
    check_reduction(op, reduction)
    return token_loss(z, z_ref, mask, reduction, 1.0 / temperature, rows=lambda *a: kl_imitation_op(*a)[0],
                      reduced=kl_imitation_reduced_op, per_token=1)


@torch.library.custom_op("retain::kl_imitation", mutates_args=())
def kl_imitation_op(z: Tensor, z_ref: Tensor, mask: Tensor | None, inv_t: float) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, lse, lse_ref), float64 [N]: per-token KL(softmax(z_ref/T) || softmax(z/T)) of
    z, z_ref [N, V] (0 where mask [N] is 0) and the log-sum-exps the backward reuses. This body is
    the fallback, by the reference."""
    _dispatch.fallback(_OP, z)
    rows = reference.kl_imitation_ref(z, z_ref, temperature=1.0 / inv_t, mask=mask, reduction="none")
    lse, lse_ref = (torch.logsumexp(x.to(torch.float64) * inv_t, -1) for x in (z, z_ref))
    return rows.to(torch.float64), lse, lse_ref


def _forward(z, z_ref, mask, inv_t):
    N, V = z.shape
    loss, lse, lse_ref = (torch.empty(N, dtype=torch.float64, device=z.device) for _ in range(3))
    if N:
        _dispatch.run("kl_imitation_fwd", z.device, _dispatch.dtype_code(z), z.data_ptr(), z_ref.data_ptr(),
                      _dispatch.ptr(mask), N, V, inv_t, loss.data_ptr(), lse.data_ptr(), lse_ref.data_ptr())
    return loss, lse, lse_ref


@kl_imitation_op.register_fake
def _(z, z_ref, mask, inv_t):
    return tuple(z.new_empty(z.shape[0], dtype=torch.float64) for _ in range(3))


@torch.library.custom_op("retain::kl_imitation_backward", mutates_args=())
def kl_imitation_backward_op(grad: Tensor, loss: Tensor, lse: Tensor, lse_ref: Tensor, z: Tensor, z_ref: Tensor,
                             inv_t: float, need_z: bool, need_z_ref: bool) -> tuple[Tensor, Tensor]:
    """(grad_z, grad_z_ref) in one pass over the logits; an unwanted one is empty. This body is the
    fallback: autograd through the reference."""
    _dispatch.fallback(_OP, z)
    gz, gq = _dispatch.reference_vjp(
        lambda a, b: (reference.kl_imitation_ref(a, b, temperature=1.0 / inv_t, reduction="none"),),
        (z, z_ref), (grad,), (need_z, need_z_ref))
    return (gz if gz is not None else z.new_empty(0)), (gq if gq is not None else z.new_empty(0))


def _backward(grad, loss, lse, lse_ref, z, z_ref, inv_t, need_z, need_z_ref):
    N, V = z.shape
    gz = _dispatch.empty_or_nothing(z, need_z, _native.empty_like, z)
    gq = _dispatch.empty_or_nothing(z_ref, need_z_ref, _native.empty_like, z)
    if N:
        g = grad.to(torch.float64).contiguous()  # held: the kernel reads it through a raw pointer
        _dispatch.run("kl_imitation_bwd", z.device, _dispatch.dtype_code(z), z.data_ptr(), z_ref.data_ptr(),
                      g.data_ptr(), loss.data_ptr(), lse.data_ptr(),
                      lse_ref.data_ptr(), N, V, inv_t, _dispatch.ptr(gz), _dispatch.ptr(gq))
    return gz, gq


@kl_imitation_backward_op.register_fake
def _(grad, loss, lse, lse_ref, z, z_ref, inv_t, need_z, need_z_ref):
    return (_dispatch.empty_or_nothing(z, need_z, _native.fake_empty_like, z),
            _dispatch.empty_or_nothing(z_ref, need_z_ref, _native.fake_empty_like, z))


def _setup_context(ctx, inputs, output):
    z, z_ref, mask, inv_t = inputs
    loss, lse, lse_ref = output
    ctx.mark_non_differentiable(lse, lse_ref)
    ctx.inv_t = inv_t
    ctx.save_for_backward(z, z_ref, loss, lse, lse_ref, mask)


def _backward_rows(ctx, grad_loss, _g_lse, _g_lse_ref):
    z, z_ref, loss, lse, lse_ref, mask = ctx.saved_tensors
    need_z, need_ref = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if mask is not None:  # a masked token's loss is the constant 0
        grad_loss = grad_loss * mask
    gz, gq = kl_imitation_backward_op(grad_loss, loss, lse, lse_ref, z, z_ref, ctx.inv_t, need_z, need_ref)
    return gz if need_z else None, gq if need_ref else None, None, None


kl_imitation_op.register_autograd(_backward_rows, setup_context=_setup_context)


# The reduced loss ('mean' / 'sum') with its gradient computed in the forward pass (CPU kernel):
# the forward already has every exp the gradient needs, so loss.backward() costs no second pass
# over the logits. The first backward hands out the precomputed gradient (scaled in place unless
# the incoming gradient is 1); a second backward through the same graph, and torch.compile's traced
# backward, recompute it with the backward op instead, so nothing is reused after being handed out.
# Where the kernel does not run (CUDA, the fallback), the body composes kl_imitation_op and the
# backward recomputes.


@torch.library.custom_op("retain::kl_imitation_reduced", mutates_args=())
def kl_imitation_reduced_op(z: Tensor, z_ref: Tensor, mask: Tensor | None, inv_t: float, mean: bool, need_z: bool,
                            need_z_ref: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, rows, lse, lse_ref, scale, grad_z, grad_z_ref): loss (float64, 0-dim) = Σ rows /
    #counted tokens ('mean', at least 1) or Σ rows; scale its derivative by each counted row's
    loss; grad_z, grad_z_ref the gradients of loss (empty when not wanted, or not computed)."""
    rows, lse, lse_ref = kl_imitation_op(z, z_ref, mask, inv_t)
    denom = reduced_denominator(mask, z.shape[0], 1, mean, z.device)
    return rows.sum() / denom, rows, lse, lse_ref, 1.0 / denom, z.new_empty(0), z.new_empty(0)


def _reduced_cpu(z, z_ref, mask, inv_t, mean, need_z, need_z_ref):
    N, V = z.shape
    rows, lse, lse_ref = (torch.empty(N, dtype=torch.float64, device=z.device) for _ in range(3))
    denom = float(reduced_denominator(mask, N, 1, mean, z.device))
    gz = _dispatch.empty_or_nothing(z, need_z, _native.empty_like, z)
    gq = _dispatch.empty_or_nothing(z_ref, need_z_ref, _native.empty_like, z)
    if N:
        _native.lib().kl_imitation_fwd_grad_cpu(
            _dispatch.dtype_code(z), z.data_ptr(), z_ref.data_ptr(), _dispatch.ptr(mask), N, V, inv_t, 1.0 / denom,
            rows.data_ptr(), lse.data_ptr(), lse_ref.data_ptr(), _dispatch.ptr(gz), _dispatch.ptr(gq),
            _native.num_threads())
    return rows.sum() / denom, rows, lse, lse_ref, torch.tensor(1.0 / denom, dtype=torch.float64), gz, gq


@kl_imitation_reduced_op.register_fake
def _(z, z_ref, mask, inv_t, mean, need_z, need_z_ref):
    rows = [z.new_empty(z.shape[0], dtype=torch.float64) for _ in range(3)]
    served = _dispatch.served(kl_imitation_reduced_op, z.device)
    return (z.new_empty((), dtype=torch.float64), *rows, z.new_empty((), dtype=torch.float64),
            _dispatch.empty_or_nothing(z, need_z and served, _native.fake_empty_like, z),
            _dispatch.empty_or_nothing(z_ref, need_z_ref and served, _native.fake_empty_like, z))


def _reduced_setup_context(ctx, inputs, output):
    z, z_ref, mask, inv_t, mean, need_z, need_z_ref = inputs
    _, rows, lse, lse_ref, scale, gz, gq = output
    ctx.mark_non_differentiable(rows, lse, lse_ref, scale, gz, gq)
    ctx.set_materialize_grads(False)  # else autograd fills a zero [N, V] "gradient" for gz and gq
    ctx.inv_t = inv_t
    ctx.save_for_backward(z, z_ref, rows, lse, lse_ref, mask, scale)
    # not saved tensors: handed out (and scaled in place) by the first eager backward
    ctx.precomputed = (gz if need_z else None, gq if need_z_ref else None)


def _reduced_backward(ctx, grad_loss, *_unused):
    need_z, need_ref = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if grad_loss is None:  # grads not materialised: nothing flowed into the loss
        return None, None, None, None, None, None, None
    out = _dispatch.hand_out(ctx, grad_loss, (need_z, need_ref))
    if out is None:
        z, z_ref, rows, lse, lse_ref, mask, scale = ctx.saved_tensors
        g_rows = (grad_loss.to(torch.float64) * scale).expand(z.shape[0])
        if mask is not None:
            g_rows = g_rows * mask
        out = kl_imitation_backward_op(g_rows, rows, lse, lse_ref, z, z_ref, ctx.inv_t, need_z, need_ref)
    return out[0] if need_z else None, out[1] if need_ref else None, None, None, None, None, None


kl_imitation_reduced_op.register_autograd(_reduced_backward, setup_context=_reduced_setup_context)
_dispatch.register_kernels(kl_imitation_op, _OP, _forward)
_dispatch.register_kernels(kl_imitation_backward_op, _OP, _backward)
_dispatch.register_kernels(kl_imitation_reduced_op, _OP, cpu=_reduced_cpu)
