// Checks linear_recurrence's CUDA kernels (csrc/scan/linear_recurrence_cuda.cu), run on the CPU
// under the fiber emulation of cuda_runtime.h, against the CPU kernels: h, and grad_x, grad_a,
// grad_initial, both directions, with and without an initial state; lane counts around the block
// size. Built and run by tests/ops/scan/test_cuda_emulated.py.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "compare.h"
#include "scan/linear_recurrence.h"

using namespace retain;
using namespace retain::scan;

using emu_check::cmp;
using emu_check::nans;

template <class T>
void run(int64_t B, int64_t Tn, int64_t D, bool reverse, bool initial, double tol, unsigned seed) {
  std::mt19937 r(seed);
  std::uniform_real_distribution<double> u(0, 1);
  std::normal_distribution<double> nd(0, 1);
  const int64_t n = B * Tn * D;
  std::vector<T> a(n), x(n), h0(B * D), gh(n);
  for (auto& e : a) store_as(e, u(r));
  for (auto& e : x) store_as(e, nd(r));
  for (auto& e : h0) store_as(e, nd(r));
  for (auto& e : gh) store_as(e, nd(r));
  const T* init = initial ? h0.data() : nullptr;
  const std::string tag = "B" + std::to_string(B) + " T" + std::to_string(Tn) + " D" + std::to_string(D) +
                          (reverse ? " reverse" : "") + (initial ? " initial" : "") + (sizeof(T) == 8 ? " f64" : " f32");
  auto hc = nans<T>(n), he = nans<T>(n);
  linear_recurrence_fwd_cpu<retain::CpuCapability::Default, T>(a.data(), x.data(), init, hc.data(), B, Tn, D, reverse, 1);
  linear_recurrence_fwd_cuda<T>(a.data(), x.data(), init, he.data(), B, Tn, D, reverse, 0);
  cmp(tag + " h", hc, he, tol);
  auto gxc = nans<T>(n), gac = nans<T>(n), gic = nans<T>(B * D);
  auto gxe = nans<T>(n), gae = nans<T>(n), gie = nans<T>(B * D);
  linear_recurrence_bwd_cpu<retain::CpuCapability::Default, T>(a.data(), hc.data(), init, gh.data(), gxc.data(), gac.data(),
                               initial ? gic.data() : nullptr, B, Tn, D, reverse, 1);
  linear_recurrence_bwd_cuda<T>(a.data(), hc.data(), init, gh.data(), gxe.data(), gae.data(),
                                initial ? gie.data() : nullptr, B, Tn, D, reverse, 0);
  cmp(tag + " grad_x", gxc, gxe, tol);
  cmp(tag + " grad_a", gac, gae, tol);
  if (initial) cmp(tag + " grad_initial", gic, gie, tol);
}

int main() {
  setvbuf(stdout, nullptr, _IONBF, 0);
  unsigned seed = 1;
  for (auto [B, Tn, D] : std::vector<std::tuple<int64_t, int64_t, int64_t>>{
           {1, 1, 1}, {2, 7, 5}, {1, 4, 255}, {3, 3, 256}, {1, 5, 257}, {2, 0, 4}, {1, 9, 600}})
    for (bool reverse : {false, true})
      for (bool initial : {false, true}) {
        run<double>(B, Tn, D, reverse, initial, 1e-12, seed++);
        run<float>(B, Tn, D, reverse, initial, 1e-6, seed++);
      }
  return emu_check::report();
}
