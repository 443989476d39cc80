// Logarithms over the vector traits (see kernel_impl.hpp): vlog1p01 (log1p on [0, 1], the
// sigmoid and distillation kernels' softplus) and vlog_ge1 (log on [1, 2^64)), and RowMath:
// the per-row log and exp of the column and short-row paths' finish, in double, vectorised
// across rows.
#pragma once

#include <cmath>
#include <cstdint>

#include "exp_coeffs.hpp"
#include "isa_ns.hpp"
#include "kernel_exp.hpp"

namespace fastxent {
namespace FASTXENT_ISA_NS {

// log1p(e) for e in [0, 1] (NaN propagates), as fdlibm's log but without its range reduction:
// s = e / (2 + e) in [0, 1/3], log1p(e) = 2 atanh(s) = e - (e^2/2 - s (e^2/2 + R(s^2))), with
// R(z) = z q(z), q a Chebyshev fit of (2 atanh(s)/s - 2)/z on z in [0, 1/9]: degree 4
// (fit error 7e-9) for float, 9 (9e-17) for double. e itself is exact in the leading term, so
// the relative error holds down to the smallest e.
template <class V>
inline typename V::R vlog1p01(typename V::R e) {
  using T = typename V::T;
  using R = typename V::R;
  const R ns = V::div(e, V::sub(V::set1(T(-2)), e));  // -s, exactly
  const R z = V::mul(ns, ns);
  R q;
  if constexpr (sizeof(T) == 4) {
    constexpr float c[] = {0.23224329948425293f, 0.2170657515525818f, 0.285923570394516f,
                           0.3999970555305481f, 0.6666666865348816f};
    q = V::set1(c[0]);
    for (int k = 1; k < 5; ++k) q = V::fmadd(q, z, V::set1(c[k]));
  } else {
    constexpr double c[] = {0.1616404561194353,  0.08800738486144674, 0.12001072809590713,
                            0.13314144209654935, 0.15385570064958623, 0.18181789436132859,
                            0.22222222717427864, 0.2857142856710876,  0.40000000000014585,
                            0.6666666666666666};
    q = V::set1(c[0]);
    for (int k = 1; k < 10; ++k) q = V::fmadd(q, z, V::set1(c[k]));
  }
  const R hfsq = V::mul(V::mul(e, e), V::set1(T(0.5)));
  const R inner = V::fmadd(ns, V::fmadd(q, z, hfsq), hfsq);  // e^2/2 - s (e^2/2 + R)
  return V::sub(e, inner);
}

// log(x) for x in [1, 2^64) (elsewhere the result is meaningless: the caller checks). The
// range reduction needs no bit manipulation: six compare-and-scale steps take x = 2^k (1 + f)
// to 1 + f in [1, 2) with k an integer in a double (each step multiplies by a power of two:
// exact), then log(x) = k ln2_hi + (k ln2_lo + log1p(f)), k ln2_hi exact (ln2_hi has 32
// significant bits, k <= 64). Max error, measured by tests/cpp/test_row_math.cpp against long
// double: see there (it fails above 2 ULP).
template <class V>
inline typename V::R vlog_ge1(typename V::R x) {
  static_assert(sizeof(typename V::T) == 8, "vlog_ge1: double lanes");
  using R = typename V::R;
  const R one = V::set1(1.0);
  R k = V::set1(0.0);
  constexpr double b[] = {32, 16, 8, 4, 2, 1};
  constexpr double pow_b[] = {0x1p32, 0x1p16, 0x1p8, 0x1p4, 0x1p2, 0x1p1};
  constexpr double inv_m1[] = {0x1p-32 - 1, 0x1p-16 - 1, 0x1p-8 - 1,  // 2^-b - 1, exact
                               0x1p-4 - 1,  0x1p-2 - 1,  0x1p-1 - 1};
  for (int i = 0; i < 6; ++i) {
    // t = 1 where x >= 2^b, else 0; x times 2^-b where t is 1.
    const R t = V::zero_if_less(x, V::set1(pow_b[i]), one);
    x = V::mul(x, V::fmadd(t, V::set1(inv_m1[i]), one));
    k = V::fmadd(t, V::set1(b[i]), k);
  }
  const R r = vlog1p01<V>(V::sub(x, one));  // x - 1 is exact on [1, 2)
  return V::fmadd(k, V::set1(exp_coeffs::kF64Ln2Hi),
                  V::fmadd(k, V::set1(exp_coeffs::kF64Ln2Lo), r));
}

// The per-row log and exp of the column and short-row paths (cross_entropy_cols.cpp), across
// rows, in double. out[i] = log(x[i]) / exp(x[i]) for every i: vectorised where x is in
// vlog_ge1's / vexp's domain (a row's sum of exponentials relative to its max is in [1, C];
// its target logit minus its max in [lo, 0], up to the rounding of a target transformed in
// double against a max transformed in T), by std::log / std::exp in the other lanes (rows of
// -inf, NaN, the softcap's fixed shift, those few ULP above 0), so that every value is
// defined.
template <class V>
struct RowMath {
  using R = typename V::R;
  static constexpr int64_t W = V::W;
  static_assert(sizeof(typename V::T) == 8, "RowMath: double lanes");

  template <class F, class In, class Fallback>
  static void each(const double* x, double* out, int64_t n, F f, In in, Fallback fb) {
    int64_t i = 0;
    for (; i + W <= n; i += W) V::store(out + i, f(V::load(x + i)));
    if (i < n) V::store_partial(out + i, f(V::load_partial(x + i, n - i, 0.0)), n - i);
    for (i = 0; i < n; ++i)
      if (!in(x[i])) out[i] = fb(x[i]);
  }
  static void log(const double* x, double* out, int64_t n) {
    each(
        x, out, n, [](R v) { return vlog_ge1<V>(v); },
        [](double v) { return v >= 1.0 && v < 0x1p64; }, [](double v) { return std::log(v); });
  }
  static void exp(const double* x, double* out, int64_t n) {
    each(
        x, out, n, [](R v) { return vexp<V>(v); },
        [](double v) { return v >= exp_coeffs::kF64Lo && v <= 0.0; },
        [](double v) { return std::exp(v); });
  }
};

}  // namespace FASTXENT_ISA_NS
}  // namespace fastxent
