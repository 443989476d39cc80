// Portable "vector" of one lane: the scalar fallback runs the same kernel and the same exp
// polynomial as the SIMD paths, so every ISA has the same precision policy.
// Lives in namespace fastxent::FASTXENT_ISA_NS (see isa_scalar.cpp).
#pragma once

#include <cstdint>
#include <cmath>
#include <cstring>

#include "isa_ns.hpp"

namespace fastxent {
namespace FASTXENT_ISA_NS {

inline void V_fence() {}

template <class T_, class Bits_>
struct VecScalar {
  using T = T_;
  using R = T_;
  static constexpr int64_t W = 1;
  static constexpr bool kHasHalf = false;  // conversions are the scalar helpers of half_impl.hpp
  static R load(const T* p) { return *p; }
  // Never called with W == 1 (no tail shorter than a vector), but keeps the interface whole.
  static R load_partial(const T* p, int64_t n, T fill) { return n > 0 ? *p : fill; }
  static void store(T* p, R v) { *p = v; }
  static void store_partial(T* p, R v, int64_t n) {
    if (n > 0) *p = v;
  }
  static R keep_first(R v, int64_t n) { return n > 0 ? v : R(0); }
  static void stream(T* p, R v) { *p = v; }  // plain store: no portable streaming store
  static R set1(T v) { return v; }
  static R add(R a, R b) { return a + b; }
  static R sub(R a, R b) { return a - b; }
  static R mul(R a, R b) { return a * b; }
  static R fmadd(R a, R b, R c) { return a * b + c; }
  static R fmsub(R a, R b, R c) { return a * b - c; }   // a b - c
  static R fnmadd(R a, R b, R c) { return c - a * b; }  // c - a b
  // x86 semantics: the second operand is returned when either is NaN.
  static R max(R a, R b) { return a > b ? a : b; }
  static R abs(R a) { return std::fabs(a); }
  static R div(R a, R b) { return a / b; }
  static R copysign(R mag, R sgn) { return std::copysign(mag, sgn); }
  static R min(R a, R b) { return a < b ? a : b; }
  // x where a == b, else y.
  static R select_eq(R a, R b, R x, R y) { return a == b ? x : y; }
  // 0 where x < lo (ordered), else v.
  static R zero_if_less(R x, R lo, R v) { return x < lo ? T(0) : v; }
  // t holds round(n) + magic in its low mantissa bits: shift (bits(t) + bias) into the exponent.
  static R pow2_from_magic(R t, Bits_ bias, int shift) {
    Bits_ b;
    std::memcpy(&b, &t, sizeof b);
    b = static_cast<Bits_>((b + bias) << shift);
    R r;
    std::memcpy(&r, &b, sizeof r);
    return r;
  }
  static double hsum(R v) { return static_cast<double>(v); }
  static T hmax(R v) { return v; }
};

using VF = VecScalar<float, uint32_t>;
using VD = VecScalar<double, uint64_t>;

}  // namespace FASTXENT_ISA_NS
}  // namespace fastxent
