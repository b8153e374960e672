"""Per-sample gradients of a model's parameters with ``torch.func`` (vmap ∘ grad over a
functional call), in chunks that bound memory, and the sums the consolidation strategies
all-reduce across ranks. Shared by EWC and MAS."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

MAX_CHUNK_BYTES = 256 << 20  # per-sample gradients of one chunk: at most this much memory


def trainable(model: nn.Module) -> tuple[list[str], list[Tensor]]:
    """The names and tensors of the parameters that require grad, in ``named_parameters`` order."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, _ in named], [p for _, p in named]


def chunk_size(params: Sequence[Tensor], requested: int | None, max_bytes: int = MAX_CHUNK_BYTES) -> int:
    """Samples per vmap call: ``requested``, or as many as keep one chunk's per-sample gradients
    within ``max_bytes`` (at least 1)."""
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise ValueError(f"chunk_size must be a positive int, got {requested!r}")
        return requested
    per_sample = sum(p.numel() * p.element_size() for p in params)
    return max(1, max_bytes // max(per_sample, 1))


def as_args(inputs) -> tuple[Tensor, ...]:
    """A batch's inputs as the model's positional arguments (a tensor, or a tuple/list of them)."""
    if isinstance(inputs, Tensor):
        return (inputs,)
    if isinstance(inputs, (tuple, list)) and inputs and all(isinstance(t, Tensor) for t in inputs):
        return tuple(inputs)
    raise TypeError(f"inputs must be a tensor or a tuple of tensors (batch first), got {type(inputs).__name__}")


def batches(op: str, data: Iterable) -> Iterator[tuple[tuple[Tensor, ...], Any]]:
    """``(args, targets)`` of every ``(inputs, targets)`` batch of ``data`` (targets may be None)."""
    for i, item in enumerate(data):
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise TypeError(f"{op}: data must yield (inputs, targets) pairs, got {type(item).__name__} at batch {i}")
        args = as_args(item[0])
        n = args[0].shape[0]
        if any(a.shape[0] != n for a in args) or (isinstance(item[1], Tensor) and item[1].shape[0] != n):
            raise ValueError(f"{op}: batch {i}'s inputs and targets must share their first (batch) dimension")
        yield args, item[1]


def per_sample_grads(model: nn.Module, names: Sequence[str], params: Sequence[Tensor],
                     objective: Callable[..., Tensor], args: tuple[Tensor, ...], targets: Tensor | None,
                     chunk: int) -> Iterator[tuple[list[Tensor], int]]:
    """``(grads, n)`` per chunk of the batch: grads[i] is ``(n, *params[i].shape)``, the gradient of
    ``objective(model(x_s[None]), y_s[None])`` (or ``objective(model(x_s[None]))`` without targets)
    for each of the chunk's n samples, by ``vmap(grad(...))`` over a functional call (buffers as
    they are: run the model in eval mode)."""
    detached = [p.detach() for p in params]
    buffers = dict(model.named_buffers())

    def sample_loss(values, x, y):
        state = {**buffers, **dict(zip(names, values))}
        out = torch.func.functional_call(model, state, tuple(t.unsqueeze(0) for t in x))
        loss = objective(out) if y is None else objective(out, y.unsqueeze(0))
        if loss.dim() != 0:
            raise ValueError(f"the loss must be a scalar per sample, got shape {tuple(loss.shape)}")
        return loss

    with_y = isinstance(targets, Tensor)
    grad_fn = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0, 0 if with_y else None))
    n = args[0].shape[0]
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        x = tuple(a[s:e] for a in args)
        y = targets[s:e] if with_y else None
        yield list(grad_fn(detached, x, y)), e - s


def linear_moments(model: nn.Module, names: Sequence[str], params: Sequence[Tensor],
                   objective: Callable[..., Tensor], args: tuple[Tensor, ...], targets: Tensor | None,
                   power: int) -> tuple[list[Tensor], list[Tensor]] | None:
    """(Σ_s g_s, Σ_s φ(g_s)) per parameter, φ = g² (power 2) or |g| (power 1), without forming a
    per-sample gradient, when every parameter belongs to an ``nn.Linear`` called once on ``[B, in]``
    inputs (MLPs): a sample's weight gradient is the outer product d_s a_sᵀ of the gradient d_s at
    the layer's output and its input a_s, so Σ_s (d_s a_sᵀ)² = (d²)ᵀ(a²), Σ_s |d_s a_sᵀ| =
    |d|ᵀ|a| and Σ_s d_s a_sᵀ = dᵀa: two matmuls per layer from one batched forward and backward.
    None when the model is not of that form (the caller uses :func:`per_sample_grads`)."""
    owners = {}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            for kind in ("weight", "bias"):
                owners[f"{mod_name}.{kind}" if mod_name else kind] = (mod, kind)
    if any(n not in owners for n in names):
        return None
    layers = list(dict.fromkeys(owners[n][0] for n in names))
    seen: dict[nn.Module, list] = {m: [] for m in layers}

    def hook(mod, inputs, output):
        seen[mod].append((inputs[0], output))

    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        with torch.enable_grad():
            out = model(*args)
            per_sample = torch.func.vmap(
                (lambda o, y: objective(o.unsqueeze(0), y.unsqueeze(0))) if isinstance(targets, Tensor)
                else (lambda o, y: objective(o.unsqueeze(0))), in_dims=(0, 0 if isinstance(targets, Tensor) else None)
            )(out, targets)
            if any(len(v) != 1 or v[0][0].dim() != 2 or not v[0][1].requires_grad for v in seen.values()):
                return None  # a layer called twice, on [B, T, in] inputs, or outside the graph
            outputs = [seen[m][0][1] for m in layers]
            grads = torch.autograd.grad(per_sample.sum(), outputs)
    finally:
        for h in handles:
            h.remove()
    d_of = {m: g.detach() for m, g in zip(layers, grads)}
    first, second = [], []
    phi = (lambda t: t.square()) if power == 2 else (lambda t: t.abs())
    for n in names:
        mod, kind = owners[n]
        d, a = d_of[mod], seen[mod][0][0].detach()
        if kind == "weight":
            first.append(d.T @ a)
            second.append(phi(d).T @ phi(a))
        else:
            first.append(d.sum(0))
            second.append(phi(d).sum(0))
    return first, second


def per_sample_directional(model: nn.Module, names: Sequence[str], params: Sequence[Tensor],
                           objective: Callable[..., Tensor], args: tuple[Tensor, ...], targets: Tensor | None,
                           tangent: Sequence[Tensor], chunk: int) -> Tensor:
    """float64 ``[n]``: the directional derivative of each sample's loss along ``tangent``,
    d/dε ℓ_s(θ + ε·v) = vᵀg_s, by forward mode (``vmap`` of ``torch.func.jvp``): no per-sample
    gradient is formed, the cost is about two forward passes (computed in the parameters' dtype)."""
    detached = tuple(p.detach() for p in params)
    tangents = tuple(t.to(p.dtype) for t, p in zip(tangent, params))
    buffers = dict(model.named_buffers())

    def sample_loss(x, y, *values):
        state = {**buffers, **dict(zip(names, values))}
        out = torch.func.functional_call(model, state, tuple(t.unsqueeze(0) for t in x))
        return objective(out) if y is None else objective(out, y.unsqueeze(0))

    def directional(x, y):
        return torch.func.jvp(lambda *v: sample_loss(x, y, *v), detached, tangents)[1]

    with_y = isinstance(targets, Tensor)
    fn = torch.func.vmap(directional, in_dims=(0, 0 if with_y else None))
    n = args[0].shape[0]
    out = [fn(tuple(a[s:s + chunk] for a in args), targets[s:s + chunk] if with_y else None).to(torch.float64)
           for s in range(0, n, chunk)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def distributed_group(op: str, distributed: bool | None, process_group) -> tuple[bool, Any]:
    """Whether to all-reduce (default: torch.distributed initialised with more than one rank)."""
    import torch.distributed as dist

    on = dist.is_available() and dist.is_initialized()
    if distributed is None:
        distributed = on and dist.get_world_size(process_group) > 1
    if distributed and not on:
        raise RuntimeError(f"{op}: distributed=True needs torch.distributed initialised")
    return bool(distributed), process_group


def all_reduce_(tensors: Sequence[Tensor], process_group=None) -> None:
    """Sum ``tensors`` over the ranks in place: one all-reduce of their concatenation per dtype."""
    import torch.distributed as dist

    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for ts in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in ts])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=process_group)
        offset = 0
        for t in ts:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
