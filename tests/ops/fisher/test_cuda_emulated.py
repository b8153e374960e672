"""The fisher family's CUDA kernels without a GPU: csrc/fisher/*_cuda.cu (with the chunk table and
the block reduction they share, fisher/tensor_table.cuh and common/cuda_rows.cuh) compiled as C++
against the fiber emulation in tests/cuda_emu and compared with the CPU kernels — every state
update, the rank-1 projections and their per-chunk partials, the penalty's sums and gradient, SI —
for float32, float64 and 16-bit data with float32 and float64 state, on lists with an empty
tensor, a scalar and tensors around the chunk boundaries. Timing needs a GPU (bench/gpu_check.sh)."""

from __future__ import annotations

import pytest

from tests.cuda_emu import emulate

OPS = ["grad_moments", "rank1_dots", "ewc_penalty", "si_importance"]
KERNEL = [emulate.CSRC / "fisher" / f"{op}_cuda.cu" for op in OPS]

pytestmark = pytest.mark.skipif(not emulate.available(KERNEL), reason="needs g++ and the source tree (csrc/)")


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    cpu = [emulate.CSRC / "fisher" / f"{op}_cpu.cpp" for op in OPS]
    return emulate.build(KERNEL, emulate.EMU / "fisher_harness.cpp", cpu, tmp_path_factory.mktemp("fisher_emu"),
                         dynamic=0, static=1, launches=8)


def test_emulated_fisher_cuda_kernels(harness):
    emulate.run(harness)
    emulate.run(harness, shuffled=True)
