"""memory_scan's CUDA kernel without a GPU: csrc/scan/memory_scan_cuda.cu compiled as C++ against
the fiber emulation in tests/cuda_emu/cuda_runtime.h (each thread of a block a cooperative fiber,
__syncthreads and warp shuffles barriers, blocks one after another; shared memory and the
backward's workspace start as NaN; a launch over 48 KiB of shared memory without the opt-in or
with a bad block size aborts) and compared with the CPU kernel on every output and gradient.

It checks indexing, reductions, barriers, workspace layout and math; not registers, occupancy or
timing, which only a GPU shows (bench/gpu_check.sh). The kernel file is used as written, with two
mechanical substitutions (dynamic shared memory, the <<<...>>> launches) counted so that a change
the emulation cannot follow fails here instead of passing silently."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
EMU = ROOT / "tests" / "cuda_emu"
KERNEL = CSRC / "scan" / "memory_scan_cuda.cu"

pytestmark = pytest.mark.skipif(
    shutil.which("g++") is None or not KERNEL.exists(),
    reason="needs g++ and the source tree (csrc/) next to the tests")

SMEM = "extern __shared__ __align__(16) unsigned char smem_raw[];"
LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[\w:, ]+>)?)<<<(.*?)>>>\(", re.S)


def emulated_source() -> str:
    """The kernel file with its dynamic shared memory and launches routed to the emulation."""
    text = KERNEL.read_text()
    n_smem = text.count(SMEM)
    text = text.replace(SMEM, "unsigned char* smem_raw = emu_smem;")
    text, n_launch = LAUNCH.subn(lambda m: f"emu::launch({m.group(1)}, {m.group(2)}, ", text)
    assert (n_smem, n_launch) == (2, 3), (
        f"memory_scan_cuda.cu changed shape: {n_smem} dynamic shared-memory declarations and {n_launch} launches "
        "found (expected 2 and 3); update tests/ops/test_scan_cuda_emulated.py and tests/cuda_emu to match")
    return text


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> pathlib.Path:
    build = tmp_path_factory.mktemp("cuda_emu")
    (build / "memory_scan_cuda_emu.cpp").write_text(emulated_source())
    exe = build / "harness"
    cmd = ["g++", "-std=c++17", "-O2", "-fopenmp", "-w", "-DRETAIN_WITH_CUDA=1", f"-I{EMU}", f"-I{CSRC}",
           str(EMU / "memory_scan_harness.cpp"), str(build / "memory_scan_cuda_emu.cpp"),
           str(CSRC / "scan" / "memory_scan_cpu.cpp"), "-o", str(exe)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"building the emulated kernel failed:\n{done.stderr[-4000:]}"
    return exe


def run(exe: pathlib.Path, mode: int, shuffled: bool = False) -> str:
    env = dict(os.environ)
    if shuffled:
        env["EMU_RANDOM"] = "1"  # another thread order between barriers: a race changes results
    done = subprocess.run([str(exe), str(mode)], capture_output=True, text=True, env=env, timeout=900)
    out = done.stdout + done.stderr
    assert done.returncode == 0 and " fails 0" in out, out[-4000:]
    return out


def test_emulated_cuda_kernel_edge_cases(harness):
    # T = 0, empty sequences, K = V = 1 with C = 1, V = 300, varlen with cached states every step,
    # 'dot' with per-key gates at K = 128, for 1, 4 and 1000 SMs (the forward narrows its blocks on
    # small grids); then bfloat16 and float16
    run(harness, 2)
    run(harness, 2, shuffled=True)


def test_emulated_cuda_kernel_small_geometries(harness):
    # every objective x gate kind x (gate_log, retention_first, momentum, l2norm, initial state,
    # final-state and cached-state gradients, checkpoint interval) at K/V = 3/5 and 16/40
    run(harness, 3)


@pytest.mark.slow
def test_emulated_cuda_kernel_all_geometries(harness):
    run(harness, 0)  # also K/V = 64/37 and 100/9 (two rows a thread group, several V tiles)


@pytest.mark.slow
def test_emulated_cuda_kernel_wide_keys(harness):
    run(harness, 1)  # K = 256 and 130: 32 rows a thread, > 48 KiB of shared memory in float64
