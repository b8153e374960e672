"""The materialising reference of the cached readout (retain.ops.cache.reference), the oracle the
fused kernel will be held to: residual caching of restarted linear memories equals linear attention
over the whole sequence; soup equals gated; sparse with top_k >= the cached segments equals gated,
and with top_k = 1 reads one cached state; every mode is causal; gradients flow into the states."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from retain.ops import segment_mean
from retain.ops.cache.reference import MODES, cached_readout_ref
from tests.helpers import assert_close

F64 = torch.float64


def _restarted_linear_memories(q, k, v, L, scale):
    """Linear attention restarted at every segment: the online outputs, and each segment's final
    state S_i = Σ_{t in segment i} k_t v_tᵀ."""
    B, T, H, K = q.shape
    ns = -(-T // L)
    o = torch.zeros(B, T, H, v.shape[-1], dtype=q.dtype)
    states = torch.zeros(B, ns, H, K, v.shape[-1], dtype=q.dtype)
    for s in range(ns):
        S = torch.zeros(B, H, K, v.shape[-1], dtype=q.dtype)
        for t in range(s * L, min((s + 1) * L, T)):
            S = S + torch.einsum("bhk,bhv->bhkv", k[:, t], v[:, t])
            o[:, t] = torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, S)
        states[:, s] = S
    return o, states


def _inputs(seed, B=2, T=11, H=2, K=3, V=4, L=3):
    g = torch.Generator().manual_seed(seed)
    q, k, u = (torch.randn(B, T, H, K, generator=g, dtype=F64) for _ in range(3))
    v = torch.randn(B, T, H, V, generator=g, dtype=F64)
    o, states = _restarted_linear_memories(q, k, v, L, K ** -0.5)
    return dict(q=q, u=u, states=states, seg_keys=segment_mean(k, L), o_online=o,
                online_keys=segment_mean(k, L, causal=True)), k, v, L


def test_residual_caching_of_restarted_linear_memories_is_linear_attention():
    d, k, v, L = _inputs(0)
    y = cached_readout_ref(**d, segment_len=L, mode="residual")
    K = d["q"].shape[-1]
    causal = torch.tril(torch.ones(k.shape[1], k.shape[1], dtype=F64))
    full = torch.einsum("bthk,bshk,ts,bshv->bthv", d["q"] * K ** -0.5, k, causal, v)
    assert_close(y, full)


@given(seed=st.integers(0, 500), T=st.integers(1, 13), L=st.integers(1, 5))
def test_soup_equals_gated_and_sparse_with_every_segment_equals_gated(seed, T, L):
    d, _, _, _ = _inputs(seed, T=T, L=L)
    gated = cached_readout_ref(**d, segment_len=L, mode="gated")
    assert torch.equal(cached_readout_ref(**d, segment_len=L, mode="soup"), gated)
    ns = d["states"].shape[1]
    for top_k in (ns, ns + 3, None):
        assert_close(cached_readout_ref(**d, segment_len=L, mode="sparse", top_k=top_k), gated)


def test_sparse_top1_reads_the_best_cached_segment_and_the_online_one():
    d, _, _, L = _inputs(3, T=12, L=3)
    y = cached_readout_ref(**d, segment_len=L, mode="sparse", top_k=1)
    b, t, h = 1, 10, 0  # segment 3: cached segments 0, 1, 2
    scores = torch.stack([d["u"][b, t, h] @ d["seg_keys"][b, i, h] for i in range(3)])
    best = int(scores.argmax())
    z = torch.stack([scores[best], d["u"][b, t, h] @ d["online_keys"][b, t, h]])
    w = torch.softmax(z, 0)
    read = d["states"][b, best, h].T @ (d["q"][b, t, h] * d["q"].shape[-1] ** -0.5)
    assert_close(y[b, t, h], w[0] * read + w[1] * d["o_online"][b, t, h])


def test_the_first_segment_reads_only_its_online_memory():
    d, _, _, L = _inputs(4)
    for mode in MODES:
        y = cached_readout_ref(**d, segment_len=L, mode=mode, top_k=1)
        assert_close(y[:, :L], d["o_online"][:, :L])


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_is_causal(mode):
    d, _, _, L = _inputs(5, T=12)
    y = cached_readout_ref(**d, segment_len=L, mode=mode, top_k=2)
    t0 = 7  # change every input from token 7 on, and the states of segments >= 7 // L
    e = {n: x.clone() for n, x in d.items()}
    for n in ("q", "u", "o_online", "online_keys"):
        e[n][:, t0:] += 1.0
    e["states"][:, t0 // L:] += 1.0
    e["seg_keys"][:, t0 // L:] += 1.0
    z = cached_readout_ref(**e, segment_len=L, mode=mode, top_k=2)
    assert torch.equal(y[:, :t0], z[:, :t0])


@pytest.mark.parametrize("mode", MODES)
def test_gradients_reach_the_cached_states_and_every_input(mode):
    d, _, _, L = _inputs(6, T=9)
    leaves = {n: x.detach().clone().requires_grad_() for n, x in d.items()}
    y = cached_readout_ref(**leaves, segment_len=L, mode=mode, top_k=1)
    y.square().sum().backward()
    want = {"q", "states", "o_online"} | (set() if mode == "residual" else {"u", "seg_keys", "online_keys"})
    for n, x in leaves.items():
        assert (x.grad is not None and x.grad.abs().sum() > 0) == (n in want), (mode, n)
