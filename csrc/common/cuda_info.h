#pragma once

namespace retain {

// CUDART_VERSION the kernels were compiled against (e.g. 13000); defined only in CUDA builds.
int cuda_runtime_version();

}  // namespace retain
