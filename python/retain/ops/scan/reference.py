"""Pure-PyTorch references of the scan family: the oracle for tests and the fallback
(RETAIN_FALLBACK=reference). Written in loop form for clarity; exact in float64."""

from __future__ import annotations

import torch


def linear_recurrence_ref(
    a: torch.Tensor, x: torch.Tensor, *, initial: torch.Tensor | None = None, reverse: bool = False
) -> torch.Tensor:
    """h_t = a_t * h_{t-1} + x_t along dim 1 of ``[B, T, *]`` (h_{-1} = initial, or 0).

    With ``reverse=True``: h_t = a_t * h_{t+1} + x_t, from t = T-1 down to 0. bfloat16/float16
    inputs are computed in float32 and the result is cast back, as the kernels do.
    """
    acc = torch.float32 if x.dtype in (torch.bfloat16, torch.float16) else x.dtype
    B, T = x.shape[:2]
    state = (
        initial.to(acc) if initial is not None else torch.zeros((B, *x.shape[2:]), dtype=acc, device=x.device)
    )
    out = []
    steps = range(T - 1, -1, -1) if reverse else range(T)
    for t in steps:
        state = a[:, t].to(acc) * state + x[:, t].to(acc)
        out.append(state)
    if reverse:
        out.reverse()
    if not out:
        return torch.empty_like(x)
    return torch.stack(out, dim=1).to(x.dtype)
