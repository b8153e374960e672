"""``retain.ops.linear_attn``: (gated) linear attention, flash-linear-attention's chunk_simple_gla / chunk_gla; a named form of :func:`memory_scan`."""

from __future__ import annotations

from torch import Tensor

from retain.ops.scan.memory_scan import memory_scan_checked


def linear_attn(q: Tensor, k: Tensor, v: Tensor, *, g: Tensor | None = None, scale: float | None = None,
                initial_state: Tensor | None = None, output_final_state: bool = False,
                cu_seqlens: Tensor | None = None):
    r"""(Gated) linear attention: ``S_t = exp(g_t) * S_{t-1} + k_t v_t^T``, ``o_t = S_t^T (scale q_t)``.

    ``g`` None: linear attention; ``[B, T, H]``: simple GLA / RetNet / Mamba2-style decay per
    head; ``[B, T, H, K]``: GLA (per key). Shapes as :func:`memory_scan`; returns
    ``(o, final_state)`` like flash-linear-attention's ``chunk_simple_gla`` / ``chunk_gla``.

    Examples::

        >>> q = k = v = torch.ones(1, 3, 1, 1)
        >>> retain.ops.linear_attn(q, k, v)[0].flatten()
        tensor([1., 2., 3.])
    """
    o, final, _ = memory_scan_checked("retain.ops.linear_attn", q, k, v, 1.0, g=g, objective="dot", scale=scale,
                               initial_state=initial_state, output_final_state=output_final_state,
                               cu_seqlens=cu_seqlens)
    return o, final
