"""Pure-PyTorch references of the fisher family (the tests' oracle and the custom ops' fallback).

Every function is functional (returns new tensors; the in-place ops copy the result back), loops
over the lists in Python, and computes in float64: the math of csrc/fisher/README.md written
plainly. A gradient list holds, per tensor, either the tensor's shape (one gradient) or
``(S, *shape)`` (S per-sample gradients, summed)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

F64 = torch.float64


def _samples(g: Tensor, like: Tensor) -> Tensor:
    """``g`` as ``[S, *like.shape]`` in float64 (S = 1 for a single gradient)."""
    g = g.to(F64)
    return g.unsqueeze(0) if g.shape == like.shape else g


def grad_moments_ref(grads: Sequence[Tensor], first: Sequence[Tensor] | None, second: Sequence[Tensor] | None, *,
                     decay: float = 1.0, scale: float = 1.0, power: int = 2) -> tuple[list[Tensor], list[Tensor]]:
    """``(first', second')``: first' = decay·first + scale·Σ_s g_s, second' = decay·second +
    scale·Σ_s φ(g_s), φ(g) = g² (power 2) or |g| (power 1); an absent list gives []."""
    new_first, new_second = [], []
    for i, g in enumerate(grads):
        like = (first or second)[i]
        gs = _samples(g, like)
        if first:
            new_first.append((decay * first[i].to(F64) + scale * gs.sum(0)).to(first[i].dtype))
        if second:
            term = gs.square() if power == 2 else gs.abs()
            new_second.append((decay * second[i].to(F64) + scale * term.sum(0)).to(second[i].dtype))
    return new_first, new_second


def fisher_accumulate_ref(fisher, grads, *, decay=1.0, scale=1.0) -> list[Tensor]:
    """F ← decay·F + scale·Σ_s g_s² per tensor (returns the new F)."""
    return grad_moments_ref(grads, None, fisher, decay=decay, scale=scale, power=2)[1]


def mas_accumulate_ref(importance, grads, *, decay=1.0, scale=1.0) -> list[Tensor]:
    """Ω ← decay·Ω + scale·Σ_s |g_s| per tensor."""
    return grad_moments_ref(grads, None, importance, decay=decay, scale=scale, power=1)[1]


def rank1_accumulate_ref(mu_sum, sq_sum, grads) -> tuple[list[Tensor], list[Tensor]]:
    """(mu_sum + Σ_s g_s, sq_sum + Σ_s g_s²); sq_sum None gives []."""
    return grad_moments_ref(grads, mu_sum, sq_sum, power=2)


def rank1_dots_ref(mu: Sequence[Tensor], grads: Sequence[Tensor]) -> Tensor:
    """float64 ``[S]``: μᵀg_s over every tensor of the lists."""
    dots = None
    for m, g in zip(mu, grads):
        gs = _samples(g, m)
        d = gs.reshape(gs.shape[0], -1) @ m.to(F64).reshape(-1)
        dots = d if dots is None else dots + d
    return dots if dots is not None else torch.zeros(0, dtype=F64)


def rank1_coefficient_ref(mu, grads) -> Tensor:
    """float64 0-dim: Σ_s (μᵀg_s)², the numerator of c* = E[(μᵀg)²] / ‖μ‖⁴."""
    return rank1_dots_ref(mu, grads).square().sum()


def ewc_penalty_ref(params, anchors, *, diag=None, mu=None, c=0.0, lam=1.0) -> Tensor:
    """lam/2 · [Σ F ⊙ Δ² + c · (μᵀΔ)²], Δ = θ − θ*, float64, differentiable."""
    quad = torch.zeros((), dtype=F64)
    dot = torch.zeros((), dtype=F64)
    for i, (p, a) in enumerate(zip(params, anchors)):
        d = p.to(F64) - a.to(F64)
        if diag is not None:
            quad = quad + (diag[i].to(F64) * d.square()).sum()
        if mu is not None:
            dot = dot + (mu[i].to(F64) * d).sum()
    return lam / 2 * (quad + c * dot.square())


def ewc_penalty_grads_ref(params, anchors, *, diag=None, mu=None, c=0.0, lam=1.0) -> list[Tensor]:
    """∂ penalty / ∂θ_i = lam · [F_i ⊙ Δ_i + c (μᵀΔ) μ_i], in each parameter's dtype."""
    dot = sum(((m.to(F64) * (p.to(F64) - a.to(F64))).sum() for m, p, a in zip(mu, params, anchors)),
              torch.zeros((), dtype=F64)) if mu is not None else None
    out = []
    for i, (p, a) in enumerate(zip(params, anchors)):
        g = torch.zeros(p.shape, dtype=F64)
        if diag is not None:
            g = g + diag[i].to(F64) * (p.to(F64) - a.to(F64))
        if mu is not None:
            g = g + c * dot * mu[i].to(F64)
        out.append((lam * g).to(p.dtype))
    return out


def si_accumulate_ref(omega, grads, params_before, params_after) -> list[Tensor]:
    """ω − g ⊙ (θ_after − θ_before) per tensor."""
    return [(w.to(F64) - g.to(F64) * (b.to(F64) - a.to(F64))).to(w.dtype)
            for w, g, a, b in zip(omega, grads, params_before, params_after)]


def si_consolidate_ref(importance, omega, params, anchors, *, xi=1e-3) -> list[Tensor]:
    """Ω + ω / ((θ − θ*)² + ξ) per tensor."""
    return [(big.to(F64) + w.to(F64) / ((p.to(F64) - a.to(F64)).square() + xi)).to(big.dtype)
            for big, w, p, a in zip(importance, omega, params, anchors)]
