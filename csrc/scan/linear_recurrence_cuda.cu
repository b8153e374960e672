// CUDA kernels of the scan family. linear_recurrence: one thread per (sequence, feature),
// sequential over T; neighbouring threads read neighbouring features, so every step is one
// coalesced load of a and x and one store of h. Bandwidth-bound when B*D >= ~64k lanes; a
// chunked block-level scan over T for small B*D is the next step (csrc/scan/README.md).
#include "common/cuda_utils.cuh"
#include "common/dispatch.h"
#include "common/dtype.h"
#include "scan/linear_recurrence.h"

namespace retain::scan {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void linear_recurrence_fwd_kernel(const T* __restrict__ a, const T* __restrict__ x,
                                             const T* __restrict__ initial, T* __restrict__ h, int64_t B,
                                             int64_t Tn, int64_t D, bool reverse) {
  using A = Acc<T>;
  const int64_t lane = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (lane >= B * D) return;
  const int64_t b = lane / D;
  const int64_t d = lane % D;
  A state = initial ? load_as<A>(initial[lane]) : A(0);
  for (int64_t p = 0; p < Tn; ++p) {
    const int64_t off = step_offset(b, p, Tn, D, reverse) + d;
    state = linear_step(load_as<A>(a[off]), state, load_as<A>(x[off]));
    store_as(h[off], state);
  }
}

template <typename T>
__global__ void linear_recurrence_bwd_kernel(const T* __restrict__ a, const T* __restrict__ h,
                                             const T* __restrict__ initial, const T* __restrict__ grad_h,
                                             T* __restrict__ grad_x, T* __restrict__ grad_a,
                                             T* __restrict__ grad_initial, int64_t B, int64_t Tn, int64_t D,
                                             bool reverse) {
  using A = Acc<T>;
  const int64_t lane = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (lane >= B * D) return;
  const int64_t b = lane / D;
  const int64_t d = lane % D;
  A lambda = A(0);
  A a_next = A(0);
  for (int64_t p = Tn - 1; p >= 0; --p) {
    const int64_t off = step_offset(b, p, Tn, D, reverse) + d;
    lambda = linear_step(a_next, lambda, load_as<A>(grad_h[off]));
    store_as(grad_x[off], lambda);
    a_next = load_as<A>(a[off]);
    if (grad_a) {
      A h_prev = A(0);
      if (p > 0) {
        h_prev = load_as<A>(h[step_offset(b, p - 1, Tn, D, reverse) + d]);
      } else if (initial) {
        h_prev = load_as<A>(initial[lane]);
      }
      store_as(grad_a[off], lambda * h_prev);
    }
  }
  if (grad_initial) store_as(grad_initial[lane], a_next * lambda);
}

}  // namespace

template <typename T>
void linear_recurrence_fwd_cuda(const T* a, const T* x, const T* initial, T* h, int64_t B, int64_t Tn,
                                int64_t D, bool reverse, std::uintptr_t stream) {
  const int64_t lanes = B * D;
  if (lanes == 0 || Tn == 0) return;
  linear_recurrence_fwd_kernel<T><<<static_cast<unsigned>(ceil_div(lanes, kThreads)), kThreads, 0,
                                    as_stream(stream)>>>(a, x, initial, h, B, Tn, D, reverse);
  cuda_check(cudaGetLastError(), "retain::linear_recurrence (CUDA forward)");
}

template <typename T>
void linear_recurrence_bwd_cuda(const T* a, const T* h, const T* initial, const T* grad_h, T* grad_x,
                                T* grad_a, T* grad_initial, int64_t B, int64_t Tn, int64_t D, bool reverse,
                                std::uintptr_t stream) {
  const int64_t lanes = B * D;
  if (lanes == 0) return;
  if (Tn == 0) {  // nothing depends on the initial state: its gradient is 0 (as on the CPU)
    if (grad_initial) {
      cuda_check(cudaMemsetAsync(grad_initial, 0, static_cast<size_t>(lanes) * sizeof(T), as_stream(stream)),
                 "retain::linear_recurrence (CUDA backward)");
    }
    return;
  }
  linear_recurrence_bwd_kernel<T><<<static_cast<unsigned>(ceil_div(lanes, kThreads)), kThreads, 0,
                                    as_stream(stream)>>>(a, h, initial, grad_h, grad_x, grad_a, grad_initial,
                                                         B, Tn, D, reverse);
  cuda_check(cudaGetLastError(), "retain::linear_recurrence (CUDA backward)");
}

#define RETAIN_INSTANTIATE(T)                                                                           \
  template void linear_recurrence_fwd_cuda<T>(const T*, const T*, const T*, T*, int64_t, int64_t, int64_t, \
                                              bool, std::uintptr_t);                                    \
  template void linear_recurrence_bwd_cuda<T>(const T*, const T*, const T*, const T*, T*, T*, T*, int64_t,  \
                                              int64_t, int64_t, bool, std::uintptr_t);
RETAIN_FOR_EACH_FLOATING(RETAIN_INSTANTIATE)
#undef RETAIN_INSTANTIATE

}  // namespace retain::scan
