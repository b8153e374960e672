r"""Continual-learning metrics over a score matrix and over a stream of evaluations.

The matrix ``R`` (lists or a tensor, ``T x T``): ``R[i][j]`` is the score on task j after learning
task i (tasks in training order, 0-based). Scores are accuracies (higher is better) unless
``lower_is_better=True`` (losses, perplexities): then every function reads ``-R``, so that positive
forgetting and negative backward transfer always mean "got worse".

- ``average_accuracy``   ACC = (1/T) Σ_j R[T-1][j]
- ``backward_transfer``  BWT = 1/(T-1) Σ_{j<T-1} (R[T-1][j] - R[j][j])     (Lopez-Paz & Ranzato, 2017)
- ``forward_transfer``   FWT = 1/(T-1) Σ_{j>0} (R[j-1][j] - b[j]),  b[j] the score of the
  randomly initialised model on task j                                       (Lopez-Paz & Ranzato, 2017)
- ``forgetting``         F = 1/(T-1) Σ_{j<T-1} max_{j<=l<T-1} (R[l][j] - R[T-1][j])
  (Chaudhry et al., 2018: the best score a task had once learned, minus its final score)

The stream (``A`` ``[steps, T]``: the score on every task at every evaluation step, and
``task_of_step`` ``[steps]``: the task being trained at that step, non-decreasing), after De Lange,
van de Ven & Tuytelaars, "Continual evaluation for lifelong learning: identifying the stability
gap" (ICLR 2023):

- ``min_acc``  at step t while training task k: (1/k) Σ_{i<k} min_{n<=t, task(n)>i} A[n][i], the
  average over earlier tasks of their worst score at any step after they were learned (a running
  minimum, never reset); NaN while training the first task.
- ``wc_acc``   WC-ACC_t = (1/(k+1)) A[t][k] + (1 - 1/(k+1)) min-ACC_t with k 0-based (the paper's
  1/k with tasks counted from 1); the current task's score while training the first task.

Where other libraries differ: Avalanche's experience forgetting is the score just after a task
was learned minus the current one (R[j][j] - R[T-1][j], not the maximum over the later rows) and
its stream BWT is the negative of that forgetting; Mammoth's ``forgetting`` takes the maximum over
the earlier rows as here and reports percentages; CapyMOA's ``OCLMetrics`` has ACC
(``accuracy_final``), BWT and FWT as here but no forgetting, and its "anytime" accuracies average
the periodic evaluations (over all or over seen tasks) where min-ACC keeps a running minimum.
"""

from __future__ import annotations

import torch
from torch import Tensor

_OP = "retain.cl.metrics"


def _matrix(name: str, R, lower_is_better: bool) -> Tensor:
    try:
        m = torch.as_tensor(R, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{_OP}.{name}: R must be a square matrix of numbers (lists or a tensor), got "
                        f"{type(R).__name__}") from None
    if m.dim() != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError(f"{_OP}.{name}: R must be a non-empty square T x T matrix (R[i][j]: the score on task j "
                         f"after learning task i), got shape {tuple(m.shape)}")
    return -m if lower_is_better else m


def _needs_two(name: str, m: Tensor) -> None:
    if m.shape[0] < 2:
        raise ValueError(f"{_OP}.{name}: needs at least 2 tasks, got {m.shape[0]}")


def average_accuracy(R) -> float:
    """ACC = (1/T) Σ_j R[T-1][j], the mean final score (or loss: a mean needs no sign)."""
    return float(_matrix("average_accuracy", R, False)[-1].mean())


def backward_transfer(R, *, lower_is_better: bool = False) -> float:
    """BWT = 1/(T-1) Σ_{j<T-1} (R[T-1][j] - R[j][j]); negative: learning later tasks hurt earlier ones."""
    m = _matrix("backward_transfer", R, lower_is_better)
    _needs_two("backward_transfer", m)
    T = m.shape[0]
    return float((m[-1, :-1] - m.diagonal()[:-1]).sum() / (T - 1))


def forward_transfer(R, baseline, *, lower_is_better: bool = False) -> float:
    """FWT = 1/(T-1) Σ_{j>0} (R[j-1][j] - b[j]): how much learning tasks < j helped task j before
    it was trained, against ``baseline`` b (the random initialisation's scores, length T)."""
    m = _matrix("forward_transfer", R, lower_is_better)
    _needs_two("forward_transfer", m)
    b = torch.as_tensor(baseline, dtype=torch.float64).reshape(-1)
    if b.numel() != m.shape[0]:
        raise ValueError(f"{_OP}.forward_transfer: baseline must hold one score per task ({m.shape[0]}), got "
                         f"{b.numel()}")
    b = -b if lower_is_better else b
    T = m.shape[0]
    return float((m[:-1].diagonal(1) - b[1:]).sum() / (T - 1))


def forgetting(R, *, lower_is_better: bool = False) -> float:
    """F = 1/(T-1) Σ_{j<T-1} max_{j<=l<T-1} (R[l][j] - R[T-1][j]): the mean drop from each earlier
    task's best score once learned to its final score (>= 0)."""
    m = _matrix("forgetting", R, lower_is_better)
    _needs_two("forgetting", m)
    T = m.shape[0]
    drops = [float((m[j:T - 1, j] - m[-1, j]).max()) for j in range(T - 1)]
    return sum(drops) / (T - 1)


def _stream(name: str, A, task_of_step) -> tuple[Tensor, Tensor]:
    try:
        a = torch.as_tensor(A, dtype=torch.float64)
        k = torch.as_tensor(task_of_step)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{_OP}.{name}: A must be a [steps, T] matrix of scores and task_of_step [steps] integers, "
                        f"got {type(A).__name__} and {type(task_of_step).__name__}") from None
    if a.dim() != 2:
        raise ValueError(f"{_OP}.{name}: A must be [steps, T] (the score on every task at every step), got shape "
                         f"{tuple(a.shape)}")
    if k.is_floating_point() or k.dim() != 1 or k.numel() != a.shape[0]:
        raise ValueError(f"{_OP}.{name}: task_of_step must hold one integer task index per step ({a.shape[0]}), got "
                         f"{k.dtype} of shape {tuple(k.shape)}")
    k = k.to(torch.int64)
    if k.numel() and (int(k.min()) < 0 or int(k.max()) >= a.shape[1] or bool((k[1:] < k[:-1]).any())):
        raise ValueError(f"{_OP}.{name}: task_of_step must be non-decreasing task indices in [0, {a.shape[1]}), got "
                         f"{k.tolist()[:20]}")
    return a, k


def min_acc(A, task_of_step) -> Tensor:
    """min-ACC at every step (float64 ``[steps]``): the mean over the earlier tasks of their lowest
    score at any step after they were learned, up to this step; NaN during the first task."""
    a, k = _stream("min_acc", A, task_of_step)
    steps, T = a.shape
    out = torch.full((steps,), float("nan"), dtype=torch.float64)
    low = torch.full((T,), float("inf"), dtype=torch.float64)  # running minimum per learned task
    for t in range(steps):
        cur = int(k[t])
        learned = torch.arange(T) < cur
        low = torch.where(learned, torch.minimum(low, a[t]), low)
        if cur > 0:
            out[t] = low[:cur].mean()
    return out


def wc_acc(A, task_of_step) -> Tensor:
    """WC-ACC at every step (float64 ``[steps]``): (1/(k+1))·A[t][k] + (1 - 1/(k+1))·min-ACC_t for
    the task k being trained (0-based); the current task's score during the first task."""
    a, k = _stream("wc_acc", A, task_of_step)
    low = min_acc(a, k)
    cur = a[torch.arange(a.shape[0]), k]
    w = 1.0 / (k.to(torch.float64) + 1)
    return torch.where(k == 0, cur, w * cur + (1 - w) * low)


__all__ = ["average_accuracy", "backward_transfer", "forgetting", "forward_transfer", "min_acc", "wc_acc"]
