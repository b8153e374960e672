"""``retain.ops.si_accumulate_``: Synaptic Intelligence's path integral over one optimiser step,
for lists of parameters in one native pass (custom op ``retain::si_accumulate_``;
csrc/fisher/README.md)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from retain.ops import _dispatch
from retain.ops.fisher import _lists, reference

_OP = "si_accumulate"


def si_accumulate_(omega: Sequence[Tensor], grads: Sequence[Tensor], params_before: Sequence[Tensor],
                   params_after: Sequence[Tensor]) -> Sequence[Tensor]:
    r"""Add one step's contribution to SI's per-parameter path integral, in place::

        ω_i ← ω_i − g_i ⊙ (θ_i^after − θ_i^before)

    (Zenke, Poole & Ganguli, 2017): g the gradient the step used, θ^before/θ^after the parameters
    around ``optimizer.step()``. For plain SGD (Δθ = −lr·g) each step adds lr·g² ≥ 0. Which
    gradient to pass (the task loss's or the total's, penalty included) is the caller's choice;
    ``retain.cl.SI`` passes the task loss's, as the paper.

    Args:
        omega: float32/float64 contiguous tensors updated in place (one per parameter).
        grads, params_before, params_after: ``omega[i]``'s shape; grads any floating dtype;
            params_before and params_after one dtype per tensor (the parameter's). Same device.

    Returns:
        ``omega`` (updated).

    Examples::

        >>> w = [torch.zeros(2)]
        >>> before, after = [torch.tensor([1.0, 1.0])], [torch.tensor([0.9, 1.2])]
        >>> retain.ops.si_accumulate_(w, [torch.tensor([1.0, 0.5])], before, after)   # −g·Δθ
        [tensor([ 0.1000, -0.1000])]
    """
    op = "retain.ops.si_accumulate_"
    omega = _lists.check_list(op, "omega", omega)
    grads = _lists.check_list(op, "grads", grads, ref_name="omega", ref=omega)
    before = _lists.check_list(op, "params_before", params_before, ref_name="omega", ref=omega)
    after = _lists.check_list(op, "params_after", params_after, ref_name="omega", ref=omega)
    _lists.check_state(op, "omega", omega, updated=True)
    for name, xs in (("grads", grads), ("params_before", before), ("params_after", after)):
        _lists.check_data(op, name, xs)
        _lists.check_shapes(op, name, xs, "omega", omega)
    _lists.check_same_dtype(op, "params_after", after, "params_before", before)
    _lists.check_device(op, {"omega": omega, "grads": grads, "params_before": before, "params_after": after})
    if omega:
        si_accumulate_op(omega, grads, before, after)
    return omega


@torch.library.custom_op("retain::si_accumulate_", mutates_args=("omega",))
def si_accumulate_op(omega: list[Tensor], grads: list[Tensor], params_before: list[Tensor],
                     params_after: list[Tensor]) -> None:
    """ω <- ω − g (after − before). This body is the fallback, by the reference."""
    _dispatch.fallback(_OP, omega[0])
    with torch.no_grad():
        for w, v in zip(omega, reference.si_accumulate_ref(omega, grads, params_before, params_after)):
            w.copy_(v)


@si_accumulate_op.register_fake
def _(omega, grads, params_before, params_after):
    return None


def _kernel(omega, grads, params_before, params_after):
    device = omega[0].device
    # the kernel reads one data dtype per call: gradients in the parameters' dtype (as autograd makes them)
    grads = [g.to(p.dtype).contiguous() for g, p in zip(grads, params_before)]
    before, after = _lists.contiguous(params_before), _lists.contiguous(params_after)
    numels = [w.numel() for w in omega]
    for (data_dtype, state_dtype), idx in _lists.groups(before, omega).items():
        tab = _lists.table([omega, grads, before, after], idx, numels, device)
        _lists.call("si_accumulate", device, tab, data_dtype, state_dtype)


_dispatch.register_kernels(si_accumulate_op, _OP, _kernel)
