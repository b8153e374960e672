// The margin family's entries in retain._C (tm_loss, kl_imitation, feature_imitation). Thin:
// pointer checks, dtype dispatch, the launcher call (common/bind.h); no math.
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "common/bind.h"
#include "margin/feature_imitation.h"
#include "margin/kl_imitation.h"
#include "margin/tm_loss.h"

namespace retain {

namespace {

// The error for row (b, l) of labels (the forward's first invalid row), naming its first invalid
// element.
[[noreturn]] void throw_invalid_tm_labels(const int8_t* row, int64_t b, int64_t l, int64_t D) {
  int64_t d = 0;
  while (d + 1 < D && static_cast<uint8_t>(row[d] + 1) <= 2) ++d;
  throw std::invalid_argument("retain.ops.tm_loss: labels must be int8 in {-1, 0, 1}, got " + std::to_string(row[d]) +
                              " at [" + std::to_string(b) + ", " + std::to_string(l) + ", " + std::to_string(d) + "]");
}
[[noreturn]] void throw_invalid_tm_labels(const uint8_t* row, int64_t b, int64_t l, int64_t D) {
  int64_t d = 0;
  while (d + 1 < (D + 3) / 4 * 4 && ((row[d / 4] >> (d % 4 * 2)) & 3) != 3) ++d;
  throw std::invalid_argument("retain.ops.tm_loss: packed labels must hold codes 0, 1, 2 (from pack_tm_labels), got "
                              "code 3 for feature " + std::to_string(d) + " at [" + std::to_string(b) + ", " +
                              std::to_string(l) + "]" + (d >= D ? " (a padding code of the last byte)" : ""));
}

constexpr const char* kTmLoss = "retain::tm_loss";
constexpr const char* kKl = "retain::kl_imitation";
constexpr const char* kFeature = "retain::feature_imitation";

// tm_loss: labels are int8 (packed = false) or 2-bit codes in uint8 (packed = true); `launch`
// gets the typed h, labels, thresholds and mask.
template <typename Launch>
void tm_loss_dispatch(int dtype, bool packed, uintptr_t h, uintptr_t labels, uintptr_t pos, uintptr_t neg,
                      uintptr_t mask, int64_t B, int64_t L, int64_t D, const Launch& launch) {
  const char* op = kTmLoss;
  check_sizes({B, L, D}, op);
  const bool empty = B * L * D == 0;
  RETAIN_DISPATCH_FLOATING(dtype, op, [&] {
    using A = Acc<scalar_t>;
    const auto* hp = as_ptr<scalar_t>(h, op, "h", empty);
    const auto* pp = as_ptr<A>(pos, op, "pos_thr", empty);
    const auto* np = as_ptr<A>(neg, op, "neg_thr", empty);
    const auto* mp = as_ptr<uint8_t>(mask, op, "mask", true);
    if (packed) {
      launch(hp, as_ptr<uint8_t>(labels, op, "labels", empty), pp, np, mp);
    } else {
      launch(hp, as_ptr<int8_t>(labels, op, "labels", empty), pp, np, mp);
    }
  });
}

// tm_loss's entries differ between the devices: the CPU forward also keeps the slope bits (for
// tm_loss_bwd_bits_cpu), and the CUDA backward reads its float64 scale from device memory.
void bind_tm_loss(py::module_& m, bind::KernelTable& kernels) {
  constexpr const char* op = kTmLoss;
  bind::def<Cpu>(m, kernels, op, "tm_loss_fwd",
      [](auto dev, int dtype, bool packed, uintptr_t h, uintptr_t labels, int64_t label_row, uintptr_t pos,
         uintptr_t neg, bool per_sample, uintptr_t mask, int64_t B, int64_t L, int64_t D, uintptr_t row_sum,
         uintptr_t row_count, uintptr_t slope_bits) {
        auto* sums = as_mut_ptr<double>(row_sum, op, "row_sum", B * L == 0);
        auto* counts = as_mut_ptr<int64_t>(row_count, op, "row_count", B * L == 0);
        auto* bits = as_mut_ptr<uint16_t>(slope_bits, op, "slope_bits", true);
        tm_loss_dispatch(dtype, packed, h, labels, pos, neg, mask, B, L, D,
                         [&](auto hp, auto lp, auto pp, auto np, auto mp) {
          const int64_t bad = RETAIN_CPU(margin::tm_loss_fwd_cpu)(hp, lp, label_row, pp, np, per_sample, mp, B, L, D,
                                                                  sums, counts, bits, dev.threads);
          if (bad >= 0) throw_invalid_tm_labels(lp + bad * label_row, bad / L, bad % L, D);
        });
      });
  bind::def<Cpu>(m, kernels, op, "tm_loss_bwd_bits",
      [](auto dev, int dtype, uintptr_t slope_bits, int64_t rows, int64_t D, double scale, uintptr_t grad) {
        check_sizes({rows, D}, op);
        const bool empty = rows * D == 0;
        const auto* bits = as_ptr<uint16_t>(slope_bits, op, "slope_bits", empty);
        RETAIN_DISPATCH_FLOATING(dtype, op, [&] {
          if constexpr (std::is_same_v<scalar_t, double>) {
            check(false, op, "slope bits are kept for float32/bfloat16/float16 only");
          } else {
            RETAIN_CPU(margin::tm_loss_bwd_bits_cpu)(bits, rows, D, scale,
                                                     as_mut_ptr<scalar_t>(grad, op, "grad_h", empty), dev.threads);
          }
        });
      });
  bind::def<Cpu>(m, kernels, op, "tm_loss_bwd",
      [](auto dev, int dtype, bool packed, uintptr_t h, uintptr_t labels, int64_t label_row, uintptr_t pos,
         uintptr_t neg, bool per_sample, uintptr_t mask, int64_t B, int64_t L, int64_t D, double scale,
         uintptr_t grad) {
        tm_loss_dispatch(dtype, packed, h, labels, pos, neg, mask, B, L, D,
                         [&](auto hp, auto lp, auto pp, auto np, auto mp) {
          using Tp = std::remove_const_t<std::remove_pointer_t<decltype(hp)>>;
          auto* gp = as_mut_ptr<Tp>(grad, op, "grad_h", B * L * D == 0);
          RETAIN_CPU(margin::tm_loss_bwd_cpu)(hp, lp, label_row, pp, np, per_sample, mp, B, L, D, scale, gp,
                                              dev.threads);
        });
      });
#ifdef RETAIN_WITH_CUDA
  bind::def<Cuda>(m, kernels, op, "tm_loss_fwd",
      [](auto dev, int dtype, bool packed, uintptr_t h, uintptr_t labels, int64_t label_row, uintptr_t pos,
         uintptr_t neg, bool per_sample, uintptr_t mask, int64_t B, int64_t L, int64_t D, uintptr_t row_sum,
         uintptr_t row_count) {
        auto* sums = as_mut_ptr<double>(row_sum, op, "row_sum", B * L == 0);
        auto* counts = as_mut_ptr<int64_t>(row_count, op, "row_count", B * L == 0);
        tm_loss_dispatch(dtype, packed, h, labels, pos, neg, mask, B, L, D,
                         [&](auto hp, auto lp, auto pp, auto np, auto mp) {
          margin::tm_loss_fwd_cuda(hp, lp, label_row, pp, np, per_sample, mp, B, L, D, sums, counts, dev.stream);
        });
      });
  bind::def<Cuda>(m, kernels, op, "tm_loss_bwd",
      [](auto dev, int dtype, bool packed, uintptr_t h, uintptr_t labels, int64_t label_row, uintptr_t pos,
         uintptr_t neg, bool per_sample, uintptr_t mask, int64_t B, int64_t L, int64_t D, uintptr_t scale,
         uintptr_t grad) {
        const auto* sp = as_ptr<double>(scale, op, "scale");
        tm_loss_dispatch(dtype, packed, h, labels, pos, neg, mask, B, L, D,
                         [&](auto hp, auto lp, auto pp, auto np, auto mp) {
          using Tp = std::remove_const_t<std::remove_pointer_t<decltype(hp)>>;
          auto* gp = as_mut_ptr<Tp>(grad, op, "grad_h", B * L * D == 0);
          margin::tm_loss_bwd_cuda(hp, lp, label_row, pp, np, per_sample, mp, B, L, D, sp, gp, dev.stream);
        });
      });
#endif
}

void bind_kl_imitation(py::module_& m, bind::KernelTable& kernels) {
  constexpr const char* op = kKl;
  bind::def<Cpu, Cuda>(m, kernels, op, "kl_imitation_fwd",
      [](auto dev, int dtype, uintptr_t z, uintptr_t z_ref, uintptr_t mask, int64_t N, int64_t V, double inv_t,
         uintptr_t loss, uintptr_t lse, uintptr_t lse_ref) {
        check_sizes({N, V}, op);
        check(V > 0, op, "the vocabulary must not be empty");
        RETAIN_DISPATCH_FLOATING(dtype, op, [&] {
          RETAIN_LAUNCH(dev, margin::kl_imitation_fwd)(
              as_ptr<scalar_t>(z, op, "z"), as_ptr<scalar_t>(z_ref, op, "z_ref"),
              as_ptr<uint8_t>(mask, op, "mask", true), N, V, inv_t, as_mut_ptr<double>(loss, op, "loss"),
              as_mut_ptr<double>(lse, op, "lse"), as_mut_ptr<double>(lse_ref, op, "lse_ref"));
        });
      });
  bind::def<Cpu>(m, kernels, op, "kl_imitation_fwd_grad",
      [](auto dev, int dtype, uintptr_t z, uintptr_t z_ref, uintptr_t mask, int64_t N, int64_t V, double inv_t,
         double grad_scale, uintptr_t loss, uintptr_t lse, uintptr_t lse_ref, uintptr_t grad_z,
         uintptr_t grad_z_ref) {
        check_sizes({N, V}, op);
        check(V > 0, op, "the vocabulary must not be empty");
        RETAIN_DISPATCH_FLOATING(dtype, op, [&] {
          RETAIN_CPU(margin::kl_imitation_fwd_grad_cpu)(
              as_ptr<scalar_t>(z, op, "z"), as_ptr<scalar_t>(z_ref, op, "z_ref"),
              as_ptr<uint8_t>(mask, op, "mask", true), N, V, inv_t, grad_scale,
              as_mut_ptr<double>(loss, op, "loss"), as_mut_ptr<double>(lse, op, "lse"),
              as_mut_ptr<double>(lse_ref, op, "lse_ref"), as_mut_ptr<scalar_t>(grad_z, op, "grad_z", true),
              as_mut_ptr<scalar_t>(grad_z_ref, op, "grad_z_ref", true), dev.threads);
        });
      });
  bind::def<Cpu, Cuda>(m, kernels, op, "kl_imitation_bwd",
      [](auto dev, int dtype, uintptr_t z, uintptr_t z_ref, uintptr_t g, uintptr_t loss, uintptr_t lse,
         uintptr_t lse_ref, int64_t N, int64_t V, double inv_t, uintptr_t grad_z, uintptr_t grad_z_ref) {
        check_sizes({N, V}, op);
        RETAIN_DISPATCH_FLOATING(dtype, op, [&] {
          RETAIN_LAUNCH(dev, margin::kl_imitation_bwd)(
              as_ptr<scalar_t>(z, op, "z"), as_ptr<scalar_t>(z_ref, op, "z_ref"), as_ptr<double>(g, op, "grad"),
              as_ptr<double>(loss, op, "loss"), as_ptr<double>(lse, op, "lse"),
              as_ptr<double>(lse_ref, op, "lse_ref"), N, V, inv_t,
              as_mut_ptr<scalar_t>(grad_z, op, "grad_z", true),
              as_mut_ptr<scalar_t>(grad_z_ref, op, "grad_z_ref", true));
        });
      });
}

void check_feature_sizes(int64_t N, int64_t D, int p) {
  check_sizes({N, D}, kFeature);
  check(p == 1 || p == 2, kFeature, "p must be 1 or 2, got " + std::to_string(p));
}

void bind_feature_imitation(py::module_& m, bind::KernelTable& kernels) {
  constexpr const char* op = kFeature;
  bind::def<Cpu, Cuda>(m, kernels, op, "feature_imitation_fwd",
      [](auto dev, int dtype, uintptr_t h, uintptr_t h_ref, uintptr_t mask, int64_t N, int64_t D, int p,
         uintptr_t loss) {
        check_feature_sizes(N, D, p);
        RETAIN_DISPATCH_FLOATING(dtype, op, [&] {
          RETAIN_LAUNCH(dev, margin::feature_imitation_fwd)(
              as_ptr<scalar_t>(h, op, "h"), as_ptr<scalar_t>(h_ref, op, "h_ref"),
              as_ptr<uint8_t>(mask, op, "mask", true), N, D, p, as_mut_ptr<double>(loss, op, "loss"));
        });
      });
  bind::def<Cpu>(m, kernels, op, "feature_imitation_fwd_grad",
      [](auto dev, int dtype, uintptr_t h, uintptr_t h_ref, uintptr_t mask, int64_t N, int64_t D, int p,
         double grad_scale, uintptr_t loss, uintptr_t grad_h, uintptr_t grad_h_ref) {
        check_feature_sizes(N, D, p);
        RETAIN_DISPATCH_FLOATING(dtype, op, [&] {
          RETAIN_CPU(margin::feature_imitation_fwd_grad_cpu)(
              as_ptr<scalar_t>(h, op, "h"), as_ptr<scalar_t>(h_ref, op, "h_ref"),
              as_ptr<uint8_t>(mask, op, "mask", true), N, D, p, grad_scale, as_mut_ptr<double>(loss, op, "loss"),
              as_mut_ptr<scalar_t>(grad_h, op, "grad_h", true),
              as_mut_ptr<scalar_t>(grad_h_ref, op, "grad_h_ref", true), dev.threads);
        });
      });
  bind::def<Cpu, Cuda>(m, kernels, op, "feature_imitation_bwd",
      [](auto dev, int dtype, uintptr_t h, uintptr_t h_ref, uintptr_t g, uintptr_t mask, int64_t N, int64_t D,
         int p, uintptr_t grad_h, uintptr_t grad_h_ref) {
        check_feature_sizes(N, D, p);
        RETAIN_DISPATCH_FLOATING(dtype, op, [&] {
          RETAIN_LAUNCH(dev, margin::feature_imitation_bwd)(
              as_ptr<scalar_t>(h, op, "h"), as_ptr<scalar_t>(h_ref, op, "h_ref"), as_ptr<double>(g, op, "grad"),
              as_ptr<uint8_t>(mask, op, "mask", true), N, D, p,
              as_mut_ptr<scalar_t>(grad_h, op, "grad_h", true),
              as_mut_ptr<scalar_t>(grad_h_ref, op, "grad_h_ref", true));
        });
      });
}

}  // namespace

void bind_margin(py::module_& m, bind::KernelTable& kernels) {
  bind_tm_loss(m, kernels);
  bind_kl_imitation(m, kernels);
  bind_feature_imitation(m, kernels);
}

}  // namespace retain
