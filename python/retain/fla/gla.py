"""fla's ``fla.ops.gla``: gated linear attention, a log decay per key and step,
``S_t = diag(e^{g_t}) S_{t-1} + k_t v_tᵀ``."""

from __future__ import annotations

from torch import Tensor

from retain.fla._common import check_kwargs, refuse, scan


def chunk_gla(q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: float | None = None,
              initial_state: Tensor | None = None, output_final_state: bool = False, state_v_first: bool = False,
              cu_seqlens: Tensor | None = None, cu_seqlens_cpu: Tensor | None = None, **kwargs):
    r"""fla's ``chunk_gla`` on retain's kernel: q, k ``[B, T, H, K]``, v ``[B, T, HV, V]``, ``g`` log
    decay ``[B, T, HV, K]``; returns ``(o [B, T, HV, V], final_state [N, HV, K, V] or None)``."""
    op = "retain.fla.chunk_gla"
    _, state_v_first = check_kwargs(op, kwargs, state_v_first=state_v_first)
    return scan(op, q, k, v, 1.0, g=g, objective="dot", scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, cu_seqlens=cu_seqlens, state_v_first=state_v_first,
                names={"g": "g"})


def fused_recurrent_gla(q: Tensor, k: Tensor, v: Tensor, gk: Tensor | None = None, gv: Tensor | None = None,
                        scale: float | None = None, initial_state: Tensor | None = None,
                        output_final_state: bool = False, reverse: bool = False, state_v_first: bool = False,
                        cu_seqlens: Tensor | None = None, **kwargs):
    r"""fla's ``fused_recurrent_gla``: :func:`chunk_gla` with the per-key decay named ``gk`` and
    ``reverse``; a per-value decay ``gv`` is not supported (an error, not ignored)."""
    op = "retain.fla.fused_recurrent_gla"
    _, state_v_first = check_kwargs(op, kwargs, state_v_first=state_v_first)
    refuse(op, "gv", gv, "retain's scans decay the state per key (gk) or per head, not per value")
    return scan(op, q, k, v, 1.0, g=gk, objective="dot", scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, cu_seqlens=cu_seqlens, reverse=reverse,
                state_v_first=state_v_first, names={"g": "gk"})
