// The scan family's entries in retain._C (linear_recurrence, memory_scan) and its codes. Thin:
// pointer checks, dtype dispatch, the launcher call (common/bind.h); no math.
#include "common/bind.h"
#include "scan/linear_recurrence.h"
#include "scan/memory_scan.h"

namespace retain {
namespace {

constexpr const char* kLinearRecurrence = "retain::linear_recurrence";
constexpr const char* kMemoryScan = "retain::memory_scan";

// memory_scan takes its many pointers and scalars as one dict (names as in MemoryScanParams):
// read under the GIL, then the kernel runs without it.
template <typename T>
scan::MemoryScanParams<T> memory_scan_params(const py::dict& d) {
  using A = Acc<T>;
  const char* op = kMemoryScan;
  auto ptr = [&](const char* key) -> uintptr_t { return d.contains(key) ? d[key].cast<uintptr_t>() : 0; };
  auto size = [&](const char* key) { return d[key].cast<int64_t>(); };
  scan::MemoryScanParams<T> P;
  P.B = size("B"); P.T = size("T"); P.H = size("H"); P.K = size("K"); P.V = size("V"); P.N = size("N");
  P.HK = d.contains("HK") ? size("HK") : P.H;
  check(P.HK >= 1 ? P.H % P.HK == 0 : P.H == 0, op, "the value heads H must be a multiple of the key heads HK");
  P.states_every = size("states_every");
  P.states_rows = size("states_rows");
  P.ckpt_every = size("ckpt_every");
  check_sizes({P.B, P.T, P.H, P.K, P.V, P.N, P.states_every, P.states_rows, P.ckpt_every}, op);
  const bool empty = P.B * P.T * P.H == 0;  // per-token tensors may then have no storage
  P.q = as_ptr<T>(ptr("q"), op, "q", empty);
  P.k = as_ptr<T>(ptr("k"), op, "k", empty);
  P.v = as_ptr<T>(ptr("v"), op, "v", empty);
  P.beta = as_ptr<A>(ptr("beta"), op, "beta", empty);
  P.g = as_ptr<A>(ptr("g"), op, "g", true);
  P.eta = as_ptr<A>(ptr("eta"), op, "eta", true);
  P.initial_S = as_ptr<A>(ptr("initial_S"), op, "initial_S", true);
  P.initial_Z = as_ptr<A>(ptr("initial_Z"), op, "initial_Z", true);
  P.cu_seqlens = as_ptr<int64_t>(ptr("cu_seqlens"), op, "cu_seqlens", true);
  P.o = as_mut_ptr<T>(ptr("o"), op, "o", true);
  P.final_S = as_mut_ptr<A>(ptr("final_S"), op, "final_S", true);
  P.final_Z = as_mut_ptr<A>(ptr("final_Z"), op, "final_Z", true);
  P.states = as_mut_ptr<A>(ptr("states"), op, "states", true);
  P.ckpt_S = as_mut_ptr<A>(ptr("ckpt_S"), op, "ckpt_S", true);
  P.ckpt_Z = as_mut_ptr<A>(ptr("ckpt_Z"), op, "ckpt_Z", true);
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
  check(!P.momentum || P.eta || empty, op, "momentum needs eta");
  check(P.objective >= 0 && P.objective <= 3, op, "objective code out of range");
  check(P.gate_kind >= 0 && P.gate_kind <= 2, op, "gate kind code out of range");
  return P;
}

template <typename T>
scan::MemoryScanGrads<T> memory_scan_grads(const py::dict& d) {
  using A = Acc<T>;
  const char* op = kMemoryScan;
  auto ptr = [&](const char* key) -> uintptr_t { return d.contains(key) ? d[key].cast<uintptr_t>() : 0; };
  scan::MemoryScanGrads<T> G;
  const bool empty = d["empty"].cast<bool>();  // no tokens: per-token tensors may have no storage
  G.grad_o = as_ptr<T>(ptr("grad_o"), op, "grad_o", empty);
  G.grad_final_S = as_ptr<A>(ptr("grad_final_S"), op, "grad_final_S", true);
  G.grad_final_Z = as_ptr<A>(ptr("grad_final_Z"), op, "grad_final_Z", true);
  G.grad_states = as_ptr<A>(ptr("grad_states"), op, "grad_states", true);
  G.grad_q = as_mut_ptr<T>(ptr("grad_q"), op, "grad_q", empty);
  G.grad_k = as_mut_ptr<T>(ptr("grad_k"), op, "grad_k", empty);
  G.grad_v = as_mut_ptr<T>(ptr("grad_v"), op, "grad_v", empty);
  G.grad_beta = as_mut_ptr<A>(ptr("grad_beta"), op, "grad_beta", empty);
  G.grad_g = as_mut_ptr<A>(ptr("grad_g"), op, "grad_g", true);
  G.grad_eta = as_mut_ptr<A>(ptr("grad_eta"), op, "grad_eta", true);
  G.grad_initial_S = as_mut_ptr<A>(ptr("grad_initial_S"), op, "grad_initial_S", true);
  G.grad_initial_Z = as_mut_ptr<A>(ptr("grad_initial_Z"), op, "grad_initial_Z", true);
  return G;
}

void bind_linear_recurrence(py::module_& m, bind::KernelTable& kernels) {
  constexpr const char* op = kLinearRecurrence;
  bind::def<Cpu, Cuda>(m, kernels, op, "linear_recurrence_fwd",
      [](auto dev, int dtype, uintptr_t a, uintptr_t x, uintptr_t initial, uintptr_t h, int64_t B, int64_t T,
         int64_t D, bool reverse) {
        check_sizes({B, T, D}, op);
        RETAIN_DISPATCH_FLOATING(dtype, op, [&] {
          RETAIN_LAUNCH(dev, scan::linear_recurrence_fwd)(
              as_ptr<scalar_t>(a, op, "a"), as_ptr<scalar_t>(x, op, "x"),
              as_ptr<scalar_t>(initial, op, "initial", true), as_mut_ptr<scalar_t>(h, op, "h"), B, T, D, reverse);
        });
      });
  bind::def<Cpu, Cuda>(m, kernels, op, "linear_recurrence_bwd",
      [](auto dev, int dtype, uintptr_t a, uintptr_t h, uintptr_t initial, uintptr_t grad_h, uintptr_t grad_x,
         uintptr_t grad_a, uintptr_t grad_initial, int64_t B, int64_t T, int64_t D, bool reverse) {
        check_sizes({B, T, D}, op);
        RETAIN_DISPATCH_FLOATING(dtype, op, [&] {
          RETAIN_LAUNCH(dev, scan::linear_recurrence_bwd)(
              as_ptr<scalar_t>(a, op, "a"), as_ptr<scalar_t>(h, op, "h"),
              as_ptr<scalar_t>(initial, op, "initial", true), as_ptr<scalar_t>(grad_h, op, "grad_h"),
              as_mut_ptr<scalar_t>(grad_x, op, "grad_x"), as_mut_ptr<scalar_t>(grad_a, op, "grad_a", true),
              as_mut_ptr<scalar_t>(grad_initial, op, "grad_initial", true), B, T, D, reverse);
        });
      });
}

// memory_scan: the params (and grads) dicts are read under the GIL (bind::Gil::kHold), which is
// released for the kernel. The CUDA backward also takes a workspace of memory_scan_cuda_work_numel
// values in the state dtype, allocated by Python.
void bind_memory_scan(py::module_& m, bind::KernelTable& kernels) {
  constexpr const char* op = kMemoryScan;
  bind::def<Cpu, Cuda>(m, kernels, op, "memory_scan_fwd",
      [](auto dev, int dtype, const py::dict& params) {
        RETAIN_DISPATCH_FLOATING(dtype, op, [&] {
          const auto P = memory_scan_params<scalar_t>(params);
          // (the CUDA launcher checks this itself)
          if constexpr (bind::is_cpu<decltype(dev)>) {
            check(P.ckpt_every > 0 || !P.ckpt_S, op, "checkpoints need ckpt_every > 0");
          }
          py::gil_scoped_release nogil;
          RETAIN_LAUNCH(dev, scan::memory_scan_fwd)(P);
        });
      },
      bind::Gil::kHold);
  bind::def<Cpu>(m, kernels, op, "memory_scan_bwd",
      [](auto dev, int dtype, const py::dict& params, const py::dict& grads) {
        RETAIN_DISPATCH_FLOATING(dtype, op, [&] {
          const auto P = memory_scan_params<scalar_t>(params);
          const auto G = memory_scan_grads<scalar_t>(grads);
          check(P.ckpt_every > 0, op, "the backward needs ckpt_every > 0");
          py::gil_scoped_release nogil;
          RETAIN_CPU(scan::memory_scan_bwd_cpu)(P, G, dev.threads);
        });
      },
      bind::Gil::kHold);
#ifdef RETAIN_WITH_CUDA
  bind::def<Cuda>(m, kernels, op, "memory_scan_bwd",
      [](auto dev, int dtype, const py::dict& params, const py::dict& grads, uintptr_t work, int64_t work_numel) {
        RETAIN_DISPATCH_FLOATING(dtype, op, [&] {
          const auto P = memory_scan_params<scalar_t>(params);
          const auto G = memory_scan_grads<scalar_t>(grads);
          auto* wp = as_mut_ptr<Acc<scalar_t>>(work, op, "work", true);
          py::gil_scoped_release nogil;
          scan::memory_scan_bwd_cuda(P, G, wp, work_numel, dev.stream);
        });
      },
      bind::Gil::kHold);
  m.def("memory_scan_cuda_work_numel", &scan::memory_scan_cuda_work_numel);
#endif

  // Codes and limits Python passes or checks, defined once (scan/memory_scan.h).
  py::dict objectives, gate_kinds;
  for (auto o : {scan::Objective::Dot, scan::Objective::L2, scan::Objective::Lp, scan::Objective::Huber}) {
    objectives[scan::objective_name(o)] = static_cast<int>(o);
  }
  for (auto g : {scan::GateKind::None, scan::GateKind::PerHead, scan::GateKind::PerKey}) {
    gate_kinds[scan::gate_kind_name(g)] = static_cast<int>(g);
  }
  m.attr("memory_scan_objectives") = objectives;
  m.attr("memory_scan_gate_kinds") = gate_kinds;
  m.attr("memory_scan_cuda_max_k") = scan::kMemoryScanCudaMaxK;
}

}  // namespace

void bind_scan(py::module_& m, bind::KernelTable& kernels) {
  bind_linear_recurrence(m, kernels);
  bind_memory_scan(m, kernels);
}

}  // namespace retain
