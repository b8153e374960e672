"""The continual-learning methods the demo compares, as one trainer with three switches:

- ``replay``: reservoir replay (``retain.cl.ReplayBuffer``): every training window is offered to
  the buffer; from the second domain on, each batch is joined by as many stored windows;
- ``gere``: replay plus GeRe's threshold-margin loss (``retain.cl.GeRe``): at the end of each
  domain the buffer's windows are frozen as the replay set and the model's final hidden states on
  them are anchored (2-bit labels); later batches replay windows of that set with
  ``(CE_task + CE_replay) / 2 + w·TM`` (GeRe's dynamic weight);
- ``ewc``: ``retain.cl.EWC`` consolidated at the end of each domain on ``fisher_samples`` windows
  (one anchor per domain), ``'diag'`` or ``'both'`` (diagonal plus the rank-1 term c·μμᵀ); its
  gradient is added natively after the task gradient is clipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retain.cl import EWC, GeRe, ReplayBuffer
from retain.cl.gere import forward_with_hidden, gere_total_loss


@dataclass(frozen=True)
class MethodSpec:
    name: str
    label: str
    replay: bool = False
    gere: bool = False
    ewc: str | None = None   # None, 'diag' or 'both'


METHODS = {m.name: m for m in (
    MethodSpec("naive", "naive fine-tuning"),
    MethodSpec("replay", "reservoir replay", replay=True),
    MethodSpec("replay_gere", "replay + GeRe TM", replay=True, gere=True),
    MethodSpec("ewc", "EWC (diagonal)", ewc="diag"),
    MethodSpec("ewc_rank1", "EWC diagonal + rank-1", ewc="both"),
    MethodSpec("combined", "replay + GeRe + rank-1 EWC", replay=True, gere=True, ewc="both"),
)}


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-byte cross-entropy over ``[B, T, vocab]`` logits and ``[B, T]`` targets."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


class Trainer:
    """One method's training state: the model, its optimizer and what the method keeps."""

    def __init__(self, spec: MethodSpec, model: nn.Module, cfg, device: torch.device):
        self.spec, self.model, self.cfg, self.device = spec, model, cfg, device
        self.opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
        self.gen = torch.Generator().manual_seed(cfg.seed + 7)
        self.buffer = ReplayBuffer(cfg.replay_capacity, {"seq": ((cfg.seq_len + 1,), torch.int64)},
                                   policy="reservoir", device=device, seed=cfg.seed) if spec.replay else None
        self.gere: GeRe | None = None
        self.replay_set: Tensor | None = None   # the windows GeRe anchored, [S, seq_len + 1]
        self.ewc = EWC(model, mode=spec.ewc, lam=cfg.ewc_lam, per_sample="loop") if spec.ewc else None

    def step(self, batch: Tensor, domain: int) -> float:
        """One optimizer step on a batch of windows ``[B, seq_len + 1]``; returns the task loss."""
        B = batch.shape[0]
        replay = self._replay_batch() if domain > 0 and self.buffer is not None else None
        tokens = batch if replay is None else torch.cat([batch, replay[1]])
        x, y = tokens[:, :-1], tokens[:, 1:]
        if self.gere is not None and replay is not None:
            logits, hidden = forward_with_hidden(self.model, x, layer="norm")
            task, rep = lm_loss(logits[:B], y[:B]), lm_loss(logits[B:], y[B:])
            tm = self.gere.loss(hidden[B:], replay[0])
            loss = gere_total_loss(task, rep, tm, w="dy", max_w=self.cfg.gere_max_w)
        else:
            logits = self.model(x)
            task = lm_loss(logits[:B], y[:B])
            loss = task if replay is None else lm_loss(logits, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip)
        if self.ewc is not None:
            self.ewc.apply_penalty_grad_()
        self.opt.step()
        if self.buffer is not None:
            self.buffer.add({"seq": batch})
        return float(task.detach())

    def _replay_batch(self) -> tuple[Tensor, Tensor] | None:
        """(GeRe sample ids or None, windows) for this step's replay half."""
        n = self.cfg.batch_size
        if self.gere is not None:
            ids = torch.randint(0, self.replay_set.shape[0], (n,), generator=self.gen).to(self.device)
            return ids, self.replay_set[ids]
        if len(self.buffer) == 0:
            return None
        return None, self.buffer.sample(n)["seq"]

    def end_domain(self, train_windows: Tensor) -> None:
        """What the method keeps from the domain just learned; ``train_windows`` ``[N, seq_len + 1]``
        are fresh windows of it (EWC's Fisher samples)."""
        if self.ewc is not None:
            x, y = train_windows[:, :-1], train_windows[:, 1:]
            chunks = [(x[i:i + 8], y[i:i + 8]) for i in range(0, x.shape[0], 8)]
            self.ewc.consolidate(chunks, lm_loss)
        if self.spec.gere:
            self.replay_set = self.buffer.contents()["seq"].clone()
            self.gere = GeRe.build(self.model, list(self.replay_set[:, :-1]), layer="norm", batch_size=64)
