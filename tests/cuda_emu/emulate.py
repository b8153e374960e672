"""Build a CUDA source file as C++ against the fiber emulation in ``cuda_runtime.h`` (this folder)
and run a harness that compares it with the CPU kernels (tests/ops/test_*_cuda_emulated.py).

A kernel file is used as written, with mechanical substitutions whose counts are checked, so a
change the emulation cannot follow fails loudly instead of passing silently: dynamic shared
memory becomes the emulator's per-block buffer, static ``__shared__`` arrays become statics
(blocks run one after another), ``<<<...>>>`` launches become ``emu::launch`` calls."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
EMU = ROOT / "tests" / "cuda_emu"

DYNAMIC_SMEM = "extern __shared__ __align__(16) unsigned char smem_raw[];"
STATIC_SMEM = re.compile(r"(?<![\w])__shared__ (?=[\w:<>]+ \w+\[)")
LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[\w:, ]+>)?)<<<(.*?)>>>\(", re.S)


def available(kernel: pathlib.Path) -> bool:
    return shutil.which("g++") is not None and kernel.exists()


def emulated_source(kernel: pathlib.Path, *, dynamic: int, static: int, launches: int) -> str:
    text = kernel.read_text()
    n_dyn = text.count(DYNAMIC_SMEM)
    text = text.replace(DYNAMIC_SMEM, "unsigned char* smem_raw = emu_smem;")
    text, n_static = STATIC_SMEM.subn("static ", text)
    text, n_launch = LAUNCH.subn(lambda m: f"emu::launch({m.group(1)}, {m.group(2)}, ", text)
    got, want = (n_dyn, n_static, n_launch), (dynamic, static, launches)
    assert got == want, (
        f"{kernel.name} changed shape: (dynamic shared memory, static shared arrays, launches) = {got}, "
        f"expected {want}; update the emulated test of this file and tests/cuda_emu to match")
    return text


def build(kernel: pathlib.Path, harness: pathlib.Path, cpu_sources: list[pathlib.Path], out: pathlib.Path,
          **counts: int) -> pathlib.Path:
    src = out / (kernel.stem + "_emu.cpp")
    src.write_text(emulated_source(kernel, **counts))
    exe = out / (harness.stem + ".bin")
    cmd = ["g++", "-std=c++17", "-O2", "-fopenmp", "-w", "-DRETAIN_WITH_CUDA=1",
           "-DRETAIN_CPU_CAPABILITY=0", f"-I{EMU}", f"-I{CSRC}",
           str(harness), str(src), *map(str, cpu_sources), "-o", str(exe)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"building the emulated {kernel.name} failed:\n{done.stderr[-4000:]}"
    return exe


def run(exe: pathlib.Path, *args: str, shuffled: bool = False) -> str:
    """Run a harness; it prints '... fails 0' and exits 0 when every comparison held."""
    env = dict(os.environ)
    if shuffled:
        env["EMU_RANDOM"] = "1"  # another thread order between barriers: a race changes results
    done = subprocess.run([str(exe), *args], capture_output=True, text=True, env=env, timeout=900)
    out = done.stdout + done.stderr
    assert done.returncode == 0 and " fails 0" in out, out[-4000:]
    return out
