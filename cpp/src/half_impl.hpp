// float16 / bfloat16 <-> float32 conversion loops, per ISA (F16C and integer rounding on AVX2,
// their 512-bit forms on AVX-512, bit manipulation in the scalar build and for tails).
// Rounding to the 16-bit type is to nearest, ties to even; NaN stays NaN (quiet); overflow
// gives inf. These feed the float32 kernel through per-thread chunks (cross_entropy_half.cpp).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernel_table.hpp"

#include "isa_ns.hpp"

namespace fastxent {
namespace FASTXENT_ISA_NS {

inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float f16_to_f32_scalar(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  if (exp == 0x1fu) return bits_f32(sign | 0x7f800000u | (mant << 13));  // inf, NaN
  if (exp == 0) {
    if (mant == 0) return bits_f32(sign);
    // Subnormal: mant * 2^-24, exact in float.
    const float v = float(mant) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  return bits_f32(sign | ((exp + 112u) << 23) | (mant << 13));
}

inline uint16_t f32_to_f16_scalar(float f) {
  uint32_t x = f32_bits(f);
  const uint16_t sign = uint16_t((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x > 0x7f800000u) return uint16_t(sign | 0x7e00u | ((x >> 13) & 0x3ffu));  // NaN, quiet
  if (x >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // >= 65520 (or inf) rounds to inf
  if (x < 0x38800000u) {
    // Subnormal half: round |f| / 2^-24 to an integer, ties to even (the FPU's default mode).
    const float a = bits_f32(x) * 16777216.0f;
    return uint16_t(sign | uint16_t(std::nearbyint(a)));
  }
  const uint32_t r = x + 0x0fffu + ((x >> 13) & 1u) - 0x38000000u;
  return uint16_t(sign | (r >> 13));
}

inline float bf16_to_f32_scalar(uint16_t h) { return bits_f32(uint32_t(h) << 16); }

inline uint16_t f32_to_bf16_scalar(float f) {
  const uint32_t x = f32_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return uint16_t((x >> 16) | 0x40u);  // NaN, quiet
  return uint16_t((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

template <class V>
struct Half {
  static constexpr int64_t W = V::W;

  static void to_f32(const uint16_t* src, float* dst, int64_t n, Storage storage) {
    int64_t i = 0;
    if constexpr (V::kHasHalf) {
      if (storage == Storage::Float16) {
        for (; i + W <= n; i += W) V::store(dst + i, V::load_f16(src + i));
      } else {
        for (; i + W <= n; i += W) V::store(dst + i, V::load_bf16(src + i));
      }
    }
    for (; i < n; ++i)
      dst[i] = storage == Storage::Float16 ? f16_to_f32_scalar(src[i]) : bf16_to_f32_scalar(src[i]);
  }

  static void from_f32(const float* src, uint16_t* dst, int64_t n, Storage storage) {
    int64_t i = 0;
    if constexpr (V::kHasHalf) {
      if (storage == Storage::Float16) {
        for (; i + W <= n; i += W) V::store_f16(dst + i, V::load(src + i));
      } else {
        for (; i + W <= n; i += W) V::store_bf16(dst + i, V::load(src + i));
      }
    }
    for (; i < n; ++i)
      dst[i] = storage == Storage::Float16 ? f32_to_f16_scalar(src[i]) : f32_to_bf16_scalar(src[i]);
  }
};

}  // namespace FASTXENT_ISA_NS
}  // namespace fastxent
