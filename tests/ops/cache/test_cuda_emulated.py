"""cached_readout's CUDA kernels without a GPU: csrc/cache/cached_readout_cuda.cu (and the block
reduction it shares, csrc/common/cuda_rows.cuh) compiled as C++ against the fiber emulation in
tests/cuda_emu and compared with the CPU kernel (csrc/cache/cached_readout_cpu.cpp) — the forward's
y and gate scratch, the backward's six gradients and its gate and dz scratch — for every mode
(residual, gated, sparse with top_k 1, 2 and >= NS), float32, float64 and bfloat16, T not a
multiple of the segment length, extra cached states (zero gradients), one segment, L = 1, no
tokens, K or V past a block's threads, NaN router logits and gradients not asked for. Registers,
occupancy and timing need a GPU (bench/gpu_check.sh)."""

from __future__ import annotations

import pytest

from tests.cuda_emu import emulate

KERNEL = emulate.CSRC / "cache" / "cached_readout_cuda.cu"

pytestmark = pytest.mark.skipif(not emulate.available(KERNEL), reason="needs g++ and the source tree (csrc/)")


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    return emulate.build(KERNEL, emulate.EMU / "cache_harness.cpp",
                         [emulate.CSRC / "cache" / "cached_readout_cpu.cpp"], tmp_path_factory.mktemp("cache_emu"),
                         dynamic=1, static=1, launches=5)


def test_emulated_cached_readout_cuda_kernels(harness):
    emulate.run(harness)


def test_emulated_cached_readout_cuda_kernels_shuffled(harness):
    # another thread order between barriers (a race changes results), on the cases whose token
    # kernel rows run through the block reductions
    emulate.run(harness, "barriers", shuffled=True)
