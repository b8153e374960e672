"""retain.fla: fla's names, positional order and defaults, every function against a step-by-step
float64 loop written from fla's definitions, grouped value heads, float32 gates with 16-bit data,
reverse, state_v_first, the in-kernel gate options, normalize, packed sequences, and the options
that are refused."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F

import retain.fla as fla
from tests.helpers import assert_close

F64 = torch.float64

# fla's positional parameters (fla-org/flash-linear-attention, fla/ops/*/{chunk,fused_recurrent}.py)
FLA_SIGNATURES = {
    "chunk_linear_attn": ["q", "k", "v", "scale", "initial_state", "output_final_state", "normalize", "cu_seqlens"],
    "fused_recurrent_linear_attn": ["q", "k", "v", "scale", "initial_state", "output_final_state", "reverse",
                                    "normalize", "cu_seqlens"],
    "chunk_simple_gla": ["q", "k", "v", "g", "g_gamma", "scale", "initial_state", "output_final_state",
                         "state_v_first", "cu_seqlens", "cu_seqlens_cpu"],
    "fused_recurrent_simple_gla": ["q", "k", "v", "g", "g_gamma", "scale", "initial_state", "output_final_state",
                                   "reverse", "state_v_first", "cu_seqlens"],
    "chunk_gla": ["q", "k", "v", "g", "scale", "initial_state", "output_final_state", "state_v_first", "cu_seqlens",
                  "cu_seqlens_cpu"],
    "fused_recurrent_gla": ["q", "k", "v", "gk", "gv", "scale", "initial_state", "output_final_state", "reverse",
                            "state_v_first", "cu_seqlens"],
    "chunk_retention": ["q", "k", "v", "scale", "initial_state", "output_final_state", "cu_seqlens"],
    "fused_recurrent_retention": ["q", "k", "v", "scale", "initial_state", "output_final_state", "reverse",
                                  "state_v_first", "cu_seqlens"],
    "chunk_delta_rule": ["q", "k", "v", "beta", "scale", "initial_state", "output_final_state",
                         "use_qk_l2norm_in_kernel", "cu_seqlens", "cu_seqlens_cpu"],
    "fused_recurrent_delta_rule": ["q", "k", "v", "beta", "scale", "initial_state", "output_final_state",
                                   "use_qk_l2norm_in_kernel", "cu_seqlens"],
    "chunk_gated_delta_rule": ["q", "k", "v", "g", "beta", "scale", "initial_state", "output_final_state",
                               "use_qk_l2norm_in_kernel", "use_beta_sigmoid_in_kernel", "allow_neg_eigval",
                               "state_v_first", "cu_seqlens", "cu_seqlens_cpu", "chunk_indices", "cp_context"],
    "fused_recurrent_gated_delta_rule": ["q", "k", "v", "g", "gk", "gv", "beta", "scale", "initial_state",
                                         "output_final_state", "use_qk_l2norm_in_kernel", "use_gate_in_kernel",
                                         "A_log", "dt_bias", "use_beta_sigmoid_in_kernel", "allow_neg_eigval",
                                         "state_v_first", "cu_seqlens"],
}
FLA_DEFAULTS = {("chunk_linear_attn", "normalize"): True, ("fused_recurrent_linear_attn", "normalize"): False}


@pytest.mark.parametrize("name", list(FLA_SIGNATURES))
def test_names_positional_order_and_defaults_are_flas(name):
    params = [p for p in inspect.signature(getattr(fla, name)).parameters.values()
              if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert [p.name for p in params] == FLA_SIGNATURES[name]
    for p in params[3:]:
        want = FLA_DEFAULTS.get((name, p.name), p.default)
        assert p.default == want and p.default is not inspect.Parameter.empty or p.name in ("g", "beta")
    assert set(fla.__all__) == set(FLA_SIGNATURES)


def naive(q, k, v, *, beta=None, g=None, gk=None, delta=False, scale=None, S0=None, l2norm=False):
    """fla's recurrences one step at a time in float64 (q, k with H heads, v with HV = r·H):
    S ← e^{g} S (per head) or diag(e^{gk}) S (per key); delta: S ← S + β k (v − Sᵀk)ᵀ, else
    S ← S + β k vᵀ; o = Sᵀ(scale·q). Returns (o, S_T)."""
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    r = HV // H
    q, k = (x.to(F64).repeat_interleave(r, 2) for x in (q, k))
    if l2norm:
        q, k = (x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6) for x in (q, k))
    v = v.to(F64)
    scale = K ** -0.5 if scale is None else scale
    S = torch.zeros(B, HV, K, V, dtype=F64) if S0 is None else S0.to(F64).clone()
    out = []
    for t in range(T):
        if g is not None:
            S = S * g[:, t].to(F64).exp()[..., None, None]
        if gk is not None:
            S = S * gk[:, t].to(F64).exp()[..., None]
        b = torch.ones(B, HV, dtype=F64) if beta is None else beta[:, t].to(F64)
        kt, vt = k[:, t], v[:, t]
        if delta:
            vt = vt - torch.einsum("bhkv,bhk->bhv", S, kt)
        S = S + b[..., None, None] * kt[..., None] * vt[..., None, :]
        out.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t] * scale))
    return torch.stack(out, 1), S


def inputs(B=2, T=11, H=2, HV=4, K=5, V=3, seed=0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=F64)  # noqa: E731
    return dict(q=r(B, T, H, K).to(dtype), k=F.normalize(r(B, T, H, K), dim=-1).to(dtype), v=r(B, T, HV, V).to(dtype),
                g=F.logsigmoid(r(B, T, HV) + 2), gk=F.logsigmoid(r(B, T, HV, K) + 2),
                beta=torch.rand(B, T, HV, generator=gen, dtype=F64), S0=r(B, HV, K, V) * 0.3)


def test_every_family_matches_the_naive_recurrence():
    x = inputs()
    q, k, v, g, gk, beta, S0 = (x[n] for n in ("q", "k", "v", "g", "gk", "beta", "S0"))
    gamma = torch.tensor([-0.1, -0.2, -0.3, -0.05], dtype=F64)
    H = v.shape[2]
    ret = torch.tensor([math.log(1 - 2.0 ** (-5 - h)) for h in range(H)], dtype=F64)
    cases = {
        "chunk_linear_attn": (lambda: fla.chunk_linear_attn(q, k, v, None, S0, True, False), dict()),
        "fused_recurrent_linear_attn": (lambda: fla.fused_recurrent_linear_attn(q, k, v, 0.5, S0, True), dict(scale=0.5)),
        "chunk_simple_gla": (lambda: fla.chunk_simple_gla(q, k, v, g, None, None, S0, True), dict(g=g)),
        "fused_recurrent_simple_gla": (lambda: fla.fused_recurrent_simple_gla(q, k, v, g, gamma, None, S0, True),
                                       dict(g=g + gamma)),
        "chunk_gla": (lambda: fla.chunk_gla(q, k, v, gk, None, S0, True), dict(gk=gk)),
        "fused_recurrent_gla": (lambda: fla.fused_recurrent_gla(q, k, v, gk, None, None, S0, True), dict(gk=gk)),
        "chunk_retention": (lambda: fla.chunk_retention(q, k, v, None, S0, True), dict(g=ret.expand(*v.shape[:3]))),
        "fused_recurrent_retention": (lambda: fla.fused_recurrent_retention(q, k, v, None, S0, True),
                                      dict(g=ret.expand(*v.shape[:3]))),
        "chunk_delta_rule": (lambda: fla.chunk_delta_rule(q, k, v, beta, None, S0, True), dict(beta=beta, delta=True)),
        "fused_recurrent_delta_rule": (lambda: fla.fused_recurrent_delta_rule(q, k, v, beta, None, S0, True, True),
                                       dict(beta=beta, delta=True, l2norm=True)),
        "chunk_gated_delta_rule": (lambda: fla.chunk_gated_delta_rule(q, k, v, g, beta, None, S0, True),
                                   dict(g=g, beta=beta, delta=True)),
        "fused_recurrent_gated_delta_rule": (
            lambda: fla.fused_recurrent_gated_delta_rule(q, k, v, g, gk, None, beta, None, S0, True),
            dict(g=g, gk=gk, beta=beta, delta=True)),
    }
    assert set(cases) == set(FLA_SIGNATURES)
    for name, (call, spec) in cases.items():
        o, S = call()
        want_o, want_S = naive(q, k, v, S0=S0, **spec)
        assert_close(o, want_o, msg=f"{name} o")
        assert_close(S, want_S, msg=f"{name} final state")


def test_grouped_value_heads_gradients_equal_the_naive_loop():
    x = inputs(T=9, seed=1)
    leaves = {n: x[n].clone().requires_grad_() for n in ("q", "k", "v", "g", "beta", "S0")}
    o, S = fla.chunk_gated_delta_rule(leaves["q"], leaves["k"], leaves["v"], leaves["g"], leaves["beta"],
                                      initial_state=leaves["S0"], output_final_state=True,
                                      use_qk_l2norm_in_kernel=True)
    want_o, want_S = naive(*(leaves[n] for n in ("q", "k", "v")), g=leaves["g"], beta=leaves["beta"], delta=True,
                           S0=leaves["S0"], l2norm=True)
    w = torch.randn_like(o)
    got = torch.autograd.grad((o * w).sum() + S.square().sum(), list(leaves.values()))
    want = torch.autograd.grad((want_o * w).sum() + want_S.square().sum(), list(leaves.values()))
    for name, a, b in zip(leaves, got, want):
        assert a.shape == leaves[name].shape
        assert_close(a, b, msg=f"d{name}")


def test_float32_gates_with_bfloat16_data_as_transformers_calls():
    x = inputs(T=16, seed=2)
    q, k, v = (x[n].bfloat16() for n in ("q", "k", "v"))
    g, beta = x["g"].float(), x["beta"].float()
    o, S = fla.chunk_gated_delta_rule(q, k, v, g, beta, output_final_state=True)
    want_o, want_S = naive(q, k, v, g=g, beta=beta, delta=True)
    assert o.dtype == torch.bfloat16 and S.dtype == torch.float32
    assert_close(o, want_o.bfloat16())
    assert_close(S, want_S.float())


def test_reverse_runs_each_sequence_backwards():
    x = inputs(B=1, T=12, seed=3)
    q, k, v, g = (x[n] for n in ("q", "k", "v", "g"))
    cu = torch.tensor([0, 5, 12])
    o, S = fla.fused_recurrent_simple_gla(q, k, v, g, initial_state=x["S0"][:1].repeat(2, 1, 1, 1),
                                          output_final_state=True, reverse=True, cu_seqlens=cu)
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        flip = lambda t: t[:, a:b].flip(1)  # noqa: E731
        want_o, want_S = naive(flip(q), flip(k), flip(v), g=flip(g), S0=x["S0"][:1])
        assert_close(o[:, a:b], want_o.flip(1), msg=f"sequence {i} o")
        assert_close(S[i:i + 1], want_S, msg=f"sequence {i} state")


def test_state_v_first_transposes_states_in_and_out():
    x = inputs(seed=4)
    q, k, v, g, beta, S0 = (x[n] for n in ("q", "k", "v", "g", "beta", "S0"))
    o, S = fla.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=S0.transpose(-1, -2), output_final_state=True,
                                      state_v_first=True)
    o2, S2 = fla.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=S0, output_final_state=True)
    assert torch.equal(o, o2) and torch.equal(S, S2.transpose(-1, -2))


def test_in_kernel_gates_equal_the_activated_gates():
    x = inputs(seed=5)
    q, k, v = (x[n] for n in ("q", "k", "v"))
    HV = v.shape[2]
    raw, logits = torch.randn(*v.shape[:3], dtype=F64), torch.randn(*v.shape[:3], dtype=F64)
    A_log, dt_bias = torch.randn(HV, dtype=F64) * 0.5, torch.randn(HV, dtype=F64)
    g = -A_log.float().exp() * F.softplus(raw.float() + dt_bias.float())
    o, _ = fla.chunk_gated_delta_rule(q, k, v, raw, logits, use_gate_in_kernel=True, A_log=A_log, dt_bias=dt_bias,
                                      use_beta_sigmoid_in_kernel=True, allow_neg_eigval=True)
    want, _ = fla.chunk_gated_delta_rule(q, k, v, g, 2 * torch.sigmoid(logits.float()))
    assert_close(o, want)
    o3, _ = fla.fused_recurrent_gated_delta_rule(q, k, v, raw, beta=logits, use_gate_in_kernel=True, A_log=A_log,
                                                 dt_bias=dt_bias, use_beta_sigmoid_in_kernel=True,
                                                 allow_neg_eigval=True)
    assert_close(o3, want)


def test_normalize_divides_by_the_running_key_sum():
    x = inputs(H=2, HV=2, seed=6)
    q, k, v = (x[n] for n in ("q", "k", "v"))
    o, (S, z) = fla.chunk_linear_attn(q, k, v, output_final_state=True)  # normalize=True by default
    plain, _ = naive(q, k, v)
    zs = k.cumsum(1)
    denom = (q * q.shape[-1] ** -0.5 * zs).sum(-1, keepdim=True) + 1e-10
    assert_close(o, plain / denom)
    assert_close(z, zs[:, -1:])
    # chained: the second half from the first half's (S, z) equals the whole
    o1, st = fla.chunk_linear_attn(q[:, :6], k[:, :6], v[:, :6], output_final_state=True)
    o2, _ = fla.chunk_linear_attn(q[:, 6:], k[:, 6:], v[:, 6:], initial_state=st, output_final_state=True)
    assert_close(torch.cat([o1, o2], 1), o)


def test_options_fla_accepts_and_those_retain_refuses():
    x = inputs(seed=7)
    q, k, v, g, beta = (x[n] for n in ("q", "k", "v", "g", "beta"))
    base, _ = fla.chunk_gated_delta_rule(q, k, v, g, beta)
    same, _ = fla.chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=32, cu_seqlens_cpu=None, chunk_indices=None)
    assert torch.equal(base, same)
    with pytest.raises(NotImplementedError, match=r"retain\.fla\.chunk_gated_delta_rule: cp_context is not supported"):
        fla.chunk_gated_delta_rule(q, k, v, g, beta, cp_context=object())
    with pytest.raises(NotImplementedError, match=r"retain\.fla\.fused_recurrent_gla: gv is not supported"):
        fla.fused_recurrent_gla(q, k, v, gv=torch.zeros(*v.shape))
    with pytest.raises(TypeError, match=r"retain\.fla\.chunk_delta_rule: head_first was removed"):
        fla.chunk_delta_rule(q, k, v, beta, head_first=True)
    with pytest.raises(TypeError, match=r"retain\.fla\.chunk_gla: unexpected keyword argument 'bogus'"):
        fla.chunk_gla(q, k, v, x["gk"], bogus=1)
    with pytest.raises(ValueError, match=r"allow_neg_eigval=True requires use_beta_sigmoid_in_kernel=True"):
        fla.chunk_gated_delta_rule(q, k, v, g, beta, allow_neg_eigval=True)
    with pytest.raises(ValueError, match=r"use_gate_in_kernel=True needs A_log"):
        fla.chunk_gated_delta_rule(q, k, v, g, beta, use_gate_in_kernel=True)
    with pytest.raises(ValueError, match=r"v must have shape \(2, 11, H, V\) with H a multiple of q's 2 heads"):
        fla.chunk_delta_rule(q, k, v[:, :, :3], beta[:, :, :3])


def test_under_torch_compile():
    torch._dynamo.reset()
    x = inputs(seed=8, dtype=torch.float32)
    q, k, v = (x[n] for n in ("q", "k", "v"))
    g, beta = x["g"].float(), x["beta"].float()
    f = torch.compile(lambda *a: fla.chunk_gated_delta_rule(*a, output_final_state=True), fullgraph=True)
    o, S = f(q, k, v, g, beta)
    want_o, want_S = fla.chunk_gated_delta_rule(q, k, v, g, beta, output_final_state=True)
    assert_close(o, want_o)
    assert_close(S, want_S)


@pytest.mark.parametrize("name", ["fused_recurrent_simple_gla", "fused_recurrent_gla", "fused_recurrent_retention",
                                  "chunk_simple_gla", "chunk_gla", "chunk_gated_delta_rule",
                                  "fused_recurrent_gated_delta_rule"])
def test_transpose_state_layout_is_state_v_first(name):
    x = inputs(B=1, T=5, H=1, HV=1, K=2, V=3, seed=9)
    q, k, v = (x[n] for n in ("q", "k", "v"))
    gates = {"fused_recurrent_gla": dict(gk=x["gk"]), "chunk_gla": dict(g=x["gk"]),
             "chunk_simple_gla": dict(g=x["g"]), "fused_recurrent_simple_gla": dict(g=x["g"]),
             "chunk_gated_delta_rule": dict(g=x["g"], beta=x["beta"]),
             "fused_recurrent_gated_delta_rule": dict(g=x["g"], beta=x["beta"])}.get(name, {})
    fn = getattr(fla, name)
    _, a = fn(q, k, v, **gates, output_final_state=True, state_v_first=True)
    _, b = fn(q, k, v, **gates, output_final_state=True, transpose_state_layout=True)
    assert a.shape == (1, 1, 3, 2) and torch.equal(a, b)
    with pytest.raises(ValueError, match="pass state_v_first or the deprecated transpose_state_layout, not both"):
        fn(q, k, v, **gates, state_v_first=True, transpose_state_layout=False)


def test_normalize_returns_the_key_sum_without_output_final_state():
    x = inputs(H=2, HV=2, seed=10)
    o, (S, z) = fla.fused_recurrent_linear_attn(x["q"], x["k"], x["v"], normalize=True)
    assert S is None and z.shape == (2, 1, 2, 5)


def test_chunk_size_must_be_one_fla_takes():
    x = inputs(seed=11)
    with pytest.raises(ValueError, match=r"chunk_size must be one of \(16, 32, 64\) \(as fla's\), got 48"):
        fla.chunk_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], chunk_size=48)
