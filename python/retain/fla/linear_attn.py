"""fla's ``fla.ops.linear_attn``: ``chunk_linear_attn`` and ``fused_recurrent_linear_attn``
(``S_t = S_{t-1} + k_t v_tᵀ``, ``o_t = S_tᵀ(scale·q_t)``, optionally divided by ``scale·q_t·z_t``,
``z_t = Σ_{s≤t} k_s``)."""

from __future__ import annotations

import torch
from torch import Tensor

from retain.fla._common import check_kwargs, scan
from retain.ops._checks import check_bool

_EPS = 1e-10  # fla's: added to the normaliser


def _normalize(o: Tensor, q: Tensor, k: Tensor, scale: float, z0: Tensor | None, reverse: bool,
               cu_seqlens: Tensor | None) -> tuple[Tensor, Tensor]:
    """(o / (scale·q·z + eps), z's last row [N, 1, H, K]), z the running sum of k within each
    sequence (from its end with ``reverse``), plus ``z0``."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    kf = (k.flip(1) if reverse else k).to(acc)
    z = kf.cumsum(1)
    if cu_seqlens is not None:  # restart the sum at every sequence start
        starts = (cu_seqlens[-1] - cu_seqlens.flip(0) if reverse else cu_seqlens).to(torch.long)
        before = torch.cat([z.new_zeros(1, 1, *z.shape[2:]), z], 1)[:, starts[:-1]]  # [1, N, H, K]
        lengths = starts[1:] - starts[:-1]
        z = z - before.repeat_interleave(lengths, dim=1)
    if z0 is not None:
        z0f = z0.to(acc)
        if cu_seqlens is None:
            z = z + z0f
        else:
            z0f = z0f.flip(0) if reverse else z0f
            z = z + z0f.squeeze(1).repeat_interleave((cu_seqlens[1:] - cu_seqlens[:-1]).flip(0) if reverse
                                                       else cu_seqlens[1:] - cu_seqlens[:-1], dim=0).unsqueeze(0)
    if reverse:
        z = z.flip(1)
    denom = (q.to(acc) * scale * z).sum(-1, keepdim=True) + _EPS
    if o.shape[2] != denom.shape[2]:  # grouped value heads share their key head's normaliser
        denom = denom.repeat_interleave(o.shape[2] // denom.shape[2], 2)
    if cu_seqlens is None:
        last = z[:, :1] if reverse else z[:, -1:]
    else:
        idx = (cu_seqlens[:-1] if reverse else cu_seqlens[1:] - 1).to(torch.long)
        last = z[0, idx].unsqueeze(1)
    return (o.to(acc) / denom).to(o.dtype), last.contiguous()


def _linear_attn(op, q, k, v, scale, initial_state, output_final_state, normalize, reverse, cu_seqlens):
    normalize = check_bool(op, "normalize", normalize)
    kv0, z0 = initial_state if normalize and isinstance(initial_state, tuple) else (initial_state, None)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    o, final = scan(op, q, k, v, 1.0, objective="dot", scale=scale, initial_state=kv0,
                    output_final_state=output_final_state, cu_seqlens=cu_seqlens, reverse=reverse)
    if not normalize:
        return o, final
    o, z = _normalize(o, q, k, scale, z0, reverse, cu_seqlens)
    return o, (final, z)  # as fla: the running key sum is returned even without output_final_state


def chunk_linear_attn(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None,
                      initial_state: Tensor | tuple | None = None, output_final_state: bool = False,
                      normalize: bool = True, cu_seqlens: Tensor | None = None, **kwargs):
    r"""fla's ``chunk_linear_attn`` on retain's kernel: q, k ``[B, T, H, K]``, v ``[B, T, HV, V]``
    (HV a multiple of H); returns ``(o [B, T, HV, V], final_state)``, the final state ``[N, HV, K, V]``
    (with ``normalize``, the pair ``(state or None, z [N, 1, H, K])`` whatever ``output_final_state``,
    as fla returns it)."""
    check_kwargs("retain.fla.chunk_linear_attn", kwargs)
    return _linear_attn("retain.fla.chunk_linear_attn", q, k, v, scale, initial_state, output_final_state,
                        normalize, False, cu_seqlens)


def fused_recurrent_linear_attn(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None,
                                initial_state: Tensor | tuple | None = None, output_final_state: bool = False,
                                reverse: bool = False, normalize: bool = False, cu_seqlens: Tensor | None = None,
                                **kwargs):
    r"""fla's ``fused_recurrent_linear_attn`` (``reverse``: from the last step to the first); as
    :func:`chunk_linear_attn`, whose default is ``normalize=True`` where this one's is False."""
    check_kwargs("retain.fla.fused_recurrent_linear_attn", kwargs)
    return _linear_attn("retain.fla.fused_recurrent_linear_attn", q, k, v, scale, initial_state, output_final_state,
                        normalize, reverse, cu_seqlens)
