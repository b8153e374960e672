"""``retain.ops.si_consolidate_``: Synaptic Intelligence's importance at the end of a task, for
lists of parameters in one native pass (custom op ``retain::si_consolidate_``;
csrc/fisher/README.md)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from retain.ops import _dispatch
from retain.ops._checks import check_number
from retain.ops.fisher import _lists, reference

_OP = "si_consolidate"


def si_consolidate_(importance: Sequence[Tensor], omega: Sequence[Tensor], params: Sequence[Tensor],
                    anchors: Sequence[Tensor], *, xi: float = 1e-3, reset: bool = True) -> Sequence[Tensor]:
    r"""Fold a task's path integral into SI's importance, in place::

        Ω_i ← Ω_i + ω_i / ((θ_i − θ*_i)² + ξ)        and, with ``reset``, ω_i ← 0

    θ the parameters at the end of the task, θ* those at its start (the previous anchor), ξ the
    damping that keeps parameters that did not move from dividing by zero (Zenke et al., 2017).
    SI's penalty is then c·Σ Ω (θ − θ*_new)², i.e. ``ewc_penalty(params, anchors, diag=Ω,
    lam=2c)``.

    Args:
        importance, omega: float32/float64 contiguous tensors updated in place (one per parameter,
            same dtype per tensor).
        params, anchors: ``importance[i]``'s shape, one dtype per tensor, any floating dtype.
        xi: the damping ξ > 0.
        reset: zero ω in the same pass (the next task's integral starts at 0).

    Returns:
        ``importance`` (updated).

    Examples::

        >>> big, w = [torch.zeros(2)], [torch.tensor([0.3, 0.0])]
        >>> retain.ops.si_consolidate_(big, w, [torch.tensor([1.0, 2.0])], [torch.tensor([0.0, 2.0])], xi=0.5)
        [tensor([0.2000, 0.0000])]
        >>> w
        [tensor([0., 0.])]
    """
    op = "retain.ops.si_consolidate_"
    importance = _lists.check_list(op, "importance", importance)
    omega = _lists.check_list(op, "omega", omega, ref_name="importance", ref=importance)
    params = _lists.check_list(op, "params", params, ref_name="importance", ref=importance)
    anchors = _lists.check_list(op, "anchors", anchors, ref_name="importance", ref=importance)
    xi = check_number(op, "xi", xi)
    if not xi > 0:
        raise ValueError(f"{op}: xi must be > 0 (it keeps parameters that did not move finite), got {xi}")
    if not isinstance(reset, bool):
        raise TypeError(f"{op}: reset must be a bool, got {type(reset).__name__}")
    for name, xs in (("importance", importance), ("omega", omega)):
        _lists.check_state(op, name, xs, updated=True)
        _lists.check_shapes(op, name, xs, "importance", importance)
    _lists.check_same_dtype(op, "omega", omega, "importance", importance)
    for name, xs in (("params", params), ("anchors", anchors)):
        _lists.check_data(op, name, xs)
        _lists.check_shapes(op, name, xs, "importance", importance)
    _lists.check_same_dtype(op, "anchors", anchors, "params", params)
    _lists.check_device(op, {"importance": importance, "omega": omega, "params": params, "anchors": anchors})
    if importance:
        si_consolidate_op(importance, omega, params, anchors, xi, reset)
    return importance


@torch.library.custom_op("retain::si_consolidate_", mutates_args=("importance", "omega"))
def si_consolidate_op(importance: list[Tensor], omega: list[Tensor], params: list[Tensor], anchors: list[Tensor],
                      xi: float, reset: bool) -> None:
    """Ω <- Ω + ω / ((θ − θ*)² + ξ); ω <- 0 when reset. This body is the fallback, by the reference."""
    _dispatch.fallback(_OP, importance[0])
    with torch.no_grad():
        for big, v in zip(importance, reference.si_consolidate_ref(importance, omega, params, anchors, xi=xi)):
            big.copy_(v)
        if reset:
            for w in omega:
                w.zero_()


@si_consolidate_op.register_fake
def _(importance, omega, params, anchors, xi, reset):
    return None


def _kernel(importance, omega, params, anchors, xi, reset):
    device = importance[0].device
    params, anchors = _lists.contiguous(params), _lists.contiguous(anchors)
    numels = [t.numel() for t in importance]
    for (data_dtype, state_dtype), idx in _lists.groups(params, importance).items():
        tab = _lists.table([importance, omega, params, anchors], idx, numels, device)
        _lists.call("si_consolidate", device, tab, data_dtype, state_dtype, xi, reset)


_dispatch.register_kernels(si_consolidate_op, _OP, _kernel)
