// Checks cached_readout_cuda.cu, run on the CPU under the fiber emulation of cuda_runtime.h, against
// the CPU kernel (cached_readout_cpu.cpp): the forward's y and gate scratch, the backward's six
// gradients and its gate and dz scratch, for every mode (residual, gated, sparse with top_k 1, 2
// and >= NS), float32, float64 and bfloat16; T not a multiple of L, extra cached states (their
// gradients must be exactly 0), one segment (NS = 0 or no state read), L = 1, no tokens, K or V
// past a block's threads, NaN router logits, and gradients not asked for (null). Outputs and
// scratch start as NaN so an unwritten element fails. Built and run by
// tests/ops/cache/test_cuda_emulated.py.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "cache/cached_readout.h"
#include "common/dtype.h"
#include "compare.h"

using namespace retain;
using namespace retain::cache;

using emu_check::cmp;
using emu_check::nans;
using emu_check::randn;
using emu_check::val;

constexpr auto kCpu = CpuCapability::Default;

// Which gradients a case asks for (bits of Cfg::want).
enum : unsigned { kDq = 1, kDu = 2, kDs = 4, kDc = 8, kDo = 16, kDok = 32, kAll = 63 };

struct Cfg {
  int mode = 1;  // ReadoutMode code
  int64_t B = 1, T = 7, H = 1, K = 5, V = 6, NS = 2, L = 3, top_k = 0;
  unsigned want = kAll;
  bool nan_router = false;  // a NaN in one token's router query: that token's gates are all NaN
  double scale = 0.37;
};

template <class T>
double tol_of() {
  return sizeof(T) == 8 ? 1e-10 : (sizeof(T) == 4 ? 5e-5 : 2e-2);
}

template <class T>
const char* name_of() {
  return sizeof(T) == 8 ? "f64" : (sizeof(T) == 4 ? "f32" : "bf16");
}

template <class T>
T* ptr_or_null(std::vector<T>& v, bool on) {
  return on && !v.empty() ? v.data() : nullptr;
}

// The gradient of state i (or segment key i) for i >= NR: read by no token, exactly 0.
template <class T>
void unread_zero(const std::string& what, const std::vector<T>& g, int64_t B, int64_t NS, int64_t per_state,
                 int64_t NR) {
  ++emu_check::checks;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = NR; i < NS; ++i)
      for (int64_t j = 0; j < per_state; ++j) {
        const double x = val(g[(b * NS + i) * per_state + j]);
        if (x != 0.0) {
          ++emu_check::fails;
          printf("FAIL %s: unread state %ld has gradient %g\n", what.c_str(), static_cast<long>(i), x);
          return;
        }
      }
}

template <class T>
void run_case(const Cfg& c, unsigned seed) {
  using A = Acc<T>;
  std::mt19937 r(seed);
  const int64_t B = c.B, Tn = c.T, H = c.H, K = c.K, V = c.V, NS = c.NS, L = c.L;
  const bool residual = c.mode == static_cast<int>(ReadoutMode::Residual);
  const int64_t NR = num_read(Tn, L, NS);
  const int64_t ntk = B * Tn * H * K, ntv = B * Tn * H * V, nst = B * NS * H * K * V, nsk = B * NS * H * K;
  const double ks = 1.5 / std::sqrt(static_cast<double>(K));  // router logits of order 1
  auto q = randn<T>(r, ntk, 1.0), o = randn<T>(r, ntv, 1.0), dy = randn<T>(r, ntv, 1.0);
  auto S = randn<T>(r, nst, 1.0);
  std::vector<T> u, ok, ck;
  if (!residual) {
    u = randn<T>(r, ntk, ks), ok = randn<T>(r, ntk, 1.0), ck = randn<T>(r, nsk, 1.0);
    if (c.nan_router && Tn > 0) store_as(u[((B - 1) * Tn + (Tn - 1)) * H * K], std::numeric_limits<double>::quiet_NaN());
  }
  const ReadoutArgs<T> a{q.data(), residual ? nullptr : u.data(), nst ? S.data() : nullptr,
                         residual || !nsk ? nullptr : ck.data(), o.data(), residual ? nullptr : ok.data(),
                         B, Tn, H, K, V, NS, L, c.mode, c.top_k, c.scale};
  std::string tag = std::string(name_of<T>()) + " mode" + std::to_string(c.mode) + " B" + std::to_string(B) + " T" +
                    std::to_string(Tn) + " H" + std::to_string(H) + " K" + std::to_string(K) + " V" +
                    std::to_string(V) + " NS" + std::to_string(NS) + " L" + std::to_string(L) + " top_k" +
                    std::to_string(c.top_k) + " want" + std::to_string(c.want) + (c.nan_router ? " nan" : "");
  printf("%s\n", tag.c_str());
  const bool scratch = !residual && NR > 0 && B * H * Tn > 0;
  const int64_t ng = scratch ? B * H * Tn * (NR + 1) : 0, nz = scratch ? B * H * Tn * NR : 0;

  // forward
  auto y_c = nans<T>(ntv), y_e = nans<T>(ntv);
  auto gates_f = nans<A>(ng);
  cached_readout_fwd_cpu<kCpu, T>(a, ptr_or_null(y_c, true), 1);
  cached_readout_fwd_cuda<T>(a, ptr_or_null(y_e, true), ptr_or_null(gates_f, true), 0);
  cmp(tag + " y", y_c, y_e, tol_of<T>());

  // backward
  const bool gated_only = !residual;
  auto dq_c = nans<T>(ntk), du_c = nans<T>(ntk), ds_c = nans<T>(nst), dc_c = nans<T>(nsk), do_c = nans<T>(ntv),
       dok_c = nans<T>(ntk);
  auto dq_e = dq_c, du_e = du_c, ds_e = ds_c, dc_e = dc_c, do_e = do_c, dok_e = dok_c;
  const bool wq = c.want & kDq, wu = (c.want & kDu) && gated_only, ws = c.want & kDs, wc = (c.want & kDc) && gated_only,
             wo = c.want & kDo, wok = (c.want & kDok) && gated_only;
  const ReadoutGrads<T> g_c{dy.data(), ptr_or_null(dq_c, wq), ptr_or_null(du_c, wu), ptr_or_null(ds_c, ws),
                            ptr_or_null(dc_c, wc), ptr_or_null(do_c, wo), ptr_or_null(dok_c, wok)};
  const ReadoutGrads<T> g_e{dy.data(), ptr_or_null(dq_e, wq), ptr_or_null(du_e, wu), ptr_or_null(ds_e, ws),
                            ptr_or_null(dc_e, wc), ptr_or_null(do_e, wo), ptr_or_null(dok_e, wok)};
  auto gates_c = nans<A>(ng), dz_c = nans<A>(nz), gates_e = nans<A>(ng), dz_e = nans<A>(nz);
  // the CPU backward both ways: fused (one thread) and as a token pass filling the scratch, then a
  // state pass (a thread count the heads do not divide evenly); the same bits either way
  const int split = static_cast<int>(4 * B * H + 1);
  if (cpu_backward_fused(B * H, split) || !cpu_backward_fused(B * H, 1)) {
    printf("FAIL %s: the thread counts do not pick both CPU backward paths\n", tag.c_str());
    ++emu_check::fails;
  }
  cached_readout_bwd_cpu<kCpu, T>(a, g_c, ptr_or_null(gates_c, true), ptr_or_null(dz_c, true), split);
  {
    auto dq_f = nans<T>(ntk), du_f = nans<T>(ntk), ds_f = nans<T>(nst), dc_f = nans<T>(nsk), do_f = nans<T>(ntv),
         dok_f = nans<T>(ntk), gates_x = nans<A>(ng), dz_x = nans<A>(nz);
    const ReadoutGrads<T> g_f{dy.data(), ptr_or_null(dq_f, wq), ptr_or_null(du_f, wu), ptr_or_null(ds_f, ws),
                              ptr_or_null(dc_f, wc), ptr_or_null(do_f, wo), ptr_or_null(dok_f, wok)};
    cached_readout_bwd_cpu<kCpu, T>(a, g_f, ptr_or_null(gates_x, true), ptr_or_null(dz_x, true), 1);
    cmp(tag + " fused grad_q", dq_f, dq_c, 0.0);  // tolerance 0: the same bits
    cmp(tag + " fused grad_u", du_f, du_c, 0.0);
    cmp(tag + " fused grad_states", ds_f, ds_c, 0.0);
    cmp(tag + " fused grad_seg_keys", dc_f, dc_c, 0.0);
    cmp(tag + " fused grad_o", do_f, do_c, 0.0);
    cmp(tag + " fused grad_online_keys", dok_f, dok_c, 0.0);
  }
  cached_readout_bwd_cuda<T>(a, g_e, ptr_or_null(gates_e, true), ptr_or_null(dz_e, true), 0);
  const double tol = tol_of<T>();
  if (wq) cmp(tag + " grad_q", dq_c, dq_e, tol);
  if (wu) cmp(tag + " grad_u", du_c, du_e, tol);
  if (ws) {
    cmp(tag + " grad_states", ds_c, ds_e, tol);
    unread_zero(tag + " grad_states", ds_e, B, NS, H * K * V, NR);
  }
  if (wc) {
    cmp(tag + " grad_seg_keys", dc_c, dc_e, tol);
    unread_zero(tag + " grad_seg_keys", dc_e, B, NS, H * K, NR);
  }
  if (wo) cmp(tag + " grad_o", do_c, do_e, tol);
  if (wok) cmp(tag + " grad_online_keys", dok_c, dok_e, tol);
  // the gate scratch: the CPU backward's, the CUDA forward's and backward's (every entry, kNotRead
  // where unread); dz where the CUDA backward needs it (du, d online_keys or dseg_keys wanted)
  if (scratch) {
    const double gtol = sizeof(A) == 8 ? 1e-12 : 1e-5;
    cmp(tag + " gates (forward)", gates_c, gates_f, gtol);
    if (wq || wu || ws || wc || wo || wok) cmp(tag + " gates (backward)", gates_c, gates_e, gtol);
    if (wu || wc || wok) cmp(tag + " dz", dz_c, dz_e, tol);
  }
}

template <class T>
void run_modes(Cfg c, unsigned& seed) {
  for (int mode : {0, 1, 2}) {
    c.mode = mode;
    if (mode != 2) {
      c.top_k = 0;
      run_case<T>(c, seed++);
      continue;
    }
    for (int64_t k : {int64_t{1}, int64_t{2}, c.NS + 1}) {
      c.top_k = k;
      run_case<T>(c, seed++);
    }
  }
}

// argv[1] "barriers": the cases whose token kernel runs several threads a row through its block
// reductions (the shuffled run, EMU_RANDOM); otherwise every case.
int main(int argc, char** argv) {
  setvbuf(stdout, nullptr, _IONBF, 0);
  const bool barriers_only = argc > 1 && std::string(argv[1]) == "barriers";
  unsigned seed = 1;
  Cfg c;
  // T = 11 in segments of 3 (the last one short): NR = 3, exactly the states read
  c.B = 2, c.T = 11, c.H = 2, c.K = 5, c.V = 7, c.L = 3, c.NS = 3;
  run_modes<float>(c, seed);
  if (!barriers_only) {
    run_modes<double>(c, seed);
    run_modes<bf16_t>(c, seed);
    c.NS = 5;
    run_modes<double>(c, seed);
    // L = 1: token t reads t states (top_k 1 and 2 select among up to 5)
    c.B = 1, c.T = 6, c.H = 2, c.K = 3, c.V = 4, c.L = 1, c.NS = 5;
    run_modes<float>(c, seed);
    // one segment: no state read (NS = 0, and NS = 2 of which none is read)
    c.B = 2, c.T = 5, c.H = 1, c.K = 4, c.V = 3, c.L = 8, c.NS = 0;
    run_modes<float>(c, seed);
    c.NS = 2;
    run_modes<double>(c, seed);
    // no tokens: the states' gradients are all 0
    c.B = 1, c.T = 0, c.NS = 2, c.L = 2;
    run_modes<float>(c, seed);
  }
  // K and V past the token kernel's threads (64 for 300), and not multiples of 32
  c.B = 1, c.T = 7, c.H = 1, c.K = 300, c.V = 5, c.L = 2, c.NS = 3;
  run_modes<float>(c, seed);
  c.K = 3, c.V = 300, c.T = 6;
  run_modes<double>(c, seed);
  c.K = 130, c.V = 9, c.T = 5;
  run_modes<bf16_t>(c, seed);
  if (barriers_only) return emu_check::report();
  // gradients not asked for (each skips a different part of the backward), residual, gated, sparse
  c.B = 1, c.T = 7, c.H = 2, c.K = 4, c.V = 3, c.L = 2, c.NS = 4;
  for (unsigned want : {unsigned{kDs}, unsigned{kDq}, unsigned{kDc}, unsigned{kDu | kDo}, unsigned{kDok},
                        unsigned{kDo}, 0u}) {
    c.want = want;
    for (int mode : {0, 1, 2}) {
      c.mode = mode, c.top_k = mode == 2 ? 2 : 0;
      run_case<float>(c, seed++);
    }
  }
  c.want = kAll;
  // a NaN router logit: that token's gates, and what they reach, are NaN on both sides
  c.B = 2, c.T = 9, c.H = 2, c.K = 6, c.V = 5, c.L = 2, c.NS = 5;
  c.nan_router = true;
  run_modes<float>(c, seed);
  return emu_check::report();
}
