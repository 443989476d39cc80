// Internals shared by the row path (cross_entropy.cpp) and the column path
// (cross_entropy_cols.cpp): the problem description and the per-row formula around the SIMD
// passes. Baseline flags only.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

#include "fastxent/fastxent.hpp"
#include "kernel_table.hpp"

namespace fastxent {
namespace detail {

inline constexpr double kInf = std::numeric_limits<double>::infinity();
inline constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// Non-temporal gradient stores (through a per-thread scratch row, no read-for-ownership of
// the output) for gradients of at least this many bytes; 0 = never. FASTXENT_STREAM_BYTES=N
// sets it. The default (64 MiB, or never) follows what was measured (out=, float32, the
// stream interleaved into the next row's block loop unless noted):
// - Intel Xeon, AVX-512 kernel: streaming faster, at 4096 x 32000 (2 threads 50 -> 36 ms),
//   and with the row-at-a-time stream of the first runs at 65536 x 1000 (45.5 -> 43.6 ms, 1
//   thread; 23.4 -> 21.7 ms, 2 threads): on.
// - AMD EPYC Zen 4, AVX-512 kernel: streaming faster, at 4096 x 32000 (1 thread 83.9 ->
//   61.8 ms, 2 threads 43.0 -> 30.6 ms) and 1024 x 128256 (83.8 -> 63.4; 47.7 -> 36.3 ms),
//   the same at 65536 x 1000 (48.1 / 48.8; 27.0 / 28.2 ms): on.
// - AMD EPYC Zen 4, AVX2 kernel (FASTXENT_ISA=avx2): plain stores a little faster, at
//   4096 x 32000 (1 thread 98.4 vs 107.1 ms, 2 threads 50.1 vs 52.1 ms), as on the AMD Zen 3
//   (AVX2) machine of the first runs with the row-at-a-time stream (4096 x 32000 112.6 vs
//   140.0 ms, 1 thread; 65536 x 1000 26.1 vs 39.1 ms, 2 threads): off.
// So: on for Intel CPUs and for the AVX-512 kernel, off otherwise.
int64_t stream_threshold();

// Whether CPUID names the vendor GenuineIntel (dispatch.cpp).
bool cpu_is_intel();

// Rows of at least this many bytes take the two-pass gradient: block statistics first (the
// row is read, nothing written), then per block exp again with the same block max (the same
// bits) and the gradient written at once from L1 (XNNPACK's two-pass softmax, Dukhan and
// Ablavatski 2020): 12 bytes of memory traffic per float instead of 16 for rows too long for
// L2, at the price of a second exp. 0 = never (FASTXENT_RECOMPUTE_BYTES=N turns it on). Off by
// default because measured slower on both development machines, where the exp, not memory,
// bounds the kernel: on the 2-core Xeon with AVX-512 (2 MiB L2 per core), out= at 16 x 2^20
// float32 took 46-47 ms against 36-37 ms, and at 64 x 262144 41 ms against 32-34 ms (1 thread).
int64_t recompute_threshold();

// Throws std::out_of_range, naming row n, unless the class index y is in [0, classes) or is
// ignore_index.
void check_class(int64_t n, int64_t y, int64_t classes, int64_t ignore_index);

// Throws std::invalid_argument unless v is finite and >= 0 (> 0 when `positive`).
void check_finite(double v, const char* what, bool positive);

// Every check of a call, before anything is written. Pointer types vary (half storage), so
// this takes what it needs as plain facts.
void check_call(const Options& opt, int64_t rows, int64_t classes, int64_t inner,
                int64_t row_stride, bool have_logits, bool have_target, bool have_probs,
                int64_t probs_row_stride, bool have_row_losses, bool in_place);

// sum of x[0 .. n) in double over four interleaved partial sums: the O(C) class-weight sums of
// every call, several times faster than one dependent chain of additions (which cost as much
// as the kernel itself on a few rows of 32k classes).
template <class T>
inline double sum_f64(const T* x, int64_t n) {
  double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    s0 += double(x[i]);
    s1 += double(x[i + 1]);
    s2 += double(x[i + 2]);
    s3 += double(x[i + 3]);
  }
  for (; i < n; ++i) s0 += double(x[i]);
  return (s0 + s1) + (s2 + s3);
}

// exp(m - M) for a block max m against the row max M: exactly 1 for the block holding the max
// (the only block of a short row), without a libm call.
inline double rescale(double m, double M) { return m == M ? 1.0 : std::exp(m - M); }

template <class T>
struct Problem {
  Inputs<T> in;
  int64_t ignore_index;
  int64_t C, nb;
  int64_t C_total;          // the C of eps / C: C, or the whole vocabulary for a shard
  int64_t inner;            // 1: rows; > 1: the (rows / inner, C, inner) column layout
  T* grad;
  double eps, lambda, alpha, cap;
  double W;                 // sum of class weights (C without weights)
  const double* block_w;    // class weights per block (class targets with smoothing)
  double s;                 // 1/D for "mean", 1 otherwise
  bool zero_all;            // D == 0 for "mean": loss and gradient are 0
  bool stream;              // non-temporal gradient stores through a scratch row
  bool recompute = false;   // two-pass gradient: statistics first, then exp again per block
  bool probs;               // probability targets
  const RowFns<T>* fns;
  void (*fence)();
  // float <-> 16-bit conversions of the active ISA (kind 0 float16, 1 bfloat16).
  void (*half_to_f32)(const uint16_t* src, float* dst, int64_t n, int kind);
  void (*f32_to_half)(const float* src, uint16_t* dst, int64_t n, int kind);

  int64_t block_len(int64_t k) const { return k + 1 < nb ? kBlock<T> : C - k * kBlock<T>; }
  bool counted(int64_t n) const {
    return !zero_all && (probs || in.target[n] != ignore_index);
  }
};

// Points p at the kernels of the active ISA.
template <class T>
inline void use_active_kernels(Problem<T>& p) {
  const KernelTable& table = active_table();
  p.fns = &row_fns<T>(table);
  p.fence = table.fence;
  p.half_to_f32 = table.half_to_f32;
  p.f32_to_half = table.f32_to_half;
}

// z' of one logit in double (the target's, for the loss and the target gradient entry).
template <class T>
inline double transform(const Problem<T>& p, double z, double* dz) {
  if (p.cap > 0.0) {
    const double t = std::tanh(p.alpha * z / p.cap);
    *dz = p.alpha * (1.0 - t * t);
    return p.cap * t;
  }
  *dz = p.alpha;
  return p.alpha * z;
}

// Where one row's data lives: normally inside the call's arrays, but the 16-bit path points
// these at per-thread float32 copies of the row.
template <class T>
struct RowPtrs {
  const T* z;     // logits row (null when zh is set)
  const T* prob;  // probability-target row, or null
  T* g;           // gradient row, or null
  // 16-bit rows (T = float): logits read from zh and the gradient rounded into gh, as
  // float16 (hk 1) or bfloat16 (hk 2), converted inside the SIMD passes.
  const uint16_t* zh = nullptr;
  uint16_t* gh = nullptr;
  int hk = 0;
};

// A float as 16 bits of kind hk (1 float16, 2 bfloat16), rounded once.
template <class T>
inline void store_half(const Problem<T>& p, double v, uint16_t* at, int hk) {
  const float f = float(v);
  p.f32_to_half(&f, at, 1, hk - 1);
}

template <class T>
inline RowPtrs<T> row_ptrs(const Problem<T>& p, int64_t n) {
  return {p.in.logits + n * p.in.row_stride,
          p.probs ? p.in.probs + n * p.in.probs_row_stride : nullptr,
          p.grad ? p.grad + n * p.C : nullptr};
}

template <class T>
inline BlockIn<T> block_in(const Problem<T>& p, const RowPtrs<T>& rp, int64_t k, T* e, T* t) {
  BlockIn<T> b;
  const int64_t off = k * kBlock<T>;
  b.z = rp.z ? rp.z + off : nullptr;
  b.zh = rp.zh ? rp.zh + off : nullptr;
  b.hk = rp.hk;
  b.e = e ? e + off : nullptr;
  b.t = (e && t) ? t + off : nullptr;
  b.n = p.block_len(k);
  b.alpha = T(p.alpha);
  b.cap = T(p.cap);
  b.w = p.in.weight ? p.in.weight + off : nullptr;
  b.p = rp.prob ? rp.prob + off : nullptr;
  b.q1 = T(1.0 - p.eps);
  b.q0 = T(p.eps / double(p.C_total));
  b.wd_mode = p.probs ? 2 : (p.eps > 0.0 ? 1 : 0);
  return b;
}

// What a counted row needs after its block statistics are merged.
struct RowResult {
  double loss;
  double M;   // row max of z' (-inf: degenerate row; 0 with the softcap's fixed shift)
  double a;   // gradient factor of exp(z' - M), chain factor alpha included: an / S
  double b;   // gradient offset per unit of u, alpha included
  double s;   // this row's scale (1/D times its sample weight)
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

// Whether the softcap's fixed shift is on (see kFixedShift), as the kernel decides it.
template <class T>
inline bool fixed_shift(const Problem<T>& p) {
  return fixed_shift_cap(T(p.cap));
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

// A softcap that rounds to 0 in T (float32 below about 7e-46) would run the kernel without
// its transform: refused, before anything is written.
template <class T>
inline void check_cap_in(double cap, const char* dtype) {
  if (cap > 0.0 && !(T(cap) > T(0))) {
    char buf[160];
    std::snprintf(buf, sizeof buf, "softcap = %g rounds to 0 in %s: it must be at least %g",
                  cap, dtype, double(std::numeric_limits<T>::denorm_min()));
    throw std::invalid_argument(buf);
  }
}

// The gradient entry from e, in double: (an (c e) - b u) d with c = exp(m - M) / S (so that an
// c e = a e without forming a, which may be subnormal even in double), u the class's
// soft-target weight and d the softcap's 4 rho (1 - rho) (rho at t, or null): the slow path
// for factors that do not fit T.
template <class T>
inline double grad_entry(const Problem<T>& p, const RowResult& r, double c, double e,
                         const T* t, double w, const T* prob) {
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
                              const T* prob, const T* e, const T* t, T* g, int64_t k,
                              bool stream, AffineIn<T>* out, uint16_t* gh = nullptr,
                              int hk = 0) {
  const int64_t off = k * kBlock<T>, len = p.block_len(k);
  AffineIn<T>& a = *out;
  a.e = e + off;
  a.g = g ? g + off : nullptr;
  a.gh = gh ? gh + off : nullptr;
  a.hk = hk;
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
      if (gh) store_half(p, kNaN, gh + off + c, hk);
      else g[off + c] = T(kNaN);
    }
    return false;
  } else if (r.M == -kInf) {
    // Degenerate row: e holds zeros but the uniform limit needs e = 1: g = a - b u.
    for (int64_t c = 0; c < len; ++c) {
      double u = p.in.weight ? double(p.in.weight[off + c]) : 1.0;
      if (p.probs) u *= (1.0 - p.eps) * double(a.p[c]) + p.eps / double(p.C_total);
      if (gh) store_half(p, double(T(r.a - r.b * u)), gh + off + c, hk);
      else g[off + c] = T(r.a - r.b * u);
    }
    return false;
  } else {
    const double fa = st.m == -kInf ? 0.0 : r.a * rescale(st.m, r.M);
    if (needs_double(p, r, fa)) {
      for (int64_t c = 0; c < len; ++c) {
        const double v = grad_entry(p, r, rescale(st.m, r.M) / r.S, double(a.e[c]),
                                    a.t ? a.t + c : nullptr,
                                    p.in.weight ? double(p.in.weight[off + c]) : 1.0,
                                    prob ? a.p + c : nullptr);
        if (gh) store_half(p, double(T(v)), gh + off + c, hk);
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
                             const T* prob, const T* e, const T* t, T* g, int64_t k,
                             bool stream, uint16_t* gh = nullptr, int hk = 0) {
  AffineIn<T> a;
  if (grad_block_affine(p, st, r, prob, e, t, g, k, stream, &a, gh, hk)) p.fns->affine(a);
}

// The target entry a e_y - q_y cancels when softmax_y is near 1: redo it in double from the
// saved logit, rounding once (class targets only).
template <class T>
inline T target_value(const Problem<T>& p, const RowResult& r, double zy_t, double dzy,
                      int64_t y) {
  const double wy = p.in.weight ? double(p.in.weight[y]) : 1.0;
  const double ey = r.M == -kInf ? 1.0 : std::exp(zy_t - r.M);
  // r.a and r.b carry alpha; the softcap's chain factor at y replaces it.
  const double scale = dzy / p.alpha;
  return T(scale * (a_times(r, ey) - r.b * wy - r.s * (1.0 - p.eps) * wy * p.alpha));
}

template <class T>
inline void fix_target(const Problem<T>& p, const RowResult& r, double zy_t, double dzy, T* g,
                       int64_t y, uint16_t* gh = nullptr, int hk = 0) {
  if (std::isnan(r.a)) return;  // a NaN row stays NaN
  // In T first, then (16-bit rows) rounded once more to the storage type.
  const T v = target_value(p, r, zy_t, dzy, y);
  if (gh) store_half(p, double(v), gh + y, hk);
  else g[y] = v;
}

// The target logit through the transform (class targets; 0 for probability targets).
template <class T>
inline double target_logit(const Problem<T>& p, int64_t n, double* dz,
                           const T* zrow = nullptr, const uint16_t* zh = nullptr, int hk = 0) {
  *dz = p.alpha;
  if (p.probs) return 0.0;
  const int64_t y = p.in.target[n];
  if (zrow) return transform(p, double(zrow[y]), dz);
  if (zh) {
    float f;
    p.half_to_f32(zh + y, &f, 1, hk - 1);
    return transform(p, double(f), dz);
  }
  if (p.inner == 1) return transform(p, double(p.in.logits[n * p.in.row_stride + y]), dz);
  const int64_t o = n / p.inner, i = n % p.inner;
  return transform(p, double(p.in.logits[(o * p.C + y) * p.inner + i]), dz);
}


// The column path (class axis not last: the (rows / inner, C, inner) layout).
template <class T>
void cross_entropy_cols(const Problem<T>& p, int nt, double* losses);

extern template void cross_entropy_cols<float>(const Problem<float>&, int, double*);
extern template void cross_entropy_cols<double>(const Problem<double>&, int, double*);

// Rows of at most this many classes (the row layout) take short_rows: transposed tiles
// through the column kernel.
inline constexpr int64_t kShortRowClasses = 32;

template <class T>
void short_rows(const Problem<T>& p, int nt, double* losses);

extern template void short_rows<float>(const Problem<float>&, int, double*);
extern template void short_rows<double>(const Problem<double>&, int, double*);

}  // namespace detail
}  // namespace fastxent
