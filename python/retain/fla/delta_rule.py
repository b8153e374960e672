"""fla's ``fla.ops.delta_rule`` and ``fla.ops.gated_delta_rule``: the delta rule
``S_t = (I - β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ`` and Gated DeltaNet's
``S_t = e^{g_t}(I - β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ``, with fla's in-kernel gate options."""

from __future__ import annotations

import torch
from torch import Tensor

from retain.fla._common import beta_activation, check_kwargs, gdn_gate, refuse, scan
from retain.ops._checks import check_bool, check_tensor


def _ones_beta(v: Tensor) -> Tensor:
    return torch.ones(v.shape[:3], dtype=torch.float32, device=v.device)


def chunk_delta_rule(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, scale: float | None = None,
                     initial_state: Tensor | None = None, output_final_state: bool = False,
                     use_qk_l2norm_in_kernel: bool = False, cu_seqlens: Tensor | None = None,
                     cu_seqlens_cpu: Tensor | None = None, **kwargs):
    r"""fla's ``chunk_delta_rule`` on retain's kernel: q, k ``[B, T, H, K]``, v ``[B, T, HV, V]``,
    ``beta`` ``[B, T, HV]`` (any floating dtype); returns ``(o [B, T, HV, V], final_state or None)``."""
    op = "retain.fla.chunk_delta_rule"
    check_kwargs(op, kwargs)
    return scan(op, q, k, v, beta, objective="l2", scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                use_qk_l2norm=use_qk_l2norm_in_kernel)


def fused_recurrent_delta_rule(q: Tensor, k: Tensor, v: Tensor, beta: Tensor | None = None,
                               scale: float | None = None, initial_state: Tensor | None = None,
                               output_final_state: bool = False, use_qk_l2norm_in_kernel: bool = False,
                               cu_seqlens: Tensor | None = None, **kwargs):
    r"""fla's ``fused_recurrent_delta_rule``: :func:`chunk_delta_rule`, ``beta`` None meaning 1."""
    op = "retain.fla.fused_recurrent_delta_rule"
    check_kwargs(op, kwargs)
    check_tensor(op, "v", v, ndim=4)
    return scan(op, q, k, v, _ones_beta(v) if beta is None else beta, objective="l2", scale=scale,
                initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                use_qk_l2norm=use_qk_l2norm_in_kernel)


def _gdn(op, q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel,
         use_gate_in_kernel, A_log, dt_bias, use_beta_sigmoid_in_kernel, allow_neg_eigval, state_v_first,
         cu_seqlens, reverse=False):
    if check_bool(op, "use_gate_in_kernel", use_gate_in_kernel):
        if g is None:
            raise ValueError(f"{op}: use_gate_in_kernel=True needs g (the raw gate input [B, T, HV]), got None")
        check_tensor(op, "g", g, ndim=3)
        g = gdn_gate(op, g, A_log, dt_bias)
    beta = beta_activation(op, _ones_beta(v) if beta is None else beta, use_beta_sigmoid_in_kernel,
                           allow_neg_eigval)
    return scan(op, q, k, v, beta, g=g, objective="l2", scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm_in_kernel,
                reverse=reverse, state_v_first=state_v_first, retention_first=True)


def chunk_gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: float | None = None,
                           initial_state: Tensor | None = None, output_final_state: bool = False,
                           use_qk_l2norm_in_kernel: bool = False, use_beta_sigmoid_in_kernel: bool = False,
                           allow_neg_eigval: bool = False, state_v_first: bool = False,
                           cu_seqlens: Tensor | None = None, cu_seqlens_cpu: Tensor | None = None,
                           chunk_indices: Tensor | None = None, cp_context=None, **kwargs):
    r"""fla's ``chunk_gated_delta_rule`` on retain's kernel.

    Shapes: q, k ``[B, T, H, K]``; v ``[B, T, HV, V]`` with HV a multiple of H (grouped value
    heads: value head i reads key head i // (HV / H), in the kernel); ``g`` log decay and ``beta``
    ``[B, T, HV]`` in any floating dtype (transformers passes float32 with bfloat16 q, k, v: read
    as float32). ``use_gate_in_kernel=True`` (with ``A_log`` [HV], optional ``dt_bias`` [HV], as
    keywords) takes the raw ``g`` and uses ``-exp(A_log)·softplus(g + dt_bias)``;
    ``use_beta_sigmoid_in_kernel`` takes logits (``allow_neg_eigval``: ``2·sigmoid``).
    ``chunk_size``, ``cu_seqlens_cpu`` and ``chunk_indices`` are accepted and change nothing;
    ``cp_context`` (context parallelism) is refused.

    Returns ``(o [B, T, HV, V], final_state [N, HV, K, V] or None)``, the state in float32
    (float64 for float64 inputs), ``[N, HV, V, K]`` with ``state_v_first``.

    Examples::

        >>> B, T, H, HV, K, V = 1, 6, 1, 2, 4, 4
        >>> q, k = torch.randn(B, T, H, K), F.normalize(torch.randn(B, T, H, K), dim=-1)
        >>> v = torch.randn(B, T, HV, V)
        >>> g, beta = F.logsigmoid(torch.randn(B, T, HV)), torch.rand(B, T, HV)
        >>> o, state = retain.fla.chunk_gated_delta_rule(q, k, v, g, beta, output_final_state=True)
        >>> o.shape, state.shape
        (torch.Size([1, 6, 2, 4]), torch.Size([1, 2, 4, 4]))
    """
    op = "retain.fla.chunk_gated_delta_rule"
    extra, state_v_first = check_kwargs(op, kwargs, ("use_gate_in_kernel", "A_log", "dt_bias"),
                                        state_v_first=state_v_first, chunk_sizes=(16, 32, 64))
    refuse(op, "cp_context", cp_context, "context parallelism splits a sequence across devices")
    return _gdn(op, q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel,
                extra.get("use_gate_in_kernel", False), extra.get("A_log"), extra.get("dt_bias"),
                use_beta_sigmoid_in_kernel, allow_neg_eigval, state_v_first, cu_seqlens)


def fused_recurrent_gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None = None,
                                     gk: Tensor | None = None, gv: Tensor | None = None, beta: Tensor | None = None,
                                     scale: float | None = None, initial_state: Tensor | None = None,
                                     output_final_state: bool = False, use_qk_l2norm_in_kernel: bool = False,
                                     use_gate_in_kernel: bool = False, A_log: Tensor | None = None,
                                     dt_bias: Tensor | None = None, use_beta_sigmoid_in_kernel: bool = False,
                                     allow_neg_eigval: bool = False, state_v_first: bool = False,
                                     cu_seqlens: Tensor | None = None, **kwargs):
    r"""fla's ``fused_recurrent_gated_delta_rule``: :func:`chunk_gated_delta_rule` with the gates
    optional (``g`` [B, T, HV] per head, ``gk`` [B, T, HV, K] per key, summed when both are given;
    ``beta`` None meaning 1); a per-value decay ``gv`` is refused."""
    op = "retain.fla.fused_recurrent_gated_delta_rule"
    _, state_v_first = check_kwargs(op, kwargs, state_v_first=state_v_first)
    refuse(op, "gv", gv, "retain's scans decay the state per key (gk) or per head (g), not per value")
    if gk is not None:
        if check_bool(op, "use_gate_in_kernel", use_gate_in_kernel):
            raise ValueError(f"{op}: use_gate_in_kernel=True computes a per-head g; pass gk without it, got gk "
                             f"{tuple(gk.shape) if isinstance(gk, Tensor) else type(gk).__name__}")
        g = gk if g is None else gk + g[..., None]
    return _gdn(op, q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel,
                use_gate_in_kernel, A_log, dt_bias, use_beta_sigmoid_in_kernel, allow_neg_eigval, state_v_first,
                cu_seqlens)
