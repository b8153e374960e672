// Binding one kernel entry for the CPU and for CUDA from one body (csrc/<family>/bind.cpp):
//
//   constexpr const char* kFoo = "retain::foo";  // the op, as Python's errors name it
//   bind::def<Cpu, Cuda>(m, kernels, kFoo, "foo_fwd",
//       [](auto dev, int dtype, uintptr_t x, uintptr_t y, int64_t n) {
//         check_sizes({n}, kFoo);
//         RETAIN_DISPATCH_FLOATING(dtype, kFoo, [&] {
//           RETAIN_LAUNCH(dev, fam::foo_fwd)(as_ptr<scalar_t>(x, kFoo, "x"),
//                                            as_mut_ptr<scalar_t>(y, kFoo, "y"), n);
//         });
//       });
//
// defines foo_fwd_cpu(dtype, x, y, n, nthreads), which runs fam::foo_fwd_cpu<active capability>(...,
// nthreads) through cpu_dispatch, and, in builds with CUDA, foo_fwd_cuda(dtype, x, y, n, stream),
// which runs fam::foo_fwd_cuda(..., stream); both with the GIL released, and both recorded in
// `kernels`, which becomes retain._C.kernels ({"foo": ["cpu", "cuda"]}). An entry that exists on one
// device only, or whose arguments differ between the devices, is bound for one device,
// bind::def<Cpu>(...), and calls its launcher with RETAIN_CPU (or, bind::def<Cuda> under
// #ifdef RETAIN_WITH_CUDA, directly).
//
// A binding file includes this header and its ops' headers only: it brings the argument checks
// (errors.h), the dtype dispatch (dispatch.h) and, in namespace retain, py (pybind11), Cpu, Cuda
// and uintptr_t.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <pybind11/pybind11.h>

#include "common/cpu_capability.h"
#include "common/dispatch.h"
#include "common/errors.h"

#if defined(RETAIN_CPU_CAPABILITY)
#error "common/bind.h is for the binding files (csrc/module.cpp, csrc/<family>/bind.cpp), compiled once"
#endif

// RETAIN_CPU(ns::launcher_cpu)(args...) calls the build of a CPU launcher compiled for the active
// CPU capability (common/cpu_capability.h) and returns what it returns.
#define RETAIN_CPU(LAUNCHER)                                                                    \
  [&](auto&&... args) {                                                                         \
    return ::retain::cpu_dispatch([&](auto cap) { return LAUNCHER<decltype(cap)::value>(args...); }); \
  }

// RETAIN_LAUNCH(dev, ns::name)(args...) inside a bind::def body: ns::name_cpu through RETAIN_CPU
// with dev's thread count appended, or ns::name_cuda with dev's stream appended.
#ifdef RETAIN_WITH_CUDA
#define RETAIN_LAUNCH_CUDA_(DEV, LAUNCHER) LAUNCHER##_cuda(args..., (DEV).stream)
#else
#define RETAIN_LAUNCH_CUDA_(DEV, LAUNCHER)  // never instantiated: bind::Cuda binds nothing
#endif
#define RETAIN_LAUNCH(DEV, LAUNCHER)                                                            \
  [&](auto&&... args) {                                                                         \
    if constexpr (::retain::bind::is_cpu<decltype(DEV)>) {                                      \
      RETAIN_CPU(LAUNCHER##_cpu)(args..., (DEV).threads);                                       \
    } else {                                                                                    \
      RETAIN_LAUNCH_CUDA_(DEV, LAUNCHER);                                                       \
    }                                                                                           \
  }

namespace retain::bind {

namespace py = pybind11;

// The devices an entry is bound for: the name suffix, the trailing Python argument (`Arg`) and the
// value of `dev` in the body.
struct Cpu {
  static constexpr const char* kName = "cpu";
  static constexpr bool kCompiled = true;
  using Arg = int;
  int threads;  // the thread count chosen in Python
};
struct Cuda {
  static constexpr const char* kName = "cuda";
#ifdef RETAIN_WITH_CUDA
  static constexpr bool kCompiled = true;
#else
  static constexpr bool kCompiled = false;  // no entry is bound: the body is never instantiated
#endif
  using Arg = std::uintptr_t;
  std::uintptr_t stream;  // a cudaStream_t as an integer
};

template <typename Dev>
constexpr bool is_cpu = std::is_same_v<std::decay_t<Dev>, Cpu>;

// The capability table retain._C.kernels: {op: [devices]}, filled by def from what it binds.
class KernelTable {
 public:
  // `op` is the name Python reports errors under ("retain::foo"); the table's key drops "retain::".
  void add(std::string op, const char* device) {
    const std::string prefix = "retain::";
    if (op.compare(0, prefix.size(), prefix) == 0) op.erase(0, prefix.size());
    auto it = std::find_if(ops_.begin(), ops_.end(), [&](const auto& e) { return e.first == op; });
    if (it == ops_.end()) it = ops_.insert(ops_.end(), {op, {}});
    auto& devices = it->second;
    if (std::find(devices.begin(), devices.end(), device) != devices.end()) return;
    devices.push_back(device);
    std::stable_sort(devices.begin(), devices.end(), [](const std::string& a, const std::string& b) {
      return rank(a) < rank(b);  // "cpu" before "cuda", whatever order the entries were bound in
    });
  }

  py::dict to_dict() const {
    py::dict d;
    for (const auto& [op, devices] : ops_) {
      py::list l;
      for (const auto& dev : devices) l.append(dev);
      d[op.c_str()] = l;
    }
    return d;
  }

 private:
  static int rank(const std::string& device) { return device == Cpu::kName ? 0 : 1; }
  std::vector<std::pair<std::string, std::vector<std::string>>> ops_;
};

// Whether the entry releases the GIL around its body (after pybind11 converted the arguments).
// kHold: the body reads Python objects (a dict) and releases it itself.
enum class Gil { kRelease, kHold };

namespace detail {

template <typename Dev, typename Body, typename R, typename... Args>
void def_entry(py::module_& m, const std::string& name, Body body, Gil gil, R (Body::*)(Dev, Args...) const) {
  m.def(name.c_str(), [body, gil](Args... args, typename Dev::Arg last) -> R {
    if (gil == Gil::kHold) return body(Dev{last}, args...);
    py::gil_scoped_release nogil;
    return body(Dev{last}, args...);
  });
}

template <typename Dev, typename Body>
void def_device(py::module_& m, KernelTable& kernels, const char* op, const char* stem, const Body& body, Gil gil) {
  if constexpr (Dev::kCompiled) {
    def_entry<Dev>(m, std::string(stem) + "_" + Dev::kName, body, gil, &Body::template operator()<Dev>);
    kernels.add(op, Dev::kName);
  }
}

}  // namespace detail

// Binds `body`, a generic lambda [](auto dev, Args... args), as `<stem>_<device>` taking (Args...,
// Device::Arg) for each of Devices this build has, and records (op, device) in `kernels`.
template <typename... Devices, typename Body>
void def(py::module_& m, KernelTable& kernels, const char* op, const char* stem, const Body& body,
         Gil gil = Gil::kRelease) {
  static_assert(sizeof...(Devices) > 0, "bind::def<Cpu>, <Cuda> or <Cpu, Cuda>");
  (detail::def_device<Devices>(m, kernels, op, stem, body, gil), ...);
}

}  // namespace retain::bind

namespace retain {
namespace py = pybind11;
using bind::Cpu;
using bind::Cuda;
using std::uintptr_t;
}  // namespace retain
