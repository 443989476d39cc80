// The per-row formula around the SIMD passes, shared by the row, column and shard paths: the
// merge of a row's block statistics (finish_row), the gradient block from stored exponentials
// (SIMD or the double path), the target entry redone in double, and the target logit.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "ce_detail.hpp"

namespace fastxent {
namespace detail {

// What a counted row needs after its block statistics are merged.
struct RowResult {
  double loss;
  double M;  // row max of z' (-inf: degenerate row; 0 with the softcap's fixed shift)
  double a;  // gradient factor of exp(z' - M), chain factor alpha included: an / S
  double b;  // gradient offset per unit of u, alpha included
  double s;  // this row's scale (1/D times its sample weight)
  // a's numerator s (Q + z-loss term) alpha and denominator S = sum exp(z' - M), for the
  // double path (write_grad_block), which takes an (e / S) where a itself would be subnormal.
  double an = 0.0, S = 1.0;
};

// r.a e in double; as r.an (e / r.S) where r.a is subnormal or 0 (extreme row scales with
// the softcap's fixed shift), which would round away its digits (r.an is 0 where a really is).
inline double a_times(const RowResult& r, double e) {
  return std::fabs(r.a) < std::numeric_limits<double>::min() ? r.an * (e / r.S) : r.a * e;
}

// Merges a row's block statistics in block order (independent of who computed them).
template <class T>
inline RowResult finish_row(const Problem<T>& p, const BlockStat* st, int64_t n, double zy_t) {
  const double sn = p.in.sample_weight ? double(p.in.sample_weight[n]) : 1.0;
  RowResult r{0.0, -kInf, 0.0, 0.0, p.s * sn};
  double wy = 1.0;
  if (!p.probs) wy = p.in.weight ? double(p.in.weight[p.in.target[n]]) : 1.0;
  bool nan = false;
  double U = 0.0;  // sum of u (probability targets)
  for (int64_t k = 0; k < p.nb; ++k) {
    if (st[k].m > r.M) r.M = st[k].m;
    nan |= std::isnan(st[k].m) || std::isnan(st[k].s);
    U += st[k].usum;
  }
  const double C = double(p.C_total);
  const double Q = p.probs ? U : (1.0 - p.eps) * wy + p.eps / C * p.W;  // sum of the soft target
  r.b = r.s * (p.probs ? 1.0 : p.eps / C) * p.alpha;
  if (nan) {
    r.loss = r.a = kNaN;
    return r;
  }
  if (r.M == -kInf) {
    // Every class is -inf: the loss is +inf and the gradient is the limit of equal logits,
    // uniform softmax minus q (write_grad_block knows this case by M = -inf).
    r.loss = kInf;
    r.a = r.an = r.s * Q / C * p.alpha;
    return r;
  }
  double S = 0.0, WD = 0.0;
  const bool want_wd = p.probs || p.eps > 0.0;
  for (int64_t k = 0; k < p.nb; ++k) {
    const double bw = p.probs ? st[k].usum : (p.block_w ? p.block_w[k] : double(p.block_len(k)));
    if (st[k].m == -kInf) {
      if (want_wd) WD += st[k].wd - r.M * bw;
      continue;
    }
    S += st[k].s * rescale(st[k].m, r.M);
    if (want_wd) WD += st[k].wd + (st[k].m - r.M) * bw;
  }
  const double log_sum = std::log(S);
  double loss = 0.0;
  if (p.probs) {
    loss = U * log_sum - WD;
  } else {
    // Terms with a zero factor are skipped, not multiplied: 0 * inf would be NaN.
    if (p.eps < 1.0) loss += (1.0 - p.eps) * wy * (log_sum + (r.M - zy_t));
    if (p.eps > 0.0) loss += p.eps / C * (p.W * log_sum - WD);
  }
  double za = 0.0;  // z-loss: lambda lse^2, gradient 2 lambda lse softmax
  if (p.lambda > 0.0) {
    const double lse = r.M + log_sum;
    loss += p.lambda * lse * lse;
    za = 2.0 * p.lambda * lse;
  }
  r.loss = sn * loss;
  r.an = r.s * (Q + za) * p.alpha;
  r.S = S;
  r.a = r.s * (Q + za) / S * p.alpha;
  return r;
}

// Whether a block whose gradient factor is fa (a times the block's rescale) needs the double
// path instead of the SIMD affine pass in T. Above T's max / 8 (the softcap's 4 is multiplied
// in), T(fa) or T(b) would overflow where a e may not. Below T's smallest normal, T(fa) loses
// digits: that matters only with the fixed shift, where e reaches e^cap (with the block max,
// e <= 1 and the gradients of such a block are below the normal range themselves); there
// fa = 0 with a nonzero numerator (a underflowed even in double) counts as below too. The
// fixed shift spans e^+-cap more range in a than the max shift, so extreme weights or
// normalizers reach these cases.
template <class T>
inline bool needs_double(const Problem<T>& p, const RowResult& r, double fa) {
  const double big = double(std::numeric_limits<T>::max()) / 8;
  if ((std::isfinite(fa) && std::fabs(fa) > big) || (std::isfinite(r.b) && std::fabs(r.b) > big))
    return true;
  if (!fixed_shift(p)) return false;
  return fa == 0.0 ? r.an != 0.0 : std::fabs(fa) < double(std::numeric_limits<T>::min());
}

// The gradient entry from e, in double: (an (c e) - b u) d with c = exp(m - M) / S (so that an
// c e = a e without forming a, which may be subnormal even in double), u the class's
// soft-target weight and d the softcap's 4 rho (1 - rho) (rho at t, or null): the slow path
// for factors that do not fit T.
template <class T>
inline double grad_entry(const Problem<T>& p, const RowResult& r, double c, double e, const T* t,
                         double w, const T* prob) {
  double u = w;
  if (prob) u *= (1.0 - p.eps) * double(*prob) + p.eps / double(p.C_total);
  double v = r.an * (c * e) - r.b * u;
  if (t) v *= 4.0 * double(*t) * (1.0 - double(*t));
  return v;
}

// Block k of a counted row's gradient from its stored exponentials e: either written here
// (NaN and degenerate rows, the double path; returns false) or described by *out for the
// SIMD pass (returns true; the caller runs p.fns->affine(*out), or hands it to a block pass
// as its side).
template <class T>
inline bool grad_block_affine(const Problem<T>& p, const BlockStat& st, const RowResult& r,
                              const T* prob, const T* e, const T* t, T* g, int64_t k, bool stream,
                              AffineIn<T>* out, uint16_t* gh = nullptr,
                              Storage storage = Storage::Native) {
  const int64_t off = k * kBlock<T>, len = p.block_len(k);
  AffineIn<T>& a = *out;
  a.e = e + off;
  a.g = g ? g + off : nullptr;
  a.gh = gh ? gh + off : nullptr;
  a.storage = storage;
  a.n = len;
  a.b = T(r.b);
  a.w = p.in.weight ? p.in.weight + off : nullptr;
  a.p = prob ? prob + off : nullptr;
  a.q1 = T(1.0 - p.eps);
  a.q0 = T(p.eps / double(p.C_total));
  a.t = t ? t + off : nullptr;
  a.stream = stream;
  if (std::isnan(r.a)) {
    // A NaN row stays NaN everywhere, as one quiet NaN: through the SIMD pass its sign would
    // depend on which NaN operand each instruction propagates, and so on the code path.
    for (int64_t c = 0; c < len; ++c) {
      if (gh) store_half(p, kNaN, gh + off + c, storage);
      else g[off + c] = T(kNaN);
    }
    return false;
  } else if (r.M == -kInf) {
    // Degenerate row: e holds zeros but the uniform limit needs e = 1: g = a - b u.
    for (int64_t c = 0; c < len; ++c) {
      double u = p.in.weight ? double(p.in.weight[off + c]) : 1.0;
      if (p.probs) u *= (1.0 - p.eps) * double(a.p[c]) + p.eps / double(p.C_total);
      if (gh) store_half(p, double(T(r.a - r.b * u)), gh + off + c, storage);
      else g[off + c] = T(r.a - r.b * u);
    }
    return false;
  } else {
    const double fa = st.m == -kInf ? 0.0 : r.a * rescale(st.m, r.M);
    if (needs_double(p, r, fa)) {
      for (int64_t c = 0; c < len; ++c) {
        const double v =
            grad_entry(p, r, rescale(st.m, r.M) / r.S, double(a.e[c]), a.t ? a.t + c : nullptr,
                       p.in.weight ? double(p.in.weight[off + c]) : 1.0, prob ? a.p + c : nullptr);
        if (gh) store_half(p, double(T(v)), gh + off + c, storage);
        else g[off + c] = T(v);
      }
      return false;
    }
    a.a = T(fa);
  }
  return true;
}

// Writes block k of a counted row's gradient from its stored exponentials e.
template <class T>
inline void write_grad_block(const Problem<T>& p, const BlockStat& st, const RowResult& r,
                             const T* prob, const T* e, const T* t, T* g, int64_t k, bool stream,
                             uint16_t* gh = nullptr, Storage storage = Storage::Native) {
  AffineIn<T> a;
  if (grad_block_affine(p, st, r, prob, e, t, g, k, stream, &a, gh, storage)) p.fns->affine(a);
}

// The target entry a e_y - q_y cancels when softmax_y is near 1: redo it in double from the
// saved logit, rounding once (class targets only).
template <class T>
inline T target_value(const Problem<T>& p, const RowResult& r, double zy_t, double dzy, int64_t y) {
  const double wy = p.in.weight ? double(p.in.weight[y]) : 1.0;
  const double ey = r.M == -kInf ? 1.0 : std::exp(zy_t - r.M);
  // r.a and r.b carry alpha; the softcap's chain factor at y replaces it.
  const double scale = dzy / p.alpha;
  return T(scale * (a_times(r, ey) - r.b * wy - r.s * (1.0 - p.eps) * wy * p.alpha));
}

template <class T>
inline void fix_target(const Problem<T>& p, const RowResult& r, double zy_t, double dzy, T* g,
                       int64_t y, uint16_t* gh = nullptr, Storage storage = Storage::Native) {
  if (std::isnan(r.a)) return;  // a NaN row stays NaN
  // In T first, then (16-bit rows) rounded once more to the storage type.
  const T v = target_value(p, r, zy_t, dzy, y);
  if (gh) store_half(p, double(v), gh + y, storage);
  else g[y] = v;
}

// The target logit through the transform (class targets; 0 for probability targets).
template <class T>
inline double target_logit(const Problem<T>& p, int64_t n, double* dz, const T* zrow = nullptr,
                           const uint16_t* zh = nullptr, Storage storage = Storage::Native) {
  *dz = p.alpha;
  if (p.probs) return 0.0;
  const int64_t y = p.in.target[n];
  if (zrow) return transform(p, double(zrow[y]), dz);
  if (zh) {
    float f;
    p.half_to_f32(zh + y, &f, 1, storage);
    return transform(p, double(f), dz);
  }
  if (p.inner == 1) return transform(p, double(p.in.logits[n * p.in.row_stride + y]), dz);
  const int64_t o = n / p.inner, i = n % p.inner;
  return transform(p, double(p.in.logits[(o * p.C + y) * p.inner + i]), dz);
}

}  // namespace detail
}  // namespace fastxent
