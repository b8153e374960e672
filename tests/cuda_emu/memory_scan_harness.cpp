// Checks memory_scan_cuda.cu, run on the CPU under the fiber emulation of cuda_runtime.h (every
// thread of a block a fiber, __syncthreads and warp shuffles barriers, shared memory and the
// backward's workspace poisoned with NaN), against the CPU kernel: forward outputs, checkpoints,
// cached states and every gradient. Built and run by tests/ops/scan/test_cuda_emulated.py.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>
#include <string>
#include <limits>
#include "scan/memory_scan.h"
using namespace retain;
using namespace retain::scan;
#include <cuda_runtime.h>

struct Cfg {
  int64_t B = 1, T = 5, H = 1, K = 3, V = 5, HK = 0;  // HK: key heads (0: H)
  std::vector<int64_t> cu;
  int objective = 1, gate = 0;
  bool gate_log = true, rf = false, mom = false, l2 = false, init = false, gfinal = false, gstates = false;
  int64_t L = 0, C = 4;
  double scale = 0.7;
};

template <class T> std::vector<T> rnd(std::mt19937& r, int64_t n, double lo, double hi, bool gauss = false) {
  std::vector<T> x(n);
  std::normal_distribution<double> nd(0, 1);
  std::uniform_real_distribution<double> ud(lo, hi);
  for (auto& e : x) { double d = gauss ? nd(r) * hi : ud(r); store_as(e, d); }
  return x;
}
template <class T> double val(const T& x) { return (double)load_as<double>(x); }
template <class T> std::vector<T> nans(int64_t n) {
  std::vector<T> x(n);
  for (auto& e : x) store_as(e, std::numeric_limits<double>::quiet_NaN());
  return x;
}
static int fails = 0;
template <class T> void cmp(const char* what, const std::vector<T>& a, const std::vector<T>& b, double tol, const std::string& tag) {
  double m = 0, ref = 1e-30; int64_t bad = -1;
  for (size_t i = 0; i < a.size(); ++i) {
    double x = val(a[i]), y = val(b[i]);
    if (std::isnan(x) != std::isnan(y)) { bad = i; m = INFINITY; break; }
    if (std::isnan(x)) continue;
    m = std::max(m, std::fabs(x - y)); ref = std::max(ref, std::fabs(x));
  }
  if (m > tol * std::max(ref, 1.0) || bad >= 0) {
    ++fails;
    printf("FAIL %s %s: maxdiff %g ref %g (first nan mismatch %ld: cpu %g emu %g)\n", tag.c_str(), what, m, ref, (long)bad,
           bad >= 0 ? val(a[bad]) : 0.0, bad >= 0 ? val(b[bad]) : 0.0);
  }
}

template <class T> void run(const Cfg& c, double tol, unsigned seed) {
  using A = Acc<T>;
  std::mt19937 r(seed);
  const int64_t B = c.B, Tn = c.T, H = c.H, K = c.K, V = c.V;
  const int64_t N = c.cu.empty() ? B : (int64_t)c.cu.size() - 1;
  const int64_t R = B * Tn * H, RK = B * Tn * (c.HK ? c.HK : H);
  double ks = c.l2 ? 1.0 : 1.0 / std::sqrt((double)K);
  auto q = rnd<T>(r, RK * K, 0, 1.0, true), k = rnd<T>(r, RK * K, 0, ks, true), v = rnd<T>(r, R * V, 0, 1.0, true);
  auto beta = rnd<A>(r, R, 0.1, 0.9);
  std::vector<A> g;
  if (c.gate) g = c.gate_log ? rnd<A>(r, R * (c.gate == 2 ? K : 1), -0.3, -0.01) : rnd<A>(r, R * (c.gate == 2 ? K : 1), 0.7, 0.99);
  std::vector<A> eta; if (c.mom) eta = rnd<A>(r, R, 0.2, 0.9);
  auto S0 = rnd<A>(r, N * H * K * V, 0, 0.3, true), Z0 = rnd<A>(r, N * H * K * V, 0, 0.3, true);
  int64_t rows = 0;
  if (c.L) { if (c.cu.empty()) rows = Tn / c.L; else for (size_t m = 0; m + 1 < c.cu.size(); ++m) rows += (c.cu[m + 1] - c.cu[m]) / c.L; }
  const int64_t NC = (Tn + c.C - 1) / c.C;
  MemoryScanParams<T> P;
  P.q = q.data(); P.k = k.data(); P.v = v.data(); P.beta = beta.data(); P.g = c.gate ? g.data() : nullptr;
  P.eta = c.mom ? eta.data() : nullptr; P.initial_S = c.init ? S0.data() : nullptr; P.initial_Z = c.init && c.mom ? Z0.data() : nullptr;
  P.cu_seqlens = c.cu.empty() ? nullptr : c.cu.data();
  P.B = B; P.T = Tn; P.H = H; P.HK = c.HK; P.K = K; P.V = V; P.N = N; P.states_every = c.L; P.states_rows = rows; P.ckpt_every = c.C;
  P.scale = c.scale; P.p = 3; P.delta = 0.5; P.eps = 1e-6; P.objective = c.objective; P.gate_kind = c.gate;
  P.l2norm = c.l2; P.retention_first = c.rf; P.momentum = c.mom; P.gate_log = c.gate_log;
  struct Out { std::vector<T> o; std::vector<A> fS, fZ, st, cS, cZ; };
  auto mk = [&] { return Out{nans<T>(R * V), nans<A>(N * H * K * V), nans<A>(N * H * K * V), nans<A>(B * rows * H * K * V),
                             nans<A>(B * H * NC * K * V), nans<A>(B * H * NC * K * V)}; };
  Out oc = mk(), oe = mk();
  auto bind = [&](MemoryScanParams<T> p, Out& o) {
    p.o = o.o.data(); p.final_S = o.fS.data(); p.final_Z = c.mom ? o.fZ.data() : nullptr; p.states = c.L ? o.st.data() : nullptr;
    p.ckpt_S = o.cS.data(); p.ckpt_Z = c.mom ? o.cZ.data() : nullptr; return p; };
  auto Pc = bind(P, oc), Pe = bind(P, oe);
  memory_scan_fwd_cpu<retain::CpuCapability::Default, T>(Pc, 1);
  memory_scan_fwd_cuda<T>(Pe, 0);
  char tagb[512];
  snprintf(tagb, sizeof tagb, "[%s B%ld T%ld H%ld/%ld K%ld V%ld cu%zu obj%d gate%d log%d rf%d mom%d l2%d init%d L%ld C%ld]",
           sizeof(T) == 2 ? "16" : sizeof(T) == 4 ? "f32" : "f64", (long)B, (long)Tn, (long)H, (long)c.HK, (long)K, (long)V, c.cu.size(), c.objective,
           c.gate, c.gate_log, c.rf, c.mom, c.l2, c.init, (long)c.L, (long)c.C);
  std::string tag = tagb;
  cmp("o", oc.o, oe.o, tol, tag); cmp("final_S", oc.fS, oe.fS, tol, tag);
  if (c.mom) cmp("final_Z", oc.fZ, oe.fZ, tol, tag);
  if (c.L) cmp("states", oc.st, oe.st, tol, tag);
  cmp("ckpt_S", oc.cS, oe.cS, tol, tag);
  if (c.mom) cmp("ckpt_Z", oc.cZ, oe.cZ, tol, tag);
  // backward
  auto go = rnd<T>(r, R * V, 0, 1.0, true);
  auto gfS = rnd<A>(r, N * H * K * V, 0, 0.5, true), gfZ = rnd<A>(r, N * H * K * V, 0, 0.5, true);
  auto gst = rnd<A>(r, B * rows * H * K * V, 0, 0.5, true);
  struct G_ { std::vector<T> q, k, v; std::vector<A> b, g, e, S, Z; };
  auto mkg = [&] { return G_{nans<T>(R * K), nans<T>(R * K), nans<T>(R * V), nans<A>(R), nans<A>(g.size()), nans<A>(eta.size()),
                              nans<A>(N * H * K * V), nans<A>(N * H * K * V)}; };
  G_ gc = mkg(), ge = mkg();
  auto gb = [&](G_& x) {
    MemoryScanGrads<T> G;
    G.grad_o = go.data(); G.grad_final_S = c.gfinal ? gfS.data() : nullptr; G.grad_final_Z = c.gfinal && c.mom ? gfZ.data() : nullptr;
    G.grad_states = c.gstates && c.L ? gst.data() : nullptr;
    G.grad_q = x.q.data(); G.grad_k = x.k.data(); G.grad_v = x.v.data(); G.grad_beta = x.b.data();
    G.grad_g = c.gate ? x.g.data() : nullptr; G.grad_eta = c.mom ? x.e.data() : nullptr;
    G.grad_initial_S = c.init ? x.S.data() : nullptr; G.grad_initial_Z = c.init && c.mom ? x.Z.data() : nullptr;
    return G; };
  memory_scan_bwd_cpu<retain::CpuCapability::Default, T>(Pc, gb(gc), 1);
  const int64_t numel = memory_scan_cuda_work_numel(B, Tn, H, K, V, N, c.C, c.mom, c.gate != 0);
  std::vector<A> work(numel, std::numeric_limits<A>::quiet_NaN());
  memory_scan_bwd_cuda<T>(Pe, gb(ge), work.data(), numel, 0);
  cmp("dq", gc.q, ge.q, tol, tag); cmp("dk", gc.k, ge.k, tol, tag); cmp("dv", gc.v, ge.v, tol, tag);
  cmp("dbeta", gc.b, ge.b, tol, tag);
  if (c.gate) cmp("dg", gc.g, ge.g, tol, tag);
  if (c.mom) cmp("deta", gc.e, ge.e, tol, tag);
  if (c.init) { cmp("dS0", gc.S, ge.S, tol, tag); if (c.mom) cmp("dZ0", gc.Z, ge.Z, tol, tag); }
}

void set_sms(int s) { emu_sms = s; }

// Modes: 0 every objective x gate x variant at four K/V geometries (float64, float32 for one
// variant each); 1 the 32-rows-a-thread geometries (K = 256, 130); 2 edge cases (T = 0, empty
// sequences, K = V = 1, wide V, several SM counts) and 16-bit dtypes; 3 mode 0 at the two small
// geometries only.
int main(int argc, char** argv) {
  setvbuf(stdout, nullptr, _IONBF, 0);
  int mode = argc > 1 ? atoi(argv[1]) : 0;
  unsigned seed = 1;
  int count = 0;
  std::vector<std::pair<int64_t, int64_t>> KV = {{3, 5}, {16, 40}, {64, 37}, {100, 9}};
  if (mode == 1) KV = {{256, 12}, {130, 33}};
  if (mode == 2) KV.clear();
  if (mode == 3) KV = {{3, 5}, {16, 40}};
  for (auto [K, V] : KV)
    for (int obj = 0; obj < 4; ++obj)
      for (int gate = 0; gate < 3; ++gate)
        for (int var = 0; var < 4; ++var) {
          Cfg c; c.K = K; c.V = V; c.objective = obj; c.gate = gate;
          c.gate_log = var % 2 == 0; c.rf = var & 1; c.mom = (var >> 1) & 1; c.l2 = (var + obj) % 2;
          c.init = var != 1; c.gfinal = var != 2; c.gstates = true;
          c.L = (var == 3) ? 0 : 3; c.C = (var & 1) ? 4 : 64;
          if ((obj + gate) % 2) { c.cu = {0, 0, 4, 11}; c.T = 11; } else { c.B = 2; c.T = 9; c.H = 2; }
          if (mode == 1) { c.H = 1; c.B = 1; c.T = 6; c.cu.clear(); }
          run<double>(c, 1e-9, seed++);
          if (var == 0) run<float>(c, 2e-4, seed++);
          ++count;
        }
  if (mode == 2) {
    auto E = [&](Cfg c) { run<double>(c, 1e-9, seed++); ++count; };
    for (int sms : {1, 4, 1000}) {
      set_sms(sms);
      { Cfg c; c.T = 0; c.B = 2; c.H = 2; c.init = true; c.gfinal = true; c.mom = true; c.gate = 2; E(c); }
      { Cfg c; c.T = 0; c.cu = {0, 0, 0}; c.init = true; c.gfinal = true; E(c); }
      { Cfg c; c.T = 6; c.cu = {0, 0, 6, 6}; c.init = true; c.gfinal = true; c.L = 2; c.gstates = true; c.H = 3; c.gate = 1; E(c); }
      { Cfg c; c.K = 1; c.V = 1; c.T = 7; c.C = 1; c.mom = true; c.init = true; c.gfinal = true; c.l2 = true; c.gate = 2; E(c); }
      { Cfg c; c.K = 64; c.V = 64; c.T = 10; c.C = 3; c.B = 2; c.H = 2; c.mom = true; c.init = true; c.gate = 2; c.rf = true; c.l2 = true; c.L = 5; c.gstates = true; E(c); }
      { Cfg c; c.K = 8; c.V = 300; c.T = 5; c.C = 2; c.objective = 2; c.gate = 1; c.gate_log = false; E(c); }
      { Cfg c; c.K = 33; c.V = 31; c.T = 9; c.C = 4; c.cu = {0, 1, 2, 9}; c.L = 1; c.gstates = true; c.objective = 3; c.mom = true; c.init = true; E(c); }
      { Cfg c; c.K = 128; c.V = 4; c.T = 5; c.C = 5; c.objective = 0; c.gate = 2; c.rf = true; c.init = true; c.gfinal = true; E(c); }
      // grouped value heads: 4 value heads over 2 key heads (and over 1), packed sequences
      { Cfg c; c.K = 8; c.V = 6; c.T = 7; c.C = 3; c.B = 2; c.H = 4; c.HK = 2; c.gate = 1; c.l2 = true; c.init = true; c.gfinal = true; c.L = 2; c.gstates = true; E(c); }
      { Cfg c; c.K = 5; c.V = 3; c.T = 9; c.C = 4; c.cu = {0, 4, 9}; c.H = 4; c.HK = 1; c.gate = 2; c.mom = true; c.rf = true; E(c); }
    }
  }
  {
    Cfg c; c.K = 16; c.V = 20; c.gate = 1; c.mom = true; c.l2 = true; c.init = true; c.L = 2; c.gfinal = true; c.gstates = true; c.T = 7; c.C = 3;
    run<bf16_t>(c, 3e-2, 99); run<f16_t>(c, 3e-2, 98);
  }
  printf("configs %d fails %d\n", count, fails);
  return fails != 0;
}
