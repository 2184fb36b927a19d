#pragma once
// Order-preserving map from floating-point values to unsigned integers, for radix selection:
// a < b (as floats, both finite) <=> key(a) < key(b). -0.0 is mapped like +0.0 so that equal floats share a key.

#include <c10/macros/Macros.h>

#include <cstdint>
#include <cstring>

namespace graspext::ops {

template <typename scalar_t>
struct RadixKey;

template <>
struct RadixKey<float> {
  using bits_t = uint32_t;
  static constexpr int kBits = 32;
  static constexpr int kExponentBits = 8;
  static C10_HOST_DEVICE inline bits_t encode(float x) {
    bits_t u;
    std::memcpy(&u, &x, sizeof(u));
    u = (u == 0x80000000u) ? 0u : u;
    // Branch-free (signs are random in scores): negative -> ~u, non-negative -> u with the sign bit set.
    const bits_t negative = static_cast<bits_t>(0) - (u >> 31);
    return u ^ (negative | 0x80000000u);
  }
  static C10_HOST_DEVICE inline float decode(bits_t k) {
    bits_t u = (k & 0x80000000u) ? (k & 0x7fffffffu) : ~k;
    float x;
    std::memcpy(&x, &u, sizeof(x));
    return x;
  }
};

template <>
struct RadixKey<double> {
  using bits_t = uint64_t;
  static constexpr int kBits = 64;
  static constexpr int kExponentBits = 11;
  static C10_HOST_DEVICE inline bits_t encode(double x) {
    bits_t u;
    std::memcpy(&u, &x, sizeof(u));
    constexpr bits_t sign = bits_t{1} << 63;
    u = (u == sign) ? 0u : u;
    const bits_t negative = static_cast<bits_t>(0) - (u >> 63);
    return u ^ (negative | sign);
  }
  static C10_HOST_DEVICE inline double decode(bits_t k) {
    constexpr bits_t sign = bits_t{1} << 63;
    bits_t u = (k & sign) ? (k & ~sign) : ~k;
    double x;
    std::memcpy(&x, &u, sizeof(x));
    return x;
  }
};

// Radix selection looks at 16 bits per pass, most significant first.
constexpr int kRadixBits = 16;
constexpr int kRadixBins = 1 << kRadixBits;

// In the first pass's bins (top 16 key bits), the bins holding NaN and +-Inf: keys whose exponent is all ones.
template <typename scalar_t>
constexpr int nonfinite_bins_per_side() {
  return 1 << (kRadixBits - 1 - RadixKey<scalar_t>::kExponentBits);
}

}  // namespace graspext::ops
