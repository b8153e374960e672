"""The replay family's CUDA kernels without a GPU: csrc/replay/{segment_tree,rows}_cuda.cu compiled
as C++ against the fiber emulation in tests/cuda_emu and compared with the CPU kernels — sum and
min tree updates bit for bit over the whole tree after every batch (repeated indices, whose last
occurrence wins through the atomicMax election, batches past the block size, capacities 1 ... 1025
that are and are not powers of two, the owner scratch restored to -1), sampling's indices and
probabilities bit for bit (stratified and i.i.d., zero priorities), and row gathers and scatters
over fields of 1 ... 12288 bytes on the 16-byte and the byte path. Timing needs a GPU
(bench/gpu_check.sh)."""

from __future__ import annotations

import pytest

from tests.cuda_emu import emulate

OPS = ["segment_tree", "rows"]
KERNEL = [emulate.CSRC / "replay" / f"{op}_cuda.cu" for op in OPS]

pytestmark = pytest.mark.skipif(not emulate.available(KERNEL), reason="needs g++ and the source tree (csrc/)")


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    cpu = [emulate.CSRC / "replay" / f"{op}_cpu.cpp" for op in OPS]
    return emulate.build(KERNEL, emulate.EMU / "replay_harness.cpp", cpu, tmp_path_factory.mktemp("replay_emu"),
                         dynamic=0, static=0, launches=3)


def test_emulated_replay_cuda_kernels(harness):
    emulate.run(harness)
    emulate.run(harness, shuffled=True)
