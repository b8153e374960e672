"""Pure-PyTorch references of the scan family: the oracle for tests and the fallback
(RETAIN_FALLBACK=reference). Written in loop form for clarity; exact in float64."""

from __future__ import annotations

import itertools

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
    a_t, x_t = a.unbind(1), x.unbind(1)  # (indexing a[:, t] would make autograd quadratic in T)
    steps = range(T - 1, -1, -1) if reverse else range(T)
    for t in steps:
        state = a_t[t].to(acc) * state + x_t[t].to(acc)
        out.append(state)
    if reverse:
        out.reverse()
    if not out:
        return torch.empty_like(x)
    return torch.stack(out, dim=1).to(x.dtype)


LP_EPS = 1e-6
"""Smoothing of the 'lp' objective: psi(e) = p * e * (e^2 + LP_EPS) ** ((p - 2) / 2)."""

L2NORM_EPS = 1e-6
"""use_qk_l2norm maps x to x / sqrt(sum(x^2) + L2NORM_EPS) over K, as flash-linear-attention's l2norm."""

OBJECTIVES = ("dot", "l2", "lp", "huber")

State = torch.Tensor | tuple[torch.Tensor | None, torch.Tensor | None]
"""A memory state: ``S`` alone, or with momentum the pair ``(S, Z)``."""


def l2norm_ref(x: torch.Tensor, eps: float = L2NORM_EPS) -> torch.Tensor:
    """``x / sqrt(sum(x^2, -1) + eps)`` over the last dimension (differentiable everywhere).

    The normalisation ``use_qk_l2norm=True`` applies to q and k ``[B, T, H, K]``, after the cast to
    the compute dtype and before ``scale``. Zero vectors map to zero.
    """
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def lp_psi_ref(e: torch.Tensor, p: float) -> torch.Tensor:
    """The smooth 'lp' error map: ``psi(e) = p * e * (e^2 + LP_EPS) ** ((p - 2) / 2)``.

    It is the gradient of ``sum((e^2 + LP_EPS) ** (p / 2))``, a smooth ``||e||_p^p``; for
    ``|e| >> sqrt(LP_EPS) = 1e-3`` it equals ``p * sign(e) * |e| ** (p - 1)`` up to a relative
    ``(p - 2) / 2 * LP_EPS / e^2``. It is exact for ``p = 2`` (``psi = 2 e``) and differentiable
    everywhere, including ``e = 0``, for every ``p >= 1`` (``p = 1`` gives the smooth sign
    ``e / sqrt(e^2 + LP_EPS)``).
    """
    return p * e * (e * e + LP_EPS) ** ((p - 2.0) / 2.0)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.bfloat16, torch.float16) else x.dtype


def _split_state(initial_state, momentum: bool):
    """``initial_state`` as ``(S0, Z0)``; a plain tensor is ``(S0, None)``."""
    if initial_state is None:
        return None, None
    if isinstance(initial_state, (tuple, list)):
        s0, z0 = initial_state
        if z0 is not None and not momentum:
            raise ValueError("memory_scan_ref: a momentum state Z0 was given but eta is None")
        return s0, z0
    return initial_state, None


def _steps(x, acc: torch.dtype):
    """Per-step gates broadcastable against the state ``[B, H, K, V]``: a Python number stays one
    (repeated), ``[B, T, H]`` gives ``[B, H, 1, 1]`` per step, ``[B, T, H, K]`` gives ``[B, H, K, 1]``.
    Unbinding once keeps autograd linear in T (indexing ``x[:, t]`` per step makes it quadratic)."""
    if not isinstance(x, torch.Tensor):
        return itertools.repeat(x)
    x = x.to(acc)
    x = x[..., None, None] if x.dim() == 3 else x[..., None]
    return x.unbind(1)


def _psi(e: torch.Tensor, objective: str, p: float, delta: float) -> torch.Tensor:
    if objective == "l2":
        return e
    if objective == "lp":
        return lp_psi_ref(e, p)
    if objective == "huber":
        return e.clamp(-delta, delta)
    raise ValueError(f"memory_scan_ref: objective must be one of {OBJECTIVES}, got {objective!r}")


def _scan_dense(q, k, v, beta, decay, eta, objective, p, delta, scale, s0, z0, states_every, retention_first,
                out_dtype):
    """The recurrence on one batch ``[B, T, ...]`` with the retention given as a factor ``decay``
    (``a_t``, not its log) or None; returns ``(o, S_T, Z_T or None, states or None)``, o in
    ``out_dtype``."""
    acc = _compute_dtype(q)
    B, T, H, K = k.shape
    V = v.shape[-1]
    momentum = eta is not None
    S = s0.to(dtype=acc, copy=True) if s0 is not None else torch.zeros(B, H, K, V, dtype=acc, device=q.device)
    Z = None
    if momentum:
        Z = z0.to(dtype=acc, copy=True) if z0 is not None else torch.zeros(B, H, K, V, dtype=acc, device=q.device)
    outs, states = [], []
    steps = zip(range(T), q.unbind(1), k.unbind(1), v.unbind(1), _steps(beta, acc),
                _steps(decay, acc) if decay is not None else itertools.repeat(None), _steps(eta, acc))
    for t, q_t, k_t, v_t, b_t, a_t, eta_t in steps:
        q_t = q_t.to(acc) * scale
        k_t = k_t.to(acc)
        v_t = v_t.to(acc)
        retained = a_t * S if a_t is not None else S
        if objective == "dot":
            psi = -v_t
        else:
            at = retained if retention_first else S
            e = torch.einsum("bhkv,bhk->bhv", at, k_t) - v_t
            psi = _psi(e, objective, p, delta)
        update = -b_t * (k_t[..., :, None] * psi[..., None, :])
        if momentum:
            Z = eta_t * Z + update
            update = Z
        S = retained + update
        outs.append(torch.einsum("bhkv,bhk->bhv", S, q_t))
        if states_every is not None and (t + 1) % states_every == 0:
            states.append(S)
    o = torch.stack(outs, 1).to(out_dtype) if outs else q.new_empty(B, 0, H, V, dtype=out_dtype)
    st = None
    if states_every is not None:
        st = torch.stack(states, 1) if states else S.new_empty(B, 0, H, K, V)
    return o, S, Z, st


def _scan(q, k, v, beta, *, decay, eta, objective, p, delta, scale, initial_state, output_final_state,
          cu_seqlens, use_qk_l2norm, states_every, retention_first):
    """memory_scan_ref with the retention as a factor ``decay`` = a_t (None: a_t = 1)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"memory_scan_ref: objective must be one of {OBJECTIVES}, got {objective!r}")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    out_dtype, acc = q.dtype, _compute_dtype(q)
    if q.dim() == 4 and v.dim() == 4 and v.shape[2] != q.shape[2]:  # grouped value heads read their key head
        q, k = q.repeat_interleave(v.shape[2] // q.shape[2], 2), k.repeat_interleave(v.shape[2] // q.shape[2], 2)
    if use_qk_l2norm:
        q, k = l2norm_ref(q.to(acc)), l2norm_ref(k.to(acc))
    momentum = eta is not None
    s0, z0 = _split_state(initial_state, momentum)
    args = (objective, p, delta, scale)
    if cu_seqlens is None:
        o, S, Z, states = _scan_dense(
            q, k, v, beta, decay, eta, *args, s0, z0, states_every, retention_first, out_dtype
        )
    else:
        if q.shape[0] != 1:
            raise ValueError(f"memory_scan_ref: cu_seqlens requires B == 1, got B = {q.shape[0]}")
        offsets = [int(x) for x in cu_seqlens.tolist()]
        outs, Ss, Zs, sts = [], [], [], []
        for n in range(len(offsets) - 1):
            sl = slice(offsets[n], offsets[n + 1])
            cut = lambda x: x[:, sl] if isinstance(x, torch.Tensor) else x  # noqa: E731
            o_n, S_n, Z_n, st_n = _scan_dense(
                q[:, sl], k[:, sl], v[:, sl], cut(beta), cut(decay), cut(eta), *args,
                None if s0 is None else s0[n : n + 1], None if z0 is None else z0[n : n + 1],
                states_every, retention_first, out_dtype,
            )
            outs.append(o_n)
            Ss.append(S_n)
            Zs.append(Z_n)
            sts.append(st_n)
        _, _, H, K = k.shape
        V = v.shape[-1]
        o = torch.cat(outs, 1) if outs else q.new_empty(1, 0, H, V, dtype=out_dtype)
        S = torch.cat(Ss, 0) if Ss else torch.zeros(0, H, K, V, dtype=acc, device=q.device)
        Z = (torch.cat(Zs, 0) if Zs else torch.zeros_like(S)) if momentum else None
        states = None
        if states_every is not None:
            states = torch.cat(sts, 1) if sts else S.new_empty(1, 0, H, K, V)
    final = None
    if output_final_state:
        final = (S, Z) if momentum else S
    return o, final, states


def memory_scan_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor | float,
    *,
    g: torch.Tensor | None = None,
    eta: torch.Tensor | float | None = None,
    objective: str = "l2",
    p: float = 3.0,
    delta: float = 1.0,
    scale: float | None = None,
    initial_state: State | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm: bool = False,
    states_every: int | None = None,
    retention_first: bool = False,
):
    r"""Associative memory as test-time regression: one online-gradient step of a ``K x V`` memory
    ``S`` per token, in loop form (the oracle of ``retain.ops.memory_scan``).

    For every sequence, head and step t (``S_{-1} = S0``, ``Z_{-1} = Z0``, zeros when not given)::

        e_t = S_{t-1}^T k_t - v_t                        (V)
        psi = -v_t                      objective 'dot'   (Hebbian, no error term)
              e_t                                 'l2'    (delta rule)
              p * e * (e^2 + LP_EPS)^((p-2)/2)    'lp'    (smooth p*sign(e)|e|^(p-1), see lp_psi_ref)
              clamp(e_t, -delta, delta)           'huber'
        G_t = k_t psi^T                                   (K x V)
        Z_t = eta_t Z_{t-1} - beta_t G_t   with eta;   Z_t = -beta_t G_t without
        S_t = a_t * S_{t-1} + Z_t,   a_t = exp(g_t) (1 when g is None)
        o_t = S_t^T (scale * q_t)

    ``retention_first=True`` is flash-linear-attention's gated-delta-rule order: the decay comes
    first and the error is taken at the decayed state, ``S' = a_t * S_{t-1}``,
    ``e_t = S'^T k_t - v_t``, ``S_t = S' + Z_t`` (for 'l2' without momentum:
    ``S_t = e^{g_t}(I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``). It changes nothing for
    'dot' or when ``g`` is None.

    Args:
        q, k: ``[B, T, H, K]``.
        v: ``[B, T, H, V]``.
        beta: step size, ``[B, T, H]`` or a Python number.
        g: log retention, ``[B, T, H]`` (one scalar per head) or ``[B, T, H, K]`` (per key row of
            ``S``, broadcast over V); ``-inf`` wipes the memory. None: no retention (a_t = 1).
        eta: momentum decay ``[B, T, H]`` (or a Python number); None: no momentum.
        objective: 'dot', 'l2', 'lp' or 'huber' (see above); ``p`` for 'lp', ``delta`` for 'huber'.
        scale: multiplies q; default ``K ** -0.5``.
        initial_state: ``S0`` ``[B, H, K, V]``, or with momentum the pair ``(S0, Z0)`` (either may be
            None; a plain tensor means ``Z0 = 0``). With ``cu_seqlens``: ``[N, H, K, V]``, one per
            sequence. Giving ``Z0`` without ``eta`` is an error.
        output_final_state: return the state after the last step: ``S_T`` ``[B, H, K, V]``
            (``[N, H, K, V]`` with ``cu_seqlens``), or with momentum the pair ``(S_T, Z_T)``.
        cu_seqlens: int64 ``[N + 1]`` offsets into T (B must be 1): sequence n is tokens
            ``cu_seqlens[n]:cu_seqlens[n + 1]``, starts from ``initial_state[n]`` (or zeros) and
            its state never reaches sequence n + 1.
        use_qk_l2norm: replace q and k by ``l2norm_ref`` of them (over K) before use, with gradient.
        states_every: L: also return ``states`` ``[B, T // L, H, K, V]`` with
            ``states[:, j] = S`` after step ``(j + 1) L - 1`` (0-based), i.e. the memory at the end of
            each complete segment of L tokens (a trailing partial segment gives none). Only ``S``,
            not the momentum ``Z``. With ``cu_seqlens`` each sequence is cut into its own segments
            (from its own start) and the sequences' states are concatenated in order:
            ``[1, sum_n T_n // L, H, K, V]``. Differentiable.
        retention_first: the order above.

    Returns:
        ``(o, final_state, states)``: ``o`` ``[B, T, H, V]`` in the dtype of q; ``final_state`` as
        above or None; ``states`` or None. bfloat16/float16 inputs are computed in float32 and the
        states are float32; float32/float64 inputs are computed and kept in their own dtype.
        Every tensor input (q, k, v, beta, g, eta, initial_state) gets a gradient through autograd.

    Examples::

        >>> q = k = torch.eye(2).reshape(1, 2, 1, 2)
        >>> v = torch.tensor([[[[1.0]], [[2.0]]]])
        >>> o, S, _ = memory_scan_ref(q, k, v, 1.0, scale=1.0, output_final_state=True)
        >>> o.flatten(), S.flatten()
        (tensor([1., 2.]), tensor([1., 2.]))
    """
    decay = torch.exp(g.to(_compute_dtype(q))) if g is not None else None
    return _scan(
        q, k, v, beta, decay=decay, eta=eta, objective=objective, p=p, delta=delta, scale=scale,
        initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens,
        use_qk_l2norm=use_qk_l2norm, states_every=states_every, retention_first=retention_first,
    )


def linear_attn_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    g: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
):
    r"""(Gated) linear attention: ``S_t = exp(g_t) * S_{t-1} + k_t v_t^T``, ``o_t = S_t^T (scale q_t)``.

    ``g`` None: plain linear attention (no normalisation); ``[B, T, H]``: simple GLA / RetNet /
    Mamba2-style scalar decay per head; ``[B, T, H, K]``: GLA (decay per key row of S). ``g`` is a
    log-space gate. It is ``memory_scan_ref(objective='dot', beta=1)``.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; g: None, ``[B, T, H]`` or ``[B, T, H, K]``.
        scale: default ``K ** -0.5``. initial_state: ``[B, H, K, V]`` (``[N, H, K, V]`` with
        cu_seqlens, B == 1).

    Returns:
        ``(o, final_state)``: ``o`` ``[B, T, H, V]`` (dtype of q), ``final_state`` ``[B, H, K, V]``
        (float32, float64 for float64 inputs) or None.

    Examples::

        >>> q = k = v = torch.ones(1, 3, 1, 1)
        >>> linear_attn_ref(q, k, v)[0].flatten()
        tensor([1., 2., 3.])
    """
    o, final, _ = memory_scan_ref(
        q, k, v, 1.0, g=g, objective="dot", scale=scale, initial_state=initial_state,
        output_final_state=output_final_state, cu_seqlens=cu_seqlens,
    )
    return o, final


def delta_rule_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor | float,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm: bool = False,
):
    r"""Delta rule (DeltaNet): ``S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``,
    ``o_t = S_t^T (scale q_t)``; ``memory_scan_ref(objective='l2')``.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; beta: ``[B, T, H]`` or a Python number.
        scale: default ``K ** -0.5``. initial_state: ``[B, H, K, V]`` (``[N, H, K, V]`` with
        cu_seqlens, B == 1). use_qk_l2norm: L2-normalise q and k over K first (``l2norm_ref``).

    Returns:
        ``(o, final_state)`` as ``linear_attn_ref``.

    Examples::

        >>> q = k = torch.ones(1, 2, 1, 1)
        >>> v = torch.tensor([1.0, 3.0]).reshape(1, 2, 1, 1)
        >>> delta_rule_ref(q, k, v, 1.0)[0].flatten()
        tensor([1., 3.])
    """
    o, final, _ = memory_scan_ref(
        q, k, v, beta, objective="l2", scale=scale, initial_state=initial_state,
        output_final_state=output_final_state, cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm,
    )
    return o, final


def gated_delta_rule_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor | float,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm: bool = False,
):
    r"""Gated delta rule exactly as flash-linear-attention defines it (decay first, error at the
    decayed state): ``S_t = e^{g_t} (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``,
    ``o_t = S_t^T (scale q_t)``; ``memory_scan_ref(objective='l2', retention_first=True)``.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; g: log decay ``[B, T, H]`` (``[B, T, H, K]``
        is accepted too: per key row); beta: ``[B, T, H]`` or a Python number. scale: default
        ``K ** -0.5``. initial_state: ``[B, H, K, V]`` (``[N, H, K, V]`` with cu_seqlens, B == 1).
        use_qk_l2norm: L2-normalise q and k over K first (flash-linear-attention's
        ``use_qk_l2norm_in_kernel``).

    Returns:
        ``(o, final_state)`` as ``linear_attn_ref``.

    Examples::

        >>> q = k = torch.ones(1, 2, 1, 1)
        >>> v = torch.ones(1, 2, 1, 1)
        >>> g = torch.log(torch.full((1, 2, 1), 0.5))
        >>> gated_delta_rule_ref(q, k, v, g, 0.5)[0].flatten()
        tensor([0.5000, 0.6250])
    """
    o, final, _ = memory_scan_ref(
        q, k, v, beta, g=g, objective="l2", scale=scale, initial_state=initial_state,
        output_final_state=output_final_state, cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm,
        retention_first=True,
    )
    return o, final


def titans_linear_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    theta: torch.Tensor | float,
    alpha: torch.Tensor | float,
    eta: torch.Tensor | float,
    *,
    scale: float | None = None,
    initial_state: State | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm: bool = False,
):
    r"""Titans with a linear memory, exact per token::

        e_t = S_{t-1}^T k_t - v_t
        Z_t = eta_t Z_{t-1} - theta_t k_t e_t^T        (momentum: "surprise")
        S_t = (1 - alpha_t) S_{t-1} + Z_t              (weight decay / forgetting)
        o_t = S_t^T (scale q_t)

    The retention factor ``1 - alpha_t`` is applied directly (not through ``exp(log(1 - alpha))``),
    so ``alpha = 1`` wipes the memory exactly (``S_t = Z_t``) and its gradient stays finite.
    ``memory_scan_ref(beta=theta, g=log(1 - alpha), eta=eta)`` for ``alpha < 1``.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; theta, alpha, eta: ``[B, T, H]`` or Python
        numbers (alpha may also be ``[B, T, H, K]``). scale: default ``K ** -0.5``.
        initial_state: ``S0`` ``[B, H, K, V]`` or ``(S0, Z0)`` (``[N, H, K, V]`` with cu_seqlens).
        use_qk_l2norm: L2-normalise q and k over K first.

    Returns:
        ``(o, final_state)``: ``o`` ``[B, T, H, V]`` (dtype of q), ``final_state`` the pair
        ``(S_T, Z_T)`` (float32, float64 for float64 inputs) or None.

    Examples::

        >>> q = k = v = torch.ones(1, 2, 1, 1)
        >>> titans_linear_ref(q, k, v, 0.5, 0.0, 0.0)[0].flatten()
        tensor([0.5000, 0.7500])
    """
    acc = _compute_dtype(q)
    decay = 1 - alpha.to(acc) if isinstance(alpha, torch.Tensor) else 1.0 - alpha
    if eta is None:
        eta = 0.0
    o, final, _ = _scan(
        q, k, v, theta, decay=decay, eta=eta, objective="l2", p=3.0, delta=1.0, scale=scale,
        initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens,
        use_qk_l2norm=use_qk_l2norm, states_every=None, retention_first=False,
    )
    return o, final
