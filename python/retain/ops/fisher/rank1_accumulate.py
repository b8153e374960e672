"""``retain.ops.rank1_accumulate_``: the sums behind the rank-1 Fisher F ≈ c·μμᵀ (and the diagonal,
from the same samples) over lists in one native pass (custom op ``retain::grad_moments_``)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from retain.ops.fisher._moments import accumulate


def rank1_accumulate_(mu_sum: Sequence[Tensor], sq_sum: Sequence[Tensor] | None,
                      grads: Sequence[Tensor]) -> tuple[Sequence[Tensor], Sequence[Tensor] | None]:
    r"""Accumulate the first and second moments of per-sample gradients in place::

        mu_sum_i ← mu_sum_i + Σ_s g_{s,i}        sq_sum_i ← sq_sum_i + Σ_s g_{s,i}²

    After N samples μ = mu_sum / N is the mean gradient of the rank-1 Fisher F ≈ c·μμᵀ ("Avoid
    Catastrophic Forgetting with Rank-1 Fisher from Diffusion Models") and sq_sum / N the diagonal
    Fisher of the same samples; c* = E[(μᵀg)²] / ‖μ‖⁴ needs μ first, then a second pass over the
    same gradients (:func:`rank1_coefficient`).

    Args:
        mu_sum: float32/float64 contiguous tensors, updated in place (one per parameter).
        sq_sum: the same shapes and dtypes, updated in place, or None (μ only).
        grads: ``mu_sum[i]``'s shape or ``(S, *shape)`` (S per-sample gradients), any floating
            dtype, same device.

    Returns:
        ``(mu_sum, sq_sum)`` (updated).

    Examples::

        >>> mu, sq = [torch.zeros(2)], [torch.zeros(2)]
        >>> retain.ops.rank1_accumulate_(mu, sq, [torch.tensor([[1.0, 2.0], [3.0, -1.0]])])
        ([tensor([4., 1.])], [tensor([10.,  5.])])
    """
    accumulate("retain.ops.rank1_accumulate_", "sq_sum", sq_sum, grads, first=mu_sum, first_name="mu_sum", power=2)
    return mu_sum, sq_sum
