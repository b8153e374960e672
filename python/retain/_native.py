"""Loading of the native module ``retain._C`` and what it can do.

A failed load does not break ``import retain``: it is remembered, and the first kernel call
raises an actionable error that says what failed and how to rebuild. Nothing here touches CUDA.
"""

from __future__ import annotations

import os
from typing import Any

import torch

try:
    from retain import _C  # type: ignore[attr-defined]

    _LOAD_ERROR: BaseException | None = None
except ImportError as exc:  # pragma: no cover - exercised by test_package via a subprocess
    _C = None
    _LOAD_ERROR = exc

# Must match retain::DType in csrc/common/dtype.h.
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
KERNEL_DTYPES = tuple(DTYPE_CODES)

REBUILD_HINT = (
    "Reinstall retain (pip install --force-reinstall retain) or rebuild it from source with "
    "`pip install -v .` (needs a C++17 compiler, CMake >= 3.24 and, for CUDA kernels, nvcc with "
    "RETAIN_CUDA=ON)."
)


# Tests set this (tests/conftest.py): fresh outputs are filled with NaN so that an element a
# kernel forgets to write fails the comparison instead of passing by luck.
poison_outputs = False


def empty_like(t: torch.Tensor) -> torch.Tensor:
    """A fresh contiguous output shaped like ``t`` (NaN-filled while ``poison_outputs`` is set)."""
    out = torch.empty_like(t, memory_format=torch.contiguous_format)
    if poison_outputs and out.is_floating_point():
        out.fill_(float("nan"))
    return out


def native_available() -> bool:
    """True when the native module loaded."""
    return _C is not None


def load_error() -> BaseException | None:
    """The exception raised while loading ``retain._C``, or None."""
    return _LOAD_ERROR


def lib():
    """The native module; raises RuntimeError naming the load failure when it did not load."""
    if _C is None:
        raise RuntimeError(f"retain's native module retain._C failed to load ({_LOAD_ERROR!r}). {REBUILD_HINT}")
    return _C


def fallback_to_reference() -> bool:
    """RETAIN_FALLBACK=reference: run the pure-PyTorch reference where no kernel exists."""
    return os.environ.get("RETAIN_FALLBACK", "").strip().lower() == "reference"


def has_kernel(op: str, device_type: str) -> bool:
    return _C is not None and device_type in _C.kernels.get(op, ())


def num_threads() -> int:
    """Threads for CPU kernels: PyTorch's intra-op setting, so torch.set_num_threads governs both."""
    return torch.get_num_threads()


def cuda_stream(device: torch.device) -> int:
    """The caller's current CUDA stream on ``device`` as an integer handle."""
    return torch.cuda.current_stream(device).cuda_stream


def capabilities() -> dict[str, Any]:
    """Build facts and kernels per op and device, without initialising CUDA.

    Returns a dict with ``native`` (bool), ``load_error`` (str or None), ``build`` (compiler,
    OpenMP, CUDA runtime and architectures compiled) and ``kernels`` ({op: [devices]}).
    """
    if _C is None:
        return {"native": False, "load_error": repr(_LOAD_ERROR), "build": {}, "kernels": {}}
    return {
        "native": True,
        "load_error": None,
        "build": dict(_C.build_info()),
        "kernels": {op: list(devs) for op, devs in _C.kernels.items()},
    }
