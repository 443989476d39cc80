// The row kernel, written once over a vector-traits type (VF for float, VD for double) and
// compiled once per ISA: each isa_*.cpp defines FASTXENT_ISA_NS, includes its traits header
// and then this file, so every symbol here lives in an ISA-specific namespace (an inline
// function compiled with AVX-512 flags can never be picked by the linker for an AVX2 caller).
//
// Precision policy
// - max: exact (in the storage type).
// - exp(z - m): polynomial in the storage type (below). float: Cephes-style degree-7 minimax
//   on |r| <= ln2/2 after Cody-Waite range reduction, max relative error 2 ULP (measured in
//   tests/cpp against double exp: see test_kernel.cpp); double: Taylor to degree 13, < 2 ULP.
//   Results below the smallest normal (x < ln(FLT_MIN) = -87.34, or ln(DBL_MIN) = -708.4)
//   flush to +0; inputs above 88 (709 for double) are clamped (the kernel only feeds x <= 0).
//   NaN propagates.
// - sums of exp and of w*(z - m): vector accumulators in the storage type within blocks of
//   kBlock elements, each block's total added into a double. The per-element float error
//   therefore never compounds over more than kBlock / (2 W) additions per lane.
// - gradient: a * e - b * w in the storage type with a, b computed in double and rounded once.
//   The driver recomputes the target-class entry in double (see cross_entropy.cpp).
//
// Expects the traits VF, VD of the same namespace to be declared first.

#include <cstdint>
#include <limits>

#include "kernel_table.hpp"

#ifndef FASTXENT_ISA_NS
#error "define FASTXENT_ISA_NS (the ISA namespace) before including this header"
#endif

namespace fastxent {
namespace FASTXENT_ISA_NS {

// Block length for the float -> double hand-off of sums. A multiple of 4 * W for every ISA.
constexpr int64_t kBlock = 2048;

template <class T>
struct ExpConst;

template <>
struct ExpConst<float> {
  static constexpr float lo = -87.33654475f;  // ln(2^-126): below, the result flushes to 0
  static constexpr float hi = 88.0f;          // keeps round(x / ln2) <= 127
  static constexpr float log2e = 1.44269504088896341f;
  static constexpr float ln2_hi = 0.693359375f;
  static constexpr float ln2_lo = -2.12194440e-4f;
  static constexpr float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  static constexpr uint32_t bias = 127;
  static constexpr int shift = 23;
};

template <>
struct ExpConst<double> {
  static constexpr double lo = -708.3964185322641;  // ln(2^-1022)
  static constexpr double hi = 709.0;
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
    // 1 + r + r^2 * P(r), P degree 5 (Cephes expf coefficients).
    typename V::R p = V::set1(1.9875691500e-4f);
    p = V::fmadd(p, r, V::set1(1.3981999507e-3f));
    p = V::fmadd(p, r, V::set1(8.3334519073e-3f));
    p = V::fmadd(p, r, V::set1(4.1665795894e-2f));
    p = V::fmadd(p, r, V::set1(1.6666665459e-1f));
    p = V::fmadd(p, r, V::set1(5.0000001201e-1f));
    typename V::R r2 = V::mul(r, r);
    return V::fmadd(p, r2, V::add(r, V::set1(1.0f)));
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

template <class V>
inline typename V::R vexp(typename V::R x) {
  using T = typename V::T;
  using K = ExpConst<T>;
  // max/min with x second: x86 returns the second operand when either is NaN, so NaN survives.
  typename V::R xc = V::min(V::set1(K::hi), V::max(V::set1(K::lo), x));
  typename V::R t = V::fmadd(xc, V::set1(K::log2e), V::set1(K::magic));
  typename V::R n = V::sub(t, V::set1(K::magic));
  typename V::R r = V::fmadd(n, V::set1(-K::ln2_hi), xc);
  r = V::fmadd(n, V::set1(-K::ln2_lo), r);
  typename V::R y = V::mul(exp_poly<V>(r), V::pow2_from_magic(t, K::bias, K::shift));
  return V::zero_if_less(x, V::set1(K::lo), y);
}

template <class V>
struct Row {
  using T = typename V::T;
  using R = typename V::R;
  static constexpr int64_t W = V::W;

  static T max(const T* z, int64_t n) {
    const T ninf = -std::numeric_limits<T>::infinity();
    R a0 = V::set1(ninf), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = 0;
    for (; i + 4 * W <= n; i += 4 * W) {
      a0 = V::max(a0, V::load(z + i));
      a1 = V::max(a1, V::load(z + i + W));
      a2 = V::max(a2, V::load(z + i + 2 * W));
      a3 = V::max(a3, V::load(z + i + 3 * W));
    }
    for (; i + W <= n; i += W) a0 = V::max(a0, V::load(z + i));
    if (i < n) a1 = V::max(a1, V::load_partial(z + i, n - i, ninf));
    return V::hmax(V::max(V::max(a0, a1), V::max(a2, a3)));
  }

  // One vector step of the exp pass over lanes [0, len) (len < W only at the row's tail):
  // e = exp(z - m) (stored when STORE); s += e; d += w * (z - m) when WD (1: w = 1, 2: w given).
  template <bool STORE, int WD>
  static inline void step(const T* z, T* e, const T* w, R vm, R& s, R& d, int64_t len) {
    const bool full = len >= W;
    // Masked-off lanes are set to x = 0 and their exp to 0, so they add nothing to the sums.
    R x = V::sub(full ? V::load(z) : V::load_partial(z, len, T(0)), vm);
    if (!full) x = V::keep_first(x, len);
    R y = vexp<V>(x);
    if (!full) y = V::keep_first(y, len);
    if constexpr (STORE) {
      if (full) V::store(e, y); else V::store_partial(e, y, len);
    }
    s = V::add(s, y);
    if constexpr (WD == 1) d = V::add(d, x);
    if constexpr (WD == 2) d = V::fmadd(full ? V::load(w) : V::load_partial(w, len, T(0)), x, d);
  }

  template <bool STORE, int WD>
  static ExpSum exp_sum_impl(const T* z, T* e, int64_t n, T m, const T* w) {
    const R vm = V::set1(m);
    double sum = 0.0, wd = 0.0;
    for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
      const int64_t b1 = b0 + kBlock < n ? b0 + kBlock : n;
      R s0 = V::set1(T(0)), s1 = s0, d0 = s0, d1 = s0;
      int64_t i = b0;
      for (; i + 2 * W <= b1; i += 2 * W) {
        step<STORE, WD>(z + i, STORE ? e + i : e, WD == 2 ? w + i : w, vm, s0, d0, W);
        step<STORE, WD>(z + i + W, STORE ? e + i + W : e, WD == 2 ? w + i + W : w, vm, s1, d1, W);
      }
      for (; i < b1; i += W)
        step<STORE, WD>(z + i, STORE ? e + i : e, WD == 2 ? w + i : w, vm, s0, d0, b1 - i);
      sum += V::hsum(V::add(s0, s1));
      if constexpr (WD != 0) wd += V::hsum(V::add(d0, d1));
    }
    return {sum, wd};
  }

  template <bool STORE>
  static ExpSum exp_sum_wd(const T* z, T* e, int64_t n, T m, const T* w, bool want_wd) {
    if (!want_wd) return exp_sum_impl<STORE, 0>(z, e, n, m, w);
    if (w == nullptr) return exp_sum_impl<STORE, 1>(z, e, n, m, w);
    return exp_sum_impl<STORE, 2>(z, e, n, m, w);
  }

  static ExpSum exp_sum(const T* z, T* e, int64_t n, T m, const T* w, bool want_wd) {
    return e ? exp_sum_wd<true>(z, e, n, m, w, want_wd) : exp_sum_wd<false>(z, e, n, m, w, want_wd);
  }

  template <bool WEIGHTED>
  static void affine_impl(const T* e, T* g, int64_t n, T a, T b, const T* w) {
    const R va = V::set1(a), vb = V::set1(b);
    auto f = [&](int64_t i, R ev) {
      if constexpr (WEIGHTED) {
        return V::sub(V::mul(ev, va), V::mul(vb, V::load(w + i)));
      } else {
        return V::sub(V::mul(ev, va), vb);
      }
    };
    int64_t i = 0;
    for (; i + 2 * W <= n; i += 2 * W) {
      R g0 = f(i, V::load(e + i));
      R g1 = f(i + W, V::load(e + i + W));
      V::store(g + i, g0);
      V::store(g + i + W, g1);
    }
    for (; i + W <= n; i += W) V::store(g + i, f(i, V::load(e + i)));
    if (i < n) {
      const int64_t len = n - i;
      R ev = V::load_partial(e + i, len, T(0));
      R gv;
      if constexpr (WEIGHTED) {
        gv = V::sub(V::mul(ev, va), V::mul(vb, V::load_partial(w + i, len, T(0))));
      } else {
        gv = V::sub(V::mul(ev, va), vb);
      }
      V::store_partial(g + i, gv, len);
    }
  }

  static void affine(const T* e, T* g, int64_t n, T a, T b, const T* w) {
    if (w) affine_impl<true>(e, g, n, a, b, w); else affine_impl<false>(e, g, n, a, b, w);
  }

  static RowFns<T> fns() { return {&Row::max, &Row::exp_sum, &Row::affine}; }
};

inline KernelTable make_table(const char* name) {
  return {name, Row<VF>::fns(), Row<VD>::fns()};
}

}  // namespace FASTXENT_ISA_NS
}  // namespace fastxent
