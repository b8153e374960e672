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
#include <cuda_runtime_api.h>
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
  info["cuda_runtime"] = CUDART_VERSION;
#else
  info["cuda"] = false;
  info["cuda_archs"] = "";
  info["cuda_runtime"] = 0;
#endif
  return info;
}

void linear_recurrence_fwd_cpu(int dtype, uintptr_t a, uintptr_t x, uintptr_t initial, uintptr_t h, int64_t B,
                               int64_t T, int64_t D, bool reverse, int nthreads) {
  retain::check_sizes({B, T, D}, kLinearRecurrence);
  RETAIN_DISPATCH_FLOATING(dtype, kLinearRecurrence, [&] {
    using retain::as_mut_ptr;
    using retain::as_ptr;
    retain::scan::linear_recurrence_fwd_cpu<scalar_t>(
        as_ptr<scalar_t>(a, kLinearRecurrence, "a"), as_ptr<scalar_t>(x, kLinearRecurrence, "x"),
        as_ptr<scalar_t>(initial, kLinearRecurrence, "initial", true), as_mut_ptr<scalar_t>(h, kLinearRecurrence, "h"),
        B, T, D, reverse, nthreads);
  });
}

void linear_recurrence_bwd_cpu(int dtype, uintptr_t a, uintptr_t h, uintptr_t initial, uintptr_t grad_h,
                               uintptr_t grad_x, uintptr_t grad_a, uintptr_t grad_initial, int64_t B, int64_t T,
                               int64_t D, bool reverse, int nthreads) {
  retain::check_sizes({B, T, D}, kLinearRecurrence);
  RETAIN_DISPATCH_FLOATING(dtype, kLinearRecurrence, [&] {
    using retain::as_mut_ptr;
    using retain::as_ptr;
    retain::scan::linear_recurrence_bwd_cpu<scalar_t>(
        as_ptr<scalar_t>(a, kLinearRecurrence, "a"), as_ptr<scalar_t>(h, kLinearRecurrence, "h"),
        as_ptr<scalar_t>(initial, kLinearRecurrence, "initial", true),
        as_ptr<scalar_t>(grad_h, kLinearRecurrence, "grad_h"), as_mut_ptr<scalar_t>(grad_x, kLinearRecurrence, "grad_x"),
        as_mut_ptr<scalar_t>(grad_a, kLinearRecurrence, "grad_a", true),
        as_mut_ptr<scalar_t>(grad_initial, kLinearRecurrence, "grad_initial", true), B, T, D, reverse, nthreads);
  });
}

#ifdef RETAIN_WITH_CUDA
void linear_recurrence_fwd_cuda(int dtype, uintptr_t a, uintptr_t x, uintptr_t initial, uintptr_t h, int64_t B,
                                int64_t T, int64_t D, bool reverse, uintptr_t stream) {
  retain::check_sizes({B, T, D}, kLinearRecurrence);
  RETAIN_DISPATCH_FLOATING(dtype, kLinearRecurrence, [&] {
    using retain::as_mut_ptr;
    using retain::as_ptr;
    retain::scan::linear_recurrence_fwd_cuda<scalar_t>(
        as_ptr<scalar_t>(a, kLinearRecurrence, "a"), as_ptr<scalar_t>(x, kLinearRecurrence, "x"),
        as_ptr<scalar_t>(initial, kLinearRecurrence, "initial", true), as_mut_ptr<scalar_t>(h, kLinearRecurrence, "h"),
        B, T, D, reverse, stream);
  });
}

void linear_recurrence_bwd_cuda(int dtype, uintptr_t a, uintptr_t h, uintptr_t initial, uintptr_t grad_h,
                                uintptr_t grad_x, uintptr_t grad_a, uintptr_t grad_initial, int64_t B, int64_t T,
                                int64_t D, bool reverse, uintptr_t stream) {
  retain::check_sizes({B, T, D}, kLinearRecurrence);
  RETAIN_DISPATCH_FLOATING(dtype, kLinearRecurrence, [&] {
    using retain::as_mut_ptr;
    using retain::as_ptr;
    retain::scan::linear_recurrence_bwd_cuda<scalar_t>(
        as_ptr<scalar_t>(a, kLinearRecurrence, "a"), as_ptr<scalar_t>(h, kLinearRecurrence, "h"),
        as_ptr<scalar_t>(initial, kLinearRecurrence, "initial", true),
        as_ptr<scalar_t>(grad_h, kLinearRecurrence, "grad_h"), as_mut_ptr<scalar_t>(grad_x, kLinearRecurrence, "grad_x"),
        as_mut_ptr<scalar_t>(grad_a, kLinearRecurrence, "grad_a", true),
        as_mut_ptr<scalar_t>(grad_initial, kLinearRecurrence, "grad_initial", true), B, T, D, reverse, stream);
  });
}
#endif

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
  m.def("linear_recurrence_fwd_cpu", &linear_recurrence_fwd_cpu, nogil);
  m.def("linear_recurrence_bwd_cpu", &linear_recurrence_bwd_cpu, nogil);
#ifdef RETAIN_WITH_CUDA
  m.def("linear_recurrence_fwd_cuda", &linear_recurrence_fwd_cuda, nogil);
  m.def("linear_recurrence_bwd_cuda", &linear_recurrence_bwd_cuda, nogil);
#endif
}
