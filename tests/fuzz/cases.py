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


# (public name, the call, its valid arguments, the arguments to fuzz); errors name retain.ops.<name>
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
    # fisher: lists of tensors, one per parameter
    "fisher_accumulate_": (lambda fisher, grads, **kw: ops.fisher_accumulate_(fisher, grads, **kw),
                           lambda: {"fisher": _params(), "grads": _params(2), "decay": 0.9, "scale": 0.5},
                           ["fisher", "grads", "decay", "scale"]),
    "mas_accumulate_": (lambda importance, grads, **kw: ops.mas_accumulate_(importance, grads, **kw),
                        lambda: {"importance": _params(), "grads": _params(2), "decay": 1.0, "scale": 1.0},
                        ["importance", "grads", "decay", "scale"]),
    "rank1_accumulate_": (lambda mu_sum, sq_sum, grads: ops.rank1_accumulate_(mu_sum, sq_sum, grads),
                          lambda: {"mu_sum": _params(), "sq_sum": _params(), "grads": _params(2, samples=3)},
                          ["mu_sum", "sq_sum", "grads"]),
    "rank1_coefficient": (lambda mu, grads: ops.rank1_coefficient(mu, grads),
                          lambda: {"mu": _params(), "grads": _params(2, samples=3)}, ["mu", "grads"]),
    "si_accumulate_": (lambda omega, grads, params_before, params_after:
                       ops.si_accumulate_(omega, grads, params_before, params_after),
                       lambda: {"omega": _params(), "grads": _params(1), "params_before": _params(2),
                                "params_after": _params(3)}, ["omega", "grads", "params_before", "params_after"]),
    "si_consolidate_": (lambda importance, omega, params, anchors, **kw:
                        ops.si_consolidate_(importance, omega, params, anchors, **kw),
                        lambda: {"importance": _params(), "omega": _params(1), "params": _params(2),
                                 "anchors": _params(3), "xi": 1e-3, "reset": True},
                        ["importance", "omega", "params", "anchors", "xi", "reset"]),
    "ewc_penalty": (lambda params, anchors, **kw: ops.ewc_penalty(params, anchors, **kw),
                    lambda: {"params": _params(1), "anchors": _params(2), "diag": _params(3), "mu": _params(4),
                             "c": 0.5, "lam": 2.0}, ["params", "anchors", "diag", "mu", "c", "lam"]),
    "ewc_penalty_grad_": (lambda params, anchors, **kw: ops.ewc_penalty_grad_(params, anchors, **kw),
                          lambda: {"params": _params(1), "anchors": _params(2), "diag": _params(3), "mu": None,
                                   "c": None, "lam": 1.0, "grads": _params(4)},
                          ["params", "anchors", "diag", "lam", "grads"]),
    # replay
    "reservoir_slots": (lambda **kw: ops.reservoir_slots(**kw), lambda: {"n_seen": 10, "batch": 4, "capacity": 6},
                        ["n_seen", "batch", "capacity"]),
    "ring_slots": (lambda **kw: ops.ring_slots(**kw), lambda: {"n_seen": 10, "batch": 4, "capacity": 6},
                   ["n_seen", "batch", "capacity"]),
    "class_balanced_slots": (lambda labels, state: ops.class_balanced_slots(labels, state),
                             lambda: {"labels": torch.tensor([0, 1, 1, 2]),
                                      "state": ops.ClassBalancedState.empty(capacity=4, classes=3)},
                             ["labels", "state"]),
    "gather_rows": (lambda fields, index: ops.gather_rows(fields, index),
                    lambda: {"fields": [torch.randn(5, 3), torch.arange(5)], "index": torch.tensor([4, 0, 2])},
                    ["fields", "index"]),
    "scatter_rows_": (lambda fields, index, values: ops.scatter_rows_(fields, index, values),
                      lambda: {"fields": [torch.zeros(5, 3), torch.zeros(5, dtype=torch.int64)],
                               "index": torch.tensor([4, -1, 2]),
                               "values": [torch.randn(3, 3), torch.arange(3)]}, ["fields", "index", "values"]),
    "view_batch_indices": (lambda **kw: ops.view_batch_indices(**kw),
                           lambda: {"n": 10, "repeats": 2, "epoch": 1, "rank": 0, "world": 2, "rest": 1, "seed": 0},
                           ["n", "repeats", "epoch", "rank", "world", "rest", "seed"]),
    "importance_weights": (lambda prob, **kw: ops.importance_weights(prob, **kw),
                           lambda: {"prob": torch.tensor([0.1, 0.5, 0.4]), "beta": 0.4, "min_prob": 0.05},
                           ["prob", "beta", "min_prob"]),
    "SumTree": (lambda capacity, idx, priority: _tree(ops.SumTree, capacity, idx, priority),
                lambda: {"capacity": 8, "idx": torch.tensor([0, 3]), "priority": torch.tensor([1.0, 2.0])},
                ["capacity", "idx", "priority"]),
    "MinTree": (lambda capacity, idx, priority: _tree(ops.MinTree, capacity, idx, priority),
                lambda: {"capacity": 8, "idx": torch.tensor([0, 3]), "priority": torch.tensor([1.0, 2.0])},
                ["capacity", "idx", "priority"]),
    # cache
    "cached_readout": (lambda q, u, states, seg_keys, o_online, **kw:
                       ops.cached_readout(q, u, states, seg_keys, o_online, **kw),
                       lambda: {**_cache(), "segment_len": 2, "mode": "sparse", "top_k": 1, "scale": None},
                       ["q", "u", "states", "seg_keys", "o_online", "online_keys", "segment_len", "mode", "top_k",
                        "scale"]),
    "segment_mean": (lambda x, segment_len, **kw: ops.segment_mean(x, segment_len, **kw),
                     lambda: {"x": _scan()["k"], "segment_len": 2, "causal": True}, ["x", "segment_len", "causal"]),
}

# arguments an op writes in place besides what it returns (NaN in them must stay NaN)
WRITTEN = {"ewc_penalty_grad_": ("grads",)}

# the strategies of retain.cl: errors name retain.cl.<name> (the class, or the class and the method)
STRATEGIES = {
    "GeRe.loss": (lambda hidden, sample_ids, mask: _gere().loss(hidden, sample_ids, mask),
                  lambda: {"hidden": torch.randn(2, 5, _GERE_WIDTH), "sample_ids": [0, 1], "mask": None},
                  ["hidden", "sample_ids", "mask"]),
    "GeRe.batch": (lambda sample_ids: _gere().batch(sample_ids, _gere_samples()), lambda: {"sample_ids": [0, 2]},
                   ["sample_ids"]),
    "ReplayBuffer": (lambda **kw: _new_buffer(**kw),
                     lambda: {"capacity": 4, "fields": {"x": ((3,), torch.float32), "y": ((), torch.int64)},
                              "policy": "prioritized", "alpha": 0.6, "beta": 0.4, "eps": 1e-6, "seed": 0},
                     ["capacity", "fields", "policy", "alpha", "beta", "eps", "seed"]),
    "ReplayBuffer.add": (lambda batch: _buffer().add(batch),
                         lambda: {"batch": {"x": torch.randn(2, 3), "y": torch.tensor([1, 2])}}, ["batch"]),
    "ReplayBuffer.sample": (lambda n, replace: _buffer(filled=True).sample(n, replace=replace),
                            lambda: {"n": 2, "replace": False}, ["n", "replace"]),
    "ReplayBuffer.update_priorities": (lambda index, priority: _buffer(filled=True).update_priorities(index, priority),
                                       lambda: {"index": torch.tensor([0, 1]), "priority": torch.tensor([0.5, 2.0])},
                                       ["index", "priority"]),
}


def _params(seed=0, samples=None):
    """A model's parameter list (two tensors), or per-sample gradients [samples, *shape] of it."""
    g = torch.Generator().manual_seed(10 + seed)
    lead = () if samples is None else (samples,)
    return [torch.rand(*lead, 3, 4, generator=g, dtype=torch.float64).float(), torch.rand(*lead, 5, generator=g)]


def _cache(B=1, T=5, H=2, K=3, V=2, L=2):
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    NS = -(-T // L)
    k = r(B, T, H, K)
    return dict(q=r(B, T, H, K), u=r(B, T, H, K), states=r(B, NS, H, K, V), seg_keys=ops.segment_mean(k, L),
                o_online=r(B, T, H, V), online_keys=ops.segment_mean(k, L, causal=True))


def _tree(kind, capacity, idx, priority):
    tree = kind(capacity)
    tree.update(idx, priority)
    return tree.root()


_GERE_WIDTH = 8


def _gere_samples():
    g = torch.Generator().manual_seed(4)
    return [torch.randint(0, 20, (n,), generator=g) for n in (5, 4, 6)]


def _gere():
    from retain.cl import GeRe

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(20, _GERE_WIDTH), torch.nn.LayerNorm(_GERE_WIDTH))
    return GeRe.build(model, _gere_samples(), layer="1")


def _new_buffer(**kw):
    from retain.cl import ReplayBuffer

    return ReplayBuffer(**kw).capacity


def _buffer(filled=False):
    from retain.cl import ReplayBuffer

    buf = ReplayBuffer(4, {"x": ((3,), torch.float32), "y": ((), torch.int64)}, policy="prioritized")
    if filled:
        buf.add({"x": torch.randn(3, 3), "y": torch.tensor([0, 1, 2])})
    return buf


# values that are wrong for any argument (wrong kind) and edge numbers for scalar ones
WRONG_KIND = [None, "half", [1.0, 2.0], {"a": 1}, True]
EDGE_NUMBERS = [0, -1, 0.0, -1.5, math.inf, -math.inf, math.nan, 1e30, 7]


def list_variants(xs: list):
    """Edge and bad versions of a list of tensors: a bare tensor, a tuple, too short, too long, empty,
    a non-tensor entry, and every tensor variant of its first tensor."""
    yield "bare tensor", xs[0]
    yield "tuple", tuple(xs)
    yield "one fewer", xs[:-1]
    yield "one more", xs + xs[:1]
    yield "empty", []
    yield "holds None", [None, *xs[1:]]
    for what, t in tensor_variants(xs[0]):
        yield f"[0] {what}", [t, *xs[1:]]


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
    if t.is_floating_point() and t.numel():
        bad = t.clone()
        bad.reshape(-1)[0] = bad.reshape(-1)[-1] = math.nan  # the first and the last element: one is read
        yield "nan", bad
