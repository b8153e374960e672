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

# The dtypes the kernels take, and their codes as the native module defines them (dtype.h).
KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
DTYPE_CODES = {getattr(torch, name): code for name, code in _C.dtype_codes.items()} if _C is not None else {}

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


def fake_empty_like(t: torch.Tensor) -> torch.Tensor:
    """What an op's fake returns for an output :func:`empty_like` makes: contiguous, like ``t``
    in shape, dtype and device (never poisoned: fakes have no data)."""
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def native_available() -> bool:
    """True when the native module loaded."""
    return _C is not None


def load_error() -> BaseException | None:
    """The exception raised while loading ``retain._C``, or None."""
    return _LOAD_ERROR


# RETAIN_CPU_CAPABILITY=avx512|avx2|default (PyTorch's ATEN_CPU_CAPABILITY convention) forces the
# build of the CPU kernels to run, at most what the CPU supports. A bad value is remembered and
# raised by the first kernel call (and reported by `retain info`), as a failed load is.
CPU_CAPABILITY_ENV = "RETAIN_CPU_CAPABILITY"
CPU_CAPABILITY_ORDER = tuple(_C.cpu_capability_names) if _C is not None else ()  # lowest first
_CPU_CAPABILITY_ERROR: ValueError | None = None
if _C is not None and os.environ.get(CPU_CAPABILITY_ENV, "").strip():
    try:
        _C.set_cpu_capability(os.environ[CPU_CAPABILITY_ENV].strip().lower())
    except ValueError as exc:
        _CPU_CAPABILITY_ERROR = exc


def lib():
    """The native module; raises RuntimeError naming the load failure when it did not load."""
    if _C is None:
        raise RuntimeError(f"retain's native module retain._C failed to load ({_LOAD_ERROR!r}). {REBUILD_HINT}")
    if _CPU_CAPABILITY_ERROR is not None:
        raise ValueError(f"{_CPU_CAPABILITY_ERROR} (set {CPU_CAPABILITY_ENV} to one of "
                         f"{', '.join(cpu_capabilities())} or unset it)")
    return _C


def cpu_capability() -> str:
    """The CPU capability the kernels run with: ``'avx512'``, ``'avx2'`` or ``'default'``."""
    return lib().cpu_capability()


def cpu_capabilities() -> list[str]:
    """The capabilities this build compiled and this CPU can run, lowest first."""
    if _C is None:
        return []
    top = CPU_CAPABILITY_ORDER.index(_C.cpu_capability_supported())
    return [c for c in _C.cpu_capabilities_compiled if CPU_CAPABILITY_ORDER.index(c) <= top]


def set_cpu_capability(name: str) -> None:
    """Run later CPU kernel calls with the build for ``name`` (one of :func:`cpu_capabilities`).

    Raises ValueError naming what the CPU supports when it lacks the instructions, or the name
    is unknown. Meant for benchmarks and tests; the default is the best the CPU supports.
    """
    global _CPU_CAPABILITY_ERROR
    if not isinstance(name, str):
        raise TypeError(f"set_cpu_capability: name must be a str, got {type(name).__name__}")
    if _C is None:
        lib()  # raises with the load error
    _C.set_cpu_capability(name.strip().lower())
    _CPU_CAPABILITY_ERROR = None


def cpu_model() -> dict[str, Any]:
    """The CPU's model name, core count and vector instruction sets (Linux: /proc/cpuinfo)."""
    import platform

    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model") and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    isa = [f for f in ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16",
                       "amx_tile", "asimd", "sve") if f in flags]
    return {"model": model, "cores": os.cpu_count(), "isa": isa}


def fallback_to_reference() -> bool:
    """RETAIN_FALLBACK=reference: run the pure-PyTorch reference where no kernel exists."""
    return os.environ.get("RETAIN_FALLBACK", "").strip().lower() == "reference"


def kernel_devices(op: str) -> tuple[str, ...]:
    """The devices ('cpu', 'cuda') this build has native kernels of ``op`` for."""
    return tuple(_C.kernels.get(op, ())) if _C is not None else ()


def has_kernel(op: str, device_type: str) -> bool:
    return device_type in kernel_devices(op)


def num_threads() -> int:
    """Threads for CPU kernels: PyTorch's intra-op setting, so torch.set_num_threads governs both."""
    return torch.get_num_threads()


def cuda_stream(device: torch.device) -> int:
    """The caller's current CUDA stream on ``device`` as an integer handle."""
    return torch.cuda.current_stream(device).cuda_stream


def capabilities() -> dict[str, Any]:
    """Build facts and kernels per op and device, without initialising CUDA.

    Returns a dict with ``native`` (bool), ``load_error`` (str or None), ``build`` (compiler,
    OpenMP, CUDA runtime and architectures compiled), ``kernels`` ({op: [devices]}) and ``cpu``
    (model, cores, vector instruction sets, the active, supported and compiled capabilities, and
    the error of a bad RETAIN_CPU_CAPABILITY).
    """
    if _C is None:
        return {"native": False, "load_error": repr(_LOAD_ERROR), "build": {}, "kernels": {}, "cpu": cpu_model()}
    return {
        "native": True,
        "load_error": None,
        "build": dict(_C.build_info()),
        "kernels": {op: list(devs) for op, devs in _C.kernels.items()},
        "cpu": {
            **cpu_model(),
            "capability": _C.cpu_capability(),
            "supported": _C.cpu_capability_supported(),
            "compiled": list(_C.cpu_capabilities_compiled),
            "error": None if _CPU_CAPABILITY_ERROR is None else str(_CPU_CAPABILITY_ERROR),
        },
    }
