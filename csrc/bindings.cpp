// pybind11 module retain._C: thin bindings, no math. Every entry takes data pointers as
// integers (torch.Tensor.data_ptr()), a dtype code, int64 sizes, and a thread count (CPU) or a
// stream handle (CUDA); outputs are allocated in Python. The GIL is released around kernels.
#include <cstdint>
#include <type_traits>
#include <string>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "common/cpu_capability.h"
#include "common/dispatch.h"
#include "common/errors.h"
#include "common/parallel.h"
#include "margin/margin.h"
#include "scan/scan.h"

#ifdef RETAIN_WITH_CUDA
#include "common/cuda_info.h"
#endif

namespace py = pybind11;
using std::uintptr_t;

namespace {

// RETAIN_CPU(ns::launcher)(args...) calls the build of a CPU launcher compiled for the active CPU
// capability (common/cpu_capability.h).
#define RETAIN_CPU(LAUNCHER)                                                                    \
  [&](auto&&... args) {                                                                         \
    ::retain::cpu_dispatch([&](auto cap) { LAUNCHER<decltype(cap)::value>(args...); });         \
  }

constexpr const char* kLinearRecurrence = "retain::linear_recurrence";
constexpr const char* kMemoryScan = "retain::memory_scan";
constexpr const char* kTmLoss = "retain::tm_loss";
constexpr const char* kKl = "retain::kl_imitation";
constexpr const char* kFeature = "retain::feature_imitation";

py::dict build_info() {
  py::dict info;
  info["version"] = RETAIN_VERSION;
  info["compiler"] = RETAIN_COMPILER;
  info["openmp"] = _OPENMP;
  info["openmp_max_threads"] = retain::openmp_max_threads();
#ifdef RETAIN_WITH_CUDA
  info["cuda"] = true;
  info["cuda_archs"] = RETAIN_CUDA_ARCHS;
  info["cuda_runtime"] = retain::cuda_runtime_version();
#else
  info["cuda"] = false;
  info["cuda_archs"] = "";
  info["cuda_runtime"] = 0;
#endif
  return info;
}

// Typed pointers for the linear_recurrence entries; `launch` gets them and picks the device.
template <typename Launch>
void linear_recurrence_fwd(int dtype, uintptr_t a, uintptr_t x, uintptr_t initial, uintptr_t h, int64_t B,
                           int64_t T, int64_t D, const Launch& launch) {
  const char* op = kLinearRecurrence;
  retain::check_sizes({B, T, D}, op);
  RETAIN_DISPATCH_FLOATING(dtype, op, [&] {
    launch(retain::as_ptr<scalar_t>(a, op, "a"), retain::as_ptr<scalar_t>(x, op, "x"),
           retain::as_ptr<scalar_t>(initial, op, "initial", true), retain::as_mut_ptr<scalar_t>(h, op, "h"));
  });
}

template <typename Launch>
void linear_recurrence_bwd(int dtype, uintptr_t a, uintptr_t h, uintptr_t initial, uintptr_t grad_h,
                           uintptr_t grad_x, uintptr_t grad_a, uintptr_t grad_initial, int64_t B, int64_t T,
                           int64_t D, const Launch& launch) {
  const char* op = kLinearRecurrence;
  retain::check_sizes({B, T, D}, op);
  RETAIN_DISPATCH_FLOATING(dtype, op, [&] {
    launch(retain::as_ptr<scalar_t>(a, op, "a"), retain::as_ptr<scalar_t>(h, op, "h"),
           retain::as_ptr<scalar_t>(initial, op, "initial", true), retain::as_ptr<scalar_t>(grad_h, op, "grad_h"),
           retain::as_mut_ptr<scalar_t>(grad_x, op, "grad_x"), retain::as_mut_ptr<scalar_t>(grad_a, op, "grad_a", true),
           retain::as_mut_ptr<scalar_t>(grad_initial, op, "grad_initial", true));
  });
}

// memory_scan takes its many pointers and scalars as one dict (names as in MemoryScanParams):
// read under the GIL, then the kernel runs without it.
template <typename T>
retain::scan::MemoryScanParams<T> memory_scan_params(const py::dict& d) {
  using A = retain::Acc<T>;
  const char* op = kMemoryScan;
  auto ptr = [&](const char* key) -> uintptr_t { return d.contains(key) ? d[key].cast<uintptr_t>() : 0; };
  auto size = [&](const char* key) { return d[key].cast<int64_t>(); };
  retain::scan::MemoryScanParams<T> P;
  P.B = size("B"); P.T = size("T"); P.H = size("H"); P.K = size("K"); P.V = size("V"); P.N = size("N");
  P.states_every = size("states_every");
  P.states_rows = size("states_rows");
  P.ckpt_every = size("ckpt_every");
  retain::check_sizes({P.B, P.T, P.H, P.K, P.V, P.N, P.states_every, P.states_rows, P.ckpt_every}, op);
  const bool empty = P.B * P.T * P.H == 0;  // per-token tensors may then have no storage
  P.q = retain::as_ptr<T>(ptr("q"), op, "q", empty);
  P.k = retain::as_ptr<T>(ptr("k"), op, "k", empty);
  P.v = retain::as_ptr<T>(ptr("v"), op, "v", empty);
  P.beta = retain::as_ptr<T>(ptr("beta"), op, "beta", empty);
  P.g = retain::as_ptr<T>(ptr("g"), op, "g", true);
  P.eta = retain::as_ptr<T>(ptr("eta"), op, "eta", true);
  P.initial_S = retain::as_ptr<A>(ptr("initial_S"), op, "initial_S", true);
  P.initial_Z = retain::as_ptr<A>(ptr("initial_Z"), op, "initial_Z", true);
  P.cu_seqlens = retain::as_ptr<int64_t>(ptr("cu_seqlens"), op, "cu_seqlens", true);
  P.o = retain::as_mut_ptr<T>(ptr("o"), op, "o", true);
  P.final_S = retain::as_mut_ptr<A>(ptr("final_S"), op, "final_S", true);
  P.final_Z = retain::as_mut_ptr<A>(ptr("final_Z"), op, "final_Z", true);
  P.states = retain::as_mut_ptr<A>(ptr("states"), op, "states", true);
  P.ckpt_S = retain::as_mut_ptr<A>(ptr("ckpt_S"), op, "ckpt_S", true);
  P.ckpt_Z = retain::as_mut_ptr<A>(ptr("ckpt_Z"), op, "ckpt_Z", true);
  P.scale = static_cast<A>(d["scale"].cast<double>());
  P.p = static_cast<A>(d["p"].cast<double>());
  P.delta = static_cast<A>(d["delta"].cast<double>());
  P.eps = static_cast<A>(d["eps"].cast<double>());
  P.objective = d["objective"].cast<int>();
  P.gate_kind = d["gate_kind"].cast<int>();
  P.l2norm = d["l2norm"].cast<bool>();
  P.retention_first = d["retention_first"].cast<bool>();
  P.gate_log = d["gate_log"].cast<bool>();
  P.momentum = d["momentum"].cast<bool>();
  retain::check(!P.momentum || P.eta || empty, op, "momentum needs eta");
  retain::check(P.objective >= 0 && P.objective <= 3, op, "objective code out of range");
  retain::check(P.gate_kind >= 0 && P.gate_kind <= 2, op, "gate kind code out of range");
  return P;
}

template <typename T>
retain::scan::MemoryScanGrads<T> memory_scan_grads(const py::dict& d) {
  using A = retain::Acc<T>;
  const char* op = kMemoryScan;
  auto ptr = [&](const char* key) -> uintptr_t { return d.contains(key) ? d[key].cast<uintptr_t>() : 0; };
  retain::scan::MemoryScanGrads<T> G;
  const bool empty = d["empty"].cast<bool>();  // no tokens: per-token tensors may have no storage
  G.grad_o = retain::as_ptr<T>(ptr("grad_o"), op, "grad_o", empty);
  G.grad_final_S = retain::as_ptr<A>(ptr("grad_final_S"), op, "grad_final_S", true);
  G.grad_final_Z = retain::as_ptr<A>(ptr("grad_final_Z"), op, "grad_final_Z", true);
  G.grad_states = retain::as_ptr<A>(ptr("grad_states"), op, "grad_states", true);
  G.grad_q = retain::as_mut_ptr<T>(ptr("grad_q"), op, "grad_q", empty);
  G.grad_k = retain::as_mut_ptr<T>(ptr("grad_k"), op, "grad_k", empty);
  G.grad_v = retain::as_mut_ptr<T>(ptr("grad_v"), op, "grad_v", empty);
  G.grad_beta = retain::as_mut_ptr<T>(ptr("grad_beta"), op, "grad_beta", empty);
  G.grad_g = retain::as_mut_ptr<T>(ptr("grad_g"), op, "grad_g", true);
  G.grad_eta = retain::as_mut_ptr<T>(ptr("grad_eta"), op, "grad_eta", true);
  G.grad_initial_S = retain::as_mut_ptr<A>(ptr("grad_initial_S"), op, "grad_initial_S", true);
  G.grad_initial_Z = retain::as_mut_ptr<A>(ptr("grad_initial_Z"), op, "grad_initial_Z", true);
  return G;
}

void memory_scan_fwd_cpu(int dtype, const py::dict& params, int nthreads) {
  RETAIN_DISPATCH_FLOATING(dtype, kMemoryScan, [&] {
    const auto P = memory_scan_params<scalar_t>(params);
    retain::check(P.ckpt_every > 0 || !P.ckpt_S, kMemoryScan, "checkpoints need ckpt_every > 0");
    py::gil_scoped_release nogil;
    RETAIN_CPU(retain::scan::memory_scan_fwd_cpu)(P, nthreads);
  });
}

void memory_scan_bwd_cpu(int dtype, const py::dict& params, const py::dict& grads, int nthreads) {
  RETAIN_DISPATCH_FLOATING(dtype, kMemoryScan, [&] {
    const auto P = memory_scan_params<scalar_t>(params);
    const auto G = memory_scan_grads<scalar_t>(grads);
    retain::check(P.ckpt_every > 0, kMemoryScan, "the backward needs ckpt_every > 0");
    py::gil_scoped_release nogil;
    RETAIN_CPU(retain::scan::memory_scan_bwd_cpu)(P, G, nthreads);
  });
}

// tm_loss: labels are int8 (packed = false) or 2-bit codes in uint8 (packed = true).
template <typename Launch>
void tm_loss_dispatch(int dtype, bool packed, uintptr_t h, uintptr_t labels, uintptr_t pos, uintptr_t neg,
                      uintptr_t mask, int64_t B, int64_t L, int64_t D, const Launch& launch) {
  const char* op = kTmLoss;
  retain::check_sizes({B, L, D}, op);
  const bool empty = B * L * D == 0;
  RETAIN_DISPATCH_FLOATING(dtype, op, [&] {
    using A = retain::Acc<scalar_t>;
    const auto* hp = retain::as_ptr<scalar_t>(h, op, "h", empty);
    const auto* pp = retain::as_ptr<A>(pos, op, "pos_thr", empty);
    const auto* np = retain::as_ptr<A>(neg, op, "neg_thr", empty);
    const auto* mp = retain::as_ptr<uint8_t>(mask, op, "mask", true);
    if (packed) {
      launch(hp, retain::as_ptr<uint8_t>(labels, op, "labels", empty), pp, np, mp);
    } else {
      launch(hp, retain::as_ptr<int8_t>(labels, op, "labels", empty), pp, np, mp);
    }
  });
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "retain native core: torch-free CPU (OpenMP) and CUDA kernels on raw pointers";
  m.def("build_info", &build_info, "Build facts: version, compiler, OpenMP, CUDA and its architectures.");

  // CPU capability: which build of the CPU kernels runs (common/cpu_capability.h).
  m.def("cpu_capability", [] { return std::string(retain::cpu_capability_name(retain::cpu_capability())); },
        "The CPU capability the kernels run with: 'default', 'avx2' or 'avx512'.");
  m.def("cpu_capability_supported",
        [] { return std::string(retain::cpu_capability_name(retain::cpu_capability_supported())); },
        "The highest CPU capability this CPU supports.");
  m.def("set_cpu_capability",
        [](const std::string& name) { retain::set_cpu_capability(retain::parse_cpu_capability(name)); },
        "Run later kernel calls with the named capability; ValueError when the CPU or the build lacks it.");
  py::list names, compiled;  // lowest first
  for (auto c : retain::kCpuCapabilities) {
    names.append(retain::cpu_capability_name(c));
    if (retain::cpu_capability_compiled(c)) compiled.append(retain::cpu_capability_name(c));
  }
  m.attr("cpu_capability_names") = names;
  m.attr("cpu_capabilities_compiled") = compiled;

  // Codes and limits Python passes or checks, defined once (here and in the headers they name).
  py::dict dtype_codes;
  for (auto d : {retain::DType::Float32, retain::DType::Float64, retain::DType::BFloat16, retain::DType::Float16}) {
    dtype_codes[retain::dtype_name(d)] = static_cast<int>(d);
  }
  m.attr("dtype_codes") = dtype_codes;
  py::dict objectives, gate_kinds;
  namespace sc = retain::scan;
  for (auto o : {sc::Objective::Dot, sc::Objective::L2, sc::Objective::Lp, sc::Objective::Huber}) {
    objectives[sc::objective_name(o)] = static_cast<int>(o);
  }
  for (auto g : {sc::GateKind::None, sc::GateKind::PerHead, sc::GateKind::PerKey}) {
    gate_kinds[sc::gate_kind_name(g)] = static_cast<int>(g);
  }
  m.attr("memory_scan_objectives") = objectives;
  m.attr("memory_scan_gate_kinds") = gate_kinds;
  m.attr("memory_scan_cuda_max_k") = sc::kMemoryScanCudaMaxK;

  // Each family lists its kernels per device; Python reads this to report capabilities.
  py::dict kernels;
  py::list lr_devices;
  lr_devices.append("cpu");
#ifdef RETAIN_WITH_CUDA
  lr_devices.append("cuda");
#endif
  kernels["linear_recurrence"] = lr_devices;
  py::list ms_devices;
  ms_devices.append("cpu");
#ifdef RETAIN_WITH_CUDA
  ms_devices.append("cuda");  // memory_scan_cuda.cu
#endif
  kernels["memory_scan"] = ms_devices;
  py::list tm_devices;
  tm_devices.append("cpu");
#ifdef RETAIN_WITH_CUDA
  tm_devices.append("cuda");  // margin_cuda.cu: tm_loss, kl_imitation, feature_imitation
#endif
  kernels["tm_loss"] = tm_devices;
  kernels["kl_imitation"] = tm_devices;
  kernels["feature_imitation"] = tm_devices;
  m.attr("kernels") = kernels;

  const auto nogil = py::call_guard<py::gil_scoped_release>();
  namespace scan = retain::scan;
  m.def(
      "linear_recurrence_fwd_cpu",
      [](int dtype, uintptr_t a, uintptr_t x, uintptr_t initial, uintptr_t h, int64_t B, int64_t T, int64_t D,
         bool reverse, int nthreads) {
        linear_recurrence_fwd(dtype, a, x, initial, h, B, T, D, [&](auto... p) {
          RETAIN_CPU(scan::linear_recurrence_fwd_cpu)(p..., B, T, D, reverse, nthreads);
        });
      },
      nogil);
  m.def(
      "linear_recurrence_bwd_cpu",
      [](int dtype, uintptr_t a, uintptr_t h, uintptr_t initial, uintptr_t grad_h, uintptr_t grad_x,
         uintptr_t grad_a, uintptr_t grad_initial, int64_t B, int64_t T, int64_t D, bool reverse, int nthreads) {
        linear_recurrence_bwd(dtype, a, h, initial, grad_h, grad_x, grad_a, grad_initial, B, T, D, [&](auto... p) {
          RETAIN_CPU(scan::linear_recurrence_bwd_cpu)(p..., B, T, D, reverse, nthreads);
        });
      },
      nogil);
  m.def(
      "tm_loss_fwd_cpu",
      [](int dtype, bool packed, uintptr_t h, uintptr_t labels, int64_t label_row, uintptr_t pos, uintptr_t neg,
         bool per_sample, uintptr_t mask, int64_t B, int64_t L, int64_t D, uintptr_t row_sum, uintptr_t row_count,
         uintptr_t slope_bits, int nthreads) {
        auto* sums = retain::as_mut_ptr<double>(row_sum, kTmLoss, "row_sum", B * L == 0);
        auto* counts = retain::as_mut_ptr<int64_t>(row_count, kTmLoss, "row_count", B * L == 0);
        auto* bits = retain::as_mut_ptr<uint16_t>(slope_bits, kTmLoss, "slope_bits", true);
        tm_loss_dispatch(dtype, packed, h, labels, pos, neg, mask, B, L, D, [&](auto hp, auto lp, auto pp, auto np, auto mp) {
          RETAIN_CPU(retain::margin::tm_loss_fwd_cpu)(hp, lp, label_row, pp, np, per_sample, mp, B, L, D, sums,
                                                      counts, bits, nthreads);
        });
      },
      nogil);
  m.def(
      "tm_loss_bwd_bits_cpu",
      [](int dtype, uintptr_t slope_bits, int64_t rows, int64_t D, double scale, uintptr_t grad, int nthreads) {
        retain::check_sizes({rows, D}, kTmLoss);
        const bool empty = rows * D == 0;
        const auto* bits = retain::as_ptr<uint16_t>(slope_bits, kTmLoss, "slope_bits", empty);
        RETAIN_DISPATCH_FLOATING(dtype, kTmLoss, [&] {
          if constexpr (std::is_same_v<scalar_t, double>) {
            retain::check(false, kTmLoss, "slope bits are kept for float32/bfloat16/float16 only");
          } else {
            RETAIN_CPU(retain::margin::tm_loss_bwd_bits_cpu)(
                bits, rows, D, scale, retain::as_mut_ptr<scalar_t>(grad, kTmLoss, "grad_h", empty), nthreads);
          }
        });
      },
      nogil);
  m.def(
      "tm_loss_bwd_cpu",
      [](int dtype, bool packed, uintptr_t h, uintptr_t labels, int64_t label_row, uintptr_t pos, uintptr_t neg,
         bool per_sample, uintptr_t mask, int64_t B, int64_t L, int64_t D, double scale, uintptr_t grad,
         int nthreads) {
        tm_loss_dispatch(dtype, packed, h, labels, pos, neg, mask, B, L, D, [&](auto hp, auto lp, auto pp, auto np, auto mp) {
          using Tp = std::remove_const_t<std::remove_pointer_t<decltype(hp)>>;
          auto* gp = retain::as_mut_ptr<Tp>(grad, kTmLoss, "grad_h", B * L * D == 0);
          RETAIN_CPU(retain::margin::tm_loss_bwd_cpu)(hp, lp, label_row, pp, np, per_sample, mp, B, L, D, scale, gp, nthreads);
        });
      },
      nogil);
  m.def(
      "kl_imitation_fwd_cpu",
      [](int dtype, uintptr_t z, uintptr_t z_ref, uintptr_t mask, int64_t N, int64_t V, double inv_t, uintptr_t loss,
         uintptr_t lse, uintptr_t lse_ref, int nthreads) {
        retain::check_sizes({N, V}, kKl);
        retain::check(V > 0, kKl, "the vocabulary must not be empty");
        RETAIN_DISPATCH_FLOATING(dtype, kKl, [&] {
          RETAIN_CPU(retain::margin::kl_imitation_fwd_cpu)(
              retain::as_ptr<scalar_t>(z, kKl, "z"), retain::as_ptr<scalar_t>(z_ref, kKl, "z_ref"),
              retain::as_ptr<uint8_t>(mask, kKl, "mask", true), N, V, inv_t, retain::as_mut_ptr<double>(loss, kKl, "loss"),
              retain::as_mut_ptr<double>(lse, kKl, "lse"), retain::as_mut_ptr<double>(lse_ref, kKl, "lse_ref"), nthreads);
        });
      },
      nogil);
  m.def(
      "kl_imitation_fwd_grad_cpu",
      [](int dtype, uintptr_t z, uintptr_t z_ref, uintptr_t mask, int64_t N, int64_t V, double inv_t,
         double grad_scale, uintptr_t loss, uintptr_t lse, uintptr_t lse_ref, uintptr_t grad_z, uintptr_t grad_z_ref,
         int nthreads) {
        retain::check_sizes({N, V}, kKl);
        retain::check(V > 0, kKl, "the vocabulary must not be empty");
        RETAIN_DISPATCH_FLOATING(dtype, kKl, [&] {
          RETAIN_CPU(retain::margin::kl_imitation_fwd_grad_cpu)(
              retain::as_ptr<scalar_t>(z, kKl, "z"), retain::as_ptr<scalar_t>(z_ref, kKl, "z_ref"),
              retain::as_ptr<uint8_t>(mask, kKl, "mask", true), N, V, inv_t, grad_scale,
              retain::as_mut_ptr<double>(loss, kKl, "loss"), retain::as_mut_ptr<double>(lse, kKl, "lse"),
              retain::as_mut_ptr<double>(lse_ref, kKl, "lse_ref"),
              retain::as_mut_ptr<scalar_t>(grad_z, kKl, "grad_z", true),
              retain::as_mut_ptr<scalar_t>(grad_z_ref, kKl, "grad_z_ref", true), nthreads);
        });
      },
      nogil);
  m.def(
      "kl_imitation_bwd_cpu",
      [](int dtype, uintptr_t z, uintptr_t z_ref, uintptr_t g, uintptr_t loss, uintptr_t lse, uintptr_t lse_ref,
         int64_t N, int64_t V, double inv_t, uintptr_t grad_z, uintptr_t grad_z_ref, int nthreads) {
        retain::check_sizes({N, V}, kKl);
        RETAIN_DISPATCH_FLOATING(dtype, kKl, [&] {
          RETAIN_CPU(retain::margin::kl_imitation_bwd_cpu)(
              retain::as_ptr<scalar_t>(z, kKl, "z"), retain::as_ptr<scalar_t>(z_ref, kKl, "z_ref"),
              retain::as_ptr<double>(g, kKl, "grad"), retain::as_ptr<double>(loss, kKl, "loss"),
              retain::as_ptr<double>(lse, kKl, "lse"), retain::as_ptr<double>(lse_ref, kKl, "lse_ref"), N, V, inv_t,
              retain::as_mut_ptr<scalar_t>(grad_z, kKl, "grad_z", true),
              retain::as_mut_ptr<scalar_t>(grad_z_ref, kKl, "grad_z_ref", true), nthreads);
        });
      },
      nogil);
  m.def(
      "feature_imitation_fwd_cpu",
      [](int dtype, uintptr_t h, uintptr_t h_ref, uintptr_t mask, int64_t N, int64_t D, int p, uintptr_t loss,
         int nthreads) {
        retain::check_sizes({N, D}, kFeature);
        retain::check(p == 1 || p == 2, kFeature, "p must be 1 or 2, got " + std::to_string(p));
        RETAIN_DISPATCH_FLOATING(dtype, kFeature, [&] {
          RETAIN_CPU(retain::margin::feature_imitation_fwd_cpu)(
              retain::as_ptr<scalar_t>(h, kFeature, "h"), retain::as_ptr<scalar_t>(h_ref, kFeature, "h_ref"),
              retain::as_ptr<uint8_t>(mask, kFeature, "mask", true), N, D, p,
              retain::as_mut_ptr<double>(loss, kFeature, "loss"), nthreads);
        });
      },
      nogil);
  m.def(
      "feature_imitation_fwd_grad_cpu",
      [](int dtype, uintptr_t h, uintptr_t h_ref, uintptr_t mask, int64_t N, int64_t D, int p, double grad_scale,
         uintptr_t loss, uintptr_t grad_h, uintptr_t grad_h_ref, int nthreads) {
        retain::check_sizes({N, D}, kFeature);
        retain::check(p == 1 || p == 2, kFeature, "p must be 1 or 2, got " + std::to_string(p));
        RETAIN_DISPATCH_FLOATING(dtype, kFeature, [&] {
          RETAIN_CPU(retain::margin::feature_imitation_fwd_grad_cpu)(
              retain::as_ptr<scalar_t>(h, kFeature, "h"), retain::as_ptr<scalar_t>(h_ref, kFeature, "h_ref"),
              retain::as_ptr<uint8_t>(mask, kFeature, "mask", true), N, D, p, grad_scale,
              retain::as_mut_ptr<double>(loss, kFeature, "loss"),
              retain::as_mut_ptr<scalar_t>(grad_h, kFeature, "grad_h", true),
              retain::as_mut_ptr<scalar_t>(grad_h_ref, kFeature, "grad_h_ref", true), nthreads);
        });
      },
      nogil);
  m.def(
      "feature_imitation_bwd_cpu",
      [](int dtype, uintptr_t h, uintptr_t h_ref, uintptr_t g, uintptr_t mask, int64_t N, int64_t D, int p,
         uintptr_t grad_h, uintptr_t grad_h_ref, int nthreads) {
        retain::check_sizes({N, D}, kFeature);
        retain::check(p == 1 || p == 2, kFeature, "p must be 1 or 2, got " + std::to_string(p));
        RETAIN_DISPATCH_FLOATING(dtype, kFeature, [&] {
          RETAIN_CPU(retain::margin::feature_imitation_bwd_cpu)(
              retain::as_ptr<scalar_t>(h, kFeature, "h"), retain::as_ptr<scalar_t>(h_ref, kFeature, "h_ref"),
              retain::as_ptr<double>(g, kFeature, "grad"), retain::as_ptr<uint8_t>(mask, kFeature, "mask", true), N, D,
              p, retain::as_mut_ptr<scalar_t>(grad_h, kFeature, "grad_h", true),
              retain::as_mut_ptr<scalar_t>(grad_h_ref, kFeature, "grad_h_ref", true), nthreads);
        });
      },
      nogil);
#ifdef RETAIN_WITH_CUDA
  // margin family on CUDA (margin_cuda.cu): the CPU entries' arguments with a stream for the thread
  // count; tm_loss_bwd_cuda takes the address of its float64 scale on the device.
  m.def(
      "tm_loss_fwd_cuda",
      [](int dtype, bool packed, uintptr_t h, uintptr_t labels, int64_t label_row, uintptr_t pos, uintptr_t neg,
         bool per_sample, uintptr_t mask, int64_t B, int64_t L, int64_t D, uintptr_t row_sum, uintptr_t row_count,
         uintptr_t stream) {
        auto* sums = retain::as_mut_ptr<double>(row_sum, kTmLoss, "row_sum", B * L == 0);
        auto* counts = retain::as_mut_ptr<int64_t>(row_count, kTmLoss, "row_count", B * L == 0);
        tm_loss_dispatch(dtype, packed, h, labels, pos, neg, mask, B, L, D, [&](auto hp, auto lp, auto pp, auto np, auto mp) {
          retain::margin::tm_loss_fwd_cuda(hp, lp, label_row, pp, np, per_sample, mp, B, L, D, sums, counts, stream);
        });
      },
      nogil);
  m.def(
      "tm_loss_bwd_cuda",
      [](int dtype, bool packed, uintptr_t h, uintptr_t labels, int64_t label_row, uintptr_t pos, uintptr_t neg,
         bool per_sample, uintptr_t mask, int64_t B, int64_t L, int64_t D, uintptr_t scale, uintptr_t grad,
         uintptr_t stream) {
        const auto* sp = retain::as_ptr<double>(scale, kTmLoss, "scale");
        tm_loss_dispatch(dtype, packed, h, labels, pos, neg, mask, B, L, D, [&](auto hp, auto lp, auto pp, auto np, auto mp) {
          using Tp = std::remove_const_t<std::remove_pointer_t<decltype(hp)>>;
          auto* gp = retain::as_mut_ptr<Tp>(grad, kTmLoss, "grad_h", B * L * D == 0);
          retain::margin::tm_loss_bwd_cuda(hp, lp, label_row, pp, np, per_sample, mp, B, L, D, sp, gp, stream);
        });
      },
      nogil);
  m.def(
      "kl_imitation_fwd_cuda",
      [](int dtype, uintptr_t z, uintptr_t z_ref, uintptr_t mask, int64_t N, int64_t V, double inv_t, uintptr_t loss,
         uintptr_t lse, uintptr_t lse_ref, uintptr_t stream) {
        retain::check_sizes({N, V}, kKl);
        retain::check(V > 0, kKl, "the vocabulary must not be empty");
        RETAIN_DISPATCH_FLOATING(dtype, kKl, [&] {
          retain::margin::kl_imitation_fwd_cuda(
              retain::as_ptr<scalar_t>(z, kKl, "z"), retain::as_ptr<scalar_t>(z_ref, kKl, "z_ref"),
              retain::as_ptr<uint8_t>(mask, kKl, "mask", true), N, V, inv_t, retain::as_mut_ptr<double>(loss, kKl, "loss"),
              retain::as_mut_ptr<double>(lse, kKl, "lse"), retain::as_mut_ptr<double>(lse_ref, kKl, "lse_ref"), stream);
        });
      },
      nogil);
  m.def(
      "kl_imitation_bwd_cuda",
      [](int dtype, uintptr_t z, uintptr_t z_ref, uintptr_t g, uintptr_t loss, uintptr_t lse, uintptr_t lse_ref,
         int64_t N, int64_t V, double inv_t, uintptr_t grad_z, uintptr_t grad_z_ref, uintptr_t stream) {
        retain::check_sizes({N, V}, kKl);
        RETAIN_DISPATCH_FLOATING(dtype, kKl, [&] {
          retain::margin::kl_imitation_bwd_cuda(
              retain::as_ptr<scalar_t>(z, kKl, "z"), retain::as_ptr<scalar_t>(z_ref, kKl, "z_ref"),
              retain::as_ptr<double>(g, kKl, "grad"), retain::as_ptr<double>(loss, kKl, "loss"),
              retain::as_ptr<double>(lse, kKl, "lse"), retain::as_ptr<double>(lse_ref, kKl, "lse_ref"), N, V, inv_t,
              retain::as_mut_ptr<scalar_t>(grad_z, kKl, "grad_z", true),
              retain::as_mut_ptr<scalar_t>(grad_z_ref, kKl, "grad_z_ref", true), stream);
        });
      },
      nogil);
  m.def(
      "feature_imitation_fwd_cuda",
      [](int dtype, uintptr_t h, uintptr_t h_ref, uintptr_t mask, int64_t N, int64_t D, int p, uintptr_t loss,
         uintptr_t stream) {
        retain::check_sizes({N, D}, kFeature);
        retain::check(p == 1 || p == 2, kFeature, "p must be 1 or 2, got " + std::to_string(p));
        RETAIN_DISPATCH_FLOATING(dtype, kFeature, [&] {
          retain::margin::feature_imitation_fwd_cuda(
              retain::as_ptr<scalar_t>(h, kFeature, "h"), retain::as_ptr<scalar_t>(h_ref, kFeature, "h_ref"),
              retain::as_ptr<uint8_t>(mask, kFeature, "mask", true), N, D, p,
              retain::as_mut_ptr<double>(loss, kFeature, "loss"), stream);
        });
      },
      nogil);
  m.def(
      "feature_imitation_bwd_cuda",
      [](int dtype, uintptr_t h, uintptr_t h_ref, uintptr_t g, uintptr_t mask, int64_t N, int64_t D, int p,
         uintptr_t grad_h, uintptr_t grad_h_ref, uintptr_t stream) {
        retain::check_sizes({N, D}, kFeature);
        retain::check(p == 1 || p == 2, kFeature, "p must be 1 or 2, got " + std::to_string(p));
        RETAIN_DISPATCH_FLOATING(dtype, kFeature, [&] {
          retain::margin::feature_imitation_bwd_cuda(
              retain::as_ptr<scalar_t>(h, kFeature, "h"), retain::as_ptr<scalar_t>(h_ref, kFeature, "h_ref"),
              retain::as_ptr<double>(g, kFeature, "grad"), retain::as_ptr<uint8_t>(mask, kFeature, "mask", true), N, D,
              p, retain::as_mut_ptr<scalar_t>(grad_h, kFeature, "grad_h", true),
              retain::as_mut_ptr<scalar_t>(grad_h_ref, kFeature, "grad_h_ref", true), stream);
        });
      },
      nogil);
#endif
  m.def("memory_scan_fwd_cpu", &memory_scan_fwd_cpu);
  m.def("memory_scan_bwd_cpu", &memory_scan_bwd_cpu);
#ifdef RETAIN_WITH_CUDA
  m.def(
      "linear_recurrence_fwd_cuda",
      [](int dtype, uintptr_t a, uintptr_t x, uintptr_t initial, uintptr_t h, int64_t B, int64_t T, int64_t D,
         bool reverse, uintptr_t stream) {
        linear_recurrence_fwd(dtype, a, x, initial, h, B, T, D, [&](auto... p) {
          scan::linear_recurrence_fwd_cuda(p..., B, T, D, reverse, stream);
        });
      },
      nogil);
  m.def(
      "linear_recurrence_bwd_cuda",
      [](int dtype, uintptr_t a, uintptr_t h, uintptr_t initial, uintptr_t grad_h, uintptr_t grad_x,
         uintptr_t grad_a, uintptr_t grad_initial, int64_t B, int64_t T, int64_t D, bool reverse, uintptr_t stream) {
        linear_recurrence_bwd(dtype, a, h, initial, grad_h, grad_x, grad_a, grad_initial, B, T, D, [&](auto... p) {
          scan::linear_recurrence_bwd_cuda(p..., B, T, D, reverse, stream);
        });
      },
      nogil);
  // memory_scan on CUDA: the params/grads dicts of the CPU entries; the backward also takes a
  // workspace of memory_scan_cuda_work_numel values in the state dtype, allocated by Python.
  m.def("memory_scan_fwd_cuda", [](int dtype, const py::dict& params, uintptr_t stream) {
    RETAIN_DISPATCH_FLOATING(dtype, kMemoryScan, [&] {
      const auto P = memory_scan_params<scalar_t>(params);
      py::gil_scoped_release release;
      scan::memory_scan_fwd_cuda(P, stream);
    });
  });
  m.def("memory_scan_bwd_cuda", [](int dtype, const py::dict& params, const py::dict& grads, uintptr_t work,
                                   int64_t work_numel, uintptr_t stream) {
    RETAIN_DISPATCH_FLOATING(dtype, kMemoryScan, [&] {
      const auto P = memory_scan_params<scalar_t>(params);
      const auto G = memory_scan_grads<scalar_t>(grads);
      auto* wp = retain::as_mut_ptr<retain::Acc<scalar_t>>(work, kMemoryScan, "work", true);
      py::gil_scoped_release release;
      scan::memory_scan_bwd_cuda(P, G, wp, work_numel, stream);
    });
  });
  m.def("memory_scan_cuda_work_numel", &scan::memory_scan_cuda_work_numel);
#endif
}
