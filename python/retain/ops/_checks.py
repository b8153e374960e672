"""The argument checks every public op and strategy uses, so every message has one form:
``<op>: <argument> must <what was expected>, got <what was got>``. TypeError for a wrong kind of
value (type, dtype), ValueError for a wrong shape, device, size or range. They run in Python before
any native call (the native side checks only what it assumes).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch

from retain import _native


def dtype_name(t_or_dtype) -> str:
    """'float32' for a float32 tensor or dtype."""
    dtype = t_or_dtype.dtype if isinstance(t_or_dtype, torch.Tensor) else t_or_dtype
    return str(dtype).replace("torch.", "")


def check_tensor(op: str, name: str, t, *, ndim_min: int | None = None, ndim: int | None = None,
                 data: bool = False) -> None:
    """``t`` is a tensor (of ``ndim`` or at least ``ndim_min`` dimensions); ``data``: one whose values
    the op reads now (eager-only ops), so not a meta tensor."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if data and t.device.type == "meta":
        raise ValueError(f"{op}: {name} must hold values (a CPU or CUDA tensor), got a meta tensor")
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
    """``value`` is one of ``choices`` (strings: a list or None is refused by name, not hashed)."""
    choices = tuple(choices)
    if not any(type(value) is type(c) and value == c for c in choices):
        kind = "" if isinstance(value, type(choices[0])) else f" ({type(value).__name__})"
        raise ValueError(f"{op}: {name} must be one of {choices}, got {value!r}{kind}")


def _scalar(op: str, name: str, value, what: str):
    """A 1-element tensor's Python value; anything else as it is."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.device.type == "meta":
            raise TypeError(f"{op}: {name} must be {what}, got a {dtype_name(value)} tensor of shape "
                            f"{tuple(value.shape)} on {value.device}")
        return value.item()
    return value


def check_int(op: str, name: str, value, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """A Python (numpy, 1-element integer tensor) integer, not a bool or a float, in [minimum, maximum]."""
    v = _scalar(op, name, value, "an integer")
    if isinstance(v, (bool, float)) or (isinstance(value, torch.Tensor) and value.is_floating_point()):
        raise TypeError(f"{op}: {name} must be an integer, got {type(v).__name__} {v!r}")
    try:
        v = operator.index(v)
    except TypeError:
        raise TypeError(f"{op}: {name} must be an integer, got {type(v).__name__} {_short(v)}") from None
    if minimum is not None and v < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {v}")
    if maximum is not None and v > maximum:
        raise ValueError(f"{op}: {name} must be <= {maximum}, got {v}")
    return v


def check_number(op: str, name: str, value, *, finite: bool = True, positive: bool = False,
                 minimum: float | None = None) -> float:
    """A real number (Python, numpy or 1-element tensor) as a float; ``finite``: NaN and ±inf are
    errors; ``positive``: > 0; ``minimum``: >= minimum."""
    v = _scalar(op, name, value, "a real number")
    if isinstance(v, bool) or not isinstance(v, (int, float)) and not _is_numpy_real(v):
        raise TypeError(f"{op}: {name} must be a real number, got {type(v).__name__} {_short(v)}")
    v = float(v)
    if finite and not math.isfinite(v):
        raise ValueError(f"{op}: {name} must be finite, got {v}")
    if positive and not v > 0:
        raise ValueError(f"{op}: {name} must be > 0, got {v}")
    if minimum is not None and not v >= minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {v}")
    return v


def check_bool(op: str, name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be True or False, got {type(value).__name__} {_short(value)}")
    return value


def _is_numpy_real(v) -> bool:
    return type(v).__module__ == "numpy" and hasattr(v, "dtype") and v.dtype.kind in "iuf"


def _short(v) -> str:
    """repr(v), cut to 60 characters (a message quotes what it got, not a whole list)."""
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."
