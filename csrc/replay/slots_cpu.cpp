// CPU kernels of replay/slots.h.
#include <cstdint>

#include "common/buffer.h"
#include "common/cpu_capability.h"
#include "replay/rng.h"
#include "replay/slots.h"

namespace retain::replay {
namespace {

// Last writer wins: walking the batch backwards, an item whose slot a later item took gets -1.
// An open-addressing set of the slots seen (twice the batch, a power of two) keeps this O(batch).
void keep_last_writers(int64_t* slots, int64_t batch) {
  int64_t size = 1;
  while (size < 2 * batch) size <<= 1;
  Buffer<int64_t> set(size);
  set.fill(-1);
  for (int64_t j = batch - 1; j >= 0; --j) {
    const int64_t s = slots[j];
    if (s < 0) continue;
    uint64_t h = splitmix64(static_cast<uint64_t>(s)) & static_cast<uint64_t>(size - 1);
    while (set.data()[h] >= 0 && set.data()[h] != s) h = (h + 1) & static_cast<uint64_t>(size - 1);
    if (set.data()[h] == s) {
      slots[j] = -1;
    } else {
      set.data()[h] = s;
    }
  }
}

// A uniformly random slot holding class c (rejection over the slots: expected capacity / counts[c]
// draws, at most about the number of classes for the classes this is called for).
int64_t random_member(Stream& rng, const int64_t* slot_labels, int64_t capacity, int64_t c) {
  for (;;) {
    const auto s = static_cast<int64_t>(rng.below(static_cast<uint64_t>(capacity)));
    if (slot_labels[s] == c) return s;
  }
}

}  // namespace

template <CpuCapability C>
void reservoir_slots_cpu(int64_t n_seen, int64_t batch, int64_t capacity, uint64_t seed, int64_t* slots, int) {
  Stream rng(seed);
  for (int64_t j = 0; j < batch; ++j) {
    const int64_t i = n_seen + j;  // this item's arrival number: kept with probability capacity / (i + 1)
    if (i < capacity) {
      slots[j] = i;
    } else {
      const auto r = static_cast<int64_t>(rng.below(static_cast<uint64_t>(i) + 1));
      slots[j] = r < capacity ? r : -1;
    }
  }
  keep_last_writers(slots, batch);
}

template <CpuCapability C>
void class_balanced_slots_cpu(const int64_t* labels, int64_t batch, int64_t classes, int64_t capacity,
                              int64_t* slot_labels, int64_t* counts, int64_t* seen, uint8_t* full, int64_t* size,
                              uint64_t seed, int64_t* slots, int) {
  Stream rng(seed);
  for (int64_t j = 0; j < batch; ++j) {
    const int64_t y = labels[j];
    ++seen[y];
    if (*size < capacity) {  // filling: every item is stored
      const int64_t s = (*size)++;
      slot_labels[s] = y;
      ++counts[y];
      slots[j] = s;
      continue;
    }
    // Full memory: the currently largest classes are (and stay) full.
    int64_t largest = 0, ties = 0;
    for (int64_t c = 0; c < classes; ++c) {
      if (counts[c] > largest) {
        largest = counts[c];
        ties = 0;
      }
      if (counts[c] == largest) ++ties;
    }
    for (int64_t c = 0; c < classes; ++c) {
      if (counts[c] == largest) full[c] = 1;
    }
    int64_t victim_class = -1;
    if (!full[y]) {  // a class that never was the largest: evict from a largest class (uniform among ties)
      auto pick = static_cast<int64_t>(rng.below(static_cast<uint64_t>(ties)));
      for (int64_t c = 0; c < classes; ++c) {
        if (counts[c] == largest && pick-- == 0) {
          victim_class = c;
          break;
        }
      }
    } else if (static_cast<int64_t>(rng.below(static_cast<uint64_t>(seen[y]))) < counts[y]) {
      victim_class = y;  // reservoir inside the class: kept with probability counts[y] / seen[y]
    }
    if (victim_class < 0) {
      slots[j] = -1;
      continue;
    }
    const int64_t s = random_member(rng, slot_labels, capacity, victim_class);
    --counts[victim_class];
    ++counts[y];
    slot_labels[s] = y;
    slots[j] = s;
  }
  keep_last_writers(slots, batch);
}

template void reservoir_slots_cpu<kThisCpu>(int64_t, int64_t, int64_t, uint64_t, int64_t*, int);
template void class_balanced_slots_cpu<kThisCpu>(const int64_t*, int64_t, int64_t, int64_t, int64_t*, int64_t*,
                                                 int64_t*, uint8_t*, int64_t*, uint64_t, int64_t*, int);

}  // namespace retain::replay
