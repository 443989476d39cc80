// The row gradient pass: g = d (a e - b u) over a block (AffineIn), to T storage (plain or
// non-temporal stores) or 16-bit storage; GradK computes W entries of it.
#pragma once

#include <cstdint>
#include <limits>

#include "isa_ns.hpp"
#include "kernel_row.hpp"

namespace fastxent {
namespace FASTXENT_ISA_NS {

// Gradient entries i .. i + len of an AffineIn (see AffineIn). ENT: the entropy term
// c e x, x = z' - zshift from the logits (see AffineIn::z).
template <class V>
template <bool HAS_W, bool HAS_P, bool CAP, bool ENT>
struct Row<V>::GradK {
  R va, vb, vq1, vq0;
  R vc, vshift, valpha, vcap, vcap2;
  explicit GradK(const AffineIn<T>& in)
      : va(V::set1(CAP ? T(4) * in.a : in.a)),
        vb(V::set1(CAP ? T(4) * in.b : in.b)),
        vq1(V::set1(in.q1)),
        vq0(V::set1(in.q0)),
        vc(V::set1(ENT ? (CAP ? T(4) * in.c : in.c) : T(0))),
        vshift(V::set1(in.zshift)),
        valpha(V::set1(in.alpha)),
        vcap(V::set1(in.cap)),
        vcap2(V::set1(T(2) * in.cap)) {}
  R operator()(const AffineIn<T>& in, int64_t i, int64_t len) const {
    R bu = vb;
    if constexpr (HAS_P || HAS_W) {
      R u = HAS_P ? V::fmadd(loadn(in.p + i, len), vq1, vq0) : loadn(in.w + i, len);
      if constexpr (HAS_P && HAS_W) u = V::mul(u, loadn(in.w + i, len));
      bu = V::mul(vb, u);
    }
    const R e = loadn(in.e + i, len);
    // One rounding for a * e - b u when u = 1 (the cancellation near softmax = target).
    R r = V::fmsub(e, va, bu);
    if constexpr (ENT) {
      const R z = loadn(in.z + i, len);
      R x;
      if constexpr (CAP) {
        // z' = sign(z) (2 cap rho - cap), as the block pass computes it (alpha, cap > 0).
        x = V::sub(V::copysign(V::fmsub(loadn(in.t + i, len), vcap2, vcap), z), vshift);
        r = V::fmadd(V::mul(vc, e), x, r);  // x is finite
      } else {
        // x = -inf only at a -inf logit, where e = 0: clamped to the lowest finite T, the
        // term is then 0 (as in the block pass).
        x = V::max(V::fmsub(z, valpha, vshift), V::set1(std::numeric_limits<T>::lowest()));
        r = V::fmadd(V::mul(vc, e), x, r);
      }
    }
    if constexpr (CAP) {
      const R rho = loadn(in.t + i, len);
      r = V::mul(r, V::fnmadd(rho, rho, rho));
    }
    return r;
  }
};

// g = d * (a * e - b * u): u = w (or 1) without probability targets, w (q1 p + q0) with
// them; d = 1 - tanh^2 = 4 rho (1 - rho) with a softcap (rho stored at t; the 4 goes into
// a and b, exactly), else 1.
template <class V>
template <bool HAS_W, bool HAS_P, bool CAP, bool STREAM, Storage HK, bool ENT>
inline void Row<V>::affine_impl(const AffineIn<T>& in) {
  const GradK<HAS_W, HAS_P, CAP, ENT> gk(in);
  T* g = in.g;
  const int64_t n = in.n;
  auto f = [&](int64_t i, int64_t len) { return gk(in, i, len); };
  int64_t i = 0;
  if constexpr (HK != Storage::Native) {
    static_assert(!STREAM, "16-bit gradients are not streamed");
    uint16_t* gh = in.gh;
    for (; i + 2 * W <= n; i += 2 * W) {
      R g0 = f(i, W), g1 = f(i + W, W);
      storeh<HK>(gh + i, g0, W);
      storeh<HK>(gh + i + W, g1, W);
    }
    for (; i < n; i += W) storeh<HK>(gh + i, f(i, n - i < W ? n - i : W), n - i < W ? n - i : W);
    return;
  }
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

template <class V>
template <bool HAS_W, bool HAS_P, bool CAP, bool ENT>
inline void Row<V>::affine_s(const AffineIn<T>& in) {
  if constexpr (ENT) {
    // The entropy term: T storage only (the driver refuses 16-bit rows with it).
    if (in.stream) affine_impl<HAS_W, HAS_P, CAP, true, Storage::Native, true>(in);
    else affine_impl<HAS_W, HAS_P, CAP, false, Storage::Native, true>(in);
    return;
  }
  if constexpr (sizeof(T) == 4) {
    if (in.gh) {
      if (in.storage == Storage::Float16)
        affine_impl<HAS_W, HAS_P, CAP, false, Storage::Float16>(in);
      else affine_impl<HAS_W, HAS_P, CAP, false, Storage::BFloat16>(in);
      return;
    }
  }
  if (in.stream) affine_impl<HAS_W, HAS_P, CAP, true, Storage::Native>(in);
  else affine_impl<HAS_W, HAS_P, CAP, false, Storage::Native>(in);
}
template <class V>
inline void Row<V>::affine(const AffineIn<T>& in) {
  with_flags(
      [&](auto w, auto p, auto cap, auto ent) {
        affine_s<decltype(w)::value, decltype(p)::value, decltype(cap)::value,
                 decltype(ent)::value>(in);
      },
      in.w != nullptr, in.p != nullptr, in.t != nullptr, in.z != nullptr);
}

}  // namespace FASTXENT_ISA_NS
}  // namespace fastxent
