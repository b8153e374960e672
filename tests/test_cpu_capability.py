"""CPU capabilities: selection, errors, agreement across builds, and the kernels on emulated CPUs
without AVX-512 (qemu-user), where a stray wider instruction ends the process with SIGILL."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

import retain
from retain import _native

from .helpers import TOLERANCES, assert_close

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent


def test_capabilities_are_ordered_and_the_best_is_active():
    caps = retain.cpu_capabilities()
    assert caps[0] == "default"
    assert caps == [c for c in _native.CPU_CAPABILITY_ORDER if c in caps]
    assert retain.cpu_capability() == retain.capabilities()["cpu"]["capability"]
    if not os.environ.get("RETAIN_CPU_CAPABILITY"):
        assert retain.cpu_capability() == caps[-1]  # the best one unless the environment asks for less
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert "avx2" in caps  # x86-64 builds compile every capability
    info = retain.capabilities()["cpu"]
    assert info["supported"] == caps[-1] and info["model"] and info["error"] is None


def test_set_cpu_capability_switches_and_rejects_bad_names():
    before = retain.cpu_capability()
    try:
        for cap in retain.cpu_capabilities():
            retain.set_cpu_capability(cap)
            assert retain.cpu_capability() == cap
    finally:
        retain.set_cpu_capability(before)
    with pytest.raises(ValueError, match=r"RETAIN_CPU_CAPABILITY: expected one of default, avx2, avx512; got 'sse9'"):
        retain.set_cpu_capability("sse9")
    with pytest.raises(TypeError, match="name must be a str, got int"):
        retain.set_cpu_capability(2)
    assert retain.cpu_capability() == before


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


@pytest.mark.parametrize("cap", retain.cpu_capabilities())
def test_environment_variable_selects_a_capability(cap):
    proc = _run("import retain; print(retain.cpu_capability())", RETAIN_CPU_CAPABILITY=cap.upper())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == cap


def test_bad_environment_variable_fails_the_first_kernel_call_and_retain_info():
    code = "import torch, retain\nretain.ops.linear_recurrence(torch.rand(1, 2, 3), torch.rand(1, 2, 3))"
    proc = _run(code, RETAIN_CPU_CAPABILITY="avx9")
    assert proc.returncode != 0
    assert "ValueError: RETAIN_CPU_CAPABILITY: expected one of default, avx2, avx512; got 'avx9'" in proc.stderr
    info = subprocess.run([sys.executable, "-m", "retain", "info"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "RETAIN_CPU_CAPABILITY": "avx9"})
    assert info.returncode == 1
    assert "CPU kernels: FAILED: RETAIN_CPU_CAPABILITY: expected one of" in info.stdout


def _every_op_forward_and_backward() -> dict[str, torch.Tensor]:
    """Outputs and gradients of every CPU kernel on float32 inputs whose sizes leave vector tails."""
    g = torch.Generator().manual_seed(0)
    out: dict[str, torch.Tensor] = {}

    a = torch.rand(3, 20, 37, generator=g).requires_grad_()
    x = torch.randn(3, 20, 37, generator=g).requires_grad_()
    h = retain.ops.linear_recurrence(a, x)
    out["linear_recurrence"] = h
    out["linear_recurrence.grad_a"], out["linear_recurrence.grad_x"] = torch.autograd.grad(h.square().sum(), (a, x))

    B, T, H, K, V = 2, 33, 2, 40, 40
    q = torch.randn(B, T, H, K, generator=g).requires_grad_()
    k = torch.randn(B, T, H, K, generator=g).requires_grad_()
    v = torch.randn(B, T, H, V, generator=g).requires_grad_()
    gate = torch.nn.functional.logsigmoid(torch.randn(B, T, H, K, generator=g) + 3).requires_grad_()
    beta = torch.rand(B, T, H, generator=g).requires_grad_()
    o, (S, Z), _ = retain.ops.memory_scan(q, k, v, beta, g=gate, eta=0.5, objective="huber", use_qk_l2norm=True,
                                       output_final_state=True)
    out["memory_scan"] = o
    for name, grad in zip("qkvgb", torch.autograd.grad(o.square().sum() + S.sum() + Z.sum(), (q, k, v, gate, beta))):
        out[f"memory_scan.grad_{name}"] = grad

    hid = torch.randn(2, 9, 37, generator=g).requires_grad_()
    ref = torch.randn(2, 9, 37, generator=g)
    stats = retain.ops.activation_stats(ref)
    pos, neg = retain.ops.tm_thresholds(stats, k=0.5)
    packed_labels = retain.ops.pack_tm_labels(ref, pos, neg)
    for packed in (False, True):
        lab = packed_labels if packed else retain.ops.unpack_tm_labels(packed_labels, 37)
        tm = retain.ops.tm_loss(hid, lab, pos, neg)
        out[f"tm_loss.packed={packed}"] = tm
        (out[f"tm_loss.packed={packed}.grad"],) = torch.autograd.grad(tm, hid)

    z = torch.randn(11, 70, generator=g).requires_grad_()
    z_ref = torch.randn(11, 70, generator=g).requires_grad_()
    for reduction in ("none", "mean"):
        kl = retain.ops.kl_imitation(z, z_ref, temperature=2.0, reduction=reduction)
        out[f"kl_imitation.{reduction}"] = kl
        gz, gq = torch.autograd.grad(kl.sum(), (z, z_ref))
        out[f"kl_imitation.{reduction}.grad_z"], out[f"kl_imitation.{reduction}.grad_z_ref"] = gz, gq
        fi = retain.ops.feature_imitation(hid, ref, p=2, reduction=reduction)
        out[f"feature_imitation.{reduction}"] = fi
        (out[f"feature_imitation.{reduction}.grad"],) = torch.autograd.grad(fi.sum(), hid)
    return {name: t.detach() for name, t in out.items()}


def test_every_capability_agrees_with_the_best_one():
    """Each build computes the same results within the tolerance table (each is also checked
    against the references by the kernel tests, which run under every capability)."""
    before = retain.cpu_capability()
    try:
        results = {}
        for cap in retain.cpu_capabilities():
            retain.set_cpu_capability(cap)
            results[cap] = _every_op_forward_and_backward()
    finally:
        retain.set_cpu_capability(before)
    best = results[before]
    for cap, res in results.items():
        for name, t in res.items():
            assert_close(t, best[name], msg=f"{name} under {cap} vs {before}")


QEMU = shutil.which("qemu-x86_64")
# qemu's CPU models: Haswell has AVX2 + FMA + BMI2 (x86-64-v3) and no AVX-512; Nehalem has SSE4.2
# and no AVX at all. qemu's emulator implements AVX2 but not AVX-512.
EMULATED_CPUS = [("Haswell", "avx2"), ("Nehalem", "default")]


@pytest.mark.skipif(QEMU is None or sys.platform != "linux" or os.uname().machine != "x86_64",
                    reason="needs qemu-user (qemu-x86_64) on x86-64 Linux: apt-get install qemu-user")
@pytest.mark.parametrize("cpu, expected", EMULATED_CPUS)
def test_kernels_run_on_an_emulated_cpu_without_avx512(cpu, expected):
    rtol, atol = TOLERANCES[torch.float32]
    proc = subprocess.run([QEMU, "-cpu", cpu, sys.executable, str(HERE / "cpu_emu" / "native_smoke.py"),
                           retain._native._C.__file__, expected, str(rtol), str(atol)],
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + "\n".join(l for l in proc.stderr.splitlines() if "TCG doesn't support" not in l)
    assert proc.returncode == 0, f"exit {proc.returncode} (-4 or 132: illegal instruction)\n{out}"
    assert "0 failed" in out, out


CHECKER = ROOT / "cmake" / "check_cpu_symbols.py"


@pytest.mark.skipif(shutil.which("g++") is None or shutil.which("nm") is None, reason="needs g++ and nm")
@pytest.mark.parametrize("source, flagged", [
    ("#include <vector>\nfloat f(int n) { std::vector<float> v(n); v.resize(2 * n); return v[0]; }\n",
     "std::vector<float"),
    ("struct T { int w[4]; T() { for (int i = 0; i < 4; ++i) w[i] = i * i; } };\nT table;\n", "_GLOBAL__sub_I"),
    ("namespace retain { enum class CpuCapability { Default, Avx2, Avx512 };\n"
     "template <CpuCapability C> float g(float x) { return x * 2; }\n"
     "template float g<CpuCapability::Avx512>(float); }\n", None),
])
def test_symbol_check_flags_code_shared_across_capabilities(tmp_path, source, flagged):
    src, obj = tmp_path / "k.cpp", tmp_path / "k.o"
    src.write_text(source)
    subprocess.run(["g++", "-std=c++17", "-O2", "-fno-inline", "-march=x86-64-v4", "-c", str(src), "-o", str(obj)],
                   check=True)
    proc = subprocess.run([sys.executable, str(CHECKER), "nm", "ON", "@avx512", str(obj)], capture_output=True,
                          text=True)
    if flagged is None:
        assert proc.returncode == 0, proc.stdout
    else:
        assert proc.returncode == 1 and flagged in proc.stdout, proc.stdout


AARCH64_CXX = shutil.which("aarch64-linux-gnu-g++")
QEMU_AARCH64 = shutil.which("qemu-aarch64")
KERNEL_SOURCES = ["scan/linear_recurrence_cpu.cpp", "scan/memory_scan_cpu.cpp", "margin/tm_loss_cpu.cpp",
                  "margin/kl_imitation_cpu.cpp", "margin/feature_imitation_cpu.cpp",
                  "fisher/grad_moments_cpu.cpp", "fisher/rank1_dots_cpu.cpp", "fisher/ewc_penalty_cpu.cpp",
                  "fisher/si_importance_cpu.cpp", "replay/slots_cpu.cpp", "replay/segment_tree_cpu.cpp",
                  "replay/rows_cpu.cpp", "cache/cached_readout_cpu.cpp"]


def test_kernel_sources_are_the_ones_cmake_builds():
    cmake = (ROOT / "CMakeLists.txt").read_text()
    listed = cmake.split("set(RETAIN_CPU_KERNEL_SOURCES", 1)[1].split(")", 1)[0].split()
    assert listed == [f"csrc/{s}" for s in KERNEL_SOURCES]


@pytest.mark.skipif(AARCH64_CXX is None, reason="needs the aarch64 cross compiler: apt-get install g++-aarch64-linux-gnu")
def test_portable_kernels_cross_compile_and_run_on_aarch64(tmp_path):
    """The default capability is portable C++: no x86 header outside the x86 builds. Built with
    warnings as errors; run under qemu-aarch64 where it is installed."""
    exe = tmp_path / "portable_smoke"
    cmd = [AARCH64_CXX, "-std=c++17", "-O1", "-fopenmp", "-Wall", "-Wextra", "-Werror", "-DRETAIN_CPU_CAPABILITY=0",
           f"-I{ROOT / 'csrc'}", str(HERE / "cpu_emu" / "portable_smoke.cpp"),
           *[str(ROOT / "csrc" / s) for s in KERNEL_SOURCES],
           # linked as the module is (RETAIN_PORTABLE_LINK): the glibc-floor bindings resolve on aarch64 too
           *[str(ROOT / "csrc" / "common" / s) for s in ("glibc_floor.cpp", "glibc_floor_versions.cpp")],
           "-static-libstdc++",
           "-Wl,--push-state,--no-as-needed,-l:libpthread.so.0,--pop-state", "-o", str(exe)]
    built = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-4000:]
    if QEMU_AARCH64 is None:
        pytest.skip("built for aarch64; qemu-aarch64 (apt-get install qemu-user) is needed to run it")
    rtol, atol = TOLERANCES[torch.float32]
    ran = subprocess.run([QEMU_AARCH64, "-L", "/usr/aarch64-linux-gnu", str(exe), str(rtol), str(atol)],
                         capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0 and "0 failed" in ran.stdout, ran.stdout + ran.stderr
