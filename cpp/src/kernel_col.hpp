// The column kernel (Col<V>): W rows at a time, one per lane, walking down the class axis;
// its statistics pass and its gradient pass. Reuses Row<V>'s per-element helpers.
#pragma once

#include <cstdint>
#include <limits>

#include "isa_ns.hpp"
#include "kernel_row.hpp"

namespace fastxent {
namespace FASTXENT_ISA_NS {

// The column kernel: W rows at a time, one per lane, walking down the class axis.
template <class V>
struct Col {
  using T = typename V::T;
  using R = typename V::R;
  static constexpr int64_t W = V::W;
  using Rw = Row<V>;

  // Float partial sums move into the per-lane doubles every kChunk classes (16 additions).
  static constexpr int64_t kChunk = 16;

  static void flush(R v, double* out, int64_t len) {
    T tmp[W];
    V::store(tmp, v);
    for (int64_t j = 0; j < len; ++j) out[j] += double(tmp[j]);
  }

  template <bool STORE, Transform TR, TargetSums WD, bool HAS_W, bool CAPTURE>
  static void group(const ColIn<T>& in, int64_t i0, int64_t len) {
    const int64_t C = in.C, ld = in.ld;
    const T ninf = -std::numeric_limits<T>::infinity();
    R m = V::set1(TR == Transform::SoftcapFixedShift ? T(0) : ninf);
    // CAPTURE: zy = z[y] per lane (see ColIn::ycls), in the first pass down the class axis.
    const R one = V::set1(T(1));
    R vy = V::set1(T(-1)), vc = V::set1(T(0)), zy = V::set1(T(0));
    if constexpr (CAPTURE) vy = Rw::loadn(in.ycls + i0, len);
    if constexpr (TR != Transform::SoftcapFixedShift) {
      for (int64_t c = 0; c < C; ++c) {
        const R z = Rw::loadn(in.z + c * ld + i0, len);
        m = V::max(m, z);
        if constexpr (CAPTURE) {
          zy = V::select_eq(vy, vc, z, zy);
          vc = V::add(vc, one);
        }
      }
    }
    const typename Rw::Xf xf(in.alpha, in.cap);
    R tm;
    // SoftcapFixedShift: the fixed shift 0 (see kFixedShift).
    R mt = TR == Transform::SoftcapFixedShift ? m : Rw::template transform<TR>(m, xf, &tm);
    // Lanes whose transformed max is -inf (all -inf, or finite logits the scale takes beyond
    // T's range) use 0 as their shift: their e come out 0, not NaN.
    const R lowest = V::set1(std::numeric_limits<T>::lowest());
    const R shift = softcap(TR) ? mt : V::zero_if_less(mt, lowest, mt);
    {
      T tmpm[W], tmpt[W];
      V::store(tmpm, m);
      V::store(tmpt, mt);
      for (int64_t j = 0; j < len; ++j) {
        in.m[i0 + j] = (tmpm[j] == ninf || tmpt[j] == ninf) && !softcap(TR)
                           ? -std::numeric_limits<double>::infinity()
                           : double(tmpt[j]);
        in.s[i0 + j] = 0.0;
        in.wd[i0 + j] = 0.0;
        in.usum[i0 + j] = 0.0;
      }
    }
    const R vq1 = V::set1(in.q1), vq0 = V::set1(in.q0);
    for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
      const int64_t c1 = c0 + kChunk < C ? c0 + kChunk : C;
      R s = V::set1(T(0)), d = s, us = s;
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t off = c * ld + i0;
        R t;
        const R z = Rw::loadn(in.z + off, len);
        if constexpr (CAPTURE && TR == Transform::SoftcapFixedShift) {
          zy = V::select_eq(vy, vc, z, zy);
          vc = V::add(vc, one);
        }
        R x = Rw::template transform<TR>(z, xf, &t);
        if constexpr (TR != Transform::SoftcapFixedShift) x = V::sub(x, shift);
        R y = vexp<V, TR == Transform::SoftcapFixedShift>(x);
        if constexpr (STORE) {
          Rw::storen(in.e + c * in.eld + i0, y, len);
          if constexpr (softcap(TR)) Rw::storen(in.t + c * in.tld + i0, t, len);
        }
        s = V::add(s, y);
        const R wc = V::set1(HAS_W ? in.w[c] : T(1));
        if constexpr (WD == TargetSums::Smoothed) d = Rw::template add_weighted<TR>(d, wc, x);
        if constexpr (WD == TargetSums::Probabilities) {
          R u = V::mul(V::fmadd(Rw::loadn(in.p + off, len), vq1, vq0), wc);
          d = Rw::template add_weighted<TR>(d, u, x);
          us = V::add(us, u);
        }
      }
      flush(s, in.s + i0, len);
      if constexpr (WD != TargetSums::None) flush(d, in.wd + i0, len);
      if constexpr (WD == TargetSums::Probabilities) flush(us, in.usum + i0, len);
    }
    if constexpr (CAPTURE) Rw::storen(in.zy + i0, zy, len);
  }

  template <bool STORE, Transform TR, TargetSums WD, bool HAS_W>
  static void stats_impl(const ColIn<T>& in) {
    for (int64_t i0 = 0; i0 < in.L; i0 += W) {
      const int64_t len = in.L - i0 < W ? in.L - i0 : W;
      if (in.ycls) group<STORE, TR, WD, HAS_W, true>(in, i0, len);
      else group<STORE, TR, WD, HAS_W, false>(in, i0, len);
    }
  }
  // stats_impl's instantiations, one per reachable ColMode (kernel_modes.hpp).
  using StatsFn = void (*)(const ColIn<T>&);
  template <int I>
  static constexpr StatsFn entry() {
    constexpr ColMode m = ColMode::at(I);
    if constexpr (m.reachable()) {
      return &stats_impl<m.store, m.tr, m.sums, m.has_w>;
    } else {
      return nullptr;
    }
  }
  // The one dispatch of the column statistics pass.
  static void stats(const ColIn<T>& in) {
    ColMode m;
    m.store = in.e != nullptr;
    m.tr = transform_of(in.alpha, in.cap);
    m.sums = in.sums;
    m.has_w = in.w != nullptr && m.sums != TargetSums::None;
    static constexpr auto table = mode_table<StatsFn, Col>(ColMode::indices());
    table[size_t(m.index())](in);
  }

  template <bool HAS_W, bool HAS_P, bool CAP, bool TGT>
  static void affine_impl(const ColAffineIn<T>& in) {
    const R vq1 = V::set1(in.q1), vq0 = V::set1(in.q0), one = V::set1(T(1)), half = V::set1(T(0.5));
    // The softcap's 4 of 4 rho (1 - rho) goes into a and b (exactly), as in Row::affine_impl.
    const R four = V::set1(CAP ? T(4) : T(1));
    // Non-temporal stores need W-aligned addresses: every class row of the tile is, or none.
    const bool nt = in.stream && reinterpret_cast<uintptr_t>(in.g) % (W * sizeof(T)) == 0 &&
                    (in.ld * int64_t(sizeof(T))) % int64_t(W * sizeof(T)) == 0;
    for (int64_t i0 = 0; i0 < in.L; i0 += W) {
      const int64_t len = in.L - i0 < W ? in.L - i0 : W;
      const R va = V::mul(four, Rw::loadn(in.a + i0, len)),
              vb = V::mul(four, Rw::loadn(in.b + i0, len));
      const R keep = Rw::loadn(in.keep + i0, len);
      R vy = one, vtv = one, vc = V::set1(T(0));
      if constexpr (TGT) {
        vy = Rw::loadn(in.ycls + i0, len);
        vtv = Rw::loadn(in.tv + i0, len);
      }
      for (int64_t c = 0; c < in.C; ++c) {
        const int64_t off = c * in.ld + i0;
        R u = HAS_P ? V::fmadd(Rw::loadn(in.p + off, len), vq1, vq0) : one;
        if constexpr (HAS_W) u = V::mul(u, V::set1(in.w[c]));
        R r = V::fmsub(Rw::loadn(in.e + c * in.eld + i0, len), va, V::mul(vb, u));
        if constexpr (CAP) {
          const R rho = Rw::loadn(in.t + c * in.tld + i0, len);
          r = V::mul(r, V::fnmadd(rho, rho, rho));
        }
        r = V::zero_if_less(keep, half, r);
        if constexpr (TGT) {
          r = V::select_eq(vy, vc, vtv, r);
          vc = V::add(vc, one);
        }
        if (nt && len == W) V::stream(in.g + off, r);
        else Rw::storen(in.g + off, r, len);
      }
    }
  }
  static void affine(const ColAffineIn<T>& in) {
    with_flags(
        [&](auto w, auto p, auto cap, auto tgt) {
          affine_impl<decltype(w)::value, decltype(p)::value, decltype(cap)::value,
                      decltype(tgt)::value>(in);
        },
        in.w != nullptr, in.p != nullptr, in.t != nullptr, in.ycls != nullptr);
  }
};

}  // namespace FASTXENT_ISA_NS
}  // namespace fastxent
