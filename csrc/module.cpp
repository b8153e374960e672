// pybind11 module retain._C: thin bindings, no math. Every kernel entry takes data pointers as
// integers (torch.Tensor.data_ptr()), a dtype code, int64 sizes, and a thread count (CPU) or a
// stream handle (CUDA); outputs are allocated in Python. The GIL is released around kernels.
// This file holds what is not a family's: build facts, the CPU capability, the dtype codes; each
// family binds its entries in csrc/<family>/bind.cpp (through common/bind.h, which also fills the
// capability table `kernels`).
#include <string>

#include <pybind11/pybind11.h>

#include "common/bind.h"
#include "common/cpu_capability.h"
#include "common/dtype.h"
#include "common/parallel.h"

#ifdef RETAIN_WITH_CUDA
#include "common/cuda_info.h"
#endif

namespace py = pybind11;

namespace retain {

// The families' entries (csrc/<family>/bind.cpp).
void bind_scan(py::module_& m, bind::KernelTable& kernels);
void bind_margin(py::module_& m, bind::KernelTable& kernels);
void bind_fisher(py::module_& m, bind::KernelTable& kernels);
void bind_replay(py::module_& m, bind::KernelTable& kernels);
void bind_cache(py::module_& m, bind::KernelTable& kernels);

namespace {

py::dict build_info() {
  py::dict info;
  info["version"] = RETAIN_VERSION;
  info["compiler"] = RETAIN_COMPILER;
  info["openmp"] = _OPENMP;
  info["openmp_max_threads"] = openmp_max_threads();
#ifdef RETAIN_GLIBC_FLOOR
  info["glibc_floor"] = RETAIN_GLIBC_FLOOR;  // the oldest glibc it runs on (common/glibc_floor.cpp)
#else
  info["glibc_floor"] = "";
#endif
#ifdef RETAIN_WITH_CUDA
  info["cuda"] = true;
  info["cuda_archs"] = RETAIN_CUDA_ARCHS;
  info["cuda_runtime"] = cuda_runtime_version();
  info["cuda_runtime_link"] = RETAIN_CUDA_RUNTIME_LINK;
#else
  info["cuda"] = false;
  info["cuda_archs"] = "";
  info["cuda_runtime"] = 0;
  info["cuda_runtime_link"] = "";
#endif
  return info;
}

// Which build of the CPU kernels runs (common/cpu_capability.h).
void bind_cpu_capability(py::module_& m) {
  m.def("cpu_capability", [] { return std::string(cpu_capability_name(cpu_capability())); },
        "The CPU capability the kernels run with: 'default', 'avx2' or 'avx512'.");
  m.def("cpu_capability_supported", [] { return std::string(cpu_capability_name(cpu_capability_supported())); },
        "The highest CPU capability this CPU supports.");
  m.def("set_cpu_capability", [](const std::string& name) { set_cpu_capability(parse_cpu_capability(name)); },
        "Run later kernel calls with the named capability; ValueError when the CPU or the build lacks it.");
  py::list names, compiled;  // lowest first
  for (auto c : kCpuCapabilities) {
    names.append(cpu_capability_name(c));
    if (cpu_capability_compiled(c)) compiled.append(cpu_capability_name(c));
  }
  m.attr("cpu_capability_names") = names;
  m.attr("cpu_capabilities_compiled") = compiled;
}

}  // namespace
}  // namespace retain

PYBIND11_MODULE(_C, m) {
  m.doc() = "retain native core: torch-free CPU (OpenMP) and CUDA kernels on raw pointers";
  m.def("build_info", &retain::build_info, "Build facts: version, compiler, OpenMP, CUDA and its architectures.");
  retain::bind_cpu_capability(m);

  // The dtype codes every kernel entry takes (common/dtype.h).
  py::dict dtype_codes;
  for (auto d : {retain::DType::Float32, retain::DType::Float64, retain::DType::BFloat16, retain::DType::Float16}) {
    dtype_codes[retain::dtype_name(d)] = static_cast<int>(d);
  }
  m.attr("dtype_codes") = dtype_codes;

  // Each family's entries; the capability table lists every op with the devices it was bound for
  // (Python reads it to report capabilities).
  retain::bind::KernelTable kernels;
  retain::bind_scan(m, kernels);
  retain::bind_margin(m, kernels);
  retain::bind_fisher(m, kernels);
  retain::bind_replay(m, kernels);
  retain::bind_cache(m, kernels);
  m.attr("kernels") = kernels.to_dict();
}
