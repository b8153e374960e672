"""``retain.ops.tm_loss``: GeRe's threshold-based margin loss (custom ops ``retain::tm_loss``,
its backward and the backward from the forward's slope bits; derivation in csrc/margin/README.md)."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from retain import _native
from retain.ops import _dispatch
from retain.ops._checks import check_choice, check_device, check_floating, check_mask, check_tensor, dtype_name
from retain.ops._dispatch import acc_dtype
from retain.ops.margin import reference

_OP = "tm_loss"
REDUCTION_CODES = {"violations": 0, "mean": 1, "sum": 2}


def tm_loss(h: Tensor, labels: Tensor, pos_thr: Tensor, neg_thr: Tensor, *, mask: Tensor | None = None,
            reduction: str = "violations") -> Tensor:
    r"""Threshold-based margin loss (GeRe): keeps current activations ``h`` inside the activation
    state their reference had. Per element, with thresholds τ⁺ = ``pos_thr``, τ⁻ = ``neg_thr``::

        label +1:  max(0, τ⁺ − h)      label −1:  max(0, h − τ⁻)
        label  0:  max(0, h − τ⁺) + max(0, τ⁻ − h)

    Args:
        h: current activations ``[B, L, D]``, float32/bfloat16/float16 (float64 too); 16-bit inputs
            are computed in float32.
        labels: int8 ``[B, L, D]`` in {-1, 0, 1}, or packed 2-bit labels uint8 ``[B, L, ceil(D/4)]``
            from :func:`pack_tm_labels` (read directly by the kernel).
        pos_thr, neg_thr: thresholds ``[D]``, or ``[B, D]`` (per-sample source datasets).
        mask: ``[B, L]`` bool: positions that count (padding excluded).
        reduction: ``'violations'`` (GeRe): Σ loss / (#{loss > 0} + 1e-8); ``'mean'``: Σ loss /
            #counted elements (0 when the mask is empty); ``'sum'``.

    Returns:
        The 0-dim loss (float32; float64 for float64 ``h``). Backward: ``∂/∂h = ±1 / denominator``
        on violating elements (the count of violations is piecewise constant), one fused pass;
        thresholds get gradients too (computed in PyTorch, only when they require grad).

    Examples::

        >>> h = torch.tensor([[[0.5, -2.0, 3.0, 0.0]]])
        >>> labels = torch.tensor([[[1, -1, 0, 0]]], dtype=torch.int8)
        >>> pos, neg = torch.ones(4), -torch.ones(4)
        >>> retain.ops.tm_loss(h, labels, pos, neg, reduction="sum")   # 0.5 + 0 + 2 + 0
        tensor(2.5000)
    """
    op = "retain.ops.tm_loss"
    check_tensor(op, "h", h, ndim=3)
    check_floating(op, "h", h)
    B, L, D = h.shape
    check_tensor(op, "labels", labels)
    if labels.dtype == torch.int8:
        want = (B, L, D)
    elif labels.dtype == torch.uint8:
        want = (B, L, (D + 3) // 4)
    else:
        raise TypeError(f"{op}: labels must be int8 {{-1, 0, 1}} or packed uint8 (pack_tm_labels), "
                        f"got {dtype_name(labels)}")
    if tuple(labels.shape) != want:
        raise ValueError(f"{op}: labels ({dtype_name(labels)}) must have shape {want}, "
                         f"got {tuple(labels.shape)}")
    acc = acc_dtype(h.dtype)
    thr = []
    for name, t in (("pos_thr", pos_thr), ("neg_thr", neg_thr)):
        check_tensor(op, name, t)
        check_floating(op, name, t, ())
        if tuple(t.shape) not in ((D,), (B, D)):
            raise ValueError(f"{op}: {name} must have shape {(D,)} or {(B, D)}, got {tuple(t.shape)}")
        thr.append(t.to(acc).contiguous())
    if pos_thr.shape != neg_thr.shape:
        raise ValueError(f"{op}: pos_thr and neg_thr must have the same shape, got {tuple(pos_thr.shape)} and "
                         f"{tuple(neg_thr.shape)}")
    for name, t in (("labels", labels), ("pos_thr", pos_thr), ("neg_thr", neg_thr)):
        check_device(op, name, t, "h", h)
    mask = check_mask(op, mask, (B, L), "[B, L]", "h", h)
    check_choice(op, "reduction", reduction, REDUCTION_CODES)
    # when h will get a gradient, the forward keeps its slope signs (2 bits an element) and the
    # backward writes the gradient from them instead of reading h and the labels again
    keep_slope = torch.is_grad_enabled() and h.requires_grad
    loss, _, _ = tm_loss_op(h.contiguous(), labels.contiguous(), thr[0], thr[1], mask, REDUCTION_CODES[reduction],
                            keep_slope)
    return loss


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
    element) where the CPU kernel runs, for float32/bfloat16/float16 when asked, else empty (the
    backward re-reads h)."""
    B, L, D = h.shape
    if keep_slope and h.dtype != torch.float64 and all(
            _dispatch.served(op, h.device) for op in (tm_loss_op, tm_loss_backward_bits_op)):
        return (B * L, 2 * ((D + 15) // 16))
    return (0,)


def _aligned(h, labels, pos_thr, neg_thr):
    """int8 labels and the thresholds broadcastable against h [B, L, D] (the PyTorch paths)."""
    if labels.dtype == torch.uint8:
        labels = reference.unpack_tm_labels_ref(labels, h.shape[-1])
    pos, neg = (t[:, None, :] if t.dim() == 2 else t for t in (pos_thr, neg_thr))
    return labels, pos, neg


def _elementwise(h, labels, pos_thr, neg_thr, mask):
    """Every element's loss in the state dtype, exactly 0 on masked rows (whatever they hold)."""
    labels, pos, neg = _aligned(h, labels, pos_thr, neg_thr)
    ell = reference.tm_elementwise_ref(h.to(pos_thr.dtype), labels, pos, neg)
    return ell if mask is None else torch.where(mask.to(torch.bool)[..., None], ell, 0.0)


@torch.library.custom_op("retain::tm_loss", mutates_args=())
def tm_loss_op(h: Tensor, labels: Tensor, pos_thr: Tensor, neg_thr: Tensor, mask: Tensor | None,
               reduction: int, keep_slope: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, denominator, slope_bits): the reduced TM loss (state dtype, 0-dim), the float64
    divisor used and, with keep_slope (h requires grad), the sign of every element's slope for the
    backward (int16 words, see _slope_bits_shape). h [B, L, D]; labels int8 [B, L, D] or packed
    uint8 [B, L, ceil(D/4)]; thresholds [D] or [B, D] in the state dtype; mask uint8 [B, L] or None.
    This body is the fallback, in PyTorch."""
    _dispatch.fallback(_OP, h)
    _check_labels(labels, mask)
    ell = _elementwise(h, labels, pos_thr, neg_thr, mask)
    denom = _denominator(reduction, (ell > 0).sum(), mask, *h.shape)
    bits = h.new_empty(_slope_bits_shape(h, keep_slope), dtype=torch.int16)
    return (ell.to(torch.float64).sum() / denom).to(acc_dtype(h.dtype)), denom, bits


def _check_labels(labels: Tensor, mask: Tensor | None) -> None:
    """What the CPU kernel checks as it reads the labels (csrc/margin/tm_loss.h, tm_labels_valid),
    for the paths that do not: int8 in {-1, 0, 1}, packed codes 0-2, on the counted rows. One pass
    over the labels and a host sync (inside the custom op, so under torch.compile too)."""
    if labels.dtype == torch.uint8:
        bad = (labels & (labels >> 1) & 0x55) != 0
        what = "packed labels must hold codes 0, 1, 2 (from pack_tm_labels), got code 3"
    else:
        bad = (labels < -1) | (labels > 1)
        what = "labels must be int8 in {-1, 0, 1}, got"
    if mask is not None:
        bad &= mask.to(torch.bool)[..., None]
    if bool(bad.any()):
        at = [int(i) for i in bad.nonzero()[0]]
        got = "" if labels.dtype == torch.uint8 else f" {int(labels[tuple(at)])}"
        raise ValueError(f"retain.ops.tm_loss: {what}{got} at {at}")


def _forward(h, labels, pos_thr, neg_thr, mask, reduction, keep_slope=False, *, writes_bits: bool):
    B, L, D = h.shape
    if not writes_bits:  # CUDA: the CPU kernel checks the labels itself
        _check_labels(labels, mask)
    row_sum = torch.empty(B * L, dtype=torch.float64, device=h.device)
    row_count = torch.empty(B * L, dtype=torch.int64, device=h.device)
    bits = torch.empty(_slope_bits_shape(h, keep_slope), dtype=torch.int16, device=h.device)
    if B * L:
        args = (_dispatch.dtype_code(h), labels.dtype == torch.uint8, h.data_ptr(), labels.data_ptr(),
                labels.shape[-1], pos_thr.data_ptr(), neg_thr.data_ptr(), pos_thr.dim() == 2, _dispatch.ptr(mask),
                B, L, D, row_sum.data_ptr(), row_count.data_ptr())
        # the CPU kernel also writes the slope bits (nullptr: not wanted)
        _dispatch.run("tm_loss_fwd", h.device, *args, *((_dispatch.ptr(bits),) if writes_bits else ()))
    denom = _denominator(reduction, row_count.sum(), mask, B, L, D)
    return (row_sum.sum() / denom).to(acc_dtype(h.dtype)), denom, bits


@tm_loss_op.register_fake
def _(h, labels, pos_thr, neg_thr, mask, reduction, keep_slope=False):
    return (h.new_empty((), dtype=acc_dtype(h.dtype)), h.new_empty((), dtype=torch.float64),
            h.new_empty(_slope_bits_shape(h, keep_slope), dtype=torch.int16))


@torch.library.custom_op("retain::tm_loss_backward_bits", mutates_args=())
def tm_loss_backward_bits_op(grad: Tensor, denom: Tensor, slope_bits: Tensor, h: Tensor) -> Tensor:
    """d loss / d h = grad / denominator * slope from the forward's slope bits: writes the gradient
    without reading h again (h gives the shape and dtype only). This body, the fallback, decodes
    the bits in PyTorch: row r's words 2k and 2k + 1 hold the masks of slope +1 and -1 of its
    elements 16k .. 16k + 15 (csrc/margin/tm_loss.h)."""
    _dispatch.fallback(_OP, h)
    B, L, D = h.shape
    bit = (slope_bits.reshape(B * L, -1, 2, 1).to(torch.int32) >> torch.arange(16, device=h.device)) & 1
    slope = (bit[:, :, 0] - bit[:, :, 1]).reshape(B * L, -1)[:, :D]
    scale = (grad.to(torch.float64) / denom).to(acc_dtype(h.dtype))
    return (slope.to(scale.dtype) * scale).to(h.dtype).reshape(h.shape).contiguous()


def _backward_bits_cpu(grad, denom, slope_bits, h):
    B, L, D = h.shape
    grad_h = _native.empty_like(h)
    if h.numel():
        _native.lib().tm_loss_bwd_bits_cpu(_dispatch.dtype_code(h), slope_bits.data_ptr(), B * L, D,
                                           float(grad.to(torch.float64) / denom), grad_h.data_ptr(),
                                           _native.num_threads())
    return grad_h


@tm_loss_backward_bits_op.register_fake
def _(grad, denom, slope_bits, h):
    return _native.fake_empty_like(h)


@torch.library.custom_op("retain::tm_loss_backward", mutates_args=())
def tm_loss_backward_op(grad: Tensor, denom: Tensor, h: Tensor, labels: Tensor, pos_thr: Tensor, neg_thr: Tensor,
                        mask: Tensor | None) -> Tensor:
    """d loss / d h = grad / denominator * mask * slope, one pass over h (the count of violations is
    piecewise constant: no gradient). This body is the fallback: autograd through the reference."""
    _dispatch.fallback(_OP, h)
    scale = (grad.to(torch.float64) / denom).to(pos_thr.dtype)
    (grad_h,) = _dispatch.reference_vjp(lambda x: (_elementwise(x, labels, pos_thr, neg_thr, mask).sum(),),
                                        (h,), (scale,), (True,))
    return grad_h


def _backward_args(grad, denom, h, labels, pos_thr, neg_thr, mask):
    B, L, D = h.shape
    return (_dispatch.dtype_code(h), labels.dtype == torch.uint8, h.data_ptr(), labels.data_ptr(), labels.shape[-1],
            pos_thr.data_ptr(), neg_thr.data_ptr(), pos_thr.dim() == 2, _dispatch.ptr(mask), B, L, D)


def _backward_cpu(grad, denom, h, labels, pos_thr, neg_thr, mask):
    grad_h = _native.empty_like(h)
    if h.numel():
        _native.lib().tm_loss_bwd_cpu(*_backward_args(grad, denom, h, labels, pos_thr, neg_thr, mask),
                                      float(grad.to(torch.float64) / denom), grad_h.data_ptr(), _native.num_threads())
    return grad_h


def _backward_cuda(grad, denom, h, labels, pos_thr, neg_thr, mask):
    grad_h = _native.empty_like(h)
    if h.numel():  # the kernel reads the scale on the device: no host sync
        scale = (grad.to(torch.float64) / denom).reshape(()).contiguous()
        with torch.cuda.device(h.device):
            _native.lib().tm_loss_bwd_cuda(*_backward_args(grad, denom, h, labels, pos_thr, neg_thr, mask),
                                           scale.data_ptr(), grad_h.data_ptr(), _native.cuda_stream(h.device))
    return grad_h


@tm_loss_backward_op.register_fake
def _(grad, denom, h, labels, pos_thr, neg_thr, mask):
    return _native.fake_empty_like(h)


def _threshold_grads(grad, denom, h, labels, pos_thr, neg_thr, mask):
    """Gradients of the thresholds (rarely wanted: GeRe's are fixed statistics), in PyTorch."""
    labels, pos, neg = _aligned(h, labels, pos_thr, neg_thr)
    acc = pos_thr.dtype
    x = h.to(acc)
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
_dispatch.register_kernels(tm_loss_op, _OP, cpu=functools.partial(_forward, writes_bits=True),
                           cuda=functools.partial(_forward, writes_bits=False))
_dispatch.register_kernels(tm_loss_backward_bits_op, _OP, cpu=_backward_bits_cpu)
_dispatch.register_kernels(tm_loss_backward_op, _OP, cpu=_backward_cpu, cuda=_backward_cuda)
