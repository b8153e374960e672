"""How every custom op finds its implementation, written once.

Each op is a ``torch.library.custom_op`` whose own body is its *fallback* (pure PyTorch, from the
family's ``reference.py``); native kernels are attached per device with ``register_kernel`` for
the devices this build has them for (``retain._C.kernels``). The dispatcher picks the kernel of
the tensor's device, or the fallback where there is none. One policy for the fallback, applied
by :func:`fallback` at the top of every op body: it runs when ``RETAIN_FALLBACK=reference``,
otherwise it raises an error that says what to install or set.

Also here: the native call convention (:func:`run`), output buffers, and the autograd helpers
the ops share.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from retain import _native

# op -> the devices it got a native kernel for
_REGISTERED: dict[object, set[str]] = {}
_DISABLED: set[tuple[object, str]] = set()


def register_kernels(op, kernel: str, impl: Callable | None = None, **per_device: Callable) -> None:
    """Attach ``impl`` (or ``per_device[device]``) to ``op`` for every device the native module has
    a ``kernel`` for. ``impl`` serves every such device not named in ``per_device``."""
    served_devices = set()
    for device in _native.kernel_devices(kernel):
        fn = per_device.get(device, impl)
        if fn is not None:
            op.register_kernel(device)(fn)
            served_devices.add(device)
    _REGISTERED[op] = served_devices


def served(op, device: torch.device | str) -> bool:
    """True when a native kernel of ``op`` serves tensors on ``device`` (fakes ask this where an
    output exists only for the kernel, e.g. saved checkpoints)."""
    device_type = device if isinstance(device, str) else device.type
    return device_type in _REGISTERED.get(op, ()) and (op, device_type) not in _DISABLED


@contextlib.contextmanager
def kernels_disabled(device: str = "cpu") -> Iterator[None]:
    """Run every op's fallback on ``device`` inside the block (tests of the fallback path)."""
    with contextlib.ExitStack() as stack:
        for op, devices in _REGISTERED.items():
            if device in devices:
                stack.enter_context(op.set_kernel_enabled(device, enabled=False))
                _DISABLED.add((op, device))
                stack.callback(_DISABLED.discard, (op, device))
        yield


def fallback(op_name: str, t: Tensor) -> None:
    """The one fallback policy, first line of every op body: return when the pure-PyTorch body may
    run (``RETAIN_FALLBACK=reference``), else raise NotImplementedError saying what to do."""
    if _native.fallback_to_reference():
        return
    if not _native.native_available():
        _native.lib()  # raises with the load error and the rebuild hint
    dev = t.device.type
    if dev == "cuda" and not _native.lib().build_info()["cuda"]:
        hint = "this build has no CUDA kernels: rebuild with RETAIN_CUDA=ON (pip install -v . with nvcc on PATH)"
    else:
        hint = f"retain has no {dev} kernel for this op"
    raise NotImplementedError(f"retain::{op_name}: no kernel for device '{dev}' ({hint}); set "
                              "RETAIN_FALLBACK=reference to run the pure-PyTorch reference instead")


def run(entry: str, device: torch.device, *args) -> None:
    """Call the native ``<entry>_cpu(*args, threads)`` or, on ``device``'s GPU,
    ``<entry>_cuda(*args, stream)``: the convention every binding follows (csrc/common/bind.h)."""
    lib = _native.lib()
    if device.type == "cpu":
        getattr(lib, f"{entry}_cpu")(*args, _native.num_threads())
    else:  # a launch goes to the current device, which need not be the tensor's
        with torch.cuda.device(device):
            getattr(lib, f"{entry}_cuda")(*args, _native.cuda_stream(device))


def dtype_code(t: Tensor) -> int:
    return _native.DTYPE_CODES[t.dtype]


def ptr(t: Tensor | None) -> int:
    """A tensor's data pointer for the native side; 0 (nullptr) for None or an empty tensor."""
    return 0 if t is None or t.numel() == 0 else t.data_ptr()


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation/state dtype: float64 for float64 inputs, float32 for the others."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def contiguous(*ts: Tensor | None) -> list[Tensor | None]:
    return [t.contiguous() if t is not None else None for t in ts]


def empty_or_nothing(t: Tensor | None, wanted: bool, empty: Callable[[Tensor], Tensor], like: Tensor,
                     dtype: torch.dtype | None = None) -> Tensor:
    """``empty(t)`` when the output is wanted, else a 0-element tensor (outputs never alias)."""
    if wanted and t is not None:
        return empty(t)
    return like.new_empty(0, dtype=dtype if dtype is not None else like.dtype)


def reference_vjp(fn: Callable, primals: Sequence[Tensor | None], cotangents: Sequence[Tensor | None],
                  wanted: Sequence[bool]) -> list[Tensor | None]:
    """Gradients of ``fn(*primals)`` (a tuple of outputs, None allowed) against ``cotangents``
    by autograd through the reference: the backward ops' fallback. Unwanted or None primals get
    None; a None cotangent counts as zero."""
    idx = [i for i, (p, w) in enumerate(zip(primals, wanted)) if w and p is not None]
    args = list(primals)

    def f(*diff):
        for i, d in zip(idx, diff):
            args[i] = d
        outs = fn(*args)
        return tuple(o if o is not None else torch.zeros(()) for o in outs)

    outs, vjp = torch.func.vjp(f, *[primals[i] for i in idx])
    cots = tuple(torch.zeros_like(o) if c is None or c.numel() != o.numel() else c.reshape(o.shape).to(o.dtype)
                 for o, c in zip(outs, cotangents))
    grads = vjp(cots) if idx else ()
    result: list[Tensor | None] = [None] * len(primals)
    for i, g in zip(idx, grads):
        result[i] = g.contiguous()
    return result


def hand_out(ctx, grad_loss: Tensor | None, need: tuple[bool, ...]) -> list[Tensor | None] | None:
    """The gradients a fused forward computed (``ctx.precomputed``), handed out once: scaled in
    place by the incoming gradient unless it is exactly 1. None when they cannot be used — already
    handed out (a second backward through the graph), traced by torch.compile (fake tensors), or
    one that is needed is missing (the fallback computes none), or a graph of the backward is
    being built (``create_graph=True``: the precomputed tensors have none) — and the caller
    recomputes with its backward op."""
    pre = ctx.precomputed
    ctx.precomputed = None
    if pre is None or type(grad_loss) is not torch.Tensor or torch.compiler.is_compiling() or torch.is_grad_enabled():
        return None
    if any(n and (t is None or t.numel() == 0) for n, t in zip(need, pre)):
        return None
    g = float(grad_loss)
    return [t if t is None or g == 1.0 else t.mul_(g) for t in pre]
