"""Every public op of ``retain.ops`` with small inputs and its reference: what
``tests/ops/test_contract.py`` checks each one against. A new op adds one ``OpCase`` here (the
contract test fails until every name in ``retain.ops.__all__`` has one)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

import torch

import retain
from retain.ops.cache import reference as cache_ref
from retain.ops.fisher import reference as fisher_ref
from retain.ops.margin import reference as margin_ref
from retain.ops.replay import reference as replay_ref
from retain.ops.scan import reference as scan_ref

F64 = torch.float64


@dataclass(frozen=True)
class OpCase:
    """``call(**make(seed))`` runs the op, ``reference(**make(seed))`` its oracle (or None)."""

    name: str  # retain.ops.<name>
    make: Callable[[int], dict[str, Any]]  # seed -> the op's inputs by name (float64 tensors, flags)
    call: Callable[..., Any]
    reference: Callable[..., Any] | None
    grads: tuple[str, ...] = ()  # the inputs that get gradients
    native: bool = True  # runs custom ops with native kernels (the fallback policy applies)
    nan_input: str | None = None  # the input whose first element set to NaN must give NaN out
    # inputs whose gradient is piecewise constant (second derivative 0 almost everywhere): it
    # may come out of the backward as a constant, outside any graph
    constant_grads: tuple[str, ...] = ()


def tensors_of(result) -> list[torch.Tensor]:
    """The tensors of an op's result, in order (tuples, None, dataclasses such as ActivationStats)."""
    if isinstance(result, torch.Tensor):
        return [result]
    if result is None:
        return []
    if is_dataclass(result):
        return [t for f in fields(result) for t in tensors_of(getattr(result, f.name))]
    if isinstance(result, (tuple, list)):
        return [t for r in result for t in tensors_of(r)]
    raise TypeError(f"unexpected op result {type(result).__name__}")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(g, *shape):
    return torch.randn(shape, generator=g, dtype=F64)


def _scan_inputs(seed: int, B=1, T=6, H=2, K=4, V=3) -> dict[str, Any]:
    g = _gen(seed)
    return dict(q=_randn(g, B, T, H, K), k=_randn(g, B, T, H, K) / 2, v=_randn(g, B, T, H, V),
                beta=torch.sigmoid(_randn(g, B, T, H)), g=torch.nn.functional.logsigmoid(_randn(g, B, T, H)),
                eta=torch.sigmoid(_randn(g, B, T, H)), S0=_randn(g, B, H, K, V) / 4, Z0=_randn(g, B, H, K, V) / 4)


def _pick(d: dict, *names: str) -> dict:
    return {n: d[n] for n in names}


def _as(d: dict, **names: str) -> dict:
    """``d``'s entries under the op's argument names: new name = old name."""
    return {new: d[old] for new, old in names.items()}


def _linear_recurrence_inputs(seed: int) -> dict[str, Any]:
    g = _gen(seed)
    return dict(a=torch.rand(2, 5, 3, generator=g, dtype=F64) * 0.5 + 0.5, x=_randn(g, 2, 5, 3), initial=_randn(g, 2, 3))


def _tm_inputs(seed: int) -> dict[str, Any]:
    g = _gen(seed)
    D = 9
    h = _randn(g, 2, 4, D)
    labels = torch.randint(-1, 2, (2, 4, D), generator=g, dtype=torch.int8)
    mask = torch.rand(2, 4, generator=g) > 0.3
    mask[0, 0] = True
    return dict(h=h, labels=margin_ref.pack_tm_labels_ref(labels), pos=0.2 + torch.rand(D, generator=g, dtype=F64),
                neg=-0.2 - torch.rand(D, generator=g, dtype=F64), mask=mask)


def _pair_inputs(seed: int, a: str, b: str, scale=1.0) -> dict[str, Any]:
    g = _gen(seed)
    mask = torch.rand(2, 3, generator=g) > 0.3
    mask[0, 0] = True
    return {a: _randn(g, 2, 3, 11) * scale, b: _randn(g, 2, 3, 11) * scale, "mask": mask}


def _stats_inputs(seed: int) -> dict[str, Any]:
    g = _gen(seed)
    mask = torch.rand(4, 3, generator=g) > 0.3
    mask[0, 0] = True
    return dict(h=_randn(g, 4, 3, 5) * 2 + 1, mask=mask)


def _threshold_inputs(seed: int) -> dict[str, Any]:
    return dict(stats=retain.ops.activation_stats(**_stats_inputs(seed)), k=1.5)


def _label_inputs(seed: int) -> dict[str, Any]:
    g = _gen(seed)
    return dict(ref=_randn(g, 2, 3, 9), pos=torch.full((9,), 0.5, dtype=F64), neg=torch.full((9,), -0.5, dtype=F64))


def _packed_inputs(seed: int) -> dict[str, Any]:
    d = _label_inputs(seed)
    return dict(packed=retain.ops.pack_tm_labels(d["ref"], d["pos"], d["neg"]), D=9)


# parameter lists of the fisher family: a matrix, a vector, a scalar and an empty tensor
_SHAPES = ((3, 5), (7,), (), (0, 2))


def _fisher_inputs(seed: int, samples: int = 2) -> dict[str, Any]:
    g = _gen(seed)
    params = [_randn(g, *s) for s in _SHAPES]
    return dict(params=params, anchors=[p + _randn(g, *p.shape) / 3 for p in params],
                diag=[_randn(g, *p.shape).abs() for p in params], mu=[_randn(g, *p.shape) for p in params],
                grads=[_randn(g, samples, *p.shape) for p in params], step=[_randn(g, *p.shape) for p in params])


def _rows_inputs(seed: int) -> dict[str, Any]:
    g = _gen(seed)
    return dict(fields=[_randn(g, 7, 3), _randn(g, 7), _randn(g, 7, 2, 2)], index=torch.tensor([6, 0, 3, 3, 1]),
                values=[_randn(g, 5, 3), _randn(g, 5), _randn(g, 5, 2, 2)])


def _clones(ts):
    """Copies of the state an in-place op updates (the inputs stay the reference's); anything else
    as it is, so bad arguments reach the op."""
    return [t.clone() if isinstance(t, torch.Tensor) else t for t in ts] if isinstance(ts, list) else ts


def _ewc_grad_call(params, anchors, diag, mu):
    grads = [torch.zeros_like(p) for p in params] if all(isinstance(p, torch.Tensor) for p in params) else None
    value = ops.ewc_penalty_grad_(params, anchors, diag=diag, mu=mu, c=0.7, lam=1.3, grads=grads)
    return value, grads


def _ewc_grad_ref(params, anchors, diag, mu):
    kw = dict(diag=diag, mu=mu, c=0.7, lam=1.3)
    return fisher_ref.ewc_penalty_ref(params, anchors, **kw), fisher_ref.ewc_penalty_grads_ref(params, anchors, **kw)


def _cache_inputs(seed: int, B=1, T=7, H=2, K=3, V=4, L=3) -> dict[str, Any]:
    g = _gen(seed)
    ns = -(-T // L) - 1
    return dict(q=_randn(g, B, T, H, K), u=_randn(g, B, T, H, K), states=_randn(g, B, ns, H, K, V) / 2,
                seg_keys=_randn(g, B, ns, H, K), o_online=_randn(g, B, T, H, V), online_keys=_randn(g, B, T, H, K))


def _cached_readouts(fn):
    """Every mode of the cached readout in one case: residual, gated, sparse top-1."""
    def run(q, u, states, seg_keys, o_online, online_keys):
        kw = dict(segment_len=3, scale=0.7)
        return (fn(q, u, states, seg_keys, o_online, online_keys, **kw, mode="residual"),
                fn(q, u, states, seg_keys, o_online, online_keys, **kw, mode="gated"),
                fn(q, u, states, seg_keys, o_online, online_keys, **kw, mode="sparse", top_k=1))
    return run


ops = retain.ops
CASES: list[OpCase] = [
    OpCase("linear_recurrence", _linear_recurrence_inputs,
           lambda a, x, initial: ops.linear_recurrence(a, x, initial=initial),
           lambda a, x, initial: scan_ref.linear_recurrence_ref(a, x, initial=initial),
           grads=("a", "x", "initial"), nan_input="x"),
    OpCase("memory_scan", lambda s: _pick(_scan_inputs(s), "q", "k", "v", "beta", "g", "eta", "S0", "Z0"),
           lambda q, k, v, beta, g, eta, S0, Z0: ops.memory_scan(
               q, k, v, beta, g=g, eta=eta, objective="lp", initial_state=(S0, Z0), output_final_state=True,
               states_every=2),
           lambda q, k, v, beta, g, eta, S0, Z0: scan_ref.memory_scan_ref(
               q, k, v, beta, g=g, eta=eta, objective="lp", initial_state=(S0, Z0), output_final_state=True,
               states_every=2),
           grads=("q", "k", "v", "beta", "g", "eta", "S0", "Z0"), nan_input="v"),
    OpCase("linear_attn", lambda s: _pick(_scan_inputs(s), "q", "k", "v", "g", "S0"),
           lambda q, k, v, g, S0: ops.linear_attn(q, k, v, g=g, initial_state=S0, output_final_state=True),
           lambda q, k, v, g, S0: scan_ref.linear_attn_ref(q, k, v, g=g, initial_state=S0, output_final_state=True),
           grads=("q", "k", "v", "g", "S0"), nan_input="v"),
    OpCase("delta_rule", lambda s: _pick(_scan_inputs(s), "q", "k", "v", "beta"),
           lambda q, k, v, beta: ops.delta_rule(q, k, v, beta, output_final_state=True, use_qk_l2norm=True),
           lambda q, k, v, beta: scan_ref.delta_rule_ref(q, k, v, beta, output_final_state=True, use_qk_l2norm=True),
           grads=("q", "k", "v", "beta"), nan_input="v"),
    OpCase("gated_delta_rule", lambda s: _pick(_scan_inputs(s), "q", "k", "v", "g", "beta"),
           lambda q, k, v, g, beta: ops.gated_delta_rule(q, k, v, g, beta, output_final_state=True),
           lambda q, k, v, g, beta: scan_ref.gated_delta_rule_ref(q, k, v, g, beta, output_final_state=True),
           grads=("q", "k", "v", "g", "beta"), nan_input="v"),
    OpCase("titans_linear", lambda s: dict(**_pick(_scan_inputs(s), "q", "k", "v", "beta", "eta"),
                                           alpha=_scan_inputs(s + 1)["beta"] / 4),
           lambda q, k, v, beta, eta, alpha: ops.titans_linear(q, k, v, beta, alpha, eta, output_final_state=True),
           lambda q, k, v, beta, eta, alpha: scan_ref.titans_linear_ref(q, k, v, beta, alpha, eta,
                                                                        output_final_state=True),
           grads=("q", "k", "v", "beta", "eta", "alpha"), nan_input="v"),
    OpCase("tm_loss", _tm_inputs,
           lambda h, labels, pos, neg, mask: ops.tm_loss(h, labels, pos, neg, mask=mask),
           lambda h, labels, pos, neg, mask: margin_ref.tm_loss_ref(h, labels, pos, neg, mask=mask),
           grads=("h", "pos", "neg"), nan_input="h", constant_grads=("pos", "neg")),
    OpCase("kl_imitation", lambda s: _pair_inputs(s, "z", "z_ref", 3.0),
           lambda z, z_ref, mask: ops.kl_imitation(z, z_ref, temperature=2.0, mask=mask),
           lambda z, z_ref, mask: margin_ref.kl_imitation_ref(z, z_ref, temperature=2.0, mask=mask),
           grads=("z", "z_ref"), nan_input="z"),
    OpCase("feature_imitation", lambda s: _pair_inputs(s, "h", "h_ref"),
           lambda h, h_ref, mask: ops.feature_imitation(h, h_ref, mask=mask),
           lambda h, h_ref, mask: margin_ref.feature_imitation_ref(h, h_ref, mask=mask),
           grads=("h", "h_ref"), nan_input="h"),
    OpCase("fisher_accumulate_", lambda s: _as(_fisher_inputs(s), fisher="diag", grads="grads"),
           lambda fisher, grads: ops.fisher_accumulate_(_clones(fisher), grads, decay=0.9, scale=0.5),
           lambda fisher, grads: fisher_ref.fisher_accumulate_ref(fisher, grads, decay=0.9, scale=0.5),
           nan_input="grads"),
    OpCase("mas_accumulate_", lambda s: _as(_fisher_inputs(s), importance="diag", grads="grads"),
           lambda importance, grads: ops.mas_accumulate_(_clones(importance), grads, decay=0.5, scale=2.0),
           lambda importance, grads: fisher_ref.mas_accumulate_ref(importance, grads, decay=0.5, scale=2.0),
           nan_input="grads"),
    OpCase("rank1_accumulate_", lambda s: _as(_fisher_inputs(s), mu_sum="mu", sq_sum="diag", grads="grads"),
           lambda mu_sum, sq_sum, grads: ops.rank1_accumulate_(_clones(mu_sum), _clones(sq_sum), grads),
           fisher_ref.rank1_accumulate_ref, nan_input="grads"),
    OpCase("rank1_coefficient", lambda s: _pick(_fisher_inputs(s, samples=3), "mu", "grads"),
           lambda mu, grads: ops.rank1_coefficient(mu, grads), fisher_ref.rank1_coefficient_ref, nan_input="grads"),
    OpCase("ewc_penalty", lambda s: _pick(_fisher_inputs(s), "params", "anchors", "diag", "mu"),
           lambda params, anchors, diag, mu: ops.ewc_penalty(params, anchors, diag=diag, mu=mu, c=0.7, lam=1.3),
           lambda params, anchors, diag, mu: fisher_ref.ewc_penalty_ref(params, anchors, diag=diag, mu=mu, c=0.7,
                                                                        lam=1.3),
           grads=("params", "anchors"), nan_input="params"),
    OpCase("ewc_penalty_grad_", lambda s: _pick(_fisher_inputs(s), "params", "anchors", "diag", "mu"),
           _ewc_grad_call, _ewc_grad_ref, nan_input="params"),
    OpCase("si_accumulate_", lambda s: _as(_fisher_inputs(s), omega="diag", grads="mu", params_before="params",
                                           step="step"),
           lambda omega, grads, params_before, step: ops.si_accumulate_(
               _clones(omega), grads, params_before, [p + d for p, d in zip(params_before, step)]),
           lambda omega, grads, params_before, step: fisher_ref.si_accumulate_ref(
               omega, grads, params_before, [p + d for p, d in zip(params_before, step)]),
           nan_input="grads"),
    OpCase("si_consolidate_", lambda s: _as(_fisher_inputs(s), importance="diag", omega="mu", params="params",
                                            anchors="anchors"),
           lambda importance, omega, params, anchors: (lambda w: (ops.si_consolidate_(
               _clones(importance), w, params, anchors, xi=0.1), w))(_clones(omega)),
           lambda importance, omega, params, anchors: (fisher_ref.si_consolidate_ref(
               importance, omega, params, anchors, xi=0.1), [torch.zeros_like(w) for w in omega]),
           nan_input="params"),
    OpCase("gather_rows", lambda s: _pick(_rows_inputs(s), "fields", "index"),
           lambda fields, index: ops.gather_rows(fields, index), replay_ref.gather_rows_ref, nan_input="fields"),
    OpCase("scatter_rows_", _rows_inputs,
           lambda fields, index, values: ops.scatter_rows_(_clones(fields), torch.where(index == 3, -1, index), values),
           lambda fields, index, values: replay_ref.scatter_rows_ref(fields, torch.where(index == 3, -1, index), values),
           nan_input="values"),
    OpCase("importance_weights", lambda s: dict(prob=torch.rand(6, generator=_gen(s), dtype=F64) + 0.1),
           lambda prob: ops.importance_weights(prob, beta=0.6),
           lambda prob: (prob / prob.min()).pow(-0.6).float(), native=False, nan_input="prob"),
    OpCase("cached_readout", _cache_inputs,
           _cached_readouts(lambda q, u, states, seg_keys, o_online, online_keys, **kw: ops.cached_readout(
               q, u, states, seg_keys, o_online, online_keys=online_keys, **kw)),
           _cached_readouts(cache_ref.cached_readout_ref),
           grads=("q", "u", "states", "seg_keys", "o_online", "online_keys"), nan_input="o_online"),
    OpCase("segment_mean", lambda s: dict(x=_randn(_gen(s), 2, 7, 2, 3)),
           lambda x: ops.segment_mean(x, 3, causal=True),
           lambda x: torch.stack([x[:, (t // 3) * 3:t + 1].mean(1) for t in range(x.shape[1])], 1),
           native=False, nan_input="x"),
    OpCase("pack_tm_labels", _label_inputs, lambda ref, pos, neg: ops.pack_tm_labels(ref, pos, neg),
           lambda ref, pos, neg: margin_ref.pack_tm_labels_ref(margin_ref.tm_labels_ref(ref, pos, neg)),
           native=False),
    OpCase("unpack_tm_labels", _packed_inputs, lambda packed, D: ops.unpack_tm_labels(packed, D),
           lambda packed, D: margin_ref.unpack_tm_labels_ref(packed, D), native=False),
    OpCase("activation_stats", _stats_inputs, lambda h, mask: ops.activation_stats(h, mask),
           lambda h, mask: margin_ref.activation_stats_ref(h, mask), native=False, nan_input="h"),
    OpCase("tm_thresholds", _threshold_inputs, lambda stats, k: ops.tm_thresholds(stats, k), None, native=False),
]

# Public names that are types, not ops.
TYPES = {"ActivationStats", "ClassBalancedState", "MinTree", "SumTree"}
# Host-side functions, not custom ops: they decide on the CPU from Python integers and a generator
# (sampling state machines, schedules) and are tested in their own files (tests/ops/replay).
HOST = {"class_balanced_slots", "reservoir_slots", "ring_slots", "view_batch_indices"}
