"""``retain.cl.ReplayBuffer``: a fixed-capacity store of past examples with reservoir, ring,
class-balanced or prioritized insertion, batched writes and reads by native row copies, uint8
quantised fields, memory-mapped storage, exact checkpoints and sharded sampling under
``torch.distributed``."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from retain import _native
from retain.cl._files import FileCheckpoint, check_header
from retain.ops._checks import check_bool, check_choice, check_int, check_tensor, dtype_name
from retain.ops.replay import _rows
from retain.ops.replay import (ClassBalancedState, MinTree, SumTree, class_balanced_slots, gather_rows,
                               importance_weights, reservoir_slots, ring_slots, scatter_rows_)

_NAME = "retain.cl.ReplayBuffer"
FORMAT = "retain.cl.ReplayBuffer"
FORMAT_VERSION = 1
POLICIES = ("reservoir", "ring", "class_balanced", "prioritized")
QUANTIZED = "uint8"


@dataclass(frozen=True)
class Field:
    """One stored field: each item's ``shape`` and ``dtype``; ``quantize='uint8'`` stores a floating
    field as uint8 codes with a per-item float32 scale and offset (4× smaller than float32; the
    error is at most half a step, ``(max − min) / 510`` of the item), and returns it as ``dtype``."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    quantize: str | None = None

    @classmethod
    def of(cls, name: str, spec) -> Field:
        if isinstance(spec, Field):
            f = spec
        elif isinstance(spec, (tuple, list)) and len(spec) in (2, 3):
            f = cls(tuple(spec[0]) if not isinstance(spec[0], int) else (spec[0],), spec[1],
                    spec[2] if len(spec) == 3 else None)
        else:
            raise TypeError(f"{_NAME}: fields[{name!r}] must be (shape, dtype), (shape, dtype, 'uint8') or a Field, "
                            f"got {spec!r}")
        if not all(isinstance(d, int) and d >= 0 for d in f.shape):
            raise ValueError(f"{_NAME}: fields[{name!r}] shape must be non-negative ints, got {f.shape}")
        if not isinstance(f.dtype, torch.dtype):
            raise TypeError(f"{_NAME}: fields[{name!r}] dtype must be a torch.dtype, got {f.dtype!r}")
        if f.quantize not in (None, QUANTIZED):
            raise ValueError(f"{_NAME}: fields[{name!r}] quantize must be None or 'uint8', got {f.quantize!r}")
        if f.quantize and not f.dtype.is_floating_point:
            raise TypeError(f"{_NAME}: fields[{name!r}] is quantised, so its dtype must be floating, got "
                            f"{dtype_name(f.dtype)}")
        return f

    def spec(self) -> list:
        return [list(self.shape), dtype_name(self.dtype), self.quantize]


def _dtype(name: str) -> torch.dtype:
    d = getattr(torch, name, None)
    if not isinstance(d, torch.dtype):
        raise ValueError(f"{_NAME}.load_state_dict: unknown dtype {name!r}")
    return d


class ReplayBuffer(FileCheckpoint):
    r"""A replay buffer of ``capacity`` items, each a dict of fields, stored as one tensor per field
    ``[capacity, *shape]`` on ``device`` (or in memory-mapped files under ``storage``).

    Policies (which slot a new item takes; the slot is -1 when it is not kept):

    - ``'reservoir'``: exact reservoir sampling (Algorithm R): after n items each is stored with
      probability ``capacity / n``;
    - ``'ring'``: first in, first out;
    - ``'class_balanced'``: class-balanced reservoir sampling (CBRS) on ``label_field`` with
      ``num_classes`` classes: memory moves to the classes below their share;
    - ``'prioritized'``: ring insertion, sampling with probability ∝ priority (PER): new items at the
      running maximum priority, :meth:`update_priorities` sets ``(|δ| + eps)^alpha``, samples carry
      importance weights ``(P(i) / P_min)^(−beta)`` (the buffer's minimum, as torchrl; or the batch's
      with ``weights='batch'``), stratified sampling by default (``stratified=False``: i.i.d.).

    Slots are chosen natively (:func:`retain.ops.reservoir_slots` and friends) and rows are written
    and read for all fields in one call (:func:`retain.ops.scatter_rows_` / :func:`~retain.ops.gather_rows`).
    Randomness comes from the buffer's own generator (``seed``), saved in checkpoints: a resumed run
    samples exactly what the uninterrupted run would, through any number of save/resume cycles.

    Args:
        capacity: items stored at most (>= 1).
        fields: ``{name: (shape, dtype)}``, ``(shape, dtype, 'uint8')`` for a quantised floating
            field (e.g. SHARP-style activation replay), or a :class:`Field`. DER's logits are a
            plain float field: ``'logits': ((num_classes,), torch.float32)``.
        policy: one of ``'reservoir'``, ``'ring'``, ``'class_balanced'``, ``'prioritized'``.
        device: where the storage lives (CPU or CUDA).
        storage: None (in memory) or a folder: each field is a memory-mapped file there
            (``<name>.bin``), for buffers larger than RAM (CPU only). Existing files of the right size
            are reused as they are, so a buffer can be reopened (its bookkeeping comes from
            :meth:`load`).
        label_field, num_classes: for ``'class_balanced'``: the integer field of class labels.
        alpha, beta, eps, weights, stratified: for ``'prioritized'``.
        seed: seeds the buffer's generator.
        process_group: for ``sample(..., scope='global')`` under ``torch.distributed`` (default:
            the world).

    Examples::

        >>> buf = retain.cl.ReplayBuffer(100, {"x": ((3,), torch.float32), "y": ((), torch.long)}, seed=0)
        >>> slots = buf.add({"x": torch.randn(8, 3), "y": torch.arange(8)})
        >>> len(buf), slots.tolist()
        (8, [0, 1, 2, 3, 4, 5, 6, 7])
        >>> batch = buf.sample(4)
        >>> sorted(batch), batch["x"].shape
        (['index', 'x', 'y'], torch.Size([4, 3]))
        >>> bool((batch["y"] == batch["index"]).all())        # row i holds item i
        True
    """

    def __init__(self, capacity: int, fields: Mapping[str, object], *, policy: str = "reservoir",
                 device: torch.device | str = "cpu", storage: str | os.PathLike | None = None,
                 label_field: str | None = None, num_classes: int | None = None, alpha: float = 0.6,
                 beta: float = 0.4, eps: float = 1e-6, weights: str = "buffer", stratified: bool = True,
                 seed: int = 0, process_group=None):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"{_NAME}: capacity must be an int >= 1, got {capacity!r}")
        if not isinstance(fields, Mapping) or not fields:
            raise TypeError(f"{_NAME}: fields must be a non-empty dict {{name: (shape, dtype)}}, got {fields!r}")
        if policy not in POLICIES:
            raise ValueError(f"{_NAME}: policy must be one of {POLICIES}, got {policy!r}")
        if weights not in ("buffer", "batch"):
            raise ValueError(f"{_NAME}: weights must be 'buffer' or 'batch', got {weights!r}")
        for name, val, lo, hi in (("alpha", alpha, 0, math.inf), ("beta", beta, 0, 1), ("eps", eps, 0, math.inf)):
            if isinstance(val, bool) or not isinstance(val, (int, float)) or not lo <= val <= hi:
                raise ValueError(f"{_NAME}: {name} must be a number in [{lo}, {hi}], got {val!r}")
        self.capacity = capacity
        self.fields = {str(k): Field.of(str(k), v) for k, v in fields.items()}
        self.policy = policy
        self.device = torch.device(device)
        self.alpha, self.beta, self.eps, self.weights, self.stratified = float(alpha), float(beta), float(eps), \
            weights, bool(stratified)
        self.process_group = process_group
        self.label_field = label_field
        if policy == "class_balanced":
            if label_field not in self.fields:
                raise ValueError(f"{_NAME}: policy 'class_balanced' needs label_field, one of {sorted(self.fields)}, "
                                 f"got {label_field!r}")
            lf = self.fields[label_field]
            if lf.shape != () or lf.dtype.is_floating_point or lf.dtype.is_complex or lf.dtype == torch.bool:
                raise ValueError(f"{_NAME}: label_field {label_field!r} must be a scalar integer field, got shape "
                                 f"{lf.shape} and dtype {dtype_name(lf.dtype)}")
            if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
                raise ValueError(f"{_NAME}: policy 'class_balanced' needs num_classes >= 1, got {num_classes!r}")
        self.num_classes = num_classes
        self.storage_path = os.fspath(storage) if storage is not None else None
        if self.storage_path is not None and self.device.type != "cpu":
            raise ValueError(f"{_NAME}: memory-mapped storage lives on the CPU, got device {self.device}")
        self._columns = self._allocate()
        self._gen = torch.Generator().manual_seed(check_int(_NAME, "seed", seed, minimum=-(1 << 63),
                                                            maximum=(1 << 64) - 1))
        self.n_seen = 0
        self._balanced = ClassBalancedState.empty(capacity, num_classes) if policy == "class_balanced" else None
        if policy == "prioritized":
            self._sum = SumTree(capacity, device=self.device)
            self._min = MinTree(capacity, device=self.device)
            self.max_priority = 1.0

    # -- storage ---------------------------------------------------------------------------------
    def _column_specs(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """The storage tensors: one per field, plus scale and offset of a quantised one."""
        out = []
        for name, f in self.fields.items():
            if f.quantize:
                out += [(name, f.shape, torch.uint8), (f"{name}.scale", (), torch.float32),
                        (f"{name}.offset", (), torch.float32)]
            else:
                out.append((name, f.shape, f.dtype))
        return out

    def _allocate(self) -> dict[str, Tensor]:
        cols = {}
        if self.storage_path is not None:
            os.makedirs(self.storage_path, exist_ok=True)
        for name, shape, dtype in self._column_specs():
            full = (self.capacity, *shape)
            if self.storage_path is None:
                cols[name] = torch.zeros(full, dtype=dtype, device=self.device)
                continue
            path = os.path.join(self.storage_path, f"{name}.bin")
            numel = math.prod(full)
            nbytes = numel * torch.empty((), dtype=dtype).element_size()
            if not os.path.exists(path) or os.path.getsize(path) != nbytes:
                with open(path, "wb") as fh:
                    fh.truncate(nbytes)  # sparse: pages appear as rows are written
            cols[name] = torch.from_file(path, shared=True, size=numel, dtype=dtype).view(full)
        return cols

    def __len__(self) -> int:
        if self._balanced is not None:
            return int(self._balanced.size)
        return min(self.n_seen, self.capacity)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}: {tuple(f.shape)} {dtype_name(f.dtype)}{' uint8' if f.quantize else ''}"
                           for k, f in self.fields.items())
        return (f"{_NAME}(capacity={self.capacity}, size={len(self)}, seen={self.n_seen}, policy={self.policy!r}, "
                f"device={self.device}, fields={{{fields}}})")

    @property
    def generator(self) -> torch.Generator:
        """The buffer's generator (slots and samples draw from it)."""
        return self._gen

    # -- writing ---------------------------------------------------------------------------------
    def _check_batch(self, batch) -> int:
        if not isinstance(batch, Mapping):
            raise TypeError(f"{_NAME}.add: batch must be a dict of tensors, got {type(batch).__name__}")
        unknown = sorted(set(batch) - set(self.fields))
        missing = sorted(set(self.fields) - set(batch))
        if unknown:
            raise ValueError(f"{_NAME}.add: batch must hold the buffer's fields {sorted(self.fields)}, got unknown "
                             f"field(s) {unknown}")
        if missing:
            raise ValueError(f"{_NAME}.add: batch must hold every field of the buffer {sorted(self.fields)}, got no "
                             f"{missing}")
        n = None
        for name, f in self.fields.items():
            v = batch[name]
            if not isinstance(v, Tensor):
                raise TypeError(f"{_NAME}.add: batch[{name!r}] must be a tensor, got {type(v).__name__}")
            if v.dim() < 1 or tuple(v.shape[1:]) != f.shape:
                raise ValueError(f"{_NAME}.add: batch[{name!r}] must have shape (batch, *{f.shape}), got "
                                 f"{tuple(v.shape)}")
            if f.quantize and not v.is_floating_point():
                raise TypeError(f"{_NAME}.add: batch[{name!r}] is quantised from a floating tensor, got "
                                f"{dtype_name(v)}")
            if not f.quantize and v.dtype != f.dtype:
                raise TypeError(f"{_NAME}.add: batch[{name!r}] must have dtype {dtype_name(f.dtype)}, got "
                                f"{dtype_name(v)} (cast it with .to({f.dtype}))")
            if n is None:
                n = v.shape[0]
            elif v.shape[0] != n:
                raise ValueError(f"{_NAME}.add: every field must have the same batch size; {name!r} has {v.shape[0]}, "
                                 f"the first field {n}")
        return n

    def _encode(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The storage columns' rows for ``batch`` (quantised fields as codes, scale and offset)."""
        out = {}
        for name, f in self.fields.items():
            v = batch[name].detach().to(self.device)
            if not f.quantize:
                out[name] = v.contiguous()
                continue
            rows = v.reshape(v.shape[0], -1).to(torch.float32)
            if not bool(torch.isfinite(rows).all()):
                raise ValueError(f"{_NAME}.add: batch[{name!r}] is quantised and must be finite, got NaN or inf")
            lo = rows.amin(1) if rows.shape[1] else rows.new_zeros(rows.shape[0])
            hi = rows.amax(1) if rows.shape[1] else rows.new_zeros(rows.shape[0])
            scale = torch.where(hi > lo, (hi - lo) / 255, torch.ones_like(hi))
            codes = ((rows - lo[:, None]) / scale[:, None]).round_().clamp_(0, 255).to(torch.uint8)
            out[name] = codes.reshape(v.shape).contiguous()
            out[f"{name}.scale"], out[f"{name}.offset"] = scale.contiguous(), lo.contiguous()
        return out

    def add(self, batch: Mapping[str, Tensor]) -> Tensor:
        """Insert a batch (``{name: [n, *shape]}``, every field, each of its dtype) by the policy.

        Returns:
            int64 ``[n]`` on the buffer's device: each item's slot, -1 where it was not kept.
        """
        n = self._check_batch(batch)
        if self.policy == "reservoir":
            slots = reservoir_slots(self.n_seen, n, self.capacity, generator=self._gen)
        elif self.policy == "class_balanced":
            labels = batch[self.label_field]
            if n and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
                raise ValueError(f"{_NAME}.add: batch[{self.label_field!r}] must be in [0, {self.num_classes}), got "
                                 f"{int(labels.min()) if int(labels.min()) < 0 else int(labels.max())}")
            slots = class_balanced_slots(labels.reshape(-1), self._balanced, generator=self._gen)
        else:
            slots = ring_slots(self.n_seen, n, self.capacity)
        slots = slots.to(self.device)
        rows = self._encode(batch)
        names = list(self._columns)
        cols, values = [self._columns[c] for c in names], [rows[c] for c in names]
        if _native.has_kernel("rows_copy", self.device.type):  # checked here; slots distinct by construction
            _rows.scatter(cols, slots, values, distinct=True)
        else:
            scatter_rows_(cols, slots, values)
        if self.policy == "prioritized":
            kept = slots[slots >= 0]
            self._sum.update(kept, self.max_priority)
            self._min.update(kept, self.max_priority)
        self.n_seen += n
        return slots

    # -- reading ---------------------------------------------------------------------------------
    def _decode(self, rows: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for name, f in self.fields.items():
            if f.quantize:
                codes = rows[name]
                scale = rows[f"{name}.scale"].reshape(-1, *([1] * len(f.shape)))
                offset = rows[f"{name}.offset"].reshape(-1, *([1] * len(f.shape)))
                out[name] = (codes.to(torch.float32) * scale + offset).to(f.dtype)
            else:
                out[name] = rows[name]
        return out

    def get(self, index: Tensor) -> dict[str, Tensor]:
        """The stored items at ``index`` (int ``[k]``, each in ``[0, len)``) as ``{name: [k, *shape]}``."""
        if not isinstance(index, Tensor) or index.dim() != 1 or index.is_floating_point() or index.dtype == torch.bool:
            raise TypeError(f"{_NAME}.get: index must be a 1-d integer tensor, got {index!r:.80}")
        index = index.to(self.device, torch.int64)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= len(self)):
            raise IndexError(f"{_NAME}.get: index must be in [0, {len(self)}) (the items stored)")
        return self._decode(self._gather(index))

    def _gather(self, index: Tensor) -> dict[str, Tensor]:
        """Every storage column's rows at ``index`` (int64 on the device, in range)."""
        names = list(self._columns)
        cols = [self._columns[c] for c in names]
        if _native.has_kernel("rows_copy", self.device.type):
            return dict(zip(names, _rows.gather(cols, index)))
        return dict(zip(names, gather_rows(cols, index)))

    def sample(self, n: int, *, replace: bool = True, scope: str = "local") -> dict[str, Tensor]:
        """``n`` stored items: uniformly (with replacement, or without: ``replace=False``), or by
        priority for ``'prioritized'``. ``scope='global'`` under ``torch.distributed`` samples
        uniformly over the union of every rank's shard (each rank gets its own ``n``; a collective:
        every rank of the group must call it).

        Returns:
            ``{name: [n, *shape], 'index': int64 [n]}`` (slots; for global samples, the index into
            the union: rank r's slots start after ranks 0..r-1's sizes), and ``'weight'`` float32
            ``[n]`` for ``'prioritized'``.
        """
        where = f"{_NAME}.sample"
        n = check_int(where, "n", n, minimum=0)
        replace = check_bool(where, "replace", replace)
        check_choice(where, "scope", scope, ("local", "global"))
        if scope == "global":
            return self._sample_global(n, replace)
        size = len(self)
        if size == 0 and n:
            raise ValueError(f"{_NAME}.sample: the buffer is empty; add items before sampling")
        if not replace and n > size:
            raise ValueError(f"{where}: n must be at most the {size} items stored when drawing without replacement, "
                             f"got {n}")
        if self.policy == "prioritized":
            if not replace:
                raise ValueError(f"{where}: prioritized sampling draws with replacement: replace must be True, got "
                                 "False")
            idx, prob = self._sum.sample(n, generator=self._gen, stratified=self.stratified)
            min_prob = self._min.root() / self._sum.root() if self.weights == "buffer" else None
            out = self._decode(self._gather(idx))
            out["index"] = idx
            out["weight"] = importance_weights(prob, beta=self.beta, min_prob=min_prob)
            return out
        if replace:
            idx = torch.randint(0, max(size, 1), (n,), generator=self._gen)
        else:
            idx = torch.randperm(size, generator=self._gen)[:n]
        idx = idx.to(self.device)
        out = self._decode(self._gather(idx))
        out["index"] = idx
        return out

    def update_priorities(self, index: Tensor, priority: Tensor) -> None:
        """Set the priorities of stored items (``'prioritized'`` only): ``priority`` ``[k]`` >= 0 (a TD
        error's magnitude, say) becomes ``(priority + eps)^alpha``; the running maximum, given to new
        items, follows."""
        if self.policy != "prioritized":
            raise ValueError(f"{_NAME}.update_priorities: the buffer's policy is {self.policy!r}, not 'prioritized'")
        where = f"{_NAME}.update_priorities"
        check_tensor(where, "index", index, ndim=1, data=True)
        if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
            raise TypeError(f"{where}: index must be an integer tensor, got {dtype_name(index)}")
        check_tensor(where, "priority", priority, ndim=1, data=True)
        if not priority.is_floating_point():
            raise TypeError(f"{where}: priority must be a floating tensor, got {dtype_name(priority)}")
        if priority.numel() != index.numel():
            raise ValueError(f"{where}: priority must hold one value per entry of index ({index.numel()}), got "
                             f"{priority.numel()}")
        p = priority.detach().to(self.device, torch.float64)
        bad = ~(torch.isfinite(p) & (p >= 0))
        if bool(bad.any()):
            raise ValueError(f"{where}: priority must be finite and >= 0, got {float(p[bad][0])}")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= len(self)):
            raise IndexError(f"{where}: index must be in [0, {len(self)}) (the items stored), got values in "
                             f"[{int(index.min())}, {int(index.max())}]")
        p = (p + self.eps).pow(self.alpha)
        self._sum.update(index, p)
        self._min.update(index, p)
        if p.numel():
            self.max_priority = max(self.max_priority, float(p.max()))

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        """Every stored item, in slot order, as a dict of its fields (read in chunks of 1024)."""
        for start in range(0, len(self), 1024):
            rows = self.get(torch.arange(start, min(start + 1024, len(self)), device=self.device))
            for j in range(next(iter(rows.values())).shape[0]):
                yield {k: v[j] for k, v in rows.items()}

    def contents(self) -> dict[str, Tensor]:
        """All stored items at once: ``{name: [len, *shape]}`` (decoded copies)."""
        return self.get(torch.arange(len(self), device=self.device))

    # -- distributed -----------------------------------------------------------------------------
    def _sample_global(self, n: int, replace: bool) -> dict[str, Tensor]:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(f"{_NAME}.sample: scope='global' needs an initialised torch.distributed process group")
        if self.policy == "prioritized":
            raise ValueError(f"{_NAME}.sample: scope='global' samples uniformly; a prioritized buffer samples its "
                             "own shard (scope='local')")
        if not replace:
            raise ValueError(f"{_NAME}.sample: scope='global' draws with replacement (replace=True)")
        group = self.process_group
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        comm = torch.device("cpu") if dist.get_backend(group) == "gloo" else self.device
        sizes = torch.zeros(world, dtype=torch.int64, device=comm)
        sizes[rank] = len(self)
        dist.all_reduce(sizes, group=group)
        total = int(sizes.sum())
        if total == 0 and n:
            raise ValueError(f"{_NAME}.sample: every shard is empty; add items before sampling")
        want = torch.randint(0, max(total, 1), (n,), generator=self._gen).to(comm)
        requests = [torch.empty_like(want) for _ in range(world)]
        dist.all_gather(requests, want, group=group)
        requested = torch.cat(requests)  # [world * n] global indices, rank r's request at [r*n, (r+1)*n)
        starts = torch.cumsum(sizes, 0) - sizes
        owner = torch.searchsorted(torch.cumsum(sizes, 0), requested, right=True)
        mine = torch.nonzero(owner == rank).flatten()
        local = (requested[mine] - starts[rank]).to(self.device)
        names = list(self._columns)
        gathered = self._gather(local)  # once: every column's rows
        rows = [gathered[c] for c in names]
        # every requested row, as bytes, from its owner: zero elsewhere, so a sum is exact
        widths = [(self._columns[c][0].numel() * self._columns[c].element_size()) for c in names]
        packed = torch.zeros(world * n, sum(widths), dtype=torch.uint8, device=comm)
        if mine.numel():
            packed[mine.to(comm)] = torch.cat([r.reshape(r.shape[0], -1).view(torch.uint8).to(comm) if r.numel()
                                               else r.new_zeros(r.shape[0], 0, dtype=torch.uint8).to(comm)
                                               for r in rows], 1)
        dist.all_reduce(packed, group=group)
        own = packed[rank * n:(rank + 1) * n].to(self.device)
        out, at = {}, 0
        for c, w in zip(names, widths):
            col = self._columns[c]
            out[c] = own[:, at:at + w].contiguous().view(col.dtype).reshape(n, *col.shape[1:])
            at += w
        result = self._decode(out)
        result["index"] = want.to(self.device)
        return result

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to resume exactly: the stored rows, the counters, the generator's
        state, the policy's state (CBRS counts, priorities); tensors and plain values only."""
        size = len(self)
        state = {
            "format": FORMAT, "version": FORMAT_VERSION, "capacity": self.capacity, "policy": self.policy,
            "fields": {k: f.spec() for k, f in self.fields.items()}, "n_seen": self.n_seen,
            "generator": self._gen.get_state(),
            "columns": {c: t[:size].detach().cpu() for c, t in self._columns.items()},
        }
        if self._balanced is not None:
            state["class_balanced"] = self._balanced.state_dict()
        if self.policy == "prioritized":
            state["priorities"] = self._sum.state_dict()["priorities"][:size].clone()
            state["max_priority"] = self.max_priority
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output into this buffer (same capacity, policy and fields)."""
        where = f"{_NAME}.load_state_dict"
        check_header(state, where, "a replay-buffer state", FORMAT, FORMAT_VERSION)
        for key, mine in (("capacity", self.capacity), ("policy", self.policy),
                          ("fields", {k: f.spec() for k, f in self.fields.items()})):
            if state.get(key) != mine:
                raise ValueError(f"{where}: the saved buffer's {key} is {state.get(key)!r}, this buffer's {mine!r}")
        n_seen = state.get("n_seen")
        if isinstance(n_seen, bool) or not isinstance(n_seen, int) or n_seen < 0:
            raise ValueError(f"{where}: n_seen must be an int >= 0, got {n_seen!r}")
        size = min(n_seen, self.capacity)
        if self._balanced is not None:
            self._balanced.load_state_dict(state.get("class_balanced"))
            size = int(self._balanced.size)
        columns = state.get("columns")
        if not isinstance(columns, dict) or set(columns) != set(self._columns):
            raise ValueError(f"{where}: columns must be {sorted(self._columns)}, got "
                             f"{sorted(columns) if isinstance(columns, dict) else type(columns).__name__}")
        for c, t in self._columns.items():
            saved = columns[c]
            if not isinstance(saved, Tensor) or saved.dtype != t.dtype or tuple(saved.shape) != (size, *t.shape[1:]):
                raise ValueError(f"{where}: column {c!r} must be {dtype_name(t.dtype)} {(size, *t.shape[1:])}, got "
                                 f"{saved.dtype if isinstance(saved, Tensor) else type(saved).__name__} "
                                 f"{tuple(saved.shape) if isinstance(saved, Tensor) else ''}")
        gen = state.get("generator")
        if not isinstance(gen, Tensor) or gen.dtype != torch.uint8:
            raise ValueError(f"{where}: generator must be a uint8 tensor (Generator.get_state())")
        if self.policy == "prioritized":
            p = state.get("priorities")
            if not isinstance(p, Tensor) or p.dtype != torch.float64 or tuple(p.shape) != (size,):
                raise ValueError(f"{where}: priorities must be float64 ({size},)")
            mp = state.get("max_priority")
            if not isinstance(mp, float) or not math.isfinite(mp) or mp < 0:
                raise ValueError(f"{where}: max_priority must be a finite float >= 0, got {mp!r}")
        for c, t in self._columns.items():
            t[:size].copy_(columns[c])
        self._gen.set_state(gen.clone())
        self.n_seen = n_seen
        if self.policy == "prioritized":
            full = torch.zeros(self.capacity, dtype=torch.float64)
            full[:size] = p
            self._sum.load_state_dict({"capacity": self.capacity, "priorities": full})
            full_min = torch.full((self.capacity,), math.inf, dtype=torch.float64)
            full_min[:size] = p
            self._min.load_state_dict({"capacity": self.capacity, "priorities": full_min})
            self.max_priority = mp
