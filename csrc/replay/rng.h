// The replay family's random integers: a counter-based stream (splitmix64 of seed + i * golden
// ratio) and Lemire's unbiased bounded draw, so a slot is exactly uniform over [0, bound) (no modulo
// or floating-point bias). Python draws one 63-bit seed per call from the caller's torch.Generator,
// which makes every call deterministic for a seed and checkpointable through the generator's state;
// python/retain/ops/replay/reference.py implements the same stream bit for bit.
#pragma once

#include <cstdint>

#include "common/host_device.h"

namespace retain::replay {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;

RETAIN_HOST_DEVICE RETAIN_FORCE_INLINE uint64_t splitmix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

class Stream {
 public:
  explicit Stream(uint64_t seed) : state_(seed) {}
  uint64_t next() {
    state_ += kGolden;
    return splitmix64(state_);
  }
  // Uniform on [0, bound), bound >= 1: the high word of x * bound, redrawn while the low word falls in
  // the short first interval (Lemire 2019, "Fast random integer generation in an interval").
  uint64_t below(uint64_t bound) {
    unsigned __int128 m = static_cast<unsigned __int128>(next()) * bound;
    uint64_t low = static_cast<uint64_t>(m);
    if (low < bound) {
      const uint64_t threshold = (0 - bound) % bound;
      while (low < threshold) {
        m = static_cast<unsigned __int128>(next()) * bound;
        low = static_cast<uint64_t>(m);
      }
    }
    return static_cast<uint64_t>(m >> 64);
  }

 private:
  uint64_t state_;
};

}  // namespace retain::replay
