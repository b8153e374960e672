// CPU kernels of tm_loss: one pass over h per call, rows of [B, L, D] split over threads; per-row
// partial sums keep the result independent of the thread count.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>

// The TM rows in AVX-512 intrinsics: the avx512 build of this file only (x86-64-v4 has F, BW
// and BMI2).
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__BMI2__)
#define RETAIN_TM_AVX512 1
#include <immintrin.h>
#endif

#include "common/buffer.h"
#include "common/cpu_capability.h"
#include "common/dispatch.h"
#include "common/dtype.h"
#include "common/parallel.h"
#include "common/stream_store.h"
#include "common/vec.h"
#include "margin/tm_loss.h"

namespace retain::margin {
namespace {

// Packed labels are decoded a row at a time into int8 through a 256-entry table: one byte of four
// 2-bit codes becomes four int8 labels in one 32-bit store, and the loss loops stay the
// vectorised int8 ones.
// Built at compile time: a kernel build must run no code at load time, when the CPU may lack
// its instructions (cmake/check_cpu_symbols.py).
struct UnpackTable {
  uint32_t word[256] = {};
  constexpr UnpackTable() {
    for (int b = 0; b < 256; ++b) {
      uint32_t w = 0;
      for (int i = 0; i < 4; ++i) {
        const int code = (b >> (2 * i)) & 3;
        const int8_t label = static_cast<int8_t>((code == 1) - (code == 2));
        w |= static_cast<uint32_t>(static_cast<uint8_t>(label)) << (8 * i);  // little-endian: label i at byte i
      }
      word[b] = w;
    }
  }
};
constexpr UnpackTable kUnpack{};

// Slope bits back to lanes: row b holds bit l of b as an all-ones / zero mask in lane l, so 8
// (AVX2) or 4 (SSE) bits become a lane mask with one load, and the gradient is (up & scale) +
// (down & -scale): five instructions where the mask expansion (vbits_mask) took about fifteen,
// and 0 where the slope is 0 even for a non-finite scale, as in every other path. Compile-time,
// like kUnpack.
struct LaneMasks {
  int32_t lane[256][8] = {};
  constexpr LaneMasks() {
    for (int b = 0; b < 256; ++b)
      for (int l = 0; l < 8; ++l) lane[b][l] = ((b >> l) & 1) ? -1 : 0;
  }
};
constexpr LaneMasks kLaneMasks{};

// Row r's labels as int8: the row itself, or the packed row decoded into `scratch` (>= D + 3 bytes).
RETAIN_FORCE_INLINE const int8_t* row_labels(const int8_t* labels, int64_t label_row, int64_t r, int64_t, int8_t*) {
  return labels + r * label_row;
}
RETAIN_FORCE_INLINE const int8_t* row_labels(const uint8_t* labels, int64_t label_row, int64_t r, int64_t,
                                             int8_t* scratch) {
  const uint8_t* row = labels + r * label_row;
  for (int64_t q = 0; q < label_row; ++q) std::memcpy(scratch + 4 * q, &kUnpack.word[row[q]], 4);
  return scratch;
}

// Both loops in explicit native-width float vectors for float/bfloat16/float16 (the auto-vectorised form
// spent ~2 cycles an element on label conversion and selects); double and the tail stay scalar.
// Per element, with the label's interval [lo, hi] (+1: [pos, inf), -1: (-inf, neg], 0: [neg, pos]):
// loss = max(0, lo - h) + max(0, h - hi) and slope = [h > hi] - [h < lo]: for every non-NaN h the
// values of tm_element / tm_slope to the bit; a NaN h is flagged and makes the row's sum NaN.
template <typename T>
constexpr bool kVectorTm = !std::is_same_v<T, double>;

// The hardware prefetchers alone leave a row loop at about half the read bandwidth: fetch the
// same 64 elements of the next row (h and labels) one row ahead (prefetches never fault, so the
// last row's reach past the end is harmless). Every build's row loops call it once per 64
// elements.
template <typename T, typename Lab>
RETAIN_FORCE_INLINE void prefetch_next_row(const T* h, const Lab* lab, int64_t D) {
  const char* hn = reinterpret_cast<const char*>(h + D);
  for (int64_t b = 0; b < int64_t{64 * sizeof(T)}; b += 64) __builtin_prefetch(hn + b);
  // the next row's labels: D int8, or D / 4 packed bytes (the caller passes label_row elements)
  __builtin_prefetch(lab);
}
// Element d's place in the next row's labels (int8: d; packed: byte d / 4).
template <typename Lab>
RETAIN_FORCE_INLINE int64_t label_offset(int64_t d) {
  return std::is_same_v<Lab, uint8_t> ? d / 4 : d;
}

struct TmInterval {
  VF lo, hi;
  RETAIN_FORCE_INLINE TmInterval(const int8_t* lab, const float* p, const float* n) {
    const VM l = vload_i(lab);  // integer labels: no conversion to floats
    const VF P = vload(p), N = vload(n);
#if defined(__AVX2__) && !defined(__AVX512F__)
    // blendv reads sign bits only: l's own is set exactly for l < 0, so one compare (l > 0) is
    // all the label needs (two uops fewer per vector; the loop is uop-bound with AVX2). Same
    // sign semantics as every other build for any int8 label.
    const __m256 neg = (__m256)l, pos = (__m256)(l > 0);
    lo = (VF)_mm256_blendv_ps(_mm256_blendv_ps((__m256)N, (__m256)P, pos), _mm256_set1_ps(-INFINITY), neg);
    hi = (VF)_mm256_blendv_ps(_mm256_blendv_ps((__m256)P, (__m256)N, neg), _mm256_set1_ps(INFINITY), pos);
#else
    const VM pos = l > 0, neg = l < 0;
    lo = pos ? P : (neg ? vsplat(-INFINITY) : N);
    hi = neg ? N : (pos ? vsplat(INFINITY) : P);
#endif
  }
};

// The portable vector rows visit a row's vectors [d0, Dv) in 16-element blocks (one pair of
// slope-bit words each, so a block's bits are stored once, not or-ed in per vector): f(d, j)
// for the block's vectors (j: the vector's place in its block), then done(d16) for each full
// block; the next row is prefetched every 64 elements. Vectors past the last full block get
// f(d, j) alone (their bits are or-ed in). d0 is a multiple of 64.
template <typename T, typename Lab, typename F, typename Done>
RETAIN_FORCE_INLINE void tm_row_vectors(const T* h, const Lab* lab_next, int64_t d0, int64_t Dv, int64_t D, const F& f,
                                        const Done& done) {
  int64_t d = d0;
  for (; d + 16 <= Dv; d += 16) {
    if (d % 64 == 0) prefetch_next_row(h + d, lab_next + label_offset<Lab>(d), D);
#pragma GCC unroll 4
    for (int j = 0; j < 16 / kFloatLanes; ++j) f(d + j * kFloatLanes, j);
    done(d);
  }
  for (int j = 0; d < Dv; d += kFloatLanes, ++j) f(d, j);
}

#ifdef RETAIN_TM_AVX512
// AVX-512 (F + BW) rows, in the avx512 build: one byte compare per 64 labels gives the label
// masks (no int8 -> float conversion), masked moves build [lo, hi], and max / masked adds replace
// compare-and-select pairs: about half the instructions of the portable vector loop, which left
// the TM loss core-bound. Same operations per element as
// tm_element / tm_slope, with a NaN activation flagged and made the row's sum.

// GCC 12 reports the deliberately undefined register inside its own _mm512_undefined_ps
// (used by the intrinsics below) as uninitialised: a false positive in the system header.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

RETAIN_FORCE_INLINE __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
RETAIN_FORCE_INLINE __m512 load16(const bf16_t* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
RETAIN_FORCE_INLINE __m512 load16(const f16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// Label masks (> 0, < 0) of elements d .. d + 63 of a row: int8 labels by a byte compare; packed
// 2-bit codes (element i at bits 2i of the row read as little-endian words: code 1 = +1, 2 = -1)
// by extracting the even and odd bits (code 3, never written by pack_tm_labels, reads as 0 as in
// label_at). Packed rows are never decoded.
RETAIN_FORCE_INLINE void label_masks(const int8_t* lab, int64_t d, __mmask64& kp, __mmask64& kn) {
  const __m512i l = _mm512_loadu_si512(lab + d);
  kp = _mm512_cmpgt_epi8_mask(l, _mm512_setzero_si512());
  kn = _mm512_cmplt_epi8_mask(l, _mm512_setzero_si512());
}
RETAIN_FORCE_INLINE void label_masks(const uint8_t* lab, int64_t d, __mmask64& kp, __mmask64& kn) {
  uint64_t w[2];
  std::memcpy(w, lab + d / 4, 16);
  const uint64_t even = 0x5555555555555555ull, odd = 0xAAAAAAAAAAAAAAAAull;
  const uint64_t lo = _pext_u64(w[0], even) | (_pext_u64(w[1], even) << 32);
  const uint64_t hi = _pext_u64(w[0], odd) | (_pext_u64(w[1], odd) << 32);
  kp = lo & ~hi;
  kn = hi & ~lo;
}

// The interval [lo, hi] of 16 elements (+1: [P, inf), -1: (-inf, N], 0: [N, P]).
RETAIN_FORCE_INLINE void interval16(__mmask64 kp, __mmask64 kn, int j, const float* P, const float* N, __m512& lo,
                              __m512& hi) {
  const __mmask16 p = static_cast<__mmask16>(kp >> (16 * j)), n = static_cast<__mmask16>(kn >> (16 * j));
  const __m512 Pv = _mm512_loadu_ps(P), Nv = _mm512_loadu_ps(N);
  lo = _mm512_mask_mov_ps(_mm512_mask_blend_ps(p, Nv, Pv), n, _mm512_set1_ps(-INFINITY));
  hi = _mm512_mask_mov_ps(_mm512_mask_blend_ps(n, Pv, Nv), p, _mm512_set1_ps(INFINITY));
}

// Calls f(e0, x, lo, hi) for every 16 elements e0 .. e0 + 15 of the first D / 64 * 64 of a row: x
// their values as floats, [lo, hi] their intervals; the next row is prefetched on the way. Returns
// D / 64 * 64.
template <typename T, typename Lab, typename F>
RETAIN_FORCE_INLINE int64_t tm_row_avx512(const T* h, const Lab* lab, int64_t label_row, const float* P,
                                          const float* N, int64_t D, const F& f) {
  const int64_t D64 = D / 64 * 64;
  const Lab* lab_next = lab + label_row;
  for (int64_t d = 0; d < D64; d += 64) {
    prefetch_next_row(h + d, lab_next + label_offset<Lab>(d), D);
    __mmask64 kp, kn;
    label_masks(lab, d, kp, kn);
    for (int j = 0; j < 4; ++j) {
      const int64_t e0 = d + 16 * j;
      __m512 lo, hi;
      interval16(kp, kn, j, P + e0, N + e0, lo, hi);
      f(e0, load16(h + e0), lo, hi);
    }
  }
  return D64;
}

// Loss sum and violation count of the first D / 64 * 64 elements of a row; returns that count.
template <typename T, typename Lab>
int64_t tm_fwd_row_avx512(const T* h, const Lab* lab, int64_t label_row, const float* P, const float* N, int64_t D,
                          float& sum, float& count, uint16_t* bits) {
  const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f);
  __m512 vs = zero, vc = zero;
  __mmask16 nan = 0;  // the max below drops a NaN x (its infinite bound would make one of ±inf)
  const int64_t D64 = tm_row_avx512(h, lab, label_row, P, N, D,
                                    [&](int64_t e0, __m512 x, __m512 lo, __m512 hi) __attribute__((always_inline)) {
    const __m512 e =
        _mm512_add_ps(_mm512_max_ps(_mm512_sub_ps(lo, x), zero), _mm512_max_ps(_mm512_sub_ps(x, hi), zero));
    nan |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    vs = _mm512_add_ps(vs, e);
    vc = _mm512_mask_add_ps(vc, _mm512_cmp_ps_mask(e, zero, _CMP_GT_OQ), vc, one);
    if (bits) {
      bits[e0 / 8] = _mm512_cmp_ps_mask(x, hi, _CMP_GT_OQ);
      bits[e0 / 8 + 1] = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
    }
  });
  sum = nan ? std::numeric_limits<float>::quiet_NaN() : _mm512_reduce_add_ps(vs);
  count = _mm512_reduce_add_ps(vc);
  return D64;
}

// scale * slope of the first D / 64 * 64 elements into the float row g (streamed past the caches
// when `stream`, g then 64-byte aligned); returns that count.
template <typename T, typename Lab>
int64_t tm_bwd_row_avx512(const T* h, const Lab* lab, int64_t label_row, const float* P, const float* N, int64_t D,
                          float scale, float* g, bool stream) {
  const __m512 plus = _mm512_set1_ps(scale), minus = _mm512_set1_ps(-scale);
  return tm_row_avx512(h, lab, label_row, P, N, D,
                       [&](int64_t e0, __m512 x, __m512 lo, __m512 hi) __attribute__((always_inline)) {
    const __m512 out = _mm512_add_ps(_mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, hi, _CMP_GT_OQ), plus),
                                     _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ), minus));
    if (stream) _mm512_stream_ps(g + e0, out); else _mm512_storeu_ps(g + e0, out);
  });
}
// grad = scale * slope of the first D / 16 * 16 elements from the slope bits; returns that count.
int64_t tm_bits_row_avx512(const uint16_t* bits, int64_t D, float scale, float* g, bool stream) {
  const __m512 plus = _mm512_set1_ps(scale), minus = _mm512_set1_ps(-scale);
  const int64_t D16 = D / 16 * 16;
  for (int64_t e0 = 0; e0 < D16; e0 += 16) {
    const __m512 out = _mm512_add_ps(_mm512_maskz_mov_ps(bits[e0 / 8], plus), _mm512_maskz_mov_ps(bits[e0 / 8 + 1], minus));
    if (stream) _mm512_stream_ps(g + e0, out); else _mm512_storeu_ps(g + e0, out);
  }
  return D16;
}
#pragma GCC diagnostic pop
#endif


template <typename T, typename Lab, typename A>
RETAIN_FORCE_INLINE void fwd_rows(const T* __restrict h, const Lab* __restrict labels, int64_t label_row,
                                  const A* __restrict pos, const A* __restrict neg, bool per_sample,
                                  const uint8_t* __restrict mask, int64_t L, int64_t D, double* __restrict row_sum,
                                  int64_t* __restrict row_count, uint16_t* __restrict slope_bits, int64_t r0,
                                  int64_t r1, std::atomic<int64_t>& bad_row) {
  Buffer<int8_t> scratch(std::is_same_v<Lab, uint8_t> ? D + 4 : 0);
  const int64_t Dv = kVectorTm<T> ? D / kFloatLanes * kFloatLanes : 0;
  const int64_t W = tm_slope_words(D);
  for (int64_t r = r0; r < r1; ++r) {
    uint16_t* __restrict bits = slope_bits ? slope_bits + r * W : nullptr;
    if (bits) std::fill(bits, bits + W, uint16_t{0});
    if (mask && !mask[r]) {
      row_sum[r] = 0.0, row_count[r] = 0;
      continue;
    }
    if (!tm_labels_valid(labels + r * label_row, label_row)) {
      for (int64_t seen = bad_row.load(); r < seen && !bad_row.compare_exchange_weak(seen, r);) {}
      row_sum[r] = 0.0, row_count[r] = 0;
      continue;
    }
    const int64_t b = r / L;
    const A* __restrict p = per_sample ? pos + b * D : pos;
    const A* __restrict n = per_sample ? neg + b * D : neg;
    const T* __restrict hr = h + r * D;
    A sum = 0, count = 0;  // a float count stays exact up to 2^24 elements a row
    int64_t d0 = 0;  // elements done by the AVX-512 loop (which reads packed rows as they are)
#ifdef RETAIN_TM_AVX512
    if constexpr (kVectorTm<T>) {
      d0 = tm_fwd_row_avx512(hr, labels + r * label_row, label_row, p, n, D, sum, count, bits);
    }
#endif
    const int8_t* __restrict lr = d0 < D ? row_labels(labels, label_row, r, D, scratch.data()) : nullptr;
    if constexpr (kVectorTm<T>) {
      VF vs{};
      VM vc{}, nan{};  // nan as in the AVX-512 rows: the relus drop a NaN x, which must reach the sum
      const VF zero{};
      uint32_t up = 0, down = 0;  // the current block's slope bits
      tm_row_vectors(hr, labels + (r + 1) * label_row, d0, Dv, D, [&](int64_t d, int j) __attribute__((always_inline)) {
        const TmInterval iv(lr + d, p + d, n + d);
        const VF x = vload_f(hr + d);
        const VF e = vmax(iv.lo - x, zero) + vmax(x - iv.hi, zero);
        nan |= x != x;
        vs += e;
        vc -= e > zero;  // lanes of -1 where true
        if (bits) {
          const uint32_t shift = static_cast<uint32_t>(j * kFloatLanes);
          const uint32_t u = vmask_bits(x > iv.hi) << shift, w = vmask_bits(x < iv.lo) << shift;
          if (j == 0) up = u, down = w; else up |= u, down |= w;
          if (d % 16 + kFloatLanes < 16 && d + kFloatLanes >= Dv) {  // a partial block ends the vectors
            bits[2 * (d / 16)] = static_cast<uint16_t>(up);
            bits[2 * (d / 16) + 1] = static_cast<uint16_t>(down);
          }
        }
      }, [&](int64_t d16) __attribute__((always_inline)) {
        if (bits) {
          bits[2 * (d16 / 16)] = static_cast<uint16_t>(up);
          bits[2 * (d16 / 16) + 1] = static_cast<uint16_t>(down);
        }
      });
      sum = vmask_bits(nan) ? std::numeric_limits<float>::quiet_NaN() : sum + vsum<float>(vs);
      count += vsum<float>(__builtin_convertvector(vc, VF));
    }
    for (int64_t d = Dv; d < D; ++d) {
      const A x = load_as<A>(hr[d]);
      const A e = tm_element(x, label_at(lr, d), p[d], n[d]);
      sum += e;
      count += e > A(0) ? A(1) : A(0);
      if (bits) {
        const A slope = tm_slope(x, label_at(lr, d), p[d], n[d]);
        const int word = static_cast<int>(d / 16) * 2 + (slope < A(0) ? 1 : 0);
        if (slope != A(0)) bits[word] = static_cast<uint16_t>(bits[word] | (1u << (d % 16)));
      }
    }
    row_sum[r] = static_cast<double>(sum);
    row_count[r] = static_cast<int64_t>(count);
  }
}

template <typename T, typename Lab, typename A>
RETAIN_FORCE_INLINE void bwd_rows(const T* __restrict h, const Lab* __restrict labels, int64_t label_row,
                                  const A* __restrict pos, const A* __restrict neg, bool per_sample,
                                  const uint8_t* __restrict mask, int64_t L, int64_t D, A scale,
                                  T* __restrict grad, bool stream, int64_t r0, int64_t r1) {
  Buffer<int8_t> scratch(std::is_same_v<Lab, uint8_t> ? D + 4 : 0);
  Buffer<A> row(D);  // the gradient row, then stored (streamed past the caches when `stream`)
  const int64_t Dv = kVectorTm<T> ? D / kFloatLanes * kFloatLanes : 0;
  for (int64_t r = r0; r < r1; ++r) {
    if (mask && !mask[r]) {
      row.fill(A(0));
      store_row(grad + r * D, row.data(), D, stream);
      continue;
    }
    const int64_t b = r / L;
    const A* __restrict p = per_sample ? pos + b * D : pos;
    const A* __restrict n = per_sample ? neg + b * D : neg;
    const T* __restrict hr = h + r * D;
    A* __restrict g = row.data();
    int64_t d0 = 0;  // elements done by the AVX-512 loop (which reads packed rows as they are)
#ifdef RETAIN_TM_AVX512
    if constexpr (kVectorTm<T>) {
      // float gradients go straight to the output (streamed); 16-bit ones through the row
      // buffer and store_row's rounding conversion
      const Lab* raw = labels + r * label_row;
      if constexpr (std::is_same_v<T, float>) {
        d0 = tm_bwd_row_avx512(hr, raw, label_row, p, n, D, scale, grad + r * D, stream);
      } else {
        d0 = tm_bwd_row_avx512(hr, raw, label_row, p, n, D, scale, g, false);
      }
    }
#endif
    const int8_t* __restrict lr = d0 < D ? row_labels(labels, label_row, r, D, scratch.data()) : nullptr;
    if constexpr (kVectorTm<T>) {
      const VF zero{}, plus = vsplat(static_cast<float>(scale)), minus = -plus;
      tm_row_vectors(hr, labels + (r + 1) * label_row, d0, Dv, D, [&](int64_t d, int) __attribute__((always_inline)) {
        const TmInterval iv(lr + d, p + d, n + d);
        const VF x = vload_f(hr + d);
        vstore(g + d, (x > iv.hi ? plus : zero) + (x < iv.lo ? minus : zero));
      }, [](int64_t) {});
    }
    for (int64_t d = Dv; d < D; ++d) g[d] = scaled_slope(scale, tm_slope(load_as<A>(hr[d]), label_at(lr, d), p[d], n[d]));
    if (std::is_same_v<T, float> && d0 > 0) {
      store_row(grad + r * D + d0, g + d0, D - d0, stream);  // the AVX-512 loop wrote [0, d0) itself
    } else {
      store_row(grad + r * D, g, D, stream);
    }
  }
  stream_fence(stream);
}

// grad = scale * slope from the forward's slope bits, a row at a time.
template <typename T>
RETAIN_FORCE_INLINE void bits_rows(const uint16_t* __restrict slope_bits, int64_t D, float scale, T* __restrict grad,
                                   bool stream, int64_t r0, int64_t r1) {
  Buffer<float> row(D);
  const int64_t W = tm_slope_words(D);
  for (int64_t r = r0; r < r1; ++r) {
    const uint16_t* __restrict bits = slope_bits + r * W;
    // float gradients are written straight to the output (streamed when `stream`: rows are then
    // 64-byte aligned and a multiple of 16 elements); 16-bit ones through the row buffer and
    // store_row's rounding conversion
    constexpr bool kDirect = std::is_same_v<T, float>;
    float* __restrict g = kDirect ? reinterpret_cast<float*>(grad + r * D) : row.data();
    int64_t done = 0;  // elements done by the AVX-512 loop
#ifdef RETAIN_TM_AVX512
    done = tm_bits_row_avx512(bits, D, scale, g, kDirect && stream);
#endif
    const VF plus = vsplat(scale), minus = -plus, zero{};
    int64_t d = done;
    for (; d + kFloatLanes <= D; d += kFloatLanes) {  // lanes never straddle a 16-element block
      const uint32_t p = bits[2 * (d / 16)] >> (d % 16), n = bits[2 * (d / 16) + 1] >> (d % 16);
      VF out;
      if constexpr (kFloatLanes <= 8) {
        constexpr uint32_t kLow = (1u << kFloatLanes) - 1;
        VM up, down;
        std::memcpy(&up, kLaneMasks.lane[p & kLow], sizeof up);
        std::memcpy(&down, kLaneMasks.lane[n & kLow], sizeof down);
        out = (VF)(up & (VM)plus) + (VF)(down & (VM)minus);
      } else {  // 16 lanes: the AVX-512 loop above has done every full vector
        out = (vbits_mask(p) ? plus : zero) + (vbits_mask(n) ? minus : zero);
      }
      if (kDirect && stream) vstream(g + d, out); else vstore(g + d, out);
    }
    for (; d < D; ++d) {
      const int l = static_cast<int>(d % 16);
      const float slope = static_cast<float>((bits[2 * (d / 16)] >> l) & 1) -
                          static_cast<float>((bits[2 * (d / 16) + 1] >> l) & 1);
      g[d] = scaled_slope(scale, slope);
    }
    if constexpr (!kDirect) store_row(grad + r * D, g, D, stream);
  }
  stream_fence(stream);
}

}  // namespace

template <CpuCapability C, typename T, typename Lab, typename A>
int64_t tm_loss_fwd_cpu(const T* h, const Lab* labels, int64_t label_row, const A* pos, const A* neg,
                     bool per_sample_thresholds, const uint8_t* mask, int64_t B, int64_t L, int64_t D,
                     double* row_sum, int64_t* row_count, uint16_t* slope_bits, int nthreads) {
  std::atomic<int64_t> bad_row{B * L};
  parallel_for(B * L, D * 4, nthreads, [&](int64_t r0, int64_t r1) {
    fwd_rows<T, Lab, A>(h, labels, label_row, pos, neg, per_sample_thresholds, mask, L, D, row_sum, row_count, slope_bits,
                 r0, r1, bad_row);
  });
  const int64_t r = bad_row.load();
  return r < B * L ? r : -1;
}

template <CpuCapability C, typename T, typename Lab, typename A>
void tm_loss_bwd_cpu(const T* h, const Lab* labels, int64_t label_row, const A* pos, const A* neg,
                     bool per_sample_thresholds, const uint8_t* mask, int64_t B, int64_t L, int64_t D, double scale,
                     T* grad_h, int nthreads) {
  // stream the gradient when it is far larger than the caches and rows start 64-byte aligned
  const bool stream = B * L * D * int64_t{sizeof(T)} >= (int64_t{16} << 20) && (D * int64_t{sizeof(T)}) % 64 == 0
                      && reinterpret_cast<std::uintptr_t>(grad_h) % 64 == 0;  // vector streaming stores need it
  parallel_for(B * L, D * 4, nthreads, [&](int64_t r0, int64_t r1) {
    bwd_rows<T, Lab, A>(h, labels, label_row, pos, neg, per_sample_thresholds, mask, L, D, static_cast<A>(scale), grad_h,
                 stream, r0, r1);
  });
}

// double has no bits path: Python keeps its slope bits empty and runs the two-pass backward.
template <CpuCapability C, typename T>
void tm_loss_bwd_bits_cpu(const uint16_t* slope_bits, int64_t rows, int64_t D, double scale, T* grad_h,
                          int nthreads) {
  const bool stream = rows * D * int64_t{sizeof(T)} >= (int64_t{16} << 20) && (D * int64_t{sizeof(T)}) % 64 == 0
                      && reinterpret_cast<std::uintptr_t>(grad_h) % 64 == 0;  // vector streaming stores need it
  parallel_for(rows, D, nthreads, [&](int64_t r0, int64_t r1) {
    bits_rows<T>(slope_bits, D, static_cast<float>(scale), grad_h, stream, r0, r1);
  });
}
template void tm_loss_bwd_bits_cpu<kThisCpu, float>(const uint16_t*, int64_t, int64_t, double, float*, int);
template void tm_loss_bwd_bits_cpu<kThisCpu, bf16_t>(const uint16_t*, int64_t, int64_t, double, bf16_t*, int);
template void tm_loss_bwd_bits_cpu<kThisCpu, f16_t>(const uint16_t*, int64_t, int64_t, double, f16_t*, int);

#define RETAIN_INSTANTIATE(T, Lab)                                                                            \
  template int64_t tm_loss_fwd_cpu<kThisCpu, T, Lab, Acc<T>>(const T*, const Lab*, int64_t, const Acc<T>*, const Acc<T>*, \
                                                bool, const uint8_t*, int64_t, int64_t, int64_t, double*,       \
                                                int64_t*, uint16_t*, int);                                     \
  template void tm_loss_bwd_cpu<kThisCpu, T, Lab, Acc<T>>(const T*, const Lab*, int64_t, const Acc<T>*, const Acc<T>*,   \
                                                bool, const uint8_t*, int64_t, int64_t, int64_t, double, T*, int);
#define RETAIN_INSTANTIATE_LABELS(T) RETAIN_INSTANTIATE(T, int8_t) RETAIN_INSTANTIATE(T, uint8_t)
RETAIN_FOR_EACH_FLOATING(RETAIN_INSTANTIATE_LABELS)
#undef RETAIN_INSTANTIATE_LABELS
#undef RETAIN_INSTANTIATE

}  // namespace retain::margin
