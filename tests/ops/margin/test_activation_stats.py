"""retain.ops.activation_stats / tm_thresholds: exact merging of per-dimension statistics."""

from __future__ import annotations

import torch

from retain.ops import activation_stats, tm_thresholds
from tests.helpers import assert_close

F64 = torch.float64


def test_activation_stats_merge_is_exact():
    g = torch.Generator().manual_seed(11)
    h = torch.randn(40, 6, 16, generator=g, dtype=F64) * 3 + 100  # a large mean: the unstable case
    mask = torch.rand(40, 6, generator=g) > 0.2
    whole = activation_stats(h, mask)
    parts = [activation_stats(h[i:j], mask[i:j]) for i, j in ((0, 7), (7, 8), (8, 8), (8, 40))]
    merged = parts[0]
    for p in parts[1:]:
        merged = merged.merge(p)
    x = h[mask].to(F64)
    assert merged.count.item() == whole.count.item() == x.shape[0]
    assert_close(merged.mean, x.mean(0))
    assert_close(merged.m2, ((x - x.mean(0)) ** 2).sum(0))
    pos, neg = tm_thresholds(merged, k=1.5)
    assert_close(pos, (x.mean(0) + 1.5 * x.std(0)).float())
    assert_close(neg, (x.mean(0) - 1.5 * x.std(0)).float())
