// CPU capabilities: the instruction sets the CPU kernels are compiled for, and the one in use.
//
// Every kernel translation unit (csrc/<family>/*_cpu.cpp) is compiled once per capability, with
// that capability's -march flags and RETAIN_CPU_CAPABILITY set to its code (CMakeLists.txt). Its
// launchers are function templates whose first parameter is the capability; each compilation
// instantiates them for its own capability only, so the three builds of one file have distinct
// symbols. Callers (the binding files csrc/<family>/bind.cpp, compiled for the baseline) reach
// them through cpu_dispatch (RETAIN_CPU / RETAIN_LAUNCH, common/bind.h), which calls the
// instantiation of the active capability. csrc/common/README.md says why this scheme and not
// target_clones, Highway or xsimd.
#pragma once

#include <string>
#include <type_traits>

namespace retain {

// Ordered: each level's instructions are a superset of the level below it.
enum class CpuCapability : int {
  Default = 0,  // the baseline: x86-64 (SSE2) or the target's own (aarch64: NEON)
  Avx2 = 1,     // x86-64-v3: AVX2, FMA, F16C, BMI1/2, LZCNT, MOVBE
  Avx512 = 2,   // x86-64-v4: AVX-512 F, BW, CD, DQ, VL (and all of x86-64-v3)
};

// Every capability, lowest first.
constexpr CpuCapability kCpuCapabilities[] = {CpuCapability::Default, CpuCapability::Avx2, CpuCapability::Avx512};

const char* cpu_capability_name(CpuCapability c);
// The capability named `name` ("default", "avx2", "avx512"); throws std::invalid_argument.
CpuCapability parse_cpu_capability(const std::string& name);
// Was this capability's code compiled into this build (x86-64 builds: all three)?
bool cpu_capability_compiled(CpuCapability c);
// The highest capability this CPU supports (instructions and OS-enabled register state).
CpuCapability cpu_capability_supported();
// The capability in use: at load time the highest one both compiled and supported.
CpuCapability cpu_capability();
// Selects `c` for all later kernel calls; throws std::invalid_argument, naming what the CPU and
// the build have, when `c` is above what the CPU supports or was not compiled.
void set_cpu_capability(CpuCapability c);

template <CpuCapability C>
using CpuCapabilityTag = std::integral_constant<CpuCapability, C>;

// Calls f(CpuCapabilityTag<C>{}) for the active capability C, so that
//   cpu_dispatch([&](auto c) { kernel<c.value>(args...); })
// runs the build of `kernel` compiled for it.
template <typename F>
decltype(auto) cpu_dispatch(F&& f) {
#if defined(RETAIN_CPU_HAVE_AVX512)
  if (cpu_capability() == CpuCapability::Avx512) return f(CpuCapabilityTag<CpuCapability::Avx512>{});
#endif
#if defined(RETAIN_CPU_HAVE_AVX2)
  if (cpu_capability() == CpuCapability::Avx2) return f(CpuCapabilityTag<CpuCapability::Avx2>{});
#endif
  return f(CpuCapabilityTag<CpuCapability::Default>{});
}

}  // namespace retain

// Inside a kernel translation unit: the capability it is being compiled for, and a namespace
// name of its own for types whose layout depends on it (common/vec.h).
#if defined(RETAIN_CPU_CAPABILITY)
#if RETAIN_CPU_CAPABILITY == 2
#define RETAIN_CPU_NAMESPACE cpu_avx512
#elif RETAIN_CPU_CAPABILITY == 1
#define RETAIN_CPU_NAMESPACE cpu_avx2
#else
#define RETAIN_CPU_NAMESPACE cpu_default
#endif
namespace retain {
constexpr CpuCapability kThisCpu = static_cast<CpuCapability>(RETAIN_CPU_CAPABILITY);
}  // namespace retain
#endif
