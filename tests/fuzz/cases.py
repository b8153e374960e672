"""Valid calls of the public ops and the bad or edge values substituted into them, one argument
at a time (see tests/fuzz/__init__.py)."""

from __future__ import annotations

import math

import torch

from retain import ops


def _scan(B=1, T=5, H=2, K=3, V=2):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(q=r(B, T, H, K), k=r(B, T, H, K), v=r(B, T, H, V), beta=torch.rand(B, T, H, generator=g))


def _margin(B=2, L=3, D=8):
    g = torch.Generator().manual_seed(1)
    return dict(h=torch.randn(B, L, D, generator=g), labels=torch.randint(-1, 2, (B, L, D), generator=g).to(torch.int8),
                pos_thr=torch.full((D,), 0.5), neg_thr=torch.full((D,), -0.5))


def _logits(N=3, V=7):
    g = torch.Generator().manual_seed(2)
    return dict(z=torch.randn(N, V, generator=g), z_ref=torch.randn(N, V, generator=g))


# (public name, the call, its valid arguments, the arguments to fuzz)
OPS = {
    "memory_scan": (lambda q, k, v, beta, **kw: ops.memory_scan(q, k, v, beta, **kw)[0],
                    lambda: {**_scan(), "objective": "l2", "scale": None, "p": 3.0, "delta": 1.0},
                    ["q", "k", "v", "beta", "objective", "scale", "p", "delta"]),
    "linear_attn": (lambda q, k, v, **kw: ops.linear_attn(q, k, v, **kw)[0],
                    lambda: {**{n: t for n, t in _scan().items() if n != "beta"}, "scale": None}, ["q", "k", "v", "scale"]),
    "titans_linear": (lambda q, k, v, theta, alpha, eta: ops.titans_linear(q, k, v, theta, alpha, eta)[0],
                      lambda: {**{n: t for n, t in _scan().items() if n != "beta"}, "theta": 0.5, "alpha": 0.1,
                               "eta": 0.9}, ["theta", "alpha", "eta"]),
    "tm_loss": (lambda h, labels, pos_thr, neg_thr, **kw: ops.tm_loss(h, labels, pos_thr, neg_thr, **kw),
                lambda: {**_margin(), "reduction": "violations"}, ["h", "labels", "pos_thr", "neg_thr", "reduction"]),
    "kl_imitation": (lambda z, z_ref, **kw: ops.kl_imitation(z, z_ref, **kw),
                     lambda: {**_logits(), "temperature": 1.0, "reduction": "mean"},
                     ["z", "z_ref", "temperature", "reduction"]),
    "feature_imitation": (lambda h, h_ref, **kw: ops.feature_imitation(h, h_ref, **kw),
                          lambda: {"h": _logits()["z"], "h_ref": _logits()["z_ref"], "p": 2, "reduction": "mean"},
                          ["h", "h_ref", "p", "reduction"]),
    "unpack_tm_labels": (lambda packed, D: ops.unpack_tm_labels(packed, D),
                         lambda: {"packed": torch.zeros(2, 2, dtype=torch.uint8), "D": 8}, ["packed", "D"]),
}

# values that are wrong for any argument (wrong kind) and edge numbers for scalar ones
WRONG_KIND = [None, "half", [1.0, 2.0], {"a": 1}, True]
EDGE_NUMBERS = [0, -1, 0.0, -1.5, math.inf, -math.inf, math.nan, 1e30, 7]


def tensor_variants(t: torch.Tensor):
    """Edge and bad versions of a valid tensor argument: other dtypes, ndim, sizes, device, views, NaN."""
    yield "int64", t.to(torch.int64)
    yield "bool", t.to(torch.bool)
    yield "complex", t.to(torch.complex64) if t.is_floating_point() else t
    yield "float16", t.to(torch.float16) if t.is_floating_point() else t.to(torch.float16)
    yield "meta", t.to("meta")
    yield "0-dim", t.reshape(-1)[0].clone()
    yield "extra dim", t[None]
    if t.dim():
        yield "one fewer", t.narrow(-1, 0, max(t.shape[-1] - 1, 0))
        yield "one more", torch.cat([t, t.narrow(-1, 0, 1)], -1)
        yield "strided", torch.stack([t, t], -1)[..., 0]
    if t.is_floating_point():
        bad = t.clone()
        bad.reshape(-1)[0] = math.nan
        yield "nan", bad
