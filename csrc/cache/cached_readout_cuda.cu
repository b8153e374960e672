// CUDA kernels of the cached readout (csrc/cache/README.md): the CPU kernel's math
// (cached_readout_cpu.cpp) with one owner per output and every sum in a fixed order, so results
// do not depend on timing (no atomics).
//   gates:   a thread per (b, h, t): the cached logits <u_t, c_i> (i < sr = min(s, NS)) into the
//            token's row of the gate scratch [B, H, T, NR + 1], then token_gates in place (the
//            CPU's selection and softmax, cached_readout.h); columns sr .. NR-1 kNotRead, column
//            NR the online gate.
//   readout: a thread per y element (b, t, h, v): gamma_o o + sum over the read states of
//            gamma_i (S_i^T scale q)[v] (residual: o + the sum over i < sr).
//   tokens:  a block per (b, h, t) row (grid-stride), threads striding over k: w_i = S_i dy per
//            read state, dq accumulated in shared memory, dgate_i = <scale q, w_i> by the
//            deterministic block reduction (common/cuda_rows.cuh), then one thread's softmax
//            backward into the token's dz row [B, H, T, NR], and du, d online_keys, dq, do.
//   states:  a thread per dstates element (b, i, h, k, v) and per dseg_keys element (b, i, h, k),
//            each summing over the tokens that read state i, in token order (0 for i >= NR).
// Gated mode with NR = 0 (one segment) reads no cached state: the gate scratch may be null and
// the online gate (1, or NaN for a non-finite logit) is computed where it is used.
#include <algorithm>
#include <cstdint>

#include "cache/cached_readout.h"
#include "common/cuda_rows.cuh"
#include "common/cuda_utils.cuh"
#include "common/dispatch.h"
#include "common/dtype.h"
#include "common/errors.h"

namespace retain::cache {
namespace {

constexpr const char* kOp = "retain::cached_readout";
constexpr int kThreads = 128;
constexpr int64_t kMaxBlocks = int64_t{1} << 16;  // grid-stride beyond: int64 sizes work

unsigned elementwise_blocks(int64_t n) { return static_cast<unsigned>(std::min(ceil_div(n, kThreads), kMaxBlocks)); }

RETAIN_HOST_DEVICE RETAIN_FORCE_INLINE int64_t read_count(int64_t t, int64_t L, int64_t NS) {
  const int64_t s = t / L;
  return s < NS ? s : NS;
}

template <typename A, typename T>
__device__ A dot_as(const T* __restrict__ x, const T* __restrict__ y, int64_t n) {
  A s = 0;
  for (int64_t i = 0; i < n; ++i) s += load_as<A>(x[i]) * load_as<A>(y[i]);
  return s;
}

// The online gate of a token that reads no cached state (NR = 0): token_gates over none.
template <typename A, typename T>
__device__ A lone_online_gate(const ReadoutArgs<T>& a, int64_t tok) {
  const A zo = dot_as<A>(a.u + tok * a.K, a.online_keys + tok * a.K, a.K);
  return token_gates<A>(nullptr, 0, 0, zo);
}

template <typename A>
struct SumPart {
  A s;
  __device__ static SumPart identity() { return {A(0)}; }
  __device__ static SumPart combine(const SumPart& x, const SumPart& y) { return {x.s + y.s}; }
  __device__ SumPart down(int off) const { return {__shfl_down_sync(kFullMask, s, off)}; }
};

// Row r = (b * H + h) * T + t of the gate scratch: the token's gates over its sr readable states.
template <typename T>
__global__ void gates_kernel(ReadoutArgs<T> a, int64_t NR, int64_t top_k, Acc<T>* __restrict__ gates) {
  using A = Acc<T>;
  const int64_t rows = a.B * a.H * a.steps, K = a.K;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < rows; r += stride) {
    const int64_t t = r % a.steps, h = (r / a.steps) % a.H, b = r / (a.steps * a.H);
    const int64_t sr = read_count(t, a.L, a.NS);
    const int64_t tok = (b * a.steps + t) * a.H + h;
    const T* u = a.u + tok * K;
    A* z = gates + r * (NR + 1);
    for (int64_t i = 0; i < sr; ++i) z[i] = dot_as<A>(u, a.seg_keys + ((b * a.NS + i) * a.H + h) * K, K);
    const A go = token_gates(z, sr, top_k, dot_as<A>(u, a.online_keys + tok * K, K));
    for (int64_t i = sr; i < NR; ++i) z[i] = A(kNotRead);
    z[NR] = go;
  }
}

// y element e = ((b * T + t) * H + h) * V + v.
template <typename T>
__global__ void readout_kernel(ReadoutArgs<T> a, int64_t NR, const Acc<T>* __restrict__ gates, T* __restrict__ y) {
  using A = Acc<T>;
  const int64_t K = a.K, V = a.V, n = a.B * a.steps * a.H * V;
  const A scale = static_cast<A>(a.scale);
  const bool residual = a.mode == static_cast<int>(ReadoutMode::Residual);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += stride) {
    const int64_t v = e % V, tok = e / V;
    const int64_t h = tok % a.H, t = (tok / a.H) % a.steps, b = tok / (a.H * a.steps);
    const int64_t sr = read_count(t, a.L, a.NS);
    const T* q = a.q + tok * K;
    const T* S = a.states + (b * a.NS * a.H + h) * K * V + v;  // S_i[k, v] = S[i * H K V + k V]
    const int64_t state_step = a.H * K * V;
    A acc = load_as<A>(a.o[e]);
    if (residual) {
      if (sr > 0) {
        for (int64_t k = 0; k < K; ++k) {
          A p = 0;
          for (int64_t i = 0; i < sr; ++i) p += load_as<A>(S[i * state_step + k * V]);
          acc += scale * load_as<A>(q[k]) * p;
        }
      }
    } else {
      const A* g = NR > 0 ? gates + ((b * a.H + h) * a.steps + t) * (NR + 1) : nullptr;
      acc *= NR > 0 ? g[NR] : lone_online_gate<A>(a, tok);
      for (int64_t i = 0; i < sr; ++i) {
        const A gam = g[i];
        if (gam == A(kNotRead)) continue;
        const T* Si = S + i * state_step;
        A w = 0;
        for (int64_t k = 0; k < K; ++k) w += gam * (scale * load_as<A>(q[k])) * load_as<A>(Si[k * V]);
        acc += w;
      }
    }
    store_as(y[e], acc);
  }
}

// One block per row r = (b * H + h) * T + t. Dynamic shared memory: dq's accumulator [K], the
// row's dy [V] and the online logit's gradient [1] (thread 0 to all).
template <typename T>
__global__ void token_bwd_kernel(ReadoutArgs<T> a, ReadoutGrads<T> g, int64_t NR, const Acc<T>* __restrict__ gates,
                                 Acc<T>* __restrict__ dz) {
  using A = Acc<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int64_t K = a.K, V = a.V, rows = a.B * a.H * a.steps;
  A* acc = reinterpret_cast<A*>(smem_raw);
  A* dys = acc + K;
  A* dzo_slot = dys + V;
  const A scale = static_cast<A>(a.scale);
  const bool residual = a.mode == static_cast<int>(ReadoutMode::Residual);
  // the gate gradients are needed for du, d online_keys and the state pass's dseg_keys
  const bool need_dz = !residual && (g.du || g.donline_keys || g.dseg_keys);
  const int64_t tid = threadIdx.x, nt = blockDim.x, state_step = a.H * K * V;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t t = r % a.steps, h = (r / a.steps) % a.H, b = r / (a.steps * a.H);
    const int64_t sr = read_count(t, a.L, a.NS);
    const int64_t tok = (b * a.steps + t) * a.H + h;
    const T* q = a.q + tok * K;
    const T* S = a.states + (b * a.NS * a.H + h) * K * V;  // S_i = S + i * state_step, [K, V]
    for (int64_t v = tid; v < V; v += nt) dys[v] = load_as<A>(g.dy[tok * V + v]);
    for (int64_t k = tid; k < K; k += nt) acc[k] = A(0);
    __syncthreads();
    if (residual) {  // dq = scale (sum_i S_i) dy, do = dy
      if (g.dq) {
        for (int64_t k = tid; k < K; k += nt) {
          A s = 0;
          if (sr > 0) {
            for (int64_t v = 0; v < V; ++v) {
              A p = 0;
              for (int64_t i = 0; i < sr; ++i) p += load_as<A>(S[i * state_step + k * V + v]);
              s += dys[v] * p;
            }
          }
          store_as(g.dq[tok * K + k], scale * s);
        }
      }
      if (g.d_o)
        for (int64_t v = tid; v < V; v += nt) store_as(g.d_o[tok * V + v], dys[v]);
      __syncthreads();  // dys is the next row's
      continue;
    }
    const A* gr = NR > 0 ? gates + r * (NR + 1) : nullptr;
    A* dzr = NR > 0 ? dz + r * NR : nullptr;
    const A go = NR > 0 ? gr[NR] : lone_online_gate<A>(a, tok);
    if (g.dq || need_dz) {
      // w_i = S_i dy; dq += gamma_i w_i; dgate_i = <scale q, w_i> (into dz's row until the softmax)
      for (int64_t i = 0; i < sr; ++i) {
        const A gam = gr[i];
        if (gam == A(kNotRead)) continue;  // the same for every thread of the block
        const T* Si = S + i * state_step;
        A part = 0;
        for (int64_t k = tid; k < K; k += nt) {
          A w = 0;
          for (int64_t v = 0; v < V; ++v) w += dys[v] * load_as<A>(Si[k * V + v]);
          part += scale * load_as<A>(q[k]) * w;
          acc[k] += gam * w;
        }
        if (need_dz) {
          const A dgate = block_reduce(SumPart<A>{part}).s;
          if (tid == 0) dzr[i] = dgate;
        }
      }
    }
    if (need_dz) {
      A part = 0;
      for (int64_t v = tid; v < V; v += nt) part += dys[v] * load_as<A>(a.o[tok * V + v]);
      const A dgo = block_reduce(SumPart<A>{part}).s;
      if (tid == 0) {  // softmax: dz_j = gamma_j (dgate_j - sum_k gamma_k dgate_k)
        A mean = go * dgo;
        for (int64_t i = 0; i < sr; ++i)
          if (gr[i] != A(kNotRead)) mean += gr[i] * dzr[i];
        for (int64_t i = 0; i < sr; ++i) dzr[i] = gr[i] != A(kNotRead) ? gr[i] * (dzr[i] - mean) : A(0);
        for (int64_t i = sr; i < NR; ++i) dzr[i] = A(0);
        dzo_slot[0] = go * (dgo - mean);
      }
      __syncthreads();  // dz's row and dzo_slot written
      const A dzo = dzo_slot[0];
      const T* u = a.u + tok * K;
      const T* ok = a.online_keys + tok * K;
      const T* c = a.seg_keys + (b * a.NS * a.H + h) * K;  // c_i = c + i * H K
      for (int64_t k = tid; k < K; k += nt) {
        if (g.du) {
          A d = dzo * load_as<A>(ok[k]);
          for (int64_t i = 0; i < sr; ++i)
            if (gr[i] != A(kNotRead)) d += dzr[i] * load_as<A>(c[i * a.H * K + k]);
          store_as(g.du[tok * K + k], d);
        }
        if (g.donline_keys) store_as(g.donline_keys[tok * K + k], dzo * load_as<A>(u[k]));
      }
    }
    if (g.dq)
      for (int64_t k = tid; k < K; k += nt) store_as(g.dq[tok * K + k], scale * acc[k]);
    if (g.d_o)
      for (int64_t v = tid; v < V; v += nt) store_as(g.d_o[tok * V + v], go * dys[v]);
    __syncthreads();  // acc, dys and dzo_slot are the next row's
  }
}

// dstates element e = (((b * NS + i) * H + h) * K + k) * V + v: sum over the tokens t >= (i + 1) L
// that read state i of gamma_ti scale q_t[k] dy_t[v] (residual: gamma = 1, every such token).
template <typename T>
__global__ void dstates_kernel(ReadoutArgs<T> a, const T* __restrict__ dy, int64_t NR,
                               const Acc<T>* __restrict__ gates, T* __restrict__ dstates) {
  using A = Acc<T>;
  const int64_t K = a.K, V = a.V, n = a.B * a.NS * a.H * K * V;
  const A scale = static_cast<A>(a.scale);
  const bool residual = a.mode == static_cast<int>(ReadoutMode::Residual);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += stride) {
    const int64_t v = e % V, k = (e / V) % K, h = (e / (V * K)) % a.H, i = (e / (V * K * a.H)) % a.NS;
    const int64_t b = e / (V * K * a.H * a.NS);
    A acc = 0;
    if (i < NR) {
      const A* gcol = residual ? nullptr : gates + (b * a.H + h) * a.steps * (NR + 1) + i;
      for (int64_t t = (i + 1) * a.L; t < a.steps; ++t) {
        const int64_t tok = (b * a.steps + t) * a.H + h;
        A qs = scale * load_as<A>(a.q[tok * K + k]);
        if (!residual) {
          const A gam = gcol[t * (NR + 1)];
          if (gam == A(kNotRead)) continue;
          qs = gam * qs;
        }
        acc += qs * load_as<A>(dy[tok * V + v]);
      }
    }
    store_as(dstates[e], acc);
  }
}

// dseg_keys element e = ((b * NS + i) * H + h) * K + k: sum over the tokens reading state i of
// dz_ti u_t[k] (gated and sparse modes).
template <typename T>
__global__ void dseg_keys_kernel(ReadoutArgs<T> a, int64_t NR, const Acc<T>* __restrict__ gates,
                                 const Acc<T>* __restrict__ dz, T* __restrict__ dseg_keys) {
  using A = Acc<T>;
  const int64_t K = a.K, n = a.B * a.NS * a.H * K;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += stride) {
    const int64_t k = e % K, h = (e / K) % a.H, i = (e / (K * a.H)) % a.NS, b = e / (K * a.H * a.NS);
    A acc = 0;
    if (i < NR) {
      const int64_t row0 = (b * a.H + h) * a.steps;
      for (int64_t t = (i + 1) * a.L; t < a.steps; ++t) {
        if (gates[(row0 + t) * (NR + 1) + i] == A(kNotRead)) continue;
        const int64_t tok = (b * a.steps + t) * a.H + h;
        acc += dz[(row0 + t) * NR + i] * load_as<A>(a.u[tok * K + k]);
      }
    }
    store_as(dseg_keys[e], acc);
  }
}

// The sparse selection's k (0: every state); the gated mode reads every state.
template <typename T>
int64_t selection_k(const ReadoutArgs<T>& a) {
  return a.mode == static_cast<int>(ReadoutMode::Sparse) ? a.top_k : 0;
}

template <typename T>
void launch_gates(const ReadoutArgs<T>& a, int64_t NR, Acc<T>* gates, cudaStream_t s) {
  check(gates != nullptr, kOp, "the CUDA kernels' gate scratch must not be a null pointer");
  gates_kernel<T><<<elementwise_blocks(a.B * a.H * a.steps), kThreads, 0, s>>>(a, NR, selection_k(a), gates);
  cuda_check(cudaGetLastError(), "retain::cached_readout (CUDA gates)");
}

}  // namespace

template <typename T>
void cached_readout_fwd_cuda(const ReadoutArgs<T>& a, T* y, Acc<T>* gates, std::uintptr_t stream) {
  const int64_t n = a.B * a.steps * a.H * a.V;
  if (n == 0) return;
  const cudaStream_t s = as_stream(stream);
  const int64_t NR = num_read(a.steps, a.L, a.NS);
  if (a.mode != static_cast<int>(ReadoutMode::Residual) && NR > 0) launch_gates(a, NR, gates, s);
  readout_kernel<T><<<elementwise_blocks(n), kThreads, 0, s>>>(a, NR, gates, y);
  cuda_check(cudaGetLastError(), "retain::cached_readout (CUDA forward)");
}

template <typename T>
void cached_readout_bwd_cuda(const ReadoutArgs<T>& a, const ReadoutGrads<T>& g, Acc<T>* gates, Acc<T>* dz,
                             std::uintptr_t stream) {
  using A = Acc<T>;
  const cudaStream_t s = as_stream(stream);
  const bool residual = a.mode == static_cast<int>(ReadoutMode::Residual);
  const int64_t NR = num_read(a.steps, a.L, a.NS), rows = a.B * a.H * a.steps;
  const bool scratch = !residual && NR > 0 && rows > 0;
  const bool need_dz = !residual && (g.du || g.donline_keys || g.dseg_keys);
  if (scratch) {
    check(dz != nullptr || !need_dz, kOp, "the CUDA backward's dz scratch must not be a null pointer");
    if (g.dstates || g.dq || need_dz || g.d_o) launch_gates(a, NR, gates, s);
  }
  if (rows > 0 && (g.dq || g.d_o || need_dz)) {
    const size_t smem = static_cast<size_t>(a.K + a.V + 1) * sizeof(A);
    auto kernel = token_bwd_kernel<T>;
    if (smem > 48 * 1024) {
      cuda_check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
                 "retain::cached_readout (CUDA shared memory)");
    }
    kernel<<<row_blocks(rows), row_threads(a.K > a.V ? a.K : a.V), smem, s>>>(a, g, NR, gates, dz);
    cuda_check(cudaGetLastError(), "retain::cached_readout (CUDA backward, tokens)");
  }
  if (g.dstates) {
    const int64_t n = a.B * a.NS * a.H * a.K * a.V;
    if (n > 0) {
      dstates_kernel<T><<<elementwise_blocks(n), kThreads, 0, s>>>(a, g.dy, NR, gates, g.dstates);
      cuda_check(cudaGetLastError(), "retain::cached_readout (CUDA backward, states)");
    }
  }
  if (!residual && g.dseg_keys) {
    const int64_t n = a.B * a.NS * a.H * a.K;
    if (n > 0) {
      dseg_keys_kernel<T><<<elementwise_blocks(n), kThreads, 0, s>>>(a, NR, gates, dz, g.dseg_keys);
      cuda_check(cudaGetLastError(), "retain::cached_readout (CUDA backward, segment keys)");
    }
  }
}

#define RETAIN_INSTANTIATE(T)                                                                               \
  template void cached_readout_fwd_cuda<T>(const ReadoutArgs<T>&, T*, Acc<T>*, std::uintptr_t);             \
  template void cached_readout_bwd_cuda<T>(const ReadoutArgs<T>&, const ReadoutGrads<T>&, Acc<T>*, Acc<T>*, \
                                           std::uintptr_t);
RETAIN_FOR_EACH_FLOATING(RETAIN_INSTANTIATE)
#undef RETAIN_INSTANTIATE

}  // namespace retain::cache
