"""``retain.ops.memory_scan``: one online-gradient step of a K x V associative memory per token
and head (custom ops ``retain::memory_scan`` and its backward; derivations in csrc/scan/README.md).
The named ops (linear_attn, delta_rule, gated_delta_rule, titans_linear) call
:func:`memory_scan_checked`."""

from __future__ import annotations

import torch
from torch import Tensor

from retain import _native
from retain.ops import _dispatch
from retain.ops._checks import (check_bool, check_choice, check_device, check_floating, check_int, check_number,
                                check_same, check_shape, check_tensor, dtype_name)
from retain.ops._dispatch import acc_dtype
from retain.ops.scan import reference
from retain.ops.scan.reference import OBJECTIVES

_OP = "memory_scan"
MAX_HEAD_DIM = 1024  # K and V beyond this are rejected: a chunk of checkpointed states would not fit cache
CKPT_BYTES = 1 << 21  # the backward recomputes one chunk of C states: C*K*V*bytes <= 2 MiB
# The native module's codes (csrc/scan/memory_scan.h) by the Python API's names; without a native
# module (the fallback runs) any consistent numbering serves.
_C = _native._C
OBJECTIVE_CODES = dict(_C.memory_scan_objectives) if _C is not None else {n: i for i, n in enumerate(OBJECTIVES)}
_OBJECTIVE_NAMES = {code: name for name, code in OBJECTIVE_CODES.items()}
GATE_CODES = dict(_C.memory_scan_gate_kinds) if _C is not None else {}


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
        q, k: ``[B, T, HK, K]``; v: ``[B, T, H, V]`` with H = HK (or a multiple of it: grouped
            value heads, value head h reads key head ``h // (H / HK)`` in the kernel, q and k are
            never repeated); float32, float64, bfloat16 or float16, one dtype and device for q, k,
            v. 16-bit inputs are computed in float32. K and V up to 1024 on the CPU; on CUDA K up
            to 256 (a column of the state lives in registers).
        beta: step size ``[B, T, H]`` or a Python number. The gates (beta, g, eta) may have any
            floating dtype: they are read in the state dtype (float32 gates with bfloat16 q, k, v
            are not rounded to 16 bits) and their gradients come back in their own dtype.
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
    return memory_scan_checked("retain.ops.memory_scan", q, k, v, beta, g=g, eta=eta, objective=objective, p=p,
                        delta=delta, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                        cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm, states_every=states_every,
                        retention_first=retention_first)



def _as_gate(op: str, name: str, x, ref: Tensor, shape, what: str = "[B, T, H]") -> Tensor | None:
    """A per-step gate given as a floating tensor of ``shape`` (any floating dtype: the kernels read
    gates in the accumulation type, so float32 gates with bfloat16 q, k, v are not rounded) or a
    Python number (broadcast, no gradient); returned in the accumulation type of ``ref``."""
    if x is None:
        return None
    acc = acc_dtype(ref.dtype)
    if not isinstance(x, torch.Tensor):
        x = check_number(op, name, x, finite=False)  # a NaN or inf gate is data: NaN in, NaN out
        return torch.full(shape, x, dtype=acc, device=ref.device)
    if x.is_complex() or not x.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating tensor {list(shape)} or a Python number, got a "
                        f"{dtype_name(x)} tensor")
    check_device(op, name, x, "q", ref)
    check_shape(op, name, x, shape, what)
    return x.to(acc)


def _state(op: str, name: str, x, shape, dtype, device) -> Tensor | None:
    if x is None:
        return None
    check_tensor(op, name, x)
    check_floating(op, name, x, ())
    if x.device != device:
        raise ValueError(f"{op}: {name} must be on q's device {device}, got {x.device}")
    check_shape(op, name, x, shape, "[N, H, K, V]")
    return x.to(dtype)


def memory_scan_checked(op, q, k, v, beta, *, g=None, eta=None, objective="l2", p=3.0, delta=1.0, scale=None,
                 initial_state=None, output_final_state=False, cu_seqlens=None, use_qk_l2norm=False,
                 states_every=None, retention_first=False, gate_log=True, names=None):
    """memory_scan with every argument checked, errors naming ``op`` (the public op's name) and the
    argument by the caller's name for it (``names``: e.g. titans_linear's theta for beta): what the
    named ops (linear_attn, delta_rule, ...) call."""
    names = {"beta": "beta", "g": "g", "eta": "eta", **(names or {})}
    check_tensor(op, "q", q, ndim=4)
    check_floating(op, "q", q)
    B, T, HK, K = q.shape
    check_tensor(op, "k", k)
    check_tensor(op, "v", v, ndim=4)
    check_same(op, "q", q, k=k, v=v)
    check_shape(op, "k", k, q.shape, "the shape of q, [B, T, H, K]")
    V, H = v.shape[-1], v.shape[2]
    if (H % HK if HK else H) or tuple(v.shape[:2]) != (B, T):
        raise ValueError(f"{op}: v must have shape ({B}, {T}, H, V) with H a multiple of q's {HK} heads (grouped "
                         f"value heads: H = r * {HK}), got {tuple(v.shape)}")
    for name, size in (("K", K), ("V", V)):
        if not 1 <= size <= MAX_HEAD_DIM:
            raise ValueError(f"{op}: head dimension {name} must be in [1, {MAX_HEAD_DIM}], got {size}")
    if beta is None:
        raise TypeError(f"{op}: {names['beta']} (the step size) must be a tensor [B, T, H] or a Python number, "
                        "got None")
    beta = _as_gate(op, names["beta"], beta, q, (B, T, H))
    eta = _as_gate(op, names["eta"], eta, q, (B, T, H))
    if g is not None:
        check_tensor(op, names["g"], g)
        if tuple(g.shape) not in ((B, T, H), (B, T, H, K)):
            raise ValueError(f"{op}: {names['g']} must have shape {(B, T, H)} (per head) or {(B, T, H, K)} "
                             f"(per key), got {tuple(g.shape)}")
        g = _as_gate(op, names["g"], g, q, tuple(g.shape), "[B, T, H] or [B, T, H, K]")
    check_choice(op, "objective", objective, OBJECTIVES)
    p = check_number(op, "p", p)
    delta = check_number(op, "delta", delta)
    if objective == "lp" and not p >= 1.0:
        raise ValueError(f"{op}: p must be >= 1 for objective 'lp', got {p}")
    if objective == "huber" and not delta > 0.0:
        raise ValueError(f"{op}: delta must be > 0 for objective 'huber', got {delta}")
    scale = K**-0.5 if scale is None else check_number(op, "scale", scale)
    use_qk_l2norm = check_bool(op, "use_qk_l2norm", use_qk_l2norm)
    output_final_state = check_bool(op, "output_final_state", output_final_state)

    N = B
    if cu_seqlens is not None:
        check_tensor(op, "cu_seqlens", cu_seqlens, ndim=1)
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{op}: cu_seqlens must be int32 or int64, got {dtype_name(cu_seqlens)}")
        if B != 1:
            raise ValueError(f"{op}: cu_seqlens requires B == 1 (sequences packed along T), got B = {B}")
        if cu_seqlens.device.type == "meta" and q.device.type != "meta":
            raise ValueError(f"{op}: cu_seqlens must hold offsets (a CPU tensor or on q's device {q.device}), "
                             "got a tensor on the meta device")
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
        L = check_int(op, "states_every", states_every, minimum=1)
        if cu_seqlens is None:
            rows = T // L
        else:
            if torch.compiler.is_compiling():
                raise NotImplementedError(f"{op}: states_every with cu_seqlens is not supported under torch.compile")
            offs = cu_seqlens.tolist()
            rows = sum((b - a) // L for a, b in zip(offs, offs[1:]))

    tensors = (q, k, v, beta, g, eta, S0, Z0)
    save_ckpt = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    o, S, Z, states, _, _ = memory_scan_op(
        q, k, v, beta, g, eta, S0, Z0, cu_seqlens, OBJECTIVE_CODES[objective], float(p), float(delta), scale,
        bool(use_qk_l2norm), bool(retention_first), gate_log, L, rows, save_ckpt)
    final = ((S, Z) if momentum else S) if output_final_state else None
    return o, final, (states if L else None)




def checkpoint_every(K: int, V: int, dtype: torch.dtype) -> int:
    """Steps between saved states: 64, fewer for large K*V so a chunk's states stay <= 2 MiB."""
    nbytes = K * V * torch.empty(0, dtype=acc_dtype(dtype)).element_size()
    return max(1, min(64, CKPT_BYTES // max(nbytes, 1)))


@torch.library.custom_op("retain::memory_scan", mutates_args=())
def memory_scan_op(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, eta: Tensor | None,
    initial_S: Tensor | None, initial_Z: Tensor | None, cu_seqlens: Tensor | None,
    objective: int, p: float, delta: float, scale: float, l2norm: bool, retention_first: bool, gate_log: bool,
    states_every: int, states_rows: int, save_ckpt: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(o, final_S, final_Z, states, ckpt_S, ckpt_Z); see retain.ops.memory_scan. Unused outputs
    (final_Z without momentum, states without states_every, checkpoints without save_ckpt or
    without a kernel) are empty. This body is the fallback: the reference's loop."""
    _dispatch.fallback(_OP, q)
    o, S, Z, states = _reference(q, k, v, beta, g, eta, initial_S, initial_Z, cu_seqlens, objective, p, delta,
                                 scale, l2norm, retention_first, gate_log, states_every)
    acc = acc_dtype(q.dtype)
    nothing = lambda: q.new_empty(0, dtype=acc)  # noqa: E731  (outputs must not alias each other)
    return (o.contiguous(), S.to(acc).contiguous(), Z.to(acc).contiguous() if Z is not None else nothing(),
            states.to(acc).contiguous() if states is not None else nothing(), nothing(), nothing())


def _reference(q, k, v, beta, g, eta, initial_S, initial_Z, cu_seqlens, objective, p, delta, scale, l2norm,
               retention_first, gate_log, states_every):
    """(o, S_T, Z_T or None, states or None) by the reference, from the custom op's arguments."""
    o, final, states = reference._scan(
        q, k, v, beta, decay=(g.exp() if gate_log else g) if g is not None else None, eta=eta,
        objective=_OBJECTIVE_NAMES[objective], p=p, delta=delta, scale=scale,
        initial_state=(initial_S, initial_Z) if eta is not None else initial_S, output_final_state=True,
        cu_seqlens=cu_seqlens, use_qk_l2norm=l2norm, states_every=states_every or None,
        retention_first=retention_first)
    S, Z = final if eta is not None else (final, None)
    return o, S, Z, states


def _outputs(q, v, eta, cu_seqlens, states_every, states_rows, save_ckpt, empty):
    B, T, H, V = v.shape  # H value heads (q and k may have fewer: grouped value heads)
    K = q.shape[-1]
    N = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else B
    acc = acc_dtype(q.dtype)
    new = lambda *shape: empty(q.new_empty(shape, dtype=acc))  # noqa: E731
    nothing = lambda: q.new_empty(0, dtype=acc)  # noqa: E731  (outputs must not alias each other)
    save_ckpt = save_ckpt and _dispatch.served(memory_scan_op, q.device)  # the fallback keeps none
    n_ckpt = -(-T // checkpoint_every(K, V, q.dtype))
    return (empty(q.new_empty((B, T, H, V))), new(N, H, K, V), new(N, H, K, V) if eta is not None else nothing(),
            new(B, states_rows, H, K, V) if states_every > 0 else nothing(),
            new(B, H, n_ckpt, K, V) if save_ckpt else nothing(),
            new(B, H, n_ckpt, K, V) if save_ckpt and eta is not None else nothing())


def _params(q, k, v, beta, g, eta, initial_S, initial_Z, cu_seqlens, objective, p, delta, scale, l2norm,
            retention_first, gate_log, states_every, states_rows):
    """The kernels' parameter dict (csrc/scan/bind.cpp reads it by these names)."""
    B, T, H, V = v.shape
    HK, K = q.shape[2:]
    ptr = _dispatch.ptr
    return dict(B=B, T=T, H=H, HK=HK, K=K, V=V, N=cu_seqlens.shape[0] - 1 if cu_seqlens is not None else B,
                states_every=states_every, states_rows=states_rows, ckpt_every=checkpoint_every(K, V, q.dtype),
                q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), beta=beta.data_ptr(), g=ptr(g), eta=ptr(eta),
                initial_S=ptr(initial_S), initial_Z=ptr(initial_Z), cu_seqlens=ptr(cu_seqlens), scale=scale, p=p,
                delta=delta, eps=reference.LP_EPS, objective=objective,
                gate_kind=GATE_CODES["none" if g is None else ("head" if g.dim() == 3 else "key")],
                l2norm=l2norm, retention_first=retention_first, gate_log=gate_log, momentum=eta is not None)


def _forward(q, k, v, beta, g, eta, initial_S, initial_Z, cu_seqlens, objective, p, delta, scale, l2norm,
             retention_first, gate_log, states_every, states_rows, save_ckpt):
    q, k, v, beta, g, eta, initial_S, initial_Z, cu_seqlens = _dispatch.contiguous(
        q, k, v, beta, g, eta, initial_S, initial_Z, cu_seqlens)
    outs = _outputs(q, v, eta, cu_seqlens, states_every, states_rows, save_ckpt, _native.empty_like)
    o, final_S, final_Z, states, ckpt_S, ckpt_Z = outs
    d = _params(q, k, v, beta, g, eta, initial_S, initial_Z, cu_seqlens, objective, p, delta, scale, l2norm,
                retention_first, gate_log, states_every, states_rows)
    d.update(o=o.data_ptr(), final_S=final_S.data_ptr(), final_Z=_dispatch.ptr(final_Z),
             states=_dispatch.ptr(states), ckpt_S=_dispatch.ptr(ckpt_S), ckpt_Z=_dispatch.ptr(ckpt_Z))
    if o.numel() or final_S.numel():
        _dispatch.run("memory_scan_fwd", q.device, _dispatch.dtype_code(q), d)
    return outs


def _forward_cuda(q, k, *args):
    # the CUDA kernel keeps a column of S in registers: K rows over at most 8 threads of 32 rows
    if q.shape[-1] > (max_k := _native.lib().memory_scan_cuda_max_k):
        raise ValueError(f"retain::memory_scan: head dimension K must be <= {max_k} for CUDA tensors (the "
                         f"fused-recurrent kernel holds a column of the state in registers), got {q.shape[-1]}; "
                         "run on the CPU or split the keys into heads")
    return _forward(q, k, *args)


@memory_scan_op.register_fake
def _(q, k, v, beta, g, eta, initial_S, initial_Z, cu_seqlens, objective, p, delta, scale, l2norm,
      retention_first, gate_log, states_every, states_rows, save_ckpt):
    return _outputs(q, v, eta, cu_seqlens, states_every, states_rows, save_ckpt, _native.fake_empty_like)


@torch.library.custom_op("retain::memory_scan_backward", mutates_args=())
def memory_scan_backward_op(
    grad_o: Tensor, grad_final_S: Tensor | None, grad_final_Z: Tensor | None, grad_states: Tensor | None,
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, eta: Tensor | None,
    initial_S: Tensor | None, initial_Z: Tensor | None, cu_seqlens: Tensor | None, ckpt_S: Tensor, ckpt_Z: Tensor,
    objective: int, p: float, delta: float, scale: float, l2norm: bool, retention_first: bool, gate_log: bool,
    states_every: int, states_rows: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (q, k, v, beta, g, eta, initial_S, initial_Z) of memory_scan; those of absent
    inputs are empty. The kernels recompute states chunk by chunk from the checkpoints
    (csrc/scan/README.md); this body, the fallback, differentiates the reference."""
    _dispatch.fallback(_OP, q)
    primals = (q, k, v, beta, g, eta, initial_S, initial_Z)
    grads = _dispatch.reference_vjp(
        lambda *xs: _reference(*xs, cu_seqlens, objective, p, delta, scale, l2norm, retention_first, gate_log,
                               states_every),
        primals, (grad_o, grad_final_S, grad_final_Z, grad_states), [True] * len(primals))
    return tuple(gr if gr is not None else b for gr, b in zip(grads, _grad_buffers(*primals, torch.zeros_like)))


def _backward_launch(grad_o, grad_final_S, grad_final_Z, grad_states, q, k, v, beta, g, eta, initial_S, initial_Z,
                     cu_seqlens, ckpt_S, ckpt_Z, objective, p, delta, scale, l2norm, retention_first, gate_log,
                     states_every, states_rows):
    """What both backward kernels take: (gradient buffers, dtype code, parameter dict, gradient
    dict, whether there is anything to compute, the contiguous inputs the dicts point into —
    which the caller must hold until the kernel has run)."""
    if ckpt_S.numel() == 0 and q.numel() > 0:
        raise RuntimeError("retain::memory_scan: backward without saved checkpoints (the forward ran with "
                           "save_ckpt=False); call retain.ops.memory_scan, which sets it when grad is needed")
    q, k, v, beta, g, eta, initial_S, initial_Z, cu_seqlens, ckpt_S, ckpt_Z = _dispatch.contiguous(
        q, k, v, beta, g, eta, initial_S, initial_Z, cu_seqlens, ckpt_S, ckpt_Z)
    grad_o, grad_final_S, grad_final_Z, grad_states = _dispatch.contiguous(grad_o, grad_final_S, grad_final_Z,
                                                                           grad_states)
    # grouped value heads: the kernels write one q/k gradient row per value head (summed by _fold), so
    # their buffers are shaped like an expanded view of q (no allocation for the template itself)
    qk = q if v.shape[2] == q.shape[2] else q[:, :, :1].expand(*v.shape[:3], q.shape[-1])
    grads = list(_grad_buffers(qk, qk, v, beta, g, eta, initial_S, initial_Z, _native.empty_like))
    d = _params(q, k, v, beta, g, eta, initial_S, initial_Z, cu_seqlens, objective, p, delta, scale, l2norm,
                retention_first, gate_log, states_every, states_rows)
    d.update(ckpt_S=ckpt_S.data_ptr(), ckpt_Z=_dispatch.ptr(ckpt_Z if eta is not None else None))
    names = ("grad_q", "grad_k", "grad_v", "grad_beta", "grad_g", "grad_eta", "grad_initial_S", "grad_initial_Z")
    gd = {name: _dispatch.ptr(t) for name, t in zip(names, grads)}
    gd.update(grad_o=grad_o.data_ptr(), grad_final_S=_dispatch.ptr(grad_final_S),
              grad_final_Z=_dispatch.ptr(grad_final_Z), grad_states=_dispatch.ptr(grad_states),
              empty=grad_o.numel() == 0)
    held = (q, k, v, beta, g, eta, initial_S, initial_Z, cu_seqlens, ckpt_S, ckpt_Z, grad_o, grad_final_S,
            grad_final_Z, grad_states)
    return grads, _dispatch.dtype_code(q), d, gd, bool(grad_o.numel() or grads[6].numel()), held


def _fold(grads: list[Tensor], q: Tensor) -> tuple[Tensor, ...]:
    """The q and k gradients as q's shape: the rows of the value heads that share a key head summed
    (a no-op without grouped value heads)."""
    B, T, HK, K = q.shape
    if grads[0].shape[2] != HK:
        grads[0], grads[1] = (x.view(B, T, HK, x.shape[2] // HK, K).sum(3) for x in grads[:2])
    return tuple(grads)


def _backward_cpu(*args):
    grads, code, d, gd, work, _held = _backward_launch(*args)
    if work:
        _native.lib().memory_scan_bwd_cpu(code, d, gd, _native.num_threads())
    return _fold(grads, args[4])


def _backward_cuda(*args):
    """The CUDA backward with its workspace: per-V-tile partial sums of the row reductions (added
    in a fixed order afterwards, so results are deterministic) and one chunk of recomputed states
    per block; its size comes from the native side, which owns the launch geometry."""
    grads, code, d, gd, work, _held = _backward_launch(*args)
    if work:
        lib = _native.lib()
        q = grads[0]  # q's gradient: q's shape, dtype and device
        numel = lib.memory_scan_cuda_work_numel(d["B"], d["T"], d["H"], d["K"], d["V"], d["N"], d["ckpt_every"],
                                                d["momentum"], d["gate_kind"] != GATE_CODES["none"])
        buf = torch.empty(numel, dtype=acc_dtype(q.dtype), device=q.device)
        with torch.cuda.device(q.device):
            lib.memory_scan_bwd_cuda(code, d, gd, buf.data_ptr(), numel, _native.cuda_stream(q.device))
    return _fold(grads, args[4])


def _grad_buffers(q, k, v, beta, g, eta, initial_S, initial_Z, empty):
    acc = acc_dtype(q.dtype)
    some = _dispatch.empty_or_nothing
    return (empty(q), empty(k), empty(v), empty(beta), some(g, True, empty, q), some(eta, True, empty, q),
            some(initial_S, True, empty, q, acc), some(initial_Z, eta is not None, empty, q, acc))


@memory_scan_backward_op.register_fake
def _(grad_o, grad_final_S, grad_final_Z, grad_states, q, k, v, beta, g, eta, initial_S, initial_Z, cu_seqlens,
      ckpt_S, ckpt_Z, objective, p, delta, scale, l2norm, retention_first, gate_log, states_every, states_rows):
    return _grad_buffers(q, k, v, beta, g, eta, initial_S, initial_Z, _native.fake_empty_like)


def _setup_context(ctx, inputs, output):
    q, k, v, beta, g, eta, initial_S, initial_Z, cu_seqlens = inputs[:9]
    ctx.scalars = inputs[9:18]
    _, _, _, _, ckpt_S, ckpt_Z = output
    ctx.mark_non_differentiable(ckpt_S, ckpt_Z)
    ctx.save_for_backward(q, k, v, beta, g, eta, initial_S, initial_Z, cu_seqlens, ckpt_S, ckpt_Z)
    ctx.has = (g is not None, eta is not None, initial_S is not None, initial_Z is not None)


def _backward(ctx, grad_o, grad_final_S, grad_final_Z, grad_states, _gc1, _gc2):
    q, k, v, beta, g, eta, initial_S, initial_Z, cu_seqlens, ckpt_S, ckpt_Z = ctx.saved_tensors
    objective, p, delta, scale, l2norm, retention_first, gate_log, states_every, states_rows = ctx.scalars
    if grad_o is None:
        grad_o = torch.zeros_like(v)
    if grad_states is not None and states_every == 0:
        grad_states = None
    if grad_final_Z is not None and eta is None:
        grad_final_Z = None
    grads = memory_scan_backward_op(
        grad_o, grad_final_S, grad_final_Z, grad_states, q, k, v, beta, g, eta, initial_S, initial_Z, cu_seqlens,
        ckpt_S, ckpt_Z, objective, p, delta, scale, l2norm, retention_first, gate_log, states_every, states_rows)
    dq, dk, dv, dbeta, dg, deta, dS0, dZ0 = grads
    has_g, has_eta, has_S0, has_Z0 = ctx.has
    return (dq, dk, dv, dbeta, dg if has_g else None, deta if has_eta else None, dS0 if has_S0 else None,
            dZ0 if has_Z0 else None) + (None,) * 11


memory_scan_op.register_autograd(_backward, setup_context=_setup_context)
_dispatch.register_kernels(memory_scan_op, _OP, _forward, cuda=_forward_cuda)
_dispatch.register_kernels(memory_scan_backward_op, _OP, cpu=_backward_cpu, cuda=_backward_cuda)
