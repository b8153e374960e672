"""Input checks shared by every op: errors name the op, the argument, what was expected and what
was got. They run in Python before any native call (the native side checks only what it assumes).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from retain import _native


def check_tensor(op: str, name: str, t, *, ndim_min: int | None = None, ndim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if ndim_min is not None and t.dim() < ndim_min:
        raise ValueError(f"{op}: {name} must have at least {ndim_min} dimensions, got shape {tuple(t.shape)}")


def check_floating(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in _native.KERNEL_DTYPES:
        allowed = ", ".join(str(d).replace("torch.", "") for d in _native.KERNEL_DTYPES)
        raise TypeError(f"{op}: {name} must be a floating tensor ({allowed}), got {str(t.dtype).replace('torch.', '')}")


def check_shape(op: str, name: str, t: torch.Tensor, expected: Sequence[int], what: str = "") -> None:
    if tuple(t.shape) != tuple(expected):
        hint = f" ({what})" if what else ""
        raise ValueError(f"{op}: {name} must have shape {tuple(expected)}{hint}, got {tuple(t.shape)}")


def check_same(op: str, ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Every tensor in ``others`` has ``ref``'s dtype and device."""
    for name, t in others.items():
        if t is None:
            continue
        if t.device != ref.device:
            raise ValueError(f"{op}: {name} must be on {ref_name}'s device {ref.device}, got {t.device}")
        if t.dtype != ref.dtype:
            raise TypeError(
                f"{op}: {name} must have {ref_name}'s dtype {str(ref.dtype).replace('torch.', '')}, "
                f"got {str(t.dtype).replace('torch.', '')}"
            )


def kernel_device(op: str, t: torch.Tensor) -> str | None:
    """'cpu' or 'cuda' when a native kernel serves ``t``; None when the reference should run
    (RETAIN_FALLBACK=reference). Otherwise raises an error saying what to install or set."""
    dev = t.device.type
    if _native.has_kernel(op, dev):
        return dev
    if _native.fallback_to_reference():
        return None
    if not _native.native_available():
        _native.lib()  # raises with the load error and the rebuild hint
    if dev == "cuda":
        hint = "this build has no CUDA kernels: rebuild with RETAIN_CUDA=ON (pip install -v . with nvcc on PATH)"
    else:
        hint = f"retain has no {dev} kernel for this op"
    raise NotImplementedError(
        f"retain::{op}: no kernel for device '{dev}' ({hint}); set RETAIN_FALLBACK=reference to run the "
        "pure-PyTorch reference instead"
    )
