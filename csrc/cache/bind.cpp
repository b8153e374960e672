// The cache family's entries in retain._C (cached_readout) and its mode codes. Thin: pointer
// checks, dtype dispatch, the launcher call (common/bind.h); no math.
#include <string>

#include "cache/cached_readout.h"
#include "common/bind.h"

namespace retain {
namespace {

constexpr const char* kCachedReadout = "retain::cached_readout";

// The pointers and sizes of one call, checked (u, seg_keys and online_keys may be null in residual
// mode; every pointer may be null when there are no tokens).
template <typename T>
cache::ReadoutArgs<T> readout_args(int mode, uintptr_t q, uintptr_t u, uintptr_t states, uintptr_t seg_keys,
                                   uintptr_t o, uintptr_t online_keys, int64_t B, int64_t T_, int64_t H, int64_t K,
                                   int64_t V, int64_t NS, int64_t L, int64_t top_k, double scale) {
  const char* op = kCachedReadout;
  check_sizes({B, T_, H, K, V, NS}, op);
  check(L >= 1, op, "segment_len must be >= 1, got " + std::to_string(L));
  check(mode >= 0 && mode <= 2, op, "mode code must be 0, 1 or 2 (retain._C.cached_readout_modes), got " + std::to_string(mode));
  const bool empty = B * T_ * H * K * V == 0;
  const bool residual = mode == static_cast<int>(cache::ReadoutMode::Residual);
  const bool no_states = empty || NS == 0;
  return {as_ptr<T>(q, op, "q", empty),
          as_ptr<T>(u, op, "u", empty || residual),
          as_ptr<T>(states, op, "states", no_states),
          as_ptr<T>(seg_keys, op, "seg_keys", no_states || residual),
          as_ptr<T>(o, op, "o_online", empty),
          as_ptr<T>(online_keys, op, "online_keys", empty || residual),
          B, T_, H, K, V, NS, L, mode, top_k, scale};
}

template <typename T>
cache::ReadoutGrads<T> readout_grads(uintptr_t dy, uintptr_t dq, uintptr_t du, uintptr_t dstates,
                                     uintptr_t dseg_keys, uintptr_t d_o, uintptr_t donline_keys, bool empty) {
  const char* op = kCachedReadout;
  return {as_ptr<T>(dy, op, "grad", empty), as_mut_ptr<T>(dq, op, "grad_q", true),
          as_mut_ptr<T>(du, op, "grad_u", true), as_mut_ptr<T>(dstates, op, "grad_states", true),
          as_mut_ptr<T>(dseg_keys, op, "grad_seg_keys", true), as_mut_ptr<T>(d_o, op, "grad_o_online", true),
          as_mut_ptr<T>(donline_keys, op, "grad_online_keys", true)};
}

void bind_cached_readout(py::module_& m, bind::KernelTable& kernels) {
  constexpr const char* op = kCachedReadout;
  bind::def<Cpu>(m, kernels, op, "cached_readout_fwd",
      [](auto dev, int dtype, int mode, uintptr_t q, uintptr_t u, uintptr_t states, uintptr_t seg_keys, uintptr_t o,
         uintptr_t online_keys, int64_t B, int64_t T_, int64_t H, int64_t K, int64_t V, int64_t NS, int64_t L,
         int64_t top_k, double scale, uintptr_t y) {
        RETAIN_DISPATCH_FLOATING(dtype, op, [&] {
          const auto a = readout_args<scalar_t>(mode, q, u, states, seg_keys, o, online_keys, B, T_, H, K, V, NS, L,
                                                top_k, scale);
          RETAIN_CPU(cache::cached_readout_fwd_cpu)(a, as_mut_ptr<scalar_t>(y, op, "y", B * T_ * H * V == 0),
                                                    dev.threads);
        });
      });
  // the backward's arguments are the same on both devices
  bind::def<Cpu, Cuda>(m, kernels, op, "cached_readout_bwd",
      [](auto dev, int dtype, int mode, uintptr_t q, uintptr_t u, uintptr_t states, uintptr_t seg_keys, uintptr_t o,
         uintptr_t online_keys, int64_t B, int64_t T_, int64_t H, int64_t K, int64_t V, int64_t NS, int64_t L,
         int64_t top_k, double scale, uintptr_t dy, uintptr_t dq, uintptr_t du, uintptr_t dstates,
         uintptr_t dseg_keys, uintptr_t d_o, uintptr_t donline_keys, uintptr_t gates, uintptr_t dz) {
        RETAIN_DISPATCH_FLOATING(dtype, op, [&] {
          using A = Acc<scalar_t>;
          const auto a = readout_args<scalar_t>(mode, q, u, states, seg_keys, o, online_keys, B, T_, H, K, V, NS, L,
                                                top_k, scale);
          const auto g = readout_grads<scalar_t>(dy, dq, du, dstates, dseg_keys, d_o, donline_keys,
                                                 B * T_ * H * V == 0);
          const bool no_scratch = mode == static_cast<int>(cache::ReadoutMode::Residual) ||
                                  cache::num_read(T_, L, NS) == 0 || B * T_ * H * K == 0;
          RETAIN_LAUNCH(dev, cache::cached_readout_bwd)(a, g, as_mut_ptr<A>(gates, op, "gates", no_scratch),
                                                        as_mut_ptr<A>(dz, op, "dz", no_scratch));
        });
      });
#ifdef RETAIN_WITH_CUDA
  bind::def<Cuda>(m, kernels, op, "cached_readout_fwd",
      [](auto dev, int dtype, int mode, uintptr_t q, uintptr_t u, uintptr_t states, uintptr_t seg_keys, uintptr_t o,
         uintptr_t online_keys, int64_t B, int64_t T_, int64_t H, int64_t K, int64_t V, int64_t NS, int64_t L,
         int64_t top_k, double scale, uintptr_t y, uintptr_t gates) {
        RETAIN_DISPATCH_FLOATING(dtype, op, [&] {
          using A = Acc<scalar_t>;
          const auto a = readout_args<scalar_t>(mode, q, u, states, seg_keys, o, online_keys, B, T_, H, K, V, NS, L,
                                                top_k, scale);
          const bool no_scratch = mode == static_cast<int>(cache::ReadoutMode::Residual) ||
                                  cache::num_read(T_, L, NS) == 0 || B * T_ * H * K == 0;
          cache::cached_readout_fwd_cuda(a, as_mut_ptr<scalar_t>(y, op, "y", B * T_ * H * V == 0),
                                         as_mut_ptr<A>(gates, op, "gates", no_scratch), dev.stream);
        });
      });
#endif

  // The mode codes, defined once (cache/cached_readout.h); 'soup' computes as 'gated'.
  py::dict modes;
  modes["residual"] = static_cast<int>(cache::ReadoutMode::Residual);
  modes["gated"] = static_cast<int>(cache::ReadoutMode::Gated);
  modes["soup"] = static_cast<int>(cache::ReadoutMode::Gated);
  modes["sparse"] = static_cast<int>(cache::ReadoutMode::Sparse);
  m.attr("cached_readout_modes") = modes;
}

}  // namespace

void bind_cache(py::module_& m, bind::KernelTable& kernels) { bind_cached_readout(m, kernels); }

}  // namespace retain
