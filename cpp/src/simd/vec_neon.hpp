// AArch64 AdvSIMD (NEON) traits: 4 floats / 2 doubles per register. AdvSIMD, including the
// float16 conversions, is baseline on every aarch64 CPU: no extra compiler flags.
// Lives in namespace fastxent::FASTXENT_ISA_NS (see isa_neon.cpp).
//
// Semantics are those of the x86 traits (vec_avx2.hpp), lane for lane:
// - fmadd / fmsub / fnmadd are fused (vfmaq / vfmsq), one rounding, like the explicit x86 FMAs;
// - max / min return the second operand when either is NaN or both are equal (x86 maxps and
//   minps, and the scalar build's a > b ? a : b), not the NaN-propagating vmaxq / vminq;
// - comparisons are ordered (a NaN compares false), as _CMP_EQ_OQ / _CMP_LT_OQ;
// - no masked loads: a tail goes through a stack buffer, so no byte past the end is touched;
// - stream is a plain store (no non-temporal store worth having here); V_fence does nothing.
// Float16 rounding (vcvt_f16_f32) follows FPCR: round to nearest even, quiet NaN, IEEE format,
// which is every OS's default; bfloat16 rounds in integer registers like the AVX2 build.
#pragma once

#include <arm_neon.h>

#include <cstdint>
#include <cstring>

#include "isa_ns.hpp"

namespace fastxent {
namespace FASTXENT_ISA_NS {

inline void V_fence() {}

struct VF {
  using T = float;
  using R = float32x4_t;
  static constexpr int64_t W = 4;
  static constexpr bool kHasHalf = true;
  static R load_f16(const uint16_t* p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }
  static void store_f16(uint16_t* p, R v) { vst1_u16(p, vreinterpret_u16_f16(vcvt_f16_f32(v))); }
  // bfloat16 is the top half of a float: shift in; out, round to nearest even in the integer
  // bits (NaN forced quiet so rounding cannot carry it into inf).
  static R load_bf16(const uint16_t* p) {
    return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16));
  }
  static void store_bf16(uint16_t* p, R v) {
    const uint32x4_t x = vreinterpretq_u32_f32(v);
    const uint32x4_t lsb = vandq_u32(vshrq_n_u32(x, 16), vdupq_n_u32(1));
    const uint32x4_t r = vshrq_n_u32(vaddq_u32(vaddq_u32(x, vdupq_n_u32(0x7fff)), lsb), 16);
    const uint32x4_t qnan = vorrq_u32(vshrq_n_u32(x, 16), vdupq_n_u32(0x40));
    vst1_u16(p, vmovn_u32(vbslq_u32(vceqq_f32(v, v), r, qnan)));
  }
  static R load(const T* p) { return vld1q_f32(p); }
  static R load_partial(const T* p, int64_t n, T fill) {
    T tmp[W] = {fill, fill, fill, fill};
    std::memcpy(tmp, p, size_t(n) * sizeof(T));
    return vld1q_f32(tmp);
  }
  static void store(T* p, R v) { vst1q_f32(p, v); }
  static void store_partial(T* p, R v, int64_t n) {
    T tmp[W];
    vst1q_f32(tmp, v);
    std::memcpy(p, tmp, size_t(n) * sizeof(T));
  }
  static void stream(T* p, R v) { vst1q_f32(p, v); }
  static R keep_first(R v, int64_t n) {
    static const int32_t idx[W] = {0, 1, 2, 3};
    const uint32x4_t keep = vcltq_s32(vld1q_s32(idx), vdupq_n_s32(int32_t(n)));
    return vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(v), keep));
  }
  static R set1(T v) { return vdupq_n_f32(v); }
  static R add(R a, R b) { return vaddq_f32(a, b); }
  static R sub(R a, R b) { return vsubq_f32(a, b); }
  static R mul(R a, R b) { return vmulq_f32(a, b); }
  static R fmadd(R a, R b, R c) { return vfmaq_f32(c, a, b); }             // a b + c
  static R fmsub(R a, R b, R c) { return vfmaq_f32(vnegq_f32(c), a, b); }  // a b - c
  static R fnmadd(R a, R b, R c) { return vfmsq_f32(c, a, b); }            // c - a b
  static R max(R a, R b) { return vbslq_f32(vcgtq_f32(a, b), a, b); }
  static R min(R a, R b) { return vbslq_f32(vcltq_f32(a, b), a, b); }
  static R abs(R a) { return vabsq_f32(a); }
  static R div(R a, R b) { return vdivq_f32(a, b); }
  static R copysign(R mag, R sgn) { return vbslq_f32(vdupq_n_u32(0x80000000u), sgn, mag); }
  static R select_eq(R a, R b, R x, R y) { return vbslq_f32(vceqq_f32(a, b), x, y); }
  static R zero_if_less(R x, R lo, R v) {
    return vreinterpretq_f32_u32(vbicq_u32(vreinterpretq_u32_f32(v), vcltq_f32(x, lo)));
  }
  static R pow2_from_magic(R t, uint32_t bias, int shift) {
    const uint32x4_t b = vaddq_u32(vreinterpretq_u32_f32(t), vdupq_n_u32(bias));
    return vreinterpretq_f32_u32(vshlq_u32(b, vdupq_n_s32(shift)));
  }
  // In double, as the AVX2 build: (lane 0 + lane 2) + (lane 1 + lane 3).
  static double hsum(R v) {
    const float64x2_t s = vaddq_f64(vcvt_f64_f32(vget_low_f32(v)), vcvt_high_f64_f32(v));
    return vgetq_lane_f64(s, 0) + vgetq_lane_f64(s, 1);
  }
  static T hmax(R v) {
    const float32x2_t lo = vget_low_f32(v), hi = vget_high_f32(v);
    const float32x2_t h = vbsl_f32(vcgt_f32(lo, hi), lo, hi);
    const float a = vget_lane_f32(h, 0), b = vget_lane_f32(h, 1);
    return a > b ? a : b;
  }
};

struct VD {
  using T = double;
  using R = float64x2_t;
  static constexpr int64_t W = 2;
  static constexpr bool kHasHalf = false;
  static R load(const T* p) { return vld1q_f64(p); }
  static R load_partial(const T* p, int64_t n, T fill) {
    T tmp[W] = {fill, fill};
    std::memcpy(tmp, p, size_t(n) * sizeof(T));
    return vld1q_f64(tmp);
  }
  static void store(T* p, R v) { vst1q_f64(p, v); }
  static void store_partial(T* p, R v, int64_t n) {
    T tmp[W];
    vst1q_f64(tmp, v);
    std::memcpy(p, tmp, size_t(n) * sizeof(T));
  }
  static void stream(T* p, R v) { vst1q_f64(p, v); }
  static R keep_first(R v, int64_t n) {
    static const int64_t idx[W] = {0, 1};
    const uint64x2_t keep = vcltq_s64(vld1q_s64(idx), vdupq_n_s64(n));
    return vreinterpretq_f64_u64(vandq_u64(vreinterpretq_u64_f64(v), keep));
  }
  static R set1(T v) { return vdupq_n_f64(v); }
  static R add(R a, R b) { return vaddq_f64(a, b); }
  static R sub(R a, R b) { return vsubq_f64(a, b); }
  static R mul(R a, R b) { return vmulq_f64(a, b); }
  static R fmadd(R a, R b, R c) { return vfmaq_f64(c, a, b); }
  static R fmsub(R a, R b, R c) { return vfmaq_f64(vnegq_f64(c), a, b); }
  static R fnmadd(R a, R b, R c) { return vfmsq_f64(c, a, b); }
  static R max(R a, R b) { return vbslq_f64(vcgtq_f64(a, b), a, b); }
  static R min(R a, R b) { return vbslq_f64(vcltq_f64(a, b), a, b); }
  static R abs(R a) { return vabsq_f64(a); }
  static R div(R a, R b) { return vdivq_f64(a, b); }
  static R copysign(R mag, R sgn) { return vbslq_f64(vdupq_n_u64(0x8000000000000000u), sgn, mag); }
  static R select_eq(R a, R b, R x, R y) { return vbslq_f64(vceqq_f64(a, b), x, y); }
  static R zero_if_less(R x, R lo, R v) {
    return vreinterpretq_f64_u64(vbicq_u64(vreinterpretq_u64_f64(v), vcltq_f64(x, lo)));
  }
  static R pow2_from_magic(R t, uint64_t bias, int shift) {
    const uint64x2_t b = vaddq_u64(vreinterpretq_u64_f64(t), vdupq_n_u64(bias));
    return vreinterpretq_f64_u64(vshlq_u64(b, vdupq_n_s64(shift)));
  }
  static double hsum(R v) { return vgetq_lane_f64(v, 0) + vgetq_lane_f64(v, 1); }
  static T hmax(R v) {
    const double a = vgetq_lane_f64(v, 0), b = vgetq_lane_f64(v, 1);
    return a > b ? a : b;
  }
};

}  // namespace FASTXENT_ISA_NS
}  // namespace fastxent
