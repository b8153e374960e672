"""``retain.ops.segment_mean``: per-segment means of a sequence (memory caching's segment
summaries), whole-segment or causal (plain PyTorch, differentiable)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from retain.ops._checks import check_floating, check_tensor

_OP = "retain.ops.segment_mean"


def segment_mean(x: Tensor, segment_len: int, *, causal: bool = False) -> Tensor:
    r"""Means of ``x`` over segments of ``segment_len`` steps along dim 1.

    Token t belongs to segment ``s = t // L``; the last segment may be shorter (``T`` need not be
    a multiple of ``L``). Whole-segment means (``causal=False``) are memory caching's summaries
    ``c_i`` of the cached segments; causal means give each token the summary of its own segment up
    to and including itself (``c_{s,t}``: a token never sees later keys), the online segment's
    summary of the gated and sparse readouts.

    Args:
        x: ``[B, T, *]``, floating.
        segment_len: L >= 1.
        causal: per-token running means instead of whole-segment means.

    Returns:
        ``[B, ceil(T / L), *]`` (whole segments) or ``[B, T, *]`` (causal), ``x``'s dtype;
        differentiable.

    Examples::

        >>> x = torch.tensor([[1.0, 3.0, 5.0, 7.0, 9.0]])        # B = 1, T = 5
        >>> retain.ops.segment_mean(x, 2)                           # segments [1, 3], [5, 7], [9]
        tensor([[2., 6., 9.]])
        >>> retain.ops.segment_mean(x, 2, causal=True)
        tensor([[1., 2., 5., 6., 9.]])
    """
    check_tensor(_OP, "x", x, ndim_min=2)
    check_floating(_OP, "x", x, ())
    if isinstance(segment_len, bool) or not isinstance(segment_len, int) or segment_len < 1:
        raise ValueError(f"{_OP}: segment_len must be an int >= 1, got {segment_len!r}")
    if not isinstance(causal, bool):
        raise TypeError(f"{_OP}: causal must be a bool, got {type(causal).__name__}")
    B, T, rest, L = x.shape[0], x.shape[1], x.shape[2:], segment_len
    ns, D = -(-T // L), math.prod(rest)  # D explicit: -1 is ambiguous for empty tensors
    padded = torch.nn.functional.pad(x.reshape(B, T, D), (0, 0, 0, ns * L - T)).reshape(B, ns, L, D)
    pos = torch.arange(ns * L, device=x.device).reshape(ns, L)
    if causal:
        count = (pos % L + 1).to(x.dtype)[..., None]
        out = padded.cumsum(2) / count
        return out.reshape(B, ns * L, *rest)[:, :T]
    count = (pos < T).sum(1).to(x.dtype)[:, None]  # tokens per segment (the last may be short)
    return (padded.sum(2) / count).reshape(B, ns, *rest)
