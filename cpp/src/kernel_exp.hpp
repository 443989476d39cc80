// The exp and the SIMD math built on it, over any vector traits V (VF or VD of one ISA):
// vexp, the one entry point every kernel calls, which holds three exp variants named by
// algorithm (XNNPACK's convention: rr2 = Cody-Waite range reduction with ln 2 in two parts,
// pN = a degree-N polynomial, lut16 = after a 16-entry table) and picks one by type and
// traits, and vsoftcap_rho (the softcap's logistic). Every constant comes from exp_coeffs.hpp,
// which tools/gen_exp_coeffs.py generates. The variants are branches of vexp, not functions
// of their own: as functions they changed GCC's inlining of the kernels that call vexp.
//
//   variant    type    used by                           max error, ULP of the result
//   rr2-p6     float   scalar, AVX2 (no kExpTable)       1.341 scalar, 1.048 AVX2
//   lut16-p3   float   AVX-512 (traits with kExpTable)   1.066
//   taylor13   double  every ISA                         1.150 scalar, 0.869 AVX2 and AVX-512
//
// Measured by tests/cpp/test_exp_ulp.cpp (ctest cpp_exp_ulp) through each ISA's block pass:
// float over every float of [lo, -0], double over 16.8M sampled doubles of [lo, -0]; it fails
// above 2 ULP. The errors differ by ISA because the scalar traits multiply and add in two
// roundings where AVX2 and AVX-512 fuse them. Contract common to the three (vexp):
// - Valid range x in [lo, 0], lo = RN(ln of the smallest normal) (kF32Lo = -87.336548,
//   kF64Lo = -708.39642): the kernel only feeds x = z - max. With RANGED (the softcap's fixed
//   shift) the caller guarantees x in [lo, 88] (or NaN) instead, and no flush select is done;
//   (0, 88] is then measured only through the softcap tests (tests/cpp/test_kernel.cpp).
// - Flush: x < lo (-inf included) gives +0, never a subnormal (unless RANGED; x = lo itself
//   may give a subnormal). exp(+-0) = 1 exactly: the row's max contributes exactly 1 to the
//   sum. NaN gives NaN. No clamping: below lo the range reduction computes garbage, which the
//   final select replaces by +0.
#pragma once

#include <cstdint>

#include "exp_coeffs.hpp"
#include "isa_ns.hpp"
#include "kernel_caps.hpp"

namespace fastxent {
namespace FASTXENT_ISA_NS {

// The range reduction's constants by type (derivations in exp_coeffs.hpp).
template <class T>
struct ExpConst;

template <>
struct ExpConst<float> {
  static constexpr float lo = exp_coeffs::kF32Lo;
  static constexpr float log2e = exp_coeffs::kF32Log2e;
  static constexpr float ln2_hi = exp_coeffs::kF32Ln2Hi;
  static constexpr float ln2_lo = exp_coeffs::kF32Ln2Lo;
  static constexpr float magic = exp_coeffs::kF32Magic;
  static constexpr float magic16 = exp_coeffs::kF32Magic16;
  static constexpr uint32_t bias = 127;  // the exponent bias and the significand's width
  static constexpr int shift = 23;
};

template <>
struct ExpConst<double> {
  static constexpr double lo = exp_coeffs::kF64Lo;
  static constexpr double log2e = exp_coeffs::kF64Log2e;
  static constexpr double ln2_hi = exp_coeffs::kF64Ln2Hi;
  static constexpr double ln2_lo = exp_coeffs::kF64Ln2Lo;
  static constexpr double magic = exp_coeffs::kF64Magic;
  static constexpr uint64_t bias = 1023;
  static constexpr int shift = 52;
};

// The polynomial after rr2's range reduction: exp(r) on |r| <= ln2/2 (plus rounding).
template <class V>
inline typename V::R rr2_poly(typename V::R r) {
  using T = typename V::T;
  if constexpr (sizeof(T) == 4) {
    // rr2-p6: 1 + r P(r), P of degree 5 (exp_coeffs::kRr2P6_*, a relative-error minimax fit;
    // 1.7e-8 relative in exact arithmetic). P(0) = 1 exactly, so exp(0) = 1 exactly.
    namespace xc = exp_coeffs;
    typename V::R p = V::set1(xc::kRr2P6_0);
    p = V::fmadd(p, r, V::set1(xc::kRr2P6_1));
    p = V::fmadd(p, r, V::set1(xc::kRr2P6_2));
    p = V::fmadd(p, r, V::set1(xc::kRr2P6_3));
    p = V::fmadd(p, r, V::set1(xc::kRr2P6_4));
    p = V::fmadd(p, r, V::set1(xc::kRr2P6_5));
    return V::fmadd(p, r, V::set1(1.0f));
  } else {
    // taylor13: the Taylor series to r^13 / 13! (exp_coeffs::kTaylor13_*, RN(1/k!)):
    // truncation < 4e-18 relative on |r| <= ln2/2.
    namespace xc = exp_coeffs;
    constexpr double c[] = {xc::kTaylor13_0,  xc::kTaylor13_1, xc::kTaylor13_2,  xc::kTaylor13_3,
                            xc::kTaylor13_4,  xc::kTaylor13_5, xc::kTaylor13_6,  xc::kTaylor13_7,
                            xc::kTaylor13_8,  xc::kTaylor13_9, xc::kTaylor13_10, xc::kTaylor13_11,
                            xc::kTaylor13_12, xc::kTaylor13_13};
    typename V::R p = V::set1(c[0]);
    for (int k = 1; k < 14; ++k) p = V::fmadd(p, r, V::set1(c[k]));
    return p;
  }
}

// exp(x), x in [lo, 0] (RANGED: [lo, 88], no flush select): the variant for V (see the top).
template <class V, bool RANGED = false>
inline typename V::R vexp(typename V::R x) {
  using T = typename V::T;
  using K = ExpConst<T>;
  if constexpr (exp_table<V>()) {
    // lut16-p3 (float; traits with kExpTable: AVX-512). x = n ln2 + r with n a multiple of
    // 1/16 (magic16) and |r| <= ln2/32: exp(x) = 2^floor(n) T_j exp(r), T_j = 2^(j/16)
    // (exp_coeffs::kExp2Sixteenths_*, looked up by V::exp2_sixteenths), j = 16 (n - floor(n))
    // = the low 4 bits of t (vscalefps takes floor(n) itself). exp(r) = 1 + r q(r) with
    // q = 1 + r/2 + r^2/6 (exp_coeffs::kLut16P3_*), and T_j exp(r) = T_j + (T_j r) q in one
    // rounding. Error bound, in ULP of the result: T_j's rounding <= 0.45 (T_0 = 1 is exact;
    // for j >= 1 the result is in [1, 2)), the final rounding 0.5, truncation <= 0.15: <= 1.1.
    // Valid range [kF32Lo, 0] (RANGED: [kF32Lo, 88]). Max error 1.066 ULP (every float of
    // [kF32Lo, -0]). Flush, zero and NaN: see the top. Cost: 8 operations on the multiply-add
    // pipes per vector instead of rr2-p6's 10, plus one vpermps. AVX2's vpermps has 8
    // entries: a 16-entry table would take two and a blend, so AVX2 keeps rr2-p6.
    const typename V::R t = V::fmadd(x, V::set1(K::log2e), V::set1(K::magic16));
    const typename V::R n = V::sub(t, V::set1(K::magic16));
    typename V::R r = V::fmadd(n, V::set1(-K::ln2_hi), x);
    r = V::fmadd(n, V::set1(-K::ln2_lo), r);
    const typename V::R tj = V::exp2_sixteenths(t);
    namespace xc = exp_coeffs;
    typename V::R q = V::fmadd(V::set1(xc::kLut16P3_0), r, V::set1(xc::kLut16P3_1));
    q = V::fmadd(q, r, V::set1(xc::kLut16P3_2));
    const typename V::R y = V::fmadd(V::mul(tj, r), q, tj);
    if constexpr (RANGED) return V::scale(y, n);
    else return V::scale_unless_below(y, n, x, V::set1(K::lo));
  }
  // rr2-p6 (float; the scalar and AVX2 kernels) and taylor13 (double; every kernel).
  // rr2: x = n ln2 + r, n = round(x log2e) (adding magic rounds to an integer, kept in t's low
  // significand bits), r = (x - n ln2_hi) - n ln2_lo (n ln2_hi is exact), |r| <= ln2/2 plus
  // rounding; exp(x) = 2^n rr2_poly(r).
  // rr2-p6: valid range [kF32Lo, 0] (RANGED: [kF32Lo, 88]). Max error 1.341 ULP with the
  //   scalar traits, 1.048 ULP with AVX2's (every float of [kF32Lo, -0]).
  // taylor13: valid range [kF64Lo, 0] (RANGED: [kF64Lo, 88]). Max error 1.150 ULP with the
  //   scalar traits, 0.869 ULP with AVX2's and AVX-512's (16.8M doubles of [kF64Lo, -0], half
  //   spread evenly over the bit patterns, half over the values).
  // Flush, zero and NaN: see the top.
  typename V::R t = V::fmadd(x, V::set1(K::log2e), V::set1(K::magic));
  typename V::R n = V::sub(t, V::set1(K::magic));
  typename V::R r = V::fmadd(n, V::set1(-K::ln2_hi), x);
  r = V::fmadd(n, V::set1(-K::ln2_lo), r);
  if constexpr (fused<V>()) {
    // One vscalefps (p * 2^n, exact) under a zero mask: the same bits as below.
    if constexpr (RANGED) return V::scale(rr2_poly<V>(r), n);
    else return V::scale_unless_below(rr2_poly<V>(r), n, x, V::set1(K::lo));
  } else {
    typename V::R y = V::mul(rr2_poly<V>(r), V::pow2_from_magic(t, K::bias, K::shift));
    if constexpr (RANGED) return y;
    else return V::zero_if_less(x, V::set1(K::lo), y);
  }
}

// rho = 1 / (1 + exp(-|u|)), in [1/2, 1]: the softcap's tanh is |tanh(u / 2)| = 2 rho - 1 and
// its derivative 1 - tanh^2(u / 2) = 4 rho (1 - rho). exp(-|u|) <= 1 stays in vexp's domain.
// The caller passes u = 2 v (the 2 folded into its scale). rho carries about 1 ULP of 1/2, so
// 2 rho - 1 about 2 ULP of 1/2 = 1 ULP of 1 in absolute terms (below the ULP of cap tanh
// once multiplied by cap; relative error grows as |u| -> 0, where tanh(u / 2) ~ u / 2).
template <class V>
inline typename V::R vsoftcap_rho(typename V::R u) {
  using T = typename V::T;
  const typename V::R one = V::set1(T(1));
  if constexpr (fused<V>()) {
    // 1 + e is in [1, 2]: a reciprocal estimate refined once instead of the division.
    return V::recip12(V::add(one, vexp<V>(V::neg_abs(u))));
  } else {
    return V::div(one, V::add(one, vexp<V>(V::sub(V::set1(T(0)), V::abs(u)))));
  }
}

}  // namespace FASTXENT_ISA_NS
}  // namespace fastxent
