"""``retain.ops.rank1_coefficient``: the numerator of the rank-1 Fisher's scale c* over a chunk of
per-sample gradients, Σ_s (μᵀg_s)², in one native pass over the lists (custom op
``retain::rank1_dots``; csrc/fisher/README.md)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from retain import _native
from retain.ops import _dispatch
from retain.ops.fisher import _lists, reference

_OP = "rank1_dots"


def rank1_coefficient(mu: Sequence[Tensor], grads: Sequence[Tensor]) -> Tensor:
    r"""The rank-1 Fisher's numerator over a chunk of per-sample gradients::

        Σ_s (μᵀ g_s)²,   μᵀg_s = Σ_i Σ_j μ_{ij} g_{s,ij}  (over every tensor of the lists)

    The Frobenius-optimal scale of F ≈ c·μμᵀ is c* = E[(μᵀg)²] / ‖μ‖⁴: sum this over all chunks of
    the N samples, divide by N and by ‖μ‖⁴ (which is ``rank1_coefficient(mu, mu)``: μ as its
    own single sample). On collinear gradients g_s = a_s·μ it gives Σ a_s² ‖μ‖⁴, so c* = E[a²].

    Args:
        mu: the mean gradient, float32/float64 tensors (one per parameter).
        grads: ``(S, *mu[i].shape)`` (S per-sample gradients) or ``mu[i].shape`` (one), any
            floating dtype, same device.

    Returns:
        float64 0-dim tensor (0 for no samples), differentiable with respect to ``mu`` and
        ``grads`` (the backward is plain PyTorch, so higher orders work too).

    Examples::

        >>> mu = [torch.tensor([1.0, 0.0]), torch.tensor(2.0)]
        >>> g = [torch.tensor([[1.0, 5.0], [2.0, 0.0]]), torch.tensor([1.0, -1.0])]
        >>> retain.ops.rank1_coefficient(mu, g)                     # (1 + 2)² + (2 − 2)²
        tensor(9., dtype=torch.float64)
    """
    op = "retain.ops.rank1_coefficient"
    mu = _lists.check_list(op, "mu", mu)
    grads = _lists.check_list(op, "grads", grads, ref_name="mu", ref=mu)
    _lists.check_state(op, "mu", mu, updated=False)
    _lists.check_data(op, "grads", grads)
    samples = _lists.check_samples(op, "grads", grads, "mu", mu)
    device = _lists.check_device(op, {"mu": mu, "grads": grads})
    if not mu or samples == 0:
        return torch.zeros((), dtype=torch.float64, device=device)
    return rank1_dots_op(mu, grads, samples).square().sum()


@torch.library.custom_op("retain::rank1_dots", mutates_args=())
def rank1_dots_op(mu: list[Tensor], grads: list[Tensor], samples: int) -> Tensor:
    """float64 [samples]: μᵀg_s over every tensor. This body is the fallback, by the reference."""
    _dispatch.fallback(_OP, mu[0])
    return reference.rank1_dots_ref(mu, grads).to(mu[0].device)


def _kernel(mu, grads, samples):
    device = mu[0].device
    mu, grads = _lists.contiguous(mu), _lists.contiguous(grads)
    dots = torch.zeros(samples, dtype=torch.float64, device=device)
    numels = [m.numel() for m in mu]
    for (data_dtype, state_dtype), idx in _lists.groups(grads, mu).items():
        tab = _lists.table([mu, grads], idx, numels, device)
        partials = _native.empty_like(torch.empty(max(tab[2], 1) * samples, dtype=torch.float64, device=device))
        part = _native.empty_like(dots)
        _lists.call("rank1_dots", device, tab, data_dtype, state_dtype, samples, partials.data_ptr(), part.data_ptr())
        dots += part
    return dots


@rank1_dots_op.register_fake
def _(mu, grads, samples):
    return mu[0].new_empty(samples, dtype=torch.float64)


def _setup_context(ctx, inputs, output):
    mu, grads, samples = inputs
    ctx.n = len(mu)
    ctx.save_for_backward(*mu, *grads)


def _backward(ctx, grad_dots):
    """∂/∂μ_i = Σ_s ḡ_s g_{s,i}, ∂/∂g_{s,i} = ḡ_s μ_i (linear: plain PyTorch, differentiable again)."""
    saved = ctx.saved_tensors
    mu, grads = saved[:ctx.n], saved[ctx.n:]
    gd = grad_dots.to(torch.float64)
    g_mu, g_grads = [], []
    for m, g in zip(mu, grads):
        per_sample = g.dim() == m.dim() + 1
        gs = g.to(torch.float64).reshape(gd.shape[0], -1)
        g_mu.append((gd @ gs).reshape(m.shape).to(m.dtype))
        outer = gd[:, None] * m.to(torch.float64).reshape(1, -1)
        g_grads.append((outer.reshape(g.shape) if per_sample else outer.reshape(g.shape)).to(g.dtype))
    return g_mu, g_grads, None


rank1_dots_op.register_autograd(_backward, setup_context=_setup_context)
_dispatch.register_kernels(rank1_dots_op, _OP, _kernel)
