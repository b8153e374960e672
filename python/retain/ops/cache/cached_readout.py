"""``retain.ops.cached_readout``: memory caching's readout — each token reads its online memory's
output and the cached states of the earlier segments, aggregated by residual sum, a gate, a memory
soup or a sparse top-k selection; fused, so the ``[B, T, NS, H, V]`` per-segment readouts are
never formed (custom ops ``retain::cached_readout`` and its backward; derivation in
csrc/cache/README.md)."""

from __future__ import annotations

import torch
from torch import Tensor

from retain import _native
from retain.ops import _dispatch
from retain.ops._checks import check_choice, check_floating, check_same, check_shape, check_tensor
from retain.ops.cache.reference import MODES, cached_readout_ref
from retain.ops.scan.memory_scan import MAX_HEAD_DIM

_OP = "cached_readout"
_NAME = "retain.ops.cached_readout"

def cached_readout(q: Tensor, u: Tensor | None, states: Tensor, seg_keys: Tensor | None, o_online: Tensor, *,
                   online_keys: Tensor | None = None, segment_len: int, mode: str = "residual",
                   top_k: int | None = None, scale: float | None = None) -> Tensor:
    r"""Memory caching's readout ("Memory Caching: RNNs with Growing Memory"): the sequence is cut
    into segments of ``L = segment_len`` tokens, the memory's state at the end of each segment is
    cached, and token t of segment ``s = t // L`` reads its online output ``o_t`` and the cached
    states ``S_i``, ``i < s`` (never a later one: the readout is causal)::

        r_i      = S_iᵀ (scale · q_t)                                  the cached memory's read
        residual : y_t = o_t + Σ_{i<s} r_i
        gated    : γ = softmax({⟨u_t, c_i⟩}_{i<s} ∪ {⟨u_t, c_{s,t}⟩});  y_t = γ_s o_t + Σ_{i<s} γ_i r_i
        soup     : the same value as gated (averaging linear memories' states reads the same)
        sparse   : gated over the top_k cached segments by ⟨u_t, c_i⟩ (the online one always in)

    with ``c_i = seg_keys[:, i]`` the cached segments' summaries and ``c_{s,t} = online_keys[:, t]``
    the online segment's summary at t. Fused: forward and backward never form the per-segment
    readouts; gradients flow to every input, the cached states included (the top-k selection is
    a constant of the graph, the gate over the selected ones is differentiated).

    Args:
        q: ``[B, T, H, K]`` queries (the memory's own). float32, float64, bfloat16 or float16, one
            dtype and device for every input; 16-bit inputs are computed in float32. K, V in
            [1, 1024].
        u: ``[B, T, H, K]`` router queries (gated, soup, sparse; ignored and may be None for
            residual).
        states: ``[B, NS, H, K, V]``, state i = the memory after segment i's last token, e.g.
            ``memory_scan(..., states_every=L)``'s states; ``NS >= ceil(T / L) - 1`` (extra states
            are read by no token and get zero gradients).
        seg_keys: ``[B, NS, H, K]`` the cached segments' summaries, e.g.
            ``segment_mean(k, L)[:, :NS]`` (gated, soup, sparse; may be None for residual).
        o_online: ``[B, T, H, V]`` the online memory's output (the scan's ``o``).
        online_keys: ``[B, T, H, K]`` the online segment's summary per token, e.g.
            ``segment_mean(k, L, causal=True)`` (required by gated, soup and sparse).
        segment_len: L >= 1.
        mode: ``'residual'``, ``'gated'``, ``'soup'`` or ``'sparse'``.
        top_k: the cached segments a token reads in ``'sparse'`` mode (>= 1; all of them when
            ``top_k >= s``); only for sparse.
        scale: multiplies q; default ``K ** -0.5`` (memory_scan's default).

    Returns:
        ``y`` ``[B, T, H, V]``, q's dtype. Double backward is refused (not implemented).

    Examples::

        >>> q = torch.ones(1, 2, 1, 1)                    # B = 1, T = 2, H = 1, K = 1
        >>> o = torch.tensor([1.0, 3.0]).reshape(1, 2, 1, 1)
        >>> S = torch.full((1, 1, 1, 1, 1), 2.0)          # the state after segment 0 (L = 1)
        >>> retain.ops.cached_readout(q, None, S, None, o, segment_len=1, scale=1.0).flatten()
        tensor([1., 5.])
        >>> u = torch.zeros(1, 2, 1, 1)                    # equal logits: token 1 averages o_1 and r_0
        >>> c = torch.zeros(1, 1, 1, 1)
        >>> retain.ops.cached_readout(q, u, S, c, o, online_keys=u, segment_len=1, mode="gated",
        ...                           scale=1.0).flatten()
        tensor([1.0000, 2.5000])
    """
    op = _NAME
    check_tensor(op, "q", q, ndim=4)
    check_floating(op, "q", q)
    B, T, H, K = q.shape
    check_choice(op, "mode", mode, MODES)
    if isinstance(segment_len, bool) or not isinstance(segment_len, int) or segment_len < 1:
        raise ValueError(f"{op}: segment_len must be an int >= 1, got {segment_len!r}")
    check_tensor(op, "o_online", o_online, ndim=4)
    V = o_online.shape[-1]
    check_shape(op, "o_online", o_online, (B, T, H, V), "[B, T, H, V] with q's B, T, H")
    for name, size in (("K", K), ("V", V)):
        if not 1 <= size <= MAX_HEAD_DIM:
            raise ValueError(f"{op}: head dimension {name} must be in [1, {MAX_HEAD_DIM}], got {size}")
    check_tensor(op, "states", states, ndim=5)
    NS = states.shape[1]
    check_shape(op, "states", states, (B, NS, H, K, V), "[B, NS, H, K, V] with q's B, H, K and o_online's V")
    needed = max(-(-T // segment_len) - 1, 0)
    if NS < needed:
        raise ValueError(f"{op}: states must hold the {needed} cached states that T = {T} tokens in segments of "
                         f"{segment_len} read (segment s reads the states i < s), got NS = {NS}")
    gated = mode != "residual"
    if gated:
        for name, t in (("u", u), ("online_keys", online_keys)):
            if t is None:
                raise ValueError(f"{op}: mode '{mode}' needs {name} [B, T, H, K], got None")
        if seg_keys is None:
            raise ValueError(f"{op}: mode '{mode}' needs seg_keys [B, NS, H, K], got None")
    for name, t, shape in (("u", u, (B, T, H, K)), ("seg_keys", seg_keys, (B, NS, H, K)),
                           ("online_keys", online_keys, (B, T, H, K))):
        if t is not None:
            check_tensor(op, name, t)
            check_shape(op, name, t, shape)
    check_same(op, "q", q, u=u, states=states, seg_keys=seg_keys, o_online=o_online, online_keys=online_keys)
    if top_k is not None:
        if mode != "sparse":
            raise ValueError(f"{op}: top_k is for mode 'sparse', got top_k={top_k!r} with mode '{mode}'")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"{op}: top_k must be an int >= 1, got {top_k!r}")
    elif mode == "sparse":
        raise ValueError(f"{op}: mode 'sparse' needs top_k (the cached segments each token reads), got None")
    if scale is None:
        scale = K ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{op}: scale must be a number, got {type(scale).__name__}")
    if not gated:
        u = seg_keys = online_keys = None
    q, u, states, seg_keys, o_online, online_keys = _dispatch.contiguous(q, u, states, seg_keys, o_online,
                                                                         online_keys)
    return cached_readout_op(q, u, states, seg_keys, o_online, online_keys, segment_len, mode,
                             int(top_k or 0), float(scale))


def _reference(q, u, states, seg_keys, o, online_keys, segment_len, mode, top_k, scale):
    return cached_readout_ref(q, u, states, seg_keys, o, online_keys, segment_len=segment_len,
                              mode=mode, top_k=top_k or None, scale=scale)


@torch.library.custom_op("retain::cached_readout", mutates_args=())
def cached_readout_op(q: Tensor, u: Tensor | None, states: Tensor, seg_keys: Tensor | None, o: Tensor,
                      online_keys: Tensor | None, segment_len: int, mode: str, top_k: int, scale: float) -> Tensor:
    """y [B, T, H, V] of contiguous inputs (mode: one of MODES, the kernels' code looked up in
    retain._C.cached_readout_modes; top_k 0:
    every segment). This body is the fallback, by the reference."""
    _dispatch.fallback(_OP, q)
    return _reference(q, u, states, seg_keys, o, online_keys, segment_len, mode, top_k, scale).contiguous()


def _sizes(q, states, o, segment_len):
    B, T, H, K = q.shape
    return B, T, H, K, o.shape[-1], states.shape[1], segment_len


def _num_read(T: int, L: int, NS: int) -> int:
    return max(0, min(-(-T // L) - 1, NS))


def _gate_scratch(q, T, L, NS, mode, extra):
    """The kernels' gate scratch [B, H, T, NR + extra] (nothing in residual mode)."""
    NR = _num_read(T, L, NS)
    if mode == "residual" or NR == 0 or q.numel() == 0:
        return q.new_empty(0, dtype=_dispatch.acc_dtype(q.dtype))
    B, _, H, _ = q.shape
    return q.new_empty((B, H, T, NR + extra), dtype=_dispatch.acc_dtype(q.dtype))


def _forward(q, u, states, seg_keys, o, online_keys, segment_len, mode, top_k, scale):
    y = _native.empty_like(o)
    if y.numel() == 0:
        return y
    sizes = _sizes(q, states, o, segment_len)
    args = [_dispatch.dtype_code(q), _native.lib().cached_readout_modes[mode], q.data_ptr(), _dispatch.ptr(u),
            _dispatch.ptr(states), _dispatch.ptr(seg_keys), o.data_ptr(), _dispatch.ptr(online_keys), *sizes, top_k,
            scale, y.data_ptr()]
    gates = None
    if q.device.type != "cpu":  # the CUDA forward passes the gates from one kernel to the next
        gates = _gate_scratch(q, sizes[1], segment_len, sizes[5], mode, 1)
        args.append(_dispatch.ptr(gates))
    _dispatch.run("cached_readout_fwd", q.device, *args)
    return y


@cached_readout_op.register_fake
def _(q, u, states, seg_keys, o, online_keys, segment_len, mode, top_k, scale):
    return _native.fake_empty_like(o)



@torch.library.custom_op("retain::cached_readout_backward", mutates_args=())
def cached_readout_backward_op(grad: Tensor, q: Tensor, u: Tensor | None, states: Tensor, seg_keys: Tensor | None,
                               o: Tensor, online_keys: Tensor | None, segment_len: int, mode: str, top_k: int,
                               scale: float, need_q: bool, need_u: bool, need_states: bool, need_seg_keys: bool,
                               need_o: bool, need_online_keys: bool
                               ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The gradients of (q, u, states, seg_keys, o, online_keys) from grad [B, T, H, V]; an
    unwanted one (or one of an absent input) is empty. This body is the fallback, by autograd
    through the reference."""
    _dispatch.fallback(_OP, q)
    need = (need_q, need_u, need_states, need_seg_keys, need_o, need_online_keys)
    primals = (q, u, states, seg_keys, o, online_keys)
    grads = _dispatch.reference_vjp(
        lambda *xs: (_reference(*xs, segment_len, mode, top_k, scale),), primals, (grad,), need)
    # cloned: a gradient may be the incoming one itself (residual's d o_online), which an op must not return
    return tuple(g.clone() if g is not None else q.new_empty(0) for g in grads)


def _backward(grad, q, u, states, seg_keys, o, online_keys, segment_len, mode, top_k, scale, *need):
    primals = (q, u, states, seg_keys, o, online_keys)
    outs = [_dispatch.empty_or_nothing(p, n, _native.empty_like, q) for p, n in zip(primals, need)]
    if q.numel() == 0 or o.numel() == 0:  # no tokens: nothing reads a state
        return tuple(t.zero_() for t in outs)
    sizes = _sizes(q, states, o, segment_len)
    gates = _gate_scratch(q, sizes[1], segment_len, sizes[5], mode, 1)
    dz = _gate_scratch(q, sizes[1], segment_len, sizes[5], mode, 0)
    dy = grad.contiguous()  # held: the kernel reads it through a raw pointer
    _dispatch.run("cached_readout_bwd", q.device, _dispatch.dtype_code(q), _native.lib().cached_readout_modes[mode],
                  q.data_ptr(), _dispatch.ptr(u), _dispatch.ptr(states), _dispatch.ptr(seg_keys), o.data_ptr(), _dispatch.ptr(online_keys), *sizes,
                  top_k, scale, dy.data_ptr(), *[_dispatch.ptr(t) for t in outs], _dispatch.ptr(gates),
                  _dispatch.ptr(dz))
    return tuple(outs)


@cached_readout_backward_op.register_fake
def _(grad, q, u, states, seg_keys, o, online_keys, segment_len, mode, top_k, scale, *need):
    primals = (q, u, states, seg_keys, o, online_keys)
    return tuple(_dispatch.empty_or_nothing(p, n, _native.fake_empty_like, q) for p, n in zip(primals, need))


def _setup_context(ctx, inputs, output):
    q, u, states, seg_keys, o, online_keys, segment_len, mode, top_k, scale = inputs
    ctx.args = (segment_len, mode, top_k, scale)
    ctx.save_for_backward(q, u, states, seg_keys, o, online_keys)


def _backward_autograd(ctx, grad):
    saved = ctx.saved_tensors
    need = tuple(bool(n) and t is not None for n, t in zip(ctx.needs_input_grad[:6], saved))
    grads = cached_readout_backward_op(grad, *saved, *ctx.args, *need)
    return (*(g if n else None for g, n in zip(grads, need)), None, None, None, None)


cached_readout_op.register_autograd(_backward_autograd, setup_context=_setup_context)
_dispatch.register_kernels(cached_readout_op, _OP, _forward)
_dispatch.register_kernels(cached_readout_backward_op, _OP, _backward)
