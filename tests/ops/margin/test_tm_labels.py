"""retain.ops.pack_tm_labels / unpack_tm_labels: the 2-bit label storage tm_loss reads."""

from __future__ import annotations

import pytest
import torch

from retain.ops import activation_stats, pack_tm_labels, tm_thresholds, unpack_tm_labels
from retain.ops.margin import reference as ref


@pytest.mark.parametrize("D", [1, 3, 4, 5, 8, 4097])
def test_pack_unpack_roundtrip_and_storage(D):
    g = torch.Generator().manual_seed(D)
    refs = torch.randn(2, 3, D, generator=g)
    pos, neg = torch.full((D,), 0.5), torch.full((D,), -0.5)
    packed = pack_tm_labels(refs, pos, neg)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 3, (D + 3) // 4)
    labels = unpack_tm_labels(packed, D)
    assert torch.equal(labels, ref.tm_labels_ref(refs, pos, neg))


def test_packed_labels_of_a_gere_sample_are_16x_smaller_than_its_activations():
    # a 563-token x 4096-feature reference, packed as GeRe stores it
    refs = torch.randn(563, 4096, generator=torch.Generator().manual_seed(1))
    pos, neg = refs.mean(0) + refs.std(0), refs.mean(0) - refs.std(0)
    packed = pack_tm_labels(refs, pos, neg)
    assert packed.nbytes == 576_512
    assert refs.nbytes == 16 * packed.nbytes
    assert torch.equal(unpack_tm_labels(packed, 4096), ref.tm_labels_ref(refs, pos, neg))


def test_pack_and_unpack_refuse_what_has_no_label():
    ref = torch.randn(2, 3, 8)
    pos, neg = torch.ones(8), -torch.ones(8)
    with pytest.raises(ValueError, match=r"retain\.ops\.pack_tm_labels: pos_thr must broadcast against ref's shape "
                                         r"\(2, 3, 8\) \(e\.g\. \(8,\)\), got \(5,\)"):
        pack_tm_labels(ref, pos[:5], neg)
    bad = ref.clone()
    bad[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"pack_tm_labels: ref must not hold NaN .*got NaN at \[1, 2, 3\]"):
        pack_tm_labels(bad, pos, neg)
    with pytest.raises(ValueError, match=r"retain\.ops\.unpack_tm_labels: D must be >= 0, got -1"):
        unpack_tm_labels(torch.zeros(2, 2, dtype=torch.uint8), -1)
    with pytest.raises(TypeError, match=r"retain\.ops\.unpack_tm_labels: D must be an integer, got float 8\.0"):
        unpack_tm_labels(torch.zeros(2, 2, dtype=torch.uint8), 8.0)


@pytest.mark.parametrize("tokens", [0, 1])
def test_thresholds_need_two_tokens(tokens):
    stats = activation_stats(torch.randn(1, tokens, 4))
    with pytest.raises(ValueError, match=rf"retain\.ops\.tm_thresholds: stats must count at least 2 tokens .*got {tokens}"):
        tm_thresholds(stats)
    with pytest.raises(ValueError, match=r"tm_thresholds: k must be >= 0\.0, got -1\.0"):
        tm_thresholds(activation_stats(torch.randn(1, 4, 4)), k=-1.0)
