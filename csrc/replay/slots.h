// Which buffer slot each incoming item is written to (-1: not stored): exact reservoir sampling
// (Algorithm R) and class-balanced reservoir sampling (CBRS). Sequential by nature (each decision
// depends on the previous ones) and O(batch) per call; the derivations and the definition of a
// "full" class are in csrc/replay/README.md. Inside one call the last writer of a slot wins: an
// earlier item whose slot a later item of the same call takes gets -1, so the returned slots are
// distinct and a scatter of them is unambiguous.
#pragma once

#include <cstdint>

#include "common/cpu_capability.h"

namespace retain::replay {

// Items n_seen .. n_seen + batch - 1 (0-based arrival numbers) into a reservoir of `capacity`.
template <CpuCapability C>
void reservoir_slots_cpu(int64_t n_seen, int64_t batch, int64_t capacity, uint64_t seed, int64_t* slots, int nthreads);

// `labels` [batch] in [0, classes). State, updated in place: slot_labels [capacity] (-1: empty),
// counts / seen [classes] (stored / arrived per class), full [classes] (0/1), size [1] (filled slots).
template <CpuCapability C>
void class_balanced_slots_cpu(const int64_t* labels, int64_t batch, int64_t classes, int64_t capacity,
                              int64_t* slot_labels, int64_t* counts, int64_t* seen, uint8_t* full, int64_t* size,
                              uint64_t seed, int64_t* slots, int nthreads);

}  // namespace retain::replay
