"""The margin family's CUDA kernels (tm_loss, kl_imitation, feature_imitation) without a GPU:
csrc/margin/{tm_loss,kl_imitation,feature_imitation}_cuda.cu (and the block reduction they share,
csrc/common/cuda_rows.cuh) compiled as C++ against the fiber emulation in tests/cuda_emu and
compared with the CPU kernels — row sums and violation counts, losses and log-sum-exps, every
gradient — for float32, float64 and 16-bit inputs, int8 and packed labels, per-sample thresholds,
masks, -inf reference logits, and row lengths around every block size (1 ... 700). Registers,
occupancy and timing need a GPU (bench/gpu_check.sh)."""

from __future__ import annotations

import pytest

from tests.cuda_emu import emulate

OPS = ["tm_loss", "kl_imitation", "feature_imitation"]
KERNEL = [emulate.CSRC / "margin" / f"{op}_cuda.cu" for op in OPS]

pytestmark = pytest.mark.skipif(not emulate.available(KERNEL), reason="needs g++ and the source tree (csrc/)")


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    cpu = [emulate.CSRC / "margin" / f"{op}_cpu.cpp" for op in OPS]
    return emulate.build(KERNEL, emulate.EMU / "margin_harness.cpp", cpu, tmp_path_factory.mktemp("margin_emu"),
                         dynamic=0, static=1, launches=8)


def test_emulated_margin_cuda_kernels(harness):
    emulate.run(harness)
    emulate.run(harness, shuffled=True)
