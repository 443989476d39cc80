// The exp and the SIMD math built on it: ExpConst, exp_poly, vexp (exp(x) for x <= 0, over
// any vector traits) and vsoftcap_rho (the softcap's logistic).
//
// Precision:
// - exp(z - m): polynomial in the storage type (below), after Cody-Waite range reduction
//   x = n ln2 + r, |r| <= ln2/2. float: degree 6, max error 1.3 ULP; double: Taylor to
//   degree 13, max error 1.0 ULP. AVX-512 float: n in sixteenths, |r| <= ln2/32, a 16-entry
//   table of 2^(j/16) and degree 3, max error 1.05 ULP (two fewer multiply-adds; see vexp).
//   All measured over [ln(min normal), 0] by tests/cpp/test_kernel.cpp, which fails above
//   2 ULP. Results below the smallest normal (x < ln(FLT_MIN) = -87.34, or ln(DBL_MIN) =
//   -708.4) flush to +0. Domain x <= 0 (the kernel only feeds z - max). NaN propagates.
#pragma once

#include <cstdint>

#include "kernel_caps.hpp"

#ifndef FASTXENT_ISA_NS
#error "define FASTXENT_ISA_NS (the ISA namespace) before including this header"
#endif

namespace fastxent {
namespace FASTXENT_ISA_NS {

template <class T>
struct ExpConst;

template <>
struct ExpConst<float> {
  static constexpr float lo = -87.33654475f;  // ln(2^-126): below, the result flushes to 0
  static constexpr float log2e = 1.44269504088896341f;
  static constexpr float ln2_hi = 0.693359375f;
  static constexpr float ln2_lo = -2.12194440e-4f;
  static constexpr float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  static constexpr float magic16 = 786432.0f;  // 1.5 * 2^19: rounds to a multiple of 1/16
  static constexpr uint32_t bias = 127;
  static constexpr int shift = 23;
};

template <>
struct ExpConst<double> {
  static constexpr double lo = -708.3964185322641;  // ln(2^-1022)
  static constexpr double log2e = 1.4426950408889634074;
  static constexpr double ln2_hi = 6.93147180369123816490e-01;
  static constexpr double ln2_lo = 1.90821492927058770002e-10;
  static constexpr double magic = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr uint64_t bias = 1023;
  static constexpr int shift = 52;
};

// exp(r) on |r| <= ln2/2.
template <class V>
inline typename V::R exp_poly(typename V::R r) {
  using T = typename V::T;
  if constexpr (sizeof(T) == 4) {
    // 1 + r * P(r), P of degree 5: a fit of (exp(r) - 1) / r minimising the relative error
    // of the whole polynomial on |r| <= ln2/2 (2e-9 before float rounding). The constant
    // term is exactly 1, so exp(0) = 1 exactly: the row's max contributes exactly 1 to the sum.
    typename V::R p = V::set1(1.3843652559444308e-3f);
    p = V::fmadd(p, r, V::set1(8.374156430363655e-3f));
    p = V::fmadd(p, r, V::set1(4.166800156235695e-2f));
    p = V::fmadd(p, r, V::set1(1.6666431725025177e-1f));
    p = V::fmadd(p, r, V::set1(4.999999403953552e-1f));
    p = V::fmadd(p, r, V::set1(1.0f));
    return V::fmadd(p, r, V::set1(1.0f));
  } else {
    // Taylor series to r^13 / 13!: truncation < 4e-18 relative on |r| <= ln2/2.
    constexpr double c[] = {1.0 / 6227020800.0, 1.0 / 479001600.0, 1.0 / 39916800.0,
                            1.0 / 3628800.0,    1.0 / 362880.0,    1.0 / 40320.0,
                            1.0 / 5040.0,       1.0 / 720.0,       1.0 / 120.0,
                            1.0 / 24.0,         1.0 / 6.0,         0.5,
                            1.0,                1.0};
    typename V::R p = V::set1(c[0]);
    for (int k = 1; k < 14; ++k) p = V::fmadd(p, r, V::set1(c[k]));
    return p;
  }
}

// exp(x) for x <= 0 (the kernel feeds x = z - max). No clamping: inputs below lo produce
// garbage in the range reduction, which the final select replaces by +0. RANGED: the caller
// guarantees x in [lo, 88] (or NaN): no select (the softcap with a fixed shift).
template <class V, bool RANGED = false>
inline typename V::R vexp(typename V::R x) {
  using T = typename V::T;
  using K = ExpConst<T>;
  if constexpr (exp_table<V>()) {
    // x = n ln2 + r with n a multiple of 1/16 (magic16) and |r| <= ln2/32: exp(x) =
    // 2^floor(n) * T_j * exp(r), T_j = 2^(j/16), j = 16 (n - floor(n)) = the low 4 bits of t
    // (the table's index; vscalefps takes floor(n) itself). exp(r) = 1 + r q with
    // q = 1 + r/2 + r^2/6, and T_j exp(r) = T_j + (T_j r) q in one rounding. Error, in ULP
    // of the result: T_j's rounding <= 0.45 (T_0 = 1 is exact; for j >= 1 the result is in
    // [1, 2)), the final rounding 0.5, truncation <= 0.15: <= 1.1 (1.05 measured by the
    // kernel test; 1.07 at most over 2.5M points of [-87.3, 88], the softcap's range).
    // exp(0) = 1 exactly. Cost: 8 operations on the multiply-add pipes per vector instead of
    // 10 (plus one vpermps): the exp loop alone runs 17% faster on Zen 4 (0.150 vs 0.180 ns
    // per float, in cache). AVX2's vpermps has 8 entries: a 16-entry table would take two
    // and a blend, so the AVX2 and scalar kernels keep the degree-6 polynomial.
    const typename V::R t = V::fmadd(x, V::set1(K::log2e), V::set1(K::magic16));
    const typename V::R n = V::sub(t, V::set1(K::magic16));
    typename V::R r = V::fmadd(n, V::set1(-K::ln2_hi), x);
    r = V::fmadd(n, V::set1(-K::ln2_lo), r);
    const typename V::R tj = V::exp2_sixteenths(t);
    typename V::R q = V::fmadd(V::set1(T(1) / T(6)), r, V::set1(T(0.5)));
    q = V::fmadd(q, r, V::set1(T(1)));
    const typename V::R y = V::fmadd(V::mul(tj, r), q, tj);
    if constexpr (RANGED) return V::scale(y, n);
    else return V::scale_unless_below(y, n, x, V::set1(K::lo));
  }
  typename V::R t = V::fmadd(x, V::set1(K::log2e), V::set1(K::magic));
  typename V::R n = V::sub(t, V::set1(K::magic));
  typename V::R r = V::fmadd(n, V::set1(-K::ln2_hi), x);
  r = V::fmadd(n, V::set1(-K::ln2_lo), r);
  if constexpr (fused<V>()) {
    // One vscalefps (p * 2^n, exact) under a zero mask: the same bits as below.
    if constexpr (RANGED) return V::scale(exp_poly<V>(r), n);
    else return V::scale_unless_below(exp_poly<V>(r), n, x, V::set1(K::lo));
  } else {
    typename V::R y = V::mul(exp_poly<V>(r), V::pow2_from_magic(t, K::bias, K::shift));
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
