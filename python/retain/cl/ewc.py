"""Elastic weight consolidation with a correct per-sample Fisher: diagonal, rank-1 ("Avoid
Catastrophic Forgetting with Rank-1 Fisher from Diffusion Models") or both, one anchor per task
or one online (decayed) anchor, single-process or distributed."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retain.cl import _per_sample as ps
from retain.cl._files import FileCheckpoint
from retain.ops.fisher import (ewc_penalty, ewc_penalty_grad_, fisher_accumulate_, rank1_accumulate_,
                               rank1_coefficient)

__all__ = ["EWC"]

_NAME = "retain.cl.EWC"
MODES = ("diag", "rank1", "both")
FISHERS = ("empirical", "sampled")


@dataclass
class _Anchor:
    """One consolidated task (or the online accumulation): θ*, the diagonal Fisher (or None) and the
    rank-1 terms (μ, c) sharing that anchor."""

    params: list[Tensor]
    diag: list[Tensor] | None
    rank1: list[tuple[list[Tensor], float]] = field(default_factory=list)
    samples: int = 0


class EWC(FileCheckpoint):
    r"""Elastic weight consolidation for continual learning.

    After each task, :meth:`consolidate` estimates the Fisher information of the model's
    parameters from *per-sample* gradients (``torch.func.vmap`` of ``torch.func.grad``, chunked
    to bound memory) and stores an anchor θ*; during later tasks :meth:`penalty` (autograd) or
    :meth:`apply_penalty_grad_` (straight into ``.grad``) keeps the parameters near it::

        penalty = lam/2 · Σ_tasks [ Σ F ⊙ (θ − θ*)² + c · (μᵀ(θ − θ*))² ]

    - ``mode='diag'``: F = mean over samples of g² (Kirkpatrick et al., 2017).
    - ``mode='rank1'``: F ≈ c·μμᵀ with μ = mean gradient and c* = E[(μᵀg)²] / ‖μ‖⁴, the
      Frobenius-optimal scale (rank-1 Fisher paper): per-sample gradients are nearly collinear,
      so the rank-1 term carries the dominant curvature at the diagonal's cost. c* needs μ, so
      the data is read twice (the same batches, the same sampled labels); the second pass takes
      μᵀg_s as the directional derivative of each sample's loss along μ (forward mode, no
      per-sample gradients: about two forward passes).
    - ``mode='both'``: diag(F) + c·μμᵀ from the same samples.

    ``fisher='empirical'`` uses the data's targets; ``'sampled'`` draws targets from the model's
    predictive distribution, softmax over the last dimension of its output (the true Fisher of a
    classifier or language model; pass ``loss_fn`` = cross-entropy then). Every sample counts
    once: a partial last batch by its real size.

    ``online_gamma=None`` keeps one anchor per task (``separate``); a float γ keeps one anchor, the
    latest parameters, with F ← γ·F + F_new and every earlier rank-1 term's c scaled by γ (online
    EWC, Schwarz et al., 2018).

    Under ``torch.distributed`` (initialised, world size > 1; or ``distributed=True``) each rank
    consolidates its own shard of the data and the sums are all-reduced, so every rank ends with the
    same Fisher as one process on all the data.

    Differences from popular implementations: Avalanche's EWC squares the gradient of the
    mini-batch *mean* loss (not a Fisher: about batch-size times smaller than the mean of
    per-sample squares) and its penalty has no ½; to reproduce it, accumulate
    ``retain.ops.fisher_accumulate_(F, batch_mean_grads, scale=1/num_batches)`` yourself and use
    ``lam = 2·λ_avalanche``. Mammoth's online EWC divides the summed per-sample squares by
    ``len(loader)·batch_size`` (wrong for a partial last batch) and applies the penalty's gradient
    per parameter in Python (:meth:`apply_penalty_grad_` is that form in one native pass).

    Args:
        model: the module (the plain module, not a DDP wrapper); its parameters that require grad
            are consolidated.
        mode: ``'diag'``, ``'rank1'`` or ``'both'``.
        lam: the penalty weight λ.
        online_gamma: None (one anchor per task) or γ in [0, 1] (one decayed anchor).
        fisher: ``'empirical'`` or ``'sampled'``.
        dtype: the Fisher's dtype, float32 or float64 (accumulation).
        chunk_size: samples per vmap call (default: as many as keep the per-sample gradients of a
            chunk within 256 MiB).
        generator: the torch.Generator for ``'sampled'`` targets (default: a fresh one seeded 0).
        per_sample: ``'auto'``: when every parameter belongs to an ``nn.Linear`` or ``nn.Conv2d``
            applied once (MLPs, CNNs), the sums come from one batched forward and backward, the
            layers' inputs and output gradients (for ``[batch, features]`` inputs without forming
            any per-sample gradient: Σ_s (d_s a_sᵀ)² = (d²)ᵀ(a²)); other models use ``vmap ∘
            grad``, or one autograd pass per sample where torch.func cannot pass through the model
            (custom ops such as retain's scans on torch 2.13); ``'vmap'``: always ``vmap ∘ grad``;
            ``'loop'``: always one autograd pass per sample.

    Example::

        ewc = retain.cl.EWC(model, mode="both", lam=100.0)
        for task in tasks:
            for x, y in task.train:
                loss = F.cross_entropy(model(x), y) + ewc.penalty()
                ...
            ewc.consolidate(task.train, F.cross_entropy)   # iterable of (inputs, targets)
    """

    def __init__(self, model: nn.Module, *, mode: str = "diag", lam: float = 1.0, online_gamma: float | None = None,
                 fisher: str = "empirical", dtype: torch.dtype = torch.float32, chunk_size: int | None = None,
                 generator: torch.Generator | None = None, per_sample: str = "auto"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"{_NAME}: model must be an nn.Module, got {type(model).__name__}")
        if mode not in MODES:
            raise ValueError(f"{_NAME}: mode must be one of {MODES}, got {mode!r}")
        if fisher not in FISHERS:
            raise ValueError(f"{_NAME}: fisher must be one of {FISHERS}, got {fisher!r}")
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{_NAME}: dtype must be torch.float32 or torch.float64, got {dtype}")
        self._per_sample = ps.PerSample(_NAME, per_sample)
        if online_gamma is not None and not (isinstance(online_gamma, (int, float)) and 0 <= online_gamma <= 1):
            raise ValueError(f"{_NAME}: online_gamma must be None or a number in [0, 1], got {online_gamma!r}")
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam == lam:
            raise TypeError(f"{_NAME}: lam must be a real number, got {lam!r}")
        self.model, self.mode, self.lam, self.online_gamma = model, mode, float(lam), online_gamma
        self.fisher, self.dtype, self.chunk_size, self.per_sample = fisher, dtype, chunk_size, per_sample
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.names, self.params = ps.trainable(model)
        if not self.params:
            raise ValueError(f"{_NAME}: model has no parameter that requires grad")
        self.anchors: list[_Anchor] = []

    # ------------------------------------------------------------------------------------------
    # consolidation
    # ------------------------------------------------------------------------------------------

    def _targets(self, args: tuple[Tensor, ...], targets):
        """The targets the per-sample losses use: the data's, or drawn from the model's output."""
        if self.fisher == "empirical":
            if not isinstance(targets, Tensor):
                raise TypeError(f"{_NAME}.consolidate: fisher='empirical' needs target tensors, got "
                                f"{type(targets).__name__}")
            return targets
        with torch.no_grad():
            logits = self.model(*args)
        probs = torch.softmax(logits.detach().to(torch.float64).cpu(), dim=-1)
        flat = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=self.generator)
        return flat.reshape(probs.shape[:-1]).to(logits.device)

    def consolidate(self, data: Iterable, loss_fn: Callable[..., Tensor] = F.cross_entropy, *,
                    distributed: bool | None = None, process_group=None) -> None:
        """Estimate the Fisher on ``data`` and add an anchor at the current parameters.

        Args:
            data: an iterable of ``(inputs, targets)`` batches (inputs a tensor or a tuple of
                tensors, batch first). With a rank-1 mode it is iterated twice and must give the
                same batches both times (a list, or a DataLoader without shuffling: checked).
            loss_fn: ``loss_fn(outputs, targets)``, a *mean* loss such as ``F.cross_entropy``;
                it is evaluated on one sample at a time (outputs ``[1, ...]``).
            distributed, process_group: all-reduce the sums over the ranks (default: when
                torch.distributed is initialised with more than one rank).
        """
        op = f"{_NAME}.consolidate"
        if not callable(loss_fn):
            raise TypeError(f"{op}: loss_fn must be callable, got {type(loss_fn).__name__}")
        rank1 = self.mode in ("rank1", "both")
        if rank1 and iter(data) is data:
            raise TypeError(f"{op}: mode={self.mode!r} reads the data twice (c* needs the mean gradient first): "
                            "pass a re-iterable (a list, a DataLoader), not an iterator")
        on, group = ps.distributed_group(op, distributed, process_group)
        chunk = ps.chunk_size(self.params, self.chunk_size)
        diag = [torch.zeros_like(p, dtype=self.dtype) for p in self.params] if self.mode != "rank1" else None
        mu = [torch.zeros_like(p, dtype=self.dtype) for p in self.params] if rank1 else None
        count = 0
        seen: list[tuple] = []  # per batch: its size, a checksum and the targets used (rank-1 pass 2)
        was_training = self.model.training
        self.model.eval()  # per-sample gradients of a deterministic function (no dropout, fixed norms)
        try:
            for args, targets in ps.batches(op, data):
                y = self._targets(args, targets)
                fast = ps.layer_moments(self.model, self.names, self.params, loss_fn, args, y, 2) \
                    if self.per_sample == "auto" else None
                if fast is not None:  # Linear/Conv2d layers only: the sums from the layers' inputs and output grads
                    with torch.no_grad():
                        for state, part in zip((mu, diag), fast):
                            for t, v in zip(state or (), part):
                                t.add_(v)
                else:
                    for grads, _ in self._per_sample.grads(self.model, self.names, self.params, loss_fn, args, y,
                                                           chunk):
                        if rank1:
                            rank1_accumulate_(mu, diag, grads)
                        else:
                            fisher_accumulate_(diag, grads)
                count += args[0].shape[0]
                if rank1:
                    seen.append((args[0].shape[0], _checksum(args), y))
            total = torch.tensor([float(count)], dtype=torch.float64)
            if on:
                ps.all_reduce_([t for t in (diag or []) + (mu or [])] + [total], group)
            n = int(total.item())
            if n == 0:
                raise ValueError(f"{op}: data held no samples")
            for t in (diag or []) + (mu or []):
                t.div_(n)
            c = None
            if rank1:
                num = torch.zeros((), dtype=torch.float64, device=self.params[0].device)
                batch = 0
                for args, _ in ps.batches(op, data):
                    if batch >= len(seen) or seen[batch][:2] != (args[0].shape[0], _checksum(args)):
                        raise ValueError(f"{op}: data gave different batches on its second pass (batch {batch}); "
                                         "a rank-1 mode needs the same samples twice (no shuffling)")
                    y = seen[batch][2]
                    dots = self._per_sample.directional(self.model, self.names, self.params, loss_fn, args, y, mu,
                                                        chunk)
                    num = num + dots.square().sum().to(num.device)
                    batch += 1
                if batch != len(seen):
                    raise ValueError(f"{op}: data gave {batch} batches on its second pass, {len(seen)} on the first")
                if on:
                    num = num.reshape(1).cpu()
                    ps.all_reduce_([num], group)
                norm4 = float(rank1_coefficient(mu, mu))
                c = float(num.sum()) / n / norm4 if norm4 > 0 else 0.0
        finally:
            self.model.train(was_training)
        self._add_anchor(diag, mu, c, n)

    def _add_anchor(self, diag, mu, c, n) -> None:
        theta = [p.detach().clone() for p in self.params]
        if self.online_gamma is None or not self.anchors:
            self.anchors.append(_Anchor(theta, diag, [(mu, c)] if mu is not None else [], n))
            return
        g = float(self.online_gamma)
        a = self.anchors[0]
        if diag is not None:
            for old, new in zip(a.diag, diag):
                old.mul_(g).add_(new)
        a.rank1 = [(m, g * cc) for m, cc in a.rank1] + ([(mu, c)] if mu is not None else [])
        a.params, a.samples = theta, a.samples + n

    # ------------------------------------------------------------------------------------------
    # penalty
    # ------------------------------------------------------------------------------------------

    def _terms(self):
        """(anchor params, diag, mu, c) per native call: the diagonal with the first rank-1 term."""
        for a in self.anchors:
            first_mu, first_c = a.rank1[0] if a.rank1 else (None, None)
            yield a.params, a.diag, first_mu, first_c
            for m, c in a.rank1[1:]:
                yield a.params, None, m, c

    def penalty(self) -> Tensor:
        """lam/2 · Σ_tasks [Σ F⊙Δ² + c(μᵀΔ)²], float64 0-dim, differentiable with respect to the
        parameters (0 before the first consolidation)."""
        total = torch.zeros((), dtype=torch.float64, device=self.params[0].device)
        for anchor, diag, mu, c in self._terms():
            total = total + ewc_penalty(self.params, anchor, diag=diag, mu=mu, c=c, lam=self.lam)
        return total

    def apply_penalty_grad_(self) -> Tensor:
        """Add the penalty's gradient into the parameters' ``.grad`` (no graph; after
        ``loss.backward()``, before ``optimizer.step()``) and return its value (detached)."""
        total = torch.zeros((), dtype=torch.float64, device=self.params[0].device)
        for anchor, diag, mu, c in self._terms():
            total = total + ewc_penalty_grad_(self.params, anchor, diag=diag, mu=mu, c=c, lam=self.lam)
        return total

    # ------------------------------------------------------------------------------------------
    # state
    # ------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"format": _NAME, "version": 1, "mode": self.mode, "lam": self.lam, "online_gamma": self.online_gamma,
                "fisher": self.fisher, "names": list(self.names),
                "anchors": [{"params": list(a.params), "diag": _copy(a.diag), "rank1": [(list(m), c) for m, c in a.rank1],
                             "samples": a.samples} for a in self.anchors]}

    def load_state_dict(self, state: dict) -> None:
        op = f"{_NAME}.load_state_dict"
        ps.check_state_dict(op, state, _NAME, self.names, self.state_dict())
        anchors = []
        device = self.params[0].device
        if state["mode"] not in MODES:
            raise ValueError(f"{op}: mode must be one of {MODES}, got {state['mode']!r}")
        if not isinstance(state["anchors"], (list, tuple)):
            raise ValueError(f"{op}: anchors must be a list of anchors, got {type(state['anchors']).__name__}")
        for i, a in enumerate(state["anchors"]):
            missing = [key for key in ("params", "diag", "rank1", "samples") if not isinstance(a, dict) or key not in a]
            if missing:
                raise ValueError(f"{op}: anchors[{i}] lacks {missing} (an incomplete or foreign state dict)")
            ps.check_like_params(op, f"anchors[{i}]['params']", a["params"], self.params)
            ps.check_like_params(op, f"anchors[{i}]['diag']", a["diag"], self.params, optional=True)
            if not isinstance(a["rank1"], (list, tuple)) or not all(isinstance(r, (list, tuple)) and len(r) == 2
                                                                    for r in a["rank1"]):
                raise ValueError(f"{op}: anchors[{i}]['rank1'] must be a list of (mu, c) pairs, got "
                                 f"{type(a['rank1']).__name__}")
            for j, (m, _) in enumerate(a["rank1"]):
                ps.check_like_params(op, f"anchors[{i}]['rank1'][{j}]", m, self.params)
            move = (lambda ts: None if ts is None else [t.to(device) for t in ts])  # noqa: E731
            anchors.append(_Anchor(move(a["params"]), move(a["diag"]),
                                   [(move(m), float(c)) for m, c in a["rank1"]], int(a["samples"])))
        self.mode, self.lam, self.online_gamma = state["mode"], float(state["lam"]), state["online_gamma"]
        self.fisher, self.anchors = state["fisher"], anchors

    def __repr__(self) -> str:
        return (f"{_NAME}(mode={self.mode!r}, lam={self.lam}, online_gamma={self.online_gamma}, "
                f"fisher={self.fisher!r}, anchors={len(self.anchors)}, parameters={sum(p.numel() for p in self.params)})")


def _copy(tensors: list[Tensor] | None) -> list[Tensor] | None:
    """A new list of the same tensors: a state dict's lists are the caller's to change."""
    return None if tensors is None else list(tensors)


def _checksum(args: tuple[Tensor, ...]) -> tuple:
    """A cheap fingerprint of a batch's inputs (shapes and float64 sums), to detect a second pass
    that sees different data."""
    return tuple((tuple(a.shape), float(a.detach().to(torch.float64).sum())) for a in args)
