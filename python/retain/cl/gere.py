"""GeRe (general samples replay): keep a model's activations on a small fixed set of general texts
inside the activation state the base model had, with a threshold-based margin (TM) loss.

The anchor (per-dimension statistics, thresholds, 2-bit labels of every replay token) is built
once from the base model and stored packed: 16× smaller than the float32 hidden states GeRe's
reference code saves and reloads every step.
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from retain.cl._files import check_header, is_tensor_file, load_tensor_file, load_torch_file, save_tensor_file
from retain.ops._checks import check_floating, check_mask, check_number, check_tensor
from retain.ops.margin import ActivationStats, activation_stats, pack_tm_labels, tm_loss, tm_thresholds

__all__ = ["GeRe", "forward_with_hidden", "gere_total_loss"]

FORMAT = "retain.cl.GeRe"
FORMAT_VERSION = 1
_NAME = "retain.cl.GeRe"


def _accepts(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _call_model(model: nn.Module, x: Tensor, mask: Tensor | None, want_hidden_states: bool) -> Any:
    """model(x, attention_mask=mask, output_hidden_states=True), passing the keywords its forward takes."""
    kwargs = {}
    if mask is not None and _accepts(model.forward, "attention_mask"):
        kwargs["attention_mask"] = mask
    if want_hidden_states:
        if not _accepts(model.forward, "output_hidden_states"):
            raise ValueError(f"{_NAME}: {type(model).__name__}.forward takes no output_hidden_states: name the module "
                             "whose output is the hidden state with layer='...' (a forward hook reads it)")
        kwargs["output_hidden_states"] = True
    return model(x, **kwargs)


def forward_with_hidden(model: nn.Module, x: Tensor, mask: Tensor | None = None, *, layer: str | None = None,
                        call: Callable[[nn.Module, Tensor, Tensor | None], Any] | None = None) -> tuple[Any, Tensor]:
    """Run ``model`` on ``x`` and return ``(outputs, hidden)``, hidden ``[B, L, D]``.

    ``layer`` names a submodule (``dict(model.named_modules())``); a forward hook takes its output
    (the first element when it returns a tuple; the last call when it runs more than once).
    ``layer=None`` asks the model for ``output_hidden_states=True`` and takes the last entry of
    ``outputs.hidden_states`` (Hugging Face models). ``call(model, x, mask)`` replaces the default
    ``model(x, attention_mask=mask)`` (keywords passed only when ``forward`` accepts them).
    """
    if layer is None:
        out = call(model, x, mask) if call is not None else _call_model(model, x, mask, True)
        hs = out.get("hidden_states") if isinstance(out, dict) else getattr(out, "hidden_states", None)
        if hs is None:
            raise ValueError(f"{_NAME}: the model's output has no hidden_states; name the module whose output is "
                             "the hidden state with layer='...'")
        return out, hs[-1]
    modules = dict(model.named_modules())
    if layer not in modules:
        near = [n for n in modules if n and (layer in n or n in layer)][:5]
        raise ValueError(f"{_NAME}: layer {layer!r} is not a submodule of {type(model).__name__}"
                         + (f" (similar: {near})" if near else ""))
    captured: list[Tensor] = []

    def hook(_module, _inputs, output):
        captured.append(output[0] if isinstance(output, (tuple, list)) else output)

    handle = modules[layer].register_forward_hook(hook)
    try:
        out = call(model, x, mask) if call is not None else _call_model(model, x, mask, False)
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"{_NAME}: layer {layer!r} did not run in the model's forward")
    return out, captured[-1]


def gere_total_loss(task_ce: Tensor | None, replay_ce: Tensor | None = None, tm: Tensor | None = None, *,
                    w: float | str = "dy", max_w: float | None = None) -> Tensor:
    """GeRe's objective ``(CE_task + CE_replay) / 2 + w · TM``.

    Either cross-entropy may be ``None`` (a micro-batch without task or without replay samples):
    the other is used alone, as in GeRe. ``w='dy'`` is GeRe's dynamic weight ``w = CE / (TM +
    1e-8)`` computed on detached values, so ``w · TM`` has the size of the CE term; a number is a
    constant weight (GeRe's default is 100). ``max_w`` caps the dynamic weight: as TM → 0 (a
    handful of tiny violations) ``w`` grows without bound and scales the TM gradient with it.
    """
    parts = [t for t in (task_ce, replay_ce) if t is not None]
    if not parts:
        raise ValueError("retain.cl.gere_total_loss: needs task_ce or replay_ce, got neither")
    ce = parts[0] if len(parts) == 1 else (parts[0] + parts[1]) / 2
    if tm is None:
        return ce
    if w == "dy":
        weight = ce.detach() / (tm.detach() + 1e-8)
        if max_w is not None:
            weight = weight.clamp_max(max_w)
    elif isinstance(w, (int, float)) and not isinstance(w, bool):
        weight = float(w)
    else:
        raise ValueError(f"retain.cl.gere_total_loss: w must be 'dy' or a number, got {w!r}")
    return ce + weight * tm


def _check_finite(where: str, stats: Sequence[ActivationStats]) -> None:
    """Thresholds from NaN or infinite statistics would make every later loss meaningless."""
    for g, s in enumerate(stats):
        for name in ("count", "mean", "m2"):
            t = getattr(s, name)
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{where}: the activation statistics of group {g} must be finite, got a non-finite "
                                 f"{name} (did the model emit NaN or inf hidden states?)")


def _sample_ids(where: str, sample_ids) -> Tensor:
    """Sample ids as int64 [B]: integers only (a float id 2.7 is refused, not truncated to 2)."""
    if isinstance(sample_ids, Tensor):
        ids = sample_ids
    else:
        try:
            ids = torch.as_tensor(sample_ids)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{where}: sample_ids must be integers (a tensor or a sequence of ints), got "
                            f"{type(sample_ids).__name__}") from None
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"{where}: sample_ids must be integers, got {str(ids.dtype).replace('torch.', '')} values")
    return ids.to(torch.int64).reshape(-1)


def _pad_right(items: Sequence[Tensor], pad_value: float) -> tuple[Tensor, Tensor]:
    """[B, L, ...] padded on the right and the [B, L] bool mask of real positions."""
    L = max(t.shape[0] for t in items)
    x = items[0].new_full((len(items), L, *items[0].shape[1:]), pad_value)
    mask = torch.zeros(len(items), L, dtype=torch.bool, device=items[0].device)
    for i, t in enumerate(items):
        x[i, :t.shape[0]] = t
        mask[i, :t.shape[0]] = True
    return x, mask


class GeRe:
    """GeRe's replay anchor and loss.

    Holds, for ``S`` replay samples of lengths ``Lᵢ`` and hidden size ``D``: per-group activation
    statistics and thresholds ``τ± = mean ± k·std`` ``[G, D]`` (``G`` source datasets, usually 1),
    and the packed 2-bit labels of every replay token, uint8 ``[Σ Lᵢ, ceil(D/4)]`` (``Lᵢ·ceil(D/4)``
    bytes per sample: 576,512 B for a 563-token sample of a 4096-wide model, against 9.2 MB of
    float32 hidden states).

    Build it once from the base model (:meth:`build`), :meth:`save` it, :meth:`load` it in the
    fine-tuning job, and add :meth:`loss` of each replay batch to the training objective
    (:func:`gere_total_loss`); :meth:`sampler` puts ``k`` replay samples in every global batch.

    Examples::

        >>> model = TinyLM()                                        # any nn.Module
        >>> replay = [torch.randint(0, 100, (n,)) for n in (12, 9, 15)]
        >>> gere = GeRe.build(model, replay, layer="norm")           # hidden states of model.norm
        >>> x, mask = gere.batch([0, 2], replay)                     # right-padded replay batch
        >>> out, h = gere.forward(model, x, mask)
        >>> gere.loss(h, torch.tensor([0, 2]), mask)                 # 0 at the base model
        tensor(0.)
    """

    def __init__(self, *, stats: Sequence[ActivationStats], labels: Tensor, offsets: Tensor, groups: Tensor,
                 k: float = 1.0, layer: str | None = None):
        if not stats:
            raise ValueError(f"{_NAME}: needs the statistics of at least one group")
        D = stats[0].mean.shape[-1]
        if labels.dtype != torch.uint8 or labels.dim() != 2 or labels.shape[1] != (D + 3) // 4:
            raise ValueError(f"{_NAME}: labels must be packed uint8 [tokens, ceil(D/4) = {(D + 3) // 4}], got "
                             f"{str(labels.dtype).replace('torch.', '')} {tuple(labels.shape)}")
        if offsets.dim() != 1 or offsets.numel() < 1 or int(offsets[0]) != 0 or int(offsets[-1]) != labels.shape[0] \
                or bool((offsets[1:] < offsets[:-1]).any()):
            raise ValueError(f"{_NAME}: offsets must rise from 0 to the number of label rows {labels.shape[0]}")
        if groups.shape != (offsets.numel() - 1,) or (groups.numel() and not 0 <= int(groups.min()) <= int(groups.max())
                                                      < len(stats)):
            raise ValueError(f"{_NAME}: groups must be [num_samples] ints in [0, {len(stats)}), got "
                             f"{tuple(groups.shape)}")
        _check_finite(_NAME, stats)
        self.stats = list(stats)
        self.k = check_number(_NAME, "k", k, minimum=0.0)
        self.layer = layer
        self.labels, self.offsets, self.groups = labels, offsets.to(torch.int64), groups.to(torch.int64)
        thr = [tm_thresholds(s, self.k) for s in self.stats]
        self.pos_thr = torch.stack([p for p, _ in thr]).to(labels.device)  # [G, D] float32
        self.neg_thr = torch.stack([n for _, n in thr]).to(labels.device)

    # -- sizes -------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.pos_thr.shape[-1]

    @property
    def num_samples(self) -> int:
        return self.offsets.numel() - 1

    @property
    def lengths(self) -> Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    @property
    def nbytes(self) -> int:
        """Bytes of label storage (the per-token part of the anchor)."""
        return self.labels.numel()

    # -- building ----------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def build(cls, model: nn.Module, samples: Sequence[Tensor], *, layer: str | None = None,
              call: Callable[[nn.Module, Tensor, Tensor | None], Any] | None = None, k: float = 1.0,
              groups: Sequence[int] | None = None, batch_size: int = 8, pad_value: float = 0,
              distributed: bool | None = None, process_group=None) -> "GeRe":
        """The anchor of ``model`` (the base model) on the replay ``samples``.

        Args:
            model: any ``nn.Module``; run in eval mode under ``no_grad`` (its mode is restored).
            samples: the replay set, a sequence of tensors ``[Lᵢ, ...]`` (token ids ``[Lᵢ]``, or
                features ``[Lᵢ, F]``) on the model's device; batched ``batch_size`` at a time,
                right-padded with ``pad_value``, with a ``[B, L]`` attention mask.
            layer, call: where the hidden states come from (:func:`forward_with_hidden`).
            k: thresholds ``mean ± k·std`` per dimension (unbiased std).
            groups: source dataset of each sample (ints from 0), for per-dataset thresholds.
            distributed: shard the samples over the ranks of ``process_group`` and all-reduce the
                statistics and labels (every rank must call ``build``); default: when
                ``torch.distributed`` is initialised with more than one rank.

        Two passes over the replay set: statistics first, then labels against the thresholds,
        so no float hidden state is kept (memory: one batch of hidden states).
        """
        n = len(samples)
        if n == 0:
            raise ValueError(f"{_NAME}.build: samples is empty")
        if batch_size < 1:
            raise ValueError(f"{_NAME}.build: batch_size must be >= 1, got {batch_size}")
        for i, s in enumerate(samples):
            if not isinstance(s, Tensor) or s.dim() < 1 or s.shape[0] == 0:
                raise ValueError(f"{_NAME}.build: samples[{i}] must be a non-empty tensor [L, ...], got "
                                 f"{type(s).__name__} {tuple(s.shape) if isinstance(s, Tensor) else ''}")
        group_ids = torch.zeros(n, dtype=torch.int64) if groups is None else torch.as_tensor(groups, dtype=torch.int64)
        if group_ids.shape != (n,) or (n and int(group_ids.min()) < 0):
            raise ValueError(f"{_NAME}.build: groups must be {n} non-negative ints, got {tuple(group_ids.shape)}")
        G = int(group_ids.max()) + 1
        import torch.distributed as dist
        on = dist.is_available() and dist.is_initialized()
        if distributed is None:
            distributed = on and dist.get_world_size(process_group) > 1
        if distributed and not on:
            raise RuntimeError(f"{_NAME}.build: distributed=True needs torch.distributed initialised")
        world = dist.get_world_size(process_group) if distributed else 1
        rank = dist.get_rank(process_group) if distributed else 0
        mine = list(range(rank, n, world))
        batches = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]

        was_training = model.training
        model.eval()
        try:
            stats: list[ActivationStats | None] = [None] * G
            D = None
            for idx in batches:
                x, mask = _pad_right([samples[i] for i in idx], pad_value)
                _, h = forward_with_hidden(model, x, mask, layer=layer, call=call)
                D = cls._check_hidden(h, x.shape[:2], D)
                for g in group_ids[idx].unique().tolist():
                    rows = (group_ids[idx] == g).to(mask.device)
                    part = activation_stats(h, mask & rows[:, None])
                    stats[g] = part if stats[g] is None else stats[g].merge(part)
            if distributed:
                D = cls._agree_dim(D, process_group)
            if D is None:
                raise RuntimeError(f"{_NAME}.build: no sample produced hidden states")
            device = samples[0].device
            empty = ActivationStats(torch.zeros((), dtype=torch.float64, device=device),
                                    torch.zeros(D, dtype=torch.float64, device=device),
                                    torch.zeros(D, dtype=torch.float64, device=device))
            stats = [s.to(device) if s is not None else empty for s in stats]
            if distributed:
                stats = [s.all_reduce(process_group) for s in stats]
            for g, s in enumerate(stats):
                if float(s.count) < 2:
                    raise ValueError(f"{_NAME}.build: group {g} has {int(s.count)} token(s); thresholds need >= 2")
            _check_finite(f"{_NAME}.build", stats)
            thr = [tm_thresholds(s, k) for s in stats]
            pos = torch.stack([p for p, _ in thr])
            neg = torch.stack([q for _, q in thr])

            lengths = torch.tensor([s.shape[0] for s in samples], dtype=torch.int64)
            offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
            labels = torch.zeros(int(offsets[-1]), (D + 3) // 4, dtype=torch.uint8, device=device)
            for idx in batches:
                x, mask = _pad_right([samples[i] for i in idx], pad_value)
                _, h = forward_with_hidden(model, x, mask, layer=layer, call=call)
                gi = group_ids[idx].to(pos.device)
                packed = pack_tm_labels(h.to(torch.float32), pos[gi][:, None, :].to(h.device),
                                        neg[gi][:, None, :].to(h.device))
                for j, i in enumerate(idx):
                    labels[offsets[i]:offsets[i + 1]] = packed[j, :lengths[i]].to(device)
            if distributed:
                dist.all_reduce(labels, op=dist.ReduceOp.SUM, group=process_group)  # each row written by one rank
        finally:
            model.train(was_training)
        return cls(stats=stats, labels=labels, offsets=offsets.to(device), groups=group_ids.to(device), k=k,
                   layer=layer)

    @staticmethod
    def _check_hidden(h: Tensor, lead: tuple, D: int | None) -> int:
        if not isinstance(h, Tensor) or h.dim() != 3 or tuple(h.shape[:2]) != tuple(lead) or not h.is_floating_point():
            raise ValueError(f"{_NAME}: hidden states must be a floating tensor [B, L, D] with the batch's B, L = "
                             f"{tuple(lead)}, got {type(h).__name__} {tuple(getattr(h, 'shape', ()))}")
        if D is not None and h.shape[-1] != D:
            raise ValueError(f"{_NAME}: hidden size changed between batches: {D} then {h.shape[-1]}")
        return h.shape[-1]

    @staticmethod
    def _agree_dim(D: int | None, group) -> int | None:
        import torch.distributed as dist
        t = torch.tensor([D if D is not None else -1], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        return int(t) if int(t) >= 0 else None

    # -- training ----------------------------------------------------------------------------
    def batch(self, sample_ids: Sequence[int] | Tensor, samples: Sequence[Tensor], pad_value: float = 0
              ) -> tuple[Tensor, Tensor]:
        """The replay samples ``sample_ids`` right-padded into ``(x [B, L, ...], mask [B, L])``,
        as :meth:`build` batched them."""
        ids = self._ids(f"{_NAME}.batch", sample_ids).tolist()
        return _pad_right([samples[i] for i in ids], pad_value)

    def forward(self, model: nn.Module, x: Tensor, mask: Tensor | None = None, *,
                call: Callable[[nn.Module, Tensor, Tensor | None], Any] | None = None) -> tuple[Any, Tensor]:
        """``(outputs, hidden)`` of ``model`` on a replay batch, hidden states taken where
        :meth:`build` took them (``layer``)."""
        return forward_with_hidden(model, x, mask, layer=self.layer, call=call)

    def _ids(self, where: str, sample_ids) -> Tensor:
        """``sample_ids`` as int64 [B] on the anchor's device, each in [0, num_samples)."""
        ids = _sample_ids(where, sample_ids).to(self.offsets.device)
        if ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < self.num_samples):
            raise ValueError(f"{where}: sample_ids must be in [0, {self.num_samples}), got values in "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        return ids

    def loss(self, hidden: Tensor, sample_ids: Tensor | Sequence[int], mask: Tensor | None = None, *,
             reduction: str = "violations") -> Tensor:
        """TM loss of the current hidden states of a replay batch against the anchor.

        Args:
            hidden: ``[B, L, D]`` hidden states of replay samples ``sample_ids`` ``[B]``, position
                ``l`` of row ``b`` being token ``l`` of that sample (right padding); positions at
                or beyond a sample's stored length do not count.
            mask: ``[B, L]`` bool, positions that count (the attention mask).
            reduction: as :func:`retain.ops.tm_loss` (GeRe: ``'violations'``).

        Returns:
            0-dim float32 loss with gradient to ``hidden`` (±1/#violations per violating element).
        """
        where = f"{_NAME}.loss"
        check_tensor(where, "hidden", hidden, ndim=3)
        check_floating(where, "hidden", hidden)
        B, L, D = hidden.shape
        if D != self.dim:
            raise ValueError(f"{where}: hidden size D must be the anchor's {self.dim}, got {D}")
        ids = self._ids(where, sample_ids)
        if ids.numel() != B:
            raise ValueError(f"{where}: sample_ids must hold one id per row of hidden ({B}), got {ids.numel()}")
        mask = check_mask(where, mask, (B, L), "[B, L], the positions that count", "hidden", hidden)
        pos = torch.arange(L, device=ids.device)
        valid = pos[None, :] < self.lengths[ids][:, None]                       # [B, L]
        rows = torch.where(valid, self.offsets[ids][:, None] + pos[None, :], 0)
        labels = self.labels[rows]                                               # [B, L, ceil(D/4)]
        if mask is not None:
            valid = valid & mask.to(device=valid.device, dtype=torch.bool)
        g = self.groups[ids]
        pos_thr, neg_thr = (self.pos_thr[0], self.neg_thr[0]) if self.pos_thr.shape[0] == 1 else \
            (self.pos_thr[g], self.neg_thr[g])
        dev = hidden.device
        return tm_loss(hidden, labels.to(dev), pos_thr.to(dev), neg_thr.to(dev), mask=valid.to(dev),
                       reduction=reduction)

    total_loss = staticmethod(gere_total_loss)

    def sampler(self, num_task: int, *, micro_batch_size: int, replay_per_batch: int, grad_accum: int = 1,
                world_size: int | None = None, rank: int | None = None, seed: int = 0):
        """:class:`retain.cl.ReplayMixSampler` over ``ConcatDataset([replay, task])`` with this
        anchor's replay set first (indices below :attr:`num_samples` are replay sample ids)."""
        from retain.cl.sampler import ReplayMixSampler
        return ReplayMixSampler(num_task, self.num_samples, micro_batch_size=micro_batch_size,
                                replay_per_batch=replay_per_batch, grad_accum=grad_accum, world_size=world_size,
                                rank=rank, seed=seed)

    def to(self, device) -> "GeRe":
        """A copy with every tensor on ``device``."""
        return GeRe.from_state_dict(self.state_dict(), map_location=device)

    # -- persistence -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "format": FORMAT, "version": FORMAT_VERSION, "dim": self.dim, "k": self.k, "layer": self.layer,
            "count": torch.stack([s.count for s in self.stats]).cpu(),
            "mean": torch.stack([s.mean for s in self.stats]).cpu(),
            "m2": torch.stack([s.m2 for s in self.stats]).cpu(),
            "labels": self.labels.cpu(), "offsets": self.offsets.cpu(), "groups": self.groups.cpu(),
        }

    @classmethod
    def from_state_dict(cls, state: dict, *, map_location=None, dim: int | None = None) -> "GeRe":
        check_header(state, f"{_NAME}.load", "a GeRe anchor", FORMAT, FORMAT_VERSION, "; rebuild it with GeRe.build")
        missing = sorted({"dim", "k", "layer", "count", "mean", "m2", "labels", "offsets", "groups"} - set(state))
        if missing:
            raise ValueError(f"{_NAME}.load: the anchor lacks {missing} (truncated or not written by GeRe.save)")
        D = int(state["dim"])
        if dim is not None and D != dim:
            raise ValueError(f"{_NAME}.load: the anchor's hidden size is {D}, the model's {dim}")
        G = state["mean"].shape[0]
        for key, shape in (("count", (G,)), ("mean", (G, D)), ("m2", (G, D))):
            if tuple(state[key].shape) != shape:
                raise ValueError(f"{_NAME}.load: {key} must have shape {shape}, got {tuple(state[key].shape)} "
                                 "(corrupt file?)")
        mv = (lambda t: t.to(map_location)) if map_location is not None else (lambda t: t)
        stats = [ActivationStats(mv(state["count"][g]), mv(state["mean"][g]), mv(state["m2"][g])) for g in range(G)]
        _check_finite(f"{_NAME}.load", stats)
        return cls(stats=stats, labels=mv(state["labels"]), offsets=mv(state["offsets"]), groups=mv(state["groups"]),
                   k=float(state["k"]), layer=state["layer"])

    def save(self, path: str | os.PathLike) -> None:
        """Write the anchor to ``path`` atomically (a temporary file in the same folder, fsync,
        rename: a crash never leaves a half-written anchor behind) as a retain tensor file, with a
        checksum of the whole payload that :meth:`load` verifies."""
        save_tensor_file(self.state_dict(), path)

    @classmethod
    def load(cls, path: str | os.PathLike, *, map_location=None, dim: int | None = None) -> "GeRe":
        """Read an anchor written by :meth:`save`: its checksum verified, nothing unpickled (anchors of
        earlier versions, torch.save zips, load weights-only and carry no checksum). Checks the
        format, its version, the keys and the shapes; ``dim`` checks the hidden size against the
        model's. A truncated, empty, modified or foreign file raises a ValueError saying so."""
        where = f"{_NAME}.load"
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{where}: no file at {path!r}")
        if os.path.getsize(path) == 0:
            raise ValueError(f"{where}: {path!r} is empty (an interrupted copy?)")
        state = load_tensor_file(path, where) if is_tensor_file(path) else load_torch_file(path, where)
        return cls.from_state_dict(state, map_location=map_location, dim=dim)

    def __repr__(self) -> str:
        return (f"GeRe(samples={self.num_samples}, tokens={self.labels.shape[0]}, dim={self.dim}, "
                f"groups={len(self.stats)}, k={self.k}, layer={self.layer!r}, label_bytes={self.nbytes})")
