"""Per-sample gradients where torch.func cannot pass through the model: EWC and MAS on a model with
a retain scan (a custom op) fall back from vmap to one autograd pass per sample ('auto') and equal
per_sample='loop'; 'loop' equals 'vmap' where both run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import retain
from tests.helpers import assert_close


class TinyMemoryLM(nn.Module):
    def __init__(self, memory=True):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(17, 8)
        self.mix = retain.nn.MemoryLayer(8, 2, 4, mode="gated_delta", conv_size=2) if memory else nn.LayerNorm(8)
        self.head = nn.Linear(8, 17)

    def forward(self, x):
        h = self.mix(self.emb(x))
        return self.head(h[0] if isinstance(h, tuple) else h)


def lm_loss(out, y):
    return F.cross_entropy(out.flatten(0, 1), y.flatten())


def data(n=3):
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 17, (4, 6), generator=g), torch.randint(0, 17, (4, 6), generator=g)) for _ in range(n)]


def test_torch_func_cannot_pass_through_the_scan():
    with pytest.raises(RuntimeError, match="functorch transforms"):
        torch.func.grad(lambda q: retain.ops.delta_rule(q, q, q, 0.5)[0].sum())(torch.randn(1, 3, 1, 2))


@pytest.mark.parametrize("mode", ["diag", "both"])
def test_ewc_auto_falls_back_to_the_loop(mode):
    batches = data()
    penalties = []
    for per_sample in ("auto", "loop"):
        model = TinyMemoryLM()
        ewc = retain.cl.EWC(model, mode=mode, per_sample=per_sample, chunk_size=3)
        ewc.consolidate(batches, lm_loss)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
        penalties.append(ewc.penalty())
        assert ewc._per_sample.loop
    assert penalties[0] > 0
    assert_close(penalties[0], penalties[1])


@pytest.mark.parametrize("cls", ["EWC", "MAS"])
def test_loop_equals_vmap_where_both_run(cls):
    batches = data(2)
    results = []
    for per_sample in ("vmap", "loop"):
        model = TinyMemoryLM(memory=False)
        s = getattr(retain.cl, cls)(model, per_sample=per_sample, chunk_size=3)
        if cls == "EWC":
            s.consolidate(batches, lm_loss)
            results.append(s.anchors[0].diag)
        else:
            s.consolidate(batches)
            results.append(s.importance)
    for a, b in zip(*results):
        assert_close(a, b)


def test_mas_on_a_memory_model():
    model = TinyMemoryLM()
    mas = retain.cl.MAS(model)
    mas.consolidate(data(2))
    assert mas._per_sample.loop and sum(float(t.sum()) for t in mas.importance) > 0


def test_bad_method_is_refused():
    with pytest.raises(ValueError, match=r"retain\.cl\.EWC: per_sample must be one of \('auto', 'vmap', 'loop'\)"):
        retain.cl.EWC(TinyMemoryLM(), per_sample="jit")
