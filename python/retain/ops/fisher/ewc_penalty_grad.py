"""``retain.ops.ewc_penalty_grad_``: the EWC penalty's gradient added straight into ``.grad``, no
autograd graph, and its value (custom op ``retain::ewc_penalty_grad_``): one native pass for a
diagonal Fisher, two with a rank-1 term (μᵀΔ is needed before any gradient element)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from retain.ops import _dispatch
from retain.ops.fisher import _lists, reference
from retain.ops.fisher.ewc_penalty import EwcArgs, grads_into, sums

_OP = "ewc_penalty"


def ewc_penalty_grad_(params: Sequence[Tensor], anchors: Sequence[Tensor], *,
                      diag: Sequence[Tensor] | None = None, mu: Sequence[Tensor] | None = None,
                      c: float | Tensor | None = None, lam: float = 1.0,
                      grads: Sequence[Tensor] | None = None) -> Tensor:
    r"""Add the EWC penalty's gradient into the parameters' ``.grad`` and return the penalty::

        θ_i.grad += lam · [F_i ⊙ Δ_i + c (μᵀΔ) μ_i],   returns lam/2 · [Σ F Δ² + c (μᵀΔ)²]

    the same value and gradient as :func:`ewc_penalty`, without building a graph: call it after
    ``loss.backward()`` and before ``optimizer.step()`` (Mammoth's form of EWC, without its
    per-parameter Python loop). A ``.grad`` that is None starts at zero.

    Args:
        params, anchors, diag, mu, c, lam: as in :func:`ewc_penalty`.
        grads: the tensors to add into instead of ``p.grad`` (``params[i]``'s shape and dtype,
            contiguous); default the parameters' ``.grad``.

    Returns:
        float64 0-dim tensor (detached), the penalty.

    Examples::

        >>> w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
        >>> value = retain.ops.ewc_penalty_grad_([w], [torch.zeros(2)], diag=[torch.tensor([1.0, 0.5])])
        >>> value, w.grad                                                      # F ⊙ Δ
        (tensor(1.5000, dtype=torch.float64), tensor([1., 1.]))
    """
    op = "retain.ops.ewc_penalty_grad_"
    params = _lists.check_list(op, "params", params)
    a = EwcArgs(op, [p.detach() for p in params], anchors, diag, mu, c, lam)
    if grads is None:
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p, memory_format=torch.contiguous_format)
        grads = [p.grad for p in params]
        label = "params[{}].grad"
    else:
        label = "grads[{}]"
    grads = _lists.check_list(op, "grads", grads, ref_name="params", ref=a.params)
    _lists.check_shapes(op, "grads", grads, "params", a.params)
    _lists.check_same_dtype(op, "grads", grads, "params", a.params)
    _lists.check_device(op, {"params": a.params, "grads": grads})
    for i, g in enumerate(grads):
        if not g.is_contiguous():
            raise ValueError(f"{op}: {label.format(i)} must be contiguous (it is added into in place), "
                             f"got strides {g.stride()}")
    if not a.params:
        return torch.zeros((), dtype=torch.float64)
    return ewc_penalty_grad_op(grads, a.params, a.anchors, a.diag or [], a.mu or [], a.c, a.lam)


@torch.library.custom_op("retain::ewc_penalty_grad_", mutates_args=("grads",))
def ewc_penalty_grad_op(grads: list[Tensor], params: list[Tensor], anchors: list[Tensor], diag: list[Tensor],
                        mu: list[Tensor], c: float, lam: float) -> Tensor:
    """grads += the penalty's gradient; returns the penalty. This body is the fallback, by the
    reference."""
    _dispatch.fallback(_OP, params[0])
    kw = dict(diag=diag or None, mu=mu or None, c=c, lam=lam)
    with torch.no_grad():
        for g, v in zip(grads, reference.ewc_penalty_grads_ref(params, anchors, **kw)):
            g.add_(v.to(g.device))
    return reference.ewc_penalty_ref(params, anchors, **kw).to(params[0].device)


def _kernel(grads, params, anchors, diag, mu, c, lam):
    device = params[0].device
    if mu:  # μᵀΔ first (reads θ, θ*, μ), then the gradient with the diagonal sum (reads all, adds into grads)
        dot = sums(params, anchors, [], mu)[1]
        coef = torch.stack((torch.tensor(lam, dtype=torch.float64, device=device), lam * c * dot))
    else:
        dot = torch.zeros((), dtype=torch.float64, device=device)
        coef = torch.tensor([lam, 0.0], dtype=torch.float64, device=device)
    quad = grads_into(grads, True, params, anchors, diag, mu, coef, with_quad=bool(diag))
    if quad is None:
        quad = torch.zeros((), dtype=torch.float64, device=device)
    return lam / 2 * (quad + c * dot.square())


@ewc_penalty_grad_op.register_fake
def _(grads, params, anchors, diag, mu, c, lam):
    return params[0].new_empty((), dtype=torch.float64)


_dispatch.register_kernels(ewc_penalty_grad_op, _OP, _kernel)
