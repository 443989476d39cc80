// Sigmoid cross-entropy kernels, written once over the vector traits (see kernel_impl.hpp).
//
// Per element, with A = 1 - y, B = p y (p = pos_weight), e = exp(-|x|) in [0, 1]:
//   loss = (1 - y) x + (A + B) softplus(-x) = P x + (A + B) log1p(e),
//   grad = (A + B) sigmoid(x) - B = (P - Q e) / (1 + e),
// with (P, Q) = (A, B) for x >= 0 and (-B, -A) for x < 0. P x >= 0 and (A + B) log1p(e) >= 0
// (for y in [0, 1], p >= 0): the loss is a sum of two non-negative terms with no
// cancellation, and exp only ever sees -|x| <= 0 (vexp's domain), so no finite input
// overflows into NaN. x = +-inf: e = 0, the gradient is P (finite); the loss is P x, which is
// +inf, or 0 when P = 0 (0 * inf := 0, the limit). A weight of 0 likewise zeroes an infinite
// loss. NaN in x, y, p or w propagates to the loss and the gradient.
//
// Precision, measured by tests/cpp/test_sigmoid.cpp against long double (scalar and AVX2;
// AVX-512 runs the same operation sequence): log1p01 on a 2^20-point grid of [0, 1] plus a
// geometric one down to the smallest normal: max 1.19 ULP (float), 1.11 ULP (double).
// Element-wise over x in +-[1e-4, 100], y in [0, 1], p in [0, 4]: loss max 3.4 ULP (relative:
// both terms are >= 0), gradient max 3.6 u relative to (1 - y) sigmoid(x) + p y sigmoid(-x)
// (the two terms it subtracts), float and double alike. Below: exp(-|x|) flushes to 0 under
// the smallest normal, so results under ~(1 + p) FLT_MIN may come out 0. Sums: vectors of
// the storage type over 16 vectors, then double.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "kernel_impl.hpp"
#include "kernel_log.hpp"
#include "sigmoid_table.hpp"

#include "isa_ns.hpp"

namespace fastxent {
namespace FASTXENT_ISA_NS {

template <class V>
struct Sigmoid {
  using T = typename V::T;
  using R = typename V::R;
  static constexpr int64_t W = V::W;

  static R loadn(const T* p, int64_t len, T fill) {
    return len >= W ? V::load(p) : V::load_partial(p, len, fill);
  }
  static void storen(T* p, R v, int64_t len) {
    if (len >= W) V::store(p, v);
    else V::store_partial(p, v, len);
  }
  // x < 0 ? a : b, exactly for finite a, b (-0 and NaN count as >= 0).
  static R sel_neg(R x, R a, R b) {
    const R zero = V::set1(T(0));
    return V::add(V::zero_if_less(x, zero, b), V::sub(a, V::zero_if_less(x, zero, a)));
  }
  // a * v, but 0 where a == 0 (so 0 * inf = 0). NaN in a stays NaN.
  static R mul0(R a, R v) {
    const R zero = V::set1(T(0));  // a == 0, not |a| < denorm_min (false for 0 under DAZ)
    return V::select_eq(a, zero, zero, V::mul(a, v));
  }

  template <bool HP, bool HW, bool LOSS, bool GRAD>
  static double seg_impl(const SigmoidSeg<T>& s) {
    const R zero = V::set1(T(0)), one = V::set1(T(1)), gs = V::set1(s.gscale);
    // Sums of 16 vectors in the storage type, then in double. For float, acc2 holds the same
    // sum times 2^-100 and stands in when acc overflowed (element losses near FLT_MAX), so
    // that "mean" stays finite where it should.
    constexpr bool kScaled = sizeof(T) == 4;
    double total = 0.0;
    R acc = zero, acc2 = zero;
    int pending = 0;
    auto flush = [&] {
      const double a = V::hsum(acc);
      total += !kScaled || std::isfinite(a) ? a : V::hsum(acc2) * 0x1p100;
      acc = acc2 = zero;
      pending = 0;
    };
    auto step = [&](int64_t i, int64_t len) {
      const R x = loadn(s.x + i, len, T(0)), y = loadn(s.y + i, len, T(0));
      const R e = vexp<V>(V::sub(zero, V::abs(x)));
      const R A = V::sub(one, y);
      const R B = HP ? V::mul(loadn(s.p + i, len, T(1)), y) : y;
      const R P = sel_neg(x, V::sub(zero, B), A);
      const R cl = V::mul(V::add(A, B), vlog1p01<V>(e));  // NaN if any input is NaN
      R l = V::add(mul0(P, x), cl);
      R w = one;
      if constexpr (HW) {
        w = loadn(s.w + i, len, T(1));
        l = V::add(mul0(w, l), V::mul(cl, zero));  // keeps a NaN that w = 0 would hide
      }
      if constexpr (GRAD) {
        const R Q = sel_neg(x, V::sub(zero, A), B);
        const R g = V::div(V::fmadd(V::sub(zero, Q), e, P), V::add(one, e));
        storen(s.grad + i, V::mul(g, HW ? V::mul(w, gs) : gs), len);  // after x was read
      }
      if constexpr (LOSS) storen(s.loss + i, l, len);
      if (len < W) l = V::keep_first(l, len);
      acc = V::add(acc, l);
      if constexpr (kScaled) acc2 = V::fmadd(l, V::set1(T(0x1p-100)), acc2);
      if (++pending == 16) flush();
    };
    int64_t i = 0;
    for (; i + 2 * W <= s.n; i += 2 * W) {
      step(i, W);
      step(i + W, W);
    }
    for (; i < s.n; i += W) step(i, s.n - i < W ? s.n - i : W);
    flush();
    return total;
  }

  template <bool HP, bool HW>
  static double seg_hw(const SigmoidSeg<T>& s) {
    if (s.grad) return s.loss ? seg_impl<HP, HW, true, true>(s) : seg_impl<HP, HW, false, true>(s);
    return s.loss ? seg_impl<HP, HW, true, false>(s) : seg_impl<HP, HW, false, false>(s);
  }
  static double seg(const SigmoidSeg<T>& s) {
    if (s.p) return s.w ? seg_hw<true, true>(s) : seg_hw<true, false>(s);
    return s.w ? seg_hw<false, true>(s) : seg_hw<false, false>(s);
  }

  static void log1p01(const T* e, T* out, int64_t n) {
    int64_t i = 0;
    for (; i + W <= n; i += W) V::store(out + i, vlog1p01<V>(V::load(e + i)));
    if (i < n) V::store_partial(out + i, vlog1p01<V>(V::load_partial(e + i, n - i, T(0))), n - i);
  }

  static SigmoidFns<T> fns() { return {&Sigmoid::seg, &Sigmoid::log1p01}; }
};

}  // namespace FASTXENT_ISA_NS
}  // namespace fastxent
