"""``retain.nn.CachedMemory``: a recurrent memory whose capacity grows with the sequence (memory
caching): the memory's state is cached at the end of every segment, and each token reads the
online memory and the cached states through ``retain.ops.cached_readout``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retain.ops import cached_readout, memory_scan, segment_mean
from retain.ops.cache.reference import MODES, cached_readout_ref

# The memories a CachedMemory wraps: memory_scan's objective and the gates each one learns.
MEMORIES = {
    "linear": dict(objective="dot", beta=False, g=False, eta=False),       # linear attention
    "delta": dict(objective="l2", beta=True, g=False, eta=False),          # DeltaNet
    "gated_delta": dict(objective="l2", beta=True, g=True, eta=False),     # Gated DeltaNet
    "titans": dict(objective="l2", beta=True, g=True, eta=True),           # Titans (linear memory, momentum)
}
INITS = ("checkpoint", "restart")


@dataclass
class CachedMemoryState:
    """What a ``CachedMemory`` carries from one call to the next (generation, chunked prefill).

    states ``[B, NS, H, K, V]`` and seg_keys ``[B, NS, H, K]``: the cached segments' final states and
    mean keys; memory: the online memory (``S`` ``[B, H, K, V]``, or ``(S, Z)`` for titans);
    key_sum ``[B, H, K]``: the sum of the current segment's keys so far; pos: tokens seen. Tensors
    keep their graph (detach them for truncated backpropagation)."""

    states: Tensor
    seg_keys: Tensor
    memory: Tensor | tuple[Tensor, Tensor]
    key_sum: Tensor
    pos: int


class CachedMemory(nn.Module):
    r"""A token mixer with memory caching ("Memory Caching: RNNs with Growing Memory", 2026).

    Per head, a ``K x V`` recurrent memory (``memory``: ``'linear'`` attention, ``'delta'`` rule,
    ``'gated_delta'`` rule or ``'titans'`` with momentum, all by ``retain.ops.memory_scan``) reads
    and writes the sequence in segments of ``segment_len`` tokens; its state at the end of each
    segment is cached, and every token's output aggregates the online memory's read with the
    cached states' (``retain.ops.cached_readout``: ``mode`` ``'residual'``, ``'gated'``, ``'soup'``
    or ``'sparse'`` with ``top_k``; None: no caching, the plain memory, for comparisons). The gate's
    router is a projection of the input; segments are summarised by their mean (L2-normalised) key.

    ``init='checkpoint'``: each segment's memory starts from the previous segment's final state;
    ``'restart'``: from zero (each cached state then holds its own segment only).

    Projections: q, k, u ``D -> H K`` (q, k L2-normalised over K), v ``D -> H V``, β = sigmoid of
    ``D -> H`` (delta, gated_delta, titans), log-retention g = logsigmoid of ``D -> H`` (gated_delta,
    titans; initialised near retention 1), momentum η = sigmoid of ``D -> H`` (titans), an RMS norm
    over V per head (``norm``), and ``H V -> D`` out.

    ``forward(x, cache=None) -> (y, cache)``: x ``[B, T, D]``, y ``[B, T, D]``. Without a cache the
    whole sequence runs through the fused kernels (training, prefill). With the cache of an earlier
    call the sequence continues where it stopped — one token at a time for generation, or any chunk —
    giving the outputs of one call over the concatenation (tested); continuations run piece by piece
    (at most one segment each) through the materialising reference readout, cheap for short chunks.

    Examples::

        >>> layer = retain.nn.CachedMemory(32, num_heads=2, head_dim=8, segment_len=4)
        >>> x = torch.randn(1, 10, 32)
        >>> y, cache = layer(x)
        >>> y.shape, cache.states.shape, cache.pos          # two whole segments cached
        (torch.Size([1, 10, 32]), torch.Size([1, 2, 2, 8, 8]), 10)
        >>> y_next, cache = layer(torch.randn(1, 1, 32), cache)   # one more token
        >>> cache.pos
        11
    """

    def __init__(self, d_model: int, num_heads: int, head_dim: int = 64, value_dim: int | None = None, *,
                 memory: str = "delta", segment_len: int = 256, mode: str | None = "gated",
                 top_k: int | None = None, init: str = "checkpoint", norm: bool = True):
        super().__init__()
        name = "retain.nn.CachedMemory"
        for arg, value in (("d_model", d_model), ("num_heads", num_heads), ("head_dim", head_dim),
                           ("segment_len", segment_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: {arg} must be an int >= 1, got {value!r}")
        if memory not in MEMORIES:
            raise ValueError(f"{name}: memory must be one of {tuple(MEMORIES)}, got {memory!r}")
        if mode is not None and mode not in MODES:
            raise ValueError(f"{name}: mode must be one of {MODES} or None, got {mode!r}")
        if init not in INITS:
            raise ValueError(f"{name}: init must be one of {INITS}, got {init!r}")
        if (mode == "sparse") != (top_k is not None):
            raise ValueError(f"{name}: top_k goes with mode 'sparse' (and sparse needs it), got mode {mode!r}, "
                             f"top_k {top_k!r}")
        self.num_heads, self.head_dim = num_heads, head_dim
        self.value_dim = head_dim if value_dim is None else value_dim
        self.memory, self.segment_len, self.mode, self.top_k, self.init = memory, segment_len, mode, top_k, init
        H, K, V = num_heads, head_dim, self.value_dim
        spec = MEMORIES[memory]
        self.q_proj = nn.Linear(d_model, H * K, bias=False)
        self.k_proj = nn.Linear(d_model, H * K, bias=False)
        self.v_proj = nn.Linear(d_model, H * V, bias=False)
        self.u_proj = nn.Linear(d_model, H * K, bias=False) if mode not in (None, "residual") else None
        self.beta_proj = nn.Linear(d_model, H) if spec["beta"] else None
        self.g_proj = nn.Linear(d_model, H) if spec["g"] else None
        if self.g_proj is not None:
            nn.init.constant_(self.g_proj.bias, 4.0)  # retention exp(logsigmoid(4)) ~ 0.98 at the start
        self.eta_proj = nn.Linear(d_model, H) if spec["eta"] else None
        self.norm = nn.RMSNorm(V, eps=1e-6) if norm else None
        self.o_proj = nn.Linear(H * V, d_model, bias=False)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, head_dim={self.head_dim}, value_dim={self.value_dim}, "
                f"memory={self.memory!r}, segment_len={self.segment_len}, mode={self.mode!r}, "
                f"top_k={self.top_k}, init={self.init!r}")

    def forward(self, x: Tensor, cache: CachedMemoryState | None = None) -> tuple[Tensor, CachedMemoryState]:
        if not isinstance(x, Tensor) or x.dim() != 3:
            raise ValueError(f"retain.nn.CachedMemory: x must be a [B, T, D] tensor, got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        B, T, _ = x.shape
        H, K, V = self.num_heads, self.head_dim, self.value_dim
        q = F.normalize(self.q_proj(x).view(B, T, H, K), dim=-1, eps=1e-6)
        k = F.normalize(self.k_proj(x).view(B, T, H, K), dim=-1, eps=1e-6)
        v = self.v_proj(x).view(B, T, H, V)
        u = self.u_proj(x).view(B, T, H, K) if self.u_proj is not None else None
        gates = dict(beta=torch.sigmoid(self.beta_proj(x)) if self.beta_proj is not None else 1.0,
                     g=F.logsigmoid(self.g_proj(x)) if self.g_proj is not None else None,
                     eta=torch.sigmoid(self.eta_proj(x)) if self.eta_proj is not None else None)
        if cache is not None and not isinstance(cache, CachedMemoryState):
            raise TypeError(f"retain.nn.CachedMemory: cache must be a CachedMemoryState (the second output of a "
                            f"previous call) or None, got {type(cache).__name__}")
        if cache is None:
            y, cache = self._whole(q, k, v, u, gates)
        else:
            y, cache = self._continue(q, k, v, u, gates, cache)
        if self.norm is not None:
            y = self.norm(y)
        return self.o_proj(y.reshape(B, T, H * V)), cache

    # the scan over a [B, T] sequence from `initial` (None: zeros), with states every L steps
    def _scan(self, q, k, v, gates, initial=None, states_every=None, cu_seqlens=None):
        return memory_scan(q, k, v, gates["beta"], g=gates["g"], eta=gates["eta"],
                           objective=MEMORIES[self.memory]["objective"], initial_state=initial,
                           output_final_state=True, states_every=states_every, cu_seqlens=cu_seqlens)

    def _zero_memory(self, q):
        B, _, H, K = q.shape
        S = q.new_zeros(B, H, K, self.value_dim, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
        return (S, S.clone()) if self.eta_proj is not None else S

    def _whole(self, q, k, v, u, gates):
        """The fused path: one scan over the sequence (or its segments, restarted), one readout."""
        B, T, H, K = q.shape
        L = self.segment_len
        full = T // L
        if self.init == "checkpoint" or T == 0:  # (no tokens: nothing to restart)
            o, final, states = self._scan(q, k, v, gates, states_every=L)
            memory = final
        else:  # every segment its own sequence: packed along T (cu_seqlens), no state crosses
            lengths = [L] * full + ([T - full * L] if T > full * L else [])
            cu = torch.tensor([0] + lengths * B, device=q.device).cumsum(0)

            def flat(t):
                return t if t is None or isinstance(t, float) else t.reshape(1, B * T, *t.shape[2:])

            o, final, states = self._scan(flat(q), flat(k), flat(v), {n: flat(t) for n, t in gates.items()},
                                          states_every=L, cu_seqlens=cu)
            o, states = o.reshape(B, T, H, self.value_dim), states.reshape(B, full, *states.shape[2:])
            n_seq = len(lengths)
            if T == full * L:  # the last segment closed: the next one starts from zero
                memory = self._zero_memory(q)
            else:
                memory = tuple(m.reshape(B, n_seq, *m.shape[1:])[:, -1] for m in final) \
                    if isinstance(final, tuple) else final.reshape(B, n_seq, *final.shape[1:])[:, -1]
        seg_keys = segment_mean(k, L)[:, :full] if T else k.new_zeros(B, 0, H, K)
        states = states.to(q.dtype)
        if self.mode is None:
            y = o
        else:
            y = cached_readout(q, u, states, seg_keys, o, online_keys=segment_mean(k, L, causal=True),
                               segment_len=L, mode=self.mode, top_k=self.top_k)
        cache = CachedMemoryState(states=states, seg_keys=seg_keys, memory=memory,
                                  key_sum=k[:, full * L:].sum(1), pos=T)
        return y, cache

    def _continue(self, q, k, v, u, gates, cache):
        """The decode path: pieces of at most one segment, each continuing the memory and reading
        every cached state (all of a piece's tokens are in one segment)."""
        L, T = self.segment_len, q.shape[1]
        ys, t = [], 0
        states, seg_keys, memory, key_sum, pos = cache.states, cache.seg_keys, cache.memory, cache.key_sum, cache.pos
        B, _, H, K = q.shape
        want = (B, pos // L, H, K, self.value_dim)
        if tuple(states.shape) != want:
            got = tuple(states.shape)
            raise ValueError(f"retain.nn.CachedMemory: cache.states must have shape {want} (B, pos // segment_len, "
                             f"heads, head_dim, value_dim of this layer and input), got {got}")
        while t < T:
            r = pos % L
            n = min(L - r, T - t)
            sl = slice(t, t + n)
            piece = {name: g[:, sl] if isinstance(g, Tensor) else g for name, g in gates.items()}
            o, final, _ = self._scan(q[:, sl], k[:, sl], v[:, sl], piece, initial=memory)
            sums = key_sum[:, None] + k[:, sl].cumsum(1)
            if self.mode is None:
                ys.append(o)
            else:  # computed as the fused op does: float32 for 16-bit inputs
                acc = torch.float64 if q.dtype == torch.float64 else torch.float32
                count = torch.arange(r + 1, r + n + 1, device=q.device, dtype=acc)[None, :, None, None]
                args = [t if t is None else t.to(acc) for t in
                        (q[:, sl], None if u is None else u[:, sl], states, seg_keys, o, sums.to(acc) / count)]
                ys.append(cached_readout_ref(*args, segment_len=L, mode=self.mode, top_k=self.top_k,
                                             start=pos).to(q.dtype))
            pos, key_sum, memory, t = pos + n, sums[:, -1], final, t + n
            if pos % L == 0:  # the segment closed: cache its state and mean key
                S = final[0] if isinstance(final, tuple) else final
                states = torch.cat([states, S[:, None].to(states.dtype)], 1)
                seg_keys = torch.cat([seg_keys, (key_sum / L)[:, None]], 1)
                key_sum = torch.zeros_like(key_sum)
                if self.init == "restart":
                    memory = self._zero_memory(q)
        y = torch.cat(ys, 1) if ys else q.new_zeros(q.shape[0], 0, self.num_heads, self.value_dim)
        return y, CachedMemoryState(states=states, seg_keys=seg_keys, memory=memory, key_sum=key_sum, pos=pos)
