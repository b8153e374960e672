"""``retain.ops.activation_stats`` / ``tm_thresholds``: mergeable per-dimension activation
statistics (exact across batches and ranks) and GeRe's thresholds from them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from retain.ops._checks import check_mask, check_number, check_tensor


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
    op = "retain.ops.activation_stats"
    check_tensor(op, "h", h, ndim_min=1)
    D = h.shape[-1]
    x = h.reshape(-1, D).to(torch.float64)
    if mask is None:
        w = torch.ones(x.shape[0], 1, dtype=torch.bool, device=h.device)
    else:
        w = check_mask(op, mask, h.shape[:-1], "h without its last dimension", "h", h).reshape(-1, 1).to(torch.bool)
    # weights instead of x[mask]: no data-dependent shape (torch.compile, export), and masked rows
    # may hold anything (NaN padding) without reaching the statistics
    x = torch.where(w, x, 0.0)
    n = w.sum(dtype=torch.float64)
    mean = x.sum(0) / n.clamp_min(1)
    m2 = torch.where(w, x - mean, 0.0).square().sum(0)
    return ActivationStats(n, mean, m2)


def tm_thresholds(stats: ActivationStats, k: float = 1.0) -> tuple[Tensor, Tensor]:
    """GeRe's thresholds ``(τ⁺, τ⁻) = (mean + k·std, mean − k·std)`` per dimension, with the
    unbiased standard deviation (as ``torch.std``), float32.

    Examples::

        >>> s = retain.ops.activation_stats(torch.tensor([[1.0], [3.0]]))
        >>> retain.ops.tm_thresholds(s, k=1.0)
        (tensor([3.4142]), tensor([0.5858]))
    """
    op = "retain.ops.tm_thresholds"
    if not isinstance(stats, ActivationStats):
        raise TypeError(f"{op}: stats must be an ActivationStats (from retain.ops.activation_stats), got "
                        f"{type(stats).__name__}")
    k = check_number(op, "k", k, minimum=0.0)
    count = float(stats.count)
    if count < 2:
        raise ValueError(f"{op}: stats must count at least 2 tokens (an unbiased standard deviation needs two), "
                         f"got {count:g}")
    std = stats.variance(unbiased=True).sqrt()
    return (stats.mean + k * std).float(), (stats.mean - k * std).float()
