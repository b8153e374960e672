"""Public memory_scan and its named ops: input checks, argument plumbing, docs."""

from __future__ import annotations


import torch
from torch import Tensor

from retain import _native
from retain.ops._checks import check_floating, check_same, check_shape, check_tensor, kernel_device
from retain.ops.scan import reference
from retain.ops.scan._ops import OBJECTIVE_CODES, acc_dtype, memory_scan_op
from retain.ops.scan.reference import OBJECTIVES

MAX_HEAD_DIM = 1024  # K and V beyond this are rejected: a chunk of checkpointed states would not fit cache


def _as_gate(op: str, name: str, x, ref: Tensor, shape) -> Tensor | None:
    """A per-step gate given as a tensor of ``shape`` or a Python number (broadcast, no gradient)."""
    if x is None:
        return None
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return torch.full(shape, float(x), dtype=ref.dtype, device=ref.device)
    check_tensor(op, name, x)
    check_same(op, "q", ref, **{name: x})
    check_shape(op, name, x, shape, "[B, T, H]")
    return x


def _state(op: str, name: str, x, shape, dtype, device) -> Tensor | None:
    if x is None:
        return None
    check_tensor(op, name, x)
    if not x.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating tensor, got {str(x.dtype).replace('torch.', '')}")
    if x.device != device:
        raise ValueError(f"{op}: {name} must be on q's device {device}, got {x.device}")
    check_shape(op, name, x, shape, "[N, H, K, V]")
    return x.to(dtype)


def _memory_scan(op, q, k, v, beta, *, g=None, eta=None, objective="l2", p=3.0, delta=1.0, scale=None,
                 initial_state=None, output_final_state=False, cu_seqlens=None, use_qk_l2norm=False,
                 states_every=None, retention_first=False, gate_log=True):
    check_tensor(op, "q", q, ndim=4)
    check_floating(op, "q", q)
    B, T, H, K = q.shape
    check_tensor(op, "k", k)
    check_tensor(op, "v", v, ndim=4)
    check_same(op, "q", q, k=k, v=v)
    check_shape(op, "k", k, q.shape, "the shape of q, [B, T, H, K]")
    V = v.shape[-1]
    check_shape(op, "v", v, (B, T, H, V), "[B, T, H, V] with q's B, T, H")
    for name, size in (("K", K), ("V", V)):
        if not 1 <= size <= MAX_HEAD_DIM:
            raise ValueError(f"{op}: head dimension {name} must be in [1, {MAX_HEAD_DIM}], got {size}")
    # the CUDA kernel keeps a column of S in registers: K rows over at most 8 threads of 32 rows
    if q.device.type == "cuda" and kernel_device("memory_scan", q) is not None and K > (
            cuda_max_k := _native.lib().memory_scan_cuda_max_k):
        raise ValueError(f"{op}: head dimension K must be <= {cuda_max_k} for CUDA tensors (the fused-recurrent "
                         f"kernel holds a column of the state in registers), got {K}; run on the CPU or split the "
                         "keys into heads")
    beta = _as_gate(op, "beta", beta, q, (B, T, H))
    eta = _as_gate(op, "eta", eta, q, (B, T, H))
    if g is not None:
        check_tensor(op, "g", g)
        check_same(op, "q", q, g=g)
        if tuple(g.shape) not in ((B, T, H), (B, T, H, K)):
            raise ValueError(f"{op}: g must have shape {(B, T, H)} (per head) or {(B, T, H, K)} (per key), "
                             f"got {tuple(g.shape)}")
    if objective not in OBJECTIVES:
        raise ValueError(f"{op}: objective must be one of {OBJECTIVES}, got {objective!r}")
    if objective == "lp" and not p >= 1.0:
        raise ValueError(f"{op}: p must be >= 1 for objective 'lp', got {p}")
    if objective == "huber" and not delta > 0.0:
        raise ValueError(f"{op}: delta must be > 0 for objective 'huber', got {delta}")
    scale = K**-0.5 if scale is None else float(scale)

    N = B
    if cu_seqlens is not None:
        check_tensor(op, "cu_seqlens", cu_seqlens, ndim=1)
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{op}: cu_seqlens must be int32 or int64, got {str(cu_seqlens.dtype).replace('torch.', '')}")
        if B != 1:
            raise ValueError(f"{op}: cu_seqlens requires B == 1 (sequences packed along T), got B = {B}")
        if cu_seqlens.numel() < 2:
            raise ValueError(f"{op}: cu_seqlens must hold at least 2 offsets [0, ..., T], got {cu_seqlens.numel()}")
        cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int64)
        if not torch.compiler.is_compiling():
            offs = cu_seqlens.tolist()
            if offs[0] != 0 or offs[-1] != T or any(b < a for a, b in zip(offs, offs[1:])):
                raise ValueError(f"{op}: cu_seqlens must start at 0, never decrease and end at T = {T}, got {offs}")
        N = cu_seqlens.shape[0] - 1

    momentum = eta is not None
    acc = acc_dtype(q.dtype)
    S0 = Z0 = None
    if isinstance(initial_state, (tuple, list)):
        if len(initial_state) != 2:
            raise ValueError(f"{op}: initial_state must be S0 or the pair (S0, Z0), got {len(initial_state)} items")
        S0, Z0 = initial_state
        if Z0 is not None and not momentum:
            raise ValueError(f"{op}: initial_state has a momentum state Z0 but eta is None")
    else:
        S0 = initial_state
    S0 = _state(op, "initial_state", S0, (N, H, K, V), acc, q.device)
    Z0 = _state(op, "initial_state[1] (Z0)", Z0, (N, H, K, V), acc, q.device)

    L, rows = 0, 0
    if states_every is not None:
        if isinstance(states_every, bool) or not isinstance(states_every, int) or states_every < 1:
            raise ValueError(f"{op}: states_every must be a positive int, got {states_every!r}")
        L = states_every
        if cu_seqlens is None:
            rows = T // L
        else:
            if torch.compiler.is_compiling():
                raise NotImplementedError(f"{op}: states_every with cu_seqlens is not supported under torch.compile")
            offs = cu_seqlens.tolist()
            rows = sum((b - a) // L for a, b in zip(offs, offs[1:]))

    if kernel_device("memory_scan", q) is None:  # RETAIN_FALLBACK=reference
        o, final, states = reference._scan(
            q, k, v, beta, decay=(g.exp() if gate_log else g) if g is not None else None, eta=eta,
            objective=objective, p=p, delta=delta, scale=scale, initial_state=(S0, Z0) if momentum else S0,
            output_final_state=output_final_state, cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm,
            states_every=states_every, retention_first=retention_first)
        return o, final, states

    tensors = (q, k, v, beta, g, eta, S0, Z0)
    save_ckpt = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    o, S, Z, states, _, _ = memory_scan_op(
        q, k, v, beta, g, eta, S0, Z0, cu_seqlens, OBJECTIVE_CODES[objective], float(p), float(delta), scale,
        bool(use_qk_l2norm), bool(retention_first), gate_log, L, rows, save_ckpt)
    final = ((S, Z) if momentum else S) if output_final_state else None
    return o, final, (states if L else None)


def memory_scan(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor | float, *, g: Tensor | None = None,
    eta: Tensor | float | None = None, objective: str = "l2", p: float = 3.0, delta: float = 1.0,
    scale: float | None = None, initial_state=None, output_final_state: bool = False,
    cu_seqlens: Tensor | None = None, use_qk_l2norm: bool = False, states_every: int | None = None,
    retention_first: bool = False,
):
    r"""Associative memory as test-time regression: one online-gradient step of a ``K x V``
    memory ``S`` per token and head (Titans / Miras / delta-rule family).

    For each sequence, head and step t (``S``, ``Z`` start from ``initial_state`` or zeros)::

        e_t = S_{t-1}^T k_t - v_t                      prediction error (V)
        psi = -v_t                   objective 'dot'   (Hebbian: linear attention)
              e_t                              'l2'    (delta rule)
              p e (e^2 + 1e-6)^((p-2)/2)       'lp'    (smooth p sign(e)|e|^(p-1), Moneta-style)
              clamp(e_t, -delta, delta)        'huber' (Yaad-style)
        Z_t = eta_t Z_{t-1} - beta_t k_t psi^T          (with momentum; else Z_t = -beta_t k_t psi^T)
        S_t = exp(g_t) * S_{t-1} + Z_t                  (retention; a_t = 1 when g is None)
        o_t = S_t^T (scale q_t)

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; float32, float64, bfloat16 or float16, one
            dtype and device for every input. 16-bit inputs are computed in float32. K and V up
            to 1024 on the CPU; on CUDA K up to 256 (a column of the state lives in registers).
        beta: step size ``[B, T, H]`` or a Python number.
        g: log retention ``[B, T, H]`` (per head) or ``[B, T, H, K]`` (per key row of S), or None.
        eta: momentum ``[B, T, H]`` or a Python number; None: no momentum (no Z state).
        objective, p, delta: the attentional bias above (p >= 1 for 'lp', delta > 0 for 'huber').
        scale: multiplies q; default ``K ** -0.5``.
        initial_state: ``S0`` ``[B, H, K, V]`` (``[N, H, K, V]`` with cu_seqlens), or with momentum
            the pair ``(S0, Z0)``; cast to the state dtype (float32; float64 for float64 inputs).
        output_final_state: also return the last state, ``S_T`` or with momentum ``(S_T, Z_T)``.
        cu_seqlens: int64 ``[N + 1]`` offsets of N sequences packed along T (B must be 1); no state
            crosses a sequence boundary.
        use_qk_l2norm: L2-normalise q and k over K inside the kernel (``x / sqrt(|x|^2 + 1e-6)``).
        states_every: L: also return ``S`` after steps L-1, 2L-1, ... of each sequence,
            ``[B, T // L, H, K, V]`` (with cu_seqlens, sequences' segments concatenated), differentiable.
        retention_first: decay first and take the error at the decayed state,
            ``e_t = (a_t * S_{t-1})^T k_t - v_t`` (flash-linear-attention's gated-delta-rule order);
            the default takes it at ``S_{t-1}`` (Titans / Miras order).

    Returns:
        ``(o, final_state, states)``: ``o`` ``[B, T, H, V]`` in q's dtype; ``final_state`` or None;
        ``states`` or None. Gradients flow to q, k, v, beta, g, eta and initial_state.

    Memory: the backward recomputes states from checkpoints saved every C steps (C = 64 for
    ``K * V * 4 <= 32 KiB``), so training keeps ``B * H * ceil(T / C) * K * V`` state values (twice
    with momentum) instead of one state per token. Derivations: ``csrc/scan/README.md``.

    Examples::

        >>> q = k = torch.eye(2).reshape(1, 2, 1, 2)
        >>> v = torch.tensor([1.0, 2.0]).reshape(1, 2, 1, 1)
        >>> o, S, _ = retain.ops.memory_scan(q, k, v, 1.0, scale=1.0, output_final_state=True)
        >>> o.flatten(), S.flatten()
        (tensor([1., 2.]), tensor([1., 2.]))
    """
    return _memory_scan("retain.ops.memory_scan", q, k, v, beta, g=g, eta=eta, objective=objective, p=p,
                        delta=delta, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                        cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm, states_every=states_every,
                        retention_first=retention_first)


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
    o, final, _ = _memory_scan("retain.ops.linear_attn", q, k, v, 1.0, g=g, objective="dot", scale=scale,
                               initial_state=initial_state, output_final_state=output_final_state,
                               cu_seqlens=cu_seqlens)
    return o, final


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
    o, final, _ = _memory_scan("retain.ops.delta_rule", q, k, v, beta, objective="l2", scale=scale,
                               initial_state=initial_state, output_final_state=output_final_state,
                               cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm)
    return o, final


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
    o, final, _ = _memory_scan("retain.ops.gated_delta_rule", q, k, v, beta, g=g, objective="l2", scale=scale,
                               initial_state=initial_state, output_final_state=output_final_state,
                               cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm, retention_first=True)
    return o, final


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
    if isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
        alpha = torch.full(q.shape[:3], float(alpha), dtype=q.dtype, device=q.device)
    check_tensor(op, "alpha", alpha)
    if eta is None:
        eta = 0.0
    o, final, _ = _memory_scan(op, q, k, v, theta, g=1 - alpha, eta=eta, objective="l2", scale=scale,
                               initial_state=initial_state, output_final_state=output_final_state,
                               cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm, gate_log=False)
    return o, final


