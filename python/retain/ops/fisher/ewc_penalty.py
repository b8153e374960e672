"""``retain.ops.ewc_penalty``: the EWC penalty over lists of parameters — diagonal, rank-1 or both —
with autograd, one native pass forward and one backward (custom ops ``retain::ewc_penalty`` and
``retain::ewc_penalty_backward``; derivation in csrc/fisher/README.md)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from retain import _native
from retain.ops import _dispatch
from retain.ops._checks import check_number
from retain.ops.fisher import _lists, reference

_OP = "ewc_penalty"


class EwcArgs:
    """The checked arguments of an EWC penalty call (shared with ewc_penalty_grad_)."""

    def __init__(self, op: str, params, anchors, diag, mu, c, lam):
        self.params = _lists.check_list(op, "params", params)
        self.anchors = _lists.check_list(op, "anchors", anchors, ref_name="params", ref=self.params)
        self.diag = _lists.check_list(op, "diag", diag, ref_name="params", ref=self.params, optional=True)
        self.mu = _lists.check_list(op, "mu", mu, ref_name="params", ref=self.params, optional=True)
        if self.diag is None and self.mu is None:
            raise ValueError(f"{op}: give diag (the diagonal Fisher), mu (the rank-1 direction, with c) or both, "
                             "got neither")
        if (self.mu is None) != (c is None):
            raise ValueError(f"{op}: c (the rank-1 scale) goes with mu: got mu={'None' if self.mu is None else 'a list'} "
                             f"and c={c!r}")
        self.c = 0.0 if c is None else check_number(op, "c", c)
        self.lam = check_number(op, "lam", lam)
        _lists.check_data(op, "params", self.params)
        _lists.check_shapes(op, "anchors", self.anchors, "params", self.params)
        _lists.check_same_dtype(op, "anchors", self.anchors, "params", self.params)
        for name, xs in (("diag", self.diag), ("mu", self.mu)):
            if xs is not None:
                _lists.check_state(op, name, xs, updated=False)
                _lists.check_shapes(op, name, xs, "params", self.params)
                if torch.is_grad_enabled() and any(t.requires_grad for t in xs):
                    raise ValueError(f"{op}: {name} requires grad; the penalty is differentiated with respect to "
                                     f"params and anchors only (detach {name})")
        if self.diag is not None and self.mu is not None:
            _lists.check_same_dtype(op, "mu", self.mu, "diag", self.diag)
        _lists.check_device(op, {"params": self.params, "anchors": self.anchors, "diag": self.diag, "mu": self.mu})


def ewc_penalty(params: Sequence[Tensor], anchors: Sequence[Tensor], *, diag: Sequence[Tensor] | None = None,
                mu: Sequence[Tensor] | None = None, c: float | Tensor | None = None, lam: float = 1.0) -> Tensor:
    r"""The EWC penalty over lists of parameters, diagonal and/or rank-1 Fisher::

        P = lam/2 · [ Σ_i Σ_j F_ij Δ_ij²  +  c · (Σ_i Σ_j μ_ij Δ_ij)² ],   Δ = θ − θ*

    the quadratic form ½·lam·Δᵀ(diag(F) + c·μμᵀ)Δ (Kirkpatrick et al., 2017, with the ½ of the
    papers; Avalanche's EWC has no ½: pass ``lam = 2 × its λ``). One native pass over all tensors
    forward, one backward; gradient ∂P/∂θ_i = lam · [F_i ⊙ Δ_i + c (μᵀΔ) μ_i] = −∂P/∂θ*_i.

    Args:
        params: the parameters θ (one tensor per parameter, any floating dtype).
        anchors: θ* from the end of the last task: ``params[i]``'s shape and dtype.
        diag: the diagonal Fisher F, float32/float64 (state dtype), ``params[i]``'s shape; or None.
        mu: the rank-1 direction μ (the mean gradient), float32/float64, same dtypes as ``diag``;
            or None. Neither ``diag`` nor ``mu`` is differentiated (detach them).
        c: the rank-1 scale c* (a number or 1-element tensor), required with ``mu``.
        lam: the penalty weight λ.

    Returns:
        float64 0-dim tensor on the parameters' device, differentiable with respect to ``params``
        and ``anchors`` (double backward is refused by name).

    Examples::

        >>> theta = [torch.tensor([1.0, 2.0]), torch.tensor(3.0)]
        >>> star = [torch.zeros(2), torch.tensor(1.0)]
        >>> F = [torch.tensor([1.0, 0.5]), torch.tensor(2.0)]
        >>> retain.ops.ewc_penalty(theta, star, diag=F)                         # (1 + 2 + 8) / 2
        tensor(5.5000, dtype=torch.float64)
        >>> retain.ops.ewc_penalty(theta, star, mu=[torch.ones(2), torch.tensor(0.0)], c=2.0, lam=0.5)  # 0.25·2·3²
        tensor(4.5000, dtype=torch.float64)
    """
    a = EwcArgs("retain.ops.ewc_penalty", params, anchors, diag, mu, c, lam)
    if not a.params:
        return torch.zeros((), dtype=torch.float64)
    need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in a.params + a.anchors)
    return ewc_penalty_op(a.params, a.anchors, a.diag or [], a.mu or [], a.c, a.lam, need_grad)[0]


def sums(params, anchors, diag, mu) -> Tensor:
    """float64 [2]: (Σ F Δ², Σ μ Δ) by the forward kernel, one call per dtype group (added in
    group order)."""
    device = params[0].device
    params, anchors = _lists.contiguous(params), _lists.contiguous(anchors)
    diag, mu = _lists.contiguous(diag), _lists.contiguous(mu)
    total = torch.zeros(2, dtype=torch.float64, device=device)
    numels = [p.numel() for p in params]
    for (data_dtype, state_dtype), idx in _lists.groups(params, diag or mu).items():
        tab = _lists.table([params, anchors, diag, mu], idx, numels, device)
        partials = _native.empty_like(torch.empty(2 * max(tab[2], 1), dtype=torch.float64, device=device))
        part = _native.empty_like(total)
        _lists.call("ewc_penalty_fwd", device, tab, data_dtype, state_dtype, partials.data_ptr(), part.data_ptr())
        total += part
    return total


def grads_into(grads, accumulate, params, anchors, diag, mu, coef: Tensor, with_quad: bool) -> Tensor | None:
    """Write (or, with ``accumulate``, add) coef[0]·F⊙Δ + coef[1]·μ into ``grads``, one call per
    dtype group; with ``with_quad`` also return Σ F Δ² (float64 0-dim)."""
    device = params[0].device
    params, anchors = _lists.contiguous(params), _lists.contiguous(anchors)
    diag, mu = _lists.contiguous(diag), _lists.contiguous(mu)
    coef = coef.to(device=device, dtype=torch.float64).contiguous()
    quad = torch.zeros(2, dtype=torch.float64, device=device) if with_quad else None
    numels = [p.numel() for p in params]
    for (data_dtype, state_dtype), idx in _lists.groups(params, diag or mu).items():
        tab = _lists.table([params, anchors, diag, mu, grads], idx, numels, device)
        partials = part = None
        if with_quad:
            partials = _native.empty_like(torch.empty(2 * max(tab[2], 1), dtype=torch.float64, device=device))
            part = _native.empty_like(quad)
        _lists.call("ewc_penalty_bwd", device, tab, data_dtype, state_dtype, coef.data_ptr(), accumulate,
                    _dispatch.ptr(partials), _dispatch.ptr(part))
        if with_quad:
            quad += part
    return quad[0] if with_quad else None


@torch.library.custom_op("retain::ewc_penalty", mutates_args=())
def ewc_penalty_op(params: list[Tensor], anchors: list[Tensor], diag: list[Tensor], mu: list[Tensor], c: float,
                   lam: float, need_grad: bool) -> tuple[Tensor, Tensor, list[Tensor]]:
    """(penalty, μᵀΔ, ∂penalty/∂θ): float64 0-dim values (an empty diag or mu is absent) and, when
    ``need_grad`` and a kernel serves the device, the gradient per parameter from the same passes
    (the backward hands it out); else []. This body is the fallback, by the reference."""
    _dispatch.fallback(_OP, params[0])
    penalty = reference.ewc_penalty_ref(params, anchors, diag=diag or None, mu=mu or None, c=c, lam=lam)
    dot = sum(((m.to(torch.float64) * (p.to(torch.float64) - a.to(torch.float64))).sum()
               for m, p, a in zip(mu, params, anchors)), torch.zeros((), dtype=torch.float64))
    return penalty.to(params[0].device), dot.detach().to(params[0].device), []


def _forward(params, anchors, diag, mu, c, lam, need_grad):
    if not need_grad:  # the value only: one pass reading θ, θ*, F, μ
        s = sums(params, anchors, diag, mu)
        return lam / 2 * (s[0] + c * s[1].square()), s[1].clone(), []
    # value and gradient together: without μ one pass (θ, θ*, F read, the gradient written, ΣFΔ²
    # summed on the way); with μ a first pass for μᵀΔ
    device = params[0].device
    dot = sums(params, anchors, [], mu)[1].clone() if mu else torch.zeros((), dtype=torch.float64, device=device)
    coef = torch.stack((torch.tensor(lam, dtype=torch.float64, device=device), lam * c * dot))
    grads = [_native.empty_like(p) for p in params]
    quad = grads_into(grads, False, params, anchors, diag, mu, coef, with_quad=bool(diag))
    if quad is None:
        quad = torch.zeros((), dtype=torch.float64, device=device)
    return lam / 2 * (quad + c * dot.square()), dot, grads


@ewc_penalty_op.register_fake
def _(params, anchors, diag, mu, c, lam, need_grad):
    served = _dispatch.served(ewc_penalty_op, params[0].device)
    grads = [_native.fake_empty_like(p) for p in params] if need_grad and served else []
    return params[0].new_empty((), dtype=torch.float64), params[0].new_empty((), dtype=torch.float64), grads


@torch.library.custom_op("retain::ewc_penalty_backward", mutates_args=())
def ewc_penalty_backward_op(grad: Tensor, params: list[Tensor], anchors: list[Tensor], diag: list[Tensor],
                            mu: list[Tensor], c: float, lam: float, dot: Tensor) -> list[Tensor]:
    """grad · lam · [F ⊙ Δ + c (μᵀΔ) μ] per parameter, in its dtype. This body is the fallback."""
    _dispatch.fallback(_OP, params[0])
    g = grad.to(torch.float64)
    out = []
    for i, (p, a) in enumerate(zip(params, anchors)):
        v = torch.zeros(p.shape, dtype=torch.float64, device=p.device)
        if diag:
            v = v + diag[i].to(torch.float64) * (p.to(torch.float64) - a.to(torch.float64))
        if mu:
            v = v + c * dot * mu[i].to(torch.float64)
        out.append((g * lam * v).to(p.dtype))
    return out


def _backward(grad, params, anchors, diag, mu, c, lam, dot):
    out = [_native.empty_like(p) for p in params]
    g = grad.to(torch.float64) * lam
    grads_into(out, False, params, anchors, diag, mu, torch.stack((g, g * c * dot)), with_quad=False)
    return out


@ewc_penalty_backward_op.register_fake
def _(grad, params, anchors, diag, mu, c, lam, dot):
    return [_native.fake_empty_like(p) for p in params]


def _setup_context(ctx, inputs, output):
    params, anchors, diag, mu, c, lam, need_grad = inputs
    ctx.mark_non_differentiable(output[1], *output[2])
    ctx.set_materialize_grads(False)
    ctx.c, ctx.lam = c, lam
    ctx.save_for_backward(*params, *anchors, *diag, *mu, output[1])
    ctx.lens = (len(params), len(anchors), len(diag), len(mu))
    ctx.precomputed = list(output[2]) if output[2] else None


def _precomputed(ctx, grad_penalty: Tensor) -> list[Tensor] | None:
    """The gradient the forward computed, scaled by the incoming gradient, handed out once; None
    where it cannot be used (as _dispatch.hand_out: a second backward, tracing, or a graph of the
    backward being built)."""
    pre, ctx.precomputed = ctx.precomputed, None
    if pre is None or type(grad_penalty) is not torch.Tensor or torch.compiler.is_compiling() \
            or torch.is_grad_enabled():
        return None
    if grad_penalty.device.type != "cpu" or float(grad_penalty) != 1.0:
        for t in pre:
            t.mul_(grad_penalty.to(t.dtype))
    return pre


def _backward_rule(ctx, grad_penalty, _grad_dot, _grad_grads):
    n_p, n_a, n_d, n_m = ctx.lens
    if grad_penalty is None:
        return [None] * n_p, [None] * n_a, [None] * n_d, [None] * n_m, None, None, None
    flags = ctx.needs_input_grad
    need_p = any(flags[0]) if isinstance(flags[0], (list, tuple)) else flags[0]
    need_a = any(flags[1]) if isinstance(flags[1], (list, tuple)) else flags[1]
    gp = _precomputed(ctx, grad_penalty) if need_p or need_a else None
    if gp is None and (need_p or need_a):
        saved = list(ctx.saved_tensors)
        params, anchors = saved[:n_p], saved[n_p:n_p + n_a]
        diag, mu = saved[n_p + n_a:n_p + n_a + n_d], saved[n_p + n_a + n_d:n_p + n_a + n_d + n_m]
        gp = ewc_penalty_backward_op(grad_penalty, params, anchors, diag, mu, ctx.c, ctx.lam, saved[-1])
    gparams = list(gp) if need_p else [None] * n_p
    ganchors = [-g for g in gp] if need_a else [None] * n_a
    return gparams, ganchors, [None] * n_d, [None] * n_m, None, None, None


ewc_penalty_op.register_autograd(_backward_rule, setup_context=_setup_context)
_dispatch.register_kernels(ewc_penalty_op, _OP, _forward)
_dispatch.register_kernels(ewc_penalty_backward_op, _OP, _backward)
