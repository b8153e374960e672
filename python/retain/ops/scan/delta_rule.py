"""``retain.ops.delta_rule``: the delta rule (DeltaNet); a named form of :func:`memory_scan`."""

from __future__ import annotations

from torch import Tensor

from retain.ops.scan.memory_scan import memory_scan_checked


def delta_rule(q: Tensor, k: Tensor, v: Tensor, beta: Tensor | float, *, scale: float | None = None,
               initial_state: Tensor | None = None, output_final_state: bool = False,
               cu_seqlens: Tensor | None = None, use_qk_l2norm: bool = False):
    r"""Delta rule (DeltaNet): ``S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``,
    ``o_t = S_t^T (scale q_t)``. Shapes as :func:`memory_scan`; returns ``(o, final_state)``.

    Examples::

        >>> q = k = torch.ones(1, 2, 1, 1)
        >>> v = torch.tensor([1.0, 3.0]).reshape(1, 2, 1, 1)
        >>> retain.ops.delta_rule(q, k, v, 1.0)[0].flatten()
        tensor([1., 3.])
    """
    o, final, _ = memory_scan_checked("retain.ops.delta_rule", q, k, v, beta, objective="l2", scale=scale,
                               initial_state=initial_state, output_final_state=output_final_state,
                               cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm)
    return o, final
