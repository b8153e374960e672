// CPU kernels of the cached readout (csrc/cache/README.md). The forward and the backward's token
// pass run one segment at a time: the segment's rows of q, u, o, dy are read once into scratch, the
// gates come first (they depend on u and the summaries only, not on the readouts), and each cached
// state then meets the rows that read it in one small matrix product — the [B, T, NS, H, V]
// per-segment readouts are never formed. The state gradients are summed per (b, h), either fused
// with the token pass (one unit per head) or in a second pass (cpu_backward_fused). Every output
// has one owner, summed in a fixed order: results do not depend on the thread count.
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cache/cached_readout.h"
#include "common/buffer.h"
#include "common/cpu_capability.h"
#include "common/dispatch.h"
#include "common/dtype.h"
#include "common/parallel.h"
#include "common/vec.h"

namespace retain::cache {
namespace {

template <typename A>
using VA = typename Vec<A>::type;

// Scratch rows are padded to whole vectors (zeros past the end), so the products need no tails.
template <typename A>
int64_t padded(int64_t n) {
  return (n + kLanes<A> - 1) / kLanes<A> * kLanes<A>;
}

// C[R rows, NV vectors] += A[R, p] B[p, NV vectors]: a register tile (R x NV accumulators), a(r, k) =
// a[r * asr + k * ask].
template <int R, int NV, typename A>
RETAIN_FORCE_INLINE void tile(int64_t p, const A* __restrict a, int64_t asr, int64_t ask, const A* __restrict b,
                              int64_t ldb, A* __restrict c, int64_t ldc) {
  constexpr int64_t W = kLanes<A>;
  VA<A> acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = vload(c + r * ldc + v * W);
  for (int64_t k = 0; k < p; ++k) {
    VA<A> bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = vload(b + k * ldb + v * W);
    for (int r = 0; r < R; ++r) {
      const A s = a[r * asr + k * ask];
      for (int v = 0; v < NV; ++v) acc[r][v] += s * bv[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) vstore(c + r * ldc + v * W, acc[r][v]);
}

// The register tile: kTileRows x kTileVecs accumulators, plus one row of B and the broadcast, fit
// the capability's registers (4 x 4 of 32 with AVX-512; 6 x 2 of 16 with AVX2 / SSE2, where 4 x 4
// spilled an accumulator to the stack on every step and ran at half speed).
constexpr int kTileVecs = kVecRegisters >= 32 ? 4 : 2;
constexpr int kTileRows = kVecRegisters >= 32 ? 4 : 6;

// The rows of a column block: whole tiles of kTileRows, then one tile of the rows left (R counts down
// to it at compile time).
template <int NV, int R = kTileRows, typename A>
RETAIN_FORCE_INLINE void tile_rows(int64_t m, int64_t p, const A* a, int64_t asr, int64_t ask, const A* b,
                                   int64_t ldb, A* c, int64_t ldc) {
  if constexpr (R == kTileRows) {
    int64_t r = 0;
    for (; r + R <= m; r += R) tile<R, NV>(p, a + r * asr, asr, ask, b, ldb, c + r * ldc, ldc);
    a += r * asr, c += r * ldc, m -= r;
  }
  if constexpr (R > 1) {
    if (m == R - 1) tile<R - 1, NV>(p, a, asr, ask, b, ldb, c, ldc);
    else tile_rows<NV, R - 1>(m, p, a, asr, ask, b, ldb, c, ldc);
  }
}

// A column block of nv <= NV vectors (NV counts down to it at compile time).
template <int NV, typename A>
RETAIN_FORCE_INLINE void column_block(int64_t nv, int64_t m, int64_t p, const A* a, int64_t asr, int64_t ask,
                                      const A* b, int64_t ldb, A* c, int64_t ldc) {
  if constexpr (NV > 1) {
    if (nv < NV) return column_block<NV - 1>(nv, m, p, a, asr, ask, b, ldb, c, ldc);
  }
  tile_rows<NV>(m, p, a, asr, ask, b, ldb, c, ldc);
}

// C[m, n] += A[m, p] B[p, n] with n a multiple of the vector width (padded scratch), B and C
// row-major: panels of kPanel rows of B, column blocks of kTileVecs vectors, row tiles of kTileRows.
// A panel's column block (64 rows of at most 4 vectors: 16 KiB of floats) stays in L1 while every
// row tile reads it; the state products run over a whole segment's tokens (p = L) and would
// otherwise stream B from L2 once per row tile.
constexpr int64_t kPanel = 64;
template <typename A>
void gemm_acc(int64_t m, int64_t n, int64_t p, const A* a, int64_t asr, int64_t ask, const A* b, int64_t ldb, A* c,
              int64_t ldc) {
  constexpr int64_t W = kLanes<A>;
  for (int64_t k0 = 0; k0 < p; k0 += kPanel) {
    const int64_t pk = std::min(kPanel, p - k0);
    const A *ak = a + k0 * ask, *bk = b + k0 * ldb;
    for (int64_t j = 0; j < n; j += kTileVecs * W)
      column_block<kTileVecs>(std::min<int64_t>(kTileVecs, (n - j) / W), m, pk, ak, asr, ask, bk + j, ldb, c + j,
                              ldc);
  }
}

template <typename A>
RETAIN_FORCE_INLINE A dot(const A* __restrict x, const A* __restrict y, int64_t n) {
  A s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += x[i] * y[i];
  return s;
}

// rows [m, n] of a [.., n] tensor whose consecutive rows are `stride` apart, into padded scratch.
template <typename A, typename T>
void load_rows(const T* src, int64_t stride, int64_t m, int64_t n, A mul, A* dst, int64_t ld) {
  for (int64_t r = 0; r < m; ++r)
    for (int64_t j = 0; j < n; ++j) dst[r * ld + j] = mul * load_as<A>(src[r * stride + j]);
}
template <typename A, typename T>
void store_rows(const A* src, int64_t ld, int64_t m, int64_t n, A mul, T* dst, int64_t stride) {
  for (int64_t r = 0; r < m; ++r)
    for (int64_t j = 0; j < n; ++j) store_as(dst[r * stride + j], mul * src[r * ld + j]);
}

// The shapes of a call in the layouts' strides.
template <typename T>
struct Layout {
  int64_t K, V, Kp, Vp, L, NS, NR, nseg, tok_k, tok_v, state_b, state_i, key_b, key_i;
  explicit Layout(const ReadoutArgs<T>& a) {
    using A = Acc<T>;
    K = a.K, V = a.V, Kp = padded<A>(K), Vp = padded<A>(V), L = a.L, NS = a.NS;
    NR = num_read(a.steps, L, NS), nseg = num_segments(a.steps, L);
    tok_k = a.H * K, tok_v = a.H * V;  // one token's step in q, u / o, y
    state_i = a.H * K * V, state_b = NS * state_i, key_i = a.H * K, key_b = NS * key_i;
  }
  int64_t q_at(int64_t b, int64_t t, int64_t h, int64_t steps) const { return (b * steps + t) * tok_k + h * K; }
  int64_t o_at(int64_t b, int64_t t, int64_t h, int64_t steps) const { return (b * steps + t) * tok_v + h * V; }
  int64_t s_at(int64_t b, int64_t i, int64_t h) const { return b * state_b + i * state_i + h * K * V; }
  int64_t c_at(int64_t b, int64_t i, int64_t h) const { return b * key_b + i * key_i + h * K; }
};

// The cached states as the products read them, in the accumulation type with padded rows:
// S_i [K, ld] (the forward) or S_i^T [V, ld] (the backward's products with dy). Float states whose
// rows are whole vectors are read in place; others are converted once per call, not once per
// segment that reads them.
template <typename T>
struct StateMatrices {
  using A = Acc<T>;
  Buffer<A> copy;
  const A* base = nullptr;
  int64_t ld = 0, per_state = 0;

  StateMatrices(const ReadoutArgs<T>& a, const Layout<T>& lay, bool transposed, int nthreads) {
    const int64_t rows = transposed ? lay.V : lay.K, cols = transposed ? lay.K : lay.V;
    if constexpr (std::is_same_v<T, A>) {
      if (!transposed && lay.V == lay.Vp) {
        base = a.states, ld = lay.V, per_state = lay.K * lay.V;
        return;
      }
    }
    ld = padded<A>(cols), per_state = rows * ld;
    const int64_t n = a.B * lay.NS * a.H;  // (b, i, h) in the states' own order
    copy.resize(n * per_state);
    A* out = copy.data();
    parallel_for(n, lay.K * lay.V, nthreads, [&](int64_t u0, int64_t u1) {
      for (int64_t unit = u0; unit < u1; ++unit) {
        const T* S = a.states + unit * lay.K * lay.V;
        A* d = out + unit * per_state;
        for (int64_t k = 0; k < lay.K; ++k)
          for (int64_t v = 0; v < lay.V; ++v) (transposed ? d[v * ld + k] : d[k * ld + v]) = load_as<A>(S[k * lay.V + v]);
      }
    });
    base = out;
  }
  const A* at(const Layout<T>& lay, int64_t H, int64_t b, int64_t i, int64_t h) const {
    return base + ((b * lay.NS + i) * H + h) * per_state;
  }
};

// Scratch of one (b, h, segment) unit, reused across the units a thread runs.
template <typename A>
struct SegmentScratch {
  Buffer<A> q, u, o, ok, dy, c, ct, z, p, y, w, rows_a, rows_b, gates, dgate, dq;
  Buffer<int64_t> idx;
  SegmentScratch(int64_t L, int64_t Kp, int64_t Vp, int64_t NR)
      : q(L * Kp), u(L * Kp), o(L * Vp), ok(L * Kp), dy(L * Vp), c((NR + 1) * Kp), ct(Kp * padded<A>(NR + 1)), z(L * padded<A>(NR + 1)), p(std::max(Kp, Vp) * std::max(Kp, Vp)),
        y(L * Vp), w(L * std::max(Kp, Vp)), rows_a(L * Kp), rows_b(L * Vp), gates(L * (NR + 1)),
        dgate(L * (NR + 1)), dq(L * Kp), idx(L) {}
};

// The gates of a segment's m tokens over its sr readable states into sc.gates [m, sr + 1]
// (column sr: the online gate), from sc.u, sc.ok and the summaries sc.c: the cached logits as one
// product U C^T [m, sr], then each token's selection and softmax.
template <typename A>
void segment_gates(SegmentScratch<A>& sc, int64_t m, int64_t sr, int64_t K, int64_t Kp, int64_t top_k) {
  const int64_t np = padded<A>(sr);
  if (sr > 0) {
    std::fill(sc.ct.data(), sc.ct.data() + K * np, A(0));
    for (int64_t i = 0; i < sr; ++i)
      for (int64_t k = 0; k < K; ++k) sc.ct[k * np + i] = sc.c[i * Kp + k];
    std::fill(sc.z.data(), sc.z.data() + m * np, A(0));
    gemm_acc(m, np, K, sc.u.data(), Kp, int64_t{1}, sc.ct.data(), np, sc.z.data(), np);
  }
  for (int64_t r = 0; r < m; ++r) {
    A* z = sc.gates.data() + r * (sr + 1);
    std::copy(sc.z.data() + r * np, sc.z.data() + r * np + sr, z);
    z[sr] = token_gates(z, sr, top_k, dot(sc.u.data() + r * Kp, sc.ok.data() + r * Kp, K));
  }
}

// The rows of the segment that read state i (gate not kNotRead), into sc.idx; returns how many.
template <typename A>
int64_t rows_reading(SegmentScratch<A>& sc, int64_t m, int64_t sr, int64_t i) {
  int64_t n = 0;
  for (int64_t r = 0; r < m; ++r)
    if (sc.gates[r * (sr + 1) + i] != A(kNotRead)) sc.idx[n++] = r;
  return n;
}

// The segment's rows of q (scaled), u, online_keys, o and the summaries of its readable states.
template <typename T>
void load_segment(const ReadoutArgs<T>& a, const Layout<T>& lay, SegmentScratch<Acc<T>>& sc, int64_t b, int64_t h,
                  int64_t t0, int64_t m, int64_t sr, Acc<T>* o_dst) {
  using A = Acc<T>;
  const int64_t at_k = lay.q_at(b, t0, h, a.steps);
  load_rows(a.q + at_k, lay.tok_k, m, lay.K, static_cast<A>(a.scale), sc.q.data(), lay.Kp);
  load_rows(a.o + lay.o_at(b, t0, h, a.steps), lay.tok_v, m, lay.V, A(1), o_dst, lay.Vp);
  if (a.mode == static_cast<int>(ReadoutMode::Residual)) return;
  load_rows(a.u + at_k, lay.tok_k, m, lay.K, A(1), sc.u.data(), lay.Kp);
  load_rows(a.online_keys + at_k, lay.tok_k, m, lay.K, A(1), sc.ok.data(), lay.Kp);
  for (int64_t i = 0; i < sr; ++i)
    load_rows(a.seg_keys + lay.c_at(b, i, h), 0, 1, lay.K, A(1), sc.c.data() + i * lay.Kp, lay.Kp);
  segment_gates(sc, m, sr, lay.K, lay.Kp, a.mode == static_cast<int>(ReadoutMode::Sparse) ? a.top_k : 0);
}

// Sum of the states i < sr, [K, Vp] (the residual mode reads their sum).
template <typename T>
void state_prefix(const Layout<T>& lay, const StateMatrices<T>& S, int64_t H, int64_t b, int64_t h, int64_t sr,
                  Acc<T>* P) {
  using A = Acc<T>;
  std::fill(P, P + lay.K * lay.Vp, A(0));
  for (int64_t i = 0; i < sr; ++i) {
    const A* Si = S.at(lay, H, b, i, h);
    for (int64_t k = 0; k < lay.K; ++k)
      for (int64_t v = 0; v < lay.V; ++v) P[k * lay.Vp + v] += Si[k * S.ld + v];
  }
}

template <typename T>
void forward_unit(const ReadoutArgs<T>& a, const Layout<T>& lay, const StateMatrices<T>& S,
                  SegmentScratch<Acc<T>>& sc, T* y, int64_t unit) {
  using A = Acc<T>;
  const int64_t s = unit % lay.nseg, h = (unit / lay.nseg) % a.H, b = unit / (lay.nseg * a.H);
  const int64_t t0 = s * lay.L, m = std::min(a.steps, t0 + lay.L) - t0, sr = std::min(s, lay.NS);
  const int64_t K = lay.K, Kp = lay.Kp, Vp = lay.Vp;
  load_segment(a, lay, sc, b, h, t0, m, sr, sc.y.data());
  if (a.mode == static_cast<int>(ReadoutMode::Residual)) {
    if (sr > 0) {
      state_prefix(lay, S, a.H, b, h, sr, sc.p.data());
      gemm_acc(m, Vp, K, sc.q.data(), Kp, int64_t{1}, sc.p.data(), Vp, sc.y.data(), Vp);
    }
  } else {
    for (int64_t r = 0; r < m; ++r) {
      const A go = sc.gates[r * (sr + 1) + sr];
      for (int64_t v = 0; v < Vp; ++v) sc.y[r * Vp + v] *= go;
    }
    for (int64_t i = 0; i < sr; ++i) {  // each state meets the rows that read it, scaled by their gates
      const int64_t n = rows_reading(sc, m, sr, i);
      if (n == 0) continue;
      for (int64_t j = 0; j < n; ++j) {
        const int64_t r = sc.idx[j];
        const A gam = sc.gates[r * (sr + 1) + i];
        for (int64_t k = 0; k < Kp; ++k) sc.rows_a[j * Kp + k] = gam * sc.q[r * Kp + k];
      }
      const A* Si = S.at(lay, a.H, b, i, h);
      if (n == m) {
        gemm_acc(m, Vp, K, sc.rows_a.data(), Kp, int64_t{1}, Si, S.ld, sc.y.data(), Vp);
        continue;
      }
      std::fill(sc.w.data(), sc.w.data() + n * Vp, A(0));
      gemm_acc(n, Vp, K, sc.rows_a.data(), Kp, int64_t{1}, Si, S.ld, sc.w.data(), Vp);
      for (int64_t j = 0; j < n; ++j) {
        A* yr = sc.y.data() + sc.idx[j] * Vp;
        const A* wr = sc.w.data() + j * Vp;
        for (int64_t v = 0; v < Vp; ++v) yr[v] += wr[v];
      }
    }
  }
  store_rows(sc.y.data(), Vp, m, lay.V, A(1), y + lay.o_at(b, t0, h, a.steps), lay.tok_v);
}

// The token pass of the backward: dq, du, do, d online_keys of a segment's tokens, and its gates
// and dz into the scratch the state pass reads.
template <typename T>
void backward_tokens(const ReadoutArgs<T>& a, const ReadoutGrads<T>& g, const Layout<T>& lay,
                     const StateMatrices<T>& St, SegmentScratch<Acc<T>>& sc,
                     Acc<T>* gates_out, Acc<T>* dz_out, int64_t unit) {
  using A = Acc<T>;
  const int64_t s = unit % lay.nseg, h = (unit / lay.nseg) % a.H, b = unit / (lay.nseg * a.H);
  const int64_t t0 = s * lay.L, m = std::min(a.steps, t0 + lay.L) - t0, sr = std::min(s, lay.NS);
  const int64_t K = lay.K, V = lay.V, Kp = lay.Kp, Vp = lay.Vp, at_k = lay.q_at(b, t0, h, a.steps),
                at_v = lay.o_at(b, t0, h, a.steps);
  const A scale = static_cast<A>(a.scale);
  const int64_t bh = b * a.H + h;
  load_rows(g.dy + at_v, lay.tok_v, m, V, A(1), sc.dy.data(), Vp);
  const A* dy = sc.dy.data();  // the segment's dy rows [m, Vp]
  std::fill(sc.dq.data(), sc.dq.data() + m * Kp, A(0));
  if (a.mode == static_cast<int>(ReadoutMode::Residual)) {
    if (g.d_o) store_rows(dy, Vp, m, V, A(1), g.d_o + at_v, lay.tok_v);
    if (!g.dq) return;
    if (sr > 0) {  // dq = scale (sum_i S_i) dy
      A* P = sc.p.data();  // sum_i S_i^T [V, Kp]
      std::fill(P, P + V * Kp, A(0));
      for (int64_t i = 0; i < sr; ++i) {
        const A* Si = St.at(lay, a.H, b, i, h);
        for (int64_t j = 0; j < V * Kp; ++j) P[j] += Si[j];
      }
      gemm_acc(m, Kp, V, dy, Vp, int64_t{1}, P, Kp, sc.dq.data(), Kp);
    }
    store_rows(sc.dq.data(), Kp, m, K, scale, g.dq + at_k, lay.tok_k);
    return;
  }
  load_segment(a, lay, sc, b, h, t0, m, sr, sc.o.data());
  const int64_t gw = sr + 1;
  // dgate[r, i] = <dy_r, S_i^T q~_r> = <q~_r, S_i dy_r>; dq_r += gamma_ri S_i dy_r
  for (int64_t i = 0; i < sr; ++i) {
    const int64_t n = rows_reading(sc, m, sr, i);
    if (n == 0) continue;
    const A* dyi = dy;
    if (n < m) {
      for (int64_t j = 0; j < n; ++j)
        for (int64_t v = 0; v < Vp; ++v) sc.rows_b[j * Vp + v] = dy[sc.idx[j] * Vp + v];
      dyi = sc.rows_b.data();
    }
    std::fill(sc.w.data(), sc.w.data() + n * Kp, A(0));
    gemm_acc(n, Kp, V, dyi, Vp, int64_t{1}, St.at(lay, a.H, b, i, h), St.ld, sc.w.data(), Kp);
    for (int64_t j = 0; j < n; ++j) {  // one pass over W's row: <q~, W_i> and dq += gamma W_i
      const int64_t r = sc.idx[j];
      const A *wr = sc.w.data() + j * Kp, *qr = sc.q.data() + r * Kp;
      A* dqr = sc.dq.data() + r * Kp;
      const VA<A> gam = vsplat(sc.gates[r * gw + i]);
      VA<A> d{};
      for (int64_t k = 0; k < Kp; k += kLanes<A>) {  // padded rows: whole vectors, zeros past K
        const VA<A> w = vload(wr + k);
        d += vload(qr + k) * w;
        vstore(dqr + k, vload(dqr + k) + gam * w);
      }
      sc.dgate[r * gw + i] = vsum<A>(d);
    }
  }
  // softmax: dz_j = gamma_j (dgate_j - sum_k gamma_k dgate_k); du = sum_j dz_j c_j + dz_o c_online
  for (int64_t r = 0; r < m; ++r) {
    const A* gr = sc.gates.data() + r * gw;
    A* dg = sc.dgate.data() + r * gw;
    const A go = gr[sr];
    dg[sr] = dot(dy + r * Vp, sc.o.data() + r * Vp, V);
    A mean = go * dg[sr];
    for (int64_t i = 0; i < sr; ++i)
      if (gr[i] != A(kNotRead)) mean += gr[i] * dg[i];
    for (int64_t i = 0; i < sr; ++i) dg[i] = gr[i] != A(kNotRead) ? gr[i] * (dg[i] - mean) : A(0);
    const A dzo = go * (dg[sr] - mean);
    A* du = sc.w.data() + r * Kp;  // du row, in the free w scratch; the cached part below
    for (int64_t k = 0; k < Kp; ++k) du[k] = dzo * sc.ok[r * Kp + k];
    if (g.donline_keys) {
      for (int64_t k = 0; k < K; ++k) store_as(g.donline_keys[at_k + r * lay.tok_k + k], dzo * sc.u[r * Kp + k]);
    }
    if (g.d_o) {
      for (int64_t v = 0; v < V; ++v) store_as(g.d_o[at_v + r * lay.tok_v + v], go * dy[r * Vp + v]);
    }
    if (gates_out) {  // for a separate state pass: gates and dz over the NR readable states
      A* go_row = gates_out + (bh * a.steps + t0 + r) * (lay.NR + 1);
      A* dz_row = dz_out + (bh * a.steps + t0 + r) * lay.NR;
      for (int64_t i = 0; i < lay.NR; ++i) {
        go_row[i] = i < sr ? gr[i] : A(kNotRead);
        dz_row[i] = i < sr ? dg[i] : A(0);
      }
      go_row[lay.NR] = go;
    }
  }
  if (g.du) {  // du += dz C, one product over the segment (dz is 0 where a state is not read)
    if (sr > 0) gemm_acc(m, Kp, sr, sc.dgate.data(), gw, int64_t{1}, sc.c.data(), Kp, sc.w.data(), Kp);
    store_rows(sc.w.data(), Kp, m, K, A(1), g.du + at_k, lay.tok_k);
  }
  if (g.dq) store_rows(sc.dq.data(), Kp, m, K, scale, g.dq + at_k, lay.tok_k);
}

// One segment's rows as the state gradients read them: q~ and u [m, Kp], dy [m, ldy], the gates
// (kNotRead where a state is not read) and dz, row r at r * gw / r * zw.
template <typename A>
struct SegmentRows {
  const A *q, *u, *dy, *gates, *dz;
  int64_t ldy, gw, zw, m, sr;
};

// A segment's share of the state gradients, summed into dS [NR, K, Vp] and dc [NR, Kp]: for each
// state i < sr, dS_i += (gamma_i q~)^T dy over the rows that read i (one product [K, n] x [n, V]) and
// dc_i += dz_i u over the same rows. qa [L, Kp], dyb [L, Vp] and idx [L] are scratch.
template <typename A>
void accumulate_state_grads(const SegmentRows<A>& s, int64_t K, int64_t Kp, int64_t V, int64_t Vp, A* dS, A* dc,
                            A* qa, A* dyb, int64_t* idx) {
  for (int64_t i = 0; i < s.sr; ++i) {
    int64_t n = 0;
    A* dci = dc ? dc + i * Kp : nullptr;
    for (int64_t r = 0; r < s.m; ++r) {  // the rows that read i only (a token that did not adds nothing)
      const A gam = s.gates[r * s.gw + i];
      if (gam == A(kNotRead)) continue;
      if (dci) {
        const A d = s.dz[r * s.zw + i];
        for (int64_t k = 0; k < Kp; ++k) dci[k] += d * s.u[r * Kp + k];
      }
      if (dS)
        for (int64_t k = 0; k < Kp; ++k) qa[n * Kp + k] = gam * s.q[r * Kp + k];
      idx[n++] = r;
    }
    if (n == 0 || !dS) continue;
    const A* db = s.dy;  // every row read i: dy's rows as they are; else the reading ones gathered
    int64_t ldb = s.ldy;
    if (n != s.m) {
      for (int64_t j = 0; j < n; ++j) std::copy(s.dy + idx[j] * s.ldy, s.dy + idx[j] * s.ldy + V, dyb + j * Vp);
      db = dyb, ldb = Vp;
    }
    gemm_acc(K, Vp, n, qa, int64_t{1}, Kp, db, ldb, dS + i * K * Vp, Vp);
  }
}

// Head (b, h)'s state gradients from their sums dS [NR, K, Vp] and dc [NR, Kp] (null: not wanted);
// the states nobody reads (i >= NR) get zeros.
template <typename T>
void store_state_grads(const ReadoutGrads<T>& g, const Layout<T>& lay, int64_t b, int64_t h, const Acc<T>* dS,
                       const Acc<T>* dc) {
  using A = Acc<T>;
  for (int64_t i = 0; i < lay.NS; ++i) {
    if (g.dstates) {
      T* out = g.dstates + lay.s_at(b, i, h);
      if (i < lay.NR) store_rows(dS + i * lay.K * lay.Vp, lay.Vp, lay.K, lay.V, A(1), out, lay.V);
      else std::fill(out, out + lay.K * lay.V, T{});
    }
    if (g.dseg_keys) {
      T* out = g.dseg_keys + lay.c_at(b, i, h);
      if (i < lay.NR) store_rows(dc + i * lay.Kp, lay.Kp, 1, lay.K, A(1), out, 0);
      else std::fill(out, out + lay.K, T{});
    }
  }
}

// One head's sums of the state gradients, zeroed per head.
template <typename A>
struct StateSums {
  Buffer<A> dS, dc;
  StateSums(int64_t K, int64_t Kp, int64_t Vp, int64_t NR) : dS(NR * K * Vp), dc(NR * Kp) {}
  void zero() {
    std::fill(dS.data(), dS.data() + dS.size(), A(0));
    std::fill(dc.data(), dc.data() + dc.size(), A(0));
  }
};

// The fused backward, one (b, h) per unit: the token pass segment by segment, each segment's rows
// (already in scratch) then adding its share of the state gradients — q, u and dy are read once.
template <typename T>
void backward_head(const ReadoutArgs<T>& a, const ReadoutGrads<T>& g, const Layout<T>& lay,
                   const StateMatrices<T>& St, SegmentScratch<Acc<T>>& sc, StateSums<Acc<T>>& sums, int64_t bh) {
  using A = Acc<T>;
  sums.zero();
  A* dS = g.dstates ? sums.dS.data() : nullptr;
  A* dc = g.dseg_keys ? sums.dc.data() : nullptr;
  for (int64_t s = 0; s < lay.nseg; ++s) {
    backward_tokens(a, g, lay, St, sc, nullptr, nullptr, bh * lay.nseg + s);
    const int64_t m = std::min(a.steps, (s + 1) * lay.L) - s * lay.L, sr = std::min(s, lay.NS), gw = sr + 1;
    if (sr == 0) continue;  // nothing cached yet (this schedule runs only when dS or dc is wanted)
    const SegmentRows<A> rows{sc.q.data(), sc.u.data(), sc.dy.data(), sc.gates.data(), sc.dgate.data(),
                              lay.Vp, gw, gw, m, sr};
    accumulate_state_grads(rows, lay.K, lay.Kp, lay.V, lay.Vp, dS, dc, sc.rows_a.data(), sc.rows_b.data(),
                           sc.idx.data());
  }
  store_state_grads(g, lay, bh / a.H, bh % a.H, sums.dS.data(), sums.dc.data());
}

// Scratch of the separate state pass's (b, h) units: a segment's rows.
template <typename A>
struct StateScratch {
  Buffer<A> q, u, qa, dy, dyb;
  Buffer<int64_t> idx;
  StateScratch(int64_t L, int64_t Kp, int64_t Vp) : q(L * Kp), u(L * Kp), qa(L * Kp), dy(L * Vp), dyb(L * Vp), idx(L) {}
};

// dy's rows [t0, t0 + n) of head (b, h) as a product's operand: in place when they are float rows of
// whole vectors (row step H V), else converted into `buf` (ld Vp). Returns the rows and sets `ld`.
template <typename T>
const Acc<T>* dy_rows(const ReadoutArgs<T>& a, const ReadoutGrads<T>& g, const Layout<T>& lay, int64_t b, int64_t h,
                      int64_t t0, int64_t n, Buffer<Acc<T>>& buf, int64_t& ld) {
  using A = Acc<T>;
  const T* src = g.dy + lay.o_at(b, t0, h, a.steps);
  if constexpr (std::is_same_v<T, A>) {
    if (lay.V == lay.Vp) {
      ld = lay.tok_v;
      return src;
    }
  }
  load_rows(src, lay.tok_v, n, lay.V, A(1), buf.data(), lay.Vp);
  ld = lay.Vp;
  return buf.data();
}

// The separate state pass (after a token pass over (b, h, segment) units that wrote the gates and dz
// into scratch), one (b, h) per unit, segment by segment: each segment's rows read again.
template <typename T>
void backward_state(const ReadoutArgs<T>& a, const ReadoutGrads<T>& g, const Layout<T>& lay, const Acc<T>* gates,
                    const Acc<T>* dz, StateScratch<Acc<T>>& sc, StateSums<Acc<T>>& sums, int64_t bh) {
  using A = Acc<T>;
  const int64_t b = bh / a.H, h = bh % a.H, K = lay.K, Kp = lay.Kp, NR = lay.NR;
  sums.zero();
  for (int64_t s = 1; s < lay.nseg; ++s) {
    const int64_t t0 = s * lay.L, m = std::min(a.steps, t0 + lay.L) - t0, sr = std::min(s, lay.NS);
    if (g.dseg_keys) load_rows(a.u + lay.q_at(b, t0, h, a.steps), lay.tok_k, m, K, A(1), sc.u.data(), Kp);
    if (g.dstates) load_rows(a.q + lay.q_at(b, t0, h, a.steps), lay.tok_k, m, K, static_cast<A>(a.scale), sc.q.data(), Kp);
    int64_t ld = lay.Vp;
    const A* dy = g.dstates ? dy_rows(a, g, lay, b, h, t0, m, sc.dy, ld) : nullptr;
    const SegmentRows<A> rows{sc.q.data(), sc.u.data(), dy, gates + (bh * a.steps + t0) * (NR + 1),
                              dz + (bh * a.steps + t0) * NR, ld, NR + 1, NR, m, sr};
    accumulate_state_grads(rows, K, Kp, lay.V, lay.Vp, g.dstates ? sums.dS.data() : nullptr,
                           g.dseg_keys ? sums.dc.data() : nullptr, sc.qa.data(), sc.dyb.data(), sc.idx.data());
  }
  store_state_grads(g, lay, b, h, sums.dS.data(), sums.dc.data());
}

// The residual mode's state pass, one (b, h) per unit: dS_i = sum over the segments s > i of
// q~_s^T dy_s, a suffix sum from the last state down (scale applied on store).
template <typename T>
void backward_state_residual(const ReadoutArgs<T>& a, const ReadoutGrads<T>& g, const Layout<T>& lay,
                             Buffer<Acc<T>>& qb, Buffer<Acc<T>>& dyb, Buffer<Acc<T>>& dS, int64_t bh) {
  using A = Acc<T>;
  const int64_t b = bh / a.H, h = bh % a.H, Kp = lay.Kp, Vp = lay.Vp;
  std::fill(dS.data(), dS.data() + Kp * Vp, A(0));
  for (int64_t i = lay.NS - 1; i >= 0; --i) {
    const int64_t t0 = (i + 1) * lay.L;
    if (t0 < a.steps) {
      const int64_t m = std::min(a.steps, t0 + lay.L) - t0;
      load_rows(a.q + lay.q_at(b, t0, h, a.steps), lay.tok_k, m, lay.K, A(1), qb.data(), Kp);
      int64_t ld = Vp;
      const A* db = dy_rows(a, g, lay, b, h, t0, m, dyb, ld);
      gemm_acc(lay.K, Vp, m, qb.data(), int64_t{1}, Kp, db, ld, dS.data(), Vp);
    }
    store_rows(dS.data(), Vp, lay.K, lay.V, static_cast<A>(a.scale), g.dstates + lay.s_at(b, i, h), lay.V);
  }
}

}  // namespace

template <CpuCapability C, typename T>
void cached_readout_fwd_cpu(const ReadoutArgs<T>& a, T* y, int nthreads) {
  using A = Acc<T>;
  const Layout<T> lay(a);
  const StateMatrices<T> S(a, lay, false, nthreads);
  const int64_t cost = lay.L * lay.K * lay.V * std::max<int64_t>(1, lay.NR / 2);
  parallel_for(a.B * a.H * lay.nseg, cost, nthreads, [&](int64_t u0, int64_t u1) {
    SegmentScratch<A> sc(lay.L, lay.Kp, lay.Vp, lay.NR);
    for (int64_t unit = u0; unit < u1; ++unit) forward_unit(a, lay, S, sc, y, unit);
  });
}

template <CpuCapability C, typename T>
void cached_readout_bwd_cpu(const ReadoutArgs<T>& a, const ReadoutGrads<T>& g, Acc<T>* gates, Acc<T>* dz,
                            int nthreads) {
  using A = Acc<T>;
  const Layout<T> lay(a);
  const StateMatrices<T> St(a, lay, true, nthreads);
  const int64_t cost = lay.L * lay.K * lay.V * std::max<int64_t>(1, lay.NR / 2);
  const bool gated = a.mode != static_cast<int>(ReadoutMode::Residual);
  const int64_t heads = a.B * a.H;
  // Both ways sum every output in the same order: the choice does not change a bit of the results.
  if (gated && (g.dstates || g.dseg_keys) && cpu_backward_fused(heads, nthreads)) {
    parallel_for(heads, 3 * cost * lay.nseg, nthreads, [&](int64_t u0, int64_t u1) {
      SegmentScratch<A> sc(lay.L, lay.Kp, lay.Vp, lay.NR);
      StateSums<A> sums(lay.K, lay.Kp, lay.Vp, lay.NR);
      for (int64_t bh = u0; bh < u1; ++bh) backward_head(a, g, lay, St, sc, sums, bh);
    });
    return;
  }
  parallel_for(heads * lay.nseg, 2 * cost, nthreads, [&](int64_t u0, int64_t u1) {
    SegmentScratch<A> sc(lay.L, lay.Kp, lay.Vp, lay.NR);
    for (int64_t unit = u0; unit < u1; ++unit)
      backward_tokens(a, g, lay, St, sc, lay.NR > 0 ? gates : nullptr, dz, unit);
  });
  if (a.mode == static_cast<int>(ReadoutMode::Residual)) {
    if (!g.dstates) return;
    parallel_for(a.B * a.H, a.steps * lay.K * lay.V, nthreads, [&](int64_t u0, int64_t u1) {
      Buffer<A> qb(lay.L * lay.Kp), dyb(lay.L * lay.Vp), dS(lay.Kp * lay.Vp);
      for (int64_t bh = u0; bh < u1; ++bh) backward_state_residual(a, g, lay, qb, dyb, dS, bh);
    });
    return;
  }
  if (!g.dstates && !g.dseg_keys) return;
  parallel_for(a.B * a.H, a.steps * lay.K * lay.V * std::max<int64_t>(1, lay.NR / 2), nthreads,
               [&](int64_t u0, int64_t u1) {
    StateScratch<A> sc(lay.L, lay.Kp, lay.Vp);
    StateSums<A> sums(lay.K, lay.Kp, lay.Vp, lay.NR);
    for (int64_t bh = u0; bh < u1; ++bh) backward_state(a, g, lay, gates, dz, sc, sums, bh);
  });
}

#define RETAIN_INSTANTIATE(T)                                                                              \
  template void cached_readout_fwd_cpu<kThisCpu, T>(const ReadoutArgs<T>&, T*, int);                        \
  template void cached_readout_bwd_cpu<kThisCpu, T>(const ReadoutArgs<T>&, const ReadoutGrads<T>&, Acc<T>*, \
                                                    Acc<T>*, int);
RETAIN_FOR_EACH_FLOATING(RETAIN_INSTANTIATE)
#undef RETAIN_INSTANTIATE

}  // namespace retain::cache
