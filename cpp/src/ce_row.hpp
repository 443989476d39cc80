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
  // With p.ent: log S and ebar = sum_c p_c (z'_c - M) (the entropy is log S - ebar); with
  // beta > 0, ec = beta s alpha / S, the factor of the entropy term's e (z' - M - ebar).
  double logS = 0.0, ebar = 0.0, ec = 0.0;
  // stats_only with p.ent: the sum e (z' - M) itself (ebar = E / S).
  double E = 0.0;
  // Every field set, by a constructor rather than an aggregate's initialisers: GCC cleared an
  // aggregate's 88 bytes with a rep stos first (its generic tuning for that size), a few
  // percent of a 32 x 10 call, whose column path builds one RowResult per row.
  explicit RowResult(double loss_ = 0.0, double M_ = 0.0, double a_ = 0.0, double b_ = 0.0,
                     double s_ = 0.0)
      : loss(loss_), M(M_), a(a_), b(b_), s(s_) {}
};

// r.a e in double; as r.an (e / r.S) where r.a is subnormal or 0 (extreme row scales with
// the softcap's fixed shift), which would round away its digits (r.an is 0 where a really is).
inline double a_times(const RowResult& r, double e) {
  return std::fabs(r.a) < std::numeric_limits<double>::min() ? r.an * (e / r.S) : r.a * e;
}

// Merges a row's block statistics in block order (independent of who computed them).
// log_s: log(st[0].s) where the caller computed it (rows of one block, p.nb == 1: the column
// path's, vectorised across rows), or null.
template <class T>
inline RowResult finish_row(const Problem<T>& p, const BlockStat* st, int64_t n, double zy_t,
                            const double* log_s = nullptr) {
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
  // The sum of the soft target (without smoothing the class weights' sum W is not in it: an
  // infinite weight of a class no row targets would make 0 * inf = NaN of every row).
  const double Q = p.probs ? U : (1.0 - p.eps) * wy + (p.eps > 0.0 ? p.eps / C * p.W : 0.0);
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
  double S = 0.0, WD = 0.0, E = 0.0;
  const bool want_wd = p.probs || p.eps > 0.0;
  for (int64_t k = 0; k < p.nb; ++k) {
    const double bw = p.probs ? st[k].usum : (p.block_w ? p.block_w[k] : double(p.block_len(k)));
    if (st[k].m == -kInf) {
      if (want_wd) WD += st[k].wd - r.M * bw;
      continue;
    }
    S += st[k].s * rescale(st[k].m, r.M);
    if (want_wd) WD += st[k].wd + (st[k].m - r.M) * bw;
    // sum e (z' - M) = sum e (z' - m) + (m - M) sum e, each rescaled by exp(m - M).
    // (skipped where the rescale is 0: (m - M) s may overflow to -inf there, times 0)
    if (p.ent && rescale(st[k].m, r.M) != 0.0)
      E += (st[k].ez + (st[k].m - r.M) * st[k].s) * rescale(st[k].m, r.M);
  }
  // With one block S is st[0].s itself (its rescale is exactly 1).
  const double log_sum = log_s ? *log_s : std::log(S);
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
  r.logS = log_sum;  // lse and target_logprob need it with or without the entropy
  if (p.ent) {
    r.ebar = E / S;
    if (p.beta > 0.0) {
      loss -= p.beta * (log_sum - r.ebar);
      r.ec = p.beta * r.s * p.alpha / S;
    }
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
                         double w, const T* prob, const T* z = nullptr) {
  double u = w;
  if (prob) u *= (1.0 - p.eps) * double(*prob) + p.eps / double(p.C_total);
  double v = r.an * (c * e) - r.b * u;
  if (z && e != 0.0) {
    // The entropy term beta s alpha p (z' - zbar), p = c e, z' - zbar = (z' - M) - ebar.
    double dz;
    v += r.ec * r.S * (c * e) * ((transform(p, double(*z), &dz) - r.M) - r.ebar);
  }
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
                              Storage storage = Storage::Native, const T* z = nullptr) {
  const int64_t off = k * kBlock<T>, len = p.block_len(k);
  AffineIn<T>& a = *out;
  a.e = e + off;
  a.g = g ? g + off : nullptr;
  a.gh = gh ? gh + off : nullptr;
  a.storage = storage;
  a.n = len;
  a.b = T(r.b);
  a.w = p.u_weight() ? p.u_weight() + off : nullptr;
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
      double u = p.u_weight() ? double(p.u_weight()[off + c]) : 1.0;
      if (p.probs) u *= (1.0 - p.eps) * double(a.p[c]) + p.eps / double(p.C_total);
      if (gh) store_half(p, double(T(r.a - r.b * u)), gh + off + c, storage);
      else g[off + c] = T(r.a - r.b * u);
    }
    return false;
  } else {
    double fa = st.m == -kInf ? 0.0 : r.a * rescale(st.m, r.M);
    // The entropy term (z: the row's logits, beta > 0): a gains ck (m - M - ebar) and the
    // pass adds ck e (z' - m) (see AffineIn::z).
    const bool ent = z && r.ec != 0.0 && st.m != -kInf;
    double ck = 0.0;
    if (ent) {
      ck = r.ec * rescale(st.m, r.M);
      if (ck != 0.0) fa += ck * ((st.m - r.M) - r.ebar);  // m - M may be -inf where ck is 0
    }
    const double tiny = double(std::numeric_limits<T>::min());
    const double huge = double(std::numeric_limits<T>::max()) / 8;
    if (needs_double(p, r, fa) ||
        (ent && (std::fabs(ck) > huge || (ck != 0.0 && std::fabs(ck) < tiny)))) {
      for (int64_t c = 0; c < len; ++c) {
        const double v =
            grad_entry(p, r, rescale(st.m, r.M) / r.S, double(a.e[c]), a.t ? a.t + c : nullptr,
                       p.u_weight() ? double(p.u_weight()[off + c]) : 1.0, prob ? a.p + c : nullptr,
                       ent ? z + off + c : nullptr);
        if (gh) store_half(p, double(T(v)), gh + off + c, storage);
        else g[off + c] = T(v);
      }
      return false;
    }
    a.a = T(fa);
    if (ent) {
      a.z = z + off;
      a.c = T(ck);
      a.zshift = T(st.m);
      a.alpha = T(p.alpha);
      a.cap = T(p.cap);
    }
  }
  return true;
}

// Writes block k of a counted row's gradient from its stored exponentials e.
template <class T>
inline void write_grad_block(const Problem<T>& p, const BlockStat& st, const RowResult& r,
                             const T* prob, const T* e, const T* t, T* g, int64_t k, bool stream,
                             uint16_t* gh = nullptr, Storage storage = Storage::Native,
                             const T* z = nullptr) {
  AffineIn<T> a;
  if (grad_block_affine(p, st, r, prob, e, t, g, k, stream, &a, gh, storage, z)) p.fns->affine(a);
}

// The target entry a e_y - q_y cancels when softmax_y is near 1: redo it in double from the
// saved logit, rounding once (class targets only). ey: exp(zy_t - r.M) where the caller
// computed it (the column path, across rows), or null.
template <class T>
inline T target_value(const Problem<T>& p, const RowResult& r, double zy_t, double dzy, int64_t y,
                      const double* ey_pre = nullptr) {
  const double wy = p.in.weight ? double(p.in.weight[y]) : 1.0;
  const double ey = r.M == -kInf ? 1.0 : ey_pre ? *ey_pre : std::exp(zy_t - r.M);
  // r.a and r.b carry alpha; the softcap's chain factor at y replaces it.
  const double scale = dzy / p.alpha;
  // The entropy term beta s alpha p_y (z'_y - zbar) (0 where p_y is).
  double v = a_times(r, ey) - r.b * wy - r.s * (1.0 - p.eps) * wy * p.alpha;
  if (r.ec != 0.0 && r.M != -kInf && ey != 0.0) v += r.ec * ey * ((zy_t - r.M) - r.ebar);
  return T(scale * v);
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

// The first index of v in z[0 .. n) (n if none): chunks of 32 compared at once, then the
// chunk that holds it element by element.
template <class T>
inline int64_t first_equal(const T* z, int64_t n, T v) {
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    int any = 0;
    for (int j = 0; j < 32; ++j) any |= int(z[i + j] == v);
    if (any) break;
  }
  for (; i < n; ++i)
    if (z[i] == v) return i;
  return n;
}

// The row's argmax (first index of the largest raw logit; the first NaN in a NaN row, as
// torch.argmax), from the blocks' raw maxima where the block passes took them (one block
// scanned), else (the softcap's fixed shift; +inf rows) a scan of the row.
template <class T>
inline int64_t row_argmax(const Problem<T>& p, const T* z, const BlockStat* st, bool nan_row) {
  if (nan_row) {
    for (int64_t i = 0; i < p.C; ++i)
      if (z[i] != z[i]) return i;
  } else {
    bool have = true;
    double M = -kInf;
    for (int64_t k = 0; k < p.nb; ++k) {
      if (std::isnan(st[k].zmax)) {
        have = false;
        break;
      }
      if (st[k].zmax > M) M = st[k].zmax;
    }
    for (int64_t k = 0; have && k < p.nb; ++k) {
      if (st[k].zmax != M) continue;
      const int64_t off = k * kBlock<T>, len = p.block_len(k);
      const int64_t i = first_equal(z + off, len, T(M));
      if (i < len) return off + i;
      break;
    }
  }
  int64_t best = 0;
  for (int64_t i = 1; i < p.C; ++i)
    if (z[i] > z[best]) best = i;
  return best;
}

// The statistics of a row that does not count (ignored, or no row counts): log S and ebar
// as finish_row has them, and S and E (r.a NaN for a NaN row, r.M = -inf for a row of -inf).
template <class T>
inline RowResult stats_only(const Problem<T>& p, const BlockStat* st) {
  RowResult r{0.0, -kInf, 0.0, 0.0, 0.0};
  bool nan = false;
  for (int64_t k = 0; k < p.nb; ++k) {
    if (st[k].m > r.M) r.M = st[k].m;
    nan |= std::isnan(st[k].m) || std::isnan(st[k].s);
  }
  if (nan) {
    r.a = kNaN;
    return r;
  }
  if (r.M == -kInf) return r;
  double S = 0.0, E = 0.0;
  for (int64_t k = 0; k < p.nb; ++k) {
    if (st[k].m == -kInf) continue;
    S += st[k].s * rescale(st[k].m, r.M);
    // (skipped where the rescale is 0: (m - M) s may overflow to -inf there, times 0)
    if (p.ent && rescale(st[k].m, r.M) != 0.0)
      E += (st[k].ez + (st[k].m - r.M) * st[k].s) * rescale(st[k].m, r.M);
  }
  r.S = S;
  r.E = E;
  r.logS = std::log(S);
  r.ebar = E / S;
  return r;
}

// Row n's outputs (p.outs) from its merged statistics; z: its logits (for the argmax).
template <class T>
inline void write_row_outputs(const Problem<T>& p, int64_t n, const RowResult& r,
                              const BlockStat* st, const T* z, double zy_t, bool counted) {
  const RowOutputs<T>& o = p.outs;
  const bool nan = std::isnan(r.a);
  const bool degen = !nan && r.M == -kInf;
  if (o.lse) o.lse[n] = T(nan ? kNaN : degen ? -kInf : r.M + r.logS);
  if (o.entropy) o.entropy[n] = T(nan ? kNaN : degen ? std::log(double(p.C)) : r.logS - r.ebar);
  if (o.target_logprob)
    o.target_logprob[n] = T(!counted ? 0.0 : nan ? kNaN : degen ? -kInf : (zy_t - r.M) - r.logS);
  if (o.argmax) o.argmax[n] = row_argmax(p, z, st, nan);
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
