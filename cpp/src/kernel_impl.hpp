// The row kernel, written once over a vector-traits type (VF for float, VD for double) and
// compiled once per ISA: each isa_*.cpp defines FASTXENT_ISA_NS, includes its traits header
// and then this file, so every symbol here lives in an ISA-specific namespace (an inline
// function compiled with AVX-512 flags can never be picked by the linker for an AVX2 caller).
//
// Precision policy
// - max: exact (in the storage type).
// - exp(z - m): polynomial in the storage type (below), after Cody-Waite range reduction
//   x = n ln2 + r, |r| <= ln2/2. float: degree 6, max error 1.3 ULP; double: Taylor to
//   degree 13, max error 1.0 ULP (both measured over [ln(min normal), 0] by
//   tests/cpp/test_kernel.cpp, which fails above 2 ULP). Results below the smallest normal
//   (x < ln(FLT_MIN) = -87.34, or ln(DBL_MIN) = -708.4) flush to +0. Domain x <= 0 (the
//   kernel only feeds z - max). NaN propagates.
// - sums of exp and of w*(z - m): vector accumulators in the storage type over chunks of
//   32 W elements (16 additions per lane), each chunk's total added into a double; blocks
//   (kBlock) and rows are merged in double.
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


template <class T>
struct ExpConst;

template <>
struct ExpConst<float> {
  static constexpr float lo = -87.33654475f;  // ln(2^-126): below, the result flushes to 0
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
// garbage in the range reduction, which the final select replaces by +0.
template <class V>
inline typename V::R vexp(typename V::R x) {
  using T = typename V::T;
  using K = ExpConst<T>;
  typename V::R t = V::fmadd(x, V::set1(K::log2e), V::set1(K::magic));
  typename V::R n = V::sub(t, V::set1(K::magic));
  typename V::R r = V::fmadd(n, V::set1(-K::ln2_hi), x);
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

  // One vector step of the exp pass over lanes [0, len) (len < W only at the block's tail):
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
  static BlockStat block_impl(const T* z, T* e, int64_t n, const T* w) {
    const T m = max(z, n);
    if (m == -std::numeric_limits<T>::infinity()) return degenerate<STORE>(z, e, n, w);
    const R vm = V::set1(m);
    double sum = 0.0, wd = 0.0;
    // Chunks of kChunk elements: two float accumulators of W lanes each take 16 additions
    // per lane at most before the chunk's total moves into a double, so the float
    // accumulation error stays below 16 u of the chunk's sum whatever the block length.
    constexpr int64_t kChunk = 32 * W;
    for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
      const int64_t c1 = c0 + kChunk < n ? c0 + kChunk : n;
      R s0 = V::set1(T(0)), s1 = s0, d0 = s0, d1 = s0;
      int64_t i = c0;
      for (; i + 2 * W <= c1; i += 2 * W) {
        // The next block streams in from memory while this one is computed from L1.
        __builtin_prefetch(z + i + kBlock, 0, 2);
        step<STORE, WD>(z + i, STORE ? e + i : e, WD == 2 ? w + i : w, vm, s0, d0, W);
        step<STORE, WD>(z + i + W, STORE ? e + i + W : e, WD == 2 ? w + i + W : w, vm, s1, d1, W);
      }
      for (; i < c1; i += W)
        step<STORE, WD>(z + i, STORE ? e + i : e, WD == 2 ? w + i : w, vm, s0, d0, c1 - i);
      sum += V::hsum(V::add(s0, s1));
      if constexpr (WD != 0) wd += V::hsum(V::add(d0, d1));
    }
    return BlockStat{double(m), sum, wd};
  }

  // A block whose max is -inf: every entry is -inf, or NaN hides among -inf entries. Rare;
  // scalar. wd is the raw sum_c w_c z_c here (the caller cannot shift by a -inf max).
  template <bool STORE>
  static BlockStat degenerate(const T* z, T* e, int64_t n, const T* w) {
    bool nan = false;
    double wz = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      nan |= z[i] != z[i];
      wz += (w ? double(w[i]) : 1.0) * double(z[i]);
      if constexpr (STORE) e[i] = z[i] != z[i] ? z[i] : T(0);
    }
    return {-std::numeric_limits<double>::infinity(),
            nan ? std::numeric_limits<double>::quiet_NaN() : 0.0, wz};
  }

  template <bool STORE>
  static BlockStat block_wd(const T* z, T* e, int64_t n, const T* w, bool want_wd) {
    if (!want_wd) return block_impl<STORE, 0>(z, e, n, w);
    if (w == nullptr) return block_impl<STORE, 1>(z, e, n, w);
    return block_impl<STORE, 2>(z, e, n, w);
  }

  static BlockStat block(const T* z, T* e, int64_t n, const T* w, bool want_wd) {
    return e ? block_wd<true>(z, e, n, w, want_wd) : block_wd<false>(z, e, n, w, want_wd);
  }

  template <bool WEIGHTED, bool STREAM>
  static void affine_impl(const T* e, T* g, int64_t n, T a, T b, const T* w) {
    const R va = V::set1(a), vb = V::set1(b);
    auto f = [&](int64_t i, int64_t len) {
      const bool full = len >= W;
      R ev = full ? V::load(e + i) : V::load_partial(e + i, len, T(0));
      if constexpr (WEIGHTED) {
        R wv = full ? V::load(w + i) : V::load_partial(w + i, len, T(0));
        return V::sub(V::mul(ev, va), V::mul(vb, wv));
      } else {
        return V::sub(V::mul(ev, va), vb);
      }
    };
    int64_t i = 0;
    if constexpr (STREAM) {
      // Non-temporal stores need aligned addresses: a masked head up to the alignment.
      const int64_t mis = int64_t(reinterpret_cast<uintptr_t>(g) % (W * sizeof(T)));
      if (mis % int64_t(sizeof(T)) == 0 && mis != 0) {
        const int64_t head = W - mis / int64_t(sizeof(T));
        const int64_t len = head < n ? head : n;
        V::store_partial(g, f(0, len), len);
        i = len;
      }
      if (reinterpret_cast<uintptr_t>(g + i) % (W * sizeof(T)) == 0) {
        for (; i + W <= n; i += W) V::stream(g + i, f(i, W));
      }
    }
    for (; i + 2 * W <= n; i += 2 * W) {
      R g0 = f(i, W), g1 = f(i + W, W);
      V::store(g + i, g0);
      V::store(g + i + W, g1);
    }
    for (; i + W <= n; i += W) V::store(g + i, f(i, W));
    if (i < n) V::store_partial(g + i, f(i, n - i), n - i);
  }

  static void affine(const T* e, T* g, int64_t n, T a, T b, const T* w, bool stream) {
    if (stream) {
      if (w) affine_impl<true, true>(e, g, n, a, b, w); else affine_impl<false, true>(e, g, n, a, b, w);
    } else {
      if (w) affine_impl<true, false>(e, g, n, a, b, w); else affine_impl<false, false>(e, g, n, a, b, w);
    }
  }

  static RowFns<T> fns() { return {&Row::block, &Row::affine}; }
};

inline KernelTable make_table(const char* name) {
  return {name, Row<VF>::fns(), Row<VD>::fns(), &V_fence};
}

}  // namespace FASTXENT_ISA_NS
}  // namespace fastxent
