// CUDA kernels of memory_scan: a fused recurrence, one block per (sequence, head, V tile), the
// K x V state in registers. Thread (column j, row group ks) owns S[i, j] (and Z[i, j]) for the KR
// rows i = r * KS + ks: column reductions over K (the error, the readout) are KS-lane shuffles,
// and the backward's row reductions over V (dq, dk, da) go through shared memory to per-tile
// partial sums that a second kernel adds in a fixed order (deterministic). The per-step math
// mirrors memory_scan_cpu.cpp; derivations and the design in csrc/scan/README.md.
#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>

#include "common/cuda_utils.cuh"
#include "common/dispatch.h"
#include "common/dtype.h"
#include "common/errors.h"
#include "scan/memory_scan.h"

namespace retain::scan {
namespace {

constexpr const char* kOp = "retain::memory_scan";
constexpr int kWarp = 32;
constexpr unsigned kFull = 0xffffffffu;
constexpr int kMaxWarps = 8;
constexpr int kFinishWarps = 8;  // rows per block of the finishing kernel (one warp per row)

// Launch geometry, owned by this file (Python asks memory_scan_cuda_work_numel for the workspace).
struct Geometry {
  int KR = 8;   // rows of S per thread
  int KS = 1;   // threads sharing a column (power of two, <= 32)
  int CPW = 32; // columns per warp
  int KP = 8;   // KR * KS >= K: rows including padding
  int W = 1;    // warps per block
  int BV = 32;  // columns per block (V tile)
  int64_t NT = 1;  // V tiles
};

Geometry geometry(int64_t K, int64_t V, int max_warps) {
  check(K >= 1 && K <= kMemoryScanCudaMaxK, kOp,
        "the CUDA kernel supports head dimension K in [1, " + std::to_string(kMemoryScanCudaMaxK) + "], got " +
            std::to_string(K));
  Geometry g;
  g.KR = K <= 64 ? 8 : (K <= 128 ? 16 : 32);
  g.KS = 1;
  while (int64_t{g.KR} * g.KS < K) g.KS *= 2;
  g.CPW = kWarp / g.KS;
  g.KP = g.KR * g.KS;
  g.W = static_cast<int>(std::min<int64_t>(max_warps, ceil_div(std::max<int64_t>(V, 1), g.CPW)));
  g.BV = g.W * g.CPW;
  g.NT = ceil_div(std::max<int64_t>(V, 1), g.BV);
  return g;
}

// Sum over the KS lanes that share a column (adjacent lanes); every lane gets the same bits.
template <typename A>
__device__ __forceinline__ A group_sum(A x, int KS) {
  for (int o = 1; o < KS; o <<= 1) x += __shfl_xor_sync(kFull, x, o);
  return x;
}

// Sum over the columns of a warp (lanes with the same row group ks).
template <typename A>
__device__ __forceinline__ A columns_sum(A x, int KS) {
  for (int o = KS; o < kWarp; o <<= 1) x += __shfl_xor_sync(kFull, x, o);
  return x;
}

// A row of the backward's per-step reductions is written by the lanes of a warp's first column.
__device__ __forceinline__ bool lane_writes(int lane, int KS) { return lane < KS; }

template <typename A>
__device__ __forceinline__ A warp_sum(A x) {
  for (int o = 1; o < kWarp; o <<= 1) x += __shfl_xor_sync(kFull, x, o);
  return x;
}

// Where this block and thread sit: sequence, head, V tile, column, row group.
template <typename T>
struct Place {
  int64_t seq, h, b, t0, t1, tile, j;
  int ks, lane, warp;
  bool live;  // j < V: ghost columns of the last tile compute on zeros and write nothing

  __device__ Place(const MemoryScanParams<T>& P, const Geometry& g) {
    lane = threadIdx.x % kWarp;
    warp = threadIdx.x / kWarp;
    ks = lane % g.KS;
    int64_t blk = blockIdx.x;
    tile = blk % g.NT;
    blk /= g.NT;
    h = blk % P.H;
    seq = blk / P.H;
    b = P.cu_seqlens ? 0 : seq;
    t0 = P.cu_seqlens ? P.cu_seqlens[seq] : 0;
    t1 = P.cu_seqlens ? P.cu_seqlens[seq + 1] : P.T;
    j = tile * g.BV + warp * g.CPW + lane / g.KS;
    live = j < P.V;
  }

  __device__ int64_t row(const MemoryScanParams<T>& P, int64_t t) const { return (b * P.T + t) * P.H + h; }
  __device__ int64_t state_offset(const MemoryScanParams<T>& P) const { return (seq * P.H + h) * P.K * P.V; }
  __device__ int64_t ckpt_offset(const MemoryScanParams<T>& P, int64_t c) const {
    const int64_t slots = (P.T + P.ckpt_every - 1) / P.ckpt_every;  // P.num_ckpt(), host-only
    return ((b * P.H + h) * slots + c) * P.K * P.V;
  }
  // Segment s of this sequence in states [B, rows, H, K, V] (as the CPU kernel's states_offset).
  __device__ int64_t states_offset(const MemoryScanParams<T>& P, int64_t s) const {
    int64_t first = 0;
    if (P.cu_seqlens) {
      for (int64_t m = 0; m < seq; ++m) first += (P.cu_seqlens[m + 1] - P.cu_seqlens[m]) / P.states_every;
    }
    return ((b * P.states_rows + first + s) * P.H + h) * P.K * P.V;
  }
};

// One step's per-row inputs staged in shared memory: raw q, raw k, a (per key) for KP rows, then
// beta, eta and the per-head a. Every thread reads its own rows; loads of the next step are issued
// before the current step's math so their latency hides behind it.
template <typename A>
struct StepBuf {
  A* q;
  A* k;
  A* a;
  A* s;  // beta, eta, a (per head or 1)
  __device__ StepBuf(A* base, int KP) : q(base), k(base + KP), a(base + 2 * KP), s(base + 3 * KP) {}
  static constexpr int scalars = 3;
  static __host__ __device__ int size(int KP) { return 3 * KP + scalars; }
};

template <typename T>
__device__ __forceinline__ Acc<T> retention(const MemoryScanParams<T>& P, Acc<T> g) {
  return P.gate_log ? std::exp(g) : g;
}

template <typename T>
__device__ void stage(const MemoryScanParams<T>& P, int64_t row, StepBuf<Acc<T>> buf, int KP) {
  using A = Acc<T>;
  const int64_t K = P.K;
  const bool per_key = static_cast<GateKind>(P.gate_kind) == GateKind::PerKey;
  const int64_t krow = P.key_row(row);
  for (int i = threadIdx.x; i < KP; i += blockDim.x) {
    const bool in = i < K;
    buf.q[i] = in ? load_as<A>(P.q[krow * K + i]) : A(0);
    buf.k[i] = in ? load_as<A>(P.k[krow * K + i]) : A(0);
    if (per_key) buf.a[i] = in ? retention(P, load_as<A>(P.g[row * K + i])) : A(1);
  }
  if (threadIdx.x == 0) {
    buf.s[0] = load_as<A>(P.beta[row]);
    buf.s[1] = P.momentum ? load_as<A>(P.eta[row]) : A(0);
    buf.s[2] = static_cast<GateKind>(P.gate_kind) == GateKind::PerHead ? retention(P, load_as<A>(P.g[row])) : A(1);
  }
}

// The normalisation factors of one step (Unit::load in the CPU kernel): q̃ = q * qscale, k̂ = k * kscale.
template <typename T, int KR>
__device__ __forceinline__ void step_scales(const MemoryScanParams<T>& P, StepBuf<Acc<T>> buf, int ks, int KS,
                                            Acc<T>& qscale, Acc<T>& kscale) {
  using A = Acc<T>;
  A q_rstd = A(1), k_rstd = A(1);
  if (P.l2norm) {
    A qs = 0, kss = 0;
#pragma unroll
    for (int r = 0; r < KR; ++r) {
      const int i = r * KS + ks;
      qs += buf.q[i] * buf.q[i];
      kss += buf.k[i] * buf.k[i];
    }
    qs = group_sum(qs, KS);
    kss = group_sum(kss, KS);
    q_rstd = A(1) / std::sqrt(qs + A(1e-6));
    k_rstd = A(1) / std::sqrt(kss + A(1e-6));
  }
  qscale = q_rstd * static_cast<A>(P.scale);
  kscale = k_rstd;
}

template <typename A>
__device__ __forceinline__ A row_gate(const StepBuf<A>& buf, bool per_key, int i) {
  return per_key ? buf.a[i] : buf.s[2];
}

// e = (r ⊙ S)ᵀ k̂ − v for this column and psi(e); 'dot': e = 0, psi = −v (Unit::error).
// S_at(r): this thread's row r of S_{t-1} (registers in the forward, the chunk buffer in the backward).
template <typename T, int KR, typename SAt>
__device__ __forceinline__ void error_psi(const MemoryScanParams<T>& P, const ObjectiveMath<Acc<T>>& obj,
                                          StepBuf<Acc<T>> buf, const SAt& S_at, Acc<T> kscale, Acc<T> v,
                                          int ks, int KS, Acc<T>& e, Acc<T>& psi) {
  using A = Acc<T>;
  if (static_cast<Objective>(P.objective) == Objective::Dot) {
    e = A(0);
    psi = -v;
    return;
  }
  const bool per_key = static_cast<GateKind>(P.gate_kind) == GateKind::PerKey;
  A part = 0;
#pragma unroll
  for (int r = 0; r < KR; ++r) {
    const int i = r * KS + ks;
    const A kr = buf.k[i] * kscale * (P.retention_first ? row_gate(buf, per_key, i) : A(1));
    part += S_at(r) * kr;
  }
  e = group_sum(part, KS) - v;
  psi = obj.psi(e);
}

template <typename A, int KR>
__device__ __forceinline__ void load_rows(A (&x)[KR], const A* src, int64_t K, int64_t V, int64_t j, bool live,
                                          int ks, int KS) {
#pragma unroll
  for (int r = 0; r < KR; ++r) {
    const int64_t i = int64_t{r} * KS + ks;
    x[r] = (src && live && i < K) ? src[i * V + j] : A(0);
  }
}

template <typename A, int KR>
__device__ __forceinline__ void store_rows(A* dst, const A (&x)[KR], int64_t K, int64_t V, int64_t j, bool live,
                                           int ks, int KS) {
  if (!live) return;
#pragma unroll
  for (int r = 0; r < KR; ++r) {
    const int64_t i = int64_t{r} * KS + ks;
    if (i < K) dst[i * V + j] = x[r];
  }
}

// S ← a ⊙ S + Z with Z ← η Z − β k̂ ψ (no momentum: Z = −β k̂ ψ); returns this thread's part of
// o = Sᵀ q̃ (Unit::update_rows).
template <typename T, int KR>
__device__ __forceinline__ Acc<T> update(const MemoryScanParams<T>& P, StepBuf<Acc<T>> buf, Acc<T> (&S)[KR],
                                         Acc<T> (&Z)[KR], Acc<T> psi, Acc<T> qscale, Acc<T> kscale, int ks, int KS) {
  using A = Acc<T>;
  const bool per_key = static_cast<GateKind>(P.gate_kind) == GateKind::PerKey;
  const A beta = buf.s[0], eta = buf.s[1];
  A acc = 0;
#pragma unroll
  for (int r = 0; r < KR; ++r) {
    const int i = r * KS + ks;
    const A c = -beta * (buf.k[i] * kscale);
    A z;
    if (P.momentum) {
      z = eta * Z[r] + c * psi;
      Z[r] = z;
    } else {
      z = c * psi;
    }
    S[r] = row_gate(buf, per_key, i) * S[r] + z;
    acc += S[r] * (buf.q[i] * qscale);
  }
  return acc;
}

template <typename T, int KR>
__global__ void __launch_bounds__(kMaxWarps * kWarp) memory_scan_fwd_kernel(const MemoryScanParams<T> P, Geometry g) {
  using A = Acc<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* smem = reinterpret_cast<A*>(smem_raw);
  const Place<T> pl(P, g);
  const int KS = g.KS, ks = pl.ks;
  const int64_t K = P.K, V = P.V, C = P.ckpt_every, L = P.states_every;
  const ObjectiveMath<A> obj{P.objective, P.p, P.delta, P.eps};
  const int sb = StepBuf<A>::size(g.KP);
  auto bufs = [&](int64_t parity) { return StepBuf<A>(smem + (parity & 1) * sb, g.KP); };

  A S[KR], Z[KR];
  const int64_t so = pl.state_offset(P);
  load_rows(S, P.initial_S ? P.initial_S + so : nullptr, K, V, pl.j, pl.live, ks, KS);
  load_rows(Z, (P.momentum && P.initial_Z) ? P.initial_Z + so : nullptr, K, V, pl.j, pl.live, ks, KS);

  A v_next = A(0);
  if (pl.t0 < pl.t1) {
    const int64_t r0 = pl.row(P, pl.t0);
    stage(P, r0, bufs(0), g.KP);
    v_next = pl.live ? load_as<A>(P.v[r0 * V + pl.j]) : A(0);
  }
  __syncthreads();
  for (int64_t t = pl.t0; t < pl.t1; ++t) {
    const StepBuf<A> buf = bufs(t - pl.t0);
    const int64_t row = pl.row(P, t);
    const A v = v_next;
    if (t + 1 < pl.t1) {
      const int64_t rn = pl.row(P, t + 1);
      stage(P, rn, bufs(t + 1 - pl.t0), g.KP);
      v_next = pl.live ? load_as<A>(P.v[rn * V + pl.j]) : A(0);
    }
    if (P.ckpt_S && t % C == 0) {  // slot t / C is written by the sequence holding step t
      store_rows(P.ckpt_S + pl.ckpt_offset(P, t / C), S, K, V, pl.j, pl.live, ks, KS);
      if (P.momentum) store_rows(P.ckpt_Z + pl.ckpt_offset(P, t / C), Z, K, V, pl.j, pl.live, ks, KS);
    }
    A qscale, kscale, e, psi;
    step_scales<T, KR>(P, buf, ks, KS, qscale, kscale);
    error_psi<T, KR>(P, obj, buf, [&](int r) { return S[r]; }, kscale, v, ks, KS, e, psi);
    const A o = group_sum(update<T, KR>(P, buf, S, Z, psi, qscale, kscale, ks, KS), KS);
    if (pl.live && ks == 0) store_as(P.o[row * V + pl.j], o);
    if (L > 0 && (t - pl.t0 + 1) % L == 0) {
      store_rows(P.states + pl.states_offset(P, (t - pl.t0 + 1) / L - 1), S, K, V, pl.j, pl.live, ks, KS);
    }
    __syncthreads();  // the next step's buffer is complete; this one may be overwritten
  }
  if (P.final_S) store_rows(P.final_S + so, S, K, V, pl.j, pl.live, ks, KS);
  if (P.final_Z && P.momentum) store_rows(P.final_Z + so, Z, K, V, pl.j, pl.live, ks, KS);
}

// Offsets into the backward's float workspace (its size: memory_scan_cuda_work_numel, asked by Python).
struct WorkLayout {
  int64_t q = 0, k = 0, a = 0, beta = 0, eta = 0, scratch = 0, per_block = 0, total = 0;
};

WorkLayout work_layout(const Geometry& g, int64_t B, int64_t T, int64_t H, int64_t K, int64_t N, int64_t C,
                       bool momentum, bool need_da) {
  WorkLayout w;
  const int64_t R = B * T * H, rows = g.NT * R;
  w.q = 0;
  w.k = w.q + rows * K;
  w.a = w.k + rows * K;
  w.beta = w.a + (need_da ? rows * K : 0);
  w.eta = w.beta + rows;
  w.scratch = w.eta + (momentum ? rows : 0);
  w.per_block = std::min(C, T) * g.KR * g.W * kWarp * (momentum ? 2 : 1);
  w.total = w.scratch + N * H * g.NT * w.per_block;
  return w;
}

template <typename T, int KR>
__global__ void __launch_bounds__(kMaxWarps * kWarp)
    memory_scan_bwd_kernel(const MemoryScanParams<T> P, const MemoryScanGrads<T> G, Acc<T>* __restrict__ work,
                           WorkLayout wl, Geometry g, bool need_da) {
  using A = Acc<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* smem = reinterpret_cast<A*>(smem_raw);
  const Place<T> pl(P, g);
  const int KS = g.KS, ks = pl.ks, KP = g.KP, W = g.W;
  const int64_t K = P.K, V = P.V, C = P.ckpt_every, L = P.states_every, R = P.B * P.T * P.H;
  const bool momentum = P.momentum;
  const bool dot = static_cast<Objective>(P.objective) == Objective::Dot;
  const bool per_key = static_cast<GateKind>(P.gate_kind) == GateKind::PerKey;
  const ObjectiveMath<A> obj{P.objective, P.p, P.delta, P.eps};
  const int sb = StepBuf<A>::size(KP);
  auto bufs = [&](int64_t parity) { return StepBuf<A>(smem + (parity & 1) * sb, KP); };
  // per-warp row sums of dq̃, dk̂, da [3][W][KP], then dβ, dη [2][W]
  A* red = smem + 2 * sb;
  A* red_s = red + 3 * W * KP;
  // this block's recomputed states: slot i holds S (then Z) before step cs + i, [KR][threads] each
  const int nthr = blockDim.x;
  A* scratch = work + wl.scratch + static_cast<int64_t>(blockIdx.x) * wl.per_block;
  const int64_t slot = int64_t{KR} * nthr * (momentum ? 2 : 1);

  A dS[KR], dZ[KR];
  const int64_t so = pl.state_offset(P);
  load_rows(dS, G.grad_final_S ? G.grad_final_S + so : nullptr, K, V, pl.j, pl.live, ks, KS);
  load_rows(dZ, (momentum && G.grad_final_Z) ? G.grad_final_Z + so : nullptr, K, V, pl.j, pl.live, ks, KS);

  int64_t ce = pl.t1;
  while (ce > pl.t0) {
    const int64_t cs = std::max(pl.t0, ((ce - 1) / C) * C);
    const int64_t len = ce - cs;
    // recompute the chunk from its checkpoint (or the initial state), keeping S_{t-1}, Z_{t-1}
    A S[KR], Z[KR];
    if (cs == pl.t0) {
      load_rows(S, P.initial_S ? P.initial_S + so : nullptr, K, V, pl.j, pl.live, ks, KS);
      load_rows(Z, (momentum && P.initial_Z) ? P.initial_Z + so : nullptr, K, V, pl.j, pl.live, ks, KS);
    } else {
      load_rows(S, P.ckpt_S + pl.ckpt_offset(P, cs / C), K, V, pl.j, pl.live, ks, KS);
      load_rows(Z, momentum ? P.ckpt_Z + pl.ckpt_offset(P, cs / C) : nullptr, K, V, pl.j, pl.live, ks, KS);
    }
    A v_next = A(0);
    {
      const int64_t r0 = pl.row(P, cs);
      stage(P, r0, bufs(0), KP);
      v_next = pl.live ? load_as<A>(P.v[r0 * V + pl.j]) : A(0);
    }
    __syncthreads();
    for (int64_t i = 0; i < len; ++i) {
      const StepBuf<A> buf = bufs(i);
      const A v = v_next;
      if (i + 1 < len) {
        const int64_t rn = pl.row(P, cs + i + 1);
        stage(P, rn, bufs(i + 1), KP);
        v_next = pl.live ? load_as<A>(P.v[rn * V + pl.j]) : A(0);
      }
      A* sl = scratch + i * slot + threadIdx.x;
#pragma unroll
      for (int r = 0; r < KR; ++r) {
        sl[r * nthr] = S[r];
        if (momentum) sl[(KR + r) * nthr] = Z[r];
      }
      A qscale, kscale, e, psi;
      step_scales<T, KR>(P, buf, ks, KS, qscale, kscale);
      error_psi<T, KR>(P, obj, buf, [&](int r) { return S[r]; }, kscale, v, ks, KS, e, psi);
      update<T, KR>(P, buf, S, Z, psi, qscale, kscale, ks, KS);
      __syncthreads();
    }
    // walk the chunk backwards (bwd_unit in the CPU kernel)
    A v_prev = A(0), go_prev = A(0);
    {
      const int64_t r0 = pl.row(P, ce - 1);
      stage(P, r0, bufs(0), KP);
      v_prev = pl.live ? load_as<A>(P.v[r0 * V + pl.j]) : A(0);
      go_prev = pl.live ? load_as<A>(G.grad_o[r0 * V + pl.j]) : A(0);
    }
    __syncthreads();
    for (int64_t i = len - 1; i >= 0; --i) {
      const int64_t t = cs + i;
      const int64_t row = pl.row(P, t);
      const StepBuf<A> buf = bufs(len - 1 - i);
      const A v = v_prev, go = go_prev;
      if (i > 0) {
        const int64_t rp = pl.row(P, t - 1);
        stage(P, rp, bufs(len - i), KP);
        v_prev = pl.live ? load_as<A>(P.v[rp * V + pl.j]) : A(0);
        go_prev = pl.live ? load_as<A>(G.grad_o[rp * V + pl.j]) : A(0);
      }
      // S_{t-1} and Z_{t-1} of this thread's rows, read where used (not held across the w reduction)
      const A* sl = scratch + i * slot + threadIdx.x;
      auto Sp = [&](int r) { return sl[r * nthr]; };
      auto Zp = [&](int r) { return momentum ? sl[(KR + r) * nthr] : A(0); };
      if (L > 0 && G.grad_states && (t - pl.t0 + 1) % L == 0) {
        const A* gs = G.grad_states + pl.states_offset(P, (t - pl.t0 + 1) / L - 1);
#pragma unroll
        for (int r = 0; r < KR; ++r) {
          const int64_t i2 = int64_t{r} * KS + ks;
          if (pl.live && i2 < K) dS[r] += gs[i2 * V + pl.j];
        }
      }
      A qscale, kscale, e, psi;
      step_scales<T, KR>(P, buf, ks, KS, qscale, kscale);
      error_psi<T, KR>(P, obj, buf, Sp, kscale, v, ks, KS, e, psi);
      const A beta = buf.s[0], eta = buf.s[1];
      // pass A: S_t (recomputed), dS += q̃ gᵀ, dq̃ = S_t g, dZ_t = dS + dZ, dη, w = dZ_tᵀ k̂
      A w_part = 0, deta = 0;
#pragma unroll
      for (int r = 0; r < KR; ++r) {
        const int i2 = r * KS + ks;
        const A ki = buf.k[i2] * kscale;
        const A c = -beta * ki;
        const A z = momentum ? eta * Zp(r) + c * psi : c * psi;
        const A s_t = row_gate(buf, per_key, i2) * Sp(r) + z;
        dS[r] += buf.q[i2] * qscale * go;
        const A dq = columns_sum(pl.live ? s_t * go : A(0), KS);
        if (lane_writes(pl.lane, KS)) red[(0 * W + pl.warp) * KP + i2] = dq;
        const A d = momentum ? dS[r] + dZ[r] : dS[r];
        if (momentum) deta += d * Zp(r);
        w_part += d * ki;
      }
      const A w = group_sum(w_part, KS);
      // psi's gradient, beta's, and through psi(e) to e and v
      const A dpsi = -beta * w;
      const A dbeta = -psi * w;
      const A de = dot ? A(0) : obj.dpsi(e) * dpsi;
      if (pl.live && ks == 0) store_as(G.grad_v[row * V + pl.j], dot ? -dpsi : -de);
      // pass B: dZ_t again (dS and dZ are unchanged since pass A), the carry dZ ← η dZ_t, and
      // back to S_{t-1}, k̂ and a
#pragma unroll
      for (int r = 0; r < KR; ++r) {
        const int i2 = r * KS + ks;
        const A ai = row_gate(buf, per_key, i2);
        const A ki = buf.k[i2] * kscale;
        const A rk = P.retention_first ? ai : A(1);
        const A sp = Sp(r);
        const A d = momentum ? dS[r] + dZ[r] : dS[r];
        if (momentum) dZ[r] = eta * d;
        const A sd = sp * de;
        const A dk = columns_sum(pl.live ? -beta * d * psi + rk * sd : A(0), KS);
        if (lane_writes(pl.lane, KS)) red[(1 * W + pl.warp) * KP + i2] = dk;
        if (need_da) {
          const A da = columns_sum(pl.live ? dS[r] * sp + (P.retention_first ? ki * sd : A(0)) : A(0), KS);
          if (lane_writes(pl.lane, KS)) red[(2 * W + pl.warp) * KP + i2] = da;
        }
        dS[r] = ai * dS[r] + rk * ki * de;
      }
      const A wb = warp_sum(pl.live && ks == 0 ? dbeta : A(0));
      const A we = warp_sum(pl.live ? deta : A(0));
      if (pl.lane == 0) {
        red_s[0 * W + pl.warp] = wb;
        red_s[1 * W + pl.warp] = we;
      }
      __syncthreads();
      // this tile's partial sums for step t, warps added in order
      for (int i2 = threadIdx.x; i2 < K; i2 += nthr) {
        A sq = 0, sk = 0, sa = 0;
        for (int ww = 0; ww < W; ++ww) {
          sq += red[(0 * W + ww) * KP + i2];
          sk += red[(1 * W + ww) * KP + i2];
          if (need_da) sa += red[(2 * W + ww) * KP + i2];
        }
        const int64_t off = (pl.tile * R + row) * K + i2;
        work[wl.q + off] = sq;
        work[wl.k + off] = sk;
        if (need_da) work[wl.a + off] = sa;
      }
      if (threadIdx.x == 0) {
        A sbeta = 0, seta = 0;
        for (int ww = 0; ww < W; ++ww) sbeta += red_s[ww], seta += red_s[W + ww];
        work[wl.beta + pl.tile * R + row] = sbeta;
        if (momentum) work[wl.eta + pl.tile * R + row] = seta;
      }
      __syncthreads();
    }
    ce = cs;
  }
  if (G.grad_initial_S) store_rows(G.grad_initial_S + so, dS, K, V, pl.j, pl.live, ks, KS);
  if (G.grad_initial_Z && momentum) store_rows(G.grad_initial_Z + so, dZ, K, V, pl.j, pl.live, ks, KS);
}

// Gradients of one step's inputs from the tiles' partial sums, one warp per (token, head) row:
// tiles added in order, then through the l2norm, the scale and the gate (end of bwd_unit).
template <typename T>
__global__ void __launch_bounds__(kFinishWarps * kWarp)
    memory_scan_finish_kernel(const MemoryScanParams<T> P, const MemoryScanGrads<T> G,
                              const Acc<T>* __restrict__ work, WorkLayout wl, int64_t NT, bool need_da) {
  using A = Acc<T>;
  const int64_t R = P.B * P.T * P.H, K = P.K;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kFinishWarps + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= R) return;  // whole warps leave together
  auto tiles = [&](int64_t base, int64_t i) {
    A s = 0;
    for (int64_t tl = 0; tl < NT; ++tl) s += work[base + (tl * R + row) * K + i];
    return s;
  };
  const T* qp = P.q + P.key_row(row) * K;
  const T* kp = P.k + P.key_row(row) * K;
  A q_rstd = A(1), k_rstd = A(1), qdot = 0, kdot = 0, da_sum = 0;
  if (P.l2norm) {
    A qs = 0, kss = 0, qd = 0, kd = 0;
    for (int64_t i = lane; i < K; i += kWarp) {
      const A qn = load_as<A>(qp[i]), kn = load_as<A>(kp[i]);
      qs += qn * qn;
      kss += kn * kn;
      qd += qn * tiles(wl.q, i);
      kd += kn * tiles(wl.k, i);
    }
    qs = warp_sum(qs);
    kss = warp_sum(kss);
    q_rstd = A(1) / std::sqrt(qs + A(1e-6));
    k_rstd = A(1) / std::sqrt(kss + A(1e-6));
    // ⟨q̂, dq̃⟩ with q̂ = q * rstd
    qdot = warp_sum(qd) * q_rstd;
    kdot = warp_sum(kd) * k_rstd;
  }
  const bool per_key = static_cast<GateKind>(P.gate_kind) == GateKind::PerKey;
  for (int64_t i = lane; i < K; i += kWarp) {
    A dq = tiles(wl.q, i), dk = tiles(wl.k, i);
    if (P.l2norm) {
      dq = q_rstd * (dq - load_as<A>(qp[i]) * q_rstd * qdot);
      dk = k_rstd * (dk - load_as<A>(kp[i]) * k_rstd * kdot);
    }
    store_as(G.grad_q[row * K + i], dq * static_cast<A>(P.scale));
    store_as(G.grad_k[row * K + i], dk);
    if (need_da) {
      const A da = tiles(wl.a, i);
      if (per_key) {
        const A a = retention(P, load_as<A>(P.g[row * K + i]));
        store_as(G.grad_g[row * K + i], da * (P.gate_log ? a : A(1)));
      } else {
        da_sum += da;
      }
    }
  }
  if (need_da && !per_key) {
    da_sum = warp_sum(da_sum);
    if (lane == 0) {
      const A a = retention(P, load_as<A>(P.g[row]));
      store_as(G.grad_g[row], da_sum * (P.gate_log ? a : A(1)));
    }
  }
  if (lane == 0) {
    A sbeta = 0, seta = 0;
    for (int64_t tl = 0; tl < NT; ++tl) {
      sbeta += work[wl.beta + tl * R + row];
      if (P.momentum) seta += work[wl.eta + tl * R + row];
    }
    store_as(G.grad_beta[row], sbeta);
    if (G.grad_eta) store_as(G.grad_eta[row], P.momentum ? seta : A(0));
  }
}

template <typename Kernel>
void allow_smem(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024) {
    cuda_check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
               "retain::memory_scan (CUDA shared memory)");
  }
}

int multiprocessors() {
  int dev = 0, sms = 0;
  cuda_check(cudaGetDevice(&dev), "retain::memory_scan (cudaGetDevice)");
  cuda_check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev),
             "retain::memory_scan (multiprocessor count)");
  return std::max(sms, 1);
}

template <typename T, int KR>
void launch_fwd(const MemoryScanParams<T>& P, Geometry g, cudaStream_t stream) {
  using A = Acc<T>;
  const size_t smem = 2 * StepBuf<A>::size(g.KP) * sizeof(A);
  auto kernel = memory_scan_fwd_kernel<T, KR>;
  allow_smem(kernel, smem);
  const int64_t blocks = P.N * P.H * g.NT;
  kernel<<<static_cast<unsigned>(blocks), g.W * kWarp, smem, stream>>>(P, g);
  cuda_check(cudaGetLastError(), "retain::memory_scan (CUDA forward)");
}

template <typename T, int KR>
void launch_bwd(const MemoryScanParams<T>& P, const MemoryScanGrads<T>& G, Acc<T>* work, const WorkLayout& wl,
                Geometry g, bool need_da, cudaStream_t stream) {
  using A = Acc<T>;
  const size_t smem = (2 * StepBuf<A>::size(g.KP) + 3 * g.W * g.KP + 2 * g.W) * sizeof(A);
  auto kernel = memory_scan_bwd_kernel<T, KR>;
  allow_smem(kernel, smem);
  const int64_t blocks = P.N * P.H * g.NT;
  kernel<<<static_cast<unsigned>(blocks), g.W * kWarp, smem, stream>>>(P, G, work, wl, g, need_da);
  cuda_check(cudaGetLastError(), "retain::memory_scan (CUDA backward)");
}

template <typename F>
void with_rows_per_thread(int KR, F&& f) {
  switch (KR) {
    case 8: f(std::integral_constant<int, 8>{}); break;
    case 16: f(std::integral_constant<int, 16>{}); break;
    default: f(std::integral_constant<int, 32>{}); break;
  }
}

}  // namespace

template <typename T>
void memory_scan_fwd_cuda(const MemoryScanParams<T>& P, std::uintptr_t stream) {
  if (P.N * P.H == 0) return;
  check(P.ckpt_every > 0 || !P.ckpt_S, kOp, "checkpoints need ckpt_every > 0");
  Geometry g = geometry(P.K, P.V, kMaxWarps);
  // fewer warps per block when that leaves SMs idle: more, smaller V tiles (no partial sums here)
  const int sms = multiprocessors();
  while (g.W > 1 && P.N * P.H * g.NT < 2 * sms) {
    g = geometry(P.K, P.V, (g.W + 1) / 2);
  }
  check(P.N * P.H * g.NT <= 0x7fffffff, kOp, "too many (sequence, head, V tile) blocks for one launch");
  with_rows_per_thread(g.KR, [&](auto kr) { launch_fwd<T, decltype(kr)::value>(P, g, as_stream(stream)); });
}

int64_t memory_scan_cuda_work_numel(int64_t B, int64_t T, int64_t H, int64_t K, int64_t V, int64_t N, int64_t C,
                                    bool momentum, bool need_da) {
  const Geometry g = geometry(K, V, kMaxWarps);
  return work_layout(g, B, T, H, K, N, std::max<int64_t>(C, 1), momentum, need_da).total;
}

template <typename T>
void memory_scan_bwd_cuda(const MemoryScanParams<T>& P, const MemoryScanGrads<T>& G, Acc<T>* work,
                          int64_t work_numel, std::uintptr_t stream) {
  if (P.N * P.H == 0) return;
  check(P.ckpt_every > 0, kOp, "the backward needs ckpt_every > 0");
  const Geometry g = geometry(P.K, P.V, kMaxWarps);
  const bool need_da = G.grad_g != nullptr && static_cast<GateKind>(P.gate_kind) != GateKind::None;
  const WorkLayout wl = work_layout(g, P.B, P.T, P.H, P.K, P.N, P.ckpt_every, P.momentum, need_da);
  check(work_numel >= wl.total, kOp,
        "the CUDA backward's workspace holds " + std::to_string(work_numel) + " values, it needs " +
            std::to_string(wl.total));
  check(work || wl.total == 0, kOp, "the CUDA backward's workspace must not be a null pointer");
  check(P.N * P.H * g.NT <= 0x7fffffff, kOp, "too many (sequence, head, V tile) blocks for one launch");
  const cudaStream_t s = as_stream(stream);
  with_rows_per_thread(g.KR, [&](auto kr) { launch_bwd<T, decltype(kr)::value>(P, G, work, wl, g, need_da, s); });
  const int64_t R = P.B * P.T * P.H;
  if (R == 0) return;
  const int64_t blocks = ceil_div(R, kFinishWarps);
  check(blocks <= 0x7fffffff, kOp, "too many (token, head) rows for one launch");
  memory_scan_finish_kernel<T><<<static_cast<unsigned>(blocks), kFinishWarps * kWarp, 0, s>>>(P, G, work, wl, g.NT,
                                                                                             need_da);
  cuda_check(cudaGetLastError(), "retain::memory_scan (CUDA backward, gradients of the inputs)");
}

#define RETAIN_INSTANTIATE(T)                                                                              \
  template void memory_scan_fwd_cuda<T>(const MemoryScanParams<T>&, std::uintptr_t);                       \
  template void memory_scan_bwd_cuda<T>(const MemoryScanParams<T>&, const MemoryScanGrads<T>&, Acc<T>*,     \
                                        int64_t, std::uintptr_t);
RETAIN_FOR_EACH_FLOATING(RETAIN_INSTANTIATE)
#undef RETAIN_INSTANTIATE

}  // namespace retain::scan
