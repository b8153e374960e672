"""``retain.ops.mas_accumulate_``: Memory Aware Synapses importance, sums of absolute gradients over
lists in one native pass (custom op ``retain::grad_moments_``; csrc/fisher/README.md)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from retain.ops.fisher._moments import accumulate


def mas_accumulate_(importance: Sequence[Tensor], grads: Sequence[Tensor], *, decay: float = 1.0,
                    scale: float = 1.0) -> Sequence[Tensor]:
    r"""Accumulate MAS importance in place, for every tensor of the lists::

        Ω_i ← decay · Ω_i + scale · Σ_s |g_{s,i}|

    where g_s is the gradient of the squared L2 norm of the model's output for sample s,
    ∂‖f(x_s)‖² / ∂θ (Aljundi et al., 2018); with ``scale = 1 / N`` over N samples Ω is the mean
    absolute sensitivity.

    Args:
        importance: float32/float64 contiguous tensors, updated in place (one per parameter).
        grads: ``importance[i]``'s shape or ``(S, *shape)`` (S per-sample gradients, summed), any
            floating dtype, same device.
        decay, scale: as in :func:`fisher_accumulate_`.

    Returns:
        ``importance`` (updated).

    Examples::

        >>> w = [torch.zeros(3)]
        >>> retain.ops.mas_accumulate_(w, [torch.tensor([[1.0, -2.0, 0.0], [-1.0, 1.0, 4.0]])])
        [tensor([2., 3., 4.])]
    """
    accumulate("retain.ops.mas_accumulate_", "importance", importance, grads, decay=decay, scale=scale, power=1)
    return importance
