"""Build CUDA source files as C++ against the fiber emulation in ``cuda_runtime.h`` (this folder)
and run a harness that compares them with the CPU kernels (tests/ops/test_*_cuda_emulated.py).

A kernel file, and each csrc/ ``.cuh`` header it includes (common/cuda_rows.cuh: the block
reduction several kernel files share), is used as written, with mechanical substitutions whose
counts are checked, so a change the emulation cannot follow fails loudly instead of passing
silently: dynamic shared memory becomes the emulator's per-block buffer, static ``__shared__``
arrays become statics (blocks run one after another), ``<<<...>>>`` launches become
``emu::launch`` calls."""

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


def available(kernel: pathlib.Path | list[pathlib.Path]) -> bool:
    kernels = [kernel] if isinstance(kernel, pathlib.Path) else kernel
    return shutil.which("g++") is not None and all(k.exists() for k in kernels)


LOCAL_HEADER = re.compile(r'^#include "([\w/]+\.cuh)"', re.M)


def emulated_text(text: str) -> tuple[str, tuple[int, int, int]]:
    """The substituted text, and the counts (dynamic shared memory, static shared arrays, launches)."""
    n_dyn = text.count(DYNAMIC_SMEM)
    text = text.replace(DYNAMIC_SMEM, "unsigned char* smem_raw = emu_smem;")
    text, n_static = STATIC_SMEM.subn("static ", text)
    text, n_launch = LAUNCH.subn(lambda m: f"emu::launch({m.group(1)}, {m.group(2)}, ", text)
    return text, (n_dyn, n_static, n_launch)


def local_headers(kernels: list[pathlib.Path]) -> list[str]:
    """The csrc/ .cuh headers the kernel files include, directly or through each other."""
    found: list[str] = []
    todo = list(kernels)
    while todo:
        for name in LOCAL_HEADER.findall(todo.pop().read_text()):
            if name not in found and (CSRC / name).exists():
                found.append(name)
                todo.append(CSRC / name)
    return found


def build(kernel: pathlib.Path | list[pathlib.Path], harness: pathlib.Path, cpu_sources: list[pathlib.Path],
          out: pathlib.Path, *, dynamic: int, static: int, launches: int) -> pathlib.Path:
    """Compile the kernel file(s), each a translation unit of its own, with the harness and the CPU
    kernels. The counts are totals over the kernel files and the headers they include."""
    kernels = [kernel] if isinstance(kernel, pathlib.Path) else list(kernel)
    names = ", ".join(k.name for k in kernels)
    total = [0, 0, 0]
    include = out / "emu_include"  # substituted headers, found before csrc/'s
    for name in local_headers(kernels):
        text, counts = emulated_text((CSRC / name).read_text())
        (include / name).parent.mkdir(parents=True, exist_ok=True)
        (include / name).write_text(text)
        total = [t + c for t, c in zip(total, counts)]
    sources = []
    for k in kernels:
        text, counts = emulated_text(k.read_text())
        sources.append(out / (k.stem + "_emu.cpp"))
        sources[-1].write_text(text)
        total = [t + c for t, c in zip(total, counts)]
    got, want = tuple(total), (dynamic, static, launches)
    assert got == want, (
        f"{names} changed shape: (dynamic shared memory, static shared arrays, launches) = {got}, "
        f"expected {want}; update the emulated test of these files and tests/cuda_emu to match")
    exe = out / (harness.stem + ".bin")
    cmd = ["g++", "-std=c++17", "-O2", "-fopenmp", "-w", "-DRETAIN_WITH_CUDA=1",
           "-DRETAIN_CPU_CAPABILITY=0", f"-I{include}", f"-I{EMU}", f"-I{CSRC}",
           str(harness), *map(str, sources), *map(str, cpu_sources), "-o", str(exe)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"building the emulated {names} failed:\n{done.stderr[-4000:]}"
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
