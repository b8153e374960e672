// 64-byte vectors (GCC/Clang vector extensions) for CPU loops the auto-vectoriser leaves scalar
// or spills: accumulators that must stay in registers, exp in the row loops. Inside a function
// marked RETAIN_ISA_CLONES a 64-byte vector is one AVX-512 register, two AVX2 or four SSE ones.
#pragma once

#include <cstdint>
#include <cstring>

#include "common/dtype.h"
#include "common/host_device.h"

namespace retain {

template <typename A>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(64)));
  typedef float unaligned __attribute__((vector_size(64), aligned(4)));
  typedef int32_t itype __attribute__((vector_size(64)));
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(64)));
  typedef double unaligned __attribute__((vector_size(64), aligned(8)));
};
template <typename A>
constexpr int64_t kLanes = 64 / sizeof(A);

template <typename A>
RETAIN_FORCE_INLINE typename Vec<A>::type vload(const A* p) {
  return *reinterpret_cast<const typename Vec<A>::unaligned*>(p);
}
template <typename A>
RETAIN_FORCE_INLINE void vstore(A* p, typename Vec<A>::type v) {
  *reinterpret_cast<typename Vec<A>::unaligned*>(p) = v;
}
template <typename A>
RETAIN_FORCE_INLINE typename Vec<A>::type vsplat(A x) {
  return typename Vec<A>::type{} + x;
}

template <typename A>
RETAIN_FORCE_INLINE A vsum(typename Vec<A>::type v) {
  A s = 0;
  for (int64_t l = 0; l < kLanes<A>; ++l) s += v[l];
  return s;
}
template <typename A>
RETAIN_FORCE_INLINE A vmax_lanes(typename Vec<A>::type v) {
  A m = v[0];
  for (int64_t l = 1; l < kLanes<A>; ++l) m = v[l] > m ? v[l] : m;
  return m;
}

// 16 floats from float, bfloat16 (the high half of a float32) or float16 storage.
typedef uint16_t u16x16 __attribute__((vector_size(32), aligned(2)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
RETAIN_FORCE_INLINE Vec<float>::type vload_f(const float* p) { return vload(p); }
RETAIN_FORCE_INLINE Vec<float>::type vload_f(const bf16_t* p) {
  const u32x16 w = __builtin_convertvector(*reinterpret_cast<const u16x16*>(p), u32x16) << 16;
  return (Vec<float>::type)w;  // a same-size vector cast reinterprets the bits
}
RETAIN_FORCE_INLINE Vec<float>::type vload_f(const f16_t* p) {
  Vec<float>::type v;
  for (int l = 0; l < 16; ++l) v[l] = to_float(p[l]);
  return v;
}
// 16 int8 as floats. Through int16: GCC 12 turns a direct int8 -> int32 vector conversion into
// sixteen scalar sign-extensions, but int8 -> int16 -> int32 into vpmovsx instructions.
typedef int8_t i8x16 __attribute__((vector_size(16), aligned(1)));
typedef int16_t i16x16 __attribute__((vector_size(32)));
RETAIN_FORCE_INLINE Vec<float>::type vload_f(const int8_t* p) {
  const i16x16 w = __builtin_convertvector(*reinterpret_cast<const i8x16*>(p), i16x16);
  return __builtin_convertvector(__builtin_convertvector(w, Vec<float>::itype), Vec<float>::type);
}
RETAIN_FORCE_INLINE void vstore_f(float* p, Vec<float>::type v) { vstore(p, v); }
RETAIN_FORCE_INLINE void vstore_f(bf16_t* p, Vec<float>::type v) {
  for (int l = 0; l < 16; ++l) p[l] = from_float_bf16(v[l]);
}
RETAIN_FORCE_INLINE void vstore_f(f16_t* p, Vec<float>::type v) {
  for (int l = 0; l < 16; ++l) p[l] = from_float_f16(v[l]);
}

// exp of 16 floats: the vector form of margin::exp_vec<float> (same range reduction and
// polynomial, so both agree to the bit): x = n ln2 + r, e^r by a degree-6 polynomial, 2^n through
// the exponent bits; inputs clamped to [-87, 88]. n = round(x log2 e) by the 1.5 * 2^23 trick
// (exact for |x log2 e| < 2^22), which the vector extensions can express without a floor.
// NonPositive: x - max or a log-probability (<= 0 up to rounding, far below 88), so the upper
// clamp goes.
template <bool NonPositive = false>
RETAIN_FORCE_INLINE Vec<float>::type vexp(Vec<float>::type x) {
  using V = Vec<float>::type;
  using I = Vec<float>::itype;
  x = x < -87.0f ? vsplat(-87.0f) : x;
  if constexpr (!NonPositive) x = x > 88.0f ? vsplat(88.0f) : x;
  const V magic = vsplat(12582912.0f);
  const V n = (x * 1.44269504088896341f + magic) - magic;
  const V r = x - n * 0.693359375f + n * 2.12194440e-4f;
  V p = vsplat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const I e = (__builtin_convertvector(n, I) + 127) << 23;
  return p * (V)e;
}

}  // namespace retain
