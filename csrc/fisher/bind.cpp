// The fisher family's entries in retain._C: every entry takes the table of its lists
// (fisher/tensor_table.h), the data dtype (gradients, parameters) and the state dtype (float32 or
// float64: Fisher, mu, omega). Thin: pointer checks, dtype dispatch, the launcher call.
#include <cstdint>

#include "common/bind.h"
#include "fisher/ewc_penalty.h"
#include "fisher/grad_moments.h"
#include "fisher/rank1_dots.h"
#include "fisher/si_importance.h"

namespace retain {
namespace {

constexpr const char* kMoments = "retain::grad_moments";
constexpr const char* kDots = "retain::rank1_dots";
constexpr const char* kEwc = "retain::ewc_penalty";
constexpr const char* kSiAcc = "retain::si_accumulate";
constexpr const char* kSiCons = "retain::si_consolidate";

// f(fisher::Types<T, S>{}) for the data dtype T and state dtype S the codes name.
template <typename F>
void dispatch_types(int data_dtype, int state_dtype, const char* op, const F& f) {
  RETAIN_DISPATCH_FLOATING(data_dtype, op, [&] {
    switch (static_cast<DType>(state_dtype)) {
      case DType::Float32: return f(fisher::Types<scalar_t, float>{});
      case DType::Float64: return f(fisher::Types<scalar_t, double>{});
      default: check(false, op, "state tensors must be float32 or float64");
    }
  });
}

// The table of n tensors; sizes checked.
const int64_t* table_ptr(uintptr_t table, int64_t n, int64_t chunks, const char* op) {
  check_sizes({n, chunks}, op);
  return as_ptr<int64_t>(table, op, "table", n == 0);
}

}  // namespace

void bind_fisher(py::module_& m, bind::KernelTable& kernels) {
  m.attr("fisher_chunk") = fisher::kChunk;  // elements per work unit: Python sizes the partial sums by it
  bind::def<Cpu, Cuda>(m, kernels, kMoments, "grad_moments",
      [](auto dev, int data_dtype, int state_dtype, uintptr_t table, int64_t n, int64_t chunks, int64_t samples,
         double decay, double scale, int power) {
        const char* op = kMoments;
        const int64_t* t = table_ptr(table, n, chunks, op);
        check_sizes({samples}, op);
        check(power == 1 || power == 2, op, "power must be 1 or 2");
        dispatch_types(data_dtype, state_dtype, op, [&](auto types) {
          RETAIN_LAUNCH(dev, fisher::grad_moments)(types, t, n, chunks, samples, decay, scale, power);
        });
      });
  bind::def<Cpu, Cuda>(m, kernels, kDots, "rank1_dots",
      [](auto dev, int data_dtype, int state_dtype, uintptr_t table, int64_t n, int64_t chunks, int64_t samples,
         uintptr_t partials, uintptr_t dots) {
        const char* op = kDots;
        const int64_t* t = table_ptr(table, n, chunks, op);
        check_sizes({samples}, op);
        auto* part = as_mut_ptr<double>(partials, op, "partials", chunks * samples == 0);
        auto* out = as_mut_ptr<double>(dots, op, "dots", samples == 0);
        dispatch_types(data_dtype, state_dtype, op, [&](auto types) {
          RETAIN_LAUNCH(dev, fisher::rank1_dots)(types, t, n, chunks, samples, part, out);
        });
      });
  bind::def<Cpu, Cuda>(m, kernels, kEwc, "ewc_penalty_fwd",
      [](auto dev, int data_dtype, int state_dtype, uintptr_t table, int64_t n, int64_t chunks, uintptr_t partials,
         uintptr_t sums) {
        const char* op = kEwc;
        const int64_t* t = table_ptr(table, n, chunks, op);
        auto* part = as_mut_ptr<double>(partials, op, "partials", chunks == 0);
        auto* out = as_mut_ptr<double>(sums, op, "sums");
        dispatch_types(data_dtype, state_dtype, op, [&](auto types) {
          RETAIN_LAUNCH(dev, fisher::ewc_penalty_fwd)(types, t, n, chunks, part, out);
        });
      });
  bind::def<Cpu, Cuda>(m, kernels, kEwc, "ewc_penalty_bwd",
      [](auto dev, int data_dtype, int state_dtype, uintptr_t table, int64_t n, int64_t chunks, uintptr_t coef,
         bool accumulate, uintptr_t partials, uintptr_t sums) {
        const char* op = kEwc;
        const int64_t* t = table_ptr(table, n, chunks, op);
        const auto* k = as_ptr<double>(coef, op, "coef");
        // partials and sums: both (the diagonal term is summed too) or neither
        auto* part = as_mut_ptr<double>(partials, op, "partials", true);
        auto* out = as_mut_ptr<double>(sums, op, "sums", true);
        check((part == nullptr) == (out == nullptr) || chunks == 0, op, "partials and sums go together");
        dispatch_types(data_dtype, state_dtype, op, [&](auto types) {
          RETAIN_LAUNCH(dev, fisher::ewc_penalty_bwd)(types, t, n, chunks, k, accumulate, part, out);
        });
      });
  bind::def<Cpu, Cuda>(m, kernels, kSiAcc, "si_accumulate",
      [](auto dev, int data_dtype, int state_dtype, uintptr_t table, int64_t n, int64_t chunks) {
        const int64_t* t = table_ptr(table, n, chunks, kSiAcc);
        dispatch_types(data_dtype, state_dtype, kSiAcc, [&](auto types) {
          RETAIN_LAUNCH(dev, fisher::si_accumulate)(types, t, n, chunks);
        });
      });
  bind::def<Cpu, Cuda>(m, kernels, kSiCons, "si_consolidate",
      [](auto dev, int data_dtype, int state_dtype, uintptr_t table, int64_t n, int64_t chunks, double xi,
         bool reset) {
        const int64_t* t = table_ptr(table, n, chunks, kSiCons);
        dispatch_types(data_dtype, state_dtype, kSiCons, [&](auto types) {
          RETAIN_LAUNCH(dev, fisher::si_consolidate)(types, t, n, chunks, xi, reset);
        });
      });
}

}  // namespace retain
