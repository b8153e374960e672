"""Input checks shared by every op: errors name the op, the argument, what was expected and what
was got. They run in Python before any native call (the native side checks only what it assumes).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from retain import _native


def dtype_name(t_or_dtype) -> str:
    """'float32' for a float32 tensor or dtype."""
    dtype = t_or_dtype.dtype if isinstance(t_or_dtype, torch.Tensor) else t_or_dtype
    return str(dtype).replace("torch.", "")


def check_tensor(op: str, name: str, t, *, ndim_min: int | None = None, ndim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if ndim_min is not None and t.dim() < ndim_min:
        raise ValueError(f"{op}: {name} must have at least {ndim_min} dimensions, got shape {tuple(t.shape)}")


def check_floating(op: str, name: str, t: torch.Tensor, dtypes: Sequence[torch.dtype] | None = None) -> None:
    """``t``'s dtype is one the kernels take (or one of ``dtypes``; ``()``: any floating dtype)."""
    allowed = _native.KERNEL_DTYPES if dtypes is None else dtypes
    if (t.dtype not in allowed) if allowed else not t.is_floating_point():
        names = f" ({', '.join(dtype_name(d) for d in allowed)})" if allowed else ""
        raise TypeError(f"{op}: {name} must be a floating tensor{names}, got {dtype_name(t)}")


def check_shape(op: str, name: str, t: torch.Tensor, expected: Sequence[int], what: str = "") -> None:
    if tuple(t.shape) != tuple(expected):
        hint = f" ({what})" if what else ""
        raise ValueError(f"{op}: {name} must have shape {tuple(expected)}{hint}, got {tuple(t.shape)}")


def check_device(op: str, name: str, t: torch.Tensor | None, ref_name: str, ref: torch.Tensor) -> None:
    if t is not None and t.device != ref.device:
        raise ValueError(f"{op}: {name} must be on {ref_name}'s device {ref.device}, got {t.device}")


def check_same(op: str, ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Every tensor in ``others`` has ``ref``'s dtype and device."""
    for name, t in others.items():
        if t is None:
            continue
        check_device(op, name, t, ref_name, ref)
        if t.dtype != ref.dtype:
            raise TypeError(f"{op}: {name} must have {ref_name}'s dtype {dtype_name(ref)}, got {dtype_name(t)}")


def check_like(op: str, name: str, t, ref_name: str, ref: torch.Tensor) -> None:
    """``t`` (a reference tensor) must have ``ref``'s shape, dtype and device."""
    check_tensor(op, name, t)
    if tuple(t.shape) != tuple(ref.shape):
        raise ValueError(f"{op}: {name} must have {ref_name}'s shape {tuple(ref.shape)}, got {tuple(t.shape)}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{op}: {name} must have {ref_name}'s dtype {dtype_name(ref)}, got {dtype_name(t)} "
                        f"(cast it with {name}.to({ref_name}.dtype))")
    check_device(op, name, t, ref_name, ref)


def check_mask(op: str, mask, shape: Sequence[int], what: str, ref_name: str, ref: torch.Tensor) -> torch.Tensor | None:
    """A bool (or integer 0/1) mask of ``shape`` on ``ref``'s device, as contiguous uint8 for the
    kernels; None stays None."""
    if mask is None:
        return None
    check_tensor(op, "mask", mask)
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{op}: mask must have shape {tuple(shape)} ({what}), got {tuple(mask.shape)}")
    if mask.is_floating_point() or mask.is_complex():
        raise TypeError(f"{op}: mask must be bool (or integer 0/1), got {dtype_name(mask)}")
    check_device(op, "mask", mask, ref_name, ref)
    return mask.to(torch.bool).to(torch.uint8).contiguous()


def check_choice(op: str, name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{op}: {name} must be one of {tuple(choices)}, got {value!r}")
