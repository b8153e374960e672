// The portable (default-capability) CPU kernels, built without Python for another architecture
// (aarch64 in tests/test_cpu_capability.py, run under qemu-user): each family's forward on
// float32 data against plain loops. Sizes leave vector tails (37 features, 70 logits, K = V = 40).
// Prints "portable smoke: N checks, F failed" and exits non-zero when F > 0.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "margin/feature_imitation.h"
#include "margin/kl_imitation.h"
#include "margin/tm_loss.h"
#include "scan/linear_recurrence.h"
#include "scan/memory_scan.h"

using retain::CpuCapability;
constexpr CpuCapability kDefault = CpuCapability::Default;

namespace {

int checks = 0, failed = 0;

template <typename A, typename B>
void close(const char* what, const std::vector<A>& got, const std::vector<B>& want, double rtol, double atol) {
  ++checks;
  for (size_t i = 0; i < want.size(); ++i) {
    const double g = got[i], w = want[i];
    if (!(std::fabs(g - w) <= atol + rtol * std::fabs(w))) {
      std::printf("FAILED: %s: index %zu got %.9g want %.9g\n", what, i, g, w);
      ++failed;
      return;
    }
  }
}

std::mt19937 rng(0);
std::vector<float> randn(size_t n, float sd = 1.0f) {
  std::normal_distribution<float> d(0.0f, sd);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}
std::vector<float> uniform(size_t n, float lo, float hi) {
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

void linear_recurrence(double rtol, double atol) {
  const int64_t B = 2, T = 5, D = 37;
  auto a = uniform(B * T * D, 0.5f, 1.0f), x = randn(B * T * D);
  std::vector<float> h(B * T * D);
  std::vector<double> want(B * T * D);
  retain::scan::linear_recurrence_fwd_cpu<kDefault>(a.data(), x.data(), static_cast<const float*>(nullptr),
                                                    h.data(), B, T, D, false, 2);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t d = 0; d < D; ++d) {
      double s = 0;
      for (int64_t t = 0; t < T; ++t) {
        const int64_t i = (b * T + t) * D + d;
        s = a[i] * s + x[i];
        want[i] = s;
      }
    }
  }
  close("linear_recurrence forward", h, want, rtol, atol);
}

void margin(double rtol, double atol) {
  const int64_t N = 6, D = 37, V = 70;
  auto h = randn(N * D), r = randn(N * D);
  std::vector<double> loss(N), want(N);
  retain::margin::feature_imitation_fwd_cpu<kDefault>(h.data(), r.data(), nullptr, N, D, 2, loss.data(), 2);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t d = 0; d < D; ++d) want[n] += std::pow(double(h[n * D + d]) - r[n * D + d], 2);
  }
  close("feature_imitation forward (p=2)", loss, want, rtol, atol);

  const double temp = 2.0;
  auto z = randn(N * V, 2.0f), q = randn(N * V, 2.0f);
  std::vector<double> kl(N), lse(N), lse_ref(N);
  retain::margin::kl_imitation_fwd_cpu<kDefault>(z.data(), q.data(), nullptr, N, V, 1.0 / temp, kl.data(), lse.data(),
                                                 lse_ref.data(), 2);
  for (int64_t n = 0; n < N; ++n) {
    double mz = -INFINITY, mq = -INFINITY, sz = 0, sq = 0, w = 0;
    for (int64_t v = 0; v < V; ++v) mz = std::fmax(mz, z[n * V + v] / temp), mq = std::fmax(mq, q[n * V + v] / temp);
    for (int64_t v = 0; v < V; ++v) sz += std::exp(z[n * V + v] / temp - mz), sq += std::exp(q[n * V + v] / temp - mq);
    const double lz = mz + std::log(sz), lq = mq + std::log(sq);
    for (int64_t v = 0; v < V; ++v) {
      const double a = z[n * V + v] / temp - lz, b = q[n * V + v] / temp - lq;
      w += std::exp(b) * (b - a);
    }
    want[n] = w;
  }
  close("kl_imitation forward", kl, want, rtol, atol);

  std::vector<int8_t> labels(N * D);
  std::uniform_int_distribution<int> lab(-1, 1);
  for (auto& l : labels) l = static_cast<int8_t>(lab(rng));
  auto pos = uniform(D, 0.2f, 0.8f), neg = uniform(D, -0.8f, -0.2f);
  std::vector<double> sums(N);
  std::vector<int64_t> counts(N), want_counts(N);
  retain::margin::tm_loss_fwd_cpu<kDefault>(h.data(), labels.data(), D, pos.data(), neg.data(), false, nullptr, 1, N,
                                            D, sums.data(), counts.data(), nullptr, 2);
  for (int64_t n = 0; n < N; ++n) {
    want[n] = 0;
    for (int64_t d = 0; d < D; ++d) {
      const double x = h[n * D + d];
      const int l = labels[n * D + d];
      const double lo = l > 0 ? pos[d] : (l < 0 ? -INFINITY : neg[d]);
      const double hi = l < 0 ? neg[d] : (l > 0 ? INFINITY : pos[d]);
      const double e = std::fmax(0.0, lo - x) + std::fmax(0.0, x - hi);
      want[n] += e;
      want_counts[n] += e > 0;
    }
  }
  close("tm_loss forward (row sums)", sums, want, rtol, atol);
  close("tm_loss forward (violations per row)", counts, want_counts, 0.0, 0.0);
}

void memory_scan(double rtol, double atol) {
  // the gated delta rule: e = S^T k - v, S <- a S - beta k e^T, o = S^T q
  const int64_t B = 2, T = 4, H = 1, K = 40, V = 40;
  auto q = randn(B * T * K, 0.3f), k = randn(B * T * K, 0.3f), v = randn(B * T * V);
  auto beta = uniform(B * T, 0.1f, 0.9f), a = uniform(B * T, 0.8f, 1.0f);
  std::vector<float> g(B * T), o(B * T * V);
  for (int64_t i = 0; i < B * T; ++i) g[i] = std::log(a[i]);
  retain::scan::MemoryScanParams<float> P;
  P.q = q.data(), P.k = k.data(), P.v = v.data(), P.beta = beta.data(), P.g = g.data(), P.o = o.data();
  P.B = B, P.T = T, P.H = H, P.K = K, P.V = V, P.N = B;
  P.objective = 1, P.gate_kind = 1;
  retain::scan::memory_scan_fwd_cpu<kDefault>(P, 2);
  std::vector<double> want(B * T * V);
  for (int64_t b = 0; b < B; ++b) {
    std::vector<double> S(K * V, 0.0), e(V);
    for (int64_t t = 0; t < T; ++t) {
      const int64_t r = b * T + t;
      for (int64_t j = 0; j < V; ++j) {
        e[j] = -v[r * V + j];
        for (int64_t i = 0; i < K; ++i) e[j] += S[i * V + j] * k[r * K + i];
      }
      for (int64_t i = 0; i < K; ++i) {
        for (int64_t j = 0; j < V; ++j) S[i * V + j] = a[r] * S[i * V + j] - beta[r] * k[r * K + i] * e[j];
      }
      for (int64_t j = 0; j < V; ++j) {
        for (int64_t i = 0; i < K; ++i) want[r * V + j] += S[i * V + j] * q[r * K + i];
      }
    }
  }
  close("memory_scan forward (gated delta rule)", o, want, rtol, atol);
}

}  // namespace

int main(int argc, char** argv) {
  const double rtol = argc > 1 ? std::atof(argv[1]) : 1e-5, atol = argc > 2 ? std::atof(argv[2]) : 1e-6;
  linear_recurrence(rtol, atol);
  margin(rtol, atol);
  memory_scan(rtol, atol);
  std::printf("portable smoke: %d checks, %d failed\n", checks, failed);
  return failed ? 1 : 0;
}
