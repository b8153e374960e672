// Build facts of the CUDA side, so csrc/module.cpp needs no CUDA headers.
#include <cuda_runtime_api.h>

#include "common/cuda_info.h"

namespace retain {

int cuda_runtime_version() { return CUDART_VERSION; }

}  // namespace retain
