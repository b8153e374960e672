// Checks the margin family's CUDA kernels (tm_loss_cuda.cu, kl_imitation_cuda.cu,
// feature_imitation_cuda.cu), run on the CPU under the fiber emulation of cuda_runtime.h, against
// the CPU kernels: row sums and counts, losses and log-sum-exps, every gradient; outputs start as
// NaN so an unwritten element fails. Row lengths straddle the block sizes (32 ... 256 threads)
// and warp boundaries. Built and run by tests/ops/margin/test_cuda_emulated.py.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "compare.h"
#include "margin/feature_imitation.h"
#include "margin/kl_imitation.h"
#include "margin/tm_loss.h"

using namespace retain;
using namespace retain::margin;

using emu_check::cmp;
using emu_check::nans;
using emu_check::randn;
using emu_check::val;

template <class T>
double tol_of() {
  return sizeof(T) == 8 ? 1e-10 : (sizeof(T) == 4 ? 2e-5 : 1e-2);
}

template <class T>
const char* name_of() {
  return sizeof(T) == 8 ? "f64" : (sizeof(T) == 4 ? "f32" : "16bit");
}

template <class T, class Lab>
void tm_case(int64_t B, int64_t L, int64_t D, bool per_sample, bool masked, unsigned seed) {
  using A = Acc<T>;
  std::mt19937 r(seed);
  const int64_t rows = B * L;
  auto h = randn<T>(r, rows * D, 1.0);
  std::uniform_int_distribution<int> lab(-1, 1);
  std::vector<int8_t> l8(rows * D);
  for (auto& e : l8) e = static_cast<int8_t>(lab(r));
  const int64_t label_row = std::is_same_v<Lab, uint8_t> ? (D + 3) / 4 : D;
  std::vector<Lab> labels(rows * label_row, 0);
  for (int64_t row = 0; row < rows; ++row)
    for (int64_t d = 0; d < D; ++d) {
      if constexpr (std::is_same_v<Lab, uint8_t>) {
        const int code = l8[row * D + d] > 0 ? 1 : (l8[row * D + d] < 0 ? 2 : 0);
        labels[row * label_row + d / 4] = static_cast<uint8_t>(labels[row * label_row + d / 4] | (code << (2 * (d % 4))));
      } else {
        labels[row * D + d] = l8[row * D + d];
      }
    }
  std::uniform_real_distribution<double> u(0, 1);
  const int64_t nthr = per_sample ? B * D : D;
  std::vector<A> pos(nthr), neg(nthr);
  for (int64_t i = 0; i < nthr; ++i) pos[i] = static_cast<A>(0.2 + u(r)), neg[i] = static_cast<A>(-0.2 - u(r));
  std::vector<uint8_t> mask(rows, 1);
  if (masked)
    for (auto& m : mask) m = u(r) > 0.3;
  const uint8_t* mp = masked ? mask.data() : nullptr;
  const std::string tag = std::string("tm ") + name_of<T>() + (std::is_same_v<Lab, uint8_t> ? " packed" : " int8") +
                          " B" + std::to_string(B) + " L" + std::to_string(L) + " D" + std::to_string(D) +
                          (per_sample ? " per-sample" : "") + (masked ? " masked" : "");
  std::vector<double> sum_c = nans<double>(rows), sum_e = nans<double>(rows);
  std::vector<int64_t> cnt_c(rows, -1), cnt_e(rows, -1);
  tm_loss_fwd_cpu<retain::CpuCapability::Default, T, Lab, A>(h.data(), labels.data(), label_row, pos.data(), neg.data(), per_sample, mp, B, L, D,
                             sum_c.data(), cnt_c.data(), nullptr, 1);
  tm_loss_fwd_cuda<T, Lab, A>(h.data(), labels.data(), label_row, pos.data(), neg.data(), per_sample, mp, B, L, D,
                              sum_e.data(), cnt_e.data(), 0);
  cmp(tag + " row_sum", sum_c, sum_e, tol_of<T>());
  cmp(tag + " row_count", cnt_c, cnt_e, 0.0);
  const double scale = 0.37;
  auto g_c = nans<T>(rows * D), g_e = nans<T>(rows * D);
  tm_loss_bwd_cpu<retain::CpuCapability::Default, T, Lab, A>(h.data(), labels.data(), label_row, pos.data(), neg.data(), per_sample, mp, B, L, D,
                             scale, g_c.data(), 1);
  tm_loss_bwd_cuda<T, Lab, A>(h.data(), labels.data(), label_row, pos.data(), neg.data(), per_sample, mp, B, L, D,
                              &scale, g_e.data(), 0);
  cmp(tag + " grad_h", g_c, g_e, 0.0);  // +-scale or 0: exact
}

template <class T>
void kl_case(int64_t N, int64_t V, double inv_t, bool masked, bool minus_inf, unsigned seed) {
  std::mt19937 r(seed);
  auto z = randn<T>(r, N * V, 3.0), q = randn<T>(r, N * V, 3.0);
  if (minus_inf)  // ruled-out tokens of the reference: zero probability
    for (int64_t i = 0; i < N * V; i += 7) store_as(q[i], -std::numeric_limits<double>::infinity());
  std::uniform_real_distribution<double> u(0, 1);
  std::vector<uint8_t> mask(N, 1);
  if (masked)
    for (auto& m : mask) m = u(r) > 0.3;
  const uint8_t* mp = masked ? mask.data() : nullptr;
  const std::string tag = std::string("kl ") + name_of<T>() + " N" + std::to_string(N) + " V" + std::to_string(V) +
                          (masked ? " masked" : "") + (minus_inf ? " -inf" : "");
  auto loss_c = nans<double>(N), lse_c = nans<double>(N), lr_c = nans<double>(N);
  auto loss_e = nans<double>(N), lse_e = nans<double>(N), lr_e = nans<double>(N);
  kl_imitation_fwd_cpu<retain::CpuCapability::Default, T>(z.data(), q.data(), mp, N, V, inv_t, loss_c.data(), lse_c.data(), lr_c.data(), 1);
  kl_imitation_fwd_cuda<T>(z.data(), q.data(), mp, N, V, inv_t, loss_e.data(), lse_e.data(), lr_e.data(), 0);
  // the CPU's exp is a polynomial within 2 ulp of expf: float rows agree to a few ulp of log V
  const double tol = sizeof(T) == 8 ? 1e-9 : 1e-4;
  cmp(tag + " loss", loss_c, loss_e, tol);
  cmp(tag + " lse", lse_c, lse_e, tol);
  cmp(tag + " lse_ref", lr_c, lr_e, tol);
  std::vector<double> g(N);
  for (auto& e : g) e = u(r) - 0.5;
  auto gz_c = nans<T>(N * V), gq_c = nans<T>(N * V), gz_e = nans<T>(N * V), gq_e = nans<T>(N * V);
  kl_imitation_bwd_cpu<retain::CpuCapability::Default, T>(z.data(), q.data(), g.data(), loss_c.data(), lse_c.data(), lr_c.data(), N, V, inv_t,
                          gz_c.data(), gq_c.data(), 1);
  kl_imitation_bwd_cuda<T>(z.data(), q.data(), g.data(), loss_c.data(), lse_c.data(), lr_c.data(), N, V, inv_t,
                           gz_e.data(), gq_e.data(), 0);
  cmp(tag + " grad_z", gz_c, gz_e, tol);
  cmp(tag + " grad_z_ref", gq_c, gq_e, tol);
}

template <class T>
void feature_case(int64_t N, int64_t D, int p, bool masked, unsigned seed) {
  std::mt19937 r(seed);
  auto h = randn<T>(r, N * D, 1.0), q = randn<T>(r, N * D, 1.0);
  std::uniform_real_distribution<double> u(0, 1);
  std::vector<uint8_t> mask(N, 1);
  if (masked)
    for (auto& m : mask) m = u(r) > 0.3;
  const uint8_t* mp = masked ? mask.data() : nullptr;
  const std::string tag = std::string("feature ") + name_of<T>() + " N" + std::to_string(N) + " D" +
                          std::to_string(D) + " p" + std::to_string(p) + (masked ? " masked" : "");
  auto loss_c = nans<double>(N), loss_e = nans<double>(N);
  feature_imitation_fwd_cpu<retain::CpuCapability::Default, T>(h.data(), q.data(), mp, N, D, p, loss_c.data(), 1);
  feature_imitation_fwd_cuda<T>(h.data(), q.data(), mp, N, D, p, loss_e.data(), 0);
  cmp(tag + " loss", loss_c, loss_e, sizeof(T) == 8 ? 1e-10 : 1e-5);
  std::vector<double> g(N);
  for (auto& e : g) e = u(r) - 0.5;
  auto gh_c = nans<T>(N * D), gq_c = nans<T>(N * D), gh_e = nans<T>(N * D), gq_e = nans<T>(N * D);
  feature_imitation_bwd_cpu<retain::CpuCapability::Default, T>(h.data(), q.data(), g.data(), mp, N, D, p, gh_c.data(), gq_c.data(), 1);
  feature_imitation_bwd_cuda<T>(h.data(), q.data(), g.data(), mp, N, D, p, gh_e.data(), gq_e.data(), 0);
  cmp(tag + " grad_h", gh_c, gh_e, tol_of<T>());
  cmp(tag + " grad_h_ref", gq_c, gq_e, tol_of<T>());
}

int main() {
  setvbuf(stdout, nullptr, _IONBF, 0);
  unsigned seed = 1;
  for (int64_t D : {1, 5, 31, 32, 33, 100, 255, 256, 257, 700}) {
    tm_case<float, int8_t>(2, 2, D, false, true, seed++);
    tm_case<float, uint8_t>(2, 2, D, true, true, seed++);
    tm_case<double, int8_t>(1, 3, D, true, false, seed++);
    tm_case<bf16_t, uint8_t>(1, 2, D, false, true, seed++);
    kl_case<float>(3, D, 0.5, true, false, seed++);
    kl_case<double>(3, D, 1.0, false, D > 1, seed++);
    kl_case<float>(2, D, 1.0, false, D > 1, seed++);
    kl_case<f16_t>(2, D, 1.0, true, false, seed++);
    for (int p : {1, 2}) {
      feature_case<float>(3, D, p, true, seed++);
      feature_case<double>(2, D, p, false, seed++);
      feature_case<bf16_t>(2, D, p, true, seed++);
    }
  }
  return emu_check::report();
}
