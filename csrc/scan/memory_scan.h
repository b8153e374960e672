// memory_scan, one online-gradient step of a K x V memory per token: the per-step math and the
// parameters shared by the CPU kernel (memory_scan_cpu.cpp) and the CUDA kernels
// (memory_scan_cuda.cu), and their launchers (DESIGN.md "scan"; derivations in
// csrc/scan/README.md).
#pragma once

#include <cmath>
#include <cstdint>

#include "common/cpu_capability.h"
#include "common/dtype.h"
#include "common/host_device.h"

namespace retain::scan {

// Codes Python passes (exported by scan/bind.cpp as retain._C.memory_scan_objectives / _gate_kinds,
// keyed by the names below, which are the Python API's).
enum class Objective : int { Dot = 0, L2 = 1, Lp = 2, Huber = 3 };
enum class GateKind : int { None = 0, PerHead = 1, PerKey = 2 };

inline const char* objective_name(Objective o) {
  switch (o) {
    case Objective::Dot: return "dot";
    case Objective::L2: return "l2";
    case Objective::Lp: return "lp";
    case Objective::Huber: return "huber";
  }
  return "unknown";
}
// g's layout: absent, [B, T, H] (one retention per head) or [B, T, H, K] (per key row of S).
inline const char* gate_kind_name(GateKind g) {
  switch (g) {
    case GateKind::None: return "none";
    case GateKind::PerHead: return "head";
    case GateKind::PerKey: return "key";
  }
  return "unknown";
}

// Largest K the CUDA kernel takes (KR <= 32 rows of a column per thread, KS <= 8 threads per
// column); exported as retain._C.memory_scan_cuda_max_k, which python/retain/ops/scan/memory_scan.py
// checks first.
constexpr int64_t kMemoryScanCudaMaxK = 256;

// The attentional-bias gradient psi(e) of each objective and its derivative d psi / d e.
// 'dot' has no error term (psi = -v): callers handle it before reaching these.
template <typename A>
struct ObjectiveMath {
  int objective;
  A p, delta, eps;

  RETAIN_HOST_DEVICE RETAIN_FORCE_INLINE A psi(A e) const {
    switch (static_cast<Objective>(objective)) {
      case Objective::Lp: {
        // smooth p * sign(e) |e|^(p-1) = p * e * (e^2 + eps)^((p-2)/2)
        return p * e * pow_(e * e + eps, (p - A(2)) / A(2));
      }
      case Objective::Huber: return e > delta ? delta : (e < -delta ? -delta : e);
      default: return e;
    }
  }

  RETAIN_HOST_DEVICE RETAIN_FORCE_INLINE A dpsi(A e) const {
    switch (static_cast<Objective>(objective)) {
      case Objective::Lp: {
        // d/de [p e (e^2+eps)^m] = p (e^2+eps)^(m-1) ((2m+1) e^2 + eps), m = (p-2)/2
        const A s = e * e + eps;
        const A m = (p - A(2)) / A(2);
        return p * pow_(s, m - A(1)) * ((A(2) * m + A(1)) * e * e + eps);
      }
      case Objective::Huber: return (e > delta || e < -delta) ? A(0) : A(1);
      default: return A(1);
    }
  }

  RETAIN_HOST_DEVICE static RETAIN_FORCE_INLINE A pow_(A x, A y) { return std::pow(x, y); }
};

template <typename Scalar>
struct MemoryScanParams {
  using A = Acc<Scalar>;
  // inputs, contiguous: q, k [B,T,HK,K]; v [B,T,H,V]; beta, eta [B,T,H]; g [B,T,H] or [B,T,H,K].
  // The gates are read in the accumulation type (float32 for 16-bit data: transformers and fla
  // pass float32 gates with bfloat16 q, k, v).
  const Scalar* q = nullptr;
  const Scalar* k = nullptr;
  const Scalar* v = nullptr;
  const A* beta = nullptr;
  const A* g = nullptr;
  const A* eta = nullptr;
  const A* initial_S = nullptr;  // [N,H,K,V] or null (zeros)
  const A* initial_Z = nullptr;  // [N,H,K,V] or null (zeros), momentum only
  const int64_t* cu_seqlens = nullptr;  // [N+1] or null (then N == B)
  // outputs
  Scalar* o = nullptr;          // [B,T,H,V]
  A* final_S = nullptr;    // [N,H,K,V] or null
  A* final_Z = nullptr;    // [N,H,K,V] or null
  A* states = nullptr;     // [B, T/L, H, K, V] or null (S after every L-th step of a sequence)
  A* ckpt_S = nullptr;     // [B, H, NC, K, V]: S before step c*C, for the backward
  A* ckpt_Z = nullptr;
  int64_t B = 0, T = 0, H = 0, K = 0, V = 0, N = 0;
  int64_t HK = 0;  // heads of q and k (0: H); grouped value heads: H = r * HK, value head h reads key head h / r
  int64_t states_every = 0, states_rows = 0, ckpt_every = 0;  // states [B, states_rows, H, K, V]
  A scale = A(1), p = A(3), delta = A(1), eps = A(1e-6);
  int objective = 1, gate_kind = 0;
  bool l2norm = false, retention_first = false;
  bool momentum = false;  // eta given (its pointer is null when there are no tokens)
  bool gate_log = true;  // g is log a_t (a_t = exp(g)); false: g is a_t itself (Titans' 1 - alpha)

  int64_t num_ckpt() const { return ckpt_every > 0 ? (T + ckpt_every - 1) / ckpt_every : 0; }
  // The row of q and k ([B*T*HK]) that value row r ([B*T*H], head r % H) reads.
  RETAIN_HOST_DEVICE int64_t key_row(int64_t r) const {
    const int64_t hk = HK > 0 ? HK : H;
    return hk == H ? r : (r / H) * hk + (r % H) / (H / hk);
  }
};

template <typename Scalar>
struct MemoryScanGrads {
  using A = Acc<Scalar>;
  const Scalar* grad_o = nullptr;          // [B,T,H,V]
  const A* grad_final_S = nullptr;    // [N,H,K,V] or null
  const A* grad_final_Z = nullptr;
  const A* grad_states = nullptr;     // like states, or null
  Scalar* grad_q = nullptr;  // [B,T,H,K]: one row per value head (the caller sums a key head's group)
  Scalar* grad_k = nullptr;
  Scalar* grad_v = nullptr;
  A* grad_beta = nullptr;     // gate gradients in the accumulation type, as the gates
  A* grad_g = nullptr;   // null when g is absent or its gradient is not wanted
  A* grad_eta = nullptr;
  A* grad_initial_S = nullptr;
  A* grad_initial_Z = nullptr;
};

// Launchers. CPU: one build per CPU capability C (call through retain::cpu_dispatch).
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
