"""The scan family's CUDA kernels without a GPU (memory_scan's below; linear_recurrence's at the end): csrc/scan/memory_scan_cuda.cu compiled as C++ against
the fiber emulation in tests/cuda_emu (each thread of a block a cooperative fiber, __syncthreads
and warp shuffles barriers, blocks one after another; shared memory and the backward's workspace
start as NaN; a launch over 48 KiB of shared memory without the opt-in, or with a bad block size,
aborts) and compared with the CPU kernel on every output and gradient.

It checks indexing, reductions, barriers, workspace layout and math; not registers, occupancy or
timing, which only a GPU shows (bench/gpu_check.sh)."""

from __future__ import annotations

import pytest

from tests.cuda_emu import emulate

KERNEL = emulate.CSRC / "scan" / "memory_scan_cuda.cu"

pytestmark = pytest.mark.skipif(not emulate.available(KERNEL), reason="needs g++ and the source tree (csrc/)")


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    return emulate.build(KERNEL, emulate.EMU / "memory_scan_harness.cpp",
                         [emulate.CSRC / "scan" / "memory_scan_cpu.cpp"], tmp_path_factory.mktemp("scan_emu"),
                         dynamic=2, static=0, launches=3)


def test_emulated_cuda_kernel_edge_cases(harness):
    # T = 0, empty sequences, K = V = 1 with C = 1, V = 300, varlen with cached states every step,
    # 'dot' with per-key gates at K = 128, for 1, 4 and 1000 SMs (the forward narrows its blocks on
    # small grids); then bfloat16 and float16
    emulate.run(harness, "2")
    emulate.run(harness, "2", shuffled=True)


def test_emulated_cuda_kernel_small_geometries(harness):
    # every objective x gate kind x (gate_log, retention_first, momentum, l2norm, initial state,
    # final-state and cached-state gradients, checkpoint interval) at K/V = 3/5 and 16/40
    emulate.run(harness, "3")


@pytest.mark.slow
def test_emulated_cuda_kernel_all_geometries(harness):
    emulate.run(harness, "0")  # also K/V = 64/37 and 100/9 (several V tiles)


@pytest.mark.slow
def test_emulated_cuda_kernel_wide_keys(harness):
    emulate.run(harness, "1")  # K = 256 and 130: 32 rows a thread, > 48 KiB of shared memory in float64


LINEAR = emulate.CSRC / "scan" / "linear_recurrence_cuda.cu"


def test_emulated_linear_recurrence_cuda_kernels(tmp_path):
    exe = emulate.build(LINEAR, emulate.EMU / "linear_recurrence_harness.cpp",
                        [emulate.CSRC / "scan" / "linear_recurrence_cpu.cpp"], tmp_path, dynamic=0, static=0, launches=2)
    emulate.run(exe)
