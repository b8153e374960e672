"""``retain.ops.gated_delta_rule``: the gated delta rule, as flash-linear-attention defines it; a named form of :func:`memory_scan`."""

from __future__ import annotations

from torch import Tensor

from retain.ops.scan.memory_scan import memory_scan_checked


def gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor | float, *,
                     scale: float | None = None, initial_state: Tensor | None = None,
                     output_final_state: bool = False, cu_seqlens: Tensor | None = None,
                     use_qk_l2norm: bool = False):
    r"""Gated delta rule as flash-linear-attention defines it (decay first, error at the decayed
    state): ``S_t = e^{g_t}(I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``,
    ``o_t = S_t^T (scale q_t)``. ``g``: log decay ``[B, T, H]`` (or ``[B, T, H, K]``); other shapes
    as :func:`memory_scan`; returns ``(o, final_state)``. ``use_qk_l2norm`` is fla's
    ``use_qk_l2norm_in_kernel``.

    Examples::

        >>> q = k = v = torch.ones(1, 2, 1, 1)
        >>> g = torch.log(torch.full((1, 2, 1), 0.5))
        >>> retain.ops.gated_delta_rule(q, k, v, g, 0.5)[0].flatten()
        tensor([0.5000, 0.6250])
    """
    o, final, _ = memory_scan_checked("retain.ops.gated_delta_rule", q, k, v, beta, g=g, objective="l2", scale=scale,
                               initial_state=initial_state, output_final_state=output_final_state,
                               cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm, retention_first=True)
    return o, final
