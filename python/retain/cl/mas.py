"""Memory Aware Synapses (Aljundi et al., 2018): unsupervised per-parameter importance, the mean
absolute per-sample gradient of the squared output norm."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from retain.cl import _per_sample as ps
from retain.cl._files import FileCheckpoint
from retain.ops.fisher import ewc_penalty, ewc_penalty_grad_, mas_accumulate_

__all__ = ["MAS"]

_NAME = "retain.cl.MAS"


def _squared_norm(out: Tensor) -> Tensor:
    return out.square().sum()


class MAS(FileCheckpoint):
    r"""Memory Aware Synapses.

    At the end of a task, :meth:`consolidate` measures how sensitive the output is to each
    parameter on the task's inputs (no labels needed), from per-sample gradients::

        Ω_new = (1/N) Σ_s | ∂ ‖f(x_s)‖² / ∂θ |
        Ω ← Ω + Ω_new  (alpha=None, the paper)   or   Ω ← α·Ω + (1 − α)·Ω_new  (Avalanche's alpha)
        θ* ← θ,        penalty = lam · Σ Ω ⊙ (θ − θ*)²

    Avalanche takes the absolute value of the gradient of the *batch mean* of ‖f(x)‖² (signs cancel
    between samples before |·|); this is the per-sample form the paper defines.

    Args:
        model: the module; its parameters that require grad are consolidated.
        lam: the penalty weight (no ½, as the paper).
        alpha: None (importances of the tasks add up) or α in [0, 1].
        dtype: Ω's dtype (float32 or float64).
        chunk_size: samples per vmap call (default: per-sample gradients within 256 MiB).
        per_sample: ``'auto'`` (models of ``nn.Linear`` and ``nn.Conv2d`` layers: the sums from the
            layers' inputs and output gradients, as :class:`EWC`; otherwise vmap, or a loop over samples
            where torch.func cannot pass through the model), ``'vmap'`` or ``'loop'``.
    """

    def __init__(self, model: nn.Module, *, lam: float = 1.0, alpha: float | None = None,
                 dtype: torch.dtype = torch.float32, chunk_size: int | None = None, per_sample: str = "auto"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"{_NAME}: model must be an nn.Module, got {type(model).__name__}")
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam == lam:
            raise TypeError(f"{_NAME}: lam must be a real number, got {lam!r}")
        if alpha is not None and not (isinstance(alpha, (int, float)) and 0 <= alpha <= 1):
            raise ValueError(f"{_NAME}: alpha must be None or a number in [0, 1], got {alpha!r}")
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{_NAME}: dtype must be torch.float32 or torch.float64, got {dtype}")
        self._per_sample = ps.PerSample(_NAME, per_sample)
        self.model, self.lam, self.alpha, self.chunk_size = model, float(lam), alpha, chunk_size
        self.per_sample = per_sample
        self.names, self.params = ps.trainable(model)
        if not self.params:
            raise ValueError(f"{_NAME}: model has no parameter that requires grad")
        self.importance = [torch.zeros_like(p, dtype=dtype) for p in self.params]
        self.anchor: list[Tensor] | None = None
        self.tasks = 0

    def consolidate(self, data: Iterable, *, distributed: bool | None = None, process_group=None) -> None:
        """Measure the importance on ``data`` (an iterable of input batches, or of ``(inputs,
        targets)`` pairs whose targets are ignored) and move the anchor to the current parameters."""
        op = f"{_NAME}.consolidate"
        on, group = ps.distributed_group(op, distributed, process_group)
        chunk = ps.chunk_size(self.params, self.chunk_size)
        new = [torch.zeros_like(t) for t in self.importance]
        count = 0
        was_training = self.model.training
        self.model.eval()
        try:
            for item in data:
                inputs = item[0] if isinstance(item, (tuple, list)) and len(item) == 2 else item
                args = ps.as_args(inputs)
                fast = ps.layer_moments(self.model, self.names, self.params, _squared_norm, args, None, 1) \
                    if self.per_sample == "auto" else None
                if fast is not None:  # Linear/Conv2d layers only (Σ_s |d_s a_sᵀ| = |d|ᵀ|a| for [B, in] inputs)
                    with torch.no_grad():
                        for t, v in zip(new, fast[1]):
                            t.add_(v)
                else:
                    for grads, _ in self._per_sample.grads(self.model, self.names, self.params, _squared_norm,
                                                           args, None, chunk):
                        mas_accumulate_(new, grads)
                count += args[0].shape[0]
        finally:
            self.model.train(was_training)
        total = torch.tensor([float(count)], dtype=torch.float64)
        if on:
            ps.all_reduce_(new + [total], group)
        n = int(total.item())
        if n == 0:
            raise ValueError(f"{op}: data held no samples")
        with torch.no_grad():
            a = self.alpha
            for old, fresh in zip(self.importance, new):
                fresh.div_(n)
                if a is None or self.tasks == 0:
                    old.add_(fresh)
                else:
                    old.mul_(a).add_(fresh, alpha=1 - a)
            self.anchor = [p.detach().clone() for p in self.params]
        self.tasks += 1

    def penalty(self) -> Tensor:
        """lam · Σ Ω ⊙ (θ − θ*)², float64 0-dim, differentiable (0 before the first consolidation)."""
        if self.anchor is None:
            return torch.zeros((), dtype=torch.float64, device=self.params[0].device)
        return ewc_penalty(self.params, self.anchor, diag=self.importance, lam=2 * self.lam)

    def apply_penalty_grad_(self) -> Tensor:
        """Add the penalty's gradient 2·lam·Ω ⊙ (θ − θ*) into ``.grad``; returns the penalty."""
        if self.anchor is None:
            return torch.zeros((), dtype=torch.float64, device=self.params[0].device)
        return ewc_penalty_grad_(self.params, self.anchor, diag=self.importance, lam=2 * self.lam)

    def state_dict(self) -> dict:
        return {"format": _NAME, "version": 1, "lam": self.lam, "alpha": self.alpha, "names": list(self.names),
                "importance": list(self.importance), "anchor": None if self.anchor is None else list(self.anchor),
                "tasks": self.tasks}

    def load_state_dict(self, state: dict) -> None:
        op = f"{_NAME}.load_state_dict"
        ps.check_state_dict(op, state, _NAME, self.names, self.state_dict())
        ps.check_like_params(op, "importance", state["importance"], self.params)
        ps.check_like_params(op, "anchor", state["anchor"], self.params, optional=True)
        device = self.params[0].device
        self.importance = [t.to(device) for t in state["importance"]]
        self.anchor = None if state["anchor"] is None else [t.to(device) for t in state["anchor"]]
        self.lam, self.alpha, self.tasks = float(state["lam"]), state["alpha"], int(state["tasks"])
