// Vectors of the native register width (GCC/Clang vector extensions) for CPU loops the
// auto-vectoriser leaves scalar or spills: accumulators that must stay in registers, exp in the
// row loops. The width is the one of the capability the including kernel translation unit is
// compiled for (common/cpu_capability.h): 64 bytes with AVX-512, 32 with AVX2, 16 otherwise
// (SSE2, NEON), so a vector is always one register and never lowered through the stack.
#pragma once

#include <cstdint>
#include <cstring>

#include "common/cpu_capability.h"
#include "common/dtype.h"
#include "common/exp_poly.h"
#include "common/host_device.h"

#if !defined(RETAIN_CPU_CAPABILITY)
#error "common/vec.h is for CPU kernel translation units, compiled once per capability (CMakeLists.txt)"
#endif
#if defined(__SSE2__)
#include <immintrin.h>  // movemask (vmask_bits) and sign extension (vload_i); the rest is vector extensions
#endif

namespace retain {
// Each capability's vector types are distinct types: the same names in one program must not
// mean different sizes.
inline namespace RETAIN_CPU_NAMESPACE {

#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#elif defined(__AVX2__)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;
#endif

template <typename A>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(kVecBytes)));
  typedef float unaligned __attribute__((vector_size(kVecBytes), aligned(4)));
  typedef int32_t itype __attribute__((vector_size(kVecBytes)));
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(kVecBytes)));
  typedef double unaligned __attribute__((vector_size(kVecBytes), aligned(8)));
};
// Vector registers the capability has: 32 with AVX-512 (and NEON), 16 with AVX2 and SSE2. Register
// tiles are sized by it: accumulators that outgrow it spill to the stack on every step.
#if defined(__AVX512F__) || defined(__aarch64__)
constexpr int kVecRegisters = 32;
#else
constexpr int kVecRegisters = 16;
#endif

template <typename A>
constexpr int64_t kLanes = kVecBytes / sizeof(A);
// Float lanes of one vector: 16, 8 or 4.
constexpr int kFloatLanes = kVecBytes / 4;
using VF = Vec<float>::type;

template <typename A>
RETAIN_FORCE_INLINE typename Vec<A>::type vload(const A* p) {
  return *reinterpret_cast<const typename Vec<A>::unaligned*>(p);
}
template <typename A>
RETAIN_FORCE_INLINE void vstore(A* p, typename Vec<A>::type v) {
  *reinterpret_cast<typename Vec<A>::unaligned*>(p) = v;
}
// A non-temporal store of a float vector to p, aligned to the vector's size: for outputs far
// larger than the caches (no read-for-ownership). A kernel that streamed ends with stream_fence().
RETAIN_FORCE_INLINE void vstream(float* p, Vec<float>::type v) {
#if defined(__AVX512F__)
  _mm512_stream_ps(p, (__m512)v);
#elif defined(__AVX__)
  _mm256_stream_ps(p, (__m256)v);
#elif defined(__SSE2__)
  _mm_stream_ps(p, (__m128)v);
#else
  vstore(p, v);
#endif
}
template <typename A>
RETAIN_FORCE_INLINE typename Vec<A>::type vsplat(A x) {
  return typename Vec<A>::type{} + x;
}

// Bit l set where lane l of a float comparison (lanes -1 / 0) is true: one movemask on x86.
using VM = Vec<float>::itype;
RETAIN_FORCE_INLINE uint32_t vmask_bits(VM m) {
#if defined(__AVX512F__) && defined(__AVX512DQ__)
  return _mm512_movepi32_mask((__m512i)m);
#elif defined(__AVX__)
  return static_cast<uint32_t>(_mm256_movemask_ps((__m256)m));
#elif defined(__SSE2__)
  return static_cast<uint32_t>(_mm_movemask_ps((__m128)m));
#else
  uint32_t bits = 0;
  for (int l = 0; l < kFloatLanes; ++l) bits |= static_cast<uint32_t>(m[l] & 1) << l;
  return bits;
#endif
}
// The inverse: lane l is -1 where bit l of `bits` is set, else 0.
RETAIN_FORCE_INLINE VM vbits_mask(uint32_t bits) {
  VM lane_bit;
  for (int l = 0; l < kFloatLanes; ++l) lane_bit[l] = int32_t{1} << l;
  return ((VM{} + static_cast<int32_t>(bits)) & lane_bit) != 0;
}

// a > b ? a : b and a < b ? a : b, lane-wise: one instruction on x86 (maxps / minps have exactly
// these semantics: b where either is NaN). Written as selects, GCC keeps a compare and a blend
// (vblendvps, 2-3 uops on Intel). vmax(x, zero) is a relu that drops a NaN x; vmax(c, x) is a
// lower clamp that keeps it.
RETAIN_FORCE_INLINE VF vmax(VF a, VF b) {
#if defined(__AVX512F__)
  // zero-masked forms: the plain ones start from _mm512_undefined_ps (GCC 12: maybe-uninitialised)
  return (VF)_mm512_maskz_max_ps(static_cast<__mmask16>(0xFFFF), (__m512)a, (__m512)b);
#elif defined(__AVX__)
  return (VF)_mm256_max_ps((__m256)a, (__m256)b);
#elif defined(__SSE2__)
  return (VF)_mm_max_ps((__m128)a, (__m128)b);
#else
  return a > b ? a : b;
#endif
}
RETAIN_FORCE_INLINE VF vmin(VF a, VF b) {
#if defined(__AVX512F__)
  return (VF)_mm512_maskz_min_ps(static_cast<__mmask16>(0xFFFF), (__m512)a, (__m512)b);
#elif defined(__AVX__)
  return (VF)_mm256_min_ps((__m256)a, (__m256)b);
#elif defined(__SSE2__)
  return (VF)_mm_min_ps((__m128)a, (__m128)b);
#else
  return a < b ? a : b;
#endif
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

// kFloatLanes floats from float, bfloat16 (the high half of a float32) or float16 storage.
typedef uint16_t u16xF __attribute__((vector_size(kVecBytes / 2), aligned(2)));
typedef uint32_t u32xF __attribute__((vector_size(kVecBytes)));
RETAIN_FORCE_INLINE VF vload_f(const float* p) { return vload(p); }
RETAIN_FORCE_INLINE VF vload_f(const bf16_t* p) {
  const u32xF w = __builtin_convertvector(*reinterpret_cast<const u16xF*>(p), u32xF) << 16;
  return (VF)w;  // a same-size vector cast reinterprets the bits
}
RETAIN_FORCE_INLINE VF vload_f(const f16_t* p) {
  VF v;
  for (int l = 0; l < kFloatLanes; ++l) v[l] = to_float(p[l]);
  return v;
}
// kFloatLanes int8 as int32 lanes: one vpmovsxbd with AVX2 / AVX-512 (GCC 12 splits the generic
// form into nine instructions there); elsewhere through int16 (a direct int8 -> int32 vector
// conversion becomes scalar sign-extensions).
typedef int8_t i8xF __attribute__((vector_size(kVecBytes / 4), aligned(1)));
typedef int16_t i16xF __attribute__((vector_size(kVecBytes / 2)));
RETAIN_FORCE_INLINE VM vload_i(const int8_t* p) {
#if defined(__AVX512F__)
  // the zero-masked form: the plain one starts from _mm512_undefined_epi32, which GCC 12 reports
  // as maybe-uninitialised
  return (VM)_mm512_maskz_cvtepi8_epi32(static_cast<__mmask16>(0xFFFF),
                                        _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#elif defined(__AVX2__)
  return (VM)_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
#else
  const i16xF w = __builtin_convertvector(*reinterpret_cast<const i8xF*>(p), i16xF);
  return __builtin_convertvector(w, VM);
#endif
}
RETAIN_FORCE_INLINE void vstore_f(float* p, VF v) { vstore(p, v); }
RETAIN_FORCE_INLINE void vstore_f(bf16_t* p, VF v) {
  for (int l = 0; l < kFloatLanes; ++l) p[l] = from_float_bf16(v[l]);
}
RETAIN_FORCE_INLINE void vstore_f(f16_t* p, VF v) {
  for (int l = 0; l < kFloatLanes; ++l) p[l] = from_float_f16(v[l]);
}

// exp of a vector of floats: the vector form of margin::exp_vec<float> (the same exp_poly, so both
// agree to the bit), 2^n through the exponent bits; inputs clamped to [-87, 88].
// NonPositive: x - max or a log-probability (<= 0 up to rounding, far below 88), so the upper
// clamp goes.
// vexp_in_range: for x already in [-87, 88] (or NaN), the same values without the clamps.
RETAIN_FORCE_INLINE VF vexp_in_range(VF x) {
  VF biased;
  const VF p = exp_poly(x, biased);
  const u32xF e = (u32xF)biased << 23;  // 2^n (common/exp_poly.h)
  return p * (VF)e;
}
template <bool NonPositive = false>
RETAIN_FORCE_INLINE VF vexp(VF x) {
  x = vmax(vsplat(-87.0f), x);  // a NaN x stays NaN (x < -87 ? -87 : x)
  if constexpr (!NonPositive) x = vmin(vsplat(88.0f), x);
  return vexp_in_range(x);
}

}  // inline namespace RETAIN_CPU_NAMESPACE
}  // namespace retain
