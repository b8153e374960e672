"""Pure-PyTorch references of the margin family (GeRe's threshold-based margin loss and the
activation statistics behind its thresholds): the oracle for tests and the fallback."""

from __future__ import annotations

import torch

REDUCTIONS = ("violations", "mean", "sum")
VIOLATIONS_EPS = 1e-8  # GeRe's denominator: sum / (#violations + 1e-8)

# 2-bit codes of packed labels, four per byte, label i of a row at bits 2*(i % 4) of byte i // 4
CODE_ZERO, CODE_POS, CODE_NEG = 0, 1, 2


def tm_labels_ref(ref: torch.Tensor, pos_thr: torch.Tensor, neg_thr: torch.Tensor) -> torch.Tensor:
    """int8 labels of reference activations: +1 where ref >= pos_thr, -1 where ref <= neg_thr, else 0."""
    pos = ref >= pos_thr
    neg = (ref <= neg_thr) & ~pos
    return pos.to(torch.int8) - neg.to(torch.int8)


def pack_tm_labels_ref(labels: torch.Tensor) -> torch.Tensor:
    """int8 labels ``[..., D]`` in {-1, 0, 1} -> uint8 ``[..., ceil(D / 4)]``, four 2-bit codes a byte."""
    D = labels.shape[-1]
    pad = (-D) % 4
    codes = torch.where(labels > 0, CODE_POS, torch.where(labels < 0, CODE_NEG, CODE_ZERO)).to(torch.uint8)
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    codes = codes.reshape(*codes.shape[:-1], -1, 4)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=labels.device)
    return (codes << shifts).sum(-1, dtype=torch.uint8)


def unpack_tm_labels_ref(packed: torch.Tensor, D: int) -> torch.Tensor:
    """uint8 ``[..., ceil(D / 4)]`` -> int8 labels ``[..., D]``."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(-1) >> shifts) & 3
    codes = codes.reshape(*packed.shape[:-1], -1)[..., :D]
    return (codes == CODE_POS).to(torch.int8) - (codes == CODE_NEG).to(torch.int8)


def _hinge(x: torch.Tensor) -> torch.Tensor:
    """max(0, x) with the kernels' slope [x > 0]: NaN stays NaN with a zero gradient (relu's
    backward would pass the incoming gradient through a NaN), 0 at x = 0."""
    return torch.where(x > 0, x, torch.where(torch.isnan(x), x.detach(), 0.0))


def tm_elementwise_ref(h: torch.Tensor, labels: torch.Tensor, pos_thr: torch.Tensor,
                       neg_thr: torch.Tensor) -> torch.Tensor:
    """The TM loss of every element: label +1: max(0, pos - h); -1: max(0, h - neg);
    0: max(0, h - pos) + max(0, neg - h)."""
    lp = _hinge(pos_thr - h)
    ln = _hinge(h - neg_thr)
    l0 = _hinge(h - pos_thr) + _hinge(neg_thr - h)
    return torch.where(labels > 0, lp, torch.where(labels < 0, ln, l0))


def tm_loss_ref(h: torch.Tensor, labels: torch.Tensor, pos_thr: torch.Tensor, neg_thr: torch.Tensor, *,
                mask: torch.Tensor | None = None, reduction: str = "violations") -> torch.Tensor:
    """Threshold-based margin loss of current activations ``h`` ``[B, L, D]`` against int8
    ``labels`` ``[B, L, D]`` (or packed uint8 ``[B, L, ceil(D/4)]``); thresholds ``[D]`` or
    ``[B, D]``; ``mask`` ``[B, L]`` (bool). Computed in float64 for float64 inputs, else float32.

    Reductions over masked elements: 'violations' (GeRe) sum / (#{loss > 0} + 1e-8), 'mean'
    sum / #masked elements (0 when nothing is masked in), 'sum'.
    """
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    B, L, D = h.shape
    if labels.dtype == torch.uint8:
        labels = unpack_tm_labels_ref(labels, D)
    pos = pos_thr.to(acc)
    neg = neg_thr.to(acc)
    if pos.dim() == 2:  # per-sample thresholds [B, D]
        pos, neg = pos[:, None, :], neg[:, None, :]
    ell = tm_elementwise_ref(h.to(acc), labels, pos, neg)
    m = torch.ones(B, L, dtype=torch.bool, device=h.device) if mask is None else mask.to(torch.bool)
    ell = ell * m[..., None].to(acc)
    total = ell.sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        n = m.sum().to(acc) * D
        return total / n.clamp_min(1)
    if reduction == "violations":
        return total / ((ell > 0).sum().to(acc) + VIOLATIONS_EPS)
    raise ValueError(f"tm_loss_ref: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def activation_stats_ref(h: torch.Tensor, mask: torch.Tensor | None = None):
    """Per-dimension (count, mean, m2) of ``h`` ``[..., D]`` over the masked leading positions, in
    float64 by the two-pass formula (the oracle for the mergeable statistics)."""
    x = h.reshape(-1, h.shape[-1]).to(torch.float64)
    if mask is not None:
        x = x[mask.reshape(-1).to(torch.bool)]
    n = torch.tensor(float(x.shape[0]), dtype=torch.float64, device=h.device)
    mean = x.mean(0) if x.shape[0] else torch.zeros(h.shape[-1], dtype=torch.float64, device=h.device)
    m2 = ((x - mean) ** 2).sum(0)
    return n, mean, m2


def kl_imitation_ref(z: torch.Tensor, z_ref: torch.Tensor, *, temperature: float = 1.0,
                     mask: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """KL(softmax(z_ref / T) || softmax(z / T)) per token over the last (vocabulary) dimension of
    ``[..., V]`` logits, materialising the probabilities (the oracle). Reductions over the tokens
    where ``mask`` is true: 'mean' (0 when none), 'sum', 'none' (per token, masked tokens 0)."""
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    logp = torch.log_softmax(z.to(acc) / temperature, -1)
    logq = torch.log_softmax(z_ref.to(acc) / temperature, -1)
    # a -inf reference logit is a zero probability: its term is 0 (the limit of q log q), not
    # 0 * -inf; the select keeps NaN out of the gradient as well
    seen = logq > -torch.inf
    lq = torch.where(seen, logq, 0.0)
    rows = torch.where(seen, lq.exp() * (lq - logp), 0.0).sum(-1)
    if mask is not None:
        rows = rows * mask.to(acc)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    if reduction == "mean":
        n = mask.sum().to(acc) if mask is not None else torch.tensor(float(rows.numel()), dtype=acc)
        return rows.sum() / n.clamp_min(1)
    raise ValueError(f"kl_imitation_ref: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def feature_imitation_ref(h: torch.Tensor, h_ref: torch.Tensor, *, p: int = 2, mask: torch.Tensor | None = None,
                          reduction: str = "mean") -> torch.Tensor:
    """Per-token distance between hidden states ``h`` and ``h_ref`` ``[..., D]``: Σ_d |h − h_ref|
    (p = 1) or Σ_d (h − h_ref)² (p = 2), in float64 for float64 inputs, else float32. Reductions over
    the tokens where ``mask`` is true: 'mean' divides the sum by (#tokens · D) (0 when none: as
    F.l1_loss / F.mse_loss over the counted tokens), 'sum', 'none' (per token ``[...]``, masked 0)."""
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    diff = h.to(acc) - h_ref.to(acc)
    if p == 1:
        rows = diff.abs().sum(-1)
    elif p == 2:
        rows = diff.square().sum(-1)
    else:
        raise ValueError(f"feature_imitation_ref: p must be 1 or 2, got {p!r}")
    if mask is not None:
        rows = torch.where(mask.to(torch.bool), rows, torch.zeros((), dtype=acc, device=rows.device))
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    if reduction == "mean":
        n = mask.to(torch.bool).sum().to(acc) if mask is not None else torch.tensor(float(rows.numel()), dtype=acc)
        return rows.sum() / (n * h.shape[-1]).clamp_min(1)
    raise ValueError(f"feature_imitation_ref: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
