"""The scan references (memory_scan_ref and its named forms): closed forms, an independent per-head
matrix implementation, special cases of the gates, varlen, state passing, cached states, gradients."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from retain.ops.scan.reference import (
    L2NORM_EPS,
    LP_EPS,
    delta_rule_ref,
    gated_delta_rule_ref,
    l2norm_ref,
    linear_attn_ref,
    lp_psi_ref,
    memory_scan_ref,
    titans_linear_ref,
)
from tests.helpers import assert_close

F64 = torch.float64


def randn(*shape, seed, scale=1.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * scale


def rand(*shape, seed, low=0.0, high=1.0):
    return low + (high - low) * torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def make_qkv(B, T, H, K, V, seed=0):
    return randn(B, T, H, K, seed=seed), randn(B, T, H, K, seed=seed + 1) * 0.5, randn(B, T, H, V, seed=seed + 2)


def direct_scan(q, k, v, beta, *, g=None, a=None, eta=None, objective="l2", p=3.0, delta=1.0, scale=None,
                S0=None, Z0=None, retention_first=False):
    """Independent oracle: one (batch, head) at a time with K x V matrices and a diagonal retention
    matrix. ``g`` log gates or ``a`` factors, [B, T, H] or [B, T, H, K]; beta/eta [B, T, H] or numbers.
    Returns (o, S_T, Z_T)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    if g is not None:
        a = torch.exp(g)
    at = lambda x, b, t, h: x[b, t, h] if isinstance(x, torch.Tensor) else x  # noqa: E731
    o = torch.zeros(B, T, H, V, dtype=F64)
    S_out = torch.zeros(B, H, K, V, dtype=F64)
    Z_out = torch.zeros(B, H, K, V, dtype=F64)
    for b in range(B):
        for h in range(H):
            S = S0[b, h].clone() if S0 is not None else torch.zeros(K, V, dtype=F64)
            Z = Z0[b, h].clone() if Z0 is not None else torch.zeros(K, V, dtype=F64)
            for t in range(T):
                kt, vt = k[b, t, h], v[b, t, h]
                A = torch.eye(K, dtype=F64) if a is None else torch.diag(at(a, b, t, h) * torch.ones(K, dtype=F64))
                base = A @ S if retention_first else S
                e = base.T @ kt - vt
                psi = {
                    "dot": -vt,
                    "l2": e,
                    "lp": p * e * (e * e + 1e-6) ** ((p - 2) / 2),
                    "huber": torch.where(e.abs() <= delta, e, delta * torch.sign(e)),
                }[objective]
                step = -at(beta, b, t, h) * torch.outer(kt, psi)
                Z = at(eta, b, t, h) * Z + step if eta is not None else step
                S = A @ S + Z
                o[b, t, h] = S.T @ (scale * q[b, t, h])
            S_out[b, h], Z_out[b, h] = S, Z
    return o, S_out, Z_out


def test_the_smoothing_constants_act_as_documented():
    # l2norm: x / sqrt(|x|^2 + L2NORM_EPS); with |x|^2 = L2NORM_EPS the norm is sqrt(2 L2NORM_EPS)
    x = torch.full((4,), (L2NORM_EPS / 4) ** 0.5, dtype=torch.float64)
    assert_close(l2norm_ref(x), x / (2 * L2NORM_EPS) ** 0.5)
    # lp: psi(e) = p e (e^2 + LP_EPS)^((p-2)/2), so psi'(0) = p LP_EPS^((p-2)/2)
    e = torch.zeros((), dtype=torch.float64, requires_grad=True)
    (slope,) = torch.autograd.grad(lp_psi_ref(e, 3.0), e)
    assert_close(slope, torch.tensor(3.0 * LP_EPS ** 0.5, dtype=torch.float64))


@pytest.mark.parametrize("gate", ["none", "head", "key"])
def test_linear_attn_ref_equals_masked_closed_form(gate):
    B, T, H, K, V = 2, 7, 3, 4, 5
    q, k, v = make_qkv(B, T, H, K, V)
    S0 = randn(B, H, K, V, seed=9)
    scale = K**-0.5
    mask = torch.ones(T, T, dtype=F64).tril()
    if gate == "none":
        o, S = linear_attn_ref(q, k, v, output_final_state=True)
        A = torch.einsum("bthk,bshk->bhts", q * scale, k) * mask
        want = torch.einsum("bhts,bshv->bthv", A, v)
        assert_close(o, want)
        assert_close(S, torch.einsum("bthk,bthv->bhkv", k, v))
        return
    g = -rand(B, T, H, *(() if gate == "head" else (K,)), seed=5, low=0.05, high=1.5)
    o, S = linear_attn_ref(q, k, v, g=g, initial_state=S0, output_final_state=True)
    G = g.cumsum(1)
    if gate == "head":
        D = torch.exp(G.permute(0, 2, 1)[..., :, None] - G.permute(0, 2, 1)[..., None, :]) * mask  # [B,H,t,s]
        want = torch.einsum("bhts,bthk,bshk,bshv->bthv", D, q * scale, k, v)
        want = want + torch.exp(G)[..., None] * torch.einsum("bthk,bhkv->bthv", q * scale, S0)
        S_want = torch.exp(G[:, -1])[..., None, None] * S0 + torch.einsum(
            "bth,bthk,bthv->bhkv", torch.exp(G[:, -1:] - G), k, v
        )
    else:
        D = torch.exp(G[:, :, None] - G[:, None, :]) * mask[None, :, :, None, None]  # [B,t,s,H,K]
        want = torch.einsum("btshk,bthk,bshk,bshv->bthv", D, q * scale, k, v)
        want = want + torch.einsum("bthk,bhkv->bthv", q * scale * torch.exp(G), S0)
        S_want = torch.exp(G[:, -1])[..., None] * S0 + torch.einsum("bthk,bthv->bhkv", torch.exp(G[:, -1:] - G) * k, v)
    assert_close(o, want)
    assert_close(S, S_want)


def test_delta_rule_ref_orthonormal_keys_recall_values():
    B, T, H, K, V = 2, 6, 2, 8, 3
    Q = torch.linalg.qr(randn(B, H, K, K, seed=3))[0]  # rows orthonormal
    k = Q[:, :, :T].permute(0, 2, 1, 3).contiguous()  # [B, T, H, K]
    v = randn(B, T, H, V, seed=4)
    q = randn(B, T, H, K, seed=5)
    o, S = delta_rule_ref(q, k, v, torch.ones(B, T, H, dtype=F64), output_final_state=True)
    assert_close(torch.einsum("bhkv,bthk->bthv", S, k), v)
    o2, S2 = delta_rule_ref(q, k, v, 1.0, output_final_state=True)
    assert_close(o2, o)
    assert_close(S2, S)


def test_gated_delta_rule_ref_and_the_order_of_retention():
    B, T, H, K, V = 2, 6, 2, 4, 3
    q, k, v = make_qkv(B, T, H, K, V, seed=10)
    g = -rand(B, T, H, seed=11, low=0.1, high=1.0)
    beta = rand(B, T, H, seed=12)
    S0 = randn(B, H, K, V, seed=13)
    o, S = gated_delta_rule_ref(q, k, v, g, beta, initial_state=S0, output_final_state=True)
    # e^{g}(I - beta k k^T) S + beta k v^T, written out
    want_o, want_S = torch.zeros(B, T, H, V, dtype=F64), torch.zeros(B, H, K, V, dtype=F64)
    for b in range(B):
        for h in range(H):
            M = S0[b, h]
            for t in range(T):
                kt = k[b, t, h]
                M = torch.exp(g[b, t, h]) * (torch.eye(K, dtype=F64) - beta[b, t, h] * torch.outer(kt, kt)) @ M
                M = M + beta[b, t, h] * torch.outer(kt, v[b, t, h])
                want_o[b, t, h] = M.T @ q[b, t, h] * K**-0.5
            want_S[b, h] = M
    assert_close(o, want_o)
    assert_close(S, want_S)
    o_scan, S_scan, _ = memory_scan_ref(q, k, v, beta, g=g, initial_state=S0, output_final_state=True,
                                        retention_first=True)
    assert_close(o_scan, o)
    o_late, _, _ = memory_scan_ref(q, k, v, beta, g=g, initial_state=S0, retention_first=False)
    assert (o_late - o).abs().max() > 1e-3, "error at S_{t-1} vs at the decayed state must differ when g != 0"
    zero = torch.zeros_like(g)
    o0, S0_out = gated_delta_rule_ref(q, k, v, zero, beta, initial_state=S0, output_final_state=True)
    o0_late, S0_late, _ = memory_scan_ref(q, k, v, beta, g=zero, initial_state=S0, output_final_state=True)
    assert_close(o0_late, o0)
    assert_close(S0_late, S0_out)
    o_delta, S_delta = delta_rule_ref(q, k, v, beta, initial_state=S0, output_final_state=True)
    assert_close(o_delta, o0)
    assert_close(S_delta, S0_out)


def test_titans_linear_ref():
    B, T, H, K, V = 2, 6, 2, 4, 3
    q, k, v = make_qkv(B, T, H, K, V, seed=20)
    theta = rand(B, T, H, seed=21)
    alpha = rand(B, T, H, seed=22, high=0.5)
    eta = rand(B, T, H, seed=23)
    S0, Z0 = randn(B, H, K, V, seed=24), randn(B, H, K, V, seed=25)
    # alpha = 0, eta = 0: the delta rule with beta = theta
    zero = torch.zeros(B, T, H, dtype=F64)
    o, (S, Z) = titans_linear_ref(q, k, v, theta, zero, zero, initial_state=S0, output_final_state=True)
    o_d, S_d = delta_rule_ref(q, k, v, theta, initial_state=S0, output_final_state=True)
    assert_close(o, o_d)
    assert_close(S, S_d)
    # general gates: the direct oracle, and memory_scan_ref with g = log(1 - alpha)
    o, (S, Z) = titans_linear_ref(q, k, v, theta, alpha, eta, initial_state=(S0, Z0), output_final_state=True)
    want_o, want_S, want_Z = direct_scan(q, k, v, theta, a=1 - alpha, eta=eta, S0=S0, Z0=Z0)
    assert_close(o, want_o)
    assert_close(S, want_S)
    assert_close(Z, want_Z)
    o_m, (S_m, Z_m), _ = memory_scan_ref(q, k, v, theta, g=torch.log1p(-alpha), eta=eta, initial_state=(S0, Z0),
                                         output_final_state=True)
    assert_close(o_m, o)
    assert_close(S_m, S)
    assert_close(Z_m, Z)
    # alpha = 1 wipes the memory every step: S_t = Z_t, exactly, with a finite gradient
    one = torch.ones(B, T, H, dtype=F64, requires_grad=True)
    for t in range(1, T + 1):
        o_t, (S_t, Z_t) = titans_linear_ref(q[:, :t], k[:, :t], v[:, :t], theta[:, :t], one[:, :t], eta[:, :t],
                                            initial_state=(S0, Z0), output_final_state=True)
        assert torch.equal(S_t, Z_t)
    (grad,) = torch.autograd.grad(o_t.sum() + S_t.sum(), one)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_objectives_special_cases():
    B, T, H, K, V = 1, 5, 2, 3, 4
    q, k, v = make_qkv(B, T, H, K, V, seed=30)
    beta = rand(B, T, H, seed=31)
    g = -rand(B, T, H, seed=32, high=0.5)
    S0 = randn(B, H, K, V, seed=33)
    kw = dict(g=g, initial_state=S0, output_final_state=True)
    o_l2, S_l2, _ = memory_scan_ref(q, k, v, beta, objective="l2", **kw)
    o_h, S_h, _ = memory_scan_ref(q, k, v, beta, objective="huber", delta=1e9, **kw)
    assert_close(o_h, o_l2)
    assert_close(S_h, S_l2)
    # lp with p = 2 is psi = 2 e exactly (the smoothing vanishes): l2 with twice the step
    o_p, S_p, _ = memory_scan_ref(q, k, v, beta, objective="lp", p=2.0, **kw)
    o_2, S_2, _ = memory_scan_ref(q, k, v, 2 * beta, objective="l2", **kw)
    assert_close(o_p, o_2)
    assert_close(S_p, S_2)
    # lp (p = 3, 1.5) and huber (small delta, both branches taken) against the direct oracle
    for objective, extra in (("lp", dict(p=3.0)), ("lp", dict(p=1.5)), ("huber", dict(delta=0.3))):
        o_x, S_x, _ = memory_scan_ref(q, k, v, beta, objective=objective, **extra, **kw)
        want_o, want_S, _ = direct_scan(q, k, v, beta, g=g, S0=S0, objective=objective, **extra)
        assert_close(o_x, want_o, msg=f"{objective} {extra}")
        assert_close(S_x, want_S, msg=f"{objective} {extra}")
    # dot with beta = 1 is linear attention; with beta it stores beta k v^T
    o_dot, S_dot, _ = memory_scan_ref(q, k, v, 1.0, objective="dot", g=g, initial_state=S0, output_final_state=True)
    o_la, S_la = linear_attn_ref(q, k, v, g=g, initial_state=S0, output_final_state=True)
    assert_close(o_dot, o_la)
    assert_close(S_dot, S_la)
    o_dot, S_dot, _ = memory_scan_ref(q, k, v, beta, objective="dot", g=g, initial_state=S0, output_final_state=True)
    o_la, S_la = linear_attn_ref(q, k * beta[..., None], v, g=g, initial_state=S0, output_final_state=True,
                                 scale=K**-0.5)
    assert_close(o_dot, o_la)
    assert_close(S_dot, S_la)


def test_lp_psi_ref_smoothing():
    e = torch.tensor([-3.0, -1.0, 1.0, 2.5], dtype=F64)
    for p in (1.0, 1.5, 3.0, 4.0):
        # |e| >= 1: the relative smoothing error (p - 2) / 2 * 1e-6 / e^2 is below float32 precision
        assert_close(lp_psi_ref(e, p).float(), (p * torch.sign(e) * e.abs() ** (p - 1)).float())
    z = torch.zeros(3, dtype=F64, requires_grad=True)
    for p in (1.0, 1.5, 3.0):
        (grad,) = torch.autograd.grad(lp_psi_ref(z, p).sum(), z)
        assert torch.isfinite(grad).all()
        assert_close(grad, torch.full((3,), p * LP_EPS ** ((p - 2) / 2), dtype=F64))


@given(
    B=st.integers(1, 2), T=st.integers(1, 6), H=st.integers(1, 2), K=st.integers(1, 4), V=st.integers(1, 4),
    objective=st.sampled_from(["dot", "l2", "lp", "huber"]), gate=st.sampled_from(["none", "head", "key"]),
    momentum=st.booleans(), retention_first=st.booleans(), seed=st.integers(0, 2**16),
)
def test_memory_scan_ref_matches_direct_oracle(B, T, H, K, V, objective, gate, momentum, retention_first, seed):
    q, k, v = make_qkv(B, T, H, K, V, seed=seed)
    beta = rand(B, T, H, seed=seed + 3)
    g = None if gate == "none" else -rand(B, T, H, *(() if gate == "head" else (K,)), seed=seed + 4)
    eta = rand(B, T, H, seed=seed + 5) if momentum else None
    S0, Z0 = randn(B, H, K, V, seed=seed + 6), randn(B, H, K, V, seed=seed + 7)
    extra = dict(p=2.5, delta=0.5)
    o, final, states = memory_scan_ref(
        q, k, v, beta, g=g, eta=eta, objective=objective, **extra, initial_state=(S0, Z0) if momentum else S0,
        output_final_state=True, retention_first=retention_first,
    )
    want_o, want_S, want_Z = direct_scan(q, k, v, beta, g=g, eta=eta, objective=objective, **extra, S0=S0,
                                         Z0=Z0 if momentum else None, retention_first=retention_first)
    assert states is None
    assert o.shape == (B, T, H, V) and o.dtype == F64
    assert_close(o, want_o)
    if momentum:
        assert isinstance(final, tuple)
        assert_close(final[0], want_S)
        assert_close(final[1], want_Z)
    else:
        assert isinstance(final, torch.Tensor) and final.shape == (B, H, K, V)
        assert_close(final, want_S)


def test_cu_seqlens_equals_each_sequence_alone():
    H, K, V = 2, 3, 4
    lengths = [5, 0, 3, 4]
    T = sum(lengths)
    N = len(lengths)
    q, k, v = make_qkv(1, T, H, K, V, seed=40)
    beta, eta = rand(1, T, H, seed=41), rand(1, T, H, seed=42)
    g = -rand(1, T, H, K, seed=43)
    S0, Z0 = randn(N, H, K, V, seed=44), randn(N, H, K, V, seed=45)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64)
    o, (S, Z), states = memory_scan_ref(q, k, v, beta, g=g, eta=eta, objective="huber", delta=0.5,
                                        initial_state=(S0, Z0), output_final_state=True, cu_seqlens=cu,
                                        states_every=2)
    assert o.shape == (1, T, H, V) and S.shape == Z.shape == (N, H, K, V)
    assert states.shape == (1, sum(n // 2 for n in lengths), H, K, V)
    want_states = []
    for n in range(N):
        sl = slice(int(cu[n]), int(cu[n + 1]))
        o_n, (S_n, Z_n), st_n = memory_scan_ref(q[:, sl], k[:, sl], v[:, sl], beta[:, sl], g=g[:, sl], eta=eta[:, sl],
                                                objective="huber", delta=0.5, initial_state=(S0[n:n + 1], Z0[n:n + 1]),
                                                output_final_state=True, states_every=2)
        assert_close(o[:, sl], o_n)
        assert_close(S[n:n + 1], S_n)
        assert_close(Z[n:n + 1], Z_n)
        want_states.append(st_n)
    assert_close(states, torch.cat(want_states, 1))
    assert_close(S[1], S0[1])  # the empty sequence keeps its initial state
    # the named ops take cu_seqlens too, without initial states
    o_g, S_g = gated_delta_rule_ref(q, k, v, g[..., 0], beta, cu_seqlens=cu, output_final_state=True)
    for n in range(N):
        sl = slice(int(cu[n]), int(cu[n + 1]))
        o_n, S_n = gated_delta_rule_ref(q[:, sl], k[:, sl], v[:, sl], g[:, sl, :, 0], beta[:, sl],
                                        output_final_state=True)
        assert_close(o_g[:, sl], o_n)
        assert_close(S_g[n:n + 1], S_n)


@pytest.mark.parametrize("retention_first", [False, True])
def test_split_sequence_with_state_passed_equals_one_call(retention_first):
    B, T, H, K, V = 2, 7, 2, 3, 4
    q, k, v = make_qkv(B, T, H, K, V, seed=50)
    beta, eta, g = rand(B, T, H, seed=51), rand(B, T, H, seed=52), -rand(B, T, H, seed=53)
    S0, Z0 = randn(B, H, K, V, seed=54), randn(B, H, K, V, seed=55)
    kw = dict(objective="lp", p=3.0, output_final_state=True, retention_first=retention_first)
    o, (S, Z), _ = memory_scan_ref(q, k, v, beta, g=g, eta=eta, initial_state=(S0, Z0), **kw)
    c = 3
    o1, state1, _ = memory_scan_ref(q[:, :c], k[:, :c], v[:, :c], beta[:, :c], g=g[:, :c], eta=eta[:, :c],
                                    initial_state=(S0, Z0), **kw)
    o2, (S2, Z2), _ = memory_scan_ref(q[:, c:], k[:, c:], v[:, c:], beta[:, c:], g=g[:, c:], eta=eta[:, c:],
                                      initial_state=state1, **kw)
    assert_close(torch.cat([o1, o2], 1), o)
    assert_close(S2, S)
    assert_close(Z2, Z)


def test_states_every_are_the_truncated_final_states():
    B, T, H, K, V, L = 2, 8, 2, 3, 2, 3
    q, k, v = make_qkv(B, T, H, K, V, seed=60)
    beta, eta, g = rand(B, T, H, seed=61), rand(B, T, H, seed=62), -rand(B, T, H, seed=63)
    S0 = randn(B, H, K, V, seed=64)
    kw = dict(g=g, eta=eta, initial_state=S0)
    o, _, states = memory_scan_ref(q, k, v, beta, states_every=L, **kw)
    assert states.shape == (B, T // L, H, K, V) and states.dtype == F64
    for j in range(T // L):
        t = (j + 1) * L  # states[:, j] is S after step t - 1, i.e. after the first t tokens
        _, (S_t, _), _ = memory_scan_ref(q[:, :t], k[:, :t], v[:, :t], beta[:, :t], g=g[:, :t], eta=eta[:, :t],
                                         initial_state=S0, output_final_state=True)
        assert_close(states[:, j], S_t)
    o_none, _, none = memory_scan_ref(q, k, v, beta, **kw)
    assert none is None
    assert_close(o_none, o)
    _, _, empty = memory_scan_ref(q[:, :2], k[:, :2], v[:, :2], beta[:, :2], states_every=L)
    assert empty.shape == (B, 0, H, K, V)
    # differentiable
    S0.requires_grad_()
    (grad,) = torch.autograd.grad(memory_scan_ref(q, k, v, beta, states_every=L, **kw)[2].sum(), S0)
    assert grad.abs().sum() > 0


def test_use_qk_l2norm_equals_normalising_beforehand():
    B, T, H, K, V = 2, 5, 2, 4, 3
    q, k, v = make_qkv(B, T, H, K, V, seed=70)
    q[0, 1, 0] = 0.0  # a zero vector stays zero
    beta, g = rand(B, T, H, seed=71), -rand(B, T, H, seed=72)
    norm = lambda x: x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)  # noqa: E731
    for objective in ("l2", "dot"):
        o, S, _ = memory_scan_ref(q, k, v, beta, g=g, objective=objective, use_qk_l2norm=True, output_final_state=True)
        o_n, S_n, _ = memory_scan_ref(norm(q), norm(k), v, beta, g=g, objective=objective, output_final_state=True)
        assert_close(o, o_n)
        assert_close(S, S_n)
    o, S = gated_delta_rule_ref(q, k, v, g, beta, use_qk_l2norm=True, output_final_state=True)
    o_n, S_n = gated_delta_rule_ref(norm(q), norm(k), v, g, beta, output_final_state=True)
    assert_close(o, o_n)
    assert_close(S, S_n)


@pytest.mark.parametrize(
    "objective,extra,gate,retention_first",
    [
        ("dot", {}, "head", False),
        ("l2", {}, "head", False),
        ("l2", {}, "key", True),
        ("lp", {"p": 3.0}, "head", False),
        ("lp", {"p": 1.5}, "key", False),
        ("huber", {"delta": 0.45}, "head", True),
    ],
)
def test_memory_scan_ref_gradcheck(objective, extra, gate, retention_first):
    B, T, H, K, V = 1, 3, 1, 2, 2
    q, k, v = make_qkv(B, T, H, K, V, seed=80)
    beta = rand(B, T, H, seed=81, low=0.2, high=0.9)
    g = -rand(B, T, H, *(() if gate == "head" else (K,)), seed=82, low=0.1, high=0.8)
    eta = rand(B, T, H, seed=83, low=0.2, high=0.9)
    S0, Z0 = randn(B, H, K, V, seed=84), randn(B, H, K, V, seed=85)
    inputs = [x.requires_grad_() for x in (q, k, v, beta, g, eta, S0, Z0)]

    def f(q, k, v, beta, g, eta, S0, Z0):
        o, (S, Z), states = memory_scan_ref(q, k, v, beta, g=g, eta=eta, objective=objective, **extra,
                                            initial_state=(S0, Z0), output_final_state=True, states_every=2,
                                            retention_first=retention_first)
        return o, S, Z, states

    assert torch.autograd.gradcheck(f, inputs)


def test_titans_linear_ref_gradcheck():
    B, T, H, K, V = 1, 3, 1, 2, 2
    q, k, v = make_qkv(B, T, H, K, V, seed=90)
    theta, alpha, eta = (rand(B, T, H, seed=s, low=0.1, high=0.9) for s in (91, 92, 93))
    S0 = randn(B, H, K, V, seed=94)
    inputs = [x.requires_grad_() for x in (q, k, v, theta, alpha, eta, S0)]

    def f(q, k, v, theta, alpha, eta, S0):
        o, (S, Z) = titans_linear_ref(q, k, v, theta, alpha, eta, initial_state=S0, output_final_state=True,
                                      use_qk_l2norm=True)
        return o, S, Z

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_inputs_compute_in_float32(dtype):
    B, T, H, K, V = 2, 5, 2, 4, 3
    q, k, v = (x.to(dtype) for x in make_qkv(B, T, H, K, V, seed=100))
    beta, g, eta = (x.to(dtype) for x in (rand(B, T, H, seed=101), -rand(B, T, H, seed=102), rand(B, T, H, seed=103)))
    kw = dict(g=g, eta=eta, output_final_state=True, states_every=2, use_qk_l2norm=True)
    o, (S, Z), states = memory_scan_ref(q, k, v, beta, **kw)
    assert o.dtype == dtype and S.dtype == Z.dtype == states.dtype == torch.float32
    f32 = lambda x: x.float()  # noqa: E731
    o32, (S32, Z32), states32 = memory_scan_ref(
        f32(q), f32(k), f32(v), f32(beta), **{**kw, "g": f32(g), "eta": f32(eta)}
    )
    assert_close(o, o32.to(dtype))
    assert_close(S, S32)
    assert_close(Z, Z32)
    assert_close(states, states32)
    o, S = gated_delta_rule_ref(q, k, v, g, beta, output_final_state=True)
    assert o.dtype == dtype and S.dtype == torch.float32
    o, S = linear_attn_ref(q, k, v, output_final_state=True)
    assert o.dtype == dtype and S.dtype == torch.float32


def test_empty_sequence_and_defaults():
    q, k, v = make_qkv(2, 0, 3, 4, 5)
    o, S, states = memory_scan_ref(q, k, v, 1.0, output_final_state=True, states_every=2)
    assert o.shape == (2, 0, 3, 5) and S.shape == (2, 3, 4, 5) and states.shape == (2, 0, 3, 4, 5)
    assert torch.equal(S, torch.zeros_like(S))
    q, k, v = make_qkv(1, 4, 1, 4, 2)
    o, final, states = memory_scan_ref(q, k, v, 0.5)
    assert final is None and states is None
    o_scaled, _, _ = memory_scan_ref(q * 0.5, k, v, 0.5, scale=1.0)
    assert_close(o, o_scaled)  # default scale K ** -0.5 = 0.5
    with pytest.raises(ValueError, match="objective"):
        memory_scan_ref(q, k, v, 0.5, objective="l1")
    with pytest.raises(ValueError, match="eta is None"):
        memory_scan_ref(q, k, v, 0.5, initial_state=(torch.zeros(1, 1, 4, 2, dtype=F64),) * 2)


def test_reference_docstring_examples():
    import doctest

    from retain.ops.scan import reference

    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    for fn in (memory_scan_ref, linear_attn_ref, delta_rule_ref, gated_delta_rule_ref, titans_linear_ref):
        for test in finder.find(fn, globs={"torch": torch, **vars(reference)}):
            runner.run(test)
    assert runner.failures == 0 and runner.tries >= 5
