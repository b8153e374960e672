// pybind11 module retain._C: thin bindings, no math. Every entry takes data pointers as
// integers (torch.Tensor.data_ptr()), a dtype code, int64 sizes, and a thread count (CPU) or a
// stream handle (CUDA); outputs are allocated in Python. The GIL is released around kernels.
#include <cstdint>
#include <string>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "common/dispatch.h"
#include "common/errors.h"
#include "common/parallel.h"
#include "scan/scan.h"

#ifdef RETAIN_WITH_CUDA
#include "common/cuda_info.h"
#endif

namespace py = pybind11;
using std::uintptr_t;

namespace {

constexpr const char* kLinearRecurrence = "retain::linear_recurrence";

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

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "retain native core: torch-free CPU (OpenMP) and CUDA kernels on raw pointers";
  m.def("build_info", &build_info, "Build facts: version, compiler, OpenMP, CUDA and its architectures.");

  // Each family lists its kernels per device; Python reads this to report capabilities.
  py::dict kernels;
  py::list lr_devices;
  lr_devices.append("cpu");
#ifdef RETAIN_WITH_CUDA
  lr_devices.append("cuda");
#endif
  kernels["linear_recurrence"] = lr_devices;
  m.attr("kernels") = kernels;

  const auto nogil = py::call_guard<py::gil_scoped_release>();
  namespace scan = retain::scan;
  m.def(
      "linear_recurrence_fwd_cpu",
      [](int dtype, uintptr_t a, uintptr_t x, uintptr_t initial, uintptr_t h, int64_t B, int64_t T, int64_t D,
         bool reverse, int nthreads) {
        linear_recurrence_fwd(dtype, a, x, initial, h, B, T, D, [&](auto... p) {
          scan::linear_recurrence_fwd_cpu(p..., B, T, D, reverse, nthreads);
        });
      },
      nogil);
  m.def(
      "linear_recurrence_bwd_cpu",
      [](int dtype, uintptr_t a, uintptr_t h, uintptr_t initial, uintptr_t grad_h, uintptr_t grad_x,
         uintptr_t grad_a, uintptr_t grad_initial, int64_t B, int64_t T, int64_t D, bool reverse, int nthreads) {
        linear_recurrence_bwd(dtype, a, h, initial, grad_h, grad_x, grad_a, grad_initial, B, T, D, [&](auto... p) {
          scan::linear_recurrence_bwd_cpu(p..., B, T, D, reverse, nthreads);
        });
      },
      nogil);
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
#endif
}
