"""retain.nn.MemoryLayer: every mode continues from its state exactly (chunks and single tokens
equal one call), gradients reach every parameter, variants without conv / norm / gate, under
torch.compile, and bad arguments."""

from __future__ import annotations

import pytest
import torch

from retain.nn import MemoryLayer, MemoryState
from retain.nn.memory_layer import MODES
from tests.helpers import assert_close

F64 = torch.float64


def layer(mode, **kw):
    torch.manual_seed(0)
    return MemoryLayer(24, num_heads=2, head_dim=6, value_dim=5, mode=mode, **kw).to(F64)


@pytest.mark.parametrize("mode", list(MODES))
def test_chunks_and_single_tokens_equal_one_call(mode):
    m = layer(mode)
    x = torch.randn(2, 13, 24, dtype=F64)
    y, state = m(x)
    pieces, s = [], None
    for a, b in ((0, 5), (5, 6), (6, 7), (7, 13)):
        out, s = m(x[:, a:b], s)
        pieces.append(out)
    assert s.pos == 13
    assert_close(torch.cat(pieces, 1), y)
    finals = state.memory if isinstance(state.memory, tuple) else (state.memory,)
    for got, want in zip(s.memory if isinstance(s.memory, tuple) else (s.memory,), finals):
        assert_close(got, want)
    assert isinstance(state.memory, tuple) == (mode == "titans")


@pytest.mark.parametrize("mode", list(MODES))
def test_every_parameter_gets_a_gradient(mode):
    m = layer(mode)
    y, state = m(torch.randn(2, 9, 24, dtype=F64))
    memory = state.memory[0] if isinstance(state.memory, tuple) else state.memory
    (y.square().mean() + memory.square().mean()).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kw", [dict(conv_size=0), dict(norm=False, output_gate=False), dict(qk_norm=False),
                                dict(conv_size=1)], ids=str)
def test_variants_continue_exactly(kw):
    m = layer("delta", **kw)
    x = torch.randn(1, 8, 24, dtype=F64)
    y, _ = m(x)
    a, s = m(x[:, :3])
    b, _ = m(x[:, 3:], s)
    assert_close(torch.cat([a, b], 1), y)
    assert (s.conv is None) == (m.conv_size == 0)


def test_under_torch_compile():
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = MemoryLayer(16, num_heads=2, head_dim=4, mode="gated_delta")
    x = torch.randn(2, 11, 16)
    want, _ = m(x)
    want.sum().backward()
    grads = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    compiled = torch.compile(lambda t: m(t)[0], fullgraph=True)
    got = compiled(x)
    got.sum().backward()
    assert_close(got, want)
    for p, g in zip(m.parameters(), grads):
        assert_close(p.grad, g)


@pytest.mark.parametrize("make,exc,match", [
    (lambda: MemoryLayer(8, 2, mode="gdn"), ValueError, r"retain\.nn\.MemoryLayer: mode must be one of"),
    (lambda: MemoryLayer(0, 2), ValueError, r"retain\.nn\.MemoryLayer: d_model must be >= 1, got 0"),
    (lambda: MemoryLayer(8, 2, mode="lp", p=0.5), ValueError, r"retain\.nn\.MemoryLayer: p must be"),
    (lambda: MemoryLayer(8, 2, head_dim=4)(torch.randn(3, 8)), ValueError, r"x must be a \[B, T, D\] tensor"),
    (lambda: MemoryLayer(8, 2, head_dim=4)(torch.randn(1, 3, 8), "state"), TypeError, r"state must be a MemoryState"),
])
def test_bad_arguments(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_state_is_a_memory_state():
    y, s = MemoryLayer(8, 2, head_dim=4)(torch.randn(1, 3, 8))
    assert isinstance(s, MemoryState) and s.conv.shape == (1, 3, 2 * 2 * 4 + 2 * 4)
