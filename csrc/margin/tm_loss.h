// tm_loss (GeRe's threshold-based margin loss): the per-element math shared by the CPU loops
// (tm_loss_cpu.cpp) and the CUDA kernels (tm_loss_cuda.cu), and their launchers. Derivations:
// csrc/margin/README.md.
#pragma once

#include <cstdint>

#include "common/cpu_capability.h"
#include "common/host_device.h"

namespace retain::margin {

// Label of feature d of one row: int8 labels in {-1, 0, 1}, or packed 2-bit codes (four a byte,
// feature d at bits 2*(d % 4) of byte d / 4; code 1 = +1, code 2 = -1, 0 = 0).
RETAIN_HOST_DEVICE RETAIN_FORCE_INLINE int label_at(const int8_t* row, int64_t d) { return row[d]; }
RETAIN_HOST_DEVICE RETAIN_FORCE_INLINE int label_at(const uint8_t* row, int64_t d) {
  const int code = (row[d >> 2] >> ((d & 3) * 2)) & 3;
  return (code == 1) - (code == 2);
}

// max(0, a) that keeps a NaN: a NaN activation makes the loss NaN, as in the reference.
template <typename A>
RETAIN_HOST_DEVICE RETAIN_FORCE_INLINE A relu_keep_nan(A a) {
  return A(0) > a ? A(0) : a;
}

// Loss of one element: label +1: max(0, pos - h); -1: max(0, h - neg); 0: max(0, h - pos) + max(0, neg - h).
template <typename A>
RETAIN_HOST_DEVICE RETAIN_FORCE_INLINE A tm_element(A h, int label, A pos, A neg) {
  if (label > 0) return relu_keep_nan(pos - h);
  if (label < 0) return relu_keep_nan(h - neg);
  return relu_keep_nan(h - pos) + relu_keep_nan(neg - h);
}

// d loss / d h of one element (0 on the thresholds themselves, where the loss is 0).
template <typename A>
RETAIN_HOST_DEVICE RETAIN_FORCE_INLINE A tm_slope(A h, int label, A pos, A neg) {
  const A s_pos = h < pos ? A(-1) : A(0);
  const A s_neg = h > neg ? A(1) : A(0);
  const A s_zero = (h > pos ? A(1) : A(0)) - (h < neg ? A(1) : A(0));
  return label > 0 ? s_pos : (label < 0 ? s_neg : s_zero);
}

// scale * slope for a slope in {-1, 0, 1}, 0 where the slope is 0 even for a non-finite scale
// (as autograd's relu backward gives, and as the vector paths' selects do).
template <typename A>
RETAIN_HOST_DEVICE RETAIN_FORCE_INLINE A scaled_slope(A scale, A slope) {
  return slope > A(0) ? scale : (slope < A(0) ? -scale : A(0));
}

// Launchers. h [B, L, D] contiguous; labels one row of `label_row` elements (int8: D, packed
// uint8: ceil(D/4)) per (b, l); thresholds [D] or [B, D] in the accumulation type; mask [B, L]
// (uint8 0/1) or null.
//
// Whether a row of labels holds only what the kernels read as labels: int8 in {-1, 0, 1}, packed
// codes 0-2 (code 3 is never written by pack_tm_labels). One branch-free pass a row, over bytes
// the kernel is about to read anyway (they are in L1 after it): an invalid label is refused, not
// read as its sign.
RETAIN_FORCE_INLINE bool tm_labels_valid(const int8_t* row, int64_t n) {
  uint8_t bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= static_cast<uint8_t>(static_cast<uint8_t>(row[i] + 1) > 2);
  return !bad;
}
RETAIN_FORCE_INLINE bool tm_labels_valid(const uint8_t* row, int64_t n) {
  uint8_t bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= static_cast<uint8_t>(row[i] & (row[i] >> 1) & 0x55);
  return !bad;
}

// Per-row partial results: row_sum[b*L + l] = sum of the row's losses, row_count = #losses > 0.
// slope_bits (or null) keeps the sign of every element's slope for the backward, 2 bits an
// element: row r's words [r * W, (r + 1) * W), W = tm_slope_words(D), hold for each block k of
// 16 elements the mask of slope +1 (word 2k) and of slope -1 (word 2k + 1); 0 for masked rows.
// CPU launchers: one build per CPU capability C (call through retain::cpu_dispatch). The forward
// returns the first counted row (b * L + l) that holds an invalid label, -1 when there is none (the
// binding formats the error: no strings are built in the per-capability code).
template <CpuCapability C, typename T, typename Lab, typename A>
int64_t tm_loss_fwd_cpu(const T* h, const Lab* labels, int64_t label_row, const A* pos, const A* neg,
                     bool per_sample_thresholds, const uint8_t* mask, int64_t B, int64_t L, int64_t D,
                     double* row_sum, int64_t* row_count, uint16_t* slope_bits, int nthreads);

inline int64_t tm_slope_words(int64_t D) { return 2 * ((D + 15) / 16); }

// grad_h = scale * slope from the forward's slope_bits (rows = B * L): no second read of h.
template <CpuCapability C, typename T>
void tm_loss_bwd_bits_cpu(const uint16_t* slope_bits, int64_t rows, int64_t D, double scale, T* grad_h,
                          int nthreads);

// grad_h = scale * mask * d loss / d h.
template <CpuCapability C, typename T, typename Lab, typename A>
void tm_loss_bwd_cpu(const T* h, const Lab* labels, int64_t label_row, const A* pos, const A* neg,
                     bool per_sample_thresholds, const uint8_t* mask, int64_t B, int64_t L, int64_t D, double scale,
                     T* grad_h, int nthreads);

#ifdef RETAIN_WITH_CUDA
// CUDA launchers: the same outputs as the CPU launchers (no slope bits), every pointer in device
// memory, enqueued on `stream` (a cudaStream_t as an integer). tm_loss_bwd_cuda reads its scale
// (grad / denominator, float64) from device memory, so the backward never syncs the host.
template <typename T, typename Lab, typename A>
void tm_loss_fwd_cuda(const T* h, const Lab* labels, int64_t label_row, const A* pos, const A* neg,
                      bool per_sample_thresholds, const uint8_t* mask, int64_t B, int64_t L, int64_t D,
                      double* row_sum, int64_t* row_count, std::uintptr_t stream);

template <typename T, typename Lab, typename A>
void tm_loss_bwd_cuda(const T* h, const Lab* labels, int64_t label_row, const A* pos, const A* neg,
                      bool per_sample_thresholds, const uint8_t* mask, int64_t B, int64_t L, int64_t D,
                      const double* scale, T* grad_h, std::uintptr_t stream);
#endif

}  // namespace retain::margin
