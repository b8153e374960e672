"""``retain.ops.titans_linear``: Titans with a linear memory and momentum; a named form of :func:`memory_scan`."""

from __future__ import annotations

import torch
from torch import Tensor

from retain.ops._checks import check_number, check_tensor
from retain.ops._dispatch import acc_dtype
from retain.ops.scan.memory_scan import memory_scan_checked


def titans_linear(q: Tensor, k: Tensor, v: Tensor, theta: Tensor | float, alpha: Tensor | float,
                  eta: Tensor | float, *, scale: float | None = None, initial_state=None,
                  output_final_state: bool = False, cu_seqlens: Tensor | None = None,
                  use_qk_l2norm: bool = False):
    r"""Titans with a linear memory, exact per token::

        e_t = S_{t-1}^T k_t - v_t;   Z_t = eta_t Z_{t-1} - theta_t k_t e_t^T;   S_t = (1 - alpha_t) S_{t-1} + Z_t

    ``o_t = S_t^T (scale q_t)``. theta, alpha, eta: ``[B, T, H]`` or Python numbers (alpha may be
    ``[B, T, H, K]``); the retention ``1 - alpha`` is applied as a factor, so ``alpha = 1`` wipes
    the memory exactly. ``initial_state``: ``S0`` or ``(S0, Z0)``; returns ``(o, (S_T, Z_T))``.

    Examples::

        >>> q = k = v = torch.ones(1, 2, 1, 1)
        >>> retain.ops.titans_linear(q, k, v, 0.5, 0.0, 0.0)[0].flatten()
        tensor([0.5000, 0.7500])
    """
    op = "retain.ops.titans_linear"
    check_tensor(op, "q", q, ndim=4)
    check_tensor(op, "v", v, ndim=4)
    if not isinstance(alpha, Tensor):  # one per value head, in the state dtype (as every gate is read)
        alpha = torch.full(v.shape[:3], check_number(op, "alpha", alpha, finite=False), dtype=acc_dtype(q.dtype),
                           device=q.device)
    if eta is None:
        eta = 0.0
    o, final, _ = memory_scan_checked(op, q, k, v, theta, g=1 - alpha, eta=eta, objective="l2", scale=scale,
                               initial_state=initial_state, output_final_state=output_final_state,
                               cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm, gate_log=False,
                               names={"beta": "theta", "g": "alpha"})
    return o, final
