// Launchers of the margin family. h [B, L, D] contiguous; labels one row of `label_row` elements
// (int8: D, packed uint8: ceil(D/4)) per (b, l); thresholds [D] or [B, D] in the accumulation type;
// mask [B, L] (uint8 0/1) or null.
#pragma once

#include <cstdint>

#include "common/cpu_capability.h"

namespace retain::margin {

// Per-row partial results: row_sum[b*L + l] = sum of the row's losses, row_count = #losses > 0.
// slope_bits (or null) keeps the sign of every element's slope for the backward, 2 bits an
// element: row r's words [r * W, (r + 1) * W), W = tm_slope_words(D), hold for each block k of
// 16 elements the mask of slope +1 (word 2k) and of slope -1 (word 2k + 1); 0 for masked rows.
// CPU launchers: one build per CPU capability C (call through retain::cpu_dispatch).
template <CpuCapability C, typename T, typename Lab, typename A>
void tm_loss_fwd_cpu(const T* h, const Lab* labels, int64_t label_row, const A* pos, const A* neg,
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

// KL imitation, one row of V logits per token: loss[n] = KL(softmax(z_ref/T) || softmax(z/T)),
// lse[n], lse_ref[n] the log-sum-exps of z/T and z_ref/T (saved for the backward). Rows whose
// mask is 0 get loss 0.
template <CpuCapability C, typename T>
void kl_imitation_fwd_cpu(const T* z, const T* z_ref, const uint8_t* mask, int64_t N, int64_t V, double inv_t,
                          double* loss, double* lse, double* lse_ref, int nthreads);

// grad_z = g[n] / T * (p - p_ref); grad_z_ref = g[n] / T * p_ref * (log p_ref - log p - loss[n])
// (either may be null); g is the incoming gradient of each row's loss (0 where masked).
template <CpuCapability C, typename T>
void kl_imitation_bwd_cpu(const T* z, const T* z_ref, const double* g, const double* loss, const double* lse,
                          const double* lse_ref, int64_t N, int64_t V, double inv_t, T* grad_z, T* grad_z_ref,
                          int nthreads);

// The forward with the gradient of a reduced loss fused in (for loss.backward() on 'mean'/'sum'):
// kl_imitation_fwd_cpu's outputs, and the backward's grad_z / grad_z_ref for g[n] = grad_scale
// where mask is 1 and 0 elsewhere (either may be null). The exps of the sums are kept in a
// per-thread row buffer, so the gradient costs no exp of its own.
template <CpuCapability C, typename T>
void kl_imitation_fwd_grad_cpu(const T* z, const T* z_ref, const uint8_t* mask, int64_t N, int64_t V, double inv_t,
                               double grad_scale, double* loss, double* lse, double* lse_ref, T* grad_z,
                               T* grad_z_ref, int nthreads);

// Feature imitation's forward with the gradient of a reduced loss fused in: the distances, and
// grad_h = grad_scale * slope (0 on masked rows), grad_h_ref = -grad_h (either may be null).
template <CpuCapability C, typename T>
void feature_imitation_fwd_grad_cpu(const T* h, const T* h_ref, const uint8_t* mask, int64_t N, int64_t D, int p,
                                    double grad_scale, double* loss, T* grad_h, T* grad_h_ref, int nthreads);

// Feature imitation, one row of D features per token: loss[n] = sum_d |h - h_ref| (p = 1) or
// sum_d (h - h_ref)^2 (p = 2), 0 where mask is 0.
template <CpuCapability C, typename T>
void feature_imitation_fwd_cpu(const T* h, const T* h_ref, const uint8_t* mask, int64_t N, int64_t D, int p,
                               double* loss, int nthreads);

// grad_h = g[n] * sign(h - h_ref) (p = 1) or g[n] * 2 (h - h_ref) (p = 2); grad_h_ref = -grad_h; rows whose
// mask is 0 get 0. Either output may be null.
template <CpuCapability C, typename T>
void feature_imitation_bwd_cpu(const T* h, const T* h_ref, const double* g, const uint8_t* mask, int64_t N,
                               int64_t D, int p, T* grad_h, T* grad_h_ref, int nthreads);

#ifdef RETAIN_WITH_CUDA
// CUDA launchers (margin_cuda.cu): the same outputs as the CPU launchers above, every pointer in
// device memory, enqueued on `stream` (a cudaStream_t as an integer). tm_loss_bwd_cuda reads its
// scale (grad / denominator, float64) from device memory, so the backward never syncs the host.
template <typename T, typename Lab, typename A>
void tm_loss_fwd_cuda(const T* h, const Lab* labels, int64_t label_row, const A* pos, const A* neg,
                      bool per_sample_thresholds, const uint8_t* mask, int64_t B, int64_t L, int64_t D,
                      double* row_sum, int64_t* row_count, std::uintptr_t stream);

template <typename T, typename Lab, typename A>
void tm_loss_bwd_cuda(const T* h, const Lab* labels, int64_t label_row, const A* pos, const A* neg,
                      bool per_sample_thresholds, const uint8_t* mask, int64_t B, int64_t L, int64_t D,
                      const double* scale, T* grad_h, std::uintptr_t stream);

template <typename T>
void kl_imitation_fwd_cuda(const T* z, const T* z_ref, const uint8_t* mask, int64_t N, int64_t V, double inv_t,
                           double* loss, double* lse, double* lse_ref, std::uintptr_t stream);

template <typename T>
void kl_imitation_bwd_cuda(const T* z, const T* z_ref, const double* g, const double* loss, const double* lse,
                           const double* lse_ref, int64_t N, int64_t V, double inv_t, T* grad_z, T* grad_z_ref,
                           std::uintptr_t stream);

template <typename T>
void feature_imitation_fwd_cuda(const T* h, const T* h_ref, const uint8_t* mask, int64_t N, int64_t D, int p,
                                double* loss, std::uintptr_t stream);

template <typename T>
void feature_imitation_bwd_cuda(const T* h, const T* h_ref, const double* g, const uint8_t* mask, int64_t N,
                                int64_t D, int p, T* grad_h, T* grad_h_ref, std::uintptr_t stream);
#endif

}  // namespace retain::margin
