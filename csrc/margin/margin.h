// Launchers of the margin family. h [B, L, D] contiguous; labels one row of `label_row` elements
// (int8: D, packed uint8: ceil(D/4)) per (b, l); thresholds [D] or [B, D] in the accumulation type;
// mask [B, L] (uint8 0/1) or null.
#pragma once

#include <cstdint>

namespace retain::margin {

// Per-row partial results: row_sum[b*L + l] = sum of the row's losses, row_count = #losses > 0.
template <typename T, typename Lab, typename A>
void tm_loss_fwd_cpu(const T* h, const Lab* labels, int64_t label_row, const A* pos, const A* neg,
                     bool per_sample_thresholds, const uint8_t* mask, int64_t B, int64_t L, int64_t D,
                     double* row_sum, int64_t* row_count, int nthreads);

// grad_h = scale * mask * d loss / d h.
template <typename T, typename Lab, typename A>
void tm_loss_bwd_cpu(const T* h, const Lab* labels, int64_t label_row, const A* pos, const A* neg,
                     bool per_sample_thresholds, const uint8_t* mask, int64_t B, int64_t L, int64_t D, double scale,
                     T* grad_h, int nthreads);

}  // namespace retain::margin
