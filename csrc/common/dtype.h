// Storage dtypes the kernels accept and the accumulation type each computes in.
// bfloat16 and float16 are plain 16-bit structs converted in software, so the same
// conversion runs on the CPU and in CUDA and the native core needs neither torch nor cuda_fp16.h.
#pragma once

#include <cstdint>
#include <cstring>

#include "common/host_device.h"

namespace retain {

// Codes Python passes with every kernel call: exported by csrc/module.cpp as retain._C.dtype_codes
// (keyed by dtype_name), which python/retain/_native.py reads into DTYPE_CODES.
enum class DType : int { Float32 = 0, Float64 = 1, BFloat16 = 2, Float16 = 3 };

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::Float32: return "float32";
    case DType::Float64: return "float64";
    case DType::BFloat16: return "bfloat16";
    case DType::Float16: return "float16";
  }
  return "unknown";
}

struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };

RETAIN_HOST_DEVICE RETAIN_FORCE_INLINE float bits_to_float(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
}

RETAIN_HOST_DEVICE RETAIN_FORCE_INLINE uint32_t float_to_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
}

// bfloat16: the high half of a float32; round to nearest even, NaN kept quiet.
RETAIN_HOST_DEVICE RETAIN_FORCE_INLINE float to_float(bf16_t v) {
  return bits_to_float(static_cast<uint32_t>(v.bits) << 16);
}

RETAIN_HOST_DEVICE RETAIN_FORCE_INLINE bf16_t from_float_bf16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{static_cast<uint16_t>((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16_t{static_cast<uint16_t>(u >> 16)};
}

// IEEE binary16 <-> binary32, exact for every half value, round to nearest even on the way down.
RETAIN_HOST_DEVICE RETAIN_FORCE_INLINE float to_float(f16_t v) {
  const uint32_t sign = static_cast<uint32_t>(v.bits & 0x8000u) << 16;
  const uint32_t exp = (v.bits >> 10) & 0x1fu;
  const uint32_t man = v.bits & 0x3ffu;
  if (exp == 0x1fu) return bits_to_float(sign | 0x7f800000u | (man << 13));  // inf / nan
  if (exp == 0) {
    // zero or subnormal: man * 2^-24
    const float mag = static_cast<float>(man) * 5.9604644775390625e-8f;
    return sign ? -mag : mag;
  }
  return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
}

RETAIN_HOST_DEVICE RETAIN_FORCE_INLINE f16_t from_float_f16(float f) {
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t au = u & 0x7fffffffu;
  if (au > 0x7f800000u) return f16_t{static_cast<uint16_t>(sign | 0x7e00u)};  // nan
  if (au >= 0x477ff000u) return f16_t{static_cast<uint16_t>(sign | 0x7c00u)};  // overflow -> inf
  if (au < 0x38800000u) {
    // result is subnormal or zero: round |f| * 2^24 to the nearest even integer
    const float scaled = bits_to_float(au) * 16777216.0f;
    uint32_t m = static_cast<uint32_t>(scaled);
    const float rem = scaled - static_cast<float>(m);
    if (rem > 0.5f || (rem == 0.5f && (m & 1u))) ++m;
    return f16_t{static_cast<uint16_t>(sign | m)};
  }
  // normal: rebias the exponent, round the 13 dropped mantissa bits to nearest even
  uint32_t r = au - 0x38000000u;
  r += 0xfffu + ((r >> 13) & 1u);
  return f16_t{static_cast<uint16_t>(sign | (r >> 13))};
}

// Acc<T>: the type a kernel computes in for storage type T (float for 16-bit storage).
template <typename T> struct AccOf { using type = T; };
template <> struct AccOf<bf16_t> { using type = float; };
template <> struct AccOf<f16_t> { using type = float; };
template <typename T> using Acc = typename AccOf<T>::type;


template <typename A, typename T>
RETAIN_HOST_DEVICE RETAIN_FORCE_INLINE A load_as(const T& v) { return static_cast<A>(v); }
template <typename A>
RETAIN_HOST_DEVICE RETAIN_FORCE_INLINE A load_as(const bf16_t& v) { return static_cast<A>(to_float(v)); }
template <typename A>
RETAIN_HOST_DEVICE RETAIN_FORCE_INLINE A load_as(const f16_t& v) { return static_cast<A>(to_float(v)); }

template <typename T, typename A>
RETAIN_HOST_DEVICE RETAIN_FORCE_INLINE void store_as(T& dst, A v) { dst = static_cast<T>(v); }
template <typename A>
RETAIN_HOST_DEVICE RETAIN_FORCE_INLINE void store_as(bf16_t& dst, A v) { dst = from_float_bf16(static_cast<float>(v)); }
template <typename A>
RETAIN_HOST_DEVICE RETAIN_FORCE_INLINE void store_as(f16_t& dst, A v) { dst = from_float_f16(static_cast<float>(v)); }

}  // namespace retain
