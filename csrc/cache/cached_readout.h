// cached_readout, memory caching's readout of the online memory and the cached segment states:
// the per-token gate math shared by the CPU kernels (cached_readout_cpu.cpp) and the CUDA kernels
// (cached_readout_cuda.cu), and their launchers. Derivation and kernel design: csrc/cache/README.md.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/cpu_capability.h"
#include "common/dtype.h"
#include "common/host_device.h"

namespace retain::cache {

// Codes Python passes (exported by cache/bind.cpp as retain._C.cached_readout_modes, keyed by the
// Python API's names; 'soup' computes as 'gated': for linear memories they are the same readout).
enum class ReadoutMode : int { Residual = 0, Gated = 1, Sparse = 2 };

// A gate entry of a cached state the token does not read (later segment, not in its top_k).
constexpr double kNotRead = -1.0;

// The arguments of one call. q, u, online_keys [B, T, H, K]; states [B, NS, H, K, V]; seg_keys
// [B, NS, H, K]; o [B, T, H, V]; u, seg_keys, online_keys are null in residual mode. Token t of
// segment s = t / L reads the states i < min(s, NS); top_k <= 0 reads every one (sparse).
template <typename T>
struct ReadoutArgs {
  const T* q;
  const T* u;
  const T* states;
  const T* seg_keys;
  const T* o;
  const T* online_keys;
  int64_t B, steps, H, K, V, NS, L;
  int mode;
  int64_t top_k;
  double scale;
};

// The backward's incoming gradient and outputs, each [the input's shape] (null: not wanted; the
// state and segment-key gradients are written for every i < NS, 0 where nothing reads state i).
template <typename T>
struct ReadoutGrads {
  const T* dy;
  T* dq;
  T* du;
  T* dstates;
  T* dseg_keys;
  T* d_o;
  T* donline_keys;
};

// Segments of the sequence, and the number of cached states any token reads (the last segment's
// min(s, NS)): the gate scratch's width.
RETAIN_HOST_DEVICE RETAIN_FORCE_INLINE int64_t num_segments(int64_t steps, int64_t L) { return (steps + L - 1) / L; }
RETAIN_HOST_DEVICE RETAIN_FORCE_INLINE int64_t num_read(int64_t steps, int64_t L, int64_t NS) {
  const int64_t last = num_segments(steps, L) - 1;
  return last < 0 ? 0 : (last < NS ? last : NS);
}

// True when (a, i) ranks before (b, j) in the sparse selection's order: larger logit first, NaN
// above every number (as torch.topk), ties to the lower segment.
template <typename A>
RETAIN_HOST_DEVICE RETAIN_FORCE_INLINE bool ranks_before(A a, int64_t i, A b, int64_t j) {
  const bool an = a != a, bn = b != b;
  if (an || bn) return an && bn ? i < j : an;
  if (a != b) return a > b;
  return i < j;
}

// The gates of one token from its logits: z[i] (i < n) the cached ones, z_online the online one.
// Selects the top_k cached ones (all when top_k <= 0 or >= n; k passes, each taking the best after
// the previous pick in ranks_before's order, so no marks are kept), then writes the softmax over
// the selected ones and the online one in place: z[i] = gamma_i, or kNotRead for one not selected.
// Returns gamma_online. A NaN logit among them makes every gate NaN (the max propagates it).
template <typename A>
RETAIN_HOST_DEVICE inline A token_gates(A* z, int64_t n, int64_t top_k, A z_online) {
  int64_t last = -1;  // the k-th pick: everything ranking up to it is selected
  const bool all = top_k <= 0 || top_k >= n;
  if (!all) {
    for (int64_t pass = 0; pass < top_k; ++pass) {
      int64_t best = -1;
      for (int64_t i = 0; i < n; ++i) {
        if (last >= 0 && !ranks_before(z[last], last, z[i], i)) continue;
        if (best < 0 || ranks_before(z[i], i, z[best], best)) best = i;
      }
      last = best;
    }
  }
  const A zl = last >= 0 ? z[last] : A(0);
  auto read = [&](int64_t i) { return all || i == last || ranks_before(z[i], i, zl, last); };
  A mx = z_online;  // NaN once any selected logit is: every gate below is then NaN
  for (int64_t i = 0; i < n; ++i) {
    if (read(i) && (z[i] > mx || z[i] != z[i])) mx = z[i];
  }
  A total = std::exp(z_online - mx);
  for (int64_t i = 0; i < n; ++i) {
    if (read(i)) {
      z[i] = std::exp(z[i] - mx);  // in [0, 1] or NaN from here on, never kNotRead
      total += z[i];
    } else {
      z[i] = A(kNotRead);
    }
  }
  const A inv = A(1) / total;
  for (int64_t i = 0; i < n; ++i) {
    if (z[i] != A(kNotRead)) z[i] *= inv;
  }
  return std::exp(z_online - mx) * inv;
}

// Whether the CPU backward of a gated or sparse readout over `heads` = B H heads runs fused on
// nthreads threads (one pass per head, each segment's rows read once): when the heads alone keep
// the threads evenly busy. Else a token pass over (b, h, segment) units fills the gates and dz
// scratch and a state pass re-reads the rows. The results are the same bits either way.
inline bool cpu_backward_fused(int64_t heads, int nthreads) {
  const int64_t nt = nthreads > 1 ? nthreads : 1;
  return heads % nt == 0 || heads >= 4 * nt;
}

// CPU launchers (one build per CPU capability C; call through retain::cpu_dispatch).
// Forward: y [B, T, H, V].
template <CpuCapability C, typename T>
void cached_readout_fwd_cpu(const ReadoutArgs<T>& a, T* y, int nthreads);

// Backward: the gradients of a's inputs from dy. gates [B, H, T, NR + 1] and dz [B, H, T, NR]
// (NR = num_read, Acc<T>) are scratch the token pass fills and the state pass reads (unused in
// residual mode and when the backward runs fused).
template <CpuCapability C, typename T>
void cached_readout_bwd_cpu(const ReadoutArgs<T>& a, const ReadoutGrads<T>& g, Acc<T>* gates, Acc<T>* dz,
                            int nthreads);

#ifdef RETAIN_WITH_CUDA
// CUDA launchers: the same outputs, every pointer in device memory, enqueued on `stream`; the
// forward also takes the gates scratch (filled by one kernel, read by the next; unused in residual
// mode).
template <typename T>
void cached_readout_fwd_cuda(const ReadoutArgs<T>& a, T* y, Acc<T>* gates, std::uintptr_t stream);

template <typename T>
void cached_readout_bwd_cuda(const ReadoutArgs<T>& a, const ReadoutGrads<T>& g, Acc<T>* gates, Acc<T>* dz,
                             std::uintptr_t stream);
#endif

}  // namespace retain::cache
