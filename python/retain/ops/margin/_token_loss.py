"""What the per-token losses (kl_imitation, feature_imitation) share: their mask and reduction
checks, and the path from per-row losses to the reduced loss."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from retain.ops._checks import check_choice, check_mask
from retain.ops._dispatch import acc_dtype

REDUCTIONS = ("mean", "sum", "none")


def check_token_mask(op: str, mask, ref_name: str, ref: Tensor) -> Tensor | None:
    """A per-token mask: ``ref``'s shape without its last dimension; as uint8 for the kernels."""
    return check_mask(op, mask, ref.shape[:-1], f"{ref_name} without its last dimension", ref_name, ref)


def check_reduction(op: str, reduction: str) -> None:
    check_choice(op, "reduction", reduction, REDUCTIONS)


def reduced_denominator(mask: Tensor | None, rows: int, per_row: int, mean: bool, device) -> Tensor:
    """What 'mean' divides the summed loss by: #counted rows · per_row (at least 1); 1 for 'sum'.
    float64, 0-dim, on ``device``."""
    if not mean:
        return torch.ones((), dtype=torch.float64, device=device)
    n = mask.sum().to(torch.float64) if mask is not None else torch.tensor(float(rows), dtype=torch.float64,
                                                                            device=device)
    return (n * per_row).clamp_min(1.0)


def token_loss(x: Tensor, x_ref: Tensor, mask: Tensor | None, reduction: str, param, *,
               rows: Callable[..., Tensor], reduced: Callable[..., tuple], per_token: int) -> Tensor:
    """The loss of ``x``, ``x_ref`` ``[..., D]`` from the per-row op ``rows(x, x_ref, mask, param)``
    (float64 ``[N]``) or, when training eagerly with 'mean'/'sum', from the ``reduced`` op, which
    computes the gradient in the forward pass where its kernel runs."""
    lead, D = tuple(x.shape[:-1]), x.shape[-1]
    N = math.prod(lead)
    x2, r2 = x.reshape(N, D).contiguous(), x_ref.reshape(N, D).contiguous()
    m = mask.reshape(N) if mask is not None else None
    acc = acc_dtype(x.dtype)
    need = (torch.is_grad_enabled() and x.requires_grad, torch.is_grad_enabled() and x_ref.requires_grad)
    if reduction != "none" and any(need) and not torch.compiler.is_compiling():
        return reduced(x2, r2, m, param, reduction == "mean", *need)[0].to(acc)
    per_row = rows(x2, r2, m, param)
    if reduction == "none":
        return per_row.reshape(lead).to(acc)
    total = per_row.sum()
    if reduction == "sum":
        return total.to(acc)
    return (total / reduced_denominator(m, N, per_token, True, x.device)).to(acc)
