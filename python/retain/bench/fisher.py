"""Benchmark cases of the fisher family (``retain.ops.fisher``) for ``retain bench``: the
multi-tensor consolidation ops on a model-sized parameter list (default 49.5M float32 parameters
in 200 tensors), each against the two ways people write them today — ``eager``, a Python loop of torch ops per
parameter (Avalanche's and Mammoth's EWC), and ``foreach``, ``torch._foreach_*`` calls — and that
loop under torch.compile.

In-place ops are timed on a state of their own per implementation (copied when it is built), so
the first call of each starts from the same values and is what the correctness check compares.
"""

from __future__ import annotations

from typing import Any

import torch

from retain.bench.harness import Unsupported, fresh_compile
from retain.bench.registry import Case, Impl, Runner, cost_model, itemsize, register
from retain.ops import ewc_penalty, ewc_penalty_grad_, fisher_accumulate_
from retain import _native

_SIZES = {
    # 100 matrices 700×700 and 100 vectors of 500–5450 elements: 49.5M parameters in 200 tensors
    "default": {"tensors": 200, "matrix": 700, "dtype": "float32"},
    "small": {"tensors": 10, "matrix": 40, "dtype": "float32"},
    # twice the matrices' rows: 98.5M parameters (2 GB of float32 state per op call)
    "large": {"tensors": 200, "matrix": 990, "dtype": "float32"},
}


def _shapes(p: dict[str, Any]) -> list[tuple[int, ...]]:
    m = p["matrix"]
    return [(m, m) if i % 2 == 0 else (500 + 50 * (i // 2) * m // 700,) for i in range(p["tensors"])]


def _numel(p: dict[str, Any]) -> int:
    total = 0
    for s in _shapes(p):
        n = 1
        for d in s:
            n *= d
        total += n
    return total


def _lists(p: dict[str, Any], device: str) -> dict[str, list[torch.Tensor]]:
    gen = torch.Generator(device).manual_seed(0)
    dtype = getattr(torch, p["dtype"])

    def make(positive=False, scale=1.0):
        out = []
        for s in _shapes(p):
            t = torch.randn(s, generator=gen, device=device, dtype=dtype) * scale
            out.append(t.abs_() if positive else t)
        return out

    params = make()
    return {"params": params, "anchors": [t + 0.01 for t in params], "fisher": make(positive=True),
            "mu": make(scale=1e-3), "grads": make(scale=1e-2)}


def _state_runner(step, state, out) -> Runner:
    """fwd = ``step()`` mutating ``state`` (this implementation's own copy); the check sees a copy
    of ``out()`` taken right after the warm-up call."""
    return Runner(fwd=lambda: (step(), out())[1], to_ref=lambda res: [t.clone() for t in res])


def _own(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.clone() for t in ts]


# --------------------------------------------------------------------------------------------
# fisher_accumulate_: F ← γ·F + g² over the whole list (online EWC's decayed Fisher)
# --------------------------------------------------------------------------------------------

_DECAY = 0.9


def _fa_retain(inputs, params, device):
    if not _native.has_kernel("grad_moments", device):
        raise Unsupported(f"no grad_moments kernel for {device} in this build")
    F, g = _own(inputs["fisher"]), inputs["grads"]
    return _state_runner(lambda: fisher_accumulate_(F, g, decay=_DECAY), F, lambda: F)


def _fa_loop_step(F, g):
    for f, gi in zip(F, g):  # Avalanche / Mammoth: a torch op (and a temporary) per parameter
        f.mul_(_DECAY).add_(gi.pow(2))


def _fa_loop(inputs, params, device):
    F, g = _own(inputs["fisher"]), inputs["grads"]
    return _state_runner(lambda: _fa_loop_step(F, g), F, lambda: F)


def _fa_foreach(inputs, params, device):
    F, g = _own(inputs["fisher"]), inputs["grads"]

    def step():
        torch._foreach_mul_(F, _DECAY)
        torch._foreach_addcmul_(F, g, g)

    return _state_runner(step, F, lambda: F)


def _fa_compile(inputs, params, device):
    F, g = _own(inputs["fisher"]), inputs["grads"]
    fn = fresh_compile(_fa_loop_step, params)
    return _state_runner(lambda: fn(F, g), F, lambda: F)


register(Case(
    name="fisher_accumulate_",
    family="fisher",
    sizes=_SIZES,
    make_inputs=_lists,
    describe=lambda p: f"{_numel(p) / 1e6:.1f}M {p['dtype']} parameters in {p['tensors']} tensors, decay {_DECAY}",
    # the bytes it must move: F and g read, F written
    bytes_model={"fwd": lambda p: 3 * _numel(p) * itemsize(p)},
    impls={
        "retain": Impl(_fa_retain, "retain.ops.fisher_accumulate_: one native pass over all tensors"),
        "eager": Impl(_fa_loop, "per-parameter loop f.mul_(γ).add_(g.pow(2)) (Avalanche/Mammoth style)"),
        "foreach": Impl(_fa_foreach, "torch._foreach_mul_(F, γ); torch._foreach_addcmul_(F, g, g)"),
        "compile": Impl(_fa_compile, "the loop under torch.compile(fullgraph, inductor); warm-up = compile", jit=True),
    },
    model_note="GB/s from the bytes it must move: F and g read, F written (3 element transfers)",
    rtol=1e-5, atol=1e-6,
))


# --------------------------------------------------------------------------------------------
# ewc_penalty: diagonal + rank-1, with autograd (fwd: the value; fwd+bwd: ∂/∂θ)
# --------------------------------------------------------------------------------------------

_LAM, _C = 2.0, 0.5


def _penalty_loop(params, anchors, fisher, mu):
    quad = 0.0
    dot = 0.0
    for p, a, f, m in zip(params, anchors, fisher, mu):
        d = p - a
        quad = quad + (f * d * d).sum()
        dot = dot + (m * d).sum()
    return _LAM / 2 * (quad + _C * dot * dot)


def _penalty_foreach(params, anchors, fisher, mu):
    d = torch._foreach_sub(params, anchors)
    quad = torch.stack([t.sum() for t in torch._foreach_mul(torch._foreach_mul(d, fisher), d)]).sum()
    dot = torch.stack([t.sum() for t in torch._foreach_mul(d, mu)]).sum()
    return _LAM / 2 * (quad + _C * dot * dot)


def _penalty_retain(params, anchors, fisher, mu):
    return ewc_penalty(params, anchors, diag=fisher, mu=mu, c=_C, lam=_LAM)


def _penalty_impl(fn, compiled=False, kernel=None):
    def build(inputs, params, device):
        if kernel and not _native.has_kernel(kernel, device):
            raise Unsupported(f"no {kernel} kernel for {device} in this build")
        f = fresh_compile(fn, params) if compiled else fn
        plain = inputs["params"]
        leaves = [t.detach().clone().requires_grad_() for t in plain]
        rest = (inputs["anchors"], inputs["fisher"], inputs["mu"])
        return Runner(fwd=lambda: f(plain, *rest).double(),
                      fwdbwd=lambda: torch.autograd.grad(f(leaves, *rest), leaves),
                      to_ref=lambda out: out if isinstance(out, torch.Tensor) else [torch.cat([g.reshape(-1) for g in out])])

    return build


register(Case(
    name="ewc_penalty",
    family="fisher",
    sizes=_SIZES,
    make_inputs=_lists,
    describe=lambda p: f"{_numel(p) / 1e6:.1f}M {p['dtype']} parameters in {p['tensors']} tensors, diagonal + rank-1",
    # the bytes it must move: θ, θ*, F, μ read (fwd); fwd+bwd reads them again and writes ∂/∂θ
    bytes_model=cost_model(lambda p: _numel(p) * itemsize(p), fwd=4, fwdbwd=9),
    impls={
        "retain": Impl(_penalty_impl(_penalty_retain, kernel="ewc_penalty"),
                       "retain.ops.ewc_penalty: one native pass forward, one backward"),
        "eager": Impl(_penalty_impl(_penalty_loop), "per-parameter loop of torch ops (Avalanche style) + μᵀΔ term"),
        "foreach": Impl(_penalty_impl(_penalty_foreach), "torch._foreach_sub/_foreach_mul, per-tensor sums"),
        "compile": Impl(_penalty_impl(_penalty_loop, compiled=True),
                        "the loop under torch.compile(fullgraph, inductor); warm-up = compile", jit=True),
    },
    grad_names=("grad_params",),
    model_note="GB/s from the bytes it must move: θ, θ*, F, μ read (fwd, 4 element transfers); fwd+bwd also "
               "reads them for the gradient and writes it (9)",
    rtol=1e-4, atol=1e-5,
))


# --------------------------------------------------------------------------------------------
# ewc_penalty_grad_: lam·F⊙(θ − θ*) added into .grad, no graph (Mammoth's EWC form), diagonal
# --------------------------------------------------------------------------------------------


def _grad_retain(inputs, params, device):
    if not _native.has_kernel("ewc_penalty", device):
        raise Unsupported(f"no ewc_penalty kernel for {device} in this build")
    G = _own(inputs["grads"])
    p, a, F = inputs["params"], inputs["anchors"], inputs["fisher"]
    return _state_runner(lambda: ewc_penalty_grad_(p, a, diag=F, lam=_LAM, grads=G), G, lambda: G)


def _grad_loop_step(G, p, a, F):
    for g, pi, ai, f in zip(G, p, a, F):  # Mammoth: penalty and gradient per parameter
        g.add_(_LAM * f * (pi - ai))


def _grad_loop(inputs, params, device):
    G = _own(inputs["grads"])
    p, a, F = inputs["params"], inputs["anchors"], inputs["fisher"]
    return _state_runner(lambda: _grad_loop_step(G, p, a, F), G, lambda: G)


def _grad_foreach(inputs, params, device):
    G = _own(inputs["grads"])
    p, a, F = inputs["params"], inputs["anchors"], inputs["fisher"]

    def step():
        d = torch._foreach_sub(p, a)
        torch._foreach_mul_(d, F)
        torch._foreach_add_(G, d, alpha=_LAM)

    return _state_runner(step, G, lambda: G)


def _grad_compile(inputs, params, device):
    G = _own(inputs["grads"])
    p, a, F = inputs["params"], inputs["anchors"], inputs["fisher"]
    fn = fresh_compile(_grad_loop_step, params)
    return _state_runner(lambda: fn(G, p, a, F), G, lambda: G)


register(Case(
    name="ewc_penalty_grad_",
    family="fisher",
    sizes=_SIZES,
    make_inputs=_lists,
    describe=lambda p: f"{_numel(p) / 1e6:.1f}M {p['dtype']} parameters in {p['tensors']} tensors, diagonal, "
                       "into .grad",
    # the bytes it must move: θ, θ*, F and .grad read, .grad written
    bytes_model={"fwd": lambda p: 5 * _numel(p) * itemsize(p)},
    impls={
        "retain": Impl(_grad_retain, "retain.ops.ewc_penalty_grad_: value and gradient in one native pass"),
        "eager": Impl(_grad_loop, "per-parameter loop g.add_(λ·F·(θ − θ*)) (Mammoth style; no value)"),
        "foreach": Impl(_grad_foreach, "torch._foreach_sub, _foreach_mul_, _foreach_add_ (no value)"),
        "compile": Impl(_grad_compile, "the loop under torch.compile(fullgraph, inductor); warm-up = compile",
                        jit=True),
    },
    model_note="GB/s from the bytes it must move: θ, θ*, F, .grad read and .grad written (5 element transfers); "
               "retain also returns the penalty's value, the peers do not",
    rtol=1e-5, atol=1e-6,
))
