"""``retain.ops.feature_imitation``: per-token L1 / squared-L2 distance between hidden states and
reference ones, fused (custom ops ``retain::feature_imitation``, its backward and the reduced loss
with its gradient from the forward; derivation in csrc/margin/README.md)."""

from __future__ import annotations

import torch
from torch import Tensor

from retain import _native
from retain.ops import _dispatch
from retain.ops._checks import check_floating, check_like, check_tensor
from retain.ops.margin import reference
from retain.ops.margin._token_loss import check_reduction, check_token_mask, reduced_denominator, token_loss

_OP = "feature_imitation"


def feature_imitation(h: Tensor, h_ref: Tensor, *, p: int = 2, mask: Tensor | None = None,
                      reduction: str = "mean") -> Tensor:
    r"""Feature imitation: the distance between current hidden states ``h`` and reference ones
    ``h_ref`` (GeRe's L1 / L2 baselines, feature distillation), per token::

        p = 1:  Σ_d |h − h_ref|        p = 2:  Σ_d (h − h_ref)²

    fused: one pass over both forward, one backward, no ``[tokens, D]`` temporaries.

    Args:
        h: current hidden states ``[..., D]`` (e.g. ``[B, L, D]`` or ``[N, D]``); h_ref: reference
            states, same shape, dtype and device (float32/float64/bfloat16/float16; 16-bit computed
            in float32). Cast ``h_ref`` yourself if it is stored in another dtype.
        p: 1 (L1) or 2 (squared L2, no square root).
        mask: ``[...]`` (``h`` without its last dimension) bool: tokens that count (padding excluded).
        reduction: ``'mean'``: the sum over counted tokens divided by (#counted tokens · D), i.e.
            ``F.l1_loss`` (p = 1) / ``F.mse_loss`` (p = 2) over the counted tokens, so the scale does
            not grow with the hidden size and a loss weight carries over between models (0 when no
            token counts); ``'sum'``; ``'none'``: the per-token distance ``[...]`` (summed over D,
            masked tokens 0).

    Returns:
        float32 (float64 for float64 ``h``). Gradients flow to ``h`` and, when it requires grad,
        ``h_ref`` (usually a stored constant: then nothing is computed for it):
        ∂/∂h = −∂/∂h_ref = g · sign(h − h_ref) (p = 1, with sign(0) = 0: no gradient where the
        states already agree) or g · 2 (h − h_ref) (p = 2), g the gradient of the token's distance;
        masked tokens get exactly 0 whatever they hold.

    Examples::

        >>> h = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
        >>> h_ref = torch.tensor([[0.0, 4.0], [0.0, 3.0]])
        >>> retain.ops.feature_imitation(h, h_ref, p=1, reduction="none")
        tensor([3., 3.])
        >>> retain.ops.feature_imitation(h, h_ref)                    # (1 + 4 + 0 + 9) / (2 · 2)
        tensor(3.5000)
        >>> retain.ops.feature_imitation(h, h_ref, mask=torch.tensor([True, False]))  # (1 + 4) / 2
        tensor(2.5000)
    """
    op = "retain.ops.feature_imitation"
    check_tensor(op, "h", h, ndim_min=1)
    check_floating(op, "h", h)
    check_like(op, "h_ref", h_ref, "h", h)
    if isinstance(p, bool) or p not in (1, 2):
        raise ValueError(f"{op}: p must be 1 or 2, got {p!r}")
    mask = check_token_mask(op, mask, "h", h)
    check_reduction(op, reduction)
    return token_loss(h, h_ref, mask, reduction, int(p), rows=feature_imitation_op,
                      reduced=feature_imitation_reduced_op, per_token=h.shape[-1])


@torch.library.custom_op("retain::feature_imitation", mutates_args=())
def feature_imitation_op(h: Tensor, h_ref: Tensor, mask: Tensor | None, p: int) -> Tensor:
    """float64 [N]: per-token sum_d |h - h_ref| (p = 1) or sum_d (h - h_ref)^2 (p = 2) of h, h_ref
    [N, D] (0 where mask [N] is 0). This body is the fallback, by the reference."""
    _dispatch.fallback(_OP, h)
    return reference.feature_imitation_ref(h, h_ref, p=p, mask=mask, reduction="none").to(torch.float64)


def _forward(h, h_ref, mask, p):
    N, D = h.shape
    if h.numel() == 0:  # no rows, or rows of no features (distance 0)
        return torch.zeros(N, dtype=torch.float64, device=h.device)
    loss = torch.empty(N, dtype=torch.float64, device=h.device)
    if _native.poison_outputs:  # tests: a row the kernel skips fails
        loss.fill_(float("nan"))
    _dispatch.run("feature_imitation_fwd", h.device, _dispatch.dtype_code(h), h.data_ptr(), h_ref.data_ptr(),
                  _dispatch.ptr(mask), N, D, p, loss.data_ptr())
    return loss


@feature_imitation_op.register_fake
def _(h, h_ref, mask, p):
    return h.new_empty(h.shape[0], dtype=torch.float64)


@torch.library.custom_op("retain::feature_imitation_backward", mutates_args=())
def feature_imitation_backward_op(grad: Tensor, h: Tensor, h_ref: Tensor, mask: Tensor | None, p: int, need_h: bool,
                                  need_h_ref: bool) -> tuple[Tensor, Tensor]:
    """(grad_h, grad_h_ref) = ±grad[n] * (sign(h - h_ref) or 2 (h - h_ref)) in one pass, 0 on masked
    rows; an unwanted one is empty. This body is the fallback, in PyTorch."""
    _dispatch.fallback(_OP, h)
    diff = h.to(torch.float64) - h_ref.to(torch.float64)
    g = grad.to(torch.float64)[:, None] * (diff.sign() if p == 1 else 2.0 * diff)
    if mask is not None:
        g = torch.where(mask.to(torch.bool)[:, None], g, 0.0)
    return (g.to(h.dtype) if need_h else h.new_empty(0)), ((-g).to(h.dtype) if need_h_ref else h.new_empty(0))


def _backward(grad, h, h_ref, mask, p, need_h, need_h_ref):
    N, D = h.shape
    gh = _dispatch.empty_or_nothing(h, need_h, _native.empty_like, h)
    gq = _dispatch.empty_or_nothing(h_ref, need_h_ref, _native.empty_like, h)
    if h.numel() and (need_h or need_h_ref):
        g = grad.to(torch.float64).contiguous()  # held: the kernel reads it through a raw pointer
        _dispatch.run("feature_imitation_bwd", h.device, _dispatch.dtype_code(h), h.data_ptr(), h_ref.data_ptr(),
                      g.data_ptr(), _dispatch.ptr(mask), N, D, p,
                      _dispatch.ptr(gh), _dispatch.ptr(gq))
    return gh, gq


@feature_imitation_backward_op.register_fake
def _(grad, h, h_ref, mask, p, need_h, need_h_ref):
    return (_dispatch.empty_or_nothing(h, need_h, _native.fake_empty_like, h),
            _dispatch.empty_or_nothing(h_ref, need_h_ref, _native.fake_empty_like, h))


def _setup_context(ctx, inputs, output):
    h, h_ref, mask, p = inputs
    ctx.p = p
    ctx.save_for_backward(h, h_ref, mask)


def _backward_rows(ctx, grad_rows):
    h, h_ref, mask = ctx.saved_tensors
    need_h, need_ref = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    gh, gq = feature_imitation_backward_op(grad_rows, h, h_ref, mask, ctx.p, need_h, need_ref)
    return gh if need_h else None, gq if need_ref else None, None, None


feature_imitation_op.register_autograd(_backward_rows, setup_context=_setup_context)


# The reduced loss with its gradient from the forward (CPU kernel), as kl_imitation's: one read of
# h and h_ref for forward and backward instead of two. Elsewhere the body composes
# feature_imitation_op and the backward recomputes.


@torch.library.custom_op("retain::feature_imitation_reduced", mutates_args=())
def feature_imitation_reduced_op(h: Tensor, h_ref: Tensor, mask: Tensor | None, p: int, mean: bool, need_h: bool,
                                 need_h_ref: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, rows, scale, grad_h, grad_h_ref): loss (float64, 0-dim) = Σ rows / (#counted tokens
    · D) ('mean', at least 1) or Σ rows; scale its derivative by each counted row; the gradients
    of loss (empty when not wanted, or not computed)."""
    rows = feature_imitation_op(h, h_ref, mask, p)
    denom = reduced_denominator(mask, h.shape[0], h.shape[1], mean, h.device)
    return rows.sum() / denom, rows, 1.0 / denom, h.new_empty(0), h.new_empty(0)


def _reduced_cpu(h, h_ref, mask, p, mean, need_h, need_h_ref):
    N, D = h.shape
    rows = torch.empty(N, dtype=torch.float64, device=h.device)
    denom = float(reduced_denominator(mask, N, D, mean, h.device))
    gh = _dispatch.empty_or_nothing(h, need_h, _native.empty_like, h)
    gq = _dispatch.empty_or_nothing(h_ref, need_h_ref, _native.empty_like, h)
    if h.numel():
        _native.lib().feature_imitation_fwd_grad_cpu(
            _dispatch.dtype_code(h), h.data_ptr(), h_ref.data_ptr(), _dispatch.ptr(mask), N, D, p, 1.0 / denom,
            rows.data_ptr(), _dispatch.ptr(gh), _dispatch.ptr(gq), _native.num_threads())
    else:
        rows.zero_()
        gh.zero_()
        gq.zero_()
    return rows.sum() / denom, rows, torch.tensor(1.0 / denom, dtype=torch.float64), gh, gq


@feature_imitation_reduced_op.register_fake
def _(h, h_ref, mask, p, mean, need_h, need_h_ref):
    served = _dispatch.served(feature_imitation_reduced_op, h.device)
    return (h.new_empty((), dtype=torch.float64), h.new_empty(h.shape[0], dtype=torch.float64),
            h.new_empty((), dtype=torch.float64),
            _dispatch.empty_or_nothing(h, need_h and served, _native.fake_empty_like, h),
            _dispatch.empty_or_nothing(h_ref, need_h_ref and served, _native.fake_empty_like, h))


def _reduced_setup_context(ctx, inputs, output):
    h, h_ref, mask, p, mean, need_h, need_h_ref = inputs
    _, rows, scale, gh, gq = output
    ctx.mark_non_differentiable(rows, scale, gh, gq)
    ctx.set_materialize_grads(False)
    ctx.p = p
    ctx.save_for_backward(h, h_ref, mask, scale)
    ctx.precomputed = (gh if need_h else None, gq if need_h_ref else None)


def _reduced_backward(ctx, grad_loss, *_unused):
    need_h, need_ref = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if grad_loss is None:
        return None, None, None, None, None, None, None
    out = _dispatch.hand_out(ctx, grad_loss, (need_h, need_ref))
    if out is None:
        h, h_ref, mask, scale = ctx.saved_tensors
        g_rows = (grad_loss.to(torch.float64) * scale).expand(h.shape[0])
        out = feature_imitation_backward_op(g_rows.contiguous(), h, h_ref, mask, ctx.p, need_h, need_ref)
    return out[0] if need_h else None, out[1] if need_ref else None, None, None, None, None, None


feature_imitation_reduced_op.register_autograd(_reduced_backward, setup_context=_reduced_setup_context)
_dispatch.register_kernels(feature_imitation_op, _OP, _forward)
_dispatch.register_kernels(feature_imitation_backward_op, _OP, _backward)
_dispatch.register_kernels(feature_imitation_reduced_op, _OP, cpu=_reduced_cpu)
