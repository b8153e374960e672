"""Custom-op registrations of the margin family: ``retain::tm_loss``, ``retain::kl_imitation``,
``retain::feature_imitation`` and their backwards; CPU kernels, or CUDA ones for CUDA tensors."""

from __future__ import annotations

import contextlib

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


def _launch_guard(t: Tensor):
    """Make ``t``'s GPU the current device while its kernel is enqueued (a launch goes to the
    current device, which need not be the tensor's)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _denominator(reduction: int, count: Tensor, mask: Tensor | None, B: int, L: int, D: int) -> Tensor:
    """What the summed loss is divided by (float64, 0-dim, on count's device)."""
    if reduction == REDUCTION_CODES["violations"]:
        return count.to(torch.float64) + reference.VIOLATIONS_EPS
    if reduction == REDUCTION_CODES["mean"]:
        n = (mask.sum() if mask is not None else torch.tensor(B * L, device=count.device)).to(torch.float64) * D
        return n.clamp_min(1.0)
    return torch.ones((), dtype=torch.float64, device=count.device)


def _slope_bits_shape(h: Tensor, keep_slope: bool) -> tuple[int, ...]:
    """Shape of the slope bits the forward keeps: [B * L, 2 * ceil(D / 16)] 16-bit words (2 bits an
    element) for CPU float32/bfloat16/float16 when asked, else empty (the backward re-reads h)."""
    B, L, D = h.shape
    if keep_slope and h.device.type == "cpu" and h.dtype != torch.float64:
        return (B * L, 2 * ((D + 15) // 16))
    return (0,)


@torch.library.custom_op("retain::tm_loss", mutates_args=())
def tm_loss_op(h: Tensor, labels: Tensor, pos_thr: Tensor, neg_thr: Tensor, mask: Tensor | None,
               reduction: int, keep_slope: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, denominator, slope_bits): the reduced TM loss (state dtype, 0-dim), the float64
    divisor used and, with keep_slope (h requires grad), the sign of every element's slope for the
    backward (int16 words, see _slope_bits_shape). h [B, L, D]; labels int8 [B, L, D] or packed
    uint8 [B, L, ceil(D/4)]; thresholds [D] or [B, D] in the state dtype; mask uint8 [B, L] or None."""
    device = kernel_device("tm_loss", h)
    if device is None:
        raise NotImplementedError("retain::tm_loss: the reference fallback runs through retain.ops.tm_loss")
    B, L, D = h.shape
    row_sum = torch.empty(B * L, dtype=torch.float64, device=h.device)
    row_count = torch.empty(B * L, dtype=torch.int64, device=h.device)
    bits = torch.empty(_slope_bits_shape(h, keep_slope), dtype=torch.int16, device=h.device)
    if B * L:
        args = (_native.DTYPE_CODES[h.dtype], labels.dtype == torch.uint8, h.data_ptr(), labels.data_ptr(),
                labels.shape[-1], pos_thr.data_ptr(), neg_thr.data_ptr(), pos_thr.dim() == 2, _ptr(mask), B, L, D,
                row_sum.data_ptr(), row_count.data_ptr())
        if device == "cpu":
            _native.lib().tm_loss_fwd_cpu(*args, bits.data_ptr() if bits.numel() else 0, _native.num_threads())
        else:
            with _launch_guard(h):
                _native.lib().tm_loss_fwd_cuda(*args, _native.cuda_stream(h.device))
    denom = _denominator(reduction, row_count.sum(), mask, B, L, D)
    return (row_sum.sum() / denom).to(acc_dtype(h.dtype)), denom, bits


@tm_loss_op.register_fake
def _(h, labels, pos_thr, neg_thr, mask, reduction, keep_slope=False):
    return (h.new_empty((), dtype=acc_dtype(h.dtype)), h.new_empty((), dtype=torch.float64),
            h.new_empty(_slope_bits_shape(h, keep_slope), dtype=torch.int16))


@torch.library.custom_op("retain::tm_loss_backward_bits", mutates_args=())
def tm_loss_backward_bits_op(grad: Tensor, denom: Tensor, slope_bits: Tensor, h: Tensor) -> Tensor:
    """d loss / d h = grad / denominator * slope from the forward's slope bits: writes the gradient
    without reading h again (h gives the shape and dtype only)."""
    B, L, D = h.shape
    grad_h = _native.empty_like(h)
    if h.numel():
        scale = float(grad.to(torch.float64) / denom)
        _native.lib().tm_loss_bwd_bits_cpu(_native.DTYPE_CODES[h.dtype], slope_bits.data_ptr(), B * L, D, scale,
                                           grad_h.data_ptr(), _native.num_threads())
    return grad_h


@tm_loss_backward_bits_op.register_fake
def _(grad, denom, slope_bits, h):
    return _native.fake_empty_like(h)


@torch.library.custom_op("retain::tm_loss_backward", mutates_args=())
def tm_loss_backward_op(grad: Tensor, denom: Tensor, h: Tensor, labels: Tensor, pos_thr: Tensor, neg_thr: Tensor,
                        mask: Tensor | None) -> Tensor:
    """d loss / d h = grad / denominator * mask * slope, one pass over h (the count of violations is
    piecewise constant: no gradient)."""
    device = kernel_device("tm_loss", h)
    if device is None:
        raise NotImplementedError("retain::tm_loss: the reference fallback runs through retain.ops.tm_loss")
    B, L, D = h.shape
    grad_h = _native.empty_like(h)
    if h.numel():
        args = (_native.DTYPE_CODES[h.dtype], labels.dtype == torch.uint8, h.data_ptr(), labels.data_ptr(),
                labels.shape[-1], pos_thr.data_ptr(), neg_thr.data_ptr(), pos_thr.dim() == 2, _ptr(mask), B, L, D)
        scale = grad.to(torch.float64) / denom
        if device == "cpu":
            _native.lib().tm_loss_bwd_cpu(*args, float(scale), grad_h.data_ptr(), _native.num_threads())
        else:  # the kernel reads the scale on the device: no host sync
            scale = scale.reshape(()).contiguous()
            with _launch_guard(h):
                _native.lib().tm_loss_bwd_cuda(*args, scale.data_ptr(), grad_h.data_ptr(),
                                               _native.cuda_stream(h.device))
    return grad_h


@tm_loss_backward_op.register_fake
def _(grad, denom, h, labels, pos_thr, neg_thr, mask):
    return _native.fake_empty_like(h)


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
    h, labels, pos_thr, neg_thr, mask, reduction, keep_slope = inputs
    _, denom, bits = output
    ctx.mark_non_differentiable(denom, bits)
    ctx.save_for_backward(h, labels, pos_thr, neg_thr, mask, denom, bits)


def _backward(ctx, grad_loss, _grad_denom, _grad_bits):
    h, labels, pos_thr, neg_thr, mask, denom, bits = ctx.saved_tensors
    need_h, _, need_pos, need_neg = ctx.needs_input_grad[:4]
    grad_h = None
    if need_h and bits.numel():
        grad_h = tm_loss_backward_bits_op(grad_loss, denom, bits, h)
    elif need_h:
        grad_h = tm_loss_backward_op(grad_loss, denom, h, labels, pos_thr, neg_thr, mask)
    grad_pos = grad_neg = None
    if need_pos or need_neg:
        grad_pos, grad_neg = _threshold_grads(grad_loss, denom, h, labels, pos_thr, neg_thr, mask)
    return grad_h, None, grad_pos if need_pos else None, grad_neg if need_neg else None, None, None, None


tm_loss_op.register_autograd(_backward, setup_context=_setup_context)


# kl_imitation --------------------------------------------------------------------------------


@torch.library.custom_op("retain::kl_imitation", mutates_args=())
def kl_imitation_op(z: Tensor, z_ref: Tensor, mask: Tensor | None, inv_t: float) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, lse, lse_ref), float64 [N]: per-token KL(softmax(z_ref/T) || softmax(z/T)) of
    z, z_ref [N, V] (0 where mask [N] is 0) and the log-sum-exps the backward reuses."""
    device = kernel_device("kl_imitation", z)
    if device is None:
        raise NotImplementedError("retain::kl_imitation: the reference fallback runs through retain.ops.kl_imitation")
    N, V = z.shape
    loss, lse, lse_ref = (torch.empty(N, dtype=torch.float64, device=z.device) for _ in range(3))
    if N:
        args = (_native.DTYPE_CODES[z.dtype], z.data_ptr(), z_ref.data_ptr(), _ptr(mask), N, V, inv_t, loss.data_ptr(),
                lse.data_ptr(), lse_ref.data_ptr())
        if device == "cpu":
            _native.lib().kl_imitation_fwd_cpu(*args, _native.num_threads())
        else:
            with _launch_guard(z):
                _native.lib().kl_imitation_fwd_cuda(*args, _native.cuda_stream(z.device))
    return loss, lse, lse_ref


@kl_imitation_op.register_fake
def _(z, z_ref, mask, inv_t):
    return tuple(z.new_empty(z.shape[0], dtype=torch.float64) for _ in range(3))


@torch.library.custom_op("retain::kl_imitation_backward", mutates_args=())
def kl_imitation_backward_op(grad: Tensor, loss: Tensor, lse: Tensor, lse_ref: Tensor, z: Tensor, z_ref: Tensor,
                             inv_t: float, need_z: bool, need_z_ref: bool) -> tuple[Tensor, Tensor]:
    """(grad_z, grad_z_ref) in one pass over the logits; an unwanted one is empty."""
    device = kernel_device("kl_imitation", z)
    if device is None:
        raise NotImplementedError("retain::kl_imitation: the reference fallback runs through retain.ops.kl_imitation")
    N, V = z.shape
    gz = _native.empty_like(z) if need_z else z.new_empty(0)
    gq = _native.empty_like(z_ref) if need_z_ref else z.new_empty(0)
    if N:
        g = grad.to(torch.float64).contiguous()
        args = (_native.DTYPE_CODES[z.dtype], z.data_ptr(), z_ref.data_ptr(), g.data_ptr(), loss.data_ptr(),
                lse.data_ptr(), lse_ref.data_ptr(), N, V, inv_t, gz.data_ptr() if need_z else 0,
                gq.data_ptr() if need_z_ref else 0)
        if device == "cpu":
            _native.lib().kl_imitation_bwd_cpu(*args, _native.num_threads())
        else:
            with _launch_guard(z):
                _native.lib().kl_imitation_bwd_cuda(*args, _native.cuda_stream(z.device))
    return gz, gq


@kl_imitation_backward_op.register_fake
def _(grad, loss, lse, lse_ref, z, z_ref, inv_t, need_z, need_z_ref):
    return (_native.fake_empty_like(z) if need_z else z.new_empty(0), _native.fake_empty_like(z_ref) if need_z_ref else z.new_empty(0))


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


def _hand_out(ctx, grad_loss: Tensor | None, need: tuple[bool, ...]) -> list[Tensor | None] | None:
    """The gradients a fused forward computed (``ctx.precomputed``), handed out once: scaled in
    place by the incoming gradient unless it is exactly 1. None when they cannot be used — already
    handed out (a second backward through the graph), traced by torch.compile (fake tensors), or
    one that is needed is missing — and the caller recomputes with its backward kernel."""
    pre = ctx.precomputed
    ctx.precomputed = None
    if pre is None or type(grad_loss) is not torch.Tensor or torch.compiler.is_compiling():
        return None
    if any(n and t is None for n, t in zip(need, pre)):
        return None
    g = float(grad_loss)
    return [t if t is None or g == 1.0 else t.mul_(g) for t in pre]


# The reduced loss ('mean' / 'sum') with its gradient computed in the forward pass (CPU): the
# forward already has every exp the gradient needs, so loss.backward() costs no second pass over
# the logits. The first backward hands out the precomputed gradient (scaled in place unless the
# incoming gradient is 1); a second backward through the same graph, and torch.compile's traced
# backward, recompute it with the two-pass backward kernel instead, so nothing is ever reused
# after being handed out.


@torch.library.custom_op("retain::kl_imitation_reduced", mutates_args=())
def kl_imitation_reduced_op(z: Tensor, z_ref: Tensor, mask: Tensor | None, inv_t: float, mean: bool, need_z: bool,
                            need_z_ref: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, rows, lse, lse_ref, scale, grad_z, grad_z_ref): loss (float64, 0-dim) = Σ rows /
    #counted tokens ('mean', at least 1) or Σ rows; scale its derivative by each counted row's
    loss; grad_z, grad_z_ref the gradients of loss (empty when not wanted)."""
    if kernel_device("kl_imitation", z) != "cpu":
        raise NotImplementedError("retain::kl_imitation_reduced: CPU kernel only (CUDA runs retain::kl_imitation)")
    N, V = z.shape
    rows, lse, lse_ref = (torch.empty(N, dtype=torch.float64, device=z.device) for _ in range(3))
    n = int(mask.sum()) if mask is not None else N
    scale = 1.0 / max(n, 1) if mean else 1.0
    gz = _native.empty_like(z) if need_z else z.new_empty(0)
    gq = _native.empty_like(z_ref) if need_z_ref else z.new_empty(0)
    if N:
        _native.lib().kl_imitation_fwd_grad_cpu(
            _native.DTYPE_CODES[z.dtype], z.data_ptr(), z_ref.data_ptr(), _ptr(mask), N, V, inv_t, scale,
            rows.data_ptr(), lse.data_ptr(), lse_ref.data_ptr(), gz.data_ptr() if need_z else 0,
            gq.data_ptr() if need_z_ref else 0, _native.num_threads())
    scale_t = torch.tensor(scale, dtype=torch.float64)
    return rows.sum() / max(n, 1) if mean else rows.sum(), rows, lse, lse_ref, scale_t, gz, gq


@kl_imitation_reduced_op.register_fake
def _(z, z_ref, mask, inv_t, mean, need_z, need_z_ref):
    rows = [z.new_empty(z.shape[0], dtype=torch.float64) for _ in range(3)]
    return (z.new_empty((), dtype=torch.float64), *rows, z.new_empty((), dtype=torch.float64),
            _native.fake_empty_like(z) if need_z else z.new_empty(0), _native.fake_empty_like(z_ref) if need_z_ref else z.new_empty(0))


def _kl_reduced_setup_context(ctx, inputs, output):
    z, z_ref, mask, inv_t, mean, need_z, need_z_ref = inputs
    _, rows, lse, lse_ref, scale, gz, gq = output
    ctx.mark_non_differentiable(rows, lse, lse_ref, scale, gz, gq)
    ctx.set_materialize_grads(False)  # else autograd fills a zero [N, V] "gradient" for gz and gq
    ctx.inv_t = inv_t
    ctx.save_for_backward(z, z_ref, rows, lse, lse_ref, mask, scale)
    # not saved tensors: handed out (and scaled in place) by the first eager backward
    ctx.precomputed = (gz if need_z else None, gq if need_z_ref else None)


def _kl_reduced_backward(ctx, grad_loss, *_unused):
    need_z, need_ref = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if grad_loss is None:  # grads not materialised: nothing flowed into the loss
        return None, None, None, None, None, None, None
    out = _hand_out(ctx, grad_loss, (need_z, need_ref))
    if out is not None:
        return out[0] if need_z else None, out[1] if need_ref else None, None, None, None, None, None
    z, z_ref, rows, lse, lse_ref, mask, scale = ctx.saved_tensors
    g_rows = (grad_loss.to(torch.float64) * scale).expand(z.shape[0])
    if mask is not None:
        g_rows = g_rows * mask
    gz, gq = kl_imitation_backward_op(g_rows, rows, lse, lse_ref, z, z_ref, ctx.inv_t, need_z, need_ref)
    return gz if need_z else None, gq if need_ref else None, None, None, None, None, None


kl_imitation_reduced_op.register_autograd(_kl_reduced_backward, setup_context=_kl_reduced_setup_context)


# feature_imitation ---------------------------------------------------------------------------


@torch.library.custom_op("retain::feature_imitation", mutates_args=())
def feature_imitation_op(h: Tensor, h_ref: Tensor, mask: Tensor | None, p: int) -> Tensor:
    """float64 [N]: per-token sum_d |h - h_ref| (p = 1) or sum_d (h - h_ref)^2 (p = 2) of h, h_ref
    [N, D] (0 where mask [N] is 0)."""
    device = kernel_device("feature_imitation", h)
    if device is None:
        raise NotImplementedError(
            "retain::feature_imitation: the reference fallback runs through retain.ops.feature_imitation")
    N, D = h.shape
    if h.numel() == 0:  # no rows, or rows of no features (distance 0)
        return torch.zeros(N, dtype=torch.float64, device=h.device)
    loss = torch.empty(N, dtype=torch.float64, device=h.device)
    if _native.poison_outputs:  # tests: a row the kernel skips fails
        loss.fill_(float("nan"))
    args = (_native.DTYPE_CODES[h.dtype], h.data_ptr(), h_ref.data_ptr(), _ptr(mask), N, D, p, loss.data_ptr())
    if device == "cpu":
        _native.lib().feature_imitation_fwd_cpu(*args, _native.num_threads())
    else:
        with _launch_guard(h):
            _native.lib().feature_imitation_fwd_cuda(*args, _native.cuda_stream(h.device))
    return loss


@feature_imitation_op.register_fake
def _(h, h_ref, mask, p):
    return h.new_empty(h.shape[0], dtype=torch.float64)


@torch.library.custom_op("retain::feature_imitation_backward", mutates_args=())
def feature_imitation_backward_op(grad: Tensor, h: Tensor, h_ref: Tensor, mask: Tensor | None, p: int, need_h: bool,
                                  need_h_ref: bool) -> tuple[Tensor, Tensor]:
    """(grad_h, grad_h_ref) = ±grad[n] * (sign(h - h_ref) or 2 (h - h_ref)) in one pass, 0 on masked rows;
    an unwanted one is empty."""
    device = kernel_device("feature_imitation", h)
    if device is None:
        raise NotImplementedError(
            "retain::feature_imitation: the reference fallback runs through retain.ops.feature_imitation")
    N, D = h.shape
    gh = _native.empty_like(h) if need_h else h.new_empty(0)
    gq = _native.empty_like(h_ref) if need_h_ref else h.new_empty(0)
    if h.numel() and (need_h or need_h_ref):
        g = grad.to(torch.float64).contiguous()
        args = (_native.DTYPE_CODES[h.dtype], h.data_ptr(), h_ref.data_ptr(), g.data_ptr(), _ptr(mask), N, D, p,
                gh.data_ptr() if need_h else 0, gq.data_ptr() if need_h_ref else 0)
        if device == "cpu":
            _native.lib().feature_imitation_bwd_cpu(*args, _native.num_threads())
        else:
            with _launch_guard(h):
                _native.lib().feature_imitation_bwd_cuda(*args, _native.cuda_stream(h.device))
    return gh, gq


@feature_imitation_backward_op.register_fake
def _(grad, h, h_ref, mask, p, need_h, need_h_ref):
    return (_native.fake_empty_like(h) if need_h else h.new_empty(0),
            _native.fake_empty_like(h_ref) if need_h_ref else h.new_empty(0))


def _feature_setup_context(ctx, inputs, output):
    h, h_ref, mask, p = inputs
    ctx.p = p
    ctx.save_for_backward(h, h_ref, mask)


def _feature_backward(ctx, grad_rows):
    h, h_ref, mask = ctx.saved_tensors
    need_h, need_ref = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    gh, gq = feature_imitation_backward_op(grad_rows, h, h_ref, mask, ctx.p, need_h, need_ref)
    return gh if need_h else None, gq if need_ref else None, None, None


feature_imitation_op.register_autograd(_feature_backward, setup_context=_feature_setup_context)


# feature_imitation's reduced loss with its gradient from the forward (CPU), as for the KL above:
# one read of h and h_ref for forward and backward instead of two.


@torch.library.custom_op("retain::feature_imitation_reduced", mutates_args=())
def feature_imitation_reduced_op(h: Tensor, h_ref: Tensor, mask: Tensor | None, p: int, mean: bool, need_h: bool,
                                 need_h_ref: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, rows, scale, grad_h, grad_h_ref): loss (float64, 0-dim) = Σ rows / (#counted tokens
    · D) ('mean', at least 1) or Σ rows; scale its derivative by each counted row; the gradients
    of loss (empty when not wanted)."""
    if kernel_device("feature_imitation", h) != "cpu":
        raise NotImplementedError("retain::feature_imitation_reduced: CPU kernel only")
    N, D = h.shape
    rows = torch.empty(N, dtype=torch.float64, device=h.device)
    n = int(mask.sum()) if mask is not None else N
    scale = 1.0 / max(n * D, 1) if mean else 1.0
    gh = _native.empty_like(h) if need_h else h.new_empty(0)
    gq = _native.empty_like(h_ref) if need_h_ref else h.new_empty(0)
    if h.numel():
        _native.lib().feature_imitation_fwd_grad_cpu(
            _native.DTYPE_CODES[h.dtype], h.data_ptr(), h_ref.data_ptr(), _ptr(mask), N, D, p, scale, rows.data_ptr(),
            gh.data_ptr() if need_h else 0, gq.data_ptr() if need_h_ref else 0, _native.num_threads())
    else:
        rows.zero_()
        gh.zero_()
        gq.zero_()
    scale_t = torch.tensor(scale, dtype=torch.float64)
    return rows.sum() / max(n * D, 1) if mean else rows.sum(), rows, scale_t, gh, gq


@feature_imitation_reduced_op.register_fake
def _(h, h_ref, mask, p, mean, need_h, need_h_ref):
    return (h.new_empty((), dtype=torch.float64), h.new_empty(h.shape[0], dtype=torch.float64),
            h.new_empty((), dtype=torch.float64), _native.fake_empty_like(h) if need_h else h.new_empty(0),
            _native.fake_empty_like(h_ref) if need_h_ref else h.new_empty(0))


def _feature_reduced_setup_context(ctx, inputs, output):
    h, h_ref, mask, p, mean, need_h, need_h_ref = inputs
    _, rows, scale, gh, gq = output
    ctx.mark_non_differentiable(rows, scale, gh, gq)
    ctx.set_materialize_grads(False)
    ctx.p = p
    ctx.save_for_backward(h, h_ref, mask, scale)
    ctx.precomputed = (gh if need_h else None, gq if need_h_ref else None)


def _feature_reduced_backward(ctx, grad_loss, *_unused):
    need_h, need_ref = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if grad_loss is None:
        return None, None, None, None, None, None, None
    out = _hand_out(ctx, grad_loss, (need_h, need_ref))
    if out is None:
        h, h_ref, mask, scale = ctx.saved_tensors
        g_rows = (grad_loss.to(torch.float64) * scale).expand(h.shape[0])
        out = feature_imitation_backward_op(g_rows.contiguous(), h, h_ref, mask, ctx.p, need_h, need_ref)
    return out[0] if need_h else None, out[1] if need_ref else None, None, None, None, None, None


feature_imitation_reduced_op.register_autograd(_feature_reduced_backward, setup_context=_feature_reduced_setup_context)
