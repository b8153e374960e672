"""The package as a user meets it: lean import, capabilities, `retain info`, and a native module
that fails to load."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

import retain

OPTIONAL = ["numba", "assoc_scan", "accelerated_scan", "matplotlib", "hypothesis", "pytest", "scipy", "triton",
            "fla", "cupy"]


def run_python(code: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_import_is_lean_and_initialises_no_cuda():
    proc = run_python(
        "import sys, retain, torch\n"
        f"print(sorted(m for m in {OPTIONAL!r} if m in sys.modules))\n"
        "print(torch.cuda.is_initialized())\n"
    )
    assert proc.returncode == 0, proc.stderr
    loaded, cuda_initialised = proc.stdout.split("\n")[:2]
    assert loaded == "[]"
    assert cuda_initialised == "False"


def test_capabilities_report_build_and_kernels():
    caps = retain.capabilities()
    assert caps["native"] is True and caps["load_error"] is None
    assert caps["build"]["version"] == retain.__version__
    assert caps["build"]["openmp"] > 0
    assert "cpu" in caps["kernels"]["linear_recurrence"]
    assert ("cuda" in caps["kernels"]["linear_recurrence"]) == caps["build"]["cuda"]


def test_retain_info_runs_a_smoke_test():
    proc = subprocess.run([sys.executable, "-m", "retain", "info"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"retain {retain.__version__}" in proc.stdout
    assert "linear_recurrence" in proc.stdout
    assert "smoke test on cpu: ok" in proc.stdout


def test_console_script_is_installed():
    exe = shutil.which("retain") or os.path.join(os.path.dirname(sys.executable), "retain")
    if not os.path.exists(exe):
        pytest.fail(f"the `retain` console script is not installed next to {sys.executable}")
    proc = subprocess.run([exe, "info"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


BLOCK_NATIVE = (
    "import sys, importlib.abc\n"
    "class Block(importlib.abc.MetaPathFinder):\n"
    "    def find_spec(self, name, path, target=None):\n"
    "        if name == 'retain._C':\n"
    "            raise ImportError('simulated: libfoo.so: cannot open shared object file')\n"
    "sys.meta_path.insert(0, Block())\n"
)


def test_failed_native_load_keeps_import_working_and_explains_itself():
    proc = run_python(
        BLOCK_NATIVE
        + "import torch, retain\n"
        "print(retain.native_available())\n"
        "try:\n"
        "    retain.ops.linear_recurrence(torch.rand(1, 3, 2), torch.rand(1, 3, 2))\n"
        "except RuntimeError as e:\n"
        "    print('ERROR', e)\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("False")
    assert "ERROR retain's native module retain._C failed to load" in proc.stdout
    assert "simulated: libfoo.so" in proc.stdout and "pip install" in proc.stdout


def test_retain_info_fails_when_native_module_cannot_load():
    proc = run_python(BLOCK_NATIVE + "from retain.__main__ import main\nsys.exit(main(['info']))\n")
    assert proc.returncode == 1
    assert "native module: FAILED to load" in proc.stdout


def _default_cuda_archs() -> list[str]:
    """RETAIN_CUDA_ARCHS's default in pyproject.toml (what a plain `pip install .` compiles)."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    return re.search(r'RETAIN_CUDA_ARCHS = \{ env = "RETAIN_CUDA_ARCHS", default = "([^"]+)" \}', text).group(1).split(";")


@pytest.mark.skipif(not retain.capabilities()["build"]["cuda"], reason="retain was built without CUDA kernels")
def test_retain_info_lists_every_compiled_cuda_architecture():
    compiled = retain.capabilities()["build"]["cuda_archs"].split(",")
    wanted = os.environ.get("RETAIN_CUDA_ARCHS", ";".join(_default_cuda_archs())).split(";")
    assert compiled == wanted, "the build's architectures differ from RETAIN_CUDA_ARCHS (or its default)"
    proc = subprocess.run([sys.executable, "-m", "retain", "info"], capture_output=True, text=True, timeout=120)
    line = next(l for l in proc.stdout.splitlines() if l.startswith("CUDA kernels:"))
    assert line.startswith("CUDA kernels: compiled for " + ", ".join(f"sm_{a}" for a in wanted) + " ("), line
    if not torch.cuda.is_available():  # says why the CUDA smoke test did not run
        assert "smoke test on cuda: skipped (" in proc.stdout, proc.stdout


# manylinux_2_28 (PEP 600, auditwheel's policy): the newest symbol versions a module may need from
# the system libraries, and the libraries it may need from the system at all (libgomp and the
# shared CUDA runtime are grafted into the wheel by auditwheel, renamed libgomp-<hash>.so.1).
MANYLINUX_2_28_MAX = {"GLIBC": (2, 28), "GLIBCXX": (3, 4, 24), "CXXABI": (1, 3, 11), "GCC": (7, 0, 0)}
MANYLINUX_2_28_SYSTEM_LIBS = {"libc.so.6", "libm.so.6", "libdl.so.2", "librt.so.1", "libpthread.so.0",
                              "libgcc_s.so.1", "libstdc++.so.6", "ld-linux-x86-64.so.2", "ld-linux-aarch64.so.1"}
GRAFTED_LIBS = ("libgomp.so.1", "libgomp-", "libomp.so", "libomp-", "libcudart.so.", "libcudart-")


def _version_needs(module: str) -> tuple[set[str], dict[str, set[tuple[int, ...]]]]:
    """The module's DT_NEEDED libraries and the symbol versions it references (objdump)."""
    import re

    needed = set(re.findall(r"^\s*NEEDED\s+(\S+)$", subprocess.run(
        ["objdump", "-p", module], capture_output=True, text=True, check=True).stdout, re.M))
    versions: dict[str, set[tuple[int, ...]]] = {}
    symbols = subprocess.run(["objdump", "-T", module], capture_output=True, text=True, check=True).stdout
    for line in symbols.splitlines():
        m = re.search(r"\*UND\*\s+\S+\s+\(?([A-Z]+)_([0-9][0-9.]*)\)?\s", line)
        if m:
            versions.setdefault(m.group(1), set()).add(tuple(int(p) for p in m.group(2).split(".")))
    return needed, versions


# A module that failed to load has no build facts: that must fail here, not skip.
@pytest.mark.skipif(retain.capabilities()["native"] and not retain.capabilities()["build"].get("glibc_floor"),
                    reason="no glibc floor claimed (RETAIN_PORTABLE_LINK=OFF, static CUDA runtime, or not glibc)")
@pytest.mark.skipif(shutil.which("objdump") is None and not os.environ.get("RETAIN_REQUIRE_OBJDUMP"),
                    reason="needs objdump (binutils)")
def test_native_module_runs_on_glibc_2_28():
    """Built on any newer system, the module needs nothing a manylinux_2_28 system lacks:
    csrc/common/glibc_floor.cpp and the static libstdc++ make this hold, and this checks it."""
    assert retain.capabilities()["native"], retain.capabilities()["load_error"]
    from retain import _C

    needed, versions = _version_needs(_C.__file__)
    # the forwarders call glibc's first versions (an undefined reference), never themselves
    import platform
    import re

    base = {"x86_64": "GLIBC_2.2.5", "aarch64": "GLIBC_2.17"}.get(platform.machine())
    if base:
        symbols = subprocess.run(["objdump", "-T", _C.__file__], capture_output=True, text=True, check=True).stdout
        for name in ("exp", "log", "pow"):
            assert re.search(rf"\*UND\*\s+\S+\s+\(?{re.escape(base)}\)?\s+{name}$", symbols, re.M), \
                f"{name} is not an undefined reference to {name}@{base}"
    foreign = {lib for lib in needed if lib not in MANYLINUX_2_28_SYSTEM_LIBS and not lib.startswith(GRAFTED_LIBS)}
    assert not foreign, f"needs libraries a manylinux_2_28 system does not have: {sorted(foreign)}"
    too_new = {f"{name}_{'.'.join(map(str, v))}" for name, vs in versions.items() if name in MANYLINUX_2_28_MAX
               for v in vs if v > MANYLINUX_2_28_MAX[name]}
    assert not too_new, f"symbol versions newer than manylinux_2_28 allows: {sorted(too_new)}"
    assert "libstdc++.so.6" not in needed, "RETAIN_PORTABLE_LINK links libstdc++ statically"
    assert versions.get("GLIBC"), "no GLIBC version needs parsed from objdump: the check saw nothing"


def test_retain_version_and_info_name_the_cpu():
    proc = subprocess.run([sys.executable, "-m", "retain", "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"retain {retain.__version__}", proc.stdout + proc.stderr
    info = subprocess.run([sys.executable, "-m", "retain", "info"], capture_output=True, text=True, timeout=120)
    cpu = retain.capabilities()["cpu"]
    assert f"CPU: {cpu['model']}, {cpu['cores']} cores" in info.stdout
    assert f"CPU kernels: capability {retain.cpu_capability()} (this CPU supports up to {cpu['supported']}" in info.stdout


def test_python_reads_the_native_codes_and_limits():
    """Codes and limits are defined once, in C++, and Python uses the exported ones."""
    import importlib

    from retain import _native
    from retain.ops.scan import reference as scan_ref

    scan_ops = importlib.import_module("retain.ops.scan.memory_scan")

    C = _native.lib()
    assert {str(d).replace("torch.", "") for d in _native.KERNEL_DTYPES} == set(C.dtype_codes)
    assert {str(d).replace("torch.", ""): c for d, c in _native.DTYPE_CODES.items()} == dict(C.dtype_codes)
    assert scan_ops.OBJECTIVE_CODES == dict(C.memory_scan_objectives)
    assert tuple(C.memory_scan_objectives) == scan_ref.OBJECTIVES  # the API's names are the kernel's
    assert scan_ops.GATE_CODES == dict(C.memory_scan_gate_kinds) and set(C.memory_scan_gate_kinds) == {
        "none", "head", "key"}
    # the documented CUDA head-size limit is the kernel's
    assert f"on CUDA K up to {C.memory_scan_cuda_max_k}" in " ".join(retain.ops.memory_scan.__doc__.split())
