"""``retain.ops.pack_tm_labels`` / ``unpack_tm_labels``: GeRe's reference activations stored as
2-bit labels, four per byte (what ``retain.ops.tm_loss`` reads directly)."""

from __future__ import annotations

import torch
from torch import Tensor

from retain.ops._checks import check_device, check_floating, check_int, check_tensor, dtype_name
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
    check_floating(op, "ref", ref, ())
    for name, t in (("pos_thr", pos_thr), ("neg_thr", neg_thr)):
        check_tensor(op, name, t)
        check_floating(op, name, t, ())
        check_device(op, name, t, "ref", ref)
        try:
            fits = torch.broadcast_shapes(t.shape, ref.shape) == ref.shape
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"{op}: {name} must broadcast against ref's shape {tuple(ref.shape)} (e.g. "
                             f"{(ref.shape[-1],)}), got {tuple(t.shape)}")
    if not torch.compiler.is_compiling() and bool(torch.isnan(ref).any()):
        at = [int(i) for i in torch.isnan(ref).nonzero()[0]]
        raise ValueError(f"{op}: ref must not hold NaN (a NaN activation has no label), got NaN at {at}")
    return reference.pack_tm_labels_ref(reference.tm_labels_ref(ref, pos_thr, neg_thr))


def unpack_tm_labels(packed: Tensor, D: int) -> Tensor:
    """uint8 ``[..., ceil(D/4)]`` from :func:`pack_tm_labels` -> int8 labels ``[..., D]``.

    Examples::

        >>> retain.ops.unpack_tm_labels(torch.tensor([[0b10_00_01]], dtype=torch.uint8), 3)
        tensor([[ 1,  0, -1]], dtype=torch.int8)
    """
    check_tensor("retain.ops.unpack_tm_labels", "packed", packed, ndim_min=1)
    D = check_int("retain.ops.unpack_tm_labels", "D", D, minimum=0)
    if packed.dtype != torch.uint8:
        raise TypeError(f"retain.ops.unpack_tm_labels: packed must be uint8, got {dtype_name(packed)}")
    if packed.shape[-1] != (D + 3) // 4:
        raise ValueError(f"retain.ops.unpack_tm_labels: packed's last dimension must be ceil(D/4) = {(D + 3) // 4} "
                         f"for D = {D}, got {packed.shape[-1]}")
    return reference.unpack_tm_labels_ref(packed, D)


