"""Synaptic Intelligence (Zenke, Poole & Ganguli, 2017): per-parameter importance from the path
integral of the loss along the training trajectory, one native pass per step."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from retain.cl import _per_sample as ps
from retain.cl._files import FileCheckpoint
from retain.ops.fisher import ewc_penalty, ewc_penalty_grad_, si_accumulate_, si_consolidate_

__all__ = ["SI"]

_NAME = "retain.cl.SI"


class SI(FileCheckpoint):
    r"""Synaptic Intelligence.

    Each optimiser step adds its contribution to the path integral, and the end of a task turns the
    integral into an importance::

        step:   ω ← ω − g ⊙ (θ_after − θ_before)                 (plain SGD: += lr·g²)
        task:   Ω ← Ω + ω / ((θ − θ*)² + ξ),   θ* ← θ,   ω ← 0
        penalty = c · Σ Ω ⊙ (θ − θ*)²

    The paper defines ω with the gradient of the task's own loss. ``g`` here is what ``.grad``
    holds when :meth:`before_step` is called: call it right after the task loss's
    ``backward()`` (then add the penalty with :meth:`apply_penalty_grad_`) for the task-loss
    gradient, or after backpropagating loss + penalty for the total gradient (what Avalanche and
    Mammoth integrate)::

        loss = F.cross_entropy(model(x), y)
        loss.backward()
        si.before_step()          # θ_before and g = the task loss's gradient
        si.apply_penalty_grad_()  # + ∂ penalty / ∂θ, into .grad
        optimizer.step()
        si.after_step()           # ω ← ω − g ⊙ (θ_after − θ_before)
        ...
        si.consolidate()          # at the end of each task

    Args:
        model: the module; its parameters that require grad are tracked.
        c: the penalty weight.
        xi: the damping ξ > 0 of the consolidation.
        dtype: the dtype of ω and Ω (float32 or float64).
    """

    def __init__(self, model: nn.Module, *, c: float = 0.1, xi: float = 1e-3, dtype: torch.dtype = torch.float32):
        if not isinstance(model, nn.Module):
            raise TypeError(f"{_NAME}: model must be an nn.Module, got {type(model).__name__}")
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not c == c:
            raise TypeError(f"{_NAME}: c must be a real number, got {c!r}")
        if isinstance(xi, bool) or not isinstance(xi, (int, float)) or not xi > 0:
            raise ValueError(f"{_NAME}: xi must be a number > 0, got {xi!r}")
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{_NAME}: dtype must be torch.float32 or torch.float64, got {dtype}")
        self.model, self.c, self.xi = model, float(c), float(xi)
        self.names, self.params = ps.trainable(model)
        if not self.params:
            raise ValueError(f"{_NAME}: model has no parameter that requires grad")
        self.omega = [torch.zeros_like(p, dtype=dtype) for p in self.params]
        self.importance = [torch.zeros_like(p, dtype=dtype) for p in self.params]
        self.anchor = [p.detach().clone() for p in self.params]  # θ* (the start of the current task)
        self._before: list[Tensor] | None = None
        self._grads: list[Tensor] | None = None
        self._pending = False  # before_step() seen, after_step() not yet
        self.tasks = 0

    def before_step(self) -> None:
        """Record θ and the gradient now in ``.grad`` (call before ``optimizer.step()``)."""
        missing = [n for n, p in zip(self.names, self.params) if p.grad is None]
        if missing:
            raise RuntimeError(f"{_NAME}.before_step: parameters without .grad: {missing[:3]} (call it after "
                               "loss.backward())")
        with torch.no_grad():
            if self._before is None:
                self._before = [p.detach().clone() for p in self.params]
                self._grads = [p.grad.detach().clone() for p in self.params]
            else:
                torch._foreach_copy_(self._before, [p.detach() for p in self.params])
                torch._foreach_copy_(self._grads, [p.grad.detach() for p in self.params])
        self._pending = True

    def after_step(self) -> None:
        """Add the step's contribution −g ⊙ (θ_after − θ_before) to ω."""
        if not getattr(self, "_pending", False):
            raise RuntimeError(f"{_NAME}.after_step: call before_step() before optimizer.step()")
        with torch.no_grad():
            si_accumulate_(self.omega, self._grads, self._before, [p.detach() for p in self.params])
        self._pending = False

    def consolidate(self) -> None:
        """End of a task: Ω += ω / ((θ − θ*)² + ξ), then θ* ← θ and ω ← 0."""
        with torch.no_grad():
            theta = [p.detach() for p in self.params]
            si_consolidate_(self.importance, self.omega, theta, self.anchor, xi=self.xi, reset=True)
            torch._foreach_copy_(self.anchor, theta)
        self.tasks += 1

    def penalty(self) -> Tensor:
        """c · Σ Ω ⊙ (θ − θ*)², float64 0-dim, differentiable (0 before the first consolidation)."""
        if not self.tasks:
            return torch.zeros((), dtype=torch.float64, device=self.params[0].device)
        return ewc_penalty(self.params, self.anchor, diag=self.importance, lam=2 * self.c)

    def apply_penalty_grad_(self) -> Tensor:
        """Add the penalty's gradient 2c·Ω ⊙ (θ − θ*) into ``.grad``; returns the penalty."""
        if not self.tasks:
            return torch.zeros((), dtype=torch.float64, device=self.params[0].device)
        return ewc_penalty_grad_(self.params, self.anchor, diag=self.importance, lam=2 * self.c)

    def state_dict(self) -> dict:
        return {"format": _NAME, "version": 1, "c": self.c, "xi": self.xi, "names": list(self.names),
                "omega": list(self.omega), "importance": list(self.importance), "anchor": list(self.anchor),
                "tasks": self.tasks}

    def load_state_dict(self, state: dict) -> None:
        op = f"{_NAME}.load_state_dict"
        ps.check_state_dict(op, state, _NAME, self.names, self.state_dict())
        with torch.no_grad():
            for key in ("omega", "importance", "anchor"):
                ps.check_like_params(op, key, state[key], self.params)
            for key in ("omega", "importance", "anchor"):
                for dst, src in zip(getattr(self, key), state[key]):
                    dst.copy_(src)
        self.c, self.xi, self.tasks = float(state["c"]), float(state["xi"]), int(state["tasks"])
