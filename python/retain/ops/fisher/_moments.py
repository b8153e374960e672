"""The custom op behind fisher_accumulate_, mas_accumulate_ and rank1_accumulate_: sums of
gradients and of their squares or absolute values folded into state lists in one native pass
(csrc/fisher/grad_moments.h)."""

from __future__ import annotations

import torch
from torch import Tensor

from retain.ops import _dispatch
from retain.ops._checks import check_number
from retain.ops.fisher import _lists, reference

_OP = "grad_moments"


@torch.library.custom_op("retain::grad_moments_", mutates_args=("first", "second"))
def grad_moments_op(grads: list[Tensor], first: list[Tensor], second: list[Tensor], decay: float, scale: float,
                    power: int) -> None:
    """first <- decay first + scale Σ_s g_s, second <- decay second + scale Σ_s φ(g_s), φ = g² (power 2)
    or |g| (power 1); an empty list is absent; grads[i] is first/second[i]'s shape or (S, *shape).
    This body is the fallback, by the reference."""
    _dispatch.fallback(_OP, grads[0])
    new_first, new_second = reference.grad_moments_ref(grads, first, second, decay=decay, scale=scale, power=power)
    with torch.no_grad():
        for t, v in zip(first + second, new_first + new_second):
            t.copy_(v)


@grad_moments_op.register_fake
def _(grads, first, second, decay, scale, power):
    return None


def _kernel(grads, first, second, decay, scale, power):
    state = first or second
    samples = next((g.shape[0] for g, s in zip(grads, state) if g.dim() == s.dim() + 1), 1)
    grads = _lists.contiguous(grads)  # held until the kernels return
    numels = [s.numel() for s in state]
    device = state[0].device
    for (data_dtype, state_dtype), idx in _lists.groups(grads, state).items():
        tab = _lists.table([grads, first, second], idx, numels, device)
        _lists.call("grad_moments", device, tab, data_dtype, state_dtype, samples, decay, scale, power)


def accumulate(op: str, state_name: str, state, grads, *, first=None, first_name="", decay=1.0, scale=1.0,
               power=2):
    """Checks and the call shared by the three public ops: ``state`` (the second moment, or None)
    and ``first`` (the plain sum, or None) updated from ``grads``."""
    ref_name, ref = (first_name, first) if first is not None else (state_name, state)
    ref = _lists.check_list(op, ref_name, ref)
    if first is not None:
        state = _lists.check_list(op, state_name, state, ref_name=ref_name, ref=ref, optional=True)
    else:
        state = ref
    grads = _lists.check_list(op, "grads", grads, ref_name=ref_name, ref=ref)
    decay = check_number(op, "decay", decay)
    scale = check_number(op, "scale", scale)
    for name, xs in ((ref_name, ref), (state_name, state if first is not None else None)):
        if xs is not None:
            _lists.check_state(op, name, xs, updated=True)
            _lists.check_shapes(op, name, xs, ref_name, ref)
    if first is not None:
        _lists.check_same_dtype(op, state_name, state, ref_name, ref)
    _lists.check_data(op, "grads", grads)
    _lists.check_samples(op, "grads", grads, ref_name, ref)
    lists = {ref_name: ref, **({state_name: state} if first is not None else {}), "grads": grads}
    _lists.check_device(op, lists)
    if not ref:
        return
    if first is not None:
        grad_moments_op(grads, ref, state or [], decay, scale, power)
    else:
        grad_moments_op(grads, [], ref, decay, scale, power)


_dispatch.register_kernels(grad_moments_op, _OP, _kernel)
