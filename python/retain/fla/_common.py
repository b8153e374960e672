"""What every fla-named function shares: the options fla callers pass (reverse, state_v_first,
chunk_size, cu_seqlens_cpu, ...) mapped onto one :func:`retain.ops.scan.memory_scan.memory_scan_checked`
call, and the gate activations fla computes in its kernels (``use_gate_in_kernel``,
``use_beta_sigmoid_in_kernel``), in float32 as fla does."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from retain.ops._checks import check_bool, check_int
from retain.ops.scan.memory_scan import memory_scan_checked

# options fla accepts that change nothing on the CPU (chunking, precomputed chunk indices and a
# host copy of cu_seqlens are Triton launch details)
IGNORED = ("chunk_size", "cu_seqlens_cpu", "chunk_indices")


def check_kwargs(op: str, kwargs: dict, allowed: tuple[str, ...] = (), *, state_v_first: bool | None = None,
                 chunk_sizes: tuple[int, ...] | None = None) -> tuple[dict, bool]:
    """fla's ``**kwargs``: the launch details in :data:`IGNORED` are accepted and dropped (a
    ``chunk_size`` must still be one fla takes: ``chunk_sizes``, or any int >= 1), ``allowed`` ones
    are returned, ``transpose_state_layout`` (fla's deprecated name) sets the state layout of the
    functions that have ``state_v_first`` (given as that argument's value; None: the function has
    none); ``head_first`` (removed from fla) and anything else is an error naming the argument.
    Returns (the allowed keywords, state_v_first)."""
    out = {}
    layout = False if state_v_first is None else check_bool(op, "state_v_first", state_v_first)
    for name, value in kwargs.items():
        if name == "chunk_size":
            check_int(op, "chunk_size", value, minimum=1)
            if chunk_sizes is not None and value not in chunk_sizes:
                raise ValueError(f"{op}: chunk_size must be one of {chunk_sizes} (as fla's), got {value}")
        elif name == "head_first":
            raise TypeError(f"{op}: head_first was removed from flash-linear-attention and is not supported: pass "
                            f"[B, T, H, ...] tensors, got head_first={value!r}")
        elif name == "transpose_state_layout" and state_v_first is not None:
            if state_v_first:
                raise ValueError(f"{op}: pass state_v_first or the deprecated transpose_state_layout, not both, got "
                                 f"state_v_first=True and transpose_state_layout={value!r}")
            layout = check_bool(op, name, value)
        elif name in allowed:
            out[name] = value
        elif name not in IGNORED:
            raise TypeError(f"{op}: unexpected keyword argument {name!r}, got {name}={type(value).__name__}")
    return out, layout


def _flip(x: Tensor | None) -> Tensor | None:
    """``x`` [B, T, ...] with its steps reversed (packed sequences: the whole T is reversed, which
    also reverses the order of the sequences; :func:`scan` flips their offsets and states)."""
    return None if x is None else x.flip(1)


def scan(op: str, q: Tensor, k: Tensor, v: Tensor, beta, *, g: Tensor | None = None, objective: str,
         scale: float | None, initial_state, output_final_state: bool, cu_seqlens: Tensor | None,
         use_qk_l2norm: bool = False, reverse: bool = False, state_v_first: bool = False,
         retention_first: bool = False, names: dict | None = None) -> tuple[Tensor, Tensor | None]:
    """One memory_scan with fla's calling conventions: ``reverse`` runs every sequence from its last
    step to its first, ``state_v_first`` takes and returns states as ``[N, H, V, K]``."""
    reverse = check_bool(op, "reverse", reverse)
    state_v_first = check_bool(op, "state_v_first", state_v_first)
    if state_v_first and isinstance(initial_state, Tensor):
        initial_state = initial_state.transpose(-1, -2)
    if reverse:
        q, k, v, g = (_flip(x) for x in (q, k, v, g))
        beta = _flip(beta) if isinstance(beta, Tensor) else beta
        if cu_seqlens is not None and isinstance(cu_seqlens, Tensor):
            cu_seqlens = cu_seqlens[-1] - cu_seqlens.flip(0)
            if isinstance(initial_state, Tensor):
                initial_state = initial_state.flip(0)
    o, final, _ = memory_scan_checked(op, q, k, v, beta, g=g, objective=objective, scale=scale,
                                      initial_state=initial_state, output_final_state=output_final_state,
                                      cu_seqlens=cu_seqlens, use_qk_l2norm=use_qk_l2norm,
                                      retention_first=retention_first, names=names)
    if reverse:
        o = o.flip(1)
        if final is not None and cu_seqlens is not None:
            final = final.flip(0)
    if final is not None and state_v_first:
        final = final.transpose(-1, -2).contiguous()
    return o, final


def gdn_gate(op: str, g: Tensor, A_log: Tensor | None, dt_bias: Tensor | None) -> Tensor:
    """Gated DeltaNet's log decay from the raw ``g`` (``use_gate_in_kernel=True``):
    ``-exp(A_log) * softplus(g + dt_bias)`` per value head, in float32 (differentiable in all three)."""
    if A_log is None:
        raise ValueError(f"{op}: use_gate_in_kernel=True needs A_log [HV] (the per-head decay rate), got None")
    for name, x in (("A_log", A_log), ("dt_bias", dt_bias)):
        if x is not None and (not isinstance(x, Tensor) or x.dim() != 1 or x.shape[0] != g.shape[2]):
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{op}: {name} must have shape ({g.shape[2]},) (one per value head), got {got}")
    x = g.float() if dt_bias is None else g.float() + dt_bias.float()
    return -A_log.float().exp() * F.softplus(x)


def beta_activation(op: str, beta: Tensor, use_sigmoid: bool, allow_neg_eigval: bool) -> Tensor:
    """``sigmoid(beta)`` (``use_beta_sigmoid_in_kernel``), doubled with ``allow_neg_eigval`` (β in
    [0, 2): the transition I - βkkᵀ may have a negative eigenvalue), as fla requires the pair."""
    use_sigmoid = check_bool(op, "use_beta_sigmoid_in_kernel", use_sigmoid)
    allow_neg_eigval = check_bool(op, "allow_neg_eigval", allow_neg_eigval)
    if allow_neg_eigval and not use_sigmoid:
        raise ValueError(f"{op}: allow_neg_eigval=True requires use_beta_sigmoid_in_kernel=True (fla's rule), got "
                         "use_beta_sigmoid_in_kernel=False")
    if not use_sigmoid:
        return beta
    if not isinstance(beta, Tensor):
        raise TypeError(f"{op}: beta must be a tensor of logits with use_beta_sigmoid_in_kernel=True, got "
                        f"{type(beta).__name__}")
    b = torch.sigmoid(beta.float())
    return 2 * b if allow_neg_eigval else b


def refuse(op: str, name: str, value, why: str) -> None:
    """An fla option retain does not implement: an error that says so, never a silent difference."""
    if value is not None:
        raise NotImplementedError(f"{op}: {name} is not supported by retain ({why}), got a {type(value).__name__}")
