// Launchers of the scan family. Contiguous [B, T, D] tensors, raw pointers, int64 sizes.
// initial / grad_a / grad_initial may be null (no initial state, gradient not wanted).
#pragma once

#include <cstdint>

#include "common/cpu_capability.h"

namespace retain::scan {

// CPU launchers: one build per CPU capability C (call through retain::cpu_dispatch).
template <CpuCapability C, typename T>
void linear_recurrence_fwd_cpu(const T* a, const T* x, const T* initial, T* h, int64_t B, int64_t Tn,
                               int64_t D, bool reverse, int nthreads);

template <CpuCapability C, typename T>
void linear_recurrence_bwd_cpu(const T* a, const T* h, const T* initial, const T* grad_h, T* grad_x,
                               T* grad_a, T* grad_initial, int64_t B, int64_t Tn, int64_t D, bool reverse,
                               int nthreads);

#ifdef RETAIN_WITH_CUDA
template <typename T>
void linear_recurrence_fwd_cuda(const T* a, const T* x, const T* initial, T* h, int64_t B, int64_t Tn,
                                int64_t D, bool reverse, std::uintptr_t stream);

template <typename T>
void linear_recurrence_bwd_cuda(const T* a, const T* h, const T* initial, const T* grad_h, T* grad_x,
                                T* grad_a, T* grad_initial, int64_t B, int64_t Tn, int64_t D, bool reverse,
                                std::uintptr_t stream);
#endif

}  // namespace retain::scan

#include "scan/memory_scan.h"

namespace retain::scan {

template <CpuCapability C, typename T>
void memory_scan_fwd_cpu(const MemoryScanParams<T>& P, int nthreads);

template <CpuCapability C, typename T>
void memory_scan_bwd_cpu(const MemoryScanParams<T>& P, const MemoryScanGrads<T>& G, int nthreads);

#ifdef RETAIN_WITH_CUDA
template <typename T>
void memory_scan_fwd_cuda(const MemoryScanParams<T>& P, std::uintptr_t stream);

// The backward takes a float workspace (Acc<T>) of memory_scan_cuda_work_numel(...) values:
// per-V-tile partial sums of the row reductions and one chunk of recomputed states per block.
template <typename T>
void memory_scan_bwd_cuda(const MemoryScanParams<T>& P, const MemoryScanGrads<T>& G, Acc<T>* work,
                          int64_t work_numel, std::uintptr_t stream);

int64_t memory_scan_cuda_work_numel(int64_t B, int64_t T, int64_t H, int64_t K, int64_t V, int64_t N, int64_t C,
                                    bool momentum, bool need_da);
#endif

}  // namespace retain::scan
