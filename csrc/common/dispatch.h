// Run a generic lambda with `scalar_t` bound to the storage type a dtype code names, and
// instantiate a kernel's launchers for each of those types.
#pragma once

#include <stdexcept>
#include <string>

#include "common/dtype.h"

#define RETAIN_DISPATCH_FLOATING(DTYPE_CODE, OP_NAME, ...)                                   \
  [&] {                                                                                     \
    switch (static_cast<::retain::DType>(DTYPE_CODE)) {                                     \
      case ::retain::DType::Float32: { using scalar_t = float; return __VA_ARGS__(); }      \
      case ::retain::DType::Float64: { using scalar_t = double; return __VA_ARGS__(); }     \
      case ::retain::DType::BFloat16: { using scalar_t = ::retain::bf16_t; return __VA_ARGS__(); } \
      case ::retain::DType::Float16: { using scalar_t = ::retain::f16_t; return __VA_ARGS__(); } \
    }                                                                                       \
    throw std::invalid_argument(std::string(OP_NAME) + ": unsupported dtype code " +        \
                                std::to_string(static_cast<int>(DTYPE_CODE)));              \
  }()

// M(T) for each storage type RETAIN_DISPATCH_FLOATING binds scalar_t to: a kernel file's explicit
// instantiations,
//   #define RETAIN_INSTANTIATE(T) template void foo_fwd_cpu<kThisCpu, T>(const T*, T*, int64_t, int);
//   RETAIN_FOR_EACH_FLOATING(RETAIN_INSTANTIATE)
//   #undef RETAIN_INSTANTIATE
#define RETAIN_FOR_EACH_FLOATING(M) M(float) M(double) M(::retain::bf16_t) M(::retain::f16_t)
