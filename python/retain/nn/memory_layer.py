"""``retain.nn.MemoryLayer``: a token mixer over ``retain.ops.memory_scan`` — linear attention, GLA,
DeltaNet, Gated DeltaNet, Titans and the Miras objectives — with the pieces such layers share
(q/k/v projections, a short causal convolution, gates from small projections, qk L2 norm, an
output norm and gate) and a state for chunked or token-by-token generation."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retain.ops import memory_scan
from retain.ops._checks import check_bool, check_choice, check_int, check_number

# mode: memory_scan's objective, the gates the layer learns (g per head or per key), the order
MODES = {
    "linear": dict(objective="dot", beta=False, g=None, eta=False, retention_first=False),   # linear attention
    "gla": dict(objective="dot", beta=False, g="key", eta=False, retention_first=False),     # gated linear attention
    "delta": dict(objective="l2", beta=True, g=None, eta=False, retention_first=False),      # DeltaNet
    "gated_delta": dict(objective="l2", beta=True, g="head", eta=False, retention_first=True),  # Gated DeltaNet
    "titans": dict(objective="l2", beta=True, g="head", eta=True, retention_first=False),    # Titans (momentum)
    "lp": dict(objective="lp", beta=True, g="head", eta=False, retention_first=False),       # Miras: Moneta-style
    "huber": dict(objective="huber", beta=True, g="head", eta=False, retention_first=False),  # Miras: Yaad-style
}
_NAME = "retain.nn.MemoryLayer"


@dataclass
class MemoryState:
    """What a ``MemoryLayer`` carries between calls: ``memory`` (``S`` ``[B, H, K, V]``, or ``(S, Z)``
    for titans), ``conv`` (the last ``conv_size - 1`` inputs of the short convolution, ``[B,
    conv_size - 1, 2HK + HV]``, or None without one) and ``pos`` (tokens seen). Tensors keep their
    graph; detach them for truncated backpropagation."""

    memory: Tensor | tuple[Tensor, Tensor]
    conv: Tensor | None
    pos: int


class MemoryLayer(nn.Module):
    r"""A recurrent token mixer: per head a ``K x V`` memory written and read by ``memory_scan``.

    ``mode``: ``'linear'`` (S += k vᵀ), ``'gla'`` (per-key decay), ``'delta'`` (DeltaNet),
    ``'gated_delta'`` (Gated DeltaNet, fla's order), ``'titans'`` (momentum η and decay), ``'lp'`` /
    ``'huber'`` (Miras' ℓp and Huber attentional biases, ``p``, ``delta``).

    Per token, x ``[D]``: q, k = W_q x, W_k x ``[H, K]``; v = W_v x ``[H, V]``; with ``conv_size``
    > 0 a depthwise causal convolution of that length and SiLU over each of q, k, v (as Mamba2,
    GatedDeltaNet); with ``qk_norm`` q and k L2-normalised over K (in the kernel); β = sigmoid(W_β x)
    per head, the log decay g = logsigmoid(W_g x) per head (per key for gla; the bias starts at 4, a
    retention near 0.98), η = sigmoid(W_η x) for titans. The output o ``[H, V]`` is RMS-normalised
    per head (``norm``), multiplied by SiLU(W_z x) (``output_gate``) and projected back to D.

    ``forward(x, state=None) -> (y, state)``: x, y ``[B, T, D]``; with the state of an earlier call
    the sequence continues where it stopped (any chunk size, one token for generation), with the
    outputs of one call over the concatenation (tested). Runs under ``torch.compile``.

    Examples::

        >>> layer = retain.nn.MemoryLayer(64, num_heads=2, head_dim=16, mode="gated_delta")
        >>> x = torch.randn(2, 10, 64)
        >>> y, state = layer(x)
        >>> y.shape, state.memory.shape, state.pos
        (torch.Size([2, 10, 64]), torch.Size([2, 2, 16, 16]), 10)
        >>> y_next, state = layer(torch.randn(2, 1, 64), state)     # one more token
    """

    def __init__(self, d_model: int, num_heads: int, head_dim: int = 64, value_dim: int | None = None, *,
                 mode: str = "gated_delta", conv_size: int = 4, qk_norm: bool = True, norm: bool = True,
                 output_gate: bool = True, p: float = 3.0, delta: float = 1.0):
        super().__init__()
        d_model = check_int(_NAME, "d_model", d_model, minimum=1)
        H = self.num_heads = check_int(_NAME, "num_heads", num_heads, minimum=1)
        K = self.head_dim = check_int(_NAME, "head_dim", head_dim, minimum=1)
        V = self.value_dim = K if value_dim is None else check_int(_NAME, "value_dim", value_dim, minimum=1)
        check_choice(_NAME, "mode", mode, tuple(MODES))
        self.mode, self.spec = mode, MODES[mode]
        self.conv_size = check_int(_NAME, "conv_size", conv_size, minimum=0)
        self.qk_norm = check_bool(_NAME, "qk_norm", qk_norm)
        self.p, self.delta = check_number(_NAME, "p", p, minimum=1.0), check_number(_NAME, "delta", delta, positive=True)
        self.qkv = nn.Linear(d_model, 2 * H * K + H * V, bias=False)
        self.conv = nn.Conv1d(2 * H * K + H * V, 2 * H * K + H * V, self.conv_size, groups=2 * H * K + H * V,
                              bias=False) if self.conv_size else None
        self.beta_proj = nn.Linear(d_model, H) if self.spec["beta"] else None
        g = self.spec["g"]
        self.g_proj = nn.Linear(d_model, H * K if g == "key" else H) if g else None
        if self.g_proj is not None:
            nn.init.constant_(self.g_proj.bias, 4.0)
        self.eta_proj = nn.Linear(d_model, H) if self.spec["eta"] else None
        self.norm = nn.RMSNorm(V, eps=1e-6) if check_bool(_NAME, "norm", norm) else None
        self.gate_proj = nn.Linear(d_model, H * V, bias=False) if check_bool(_NAME, "output_gate", output_gate) \
            else None
        self.o_proj = nn.Linear(H * V, d_model, bias=False)

    def extra_repr(self) -> str:
        return (f"mode={self.mode!r}, heads={self.num_heads}, head_dim={self.head_dim}, value_dim={self.value_dim}, "
                f"conv_size={self.conv_size}, qk_norm={self.qk_norm}")

    def _short_conv(self, z: Tensor, cached: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The causal depthwise convolution over [B, T, C] continuing from the last inputs ``cached``."""
        if self.conv is None:
            return z, None
        B, _, C = z.shape
        past = z.new_zeros(B, self.conv_size - 1, C) if cached is None else cached.to(z.dtype)
        full = torch.cat([past, z], 1)
        out = F.silu(F.conv1d(full.transpose(1, 2), self.conv.weight, groups=C).transpose(1, 2))
        return out, full[:, full.shape[1] - (self.conv_size - 1):]

    def forward(self, x: Tensor, state: MemoryState | None = None) -> tuple[Tensor, MemoryState]:
        if not isinstance(x, Tensor) or x.dim() != 3:
            raise ValueError(f"{_NAME}: x must be a [B, T, D] tensor, got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        if state is not None and not isinstance(state, MemoryState):
            raise TypeError(f"{_NAME}: state must be a MemoryState (the second output of a previous call) or None, "
                            f"got {type(state).__name__}")
        B, T, _ = x.shape
        H, K, V = self.num_heads, self.head_dim, self.value_dim
        z, conv_state = self._short_conv(self.qkv(x), state.conv if state is not None else None)
        q, k, v = z.split([H * K, H * K, H * V], dim=-1)
        q, k, v = q.reshape(B, T, H, K), k.reshape(B, T, H, K), v.reshape(B, T, H, V)
        beta = torch.sigmoid(self.beta_proj(x)) if self.beta_proj is not None else 1.0
        g = None
        if self.g_proj is not None:
            g = F.logsigmoid(self.g_proj(x))
            g = g.reshape(B, T, H, K) if self.spec["g"] == "key" else g
        eta = torch.sigmoid(self.eta_proj(x)) if self.eta_proj is not None else None
        o, memory, _ = memory_scan(q, k, v, beta, g=g, eta=eta, objective=self.spec["objective"], p=self.p,
                                   delta=self.delta, initial_state=state.memory if state is not None else None,
                                   output_final_state=True, use_qk_l2norm=self.qk_norm,
                                   retention_first=self.spec["retention_first"])
        if self.norm is not None:
            o = self.norm(o)
        o = o.reshape(B, T, H * V)
        if self.gate_proj is not None:
            o = o * F.silu(self.gate_proj(x))
        return self.o_proj(o), MemoryState(memory, conv_state, (state.pos if state is not None else 0) + T)
