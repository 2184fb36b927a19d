#pragma once
// TopAgg (DataLens, Wang et al. CCS 2021): shared by the CPU and CUDA kernels and mirrored, bit for bit, by the
// plain-torch reference in graspext/ops/topagg.py.
//
// Per teacher row g (length d): keep the k largest |g| (ties to the lower index), clip them to
// b = min(max |g|, max_grad), and draw each kept coordinate's vote +1 with probability 1/2 + g/(2b), else -1.
// TopAgg sums the votes over the T teachers of a sample, adds N(0, sigma^2) per coordinate and outputs +1 / -1
// where the noisy sum exceeds +beta*T / falls below -beta*T, else 0.
//
// Randomness is counter-based, so every backend draws the same numbers: the uniform for (stream, index) is
// splitmix64(splitmix64(seed + stream * kStreamStride) + index), its top 53 bits scaled to [0, 1).

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace graspext::ops::topagg {

constexpr uint64_t kStreamStride = 0xD1B54A32D192ED03ull;
constexpr uint64_t kSignStream = 1;   // index: (sample * T + teacher) * d + coordinate
constexpr uint64_t kNoiseStream = 2;  // Box-Muller pair: indices 2 * (sample * d + coordinate) and + 1

C10_HOST_DEVICE inline uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

C10_HOST_DEVICE inline uint64_t stream_key(uint64_t seed, uint64_t stream) {
  return splitmix64(seed + stream * kStreamStride);
}

C10_HOST_DEVICE inline double uniform(uint64_t key, uint64_t index) {
  return static_cast<double>(splitmix64(key + index) >> 11) * 0x1.0p-53;
}

// The vote of one kept coordinate: +1 with probability 1/2 + g/(2b) (g already clipped to [-b, b]).
C10_HOST_DEVICE inline int8_t stochastic_sign(double g, double b, uint64_t key, uint64_t index) {
  const double p = b > 0 ? 0.5 + g / (2.0 * b) : 0.5;
  return uniform(key, index) < p ? 1 : -1;
}

// A standard normal from the Box-Muller pair at (2i, 2i + 1).
C10_HOST_DEVICE inline double normal(uint64_t key, uint64_t i) {
  const double u1 = 1.0 - uniform(key, 2 * i);  // (0, 1]
  const double u2 = uniform(key, 2 * i + 1);
  return ::sqrt(-2.0 * ::log(u1)) * ::cos(6.283185307179586 * u2);
}

C10_HOST_DEVICE inline int8_t threshold_vote(double noisy_sum, double bound) {
  return noisy_sum > bound ? 1 : (noisy_sum < -bound ? -1 : 0);
}

}  // namespace graspext::ops::topagg
