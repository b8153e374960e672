"""``retain.ops.pack_tm_labels`` / ``unpack_tm_labels``: GeRe's reference activations stored as
2-bit labels, four per byte (what ``retain.ops.tm_loss`` reads directly)."""

from __future__ import annotations

import torch
from torch import Tensor

from retain.ops._checks import check_tensor, dtype_name
from retain.ops.margin import reference


def pack_tm_labels(ref: Tensor, pos_thr: Tensor, neg_thr: Tensor) -> Tensor:
    """Labels of reference activations ``ref`` ``[..., D]`` packed four per byte:
    uint8 ``[..., ceil(D/4)]`` (16× smaller than float32 references, 4× smaller than int8 labels).
    +1 where ref ≥ τ⁺, −1 where ref ≤ τ⁻, 0 between; thresholds broadcast against ``ref``.

    Examples::

        >>> ref = torch.tensor([[2.0, -2.0, 0.0, 5.0, -5.0]])
        >>> packed = retain.ops.pack_tm_labels(ref, torch.ones(5), -torch.ones(5))
        >>> packed.shape, packed.dtype
        (torch.Size([1, 2]), torch.uint8)
        >>> retain.ops.unpack_tm_labels(packed, 5)
        tensor([[ 1, -1,  0,  1, -1]], dtype=torch.int8)
    """
    op = "retain.ops.pack_tm_labels"
    check_tensor(op, "ref", ref, ndim_min=1)
    for name, t in (("pos_thr", pos_thr), ("neg_thr", neg_thr)):
        check_tensor(op, name, t)
    return reference.pack_tm_labels_ref(reference.tm_labels_ref(ref, pos_thr, neg_thr))


def unpack_tm_labels(packed: Tensor, D: int) -> Tensor:
    """uint8 ``[..., ceil(D/4)]`` from :func:`pack_tm_labels` -> int8 labels ``[..., D]``.

    Examples::

        >>> retain.ops.unpack_tm_labels(torch.tensor([[0b10_00_01]], dtype=torch.uint8), 3)
        tensor([[ 1,  0, -1]], dtype=torch.int8)
    """
    check_tensor("retain.ops.unpack_tm_labels", "packed", packed)
    if packed.dtype != torch.uint8:
        raise TypeError(f"retain.ops.unpack_tm_labels: packed must be uint8, got {dtype_name(packed)}")
    if packed.shape[-1] != (D + 3) // 4:
        raise ValueError(f"retain.ops.unpack_tm_labels: packed's last dimension must be ceil(D/4) = {(D + 3) // 4} "
                         f"for D = {D}, got {packed.shape[-1]}")
    return reference.unpack_tm_labels_ref(packed, D)


