// CPU kernels of replay/rows.h. Gathers, and scatters whose indices are distinct (what the slot
// functions return), split the work by (row, field). A scatter with repeated indices splits it by
// (field, column block) instead, every unit walking all rows in order, so the last writer wins
// without locks.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common/buffer.h"
#include "common/cpu_capability.h"
#include "common/parallel.h"
#include "replay/rng.h"
#include "replay/rows.h"

namespace retain::replay {
namespace {

constexpr int64_t kColumnBlock = 4096;  // bytes of a row one scatter unit owns

struct Field {
  char* storage;
  char* batch;
  int64_t row_bytes;
};

Field field(const int64_t* table, int64_t f) {
  return {reinterpret_cast<char*>(table[3 * f]), reinterpret_cast<char*>(table[3 * f + 1]), table[3 * f + 2]};
}

// Whether a non-negative index occurs twice: an open-addressing set of 2k entries, O(k).
bool has_repeats(const int64_t* idx, int64_t k) {
  int64_t size = 1;
  while (size < 2 * k) size <<= 1;
  Buffer<int64_t> set(size);
  set.fill(-1);
  const auto mask = static_cast<uint64_t>(size - 1);
  for (int64_t j = 0; j < k; ++j) {
    if (idx[j] < 0) continue;
    uint64_t h = splitmix64(static_cast<uint64_t>(idx[j])) & mask;
    while (set.data()[h] >= 0 && set.data()[h] != idx[j]) h = (h + 1) & mask;
    if (set.data()[h] == idx[j]) return true;
    set.data()[h] = idx[j];
  }
  return false;
}

}  // namespace

template <CpuCapability C>
int64_t rows_copy_cpu(const int64_t* table, int64_t fields, const int64_t* idx, int64_t k, int64_t capacity,
                      bool scatter, int nthreads) {
  const int64_t lowest = scatter ? -1 : 0;
  int64_t bad = 0;
  for (int64_t j = 0; j < k; ++j) bad += (idx[j] < lowest) | (idx[j] >= capacity);
  if (bad) return bad;
  int64_t total_bytes = 0;
  for (int64_t f = 0; f < fields; ++f) total_bytes += field(table, f).row_bytes;
  if (!scatter || !has_repeats(idx, k)) {
    const int64_t avg = fields ? total_bytes / fields + 1 : 1;
    parallel_for(k * fields, avg, nthreads, [&](int64_t begin, int64_t end) {
      for (int64_t u = begin; u < end; ++u) {
        const Field fd = field(table, u % fields);
        const int64_t j = u / fields;
        if (scatter) {
          if (idx[j] >= 0) std::memcpy(fd.storage + idx[j] * fd.row_bytes, fd.batch + j * fd.row_bytes, fd.row_bytes);
        } else {
          std::memcpy(fd.batch + j * fd.row_bytes, fd.storage + idx[j] * fd.row_bytes, fd.row_bytes);
        }
      }
    });
    return 0;
  }
  // Units: (field, column block); unit u of field f covers bytes [b * kColumnBlock, ...) of each row.
  int64_t units = 0;
  for (int64_t f = 0; f < fields; ++f) units += std::max<int64_t>(1, (field(table, f).row_bytes + kColumnBlock - 1) / kColumnBlock);
  parallel_for(units, k * std::min(kColumnBlock, total_bytes + 1), nthreads, [&](int64_t begin, int64_t end) {
    int64_t first = 0;
    for (int64_t f = 0; f < fields; ++f) {
      const Field fd = field(table, f);
      const int64_t blocks = std::max<int64_t>(1, (fd.row_bytes + kColumnBlock - 1) / kColumnBlock);
      for (int64_t b = std::max(begin - first, int64_t{0}); b < std::min(end - first, blocks); ++b) {
        const int64_t lo = b * kColumnBlock;
        const int64_t bytes = std::min(kColumnBlock, fd.row_bytes - lo);
        if (bytes <= 0) continue;
        for (int64_t j = 0; j < k; ++j) {
          if (idx[j] >= 0) std::memcpy(fd.storage + idx[j] * fd.row_bytes + lo, fd.batch + j * fd.row_bytes + lo, bytes);
        }
      }
      first += blocks;
    }
  });
  return 0;
}

template int64_t rows_copy_cpu<kThisCpu>(const int64_t*, int64_t, const int64_t*, int64_t, int64_t, bool, int);

}  // namespace retain::replay
