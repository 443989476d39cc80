// Row<V>: the row kernel's declaration and its per-element helpers (16-bit loads and stores,
// logit loads, the max, the weighted accumulation, the transform z -> z'). Its passes are
// defined in kernel_block.hpp (statistics), kernel_grad.hpp (gradient) and
// kernel_softmax_bwd.hpp (softmax backward).
#pragma once

#include <cstdint>
#include <limits>

#include "isa_ns.hpp"
#include "half_impl.hpp"
#include "kernel_exp.hpp"
#include "kernel_modes.hpp"
#include "kernel_table.hpp"

namespace fastxent {
namespace FASTXENT_ISA_NS {

template <class V>
struct Row {
  using T = typename V::T;
  using R = typename V::R;
  static constexpr int64_t W = V::W;

  // 16-bit storage (T = float): HK Float16 or BFloat16. len < W lanes are filled with
  // `fill`; the conversions are exact, and the roundings to 16 bits those of half_impl.hpp.
  template <Storage HK>
  static R loadh(const uint16_t* p, int64_t len, T fill) {
    if constexpr (V::kHasHalf) {
      if (len >= W) return HK == Storage::Float16 ? V::load_f16(p) : V::load_bf16(p);
    }
    T tmp[W];
    for (int64_t j = 0; j < len && j < W; ++j)
      tmp[j] = T(HK == Storage::Float16 ? f16_to_f32_scalar(p[j]) : bf16_to_f32_scalar(p[j]));
    return V::load_partial(tmp, len, fill);
  }
  template <Storage HK>
  static void storeh(uint16_t* p, R v, int64_t len) {
    if constexpr (V::kHasHalf) {
      if (len >= W) {
        if constexpr (HK == Storage::Float16) V::store_f16(p, v);
        else V::store_bf16(p, v);
        return;
      }
    }
    T tmp[W];
    V::store(tmp, v);
    for (int64_t j = 0; j < len && j < W; ++j)
      p[j] = HK == Storage::Float16 ? f32_to_f16_scalar(float(tmp[j]))
                                    : f32_to_bf16_scalar(float(tmp[j]));
  }

  // Logits i .. i + len of a block, from T storage (HK Native) or 16-bit storage.
  template <Storage HK>
  static R loadz(const BlockIn<T>& in, int64_t i, int64_t len, T fill) {
    if constexpr (HK == Storage::Native)
      return len >= W ? V::load(in.z + i) : V::load_partial(in.z + i, len, fill);
    else return loadh<HK>(in.zh + i, len, fill);
  }
  template <Storage HK>
  static T zat(const BlockIn<T>& in, int64_t i) {
    if constexpr (HK == Storage::Native) return in.z[i];
    else
      return T(HK == Storage::Float16 ? f16_to_f32_scalar(in.zh[i]) : bf16_to_f32_scalar(in.zh[i]));
  }

  template <Storage HK>
  static T maxz(const BlockIn<T>& in) {
    const T ninf = -std::numeric_limits<T>::infinity();
    const int64_t n = in.n;
    R a0 = V::set1(ninf), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = 0;
    for (; i + 4 * W <= n; i += 4 * W) {
      a0 = V::max(a0, loadz<HK>(in, i, W, ninf));
      a1 = V::max(a1, loadz<HK>(in, i + W, W, ninf));
      a2 = V::max(a2, loadz<HK>(in, i + 2 * W, W, ninf));
      a3 = V::max(a3, loadz<HK>(in, i + 3 * W, W, ninf));
    }
    for (; i + W <= n; i += W) a0 = V::max(a0, loadz<HK>(in, i, W, ninf));
    if (i < n) a1 = V::max(a1, loadz<HK>(in, i, n - i, ninf));
    return V::hmax(V::max(V::max(a0, a1), V::max(a2, a3)));
  }

  // Gradient entries i .. i + len of an AffineIn (see AffineIn; defined in kernel_grad.hpp).
  template <bool HAS_W, bool HAS_P, bool CAP, bool ENT = false>
  struct GradK;

  // u * x, but exactly 0 where u == 0: a class with no weight (or no probability) contributes
  // nothing even when its logit is -inf (0 * -inf would be NaN). With a softcap: x is
  // finite (z' lies in [-cap, cap]) or NaN (and a NaN logit makes the row NaN anyway), so the
  // plain fused multiply-add gives the same result.
  // acc + u * x (one rounding where the ISA fuses it).
  template <Transform TR = Transform::Identity>
  static R add_weighted(R acc, R u, R x) {
    if constexpr (softcap(TR)) {
      return V::fmadd(u, x, acc);
    } else if constexpr (fused<V>()) {
      return V::fmadd_unless_zero(u, x, acc);
    } else {
      // u == 0, not |u| < denorm_min: the same test, except under DAZ (denormals read as
      // zero, as on XLA's CPU threads), where 0 < denorm_min is false and 0 * inf gave NaN.
      const R zero = V::set1(T(0));
      return V::add(acc, V::select_eq(u, zero, zero, V::mul(u, x)));
    }
  }

  static R loadn(const T* p, int64_t len) {
    return len >= W ? V::load(p) : V::load_partial(p, len, T(0));
  }
  static void storen(T* p, R v, int64_t len) {
    if (len >= W) V::store(p, v);
    else V::store_partial(p, v, len);
  }

  // The constants of the transform: alpha, 2 alpha / cap (the tanh is taken of half its
  // argument), cap and 2 cap.
  struct Xf {
    R alpha, inv, cap, cap2;
    Xf(T a, T c)
        : alpha(V::set1(a)),
          inv(V::set1(c > T(0) ? T(2) * a / c : T(0))),
          cap(V::set1(c)),
          cap2(V::set1(T(2) * c)) {}
  };

  // z' by the transform TR: z, alpha z, or (softcap) cap * tanh(alpha z / cap), computed as
  // sign(z) (2 cap rho - cap) with rho = vsoftcap_rho(2 alpha z / cap), which goes to *rho
  // (the gradient pass takes 1 - tanh^2 = 4 rho (1 - rho) from it).
  template <Transform TR>
  static R transform(R zz, const Xf& k, R* rho) {
    if constexpr (softcap(TR)) {
      const R u = V::mul(zz, k.inv);
      *rho = vsoftcap_rho<V>(u);
      return V::copysign(V::fmsub(*rho, k.cap2, k.cap), u);
    } else if constexpr (TR == Transform::Scale) {
      return V::mul(zz, k.alpha);
    } else {
      return zz;
    }
  }

  // The block pass (kernel_block.hpp).
  static void side_piece(const AffineIn<T>& side, int64_t lo, int64_t hi);
  template <bool STORE, Transform TR, TargetSums WD, bool HAS_W, Storage HK, bool SIDE = false,
            bool NEXT = false, bool ENT = false>
  static BlockStat block_impl(const BlockIn<T>& in_ref, T mt);
  template <Transform TR, Storage HK>
  static double ent_redo(const BlockIn<T>& in, T mt);
  template <Storage HK>
  static BlockStat degenerate(const BlockIn<T>& in);
  static BlockStat block(const BlockIn<T>& in);
  static void block_rows(const BlockIn<T>& in, int64_t rows, int64_t zs, int64_t es, int64_t ps,
                         BlockStat* out);
  template <Storage HK>
  static BlockStat block_for(const BlockIn<T>& in);
  // block_impl's instantiations, one per reachable BlockMode (kernel_modes.hpp).
  using BlockFn = BlockStat (*)(const BlockIn<T>&, T);
  template <int I>
  static constexpr BlockFn entry();
  static BlockStat run_block(BlockMode m, const BlockIn<T>& in, T mt);

  // The gradient pass (kernel_grad.hpp).
  template <bool HAS_W, bool HAS_P, bool CAP, bool STREAM, Storage HK, bool ENT = false>
  static void affine_impl(const AffineIn<T>& in);
  template <bool HAS_W, bool HAS_P, bool CAP, bool ENT = false>
  static void affine_s(const AffineIn<T>& in);
  static void affine(const AffineIn<T>& in);

  // The softmax backward (kernel_softmax_bwd.hpp).
  static double dot(const T* a, const T* b, int64_t n);
  static void mul_sub(const T* p, const T* g, T d, T* out, int64_t n);

  static RowFns<T> fns();
};

}  // namespace FASTXENT_ISA_NS
}  // namespace fastxent
