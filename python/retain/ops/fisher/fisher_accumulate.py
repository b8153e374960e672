"""``retain.ops.fisher_accumulate_``: the diagonal (empirical) Fisher summed over lists of
gradients in one native pass (custom op ``retain::grad_moments_``; csrc/fisher/README.md)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from retain.ops.fisher._moments import accumulate


def fisher_accumulate_(fisher: Sequence[Tensor], grads: Sequence[Tensor], *, decay: float = 1.0,
                       scale: float = 1.0) -> Sequence[Tensor]:
    r"""Accumulate the diagonal Fisher in place, for every tensor of the lists::

        F_i ← decay · F_i + scale · Σ_s g_{s,i}²

    in one native pass over all tensors (no per-parameter Python loop, no temporaries).

    Args:
        fisher: the Fisher tensors, float32 or float64 (the accumulation dtype), contiguous,
            updated in place; one per parameter, any shapes (scalars and empty tensors included).
        grads: one per Fisher tensor, on the same device: ``fisher[i]``'s shape (one gradient) or
            ``(S, *fisher[i].shape)``, the same S for every tensor (S per-sample gradients, e.g. from
            ``torch.func.vmap(torch.func.grad(...))``, summed); any floating dtype (bfloat16
            gradients into a float32 Fisher are computed in float32).
        decay: the factor on the old value (online EWC's γ; 1 keeps a running sum, 0 replaces it —
            except a NaN already there, which stays NaN).
        scale: the factor on the new squares (e.g. 1 / number of samples for a mean).

    Returns:
        ``fisher`` (the same list, updated).

    The empirical Fisher is the mean of *per-sample* squared gradients; squaring the gradient of
    a mini-batch mean loss (Avalanche's EWC) is a different quantity (smaller by about the batch
    size, and not a Fisher). ``retain.cl.EWC`` computes per-sample gradients for you.

    Examples::

        >>> F = [torch.zeros(2), torch.zeros(())]
        >>> g = [torch.tensor([[1.0, 2.0], [3.0, 0.0]]), torch.tensor([2.0, -1.0])]  # 2 samples each
        >>> retain.ops.fisher_accumulate_(F, g, scale=0.5)                       # the mean over samples
        [tensor([5., 2.]), tensor(2.5000)]
    """
    accumulate("retain.ops.fisher_accumulate_", "fisher", fisher, grads, decay=decay, scale=scale, power=2)
    return fisher
