"""Per-sample gradients of a model's parameters with ``torch.func`` (vmap ∘ grad over a
functional call), in chunks that bound memory, and the sums the consolidation strategies
all-reduce across ranks. Shared by EWC and MAS."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retain.cl._files import check_header

MAX_CHUNK_BYTES = 256 << 20  # per-sample gradients of one chunk: at most this much memory


def check_state_dict(op: str, state, fmt: str, names: Sequence[str], keys: Iterable[str]) -> None:
    """``state`` is a version-1 state dict of ``fmt`` holding ``keys``, saved for the parameters ``names``."""
    check_header(state, op, f"a {fmt} state dict", fmt, 1)
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(f"{op}: the state dict lacks {missing} (an incomplete or foreign state dict)")
    if list(state["names"]) != list(names):
        raise ValueError(f"{op}: the state was saved for parameters {list(state['names'])[:3]}..., this model has "
                         f"{list(names)[:3]}...")


def check_like_params(op: str, what: str, tensors, params: Sequence[Tensor], optional: bool = False) -> None:
    """``tensors`` (a saved list; None only when ``optional``) holds one tensor of each parameter's shape."""
    if tensors is None and optional:
        return
    if not isinstance(tensors, (list, tuple)) or len(tensors) != len(params):
        got = f"{len(tensors)} entries" if isinstance(tensors, (list, tuple)) else type(tensors).__name__
        raise ValueError(f"{op}: {what} must hold one tensor per parameter ({len(params)}), got {got}")
    for t, p in zip(tensors, params):
        if not isinstance(t, Tensor) or t.shape != p.shape:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{op}: {what} has shape {got} where the parameter has {tuple(p.shape)}")


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


def functorch_unsupported(err: BaseException) -> bool:
    """Whether ``err`` is torch.func refusing an operation inside the model (an autograd.Function
    without functorch support: custom ops, retain's among them on torch 2.13)."""
    return isinstance(err, RuntimeError) and "functorch transforms" in str(err)


def _loop_sample_grads(model, params, objective, args, targets, s, e) -> list[Tensor]:
    """Per-sample gradients of samples [s, e) by one autograd pass each (the 'loop' method)."""
    rows = []
    for i in range(s, e):
        out = model(*(a[i:i + 1] for a in args))
        loss = objective(out) if targets is None else objective(out, targets[i:i + 1])
        if loss.dim() != 0:
            raise ValueError(f"the loss must be a scalar per sample, got shape {tuple(loss.shape)}")
        rows.append(torch.autograd.grad(loss, params, allow_unused=True))
    return [torch.stack([r[j] if r[j] is not None else torch.zeros_like(p) for r in rows])
            for j, p in enumerate(params)]


class PerSample:
    """How a strategy forms per-sample gradients: ``'vmap'`` (``vmap ∘ grad`` over a functional
    call), ``'loop'`` (one autograd pass per sample: any model, slower) or ``'auto'`` (vmap, moving to
    the loop for good the first time torch.func cannot pass through the model)."""

    METHODS = ("auto", "vmap", "loop")

    def __init__(self, op: str, method: str):
        if method not in self.METHODS:
            raise ValueError(f"{op}: per_sample must be one of {self.METHODS}, got {method!r}")
        self.method, self.loop = method, method == "loop"

    def _fall_back(self, err: BaseException) -> bool:
        if self.method == "auto" and not self.loop and functorch_unsupported(err):
            self.loop = True
            return True
        return False

    def grads(self, model, names, params, objective, args, targets, chunk) -> Iterator[tuple[list[Tensor], int]]:
        """As :func:`per_sample_grads`, by this method; a fallback resumes where vmap stopped."""
        n, done = args[0].shape[0], 0
        if not self.loop:
            try:
                for grads, m in per_sample_grads(model, names, params, objective, args, targets, chunk):
                    done += m
                    yield grads, m
                return
            except RuntimeError as e:
                if not self._fall_back(e):
                    raise
        with_y = isinstance(targets, Tensor)
        for s in range(done, n, chunk):
            e = min(n, s + chunk)
            yield _loop_sample_grads(model, params, objective, args, targets if with_y else None, s, e), e - s

    def directional(self, model, names, params, objective, args, targets, tangent, chunk) -> Tensor:
        """As :func:`per_sample_directional`; the loop forms each gradient and its dot with ``tangent``."""
        if not self.loop:
            try:
                return per_sample_directional(model, names, params, objective, args, targets, tangent, chunk)
            except RuntimeError as e:
                if not self._fall_back(e):
                    raise
        dots = []
        for grads, _ in self.grads(model, names, params, objective, args, targets, chunk):
            d = sum((g.to(torch.float64) * t.to(torch.float64)).flatten(1).sum(1) for g, t in zip(grads, tangent))
            dots.append(d)
        return torch.cat(dots) if dots else torch.zeros(0, dtype=torch.float64)


def _conv_ok(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Conv2d) and mod.groups == 1 and mod.padding_mode == "zeros" \
        and not isinstance(mod.padding, str)


def layer_moments(model: nn.Module, names: Sequence[str], params: Sequence[Tensor],
                  objective: Callable[..., Tensor], args: tuple[Tensor, ...], targets: Tensor | None,
                  power: int, max_bytes: int = MAX_CHUNK_BYTES) -> tuple[list[Tensor], list[Tensor]] | None:
    """(Σ_s g_s, Σ_s φ(g_s)) per parameter, φ = g² (power 2) or |g| (power 1), from one batched
    forward and backward, when every parameter belongs to an ``nn.Linear`` or an ``nn.Conv2d``
    (groups 1, zero padding) called once: a sample's weight gradient is Σ_t d_{s,t} a_{s,t}ᵀ over
    its positions t, with d the gradient of its loss at the layer's output and a the layer's input
    (unfolded patches for a convolution). With one position per sample (``[B, in]`` inputs) the
    sums need no per-sample gradient: Σ_s (d_s a_sᵀ)² = (d²)ᵀ(a²), Σ_s |d_s a_sᵀ| = |d|ᵀ|a|,
    Σ_s d_s a_sᵀ = dᵀa; otherwise each sample's gradient is one batched matmul over positions (in
    chunks of at most ``max_bytes``). None when the model is not of that form: the caller uses
    :func:`per_sample_grads`."""
    owners = {}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) or _conv_ok(mod):
            for kind in ("weight", "bias"):
                owners[f"{mod_name}.{kind}" if mod_name else kind] = (mod, kind)
    if any(n not in owners for n in names):
        return None
    layers = list(dict.fromkeys(owners[n][0] for n in names))
    seen: dict[nn.Module, list] = {m: [] for m in layers}

    def hook(mod, inputs, output):
        seen[mod].append((inputs[0], output))

    with_y = isinstance(targets, Tensor)
    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        with torch.enable_grad():
            out = model(*args)
            per_sample = torch.func.vmap(
                (lambda o, y: objective(o.unsqueeze(0), y.unsqueeze(0))) if with_y
                else (lambda o, y: objective(o.unsqueeze(0))), in_dims=(0, 0 if with_y else None))(out, targets)
            if any(len(v) != 1 or not v[0][1].requires_grad for v in seen.values()):
                return None  # a layer called twice, or outside the graph
            grads = torch.autograd.grad(per_sample.sum(), [seen[m][0][1] for m in layers])
    finally:
        for h in handles:
            h.remove()
    phi = (lambda t: t.square()) if power == 2 else (lambda t: t.abs())
    sums: dict[tuple[nn.Module, str], tuple[Tensor, Tensor]] = {}
    for mod, d in zip(layers, grads):
        a, d = seen[mod][0][0].detach(), d.detach()
        B = a.shape[0]
        if isinstance(mod, nn.Linear) and a.dim() == 2:  # one position per sample
            sums[mod, "weight"] = (d.T @ a, phi(d).T @ phi(a))
            sums[mod, "bias"] = (d.sum(0), phi(d).sum(0))
            continue
        if isinstance(mod, nn.Linear):  # [B, ..., in]: positions are the middle dimensions
            A, D = a.reshape(B, -1, a.shape[-1]), d.reshape(B, -1, d.shape[-1]).transpose(1, 2)
        else:  # convolution: unfolded patches [B, in·kh·kw, P] and output gradients [B, out, P]
            A = F.unfold(a, mod.kernel_size, dilation=mod.dilation, padding=mod.padding,
                         stride=mod.stride).transpose(1, 2)
            D = d.reshape(B, d.shape[1], -1)
        w_first = torch.zeros(mod.weight.shape, dtype=mod.weight.dtype, device=a.device)
        w_second = torch.zeros_like(w_first)
        per = max(1, max_bytes // max(mod.weight.numel() * mod.weight.element_size(), 1))
        for s in range(0, B, per):
            G = torch.bmm(D[s:s + per], A[s:s + per]).reshape(-1, *mod.weight.shape)  # each sample's gradient
            w_first += G.sum(0)
            w_second += phi(G).sum(0)
        bias = D.sum(2)  # [B, out]
        sums[mod, "weight"] = (w_first, w_second)
        sums[mod, "bias"] = (bias.sum(0), phi(bias).sum(0))
    first = [sums[owners[n]][0] for n in names]
    second = [sums[owners[n]][1] for n in names]
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
