"""Custom-op registrations of the scan family: ``retain::linear_recurrence`` and its backward."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from retain import _native
from retain.ops._checks import kernel_device
from retain.ops.scan import reference

_OP = "linear_recurrence"


def _sizes(x: Tensor) -> tuple[int, int, int]:
    """[B, T, *] as (B, T, D): the trailing dimensions are one feature axis."""
    return x.shape[0], x.shape[1], math.prod(x.shape[2:])


def _ptr(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


@torch.library.custom_op("retain::linear_recurrence", mutates_args=())
def linear_recurrence_op(a: Tensor, x: Tensor, initial: Tensor | None, reverse: bool) -> Tensor:
    """h_t = a_t * h_{t-1} + x_t over dim 1 of [B, T, *]; inputs share shape, dtype and device."""
    device = kernel_device(_OP, x)
    if device is None:
        return reference.linear_recurrence_ref(a, x, initial=initial, reverse=reverse).contiguous()
    a, x = a.contiguous(), x.contiguous()
    initial = initial.contiguous() if initial is not None else None
    h = _native.empty_like(x)
    B, T, D = _sizes(x)
    if h.numel() == 0:
        return h
    C = _native.lib()
    code = _native.DTYPE_CODES[x.dtype]
    if device == "cpu":
        C.linear_recurrence_fwd_cpu(code, a.data_ptr(), x.data_ptr(), _ptr(initial), h.data_ptr(), B, T, D,
                                    reverse, _native.num_threads())
    else:
        C.linear_recurrence_fwd_cuda(code, a.data_ptr(), x.data_ptr(), _ptr(initial), h.data_ptr(), B, T, D,
                                     reverse, _native.cuda_stream(x.device))
    return h


@linear_recurrence_op.register_fake
def _(a: Tensor, x: Tensor, initial: Tensor | None, reverse: bool) -> Tensor:
    return _native.fake_empty_like(x)


@torch.library.custom_op("retain::linear_recurrence_backward", mutates_args=())
def linear_recurrence_backward_op(
    grad_h: Tensor, a: Tensor, h: Tensor, initial: Tensor | None, reverse: bool, need_grad_a: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_x, grad_a, grad_initial) of linear_recurrence. grad_a is empty when not needed,
    grad_initial is empty when ``initial`` is None (derivation: csrc/scan/README.md)."""
    device = kernel_device(_OP, h)
    if device is None:
        return _backward_ref(grad_h, a, h, initial, reverse, need_grad_a)
    grad_h, a, h = grad_h.contiguous(), a.contiguous(), h.contiguous()
    initial = initial.contiguous() if initial is not None else None
    grad_x, grad_a, grad_initial = _grad_buffers(h, initial, need_grad_a, _native.empty_like)
    B, T, D = _sizes(h)
    if h.numel() == 0:  # nothing depends on initial when T == 0
        return grad_x, grad_a, grad_initial.zero_()
    C = _native.lib()
    args = (_native.DTYPE_CODES[h.dtype], a.data_ptr(), h.data_ptr(), _ptr(initial), grad_h.data_ptr(),
            grad_x.data_ptr(), grad_a.data_ptr() if need_grad_a else 0,
            grad_initial.data_ptr() if initial is not None else 0, B, T, D, reverse)
    if device == "cpu":
        C.linear_recurrence_bwd_cpu(*args, _native.num_threads())
    else:
        C.linear_recurrence_bwd_cuda(*args, _native.cuda_stream(h.device))
    return grad_x, grad_a, grad_initial


@linear_recurrence_backward_op.register_fake
def _(grad_h, a, h, initial, reverse, need_grad_a):
    return _grad_buffers(h, initial, need_grad_a, _native.fake_empty_like)


def _grad_buffers(h, initial, need_grad_a, empty):
    """(grad_x, grad_a, grad_initial) outputs; the unwanted ones are empty tensors."""
    return (empty(h), empty(h) if need_grad_a else h.new_empty(0),
            empty(initial) if initial is not None else h.new_empty(0))


def _backward_ref(grad_h, a, h, initial, reverse, need_grad_a):
    """Backward by the same recurrence run the other way, in PyTorch (the fallback path)."""
    # lambda_t = grad_h_t + a_{t+1} lambda_{t+1}: the recurrence run the other way, a shifted one step.
    a_shift = torch.zeros_like(a)
    h_prev = torch.zeros_like(h)
    if reverse:  # lambda_t = grad_h_t + a_{t-1} lambda_{t-1}, h_prev_t = h_{t+1}
        a_shift[:, 1:] = a[:, :-1]
        h_prev[:, :-1] = h[:, 1:]
        first = (slice(None), slice(-1, None))
    else:
        a_shift[:, :-1] = a[:, 1:]
        h_prev[:, 1:] = h[:, :-1]
        first = (slice(None), slice(0, 1))
    if initial is not None:
        h_prev[first] = initial.unsqueeze(1)
    grad_x = reference.linear_recurrence_ref(a_shift, grad_h, reverse=not reverse)
    grad_a = grad_x * h_prev if need_grad_a else h.new_empty(0)
    grad_initial = (a[first] * grad_x[first]).squeeze(1) if initial is not None else h.new_empty(0)
    return grad_x.contiguous(), grad_a.contiguous(), grad_initial.contiguous()


def _setup_context(ctx, inputs, output):
    a, x, initial, reverse = inputs
    ctx.reverse = reverse
    ctx.has_initial = initial is not None
    ctx.save_for_backward(a, output, initial)


def _backward(ctx, grad_h):
    a, h, initial = ctx.saved_tensors
    need_a, _, need_initial = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    grad_x, grad_a, grad_initial = linear_recurrence_backward_op(grad_h, a, h, initial, ctx.reverse, need_a)
    return (grad_a if need_a else None, grad_x, grad_initial if (ctx.has_initial and need_initial) else None,
            None)


linear_recurrence_op.register_autograd(_backward, setup_context=_setup_context)


# memory_scan ---------------------------------------------------------------------------------

# The native module's codes (csrc/scan/memory_scan.h), by the Python API's names.
OBJECTIVE_CODES = dict(_native._C.memory_scan_objectives) if _native._C is not None else {}
GATE_CODES = dict(_native._C.memory_scan_gate_kinds) if _native._C is not None else {}
LP_EPS = reference.LP_EPS
CKPT_BYTES = 1 << 21  # the backward recomputes one chunk of C states: C*K*V*bytes <= 2 MiB


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """States are float32 for 16-bit and float32 inputs, float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def checkpoint_every(K: int, V: int, dtype: torch.dtype) -> int:
    """Steps between saved states: 64, fewer for large K*V so a chunk's states stay <= 2 MiB."""
    nbytes = K * V * torch.empty(0, dtype=acc_dtype(dtype)).element_size()
    return max(1, min(64, CKPT_BYTES // max(nbytes, 1)))


def _ms_shapes(q, v, cu_seqlens, states_every, states_rows, ckpt_every):
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else B
    return dict(B=B, T=T, H=H, K=K, V=V, N=N, states_every=states_every, states_rows=states_rows,
                ckpt_every=ckpt_every)


def _ms_outputs(q, v, eta, cu_seqlens, states_every, states_rows, save_ckpt, empty):
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else B
    acc = acc_dtype(q.dtype)
    C = checkpoint_every(K, V, q.dtype)
    new = lambda *shape: empty(q.new_empty(shape, dtype=acc))  # noqa: E731
    nothing = lambda: q.new_empty(0, dtype=acc)  # noqa: E731  (outputs must not alias each other)
    o = empty(q.new_empty((B, T, H, V)))
    final_S = new(N, H, K, V)
    final_Z = new(N, H, K, V) if eta is not None else nothing()
    states = new(B, states_rows, H, K, V) if states_every > 0 else nothing()
    n_ckpt = -(-T // C)
    ckpt_S = new(B, H, n_ckpt, K, V) if save_ckpt else nothing()
    ckpt_Z = new(B, H, n_ckpt, K, V) if save_ckpt and eta is not None else nothing()
    return o, final_S, final_Z, states, ckpt_S, ckpt_Z


def _ms_params(q, k, v, beta, g, eta, initial_S, initial_Z, cu_seqlens, objective, p, delta, scale, l2norm,
               retention_first, gate_log, states_every, states_rows):
    K = q.shape[-1]
    gate_kind = GATE_CODES["none" if g is None else ("head" if g.dim() == 3 else "key")]
    d = _ms_shapes(q, v, cu_seqlens, states_every, states_rows, checkpoint_every(K, v.shape[-1], q.dtype))
    d.update(q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), beta=beta.data_ptr(), g=_ptr(g), eta=_ptr(eta),
             initial_S=_ptr(initial_S), initial_Z=_ptr(initial_Z), cu_seqlens=_ptr(cu_seqlens),
             scale=scale, p=p, delta=delta, eps=LP_EPS, objective=objective, gate_kind=gate_kind, l2norm=l2norm,
             retention_first=retention_first, gate_log=gate_log, momentum=eta is not None)
    return d


def _require_kernel(q: Tensor) -> None:
    if kernel_device("memory_scan", q) is None:
        raise NotImplementedError("retain::memory_scan: the reference fallback runs through retain.ops.memory_scan "
                                  "(and the named ops), not the raw custom op")


def _contig(*ts):
    return [t.contiguous() if t is not None else None for t in ts]


@torch.library.custom_op("retain::memory_scan", mutates_args=())
def memory_scan_op(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, eta: Tensor | None,
    initial_S: Tensor | None, initial_Z: Tensor | None, cu_seqlens: Tensor | None,
    objective: int, p: float, delta: float, scale: float, l2norm: bool, retention_first: bool, gate_log: bool,
    states_every: int, states_rows: int, save_ckpt: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(o, final_S, final_Z, states, ckpt_S, ckpt_Z); see retain.ops.memory_scan. Unused outputs
    (final_Z without momentum, states without states_every, checkpoints without save_ckpt) are empty."""
    _require_kernel(q)
    q, k, v, beta, g, eta, initial_S, initial_Z, cu_seqlens = _contig(q, k, v, beta, g, eta, initial_S, initial_Z,
                                                                      cu_seqlens)
    outs = _ms_outputs(q, v, eta, cu_seqlens, states_every, states_rows, save_ckpt, _native.empty_like)
    o, final_S, final_Z, states, ckpt_S, ckpt_Z = outs
    d = _ms_params(q, k, v, beta, g, eta, initial_S, initial_Z, cu_seqlens, objective, p, delta, scale, l2norm,
                   retention_first, gate_log, states_every, states_rows)
    d.update(o=o.data_ptr(), final_S=final_S.data_ptr(), final_Z=_ptr(final_Z if eta is not None else None),
             states=_ptr(states if states_every > 0 else None),
             ckpt_S=_ptr(ckpt_S if save_ckpt else None), ckpt_Z=_ptr(ckpt_Z if save_ckpt and eta is not None else None))
    if o.numel() or final_S.numel():
        code = _native.DTYPE_CODES[q.dtype]
        if q.device.type == "cpu":
            _native.lib().memory_scan_fwd_cpu(code, d, _native.num_threads())
        else:
            with torch.cuda.device(q.device):
                _native.lib().memory_scan_fwd_cuda(code, d, _native.cuda_stream(q.device))
    return outs


@memory_scan_op.register_fake
def _(q, k, v, beta, g, eta, initial_S, initial_Z, cu_seqlens, objective, p, delta, scale, l2norm,
      retention_first, gate_log, states_every, states_rows, save_ckpt):
    return _ms_outputs(q, v, eta, cu_seqlens, states_every, states_rows, save_ckpt, _native.fake_empty_like)


@torch.library.custom_op("retain::memory_scan_backward", mutates_args=())
def memory_scan_backward_op(
    grad_o: Tensor, grad_final_S: Tensor | None, grad_final_Z: Tensor | None, grad_states: Tensor | None,
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, eta: Tensor | None,
    initial_S: Tensor | None, initial_Z: Tensor | None, cu_seqlens: Tensor | None, ckpt_S: Tensor, ckpt_Z: Tensor,
    objective: int, p: float, delta: float, scale: float, l2norm: bool, retention_first: bool, gate_log: bool,
    states_every: int, states_rows: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (q, k, v, beta, g, eta, initial_S, initial_Z) of memory_scan; those of absent
    inputs are empty. Recomputes states chunk by chunk from the checkpoints (csrc/scan/README.md)."""
    _require_kernel(q)
    q, k, v, beta, g, eta, initial_S, initial_Z, cu_seqlens, ckpt_S, ckpt_Z = _contig(
        q, k, v, beta, g, eta, initial_S, initial_Z, cu_seqlens, ckpt_S, ckpt_Z)
    grad_o, grad_final_S, grad_final_Z, grad_states = _contig(grad_o, grad_final_S, grad_final_Z, grad_states)
    grads = _ms_grad_buffers(q, k, v, beta, g, eta, initial_S, initial_Z, _native.empty_like)
    d = _ms_params(q, k, v, beta, g, eta, initial_S, initial_Z, cu_seqlens, objective, p, delta, scale, l2norm,
                   retention_first, gate_log, states_every, states_rows)
    d.update(ckpt_S=ckpt_S.data_ptr(), ckpt_Z=_ptr(ckpt_Z if eta is not None else None))
    names = ("grad_q", "grad_k", "grad_v", "grad_beta", "grad_g", "grad_eta", "grad_initial_S", "grad_initial_Z")
    gd = {name: _ptr(t if t.numel() else None) for name, t in zip(names, grads)}
    gd.update(grad_o=grad_o.data_ptr(), grad_final_S=_ptr(grad_final_S), grad_final_Z=_ptr(grad_final_Z),
              grad_states=_ptr(grad_states), empty=grad_o.numel() == 0)
    dS0, dZ0 = grads[6], grads[7]
    if grad_o.numel() or dS0.numel():
        code = _native.DTYPE_CODES[q.dtype]
        if q.device.type == "cpu":
            _native.lib().memory_scan_bwd_cpu(code, d, gd, _native.num_threads())
        else:
            _backward_cuda(code, d, gd, q, v, g, eta, cu_seqlens)
    return grads


def _backward_cuda(code, d, gd, q, v, g, eta, cu_seqlens):
    """The CUDA backward with its workspace: per-V-tile partial sums of the row reductions (added
    in a fixed order afterwards, so results are deterministic) and one chunk of recomputed states
    per block; its size comes from the native side, which owns the launch geometry."""
    lib = _native.lib()
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else B
    numel = lib.memory_scan_cuda_work_numel(B, T, H, K, V, N, d["ckpt_every"], eta is not None, g is not None)
    work = torch.empty(numel, dtype=acc_dtype(q.dtype), device=q.device)
    with torch.cuda.device(q.device):
        lib.memory_scan_bwd_cuda(code, d, gd, work.data_ptr(), numel, _native.cuda_stream(q.device))


def _ms_grad_buffers(q, k, v, beta, g, eta, initial_S, initial_Z, empty):
    nothing = lambda: q.new_empty(0)  # noqa: E731
    acc_nothing = lambda: q.new_empty(0, dtype=acc_dtype(q.dtype))  # noqa: E731
    momentum = eta is not None
    return (empty(q), empty(k), empty(v), empty(beta), empty(g) if g is not None else nothing(),
            empty(eta) if momentum else nothing(),
            empty(initial_S) if initial_S is not None else acc_nothing(),
            empty(initial_Z) if (momentum and initial_Z is not None) else acc_nothing())


@memory_scan_backward_op.register_fake
def _(grad_o, grad_final_S, grad_final_Z, grad_states, q, k, v, beta, g, eta, initial_S, initial_Z, cu_seqlens,
      ckpt_S, ckpt_Z, objective, p, delta, scale, l2norm, retention_first, gate_log, states_every, states_rows):
    return _ms_grad_buffers(q, k, v, beta, g, eta, initial_S, initial_Z, _native.fake_empty_like)


def _ms_setup_context(ctx, inputs, output):
    q, k, v, beta, g, eta, initial_S, initial_Z, cu_seqlens = inputs[:9]
    ctx.scalars = inputs[9:18]
    _, _, _, _, ckpt_S, ckpt_Z = output
    ctx.mark_non_differentiable(ckpt_S, ckpt_Z)
    ctx.save_for_backward(q, k, v, beta, g, eta, initial_S, initial_Z, cu_seqlens, ckpt_S, ckpt_Z)
    ctx.has = (g is not None, eta is not None, initial_S is not None, initial_Z is not None)


def _ms_backward(ctx, grad_o, grad_final_S, grad_final_Z, grad_states, _gc1, _gc2):
    q, k, v, beta, g, eta, initial_S, initial_Z, cu_seqlens, ckpt_S, ckpt_Z = ctx.saved_tensors
    if ckpt_S.numel() == 0 and q.shape[1] > 0:
        raise RuntimeError("retain::memory_scan: backward without saved checkpoints (the forward ran with "
                           "save_ckpt=False); call retain.ops.memory_scan, which sets it when grad is needed")
    objective, p, delta, scale, l2norm, retention_first, gate_log, states_every, states_rows = ctx.scalars
    if grad_o is None:
        grad_o = torch.zeros_like(q[..., :1].expand(*q.shape[:3], v.shape[-1]))
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


memory_scan_op.register_autograd(_ms_backward, setup_context=_ms_setup_context)
