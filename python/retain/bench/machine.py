"""The machine a run measures: glibc's heap mode, the facts a report records (CPU, builds,
versions) and the ceilings results are quoted against (copy bandwidth, float32 matmul rate),
measured in the same process before and after the run.

By default ``retain bench`` first tells glibc to keep freed memory (:func:`warm_heap`: no mmap
for large blocks, no trimming), the steady state a training loop sees. Without it, every fresh
output over 32 MB is a new mmap whose page faults cost more than the kernel itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import platform
from typing import Any

import torch

from retain.bench.harness import quantile, timed

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def warm_heap() -> bool:
    """Make glibc keep freed memory for reuse (no mmap for big blocks, no trimming).

    Process-wide and irreversible: call it only in a benchmark process. Returns False where
    ``mallopt`` is unavailable (not glibc).
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # -1: no trimming at all (mallopt(3)); 2^31-1 still trimmed once over 2 GiB were free at the
    # top, which --size large reaches (every call of kl_imitation's fwd+bwd then paid page faults)
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, -1))


def machine_facts(device: str) -> dict[str, Any]:
    import retain
    from retain import _native

    caps = _native.capabilities()
    cpu = caps["cpu"]
    facts: dict[str, Any] = {
        "cpu": cpu["model"],
        "cpu_isa": cpu["isa"],
        "cpu_capability": cpu.get("capability"),
        "cpu_capability_supported": cpu.get("supported"),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "torch": torch.__version__,
        "retain": retain.__version__,
        "native": caps["native"],
        "compiler": caps["build"].get("compiler"),
        "device": device,
    }
    if device == "cuda":
        facts["gpu"] = torch.cuda.get_device_name()
        facts["cuda_runtime"] = torch.version.cuda
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return facts
    for dist in ("numpy", "numba", "assoc-scan", "accelerated-scan"):
        with contextlib.suppress(PackageNotFoundError):
            facts[dist] = version(dist)
    if "numba" in facts:  # the instruction set numba compiles for (LLVM's name for the CPU)
        facts["numba"] += f" (NUMBA_CPU_NAME={os.environ.get('NUMBA_CPU_NAME', 'host')})"
    return facts


def measure_ceilings(device: str, quick: bool = False) -> dict[str, Any]:
    """Copy bandwidth and float32 matmul rate on ``device``.

    Copy: ``dst.copy_(src)`` of float32 tensors, bytes = 2 * nbytes, best of several calls, in
    several fresh allocations held at once (on a VM the bandwidth of a buffer depends on the
    physical pages it got, by up to 2x); ``copy_gbps`` is the median over allocations (the typical
    buffer), ``copy_gbps_best`` the best. Matmul: best of several ``torch.mm`` calls.
    """
    if device == "cuda":
        n_copy, n_mm, allocs, tries = (1 << 24, 2048, 1, 5) if quick else (1 << 28, 8192, 2, 10)
    else:
        n_copy, n_mm, allocs, tries = (1 << 22, 512, 2, 3) if quick else (1 << 26, 2048, 5, 4)
    per_alloc, held = [], []
    for _ in range(allocs):
        src = torch.ones(n_copy, device=device)
        dst = torch.empty_like(src)
        dst.copy_(src)
        held.append((src, dst))  # keep them, so the next allocation gets other pages
        best = min(timed(lambda: dst.copy_(src), device)[1] for _ in range(tries))
        per_alloc.append(2 * src.nbytes / best / 1e9)
    copy_bytes = 2 * held[0][0].nbytes
    del held, src, dst
    a = torch.randn(n_mm, n_mm, device=device)
    b = torch.randn(n_mm, n_mm, device=device)
    torch.mm(a, b)
    best_mm = min(timed(lambda: torch.mm(a, b), device)[1] for _ in range(max(3, tries)))
    return {
        "copy_gbps": quantile(sorted(per_alloc), 0.5),
        "copy_gbps_best": max(per_alloc),
        "copy_gbps_allocs": per_alloc,
        "copy_bytes": copy_bytes,
        "matmul_gflops": 2 * n_mm**3 / best_mm / 1e9,
        "matmul_n": n_mm,
        "matmul_tf32": bool(device == "cuda" and torch.backends.cuda.matmul.allow_tf32),
    }


def combine_ceilings(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Ceilings measured before and after the run, pooled: copy is the median over all
    allocations, matmul the best of both."""
    out = dict(before)
    allocs = before["copy_gbps_allocs"] + after["copy_gbps_allocs"]
    out.update(copy_gbps=quantile(sorted(allocs), 0.5), copy_gbps_best=max(allocs), copy_gbps_allocs=allocs,
               matmul_gflops=max(before["matmul_gflops"], after["matmul_gflops"]))
    for key in ("copy_gbps", "matmul_gflops"):
        out[key + "_before"], out[key + "_after"] = before[key], after[key]
    return out
