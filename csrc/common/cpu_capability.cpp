// Detection and selection of the CPU capability (common/cpu_capability.h). Compiled for the
// baseline: it runs before anything knows what the CPU can do.
#include "common/cpu_capability.h"

#include <atomic>
#include <stdexcept>

namespace retain {
namespace {

CpuCapability detect() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  // __builtin_cpu_supports also checks that the OS saves the wider registers (XCR0).
  __builtin_cpu_init();
  const bool v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                  __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2") &&
                  __builtin_cpu_supports("avx") && __builtin_cpu_supports("popcnt");
  const bool v4 = v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                  __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                  __builtin_cpu_supports("avx512cd");
  if (v4) return CpuCapability::Avx512;
  if (v3) return CpuCapability::Avx2;
#endif
  return CpuCapability::Default;
}

CpuCapability best_usable() {
  CpuCapability c = cpu_capability_supported();
  while (!cpu_capability_compiled(c)) c = static_cast<CpuCapability>(static_cast<int>(c) - 1);
  return c;
}

std::atomic<int>& active() {
  static std::atomic<int> a{static_cast<int>(best_usable())};
  return a;
}

}  // namespace

const char* cpu_capability_name(CpuCapability c) {
  switch (c) {
    case CpuCapability::Default: return "default";
    case CpuCapability::Avx2: return "avx2";
    case CpuCapability::Avx512: return "avx512";
  }
  return "unknown";
}

CpuCapability parse_cpu_capability(const std::string& name) {
  for (CpuCapability c : kCpuCapabilities) {
    if (name == cpu_capability_name(c)) return c;
  }
  throw std::invalid_argument("RETAIN_CPU_CAPABILITY: expected one of default, avx2, avx512; got '" + name + "'");
}

bool cpu_capability_compiled(CpuCapability c) {
  switch (c) {
    case CpuCapability::Default: return true;
#if defined(RETAIN_CPU_HAVE_AVX2)
    case CpuCapability::Avx2: return true;
#endif
#if defined(RETAIN_CPU_HAVE_AVX512)
    case CpuCapability::Avx512: return true;
#endif
    default: return false;
  }
}

CpuCapability cpu_capability_supported() {
  static const CpuCapability c = detect();
  return c;
}

CpuCapability cpu_capability() { return static_cast<CpuCapability>(active().load(std::memory_order_relaxed)); }

void set_cpu_capability(CpuCapability c) {
  if (!cpu_capability_compiled(c)) {
    throw std::invalid_argument(std::string("RETAIN_CPU_CAPABILITY: '") + cpu_capability_name(c) +
                                "' was not compiled into this build (highest compiled and supported: '" +
                                cpu_capability_name(best_usable()) + "')");
  }
  if (static_cast<int>(c) > static_cast<int>(cpu_capability_supported())) {
    throw std::invalid_argument(std::string("RETAIN_CPU_CAPABILITY: '") + cpu_capability_name(c) +
                                "' needs instructions this CPU lacks (it supports up to '" +
                                cpu_capability_name(cpu_capability_supported()) + "')");
  }
  active().store(static_cast<int>(c), std::memory_order_relaxed);
}

}  // namespace retain
