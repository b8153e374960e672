"""Pure-PyTorch reference of the cache family (memory caching, csrc/cache/README.md once the
kernels land): the cached readout with every per-segment readout materialised ``[B, T, NS, H, V]``
— the tests' oracle, and the fallback."""

from __future__ import annotations

import torch
from torch import Tensor

MODES = ("residual", "gated", "soup", "sparse")


def cached_readout_ref(q: Tensor, u: Tensor, states: Tensor, seg_keys: Tensor, o_online: Tensor,
                       online_keys: Tensor | None, *, segment_len: int, mode: str = "residual",
                       top_k: int | None = None, scale: float | None = None, start: int = 0) -> Tensor:
    """y_t for every token t of segment s = (start + t) // L, reading the cached states i < s:

    - residual: y = o_t + Σ_{i<s} S_iᵀ(scale·q_t)
    - gated, soup: γ = softmax({⟨u_t, c_i⟩}_{i<s} ∪ {⟨u_t, c_{s,t}⟩}); y = γ_s o_t + Σ_{i<s} γ_i S_iᵀ(scale·q_t)
      (soup, the average of memories' parameters, is the same value for linear memories)
    - sparse: as gated over the top_k cached segments by ⟨u_t, c_i⟩ (the online one always in);
      the selection is not differentiated, the gate over the selected ones is.

    q, u [B, T, H, K]; states [B, NS, H, K, V]; seg_keys [B, NS, H, K]; o_online [B, T, H, V];
    online_keys [B, T, H, K] (gated, soup, sparse). ``start``: the position of token 0 in its
    sequence (a continuation's: retain.nn.CachedMemory's decode path; the op starts at 0).
    Returns [B, T, H, V].
    """
    B, T, H, K = q.shape
    NS = states.shape[1]
    scale = K ** -0.5 if scale is None else scale
    seg = (start + torch.arange(T, device=q.device)) // segment_len  # [T]
    visible = torch.arange(NS, device=q.device)[None, :] < seg[:, None]  # [T, NS]: cached i < s
    reads = torch.einsum("bthk,bihkv->btihv", q * scale, states)  # [B, T, NS, H, V]
    if mode == "residual":
        # where, not a product: a non-finite state no token reads must not reach the output
        return o_online + torch.where(visible[None, :, :, None, None], reads, 0).sum(2)
    logits = torch.einsum("bthk,bihk->btih", u, seg_keys)  # [B, T, NS, H]
    keep = visible[None, :, :, None].expand_as(logits)
    if mode == "sparse" and top_k is not None and top_k < NS:
        with torch.no_grad():
            ranked = logits.masked_fill(~keep, float("-inf"))
            # a stable sort: ties to the lower segment, NaN first, as the kernels select
            top = ranked.sort(dim=2, descending=True, stable=True).indices[:, :, :top_k]
            chosen = torch.zeros_like(keep).scatter_(2, top, True)
        keep = keep & chosen
    online = (u * online_keys).sum(-1)  # [B, T, H]
    z = torch.cat([logits.masked_fill(~keep, float("-inf")), online[:, :, None]], dim=2)
    gamma = torch.softmax(z, dim=2)  # [B, T, NS + 1, H]
    cached = torch.where(keep[..., None], gamma[:, :, :NS, :, None] * reads, 0)  # unread states add nothing
    return gamma[:, :, NS, :, None] * o_online + cached.sum(2)
