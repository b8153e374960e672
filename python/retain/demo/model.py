"""The demo's language model: byte embedding, pre-norm blocks of a ``retain.nn.MemoryLayer`` and an
MLP, a final RMSNorm (whose output is the hidden state GeRe anchors) and an untied head."""

from __future__ import annotations

from torch import Tensor, nn

from retain.nn import MemoryLayer


class Block(nn.Module):
    def __init__(self, d_model: int, num_heads: int, head_dim: int, mode: str):
        super().__init__()
        self.mixer_norm = nn.RMSNorm(d_model, eps=1e-6)
        self.mixer = MemoryLayer(d_model, num_heads, head_dim, mode=mode)
        self.mlp_norm = nn.RMSNorm(d_model, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.mixer(self.mixer_norm(x))[0]
        return x + self.mlp(self.mlp_norm(x))


class TinyLM(nn.Module):
    """``forward(tokens [B, T] int64) -> logits [B, T, vocab]``; ``norm`` is the last hidden state."""

    def __init__(self, *, vocab: int = 256, d_model: int = 128, num_layers: int = 2, num_heads: int = 4,
                 head_dim: int = 32, mode: str = "gated_delta"):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.blocks = nn.ModuleList(Block(d_model, num_heads, head_dim, mode) for _ in range(num_layers))
        self.norm = nn.RMSNorm(d_model, eps=1e-6)
        self.head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))
