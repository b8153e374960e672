"""Custom-op registrations of the margin family: ``retain::tm_loss`` and its backward."""

from __future__ import annotations

import torch
from torch import Tensor

from retain import _native
from retain.ops._checks import kernel_device
from retain.ops.margin import reference

REDUCTION_CODES = {"violations": 0, "mean": 1, "sum": 2}


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _ptr(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _denominator(reduction: int, count: Tensor, mask: Tensor | None, B: int, L: int, D: int) -> Tensor:
    """What the summed loss is divided by (float64, 0-dim)."""
    if reduction == REDUCTION_CODES["violations"]:
        return count.to(torch.float64) + reference.VIOLATIONS_EPS
    if reduction == REDUCTION_CODES["mean"]:
        n = (mask.sum() if mask is not None else torch.tensor(B * L)).to(torch.float64) * D
        return n.clamp_min(1.0)
    return torch.ones((), dtype=torch.float64)


@torch.library.custom_op("retain::tm_loss", mutates_args=())
def tm_loss_op(h: Tensor, labels: Tensor, pos_thr: Tensor, neg_thr: Tensor, mask: Tensor | None,
               reduction: int) -> tuple[Tensor, Tensor]:
    """(loss, denominator): the reduced TM loss (state dtype, 0-dim) and the float64 divisor used.
    h [B, L, D]; labels int8 [B, L, D] or packed uint8 [B, L, ceil(D/4)]; thresholds [D] or [B, D]
    in the state dtype; mask uint8 [B, L] or None."""
    if kernel_device("tm_loss", h) is None:
        raise NotImplementedError("retain::tm_loss: the reference fallback runs through retain.ops.tm_loss")
    B, L, D = h.shape
    row_sum = torch.empty(B * L, dtype=torch.float64, device=h.device)
    row_count = torch.empty(B * L, dtype=torch.int64, device=h.device)
    if B * L:
        _native.lib().tm_loss_fwd_cpu(
            _native.DTYPE_CODES[h.dtype], labels.dtype == torch.uint8, h.data_ptr(), labels.data_ptr(),
            labels.shape[-1], pos_thr.data_ptr(), neg_thr.data_ptr(), pos_thr.dim() == 2, _ptr(mask), B, L, D,
            row_sum.data_ptr(), row_count.data_ptr(), _native.num_threads())
    denom = _denominator(reduction, row_count.sum(), mask, B, L, D)
    return (row_sum.sum() / denom).to(acc_dtype(h.dtype)), denom


@tm_loss_op.register_fake
def _(h, labels, pos_thr, neg_thr, mask, reduction):
    return h.new_empty((), dtype=acc_dtype(h.dtype)), h.new_empty((), dtype=torch.float64)


@torch.library.custom_op("retain::tm_loss_backward", mutates_args=())
def tm_loss_backward_op(grad: Tensor, denom: Tensor, h: Tensor, labels: Tensor, pos_thr: Tensor, neg_thr: Tensor,
                        mask: Tensor | None) -> Tensor:
    """d loss / d h = grad / denominator * mask * slope, one pass over h (the count of violations is
    piecewise constant: no gradient)."""
    if kernel_device("tm_loss", h) is None:
        raise NotImplementedError("retain::tm_loss: the reference fallback runs through retain.ops.tm_loss")
    B, L, D = h.shape
    grad_h = _native.empty_like(h)
    if h.numel():
        scale = float(grad.to(torch.float64) / denom)
        _native.lib().tm_loss_bwd_cpu(
            _native.DTYPE_CODES[h.dtype], labels.dtype == torch.uint8, h.data_ptr(), labels.data_ptr(),
            labels.shape[-1], pos_thr.data_ptr(), neg_thr.data_ptr(), pos_thr.dim() == 2, _ptr(mask), B, L, D,
            scale, grad_h.data_ptr(), _native.num_threads())
    return grad_h


@tm_loss_backward_op.register_fake
def _(grad, denom, h, labels, pos_thr, neg_thr, mask):
    return torch.empty_like(h, memory_format=torch.contiguous_format)


def _threshold_grads(grad, denom, h, labels, pos_thr, neg_thr, mask):
    """Gradients of the thresholds (rarely wanted: GeRe's are fixed statistics), in PyTorch."""
    B, L, D = h.shape
    if labels.dtype == torch.uint8:
        labels = reference.unpack_tm_labels_ref(labels, D)
    acc = pos_thr.dtype
    x = h.to(acc)
    pos = pos_thr[:, None, :] if pos_thr.dim() == 2 else pos_thr
    neg = neg_thr[:, None, :] if neg_thr.dim() == 2 else neg_thr
    d_pos = ((labels > 0) & (x < pos)).to(acc) - ((labels == 0) & (x > pos)).to(acc)
    d_neg = ((labels == 0) & (x < neg)).to(acc) - ((labels < 0) & (x > neg)).to(acc)
    if mask is not None:
        m = mask.to(acc)[..., None]
        d_pos, d_neg = d_pos * m, d_neg * m
    scale = (grad.to(torch.float64) / denom).to(acc)
    dims = (1,) if pos_thr.dim() == 2 else (0, 1)
    return d_pos.sum(dims) * scale, d_neg.sum(dims) * scale


def _setup_context(ctx, inputs, output):
    h, labels, pos_thr, neg_thr, mask, reduction = inputs
    _, denom = output
    ctx.mark_non_differentiable(denom)
    ctx.save_for_backward(h, labels, pos_thr, neg_thr, mask, denom)


def _backward(ctx, grad_loss, _grad_denom):
    h, labels, pos_thr, neg_thr, mask, denom = ctx.saved_tensors
    need_h, _, need_pos, need_neg = ctx.needs_input_grad[:4]
    grad_h = tm_loss_backward_op(grad_loss, denom, h, labels, pos_thr, neg_thr, mask) if need_h else None
    grad_pos = grad_neg = None
    if need_pos or need_neg:
        grad_pos, grad_neg = _threshold_grads(grad_loss, denom, h, labels, pos_thr, neg_thr, mask)
    return grad_h, None, grad_pos if need_pos else None, grad_neg if need_neg else None, None, None


tm_loss_op.register_autograd(_backward, setup_context=_setup_context)


# kl_imitation --------------------------------------------------------------------------------


@torch.library.custom_op("retain::kl_imitation", mutates_args=())
def kl_imitation_op(z: Tensor, z_ref: Tensor, mask: Tensor | None, inv_t: float) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, lse, lse_ref), float64 [N]: per-token KL(softmax(z_ref/T) || softmax(z/T)) of
    z, z_ref [N, V] (0 where mask [N] is 0) and the log-sum-exps the backward reuses."""
    if kernel_device("kl_imitation", z) is None:
        raise NotImplementedError("retain::kl_imitation: the reference fallback runs through retain.ops.kl_imitation")
    N, V = z.shape
    loss, lse, lse_ref = (torch.empty(N, dtype=torch.float64, device=z.device) for _ in range(3))
    if N:
        _native.lib().kl_imitation_fwd_cpu(_native.DTYPE_CODES[z.dtype], z.data_ptr(), z_ref.data_ptr(), _ptr(mask),
                                           N, V, inv_t, loss.data_ptr(), lse.data_ptr(), lse_ref.data_ptr(),
                                           _native.num_threads())
    return loss, lse, lse_ref


@kl_imitation_op.register_fake
def _(z, z_ref, mask, inv_t):
    return tuple(z.new_empty(z.shape[0], dtype=torch.float64) for _ in range(3))


@torch.library.custom_op("retain::kl_imitation_backward", mutates_args=())
def kl_imitation_backward_op(grad: Tensor, loss: Tensor, lse: Tensor, lse_ref: Tensor, z: Tensor, z_ref: Tensor,
                             inv_t: float, need_z: bool, need_z_ref: bool) -> tuple[Tensor, Tensor]:
    """(grad_z, grad_z_ref) in one pass over the logits; an unwanted one is empty."""
    if kernel_device("kl_imitation", z) is None:
        raise NotImplementedError("retain::kl_imitation: the reference fallback runs through retain.ops.kl_imitation")
    N, V = z.shape
    gz = _native.empty_like(z) if need_z else z.new_empty(0)
    gq = _native.empty_like(z_ref) if need_z_ref else z.new_empty(0)
    if N:
        g = grad.to(torch.float64).contiguous()
        _native.lib().kl_imitation_bwd_cpu(_native.DTYPE_CODES[z.dtype], z.data_ptr(), z_ref.data_ptr(), g.data_ptr(),
                                           loss.data_ptr(), lse.data_ptr(), lse_ref.data_ptr(), N, V, inv_t,
                                           gz.data_ptr() if need_z else 0, gq.data_ptr() if need_z_ref else 0,
                                           _native.num_threads())
    return gz, gq


@kl_imitation_backward_op.register_fake
def _(grad, loss, lse, lse_ref, z, z_ref, inv_t, need_z, need_z_ref):
    return (torch.empty_like(z) if need_z else z.new_empty(0), torch.empty_like(z_ref) if need_z_ref else z.new_empty(0))


def _kl_setup_context(ctx, inputs, output):
    z, z_ref, mask, inv_t = inputs
    loss, lse, lse_ref = output
    ctx.mark_non_differentiable(lse, lse_ref)
    ctx.inv_t = inv_t
    ctx.save_for_backward(z, z_ref, loss, lse, lse_ref, mask)


def _kl_backward(ctx, grad_loss, _g_lse, _g_lse_ref):
    z, z_ref, loss, lse, lse_ref, mask = ctx.saved_tensors
    need_z, need_ref = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if mask is not None:  # a masked token's loss is the constant 0
        grad_loss = grad_loss * mask
    gz, gq = kl_imitation_backward_op(grad_loss, loss, lse, lse_ref, z, z_ref, ctx.inv_t, need_z, need_ref)
    return gz if need_z else None, gq if need_ref else None, None, None


kl_imitation_op.register_autograd(_kl_backward, setup_context=_kl_setup_context)
