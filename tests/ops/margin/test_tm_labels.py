"""retain.ops.pack_tm_labels / unpack_tm_labels: the 2-bit label storage tm_loss reads."""

from __future__ import annotations

import pytest
import torch

from retain.ops import pack_tm_labels, unpack_tm_labels
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
