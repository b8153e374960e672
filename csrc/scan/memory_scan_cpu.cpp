// CPU kernels of memory_scan: sequential over T per (sequence, head) with the K x V state in a
// thread-local buffer (L1/L2), inner loops over V vectorised, OpenMP over sequences x heads.
// The backward recomputes the states of one chunk of C steps at a time from checkpoints the
// forward saved every C steps, then walks the chunk in reverse (csrc/scan/README.md).
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "common/buffer.h"
#include "common/cpu_capability.h"
#include "common/dispatch.h"
#include "common/parallel.h"
#include "common/vec.h"
#include "scan/memory_scan.h"

namespace retain::scan {
namespace {

template <typename A>
RETAIN_FORCE_INLINE void copy_state(A* __restrict dst, const A* __restrict src, int64_t n) {
  std::copy(src, src + n, dst);
}

// dst = src, or zeros when src is null (an optional initial state or incoming gradient).
template <typename A>
RETAIN_FORCE_INLINE void copy_or_zero(A* __restrict dst, const A* src, int64_t n) {
  if (src) copy_state(dst, src, n); else std::fill(dst, dst + n, A(0));
}

// A unit's state S and, under momentum, Z (n values each) from slot `off` of the tensors src_S,
// src_Z (zeros where null), and to slot `off` of dst_S, dst_Z (skipped where null).
template <typename A>
RETAIN_FORCE_INLINE void load_pair(A* S, A* Z, const A* src_S, const A* src_Z, int64_t off, int64_t n,
                                   bool momentum) {
  copy_or_zero(S, src_S ? src_S + off : nullptr, n);
  if (momentum) copy_or_zero(Z, src_Z ? src_Z + off : nullptr, n);
}
template <typename A>
RETAIN_FORCE_INLINE void store_pair(A* dst_S, A* dst_Z, const A* S, const A* Z, int64_t off, int64_t n,
                                    bool momentum) {
  if (dst_S) copy_state(dst_S + off, S, n);
  if (dst_Z && momentum) copy_state(dst_Z + off, Z, n);
}

// Columns of the K x V state are processed in blocks of four native vectors (256 bytes with
// AVX-512, 128 with AVX2, 64 with SSE2/NEON) whose accumulators stay in vector registers across
// the K rows (a loop that kept them in memory would be bound by store-to-load latency): the
// forward's fused update holds three such blocks, 12 of the 16 (AVX2, SSE2) or 32 registers.
// Full blocks have a compile-time width, so the inner loops unroll.
template <typename A>
constexpr int64_t kBlock = 4 * kLanes<A>;

template <typename A, typename F>
RETAIN_FORCE_INLINE void column_blocks(int64_t V, F&& f) {
  int64_t j0 = 0;
  for (; j0 + kBlock<A> <= V; j0 += kBlock<A>) f(j0, std::integral_constant<int64_t, kBlock<A>>{});
  if (j0 < V) f(j0, V - j0);
}

RETAIN_FORCE_INLINE void prefetch_bytes(const void* p, int64_t bytes, bool for_write) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) {
    if (for_write) __builtin_prefetch(c + off, 1, 3); else __builtin_prefetch(c + off, 0, 3);
  }
}

// One (sequence, head) pair's view of the inputs and the per-step vectors they load into.
template <typename T>
struct Unit {
  using A = Acc<T>;
  const MemoryScanParams<T>& P;
  int64_t seq, b, h, t0, t1;  // sequence, batch row, head, first and one-past-last step
  ObjectiveMath<A> obj;
  // per-step vectors
  Buffer<A> kk, qq, vv, av, kr, knorm_in, qnorm_in;  // kr: k scaled as the error reads it
  A beta = 0, eta = 0, k_rstd = 1, q_rstd = 1;

  Unit(const MemoryScanParams<T>& p, int64_t n)
      : P(p), kk(p.K), qq(p.K), vv(p.V), av(p.K), kr(p.K), knorm_in(p.K), qnorm_in(p.K) {
    h = n % p.H;
    seq = n / p.H;
    b = p.cu_seqlens ? 0 : seq;
    t0 = p.cu_seqlens ? p.cu_seqlens[seq] : 0;
    t1 = p.cu_seqlens ? p.cu_seqlens[seq + 1] : p.T;
    obj = ObjectiveMath<A>{p.objective, p.p, p.delta, p.eps};
  }

  int64_t row(int64_t t) const { return (b * P.T + t) * P.H + h; }  // index into [B,T,H]

  // Loads step t: normalised and scaled q, normalised k, v, beta, eta and the retention a.
  RETAIN_FORCE_INLINE void load(int64_t t) {
    const int64_t r = row(t), rk = P.key_row(r), K = P.K, V = P.V;
    const T* __restrict qp = P.q + rk * K;
    const T* __restrict kp = P.k + rk * K;
    const T* __restrict vp = P.v + r * V;
    // local restrict pointers: the vectors' storage cannot alias P or each other
    A* __restrict qn = qnorm_in.data();
    A* __restrict kn = knorm_in.data();
    A* __restrict q_ = qq.data();
    A* __restrict k_ = kk.data();
    A* __restrict v_ = vv.data();
    A* __restrict a_ = av.data();
    A* __restrict kr_ = kr.data();
    A qs = 0, ks = 0;
#pragma omp simd reduction(+ : qs, ks)
    for (int64_t i = 0; i < K; ++i) {
      qn[i] = load_as<A>(qp[i]);
      kn[i] = load_as<A>(kp[i]);
      qs += qn[i] * qn[i];
      ks += kn[i] * kn[i];
    }
    const bool l2norm = P.l2norm;
    q_rstd = l2norm ? A(1) / std::sqrt(qs + A(1e-6)) : A(1);
    k_rstd = l2norm ? A(1) / std::sqrt(ks + A(1e-6)) : A(1);
    const A qscale = q_rstd * static_cast<A>(P.scale), kscale = k_rstd;
#pragma omp simd
    for (int64_t i = 0; i < K; ++i) {
      q_[i] = qn[i] * qscale;
      k_[i] = kn[i] * kscale;
    }
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) v_[j] = load_as<A>(vp[j]);
    beta = load_as<A>(P.beta[r]);
    eta = P.momentum ? load_as<A>(P.eta[r]) : A(0);
    switch (static_cast<GateKind>(P.gate_kind)) {
      case GateKind::None: std::fill(a_, a_ + K, A(1)); break;
      case GateKind::PerHead: std::fill(a_, a_ + K, retention(load_as<A>(P.g[r]))); break;
      case GateKind::PerKey:
        for (int64_t i = 0; i < K; ++i) a_[i] = retention(load_as<A>(P.g[r * K + i]));
        break;
    }
    if (P.retention_first) {
#pragma omp simd
      for (int64_t i = 0; i < K; ++i) kr_[i] = k_[i] * a_[i];
    } else {
      std::copy(k_, k_ + K, kr_);
    }
  }

  // Requests step t's rows of q, k, v and o ahead of use: with H > 1 a unit's rows are strided
  // (one in H), which the hardware prefetchers follow late.
  RETAIN_FORCE_INLINE void prefetch(int64_t t) const {
    const int64_t r = row(t), rk = P.key_row(r);
    prefetch_bytes(P.q + rk * P.K, P.K * int64_t{sizeof(T)}, false);
    prefetch_bytes(P.k + rk * P.K, P.K * int64_t{sizeof(T)}, false);
    prefetch_bytes(P.v + r * P.V, P.V * int64_t{sizeof(T)}, false);
    if (P.o) prefetch_bytes(P.o + r * P.V, P.V * int64_t{sizeof(T)}, true);
  }

  // The backward's rows of step t: inputs again, the incoming gradient, the gradients it writes.
  RETAIN_FORCE_INLINE void prefetch_grads(const MemoryScanGrads<T>& G, int64_t t) const {
    const int64_t r = row(t), rk = P.key_row(r);
    const int64_t kb = P.K * int64_t{sizeof(T)}, vb = P.V * int64_t{sizeof(T)};
    prefetch_bytes(P.q + rk * P.K, kb, false);
    prefetch_bytes(P.k + rk * P.K, kb, false);
    prefetch_bytes(P.v + r * P.V, vb, false);
    prefetch_bytes(G.grad_o + r * P.V, vb, false);
    prefetch_bytes(G.grad_q + r * P.K, kb, true);
    prefetch_bytes(G.grad_k + r * P.K, kb, true);
    prefetch_bytes(G.grad_v + r * P.V, vb, true);
  }

  // a_t from the gate input: exp(g) for log-space gates, the factor itself otherwise.
  A retention(A g) const { return P.gate_log ? std::exp(g) : g; }
  // d a / d gate
  A dretention(A a) const { return P.gate_log ? a : A(1); }

  // e = (r ⊙ S)ᵀ k − v with r = a (retention first) or 1, and psi(e); for 'dot' psi = −v.
  RETAIN_FORCE_INLINE void error(const A* __restrict S, A* __restrict e, A* __restrict psi) const {
    const int64_t K = P.K, V = P.V;
    if (static_cast<Objective>(P.objective) == Objective::Dot) {
      for (int64_t j = 0; j < V; ++j) e[j] = A(0), psi[j] = -vv[j];
      return;
    }
    const A* __restrict c = kr.data();
    column_blocks<A>(V, [&](int64_t j0, auto nb) {
      // two row streams with their own accumulators hide the FMA latency
      A acc0[kBlock<A>], acc1[kBlock<A>];
      for (int64_t j = 0; j < nb; ++j) acc0[j] = -vv[j0 + j], acc1[j] = A(0);
      int64_t i = 0;
      for (; i + 1 < K; i += 2) {
        const A* __restrict r0 = S + i * V + j0;
        const A* __restrict r1 = r0 + V;
        const A c0 = c[i], c1 = c[i + 1];
#pragma omp simd
        for (int64_t j = 0; j < nb; ++j) {
          acc0[j] += r0[j] * c0;
          acc1[j] += r1[j] * c1;
        }
      }
      if (i < K) {
        const A* __restrict r0 = S + i * V + j0;
#pragma omp simd
        for (int64_t j = 0; j < nb; ++j) acc0[j] += r0[j] * c[i];
      }
      for (int64_t j = 0; j < nb; ++j) e[j0 + j] = acc0[j] + acc1[j];
    });
    for (int64_t j = 0; j < V; ++j) psi[j] = obj.psi(e[j]);
  }

  // S ← a ⊙ S + Z with Z ← η Z − β k ψᵀ (no momentum: Z = −β k ψᵀ); o = Sᵀ q̃ when o != null.
  // With `next` (the following step, already loaded), the same pass over S also forms that step's
  // error e' = (r' ⊙ S_t)ᵀ k' − v' into e_next: one sweep of the state per step instead of two.
  RETAIN_FORCE_INLINE void update(A* __restrict S, A* __restrict Z, const A* __restrict psi, A* __restrict o,
                                  const Unit* next = nullptr, A* __restrict e_next = nullptr) const {
    if (Z) {
      if (next) update_rows<true, true>(S, Z, psi, o, next, e_next);
      else update_rows<true, false>(S, Z, psi, o, next, e_next);
    } else {
      if (next) update_rows<false, true>(S, Z, psi, o, next, e_next);
      else update_rows<false, false>(S, Z, psi, o, next, e_next);
    }
  }

  template <bool kMomentum, bool kNext>
  RETAIN_FORCE_INLINE void update_rows(A* __restrict S, A* __restrict Z, const A* __restrict psi, A* __restrict o,
                                       const Unit* next, A* __restrict e_next) const {
    const int64_t K = P.K, V = P.V;
    const A e_ = eta;
    const A* __restrict kr_next = kNext ? next->kr.data() : nullptr;
    column_blocks<A>(V, [&](int64_t j0, auto nb) {
      if constexpr (!std::is_same_v<decltype(nb), int64_t>) {  // a full block: vector registers
        update_block<kMomentum, kNext>(S, Z, psi, o, next, e_next, j0);
        return;
      }
      A ps[kBlock<A>], acc[kBlock<A>], en[kBlock<A>];
      for (int64_t j = 0; j < nb; ++j) ps[j] = psi[j0 + j], acc[j] = A(0);
      if constexpr (kNext) {
        for (int64_t j = 0; j < nb; ++j) en[j] = -next->vv[j0 + j];
      }
      for (int64_t i = 0; i < K; ++i) {
        const A c = -beta * kk[i];
        const A ai = av[i];
        const A qi = qq[i];
        const A ri = kNext ? kr_next[i] : A(0);
        A* __restrict Si = S + i * V + j0;
        if constexpr (kMomentum) {
          A* __restrict Zi = Z + i * V + j0;
#pragma omp simd
          for (int64_t j = 0; j < nb; ++j) {
            const A z = e_ * Zi[j] + c * ps[j];
            Zi[j] = z;
            const A sv = ai * Si[j] + z;
            Si[j] = sv;
            acc[j] += sv * qi;
            if constexpr (kNext) en[j] += sv * ri;
          }
        } else {
#pragma omp simd
          for (int64_t j = 0; j < nb; ++j) {
            const A sv = ai * Si[j] + c * ps[j];
            Si[j] = sv;
            acc[j] += sv * qi;
            if constexpr (kNext) en[j] += sv * ri;
          }
        }
      }
      if (o) {
        for (int64_t j = 0; j < nb; ++j) o[j0 + j] = acc[j];
      }
      if constexpr (kNext) {
        for (int64_t j = 0; j < nb; ++j) e_next[j0 + j] = en[j];
      }
    });
  }

  // update_rows on one full block of columns [j0, j0 + kBlock), its accumulators in registers.
  template <bool kMomentum, bool kNext>
  RETAIN_FORCE_INLINE void update_block(A* __restrict S, A* __restrict Z, const A* __restrict psi,
                                        A* __restrict o, const Unit* next, A* __restrict e_next, int64_t j0) const {
    using VT = typename Vec<A>::type;
    constexpr int64_t L = kLanes<A>, NV = kBlock<A> / kLanes<A>;
    const int64_t K = P.K, V = P.V;
    VT ps[NV], acc[NV], en[NV];
    for (int64_t b = 0; b < NV; ++b) {
      ps[b] = vload(psi + j0 + b * L);
      acc[b] = VT{};
      if constexpr (kNext) en[b] = -vload(next->vv.data() + j0 + b * L);
    }
    for (int64_t i = 0; i < K; ++i) {
      const A c = -beta * kk[i];
      const A ai = av[i];
      const A qi = qq[i];
      const A ri = kNext ? next->kr[i] : A(0);
      A* __restrict Si = S + i * V + j0;
      for (int64_t b = 0; b < NV; ++b) {
        VT sv;
        if constexpr (kMomentum) {
          A* __restrict Zi = Z + i * V + j0;
          const VT z = eta * vload(Zi + b * L) + c * ps[b];
          vstore(Zi + b * L, z);
          sv = ai * vload(Si + b * L) + z;
        } else {
          sv = ai * vload(Si + b * L) + c * ps[b];
        }
        vstore(Si + b * L, sv);
        acc[b] += sv * qi;
        if constexpr (kNext) en[b] += sv * ri;
      }
    }
    for (int64_t b = 0; b < NV; ++b) {
      if (o) vstore(o + j0 + b * L, acc[b]);
      if constexpr (kNext) vstore(e_next + j0 + b * L, en[b]);
    }
  }

  // psi from an error formed elsewhere (the fused pass of the previous step).
  RETAIN_FORCE_INLINE void finish_error(const A* __restrict e, A* __restrict psi) const {
    const int64_t V = P.V;
    if (static_cast<Objective>(P.objective) == Objective::L2) {
      std::copy(e, e + V, psi);  // the delta rule: psi = e
      return;
    }
    for (int64_t j = 0; j < V; ++j) psi[j] = obj.psi(e[j]);
  }

  // This unit's [N,H,K,V] state and its checkpoint c in [B,H,NC,K,V].
  int64_t state_offset() const { return (seq * P.H + h) * P.K * P.V; }
  // Segment j of this sequence in states [B, NS, H, K, V]; with cu_seqlens the sequences'
  // segments follow each other in row 0.
  int64_t states_offset(int64_t j) const {
    int64_t first = 0;
    if (P.cu_seqlens) {
      for (int64_t m = 0; m < seq; ++m) first += (P.cu_seqlens[m + 1] - P.cu_seqlens[m]) / P.states_every;
    }
    return ((b * P.states_rows + first + j) * P.H + h) * P.K * P.V;
  }
  int64_t ckpt_offset(int64_t c) const { return ((b * P.H + h) * P.num_ckpt() + c) * P.K * P.V; }
};

// Buffers one thread reuses across its units.
template <typename A>
struct Workspace {
  Buffer<A> S, Z, e, psi, o;                  // forward
  Buffer<A> Sbuf, Zbuf, ebuf, psibuf;         // backward: one chunk of states, e and psi
  Buffer<A> dS, dZ, dZt, w, de, dkk, dqq, da, go;
  Workspace(int64_t K, int64_t V, int64_t C, bool momentum, bool backward)
      : S(K * V), Z(momentum ? K * V : 0), e(V), psi(V), o(V) {
    if (!backward) return;
    const int64_t KV = K * V;
    Sbuf.resize((C + 1) * KV);
    Zbuf.resize(momentum ? (C + 1) * KV : 0);
    ebuf.resize(C * V);
    psibuf.resize(C * V);
    dS.resize(KV);
    dZ.resize(momentum ? KV : 0);
    dZt.resize(momentum ? KV : 0);
    w.resize(V), de.resize(V), go.resize(V);
    dkk.resize(K), dqq.resize(K), da.resize(K);
  }
};

// The forward of one (sequence, head) unit.
template <typename T>
RETAIN_FORCE_INLINE void fwd_unit(const MemoryScanParams<T>& P, int64_t n, Workspace<Acc<T>>& ws) {
  const int64_t V = P.V, KV = P.K * V, C = P.ckpt_every, L = P.states_every;
  const bool momentum = P.momentum;
  Unit<T> u(P, n);
  const int64_t so = u.state_offset();
  load_pair(ws.S.data(), ws.Z.data(), P.initial_S, P.initial_Z, so, KV, momentum);
  // cur is step t, nxt step t+1: the pass that updates S for step t also forms e of step t+1
  Unit<T> u2(P, n);
  Unit<T>* cur = &u;
  Unit<T>* nxt = &u2;
  const bool dot = static_cast<Objective>(P.objective) == Objective::Dot;
  if (u.t0 < u.t1) {
    u.load(u.t0);
    u.error(ws.S.data(), ws.e.data(), ws.psi.data());
  }
  for (int64_t t = u.t0; t < u.t1; ++t) {
    if (P.ckpt_S && t % C == 0) {  // every slot c*C < T is written by the sequence holding it
      store_pair(P.ckpt_S, P.ckpt_Z, ws.S.data(), ws.Z.data(), u.ckpt_offset(t / C), KV, momentum);
    }
    const bool more = t + 1 < u.t1;
    if (t + 2 < u.t1) u.prefetch(t + 2);
    if (more) nxt->load(t + 1);
    cur->update(ws.S.data(), momentum ? ws.Z.data() : nullptr, ws.psi.data(), ws.o.data(),
                more && !dot ? nxt : nullptr, ws.e.data());
    if (more) {
      if (dot) nxt->error(ws.S.data(), ws.e.data(), ws.psi.data());  // psi = -v: no pass over S
      else nxt->finish_error(ws.e.data(), ws.psi.data());
    }
    T* op = P.o + u.row(t) * V;
    for (int64_t j = 0; j < V; ++j) store_as(op[j], ws.o[j]);
    std::swap(cur, nxt);
    if (L > 0 && (t - u.t0 + 1) % L == 0) {
      const int64_t s_idx = (t - u.t0 + 1) / L - 1;
      copy_state(P.states + u.states_offset(s_idx), ws.S.data(), KV);
    }
  }
  store_pair(P.final_S, P.final_Z, ws.S.data(), ws.Z.data(), so, KV, momentum);
}

// The backward of one (sequence, head) unit.
template <typename T>
RETAIN_FORCE_INLINE void bwd_unit(const MemoryScanParams<T>& P, const MemoryScanGrads<T>& G, int64_t n,
                                  Workspace<Acc<T>>& ws) {
  using A = Acc<T>;
  const int64_t K = P.K, V = P.V, KV = K * V, C = P.ckpt_every, L = P.states_every;
  const bool momentum = P.momentum;
  const bool dot = static_cast<Objective>(P.objective) == Objective::Dot;
  // states after each step of one chunk (Sbuf[0] = state before the chunk), and per-step e, psi
  Unit<T> u(P, n);
  const int64_t so = u.state_offset();
  load_pair(ws.dS.data(), ws.dZ.data(), G.grad_final_S, G.grad_final_Z, so, KV, momentum);
  int64_t ce = u.t1;
  while (ce > u.t0) {
    const int64_t cs = std::max(u.t0, ((ce - 1) / C) * C);
    const int64_t len = ce - cs;
    // recompute the chunk's states from its checkpoint (or the initial state)
    A* S0 = ws.Sbuf.data();
    if (cs == u.t0) {
      load_pair(S0, ws.Zbuf.data(), P.initial_S, P.initial_Z, so, KV, momentum);
    } else {
      load_pair(S0, ws.Zbuf.data(), P.ckpt_S, P.ckpt_Z, u.ckpt_offset(cs / C), KV, momentum);
    }
    for (int64_t i = 0; i < len; ++i) {
      A* Snext = ws.Sbuf.data() + (i + 1) * KV;
      copy_state(Snext, ws.Sbuf.data() + i * KV, KV);
      A* Znext = nullptr;
      if (momentum) {
        Znext = ws.Zbuf.data() + (i + 1) * KV;
        copy_state(Znext, ws.Zbuf.data() + i * KV, KV);
      }
      if (i + 2 < len) u.prefetch(cs + i + 2);
      u.load(cs + i);
      u.error(ws.Sbuf.data() + i * KV, ws.ebuf.data() + i * V, ws.psibuf.data() + i * V);
      u.update(Snext, Znext, ws.psibuf.data() + i * V, nullptr);
    }
    // walk the chunk backwards
    for (int64_t i = len - 1; i >= 0; --i) {
      const int64_t t = cs + i;
      if (i >= 2) u.prefetch_grads(G, t - 2);
      const int64_t r = u.row(t);
      u.load(t);
      const A* Sprev = ws.Sbuf.data() + i * KV;
      const A* Scur = ws.Sbuf.data() + (i + 1) * KV;
      const A* Zprev = momentum ? ws.Zbuf.data() + i * KV : nullptr;
      const A* __restrict e = ws.ebuf.data() + i * V;
      const A* __restrict psi = ws.psibuf.data() + i * V;
      if (L > 0 && G.grad_states && (t - u.t0 + 1) % L == 0) {
        const int64_t s_idx = (t - u.t0 + 1) / L - 1;
        const A* gs = G.grad_states + u.states_offset(s_idx);
        for (int64_t x = 0; x < KV; ++x) ws.dS[x] += gs[x];
      }
      A* __restrict gov = ws.go.data();
      A* __restrict wv = ws.w.data();
      for (int64_t j = 0; j < V; ++j) gov[j] = load_as<A>(G.grad_o[r * V + j]), wv[j] = A(0);
      // pass A: o_t = S_tᵀ q̃ feeds dS and dq̃; dZ_t = dS_t (+ the momentum carry). Columns
      // outer, rows inner, so w = dZ_tᵀ k stays in registers across the rows of a full block.
      A deta = 0;
      ws.dqq.fill(A(0));
      ws.dkk.fill(A(0));
      column_blocks<A>(V, [&](int64_t j0, auto nb) {
        if constexpr (!std::is_same_v<decltype(nb), int64_t>) {
          using VT = typename Vec<A>::type;
          constexpr int64_t Lv = kLanes<A>, NV = kBlock<A> / kLanes<A>;
          VT gv[NV], pv[NV], wb[NV], ev = VT{};
          for (int64_t b = 0; b < NV; ++b) {
            gv[b] = vload(gov + j0 + b * Lv);
            pv[b] = vload(psi + j0 + b * Lv);
            wb[b] = VT{};
          }
          for (int64_t i2 = 0; i2 < K; ++i2) {
            A* __restrict dSi = ws.dS.data() + i2 * V + j0;
            const A* __restrict Si = Scur + i2 * V + j0;
            const A qi = u.qq[i2];
            const A ki = u.kk[i2];
            VT pq = VT{}, pk = VT{};
            for (int64_t b = 0; b < NV; ++b) {
              const VT ds = vload(dSi + b * Lv) + qi * gv[b];
              vstore(dSi + b * Lv, ds);
              pq += vload(Si + b * Lv) * gv[b];
              VT dz = ds;
              if (momentum) {
                A* __restrict dZci = ws.dZ.data() + i2 * V + j0;
                dz = ds + vload(dZci + b * Lv);
                vstore(ws.dZt.data() + i2 * V + j0 + b * Lv, dz);
                ev += dz * vload(Zprev + i2 * V + j0 + b * Lv);
                vstore(dZci + b * Lv, u.eta * dz);
              }
              wb[b] += dz * ki;
              pk += dz * pv[b];
            }
            ws.dqq[i2] += vsum<A>(pq);
            ws.dkk[i2] += vsum<A>(pk);
          }
          for (int64_t b = 0; b < NV; ++b) vstore(wv + j0 + b * Lv, wb[b]);
          deta += vsum<A>(ev);
        } else {
          for (int64_t i2 = 0; i2 < K; ++i2) {
            A* __restrict dSi = ws.dS.data() + i2 * V;
            const A* __restrict Si = Scur + i2 * V;
            const A qi = u.qq[i2];
            const A ki = u.kk[i2];
            A pq = 0, pk = 0;
            for (int64_t j = j0; j < j0 + nb; ++j) {
              const A ds = dSi[j] + qi * gov[j];
              dSi[j] = ds;
              pq += Si[j] * gov[j];
              A dz = ds;
              if (momentum) {
                dz = ds + ws.dZ[i2 * V + j];
                ws.dZt[i2 * V + j] = dz;
                deta += dz * Zprev[i2 * V + j];
                ws.dZ[i2 * V + j] = u.eta * dz;
              }
              wv[j] += dz * ki;
              pk += dz * psi[j];
            }
            ws.dqq[i2] += pq;
            ws.dkk[i2] += pk;
          }
        }
      });
      for (int64_t i2 = 0; i2 < K; ++i2) ws.dkk[i2] *= -u.beta;
      // psi's gradient, beta's, and through psi(e) to e and v
      A dbeta = 0;
      T* gv = G.grad_v + r * V;
      for (int64_t j = 0; j < V; ++j) {
        const A dpsi = -u.beta * ws.w[j];
        dbeta -= psi[j] * ws.w[j];
        if (dot) {
          ws.de[j] = A(0);
          store_as(gv[j], -dpsi);
        } else {
          ws.de[j] = u.obj.dpsi(e[j]) * dpsi;
          store_as(gv[j], -ws.de[j]);
        }
      }
      // pass B: e = (r ⊙ S_{t-1})ᵀ k − v and S_t = a ⊙ S_{t-1} + Z_t, back to S_{t-1}, k and a
      const A* __restrict dev = ws.de.data();
      for (int64_t i2 = 0; i2 < K; ++i2) {
        A* __restrict dSi = ws.dS.data() + i2 * V;
        const A* __restrict Spi = Sprev + i2 * V;
        const A ai = u.av[i2];
        const A rk = P.retention_first ? ai : A(1);
        const A c = rk * u.kk[i2];
        using VT = typename Vec<A>::type;
        VT vsd = VT{}, vda = VT{};  // per-lane partial sums of full blocks, in registers
        A sd = 0, dai = 0;          // and of the tail
        column_blocks<A>(V, [&](int64_t j0, auto nb) {
          if constexpr (!std::is_same_v<decltype(nb), int64_t>) {
            for (int64_t b = 0; b < kBlock<A>; b += kLanes<A>) {
              const VT sp = vload(Spi + j0 + b);
              const VT dv = vload(dev + j0 + b);
              const VT ds = vload(dSi + j0 + b);
              vsd += sp * dv;
              vda += ds * sp;
              vstore(dSi + j0 + b, ai * ds + c * dv);
            }
          } else {
            for (int64_t j = j0; j < j0 + nb; ++j) {
              sd += Spi[j] * dev[j];
              dai += dSi[j] * Spi[j];
              dSi[j] = ai * dSi[j] + c * dev[j];
            }
          }
        });
        sd += vsum<A>(vsd);
        dai += vsum<A>(vda);
        ws.dkk[i2] += rk * sd;
        ws.da[i2] = dai + (P.retention_first ? u.kk[i2] * sd : A(0));
      }
      // to the raw inputs: gates in log space, l2-normalised q and k
      if (G.grad_g) {
        if (static_cast<GateKind>(P.gate_kind) == GateKind::PerHead) {
          A s = 0;
          for (int64_t i2 = 0; i2 < K; ++i2) s += ws.da[i2];
          store_as(G.grad_g[r], s * u.dretention(u.av[0]));
        } else {
          for (int64_t i2 = 0; i2 < K; ++i2) store_as(G.grad_g[r * K + i2], ws.da[i2] * u.dretention(u.av[i2]));
        }
      }
      store_as(G.grad_beta[r], dbeta);
      if (G.grad_eta) store_as(G.grad_eta[r], momentum ? deta : A(0));
      // q̃ = scale · q · rstd(q): dq = scale · rstd · (dq̃' − q̂ (q̂·dq̃')) with q̂ = q · rstd
      A qdot = 0, kdot = 0;
      for (int64_t i2 = 0; i2 < K; ++i2) {
        qdot += u.qnorm_in[i2] * u.q_rstd * ws.dqq[i2];
        kdot += u.knorm_in[i2] * u.k_rstd * ws.dkk[i2];
      }
      T* gq = G.grad_q + r * K;
      T* gk = G.grad_k + r * K;
      for (int64_t i2 = 0; i2 < K; ++i2) {
        A dq = ws.dqq[i2], dk = ws.dkk[i2];
        if (P.l2norm) {
          dq = u.q_rstd * (dq - u.qnorm_in[i2] * u.q_rstd * qdot);
          dk = u.k_rstd * (dk - u.knorm_in[i2] * u.k_rstd * kdot);
        }
        store_as(gq[i2], dq * P.scale);
        store_as(gk[i2], dk);
      }
    }
    ce = cs;
  }
  store_pair(G.grad_initial_S, G.grad_initial_Z, ws.dS.data(), ws.dZ.data(), so, KV, momentum);
}

}  // namespace

template <CpuCapability C, typename T>
void memory_scan_fwd_cpu(const MemoryScanParams<T>& P, int nthreads) {
  const int64_t per_unit = P.T / std::max<int64_t>(P.N, 1) * P.K * P.V * 6;
  parallel_for(P.N * P.H, per_unit, nthreads, [&](int64_t u0, int64_t u1) {
    Workspace<Acc<T>> ws(P.K, P.V, P.ckpt_every, P.momentum, false);
    for (int64_t n = u0; n < u1; ++n) fwd_unit<T>(P, n, ws);
  });
}

template <CpuCapability C, typename T>
void memory_scan_bwd_cpu(const MemoryScanParams<T>& P, const MemoryScanGrads<T>& G, int nthreads) {
  const int64_t per_unit = P.T / std::max<int64_t>(P.N, 1) * P.K * P.V * 14;
  parallel_for(P.N * P.H, per_unit, nthreads, [&](int64_t u0, int64_t u1) {
    Workspace<Acc<T>> ws(P.K, P.V, P.ckpt_every, P.momentum, true);
    for (int64_t n = u0; n < u1; ++n) bwd_unit<T>(P, G, n, ws);
  });
}


#define RETAIN_INSTANTIATE(T)                                                              \
  template void memory_scan_fwd_cpu<kThisCpu, T>(const MemoryScanParams<T>&, int);                   \
  template void memory_scan_bwd_cpu<kThisCpu, T>(const MemoryScanParams<T>&, const MemoryScanGrads<T>&, int);
RETAIN_FOR_EACH_FLOATING(RETAIN_INSTANTIATE)
#undef RETAIN_INSTANTIATE

}  // namespace retain::scan
