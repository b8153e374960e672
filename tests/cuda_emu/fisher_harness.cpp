// Checks the fisher family's CUDA kernels (grad_moments_cuda.cu, rank1_dots_cuda.cu,
// ewc_penalty_cuda.cu, si_importance_cuda.cu), run on the CPU under the fiber emulation of
// cuda_runtime.h, against the CPU kernels: every state update, the rank-1 projections, the
// penalty's sums and gradient (written and accumulated, with and without the diagonal sum), SI's
// path integral and consolidation. Lists hold an empty tensor, a scalar and tensors on either side
// of one and two chunks; outputs start as NaN so an unwritten element fails. Built and run by
// tests/ops/fisher/test_cuda_emulated.py.
#include <cuda_runtime.h>

#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "compare.h"
#include "fisher/ewc_penalty.h"
#include "fisher/grad_moments.h"
#include "fisher/rank1_dots.h"
#include "fisher/si_importance.h"

using namespace retain;
using namespace retain::fisher;

using emu_check::cmp;
using emu_check::nans;

constexpr auto kCpu = CpuCapability::Default;
const std::vector<int64_t> kSizes = {7, 1, 0, kChunk - 1, kChunk + 1, 2 * kChunk + 3};

template <class T>
std::vector<std::vector<T>> lists(std::mt19937& r, int64_t rows, double scale, bool positive = false) {
  std::normal_distribution<double> nd(0, 1);
  std::vector<std::vector<T>> out;
  for (int64_t n : kSizes) {
    std::vector<T> x(rows * n);
    for (auto& e : x) {
      const double v = nd(r) * scale;
      store_as(e, positive ? std::fabs(v) : v);
    }
    out.push_back(std::move(x));
  }
  return out;
}

// The table of csrc/fisher/tensor_table.h for the given lists (nullptr: absent).
template <class... L>
std::vector<int64_t> table(L*... slots) {
  const int64_t n = static_cast<int64_t>(kSizes.size());
  std::vector<int64_t> t(kSizes);
  int64_t chunks = 0;
  for (int64_t s : kSizes) {
    t.push_back(chunks);
    chunks += (s + kChunk - 1) / kChunk;
  }
  t.push_back(chunks);
  int64_t present = 0, k = 0;
  ((present |= (slots ? int64_t{1} << k : 0), ++k), ...);
  t.push_back(present);
  auto add = [&](auto* lst) {
    for (int64_t i = 0; i < n; ++i)
      t.push_back(lst ? static_cast<int64_t>(reinterpret_cast<uintptr_t>((*lst)[i].data())) : 0);
  };
  (add(slots), ...);
  return t;
}

int64_t chunks_of(const std::vector<int64_t>& t) { return t[2 * kSizes.size()]; }

template <class V>
std::vector<double> flat(const std::vector<V>& ls) {
  std::vector<double> out;
  for (const auto& l : ls)
    for (const auto& e : l) out.push_back(emu_check::val(e));
  return out;
}

template <class T, class S>
double tol() {
  return (sizeof(T) == 8 && sizeof(S) == 8) ? 1e-12 : (sizeof(S) == 4 ? 2e-6 : 1e-6);
}

template <class T, class S>
void moments_case(int64_t samples, int power, bool first, bool second, unsigned seed) {
  std::mt19937 r(seed);
  auto g = lists<T>(r, std::max<int64_t>(samples, 1), 1.0);
  auto f1 = lists<S>(r, 1, 1.0), s1 = lists<S>(r, 1, 1.0, true);
  auto f2 = f1, s2 = s1;
  const std::string tag = "moments S" + std::to_string(samples) + " p" + std::to_string(power) +
                          (first ? " first" : "") + (second ? " second" : "") + " " + std::to_string(sizeof(T)) +
                          "/" + std::to_string(sizeof(S));
  auto tc = table(&g, first ? &f1 : nullptr, second ? &s1 : nullptr);
  auto te = table(&g, first ? &f2 : nullptr, second ? &s2 : nullptr);
  const int64_t n = kSizes.size();
  grad_moments_cpu<kCpu>(Types<T, S>{}, tc.data(), n, chunks_of(tc), samples, 0.75, 1.5, power, 1);
  grad_moments_cuda(Types<T, S>{}, te.data(), n, chunks_of(te), samples, 0.75, 1.5, power, 0);
  cmp(tag + " first", flat(f1), flat(f2), tol<T, S>());
  cmp(tag + " second", flat(s1), flat(s2), tol<T, S>());
}

template <class T, class S>
void dots_case(int64_t samples, unsigned seed) {
  std::mt19937 r(seed);
  auto mu = lists<S>(r, 1, 1.0);
  auto g = lists<T>(r, samples, 1.0);
  auto t = table(&mu, &g);
  const int64_t n = kSizes.size(), chunks = chunks_of(t);
  auto part_c = nans<double>(chunks * samples), part_e = nans<double>(chunks * samples);
  auto dc = nans<double>(samples), de = nans<double>(samples);
  rank1_dots_cpu<kCpu>(Types<T, S>{}, t.data(), n, chunks, samples, part_c.data(), dc.data(), 1);
  rank1_dots_cuda(Types<T, S>{}, t.data(), n, chunks, samples, part_e.data(), de.data(), 0);
  cmp("dots S" + std::to_string(samples) + " partials", part_c, part_e, 1e-9);
  cmp("dots S" + std::to_string(samples), dc, de, 1e-9);
}

template <class T, class S>
void ewc_case(bool diag, bool mu, bool accumulate, bool with_sum, unsigned seed) {
  std::mt19937 r(seed);
  auto p = lists<T>(r, 1, 1.0), q = lists<T>(r, 1, 1.0), f = lists<S>(r, 1, 1.0, true), m = lists<S>(r, 1, 1.0);
  auto g1 = lists<T>(r, 1, 1.0), g2 = g1;
  if (!accumulate)
    for (auto* gs : {&g1, &g2})
      for (auto& l : *gs) l = nans<T>(l.size());
  const std::string tag = std::string("ewc") + (diag ? " diag" : "") + (mu ? " mu" : "") +
                          (accumulate ? " accumulate" : "") + (with_sum ? " sum" : "") + " " +
                          std::to_string(sizeof(T)) + "/" + std::to_string(sizeof(S));
  auto tf = table(&p, &q, diag ? &f : nullptr, mu ? &m : nullptr);
  const int64_t n = kSizes.size(), chunks = chunks_of(tf);
  auto pc = nans<double>(2 * chunks), pe = nans<double>(2 * chunks), sc = nans<double>(2), se = nans<double>(2);
  ewc_penalty_fwd_cpu<kCpu>(Types<T, S>{}, tf.data(), n, chunks, pc.data(), sc.data(), 1);
  ewc_penalty_fwd_cuda(Types<T, S>{}, tf.data(), n, chunks, pe.data(), se.data(), 0);
  cmp(tag + " fwd partials", pc, pe, 1e-9);
  cmp(tag + " fwd sums", sc, se, 1e-9);
  const double coef[2] = {0.7, -0.3};
  auto tc = table(&p, &q, diag ? &f : nullptr, mu ? &m : nullptr, &g1);
  auto te = table(&p, &q, diag ? &f : nullptr, mu ? &m : nullptr, &g2);
  auto qc = nans<double>(2 * chunks), qe = nans<double>(2 * chunks), uc = nans<double>(2), ue = nans<double>(2);
  ewc_penalty_bwd_cpu<kCpu>(Types<T, S>{}, tc.data(), n, chunks, coef, accumulate, with_sum ? qc.data() : nullptr,
                            with_sum ? uc.data() : nullptr, 1);
  ewc_penalty_bwd_cuda(Types<T, S>{}, te.data(), n, chunks, coef, accumulate, with_sum ? qe.data() : nullptr,
                       with_sum ? ue.data() : nullptr, 0);
  cmp(tag + " grad", flat(g1), flat(g2), tol<T, S>());
  if (with_sum) {
    cmp(tag + " bwd partials", qc, qe, 1e-9);
    cmp(tag + " bwd sums", uc, ue, 1e-9);
  }
}

template <class T, class S>
void si_case(bool reset, unsigned seed) {
  std::mt19937 r(seed);
  auto w1 = lists<S>(r, 1, 1.0), big1 = lists<S>(r, 1, 1.0, true);
  auto g = lists<T>(r, 1, 1.0), b = lists<T>(r, 1, 1.0), a = lists<T>(r, 1, 1.0);
  auto w2 = w1, big2 = big1;
  const int64_t n = kSizes.size();
  auto ac = table(&w1, &g, &b, &a), ae = table(&w2, &g, &b, &a);
  si_accumulate_cpu<kCpu>(Types<T, S>{}, ac.data(), n, chunks_of(ac), 1);
  si_accumulate_cuda(Types<T, S>{}, ae.data(), n, chunks_of(ae), 0);
  cmp("si accumulate", flat(w1), flat(w2), tol<T, S>());
  auto cc = table(&big1, &w1, &a, &b), ce = table(&big2, &w2, &a, &b);
  si_consolidate_cpu<kCpu>(Types<T, S>{}, cc.data(), n, chunks_of(cc), 0.05, reset, 1);
  si_consolidate_cuda(Types<T, S>{}, ce.data(), n, chunks_of(ce), 0.05, reset, 0);
  cmp("si importance", flat(big1), flat(big2), tol<T, S>());
  cmp("si omega after", flat(w1), flat(w2), 0.0);
}

int main() {
  setvbuf(stdout, nullptr, _IONBF, 0);
  unsigned seed = 1;
  for (int64_t samples : {0, 1, 3})
    for (int power : {1, 2}) {
      moments_case<float, float>(samples, power, false, true, seed++);
      moments_case<bf16_t, double>(samples, power, true, true, seed++);
      moments_case<double, double>(samples, power, true, false, seed++);
    }
  for (int64_t samples : {1, 4}) {
    dots_case<float, float>(samples, seed++);
    dots_case<f16_t, double>(samples, seed++);
  }
  for (bool accumulate : {false, true})
    for (bool with_sum : {false, true}) {
      ewc_case<float, float>(true, true, accumulate, with_sum, seed++);
      ewc_case<float, double>(true, false, accumulate, with_sum, seed++);
      ewc_case<bf16_t, float>(false, true, accumulate, false, seed++);
    }
  si_case<float, float>(true, seed++);
  si_case<double, double>(false, seed++);
  si_case<bf16_t, double>(true, seed++);
  return emu_check::report();
}
