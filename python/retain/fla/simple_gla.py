"""fla's ``fla.ops.simple_gla`` (and RetNet's ``fla.ops.retention``): linear attention with a
scalar decay per head and step, ``S_t = e^{g_t} S_{t-1} + k_t v_tᵀ``."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from retain.fla._common import check_kwargs, scan
from retain.ops._checks import check_tensor


def _log_decay(op: str, q: Tensor, v: Tensor, g: Tensor | None, g_gamma: Tensor | None) -> Tensor | None:
    """``g`` [B, T, HV] plus ``g_gamma`` [HV] (a constant log decay per head, broadcast over steps)."""
    if g_gamma is None:
        return g
    check_tensor(op, "g_gamma", g_gamma, ndim=1)
    B, T, HV = v.shape[:3]
    if g_gamma.shape[0] != HV:
        raise ValueError(f"{op}: g_gamma must have shape ({HV},) (one log decay per value head), got "
                         f"{tuple(g_gamma.shape)}")
    gamma = g_gamma.expand(B, T, HV)
    return gamma if g is None else g + gamma


def chunk_simple_gla(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None = None, g_gamma: Tensor | None = None,
                     scale: float | None = None, initial_state: Tensor | None = None,
                     output_final_state: bool = False, state_v_first: bool = False,
                     cu_seqlens: Tensor | None = None, cu_seqlens_cpu: Tensor | None = None, **kwargs):
    r"""fla's ``chunk_simple_gla`` on retain's kernel: q, k ``[B, T, H, K]``, v ``[B, T, HV, V]``,
    ``g`` log decay ``[B, T, HV]`` (any floating dtype: float32 with bfloat16 q, k, v is read as
    float32) and/or ``g_gamma`` ``[HV]``; returns ``(o [B, T, HV, V], final_state [N, HV, K, V] or None)``."""
    op = "retain.fla.chunk_simple_gla"
    _, state_v_first = check_kwargs(op, kwargs, state_v_first=state_v_first)
    return scan(op, q, k, v, 1.0, g=_log_decay(op, q, v, g, g_gamma), objective="dot", scale=scale,
                initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                state_v_first=state_v_first)


def fused_recurrent_simple_gla(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None = None,
                               g_gamma: Tensor | None = None, scale: float | None = None,
                               initial_state: Tensor | None = None, output_final_state: bool = False,
                               reverse: bool = False, state_v_first: bool = False, cu_seqlens: Tensor | None = None,
                               **kwargs):
    r"""fla's ``fused_recurrent_simple_gla``: :func:`chunk_simple_gla` with ``reverse``."""
    op = "retain.fla.fused_recurrent_simple_gla"
    _, state_v_first = check_kwargs(op, kwargs, state_v_first=state_v_first)
    return scan(op, q, k, v, 1.0, g=_log_decay(op, q, v, g, g_gamma), objective="dot", scale=scale,
                initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                reverse=reverse, state_v_first=state_v_first)


def retention_log_decay(H: int, like: Tensor) -> Tensor:
    """RetNet's fixed decay per head, as fla's retention ops use it: ``log(1 - 2^(-5 - h))`` [H], in
    ``like``'s accumulation type (float64 for float64 inputs, else float32) on its device."""
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    return torch.tensor([math.log(1 - 2.0 ** (-5 - h)) for h in range(H)], dtype=dtype, device=like.device)


def chunk_retention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None,
                    initial_state: Tensor | None = None, output_final_state: bool = False,
                    cu_seqlens: Tensor | None = None, **kwargs):
    r"""fla's ``chunk_retention``: :func:`chunk_simple_gla` with RetNet's decay per head
    (:func:`retention_log_decay`)."""
    op = "retain.fla.chunk_retention"
    extra, _ = check_kwargs(op, kwargs, ("state_v_first",))
    check_tensor(op, "v", v, ndim=4)
    return scan(op, q, k, v, 1.0, g=_log_decay(op, q, v, None, retention_log_decay(v.shape[2], q)),
                objective="dot", scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                cu_seqlens=cu_seqlens, **extra)


def fused_recurrent_retention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None,
                              initial_state: Tensor | None = None, output_final_state: bool = False,
                              reverse: bool = False, state_v_first: bool = False, cu_seqlens: Tensor | None = None,
                              **kwargs):
    r"""fla's ``fused_recurrent_retention``: :func:`chunk_retention` with ``reverse``."""
    op = "retain.fla.fused_recurrent_retention"
    _, state_v_first = check_kwargs(op, kwargs, state_v_first=state_v_first)
    check_tensor(op, "v", v, ndim=4)
    return scan(op, q, k, v, 1.0, g=_log_decay(op, q, v, None, retention_log_decay(v.shape[2], q)),
                objective="dot", scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                cu_seqlens=cu_seqlens, reverse=reverse, state_v_first=state_v_first)
