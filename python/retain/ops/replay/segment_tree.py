"""``retain.ops.SumTree`` and ``retain.ops.MinTree``: priorities for prioritized replay in float64
trees on the CPU or a GPU, updated along the changed paths only and sampled (stratified or i.i.d.)
by native kernels (csrc/replay/segment_tree.h); ``retain.ops.importance_weights``."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from retain import _native
from retain.ops import _dispatch
from retain.ops._checks import check_int, check_number, check_tensor, dtype_name
from retain.ops.replay import _common, reference

_SUM, _MIN = 0, 1


class _SegmentTree:
    _op: int
    _identity: float
    _name: str

    def __init__(self, capacity: int, *, device: torch.device | str = "cpu"):
        self.capacity = check_int(self._name, "capacity", capacity, minimum=1)
        self.leaves = 1 << (self.capacity - 1).bit_length()
        self.device = torch.device(device)
        self.tree = torch.full((2 * self.leaves,), self._identity, dtype=torch.float64, device=self.device)
        # CUDA updates elect the last writer of a repeated index on this scratch (all -1 between calls)
        self._owner = (torch.full((self.capacity,), -1, dtype=torch.int32, device=self.device)
                       if self.device.type == "cuda" else None)

    def __len__(self) -> int:
        return self.capacity

    def __repr__(self) -> str:
        return f"retain.ops.{type(self).__name__}(capacity={self.capacity}, device={self.device})"

    def __getitem__(self, idx) -> Tensor:
        """The priorities at ``idx`` (an index, slice or index tensor)."""
        return self.tree[self.leaves:self.leaves + self.capacity][idx]

    def _check_index(self, op: str, idx) -> Tensor:
        check_tensor(op, "idx", idx, ndim=1, data=True)
        if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
            raise TypeError(f"{op}: idx must be an integer tensor, got {dtype_name(idx)}")
        idx = idx.to(self.device, torch.int64).contiguous()
        if idx.numel():
            if self.device.type == "cpu":
                lo, hi = int(idx.min()), int(idx.max())
                if lo < 0 or hi >= self.capacity:
                    raise IndexError(f"{op}: idx must be in [0, {self.capacity}) (the capacity), got "
                                     f"{lo if lo < 0 else hi}")
            else:  # no host sync: the device raises at the next synchronisation
                torch._assert_async(((idx >= 0) & (idx < self.capacity)).all(),
                                    f"{op}: idx must be in [0, {self.capacity})")
        return idx

    def _check_values(self, op: str, values, n: int, *, negative_ok: bool) -> Tensor:
        if isinstance(values, (int, float)) and not isinstance(values, bool):
            values = torch.tensor(float(values), dtype=torch.float64)
        check_tensor(op, "priority", values, data=True)
        if not values.is_floating_point():
            raise TypeError(f"{op}: priority must be a floating tensor, got {dtype_name(values)}")
        if values.dim() > 1 or (values.dim() == 1 and values.numel() != n):
            raise ValueError(f"{op}: priority must be a scalar or have idx's shape ({n},), got {tuple(values.shape)}")
        v = values.to(self.device, torch.float64).expand(n).contiguous()
        bad = torch.isnan(v) if negative_ok else ~(torch.isfinite(v) & (v >= 0))
        what = "not NaN" if negative_ok else "finite and >= 0"
        if self.device.type == "cpu":
            if bool(bad.any()):
                raise ValueError(f"{op}: priority must be {what}, got {float(v[bad][0])}")
        else:
            torch._assert_async(~bad.any(), f"{op}: priority must be {what}")
        return v

    def update(self, idx: Tensor, priority: Tensor | float) -> None:
        """Set the priorities at ``idx`` (int ``[k]``) to ``priority`` (``[k]`` or a scalar); the last
        of repeated indices wins. Rewrites the k changed paths only: O(k log capacity)."""
        op = f"retain.ops.{type(self).__name__}.update"
        idx = self._check_index(op, idx)
        v = self._check_values(op, priority, idx.numel(), negative_ok=self._op == _MIN)
        k = idx.numel()
        if k == 0:
            return
        if not _native.has_kernel("segment_tree", self.device.type):
            _dispatch.fallback("segment_tree", self.tree)  # raises unless RETAIN_FALLBACK=reference
            order = torch.arange(k, device=self.device)
            winner = torch.full((self.capacity,), -1, dtype=torch.int64, device=self.device)
            winner.scatter_reduce_(0, idx, order, reduce="amax")
            keep = winner[idx] == order  # the last of repeated indices
            leaf = self[:].clone()
            leaf[idx[keep]] = v[keep]
            self.tree.copy_(reference.tree_build_ref(leaf, self.leaves, self._identity, self._combine))
            return
        args = (self._op, self.tree.data_ptr(), self.leaves, idx.data_ptr(), v.data_ptr(), k)
        if self.device.type == "cpu":
            _dispatch.run("tree_update", self.device, *args)
        else:
            _dispatch.run("tree_update", self.device, *args, self._owner.data_ptr())

    def root(self) -> Tensor:
        """The root (the sum, or the minimum) as a 0-d float64 tensor on the tree's device."""
        return self.tree[1]

    def state_dict(self) -> dict:
        """``{'capacity': int, 'priorities': float64 [capacity] on the CPU}`` (the inner nodes are
        rebuilt on load, so a file cannot hold an inconsistent tree)."""
        return {"capacity": self.capacity, "priorities": self[:].detach().cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        op = f"retain.ops.{type(self).__name__}.load_state_dict"
        if not isinstance(state, dict) or set(state) != {"capacity", "priorities"}:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"{op}: state must be a dict with keys ['capacity', 'priorities'], got {got}")
        if state["capacity"] != self.capacity:
            raise ValueError(f"{op}: the state is of capacity {state['capacity']}, this tree's is {self.capacity}")
        p = state["priorities"]
        if not isinstance(p, Tensor) or p.shape != (self.capacity,) or p.dtype != torch.float64:
            raise ValueError(f"{op}: priorities must be a float64 tensor of shape ({self.capacity},)")
        self._check_values(op, p, self.capacity, negative_ok=self._op == _MIN)
        self.tree.copy_(reference.tree_build_ref(p.to(self.device), self.leaves, self._identity, self._combine))

    @staticmethod
    def _combine(a: Tensor, b: Tensor) -> Tensor:
        raise NotImplementedError


class SumTree(_SegmentTree):
    r"""Priorities ``p_i >= 0`` of ``capacity`` items with their sum, for sampling ``i`` with
    probability ``p_i / Σ p``: a float64 tree (float32 sums drift over millions of updates until
    zero-priority items get drawn) on the CPU or a CUDA device, any capacity.

    ``update`` rewrites only the changed leaves' paths, ``O(k log N)`` (on CUDA one launch of one
    block, not a pass over the tree per level); ``sample`` descends from the root natively, either
    stratified (the PER paper's: sample j's target lies in the j-th of n equal slices of the total)
    or i.i.d.; a zero priority is never sampled. Leaves start at 0.

    Args:
        capacity: items (>= 1; any number, stored in a tree over the next power of two).
        device: the device of the tree (and of the indices and probabilities it returns).

    Examples::

        >>> t = retain.ops.SumTree(5)
        >>> t.update(torch.tensor([0, 3, 4]), torch.tensor([1.0, 2.0, 1.0]))
        >>> t.total()
        4.0
        >>> idx, prob = t.sample(4, generator=torch.Generator().manual_seed(0))
        >>> idx.tolist(), prob.tolist()                  # one draw per quarter of the total
        ([0, 3, 3, 4], [0.25, 0.5, 0.5, 0.25])
    """

    _op, _identity, _name = _SUM, 0.0, "retain.ops.SumTree"
    _combine = staticmethod(torch.add)

    def total(self) -> float:
        """Σ p_i (a host read: on CUDA it synchronises; ``root()`` does not)."""
        return float(self.tree[1])

    def sample(self, n: int, *, generator: torch.Generator | None = None, stratified: bool = True
               ) -> tuple[Tensor, Tensor]:
        """``n`` indices drawn with probability ``p_i / Σ p`` (with replacement), and those
        probabilities: int64 ``[n]`` and float64 ``[n]`` on the tree's device. Stratified by default
        (lower variance, as in PER); ``stratified=False`` draws i.i.d. (as torchrl does). The
        uniforms come from ``generator`` (on its own device; torch's default CPU generator when None)."""
        op = "retain.ops.SumTree.sample"
        n = check_int(op, "n", n, minimum=0)
        _common.check_generator(op, generator)
        gen_device = generator.device if generator is not None else torch.device("cpu")
        u = torch.rand(n, dtype=torch.float64, generator=generator, device=gen_device).to(self.device)
        if self.device.type == "cpu":
            if n and not self.tree[1] > 0:
                raise ValueError(f"{op}: the total priority is {float(self.tree[1])}: nothing to sample "
                                 "(update some priorities to > 0 first)")
        elif n:
            torch._assert_async(self.tree[1] > 0, f"{op}: the total priority must be > 0")
        if not _native.has_kernel("segment_tree", self.device.type):
            _dispatch.fallback("segment_tree", self.tree)
            if n == 0:
                return torch.empty(0, dtype=torch.int64, device=self.device), u
            return reference.tree_sample_ref(self[:], u, stratified)
        idx = torch.empty(n, dtype=torch.int64, device=self.device)
        prob = torch.empty(n, dtype=torch.float64, device=self.device)
        if n:
            _dispatch.run("tree_sample", self.device, self.tree.data_ptr(), self.leaves, u.data_ptr(), n,
                          bool(stratified), idx.data_ptr(), prob.data_ptr())
        return idx, prob


class MinTree(_SegmentTree):
    r"""The minimum of ``capacity`` values (leaves start at +inf, meaning empty), updated along the
    changed paths only: prioritized replay's ``p_min`` for importance weights. CPU or CUDA, float64.

    Examples::

        >>> t = retain.ops.MinTree(3)
        >>> t.update(torch.tensor([0, 2]), torch.tensor([0.5, 0.25]))
        >>> t.min()
        0.25
    """

    _op, _identity, _name = _MIN, math.inf, "retain.ops.MinTree"
    _combine = staticmethod(torch.minimum)

    def min(self) -> float:
        """The smallest value (+inf when empty; a host read)."""
        return float(self.tree[1])


def importance_weights(prob: Tensor, *, beta: float, min_prob: Tensor | float | None = None) -> Tensor:
    r"""Prioritized replay's importance-sampling weights ``w_j = (N · P(j))^(−β) / max w`` (N cancels).

    With ``min_prob`` (the smallest sampling probability in the buffer, ``MinTree.root() /
    SumTree.root()``) the maximum is the buffer's: ``w_j = (P(j) / min_prob)^(−β)`` (PER, torchrl);
    without it, the batch's: ``w_j = (P(j) / min_j P(j))^(−β)``, so the largest weight in the batch
    is 1.

    Args:
        prob: float ``[n]``, the probabilities :meth:`SumTree.sample` returned.
        beta: the exponent, in [0, 1] (annealed to 1 in PER).
        min_prob: 0-d tensor or float, or None for the batch normalisation.

    Returns:
        float32 ``[n]`` on ``prob``'s device.

    Examples::

        >>> p = torch.tensor([0.5, 0.25, 0.125], dtype=torch.float64)
        >>> retain.ops.importance_weights(p, beta=1.0, min_prob=0.125)
        tensor([0.2500, 0.5000, 1.0000])
    """
    op = "retain.ops.importance_weights"
    check_tensor(op, "prob", prob, ndim=1)
    if not prob.is_floating_point():
        raise TypeError(f"{op}: prob must be a floating tensor, got {dtype_name(prob)}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta <= 1:
        raise ValueError(f"{op}: beta must be a number in [0, 1], got {beta!r}")
    p = prob.to(torch.float64)
    if min_prob is None:
        ref = p.min()
    elif isinstance(min_prob, Tensor) and min_prob.numel() == 1 and min_prob.is_floating_point():
        ref = min_prob.to(p.device, torch.float64).reshape(())
    else:
        ref = torch.tensor(check_number(op, "min_prob", min_prob, finite=False), dtype=torch.float64, device=p.device)
    return (p / ref).pow(-float(beta)).to(torch.float32)
