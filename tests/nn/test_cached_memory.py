"""retain.nn.CachedMemory: continuing from a cache (token by token, any chunks) gives the outputs of
one call over the whole sequence for every memory, init and mode; residual caching of restarted
linear memories is linear attention; gradients reach earlier segments through the cached states
only; torch.compile; bad arguments."""

from __future__ import annotations

import pytest
import torch

from retain.nn import CachedMemory
from retain.ops.cache.cached_readout import cached_readout_op
from tests.helpers import assert_close

F64 = torch.float64


def layer(**kw):
    torch.manual_seed(0)
    args = dict(num_heads=2, head_dim=4, value_dim=3, segment_len=3)
    return CachedMemory(16, **{**args, **kw}).double()


def chunked(m, x, sizes):
    ys, cache, t = [], None, 0
    for n in sizes:
        y, cache = m(x[:, t:t + n], cache)
        ys.append(y)
        t += n
    return torch.cat(ys, 1), cache


CONFIGS = ([dict(memory=m) for m in ("linear", "delta", "gated_delta", "titans")]
           + [dict(mode=None), dict(mode="residual"), dict(mode="soup"), dict(mode="sparse", top_k=1)]
           + [dict(init="restart", memory=m) for m in ("delta", "titans")]
           + [dict(init="restart", mode="sparse", top_k=2)])


@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize("sizes", [[1] * 11, [4, 7], [3, 3, 5], [2, 6, 1, 2]], ids=str)
def test_continuing_from_a_cache_equals_one_call(kw, sizes):
    m = layer(**kw)
    x = torch.randn(2, 11, 16, generator=torch.Generator().manual_seed(1), dtype=F64)
    y, cache = m(x)
    y2, cache2 = chunked(m, x, sizes)
    assert_close(y2, y)
    assert cache.pos == cache2.pos == 11
    assert_close(cache2.states, cache.states)
    assert_close(cache2.seg_keys, cache.seg_keys)
    assert_close(cache2.key_sum, cache.key_sum)
    for a, b in zip(*(c.memory if isinstance(c.memory, tuple) else (c.memory,) for c in (cache2, cache))):
        assert_close(a, b)


def test_residual_caching_of_restarted_linear_memories_is_linear_attention():
    x = torch.randn(2, 13, 16, generator=torch.Generator().manual_seed(2), dtype=F64)
    cached = layer(memory="linear", init="restart", mode="residual")
    plain = layer(memory="linear", init="checkpoint", mode=None)
    plain.load_state_dict(cached.state_dict())
    assert_close(cached(x)[0], plain(x)[0])


@pytest.mark.parametrize("mode,top_k", [("gated", None), ("residual", None), ("sparse", 1)])
def test_gradients_reach_earlier_segments_through_the_cached_states(mode, top_k):
    # restarted memories: the last segment sees the first one only through its cached state
    x = torch.randn(1, 12, 16, generator=torch.Generator().manual_seed(3), dtype=F64, requires_grad=True)
    y, _ = layer(init="restart", mode=mode, top_k=top_k)(x)
    (gx,) = torch.autograd.grad(y[:, 9:].sum(), x)
    assert gx[:, :3].abs().sum() > 0 and gx[:, 3:9].abs().sum() > 0
    y, _ = layer(init="restart", mode=None)(x)
    (gx,) = torch.autograd.grad(y[:, 9:].sum(), x)
    assert gx[:, :9].abs().sum() == 0  # no caching: nothing crosses a restart


def test_torch_compile_forward_and_backward():
    m = layer(memory="gated_delta")
    x = torch.randn(2, 10, 16, generator=torch.Generator().manual_seed(4), dtype=F64, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: m(x)[0], fullgraph=True)
    y, yc = m(x)[0], compiled(x)
    assert_close(yc, y)
    assert_close(torch.autograd.grad(yc.square().sum(), x)[0], torch.autograd.grad(y.square().sum(), x)[0])


def test_float32_layer_runs_the_fused_kernels(monkeypatch):
    torch.manual_seed(5)
    m = CachedMemory(32, num_heads=2, head_dim=16, segment_len=8)
    x = torch.randn(2, 40, 32)
    y, cache = m(x)
    y.square().mean().backward()
    assert y.shape == x.shape and cache.states.shape == (2, 5, 2, 16, 16)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    # the layer's readout is the native op: with the CPU kernels off and no fallback allowed it stops
    monkeypatch.delenv("RETAIN_FALLBACK", raising=False)
    with cached_readout_op.set_kernel_enabled("cpu", enabled=False), \
            pytest.raises(NotImplementedError, match=r"retain::cached_readout: no kernel"):
        torch._dynamo.reset()
        m(x)


@pytest.mark.parametrize("kw,pattern", [
    (dict(memory="mamba"), r"memory must be one of \('linear', 'delta', 'gated_delta', 'titans'\)"),
    (dict(mode="mean"), r"mode must be one of"),
    (dict(init="warm"), r"init must be one of \('checkpoint', 'restart'\)"),
    (dict(mode="sparse"), r"top_k goes with mode 'sparse'"),
    (dict(top_k=2), r"top_k goes with mode 'sparse'"),
    (dict(segment_len=0), r"segment_len must be an int >= 1, got 0"),
    (dict(num_heads=1.5), r"num_heads must be an int >= 1, got 1.5"),
])
def test_bad_arguments(kw, pattern):
    with pytest.raises(ValueError, match=r"retain.nn.CachedMemory: " + pattern):
        layer(**kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_continuing_in_16_and_32_bits_equals_one_call(dtype):
    torch.manual_seed(6)
    m = CachedMemory(32, num_heads=2, head_dim=16, segment_len=4).to(dtype)
    x = torch.randn(1, 13, 32).to(dtype)
    with torch.no_grad():
        y, _ = m(x)
        y2, _ = chunked(m, x, [1, 5, 2, 5])
    assert_close(y2, y)


def test_a_cache_from_another_layer_or_no_cache_is_refused():
    m = layer()
    _, cache = m(torch.randn(1, 7, 16, dtype=F64))
    with pytest.raises(ValueError, match=r"retain.nn.CachedMemory: cache.states must have shape \(2, 2, 2, 4, 3\)"):
        m(torch.randn(2, 1, 16, dtype=F64), cache)
    with pytest.raises(TypeError, match=r"retain.nn.CachedMemory: cache must be a CachedMemoryState .* got dict"):
        m(torch.randn(1, 1, 16, dtype=F64), {})


def test_restart_with_no_tokens():
    y, cache = layer(init="restart")(torch.zeros(2, 0, 16, dtype=F64))
    assert y.shape == (2, 0, 16) and cache.pos == 0


def test_bad_input_shape():
    with pytest.raises(ValueError, match=r"retain.nn.CachedMemory: x must be a \[B, T, D\] tensor, got \(4, 16\)"):
        layer()(torch.zeros(4, 16, dtype=F64))
