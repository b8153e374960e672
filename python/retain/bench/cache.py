"""Benchmark cases of the cache family (``retain.ops.cache``) for ``retain bench``: the cached
readout in its gated, sparse and residual modes against the materialising reference, eager and
under torch.compile."""

from __future__ import annotations

from typing import Any

import torch

from retain.bench.harness import Call, standard_impls
from retain.bench.registry import Case, register
from retain.ops import cached_readout, segment_mean
from retain.ops.cache.reference import cached_readout_ref

_SIZES = {
    "default": {"B": 2, "T": 4096, "H": 4, "K": 64, "V": 64, "L": 256, "dtype": "float32"},
    "small": {"B": 1, "T": 64, "H": 2, "K": 8, "V": 8, "L": 16, "dtype": "float32"},
    # 64 segments: the reference's per-segment readouts alone are 4 GiB
    "large": {"B": 2, "T": 16384, "H": 4, "K": 64, "V": 64, "L": 256, "dtype": "float32"},
}
_ARGS = ("q", "u", "states", "seg_keys", "o_online", "online_keys")


def _inputs(p: dict[str, Any], device: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device).manual_seed(0)
    B, T, H, K, V, L = (p[n] for n in ("B", "T", "H", "K", "V", "L"))
    ns = T // L
    dtype = getattr(torch, p["dtype"])

    def rn(*shape, scale=1.0):
        return (torch.randn(shape, generator=gen, device=device) * scale).to(dtype)

    # unit keys and their segment means, as CachedMemory makes the summaries
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=gen, device=device), dim=-1)
    return {"q": rn(B, T, H, K), "u": rn(B, T, H, K), "states": rn(B, ns, H, K, V, scale=0.1),
            "seg_keys": segment_mean(k, L)[:, :ns].to(dtype), "o_online": rn(B, T, H, V),
            "online_keys": segment_mean(k, L, causal=True).to(dtype), "grad_y": rn(B, T, H, V)}


def _call(mode: str, top_k: int | None) -> Call:
    """fwd: y; fwd+bwd: the gradients of every input against grad_y."""

    def bind(fn, inputs, params):
        kw = dict(segment_len=params["L"], mode=mode, top_k=top_k)
        if fn is cached_readout:
            return lambda q, u, S, c, o, ok: fn(q, u, S, c, o, online_keys=ok, **kw)
        return lambda q, u, S, c, o, ok: fn(q, u, S, c, o, ok, **kw)

    wrt = ("q", "states", "o_online") if mode == "residual" else _ARGS  # residual reads no router, no summary
    return Call(_ARGS, grad_out="grad_y", wrt=wrt, bind=bind)


def _reads(p: dict[str, Any], top_k: int | None) -> int:
    """Cached states read over all tokens and heads: token t of segment s reads min(s, top_k)."""
    T, L = p["T"], p["L"]
    per_b_h = sum(min(t // L, top_k or t // L) for t in range(T))
    return p["B"] * p["H"] * per_b_h


def _flops(top_k: int | None) -> dict:
    # 2 K V flops per read forward (S^T q); fwd+bwd 3x that (the backward's S dy and q dy^T products)
    return {"fwd": lambda p: 2 * p["K"] * p["V"] * _reads(p, top_k),
            "fwd+bwd": lambda p: 6 * p["K"] * p["V"] * _reads(p, top_k)}


def _describe(mode: str, top_k: int | None):
    def describe(p):
        extra = f" top_k={top_k}" if top_k else ""
        return (f"B={p['B']} T={p['T']} H={p['H']} K={p['K']} V={p['V']} L={p['L']} (NS={p['T'] // p['L']}) "
                f"{p['dtype']}, mode={mode}{extra}")
    return describe


for _name, _mode, _top_k in (("cached_readout_gated", "gated", None), ("cached_readout_sparse", "sparse", 2),
                             ("cached_readout_residual", "residual", None)):
    _c = _call(_mode, _top_k)
    register(Case(
        name=_name,
        family="cache",
        sizes=_SIZES,
        make_inputs=_inputs,
        describe=_describe(_mode, _top_k),
        flops_model=_flops(_top_k if _mode == "sparse" else None),
        impls=standard_impls(cached_readout, cached_readout_ref, _c, kernel="cached_readout",
                             retain=f"retain.ops.cached_readout(mode={_mode!r}) (native kernel, fused)",
                             eager="reference cached_readout_ref (eager PyTorch, per-segment readouts "
                                   "[B, T, NS, H, V] materialised)"),
        grad_names=tuple(f"grad_{n}" for n in _c.wrt),
        model_note="GFLOP/s from the multiply-adds of the cached reads (2 K V per state a token reads; fwd+bwd "
                   "3x); gates and summaries are not counted"
                   + ("; retain's residual kernel reads the prefix sum of the states (one read per token), so "
                      "its GFLOP/s counts the reads the reference performs" if _mode == "residual" else ""),
        rtol=1e-4, atol=1e-4,
    ))
