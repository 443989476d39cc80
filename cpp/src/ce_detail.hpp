// Internals shared by the row path (cross_entropy.cpp, ce_rows.cpp, cross_entropy_half.cpp),
// the column path (cross_entropy_cols.cpp) and the shards (shard.cpp): the problem description,
// the thresholds and checks, and where a row's data lives. The per-row formula around the SIMD
// passes: ce_row.hpp. Baseline flags only.
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
// sets it. The default: 64 MiB for Intel CPUs and for the AVX-512 kernel, where streaming
// measured faster; never otherwise (the AVX2 kernel on AMD measured faster with plain stores).
// The measurements: docs/design.md.
int64_t stream_threshold();

// Whether CPUID names the vendor GenuineIntel (dispatch.cpp).
bool cpu_is_intel();

// Rows of at least this many bytes take the two-pass gradient: block statistics first (the
// row is read, nothing written), then per block exp again with the same block max (the same
// bits) and the gradient written at once from L1 (XNNPACK's two-pass softmax, Dukhan and
// Ablavatski 2020): 12 bytes of memory traffic per float instead of 16 for rows too long for
// L2, at the price of a second exp. 0 = never (FASTXENT_RECOMPUTE_BYTES=N turns it on). Off by
// default: measured slower where the exp, not memory, bounds the kernel (docs/design.md).
int64_t recompute_threshold();

// Throws std::out_of_range, naming row n, unless the class index y is in [0, classes) or is
// ignore_index.
void check_class(int64_t n, int64_t y, int64_t classes, int64_t ignore_index);

// Throws std::invalid_argument unless v is finite and >= 0 (> 0 when `positive`).
void check_finite(double v, const char* what, bool positive);

// Throws std::invalid_argument for Options::entropy_coef != 0 at an entry point without it.
void reject_entropy_coef(const Options& opt, const char* where);

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
  int64_t C_total;  // the C of eps / C: C, or the whole vocabulary for a shard
  int64_t inner;    // 1: rows; > 1: the (rows / inner, C, inner) column layout
  T* grad;
  double eps, lambda, alpha, cap;
  double W;                // sum of class weights (C without weights)
  const double* block_w;   // class weights per block (class targets with smoothing)
  double s;                // 1/D for "mean", 1 otherwise
  bool zero_all;           // D == 0 for "mean": loss and gradient are 0
  bool stream;             // non-temporal gradient stores through a scratch row
  bool recompute = false;  // two-pass gradient: statistics first, then exp again per block
  bool probs;              // probability targets
  // Per-row outputs and the entropy term (cross_entropy with RowOutputs or entropy_coef; the
  // row path only: no streaming, no recompute, no short rows, no split rows).
  bool extras = false;     // any of the below
  bool ent = false;        // the entropy sums (entropy output or beta > 0)
  bool e_scratch = false;  // e goes to the scratch row (in place, where z is read after)
  double beta = 0.0;       // entropy_coef
  RowOutputs<T> outs{};
  const RowFns<T>* fns;
  void (*fence)();
  // float <-> 16-bit conversions of the active ISA (see KernelTable).
  void (*half_to_f32)(const uint16_t* src, float* dst, int64_t n, Storage storage);
  void (*f32_to_half)(const float* src, uint16_t* dst, int64_t n, Storage storage);

  int64_t block_len(int64_t k) const { return k + 1 < nb ? kBlock<T> : C - k * kBlock<T>; }
  bool counted(int64_t n) const { return !zero_all && (probs || in.target[n] != ignore_index); }
  // The class weights as the gradient's u = w (q1 p + q0) and the smoothing sums read them:
  // none with class targets and no smoothing, where u only enters as b u with b = 0 (an
  // infinite weight of a class no row targets would make 0 * inf = NaN there).
  const T* u_weight() const { return probs || eps > 0.0 ? in.weight : nullptr; }
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
  // `storage` (Float16 or BFloat16), converted inside the SIMD passes.
  const uint16_t* zh = nullptr;
  uint16_t* gh = nullptr;
  Storage storage = Storage::Native;
};

// A float as 16 bits of `storage` (Float16 or BFloat16), rounded once.
template <class T>
inline void store_half(const Problem<T>& p, double v, uint16_t* at, Storage storage) {
  const float f = float(v);
  p.f32_to_half(&f, at, 1, storage);
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
  b.storage = rp.storage;
  b.e = e ? e + off : nullptr;
  b.t = (e && t) ? t + off : nullptr;
  b.n = p.block_len(k);
  b.alpha = T(p.alpha);
  b.cap = T(p.cap);
  b.w = p.u_weight() ? p.u_weight() + off : nullptr;
  b.p = rp.prob ? rp.prob + off : nullptr;
  b.q1 = T(1.0 - p.eps);
  b.q0 = T(p.eps / double(p.C_total));
  b.sums =
      p.probs ? TargetSums::Probabilities : (p.eps > 0.0 ? TargetSums::Smoothed : TargetSums::None);
  b.entropy = p.ent;
  return b;
}

// Whether the softcap's fixed shift is on (see kFixedShift), as the kernel decides it.
template <class T>
inline bool fixed_shift(const Problem<T>& p) {
  return fixed_shift_cap(T(p.cap));
}

// A softcap that rounds to 0 in T (float32 below about 7e-46) would run the kernel without
// its transform: refused, before anything is written.
template <class T>
inline void check_cap_in(double cap, const char* dtype) {
  if (cap > 0.0 && !(T(cap) > T(0))) {
    char buf[160];
    std::snprintf(buf, sizeof buf, "softcap = %g rounds to 0 in %s: it must be at least %g", cap,
                  dtype, double(std::numeric_limits<T>::denorm_min()));
    throw std::invalid_argument(buf);
  }
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
