"""Margin family: GeRe's threshold-based margin (TM) loss on replayed activations, its 2-bit label
storage and the mergeable per-dimension activation statistics behind its thresholds."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from retain.ops._checks import check_floating, check_tensor, kernel_device
from retain.ops.margin import reference
from retain.ops.margin._ops import (REDUCTION_CODES, acc_dtype, feature_imitation_op, feature_imitation_reduced_op,
                                    kl_imitation_op, kl_imitation_reduced_op, tm_loss_op)

__all__ = ["ActivationStats", "activation_stats", "feature_imitation", "kl_imitation", "pack_tm_labels", "tm_loss",
           "tm_thresholds", "unpack_tm_labels"]


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
                        f"got {str(labels.dtype).replace('torch.', '')}")
    if tuple(labels.shape) != want:
        raise ValueError(f"{op}: labels ({str(labels.dtype).replace('torch.', '')}) must have shape {want}, "
                         f"got {tuple(labels.shape)}")
    acc = acc_dtype(h.dtype)
    thr = []
    for name, t in (("pos_thr", pos_thr), ("neg_thr", neg_thr)):
        check_tensor(op, name, t)
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating tensor, got {str(t.dtype).replace('torch.', '')}")
        if tuple(t.shape) not in ((D,), (B, D)):
            raise ValueError(f"{op}: {name} must have shape {(D,)} or {(B, D)}, got {tuple(t.shape)}")
        thr.append(t.to(acc).contiguous())
    if pos_thr.shape != neg_thr.shape:
        raise ValueError(f"{op}: pos_thr and neg_thr must have the same shape, got {tuple(pos_thr.shape)} and "
                         f"{tuple(neg_thr.shape)}")
    for name, t in (("labels", labels), ("pos_thr", pos_thr), ("neg_thr", neg_thr), ("mask", mask)):
        if t is not None and t.device != h.device:
            raise ValueError(f"{op}: {name} must be on h's device {h.device}, got {t.device}")
    if mask is not None:
        check_tensor(op, "mask", mask)
        if tuple(mask.shape) != (B, L):
            raise ValueError(f"{op}: mask must have shape {(B, L)}, got {tuple(mask.shape)}")
        if mask.is_floating_point() or mask.is_complex():
            raise TypeError(f"{op}: mask must be bool (or integer 0/1), got {str(mask.dtype).replace('torch.', '')}")
        mask = mask.to(torch.bool).to(torch.uint8).contiguous()
    if reduction not in REDUCTION_CODES:
        raise ValueError(f"{op}: reduction must be one of {tuple(REDUCTION_CODES)}, got {reduction!r}")
    if kernel_device("tm_loss", h) is None:  # RETAIN_FALLBACK=reference
        return reference.tm_loss_ref(h, labels, thr[0], thr[1], mask=mask, reduction=reduction)
    # when h will get a gradient, the forward keeps its slope signs (2 bits an element) and the
    # backward writes the gradient from them instead of reading h and the labels again
    keep_slope = torch.is_grad_enabled() and h.requires_grad
    loss, _, _ = tm_loss_op(h.contiguous(), labels.contiguous(), thr[0], thr[1], mask, REDUCTION_CODES[reduction],
                            keep_slope)
    return loss


def pack_tm_labels(ref: Tensor, pos_thr: Tensor, neg_thr: Tensor) -> Tensor:
    """Labels of reference activations ``ref`` ``[..., D]`` packed four per byte:
    uint8 ``[..., ceil(D/4)]`` (16× smaller than float32 references, 4× smaller than int8 labels).
    +1 where ref ≥ τ⁺, −1 where ref ≤ τ⁻, 0 between; thresholds broadcast against ``ref``."""
    return reference.pack_tm_labels_ref(reference.tm_labels_ref(ref, pos_thr, neg_thr))


def unpack_tm_labels(packed: Tensor, D: int) -> Tensor:
    """uint8 ``[..., ceil(D/4)]`` from :func:`pack_tm_labels` -> int8 labels ``[..., D]``."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"retain.ops.unpack_tm_labels: packed must be uint8, got {packed.dtype}")
    if packed.shape[-1] != (D + 3) // 4:
        raise ValueError(f"retain.ops.unpack_tm_labels: packed's last dimension must be ceil(D/4) = {(D + 3) // 4} "
                         f"for D = {D}, got {packed.shape[-1]}")
    return reference.unpack_tm_labels_ref(packed, D)


@dataclass(frozen=True)
class ActivationStats:
    """Per-dimension activation statistics: ``count`` (0-dim), ``mean`` and ``m2`` (sum of squared
    deviations) ``[D]``, all float64. Mergeable exactly (Chan et al.), so statistics of batches and
    of ranks combine into those of the whole; never the unstable E[h²] − mean²."""

    count: Tensor
    mean: Tensor
    m2: Tensor

    def merge(self, other: "ActivationStats") -> "ActivationStats":
        n = self.count + other.count
        if float(n) == 0.0:
            return self
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + delta * delta * (self.count * other.count / n)
        return ActivationStats(n, mean, m2)

    @staticmethod
    def combine(parts: "list[ActivationStats]") -> "ActivationStats":
        """Statistics of the union of ``parts`` from sums only (the form :meth:`all_reduce` uses):
        mean = Σ nᵢ·meanᵢ / n, m2 = Σ [m2ᵢ + nᵢ (meanᵢ − mean)²]. Deviations are taken from the
        global mean, so this is as exact as :meth:`merge` and independent of the order of parts."""
        if not parts:
            raise ValueError("ActivationStats.combine: needs at least one ActivationStats, got none")
        n = sum(p.count for p in parts)
        mean = sum(p.count * p.mean for p in parts) / n.clamp_min(1)
        m2 = sum(p.m2 + p.count * (p.mean - mean) ** 2 for p in parts)
        return ActivationStats(n, mean, m2)

    def all_reduce(self, group=None) -> "ActivationStats":
        """Statistics of every rank's data, returned on every rank (``torch.distributed``
        initialised; tensors on the device the backend expects, e.g. CUDA for NCCL). Two
        ``all_reduce(SUM)`` calls (float64 ``[D + 1]`` then ``[D]``), the :meth:`combine` formula:
        exact (no E[h²] − mean²) and independent of the reduction order up to rounding."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("ActivationStats.all_reduce: torch.distributed is not initialised "
                               "(call torch.distributed.init_process_group first)")
        sums = torch.cat([self.count.reshape(1), self.count * self.mean])
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        n = sums[0]
        mean = sums[1:] / n.clamp_min(1)
        m2 = self.m2 + self.count * (self.mean - mean) ** 2
        dist.all_reduce(m2, op=dist.ReduceOp.SUM, group=group)
        return ActivationStats(n, mean, m2)

    def to(self, device) -> "ActivationStats":
        return ActivationStats(self.count.to(device), self.mean.to(device), self.m2.to(device))

    def variance(self, unbiased: bool = True) -> Tensor:
        d = self.count - 1 if unbiased else self.count
        return self.m2 / d.clamp_min(1)


def activation_stats(h: Tensor, mask: Tensor | None = None) -> ActivationStats:
    """Statistics of ``h`` ``[..., D]`` over its leading positions (those where ``mask`` ``[...]``
    is true), in float64 (two passes over the batch: mean, then squared deviations).

    Examples::

        >>> s = retain.ops.activation_stats(torch.tensor([[1.0, 2.0], [3.0, 6.0]]))
        >>> s.count.item(), s.mean.tolist(), s.m2.tolist()
        (2.0, [2.0, 4.0], [2.0, 8.0])
    """
    check_tensor("retain.ops.activation_stats", "h", h, ndim_min=1)
    return ActivationStats(*reference.activation_stats_ref(h, mask))


def tm_thresholds(stats: ActivationStats, k: float = 1.0) -> tuple[Tensor, Tensor]:
    """GeRe's thresholds ``(τ⁺, τ⁻) = (mean + k·std, mean − k·std)`` per dimension, with the
    unbiased standard deviation (as ``torch.std``), float32."""
    std = stats.variance(unbiased=True).sqrt()
    return (stats.mean + k * std).float(), (stats.mean - k * std).float()


def _dtype_name(t: Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _check_like(op: str, name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    """``t`` (a reference tensor) must have ``ref``'s shape, dtype and device."""
    check_tensor(op, name, t)
    if tuple(t.shape) != tuple(ref.shape):
        raise ValueError(f"{op}: {name} must have {ref_name}'s shape {tuple(ref.shape)}, got {tuple(t.shape)}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{op}: {name} must have {ref_name}'s dtype {_dtype_name(ref)}, got {_dtype_name(t)} "
                        f"(cast it with {name}.to({ref_name}.dtype))")
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} must be on {ref_name}'s device {ref.device}, got {t.device}")


def _check_token_mask(op: str, mask: Tensor | None, ref_name: str, ref: Tensor) -> None:
    """A per-token mask: ``ref``'s shape without its last dimension, bool or integer 0/1."""
    if mask is None:
        return
    check_tensor(op, "mask", mask)
    lead = tuple(ref.shape[:-1])
    if tuple(mask.shape) != lead:
        raise ValueError(f"{op}: mask must have shape {lead} ({ref_name} without its last dimension), "
                         f"got {tuple(mask.shape)}")
    if mask.is_floating_point() or mask.is_complex():
        raise TypeError(f"{op}: mask must be bool (or integer 0/1), got {_dtype_name(mask)}")
    if mask.device != ref.device:
        raise ValueError(f"{op}: mask must be on {ref_name}'s device {ref.device}, got {mask.device}")


def _check_reduction(op: str, reduction: str) -> None:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"{op}: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


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
    _check_like(op, "z_ref", z_ref, "z", z)
    if z.shape[-1] == 0:
        raise ValueError(f"{op}: the vocabulary (last) dimension of z must not be empty")
    if not float(temperature) > 0:
        raise ValueError(f"{op}: temperature must be > 0, got {temperature}")
    lead = tuple(z.shape[:-1])
    _check_token_mask(op, mask, "z", z)
    _check_reduction(op, reduction)
    if kernel_device("kl_imitation", z) is None:  # RETAIN_FALLBACK=reference
        return reference.kl_imitation_ref(z, z_ref, temperature=temperature, mask=mask, reduction=reduction)
    V = z.shape[-1]
    m = mask.reshape(-1).to(torch.bool).to(torch.uint8).contiguous() if mask is not None else None
    need_z, need_ref = torch.is_grad_enabled() and z.requires_grad, torch.is_grad_enabled() and z_ref.requires_grad
    if reduction != "none" and (need_z or need_ref) and kernel_device("kl_imitation", z) == "cpu" \
            and not torch.compiler.is_compiling():
        # eager training on the CPU: the gradient comes out of the forward pass (no second pass)
        loss = kl_imitation_reduced_op(z.reshape(-1, V).contiguous(), z_ref.reshape(-1, V).contiguous(), m,
                                       1.0 / float(temperature), reduction == "mean", need_z, need_ref)[0]
        return loss.to(acc_dtype(z.dtype))
    rows, _, _ = kl_imitation_op(z.reshape(-1, V).contiguous(), z_ref.reshape(-1, V).contiguous(), m,
                                 1.0 / float(temperature))
    acc = acc_dtype(z.dtype)
    if reduction == "none":
        return rows.reshape(lead).to(acc)
    total = rows.sum()
    if reduction == "sum":
        return total.to(acc)
    n = m.sum().to(torch.float64) if m is not None else torch.tensor(float(rows.numel()), dtype=torch.float64)
    return (total / n.clamp_min(1)).to(acc)


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
    _check_like(op, "h_ref", h_ref, "h", h)
    if isinstance(p, bool) or p not in (1, 2):
        raise ValueError(f"{op}: p must be 1 or 2, got {p!r}")
    lead = tuple(h.shape[:-1])
    _check_token_mask(op, mask, "h", h)
    _check_reduction(op, reduction)
    if kernel_device("feature_imitation", h) is None:  # RETAIN_FALLBACK=reference
        return reference.feature_imitation_ref(h, h_ref, p=int(p), mask=mask, reduction=reduction)
    D = h.shape[-1]
    N = math.prod(lead)
    m = mask.reshape(N).to(torch.bool).to(torch.uint8).contiguous() if mask is not None else None
    need_h, need_ref = torch.is_grad_enabled() and h.requires_grad, torch.is_grad_enabled() and h_ref.requires_grad
    if reduction != "none" and (need_h or need_ref) and kernel_device("feature_imitation", h) == "cpu" \
            and not torch.compiler.is_compiling():
        # eager training on the CPU: the gradient comes out of the forward pass
        loss = feature_imitation_reduced_op(h.reshape(N, D).contiguous(), h_ref.reshape(N, D).contiguous(), m,
                                            int(p), reduction == "mean", need_h, need_ref)[0]
        return loss.to(acc_dtype(h.dtype))
    rows = feature_imitation_op(h.reshape(N, D).contiguous(), h_ref.reshape(N, D).contiguous(), m, int(p))
    acc = acc_dtype(h.dtype)
    if reduction == "none":
        return rows.reshape(lead).to(acc)
    total = rows.sum()
    if reduction == "sum":
        return total.to(acc)
    n = m.sum().to(torch.float64) if m is not None else torch.tensor(float(N), dtype=torch.float64)
    return (total / (n * D).clamp_min(1)).to(acc)
