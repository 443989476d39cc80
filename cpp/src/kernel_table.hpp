// The ISA-neutral interface between the driver (cross_entropy.cpp, baseline flags) and the
// per-row SIMD passes, which are compiled once per ISA (isa_*.cpp) from kernel_impl.hpp.
// Adding an ISA: see isa_list.hpp (a traits header under simd/ that meets kernel_contract.hpp,
// a three-line isa_<name>.cpp, its entry in isa_list.hpp, its flags in CMakeLists.txt).
#pragma once

#include <cstdint>
#include <limits>

#include "distill_table.hpp"
#include "isa_list.hpp"
#include "sigmoid_table.hpp"

namespace fastxent {

// Rows are processed in blocks of kBlock<T> classes at fixed positions (0, kBlock<T>, ...).
// Each block yields its own (max, sum) statistics, merged in block order in double: the result
// is the same whichever thread computed which block, so the class axis can be split across
// threads without changing a bit. A block is 16 KiB (4096 floats, 2048 doubles). Its max is
// taken by the previous block's pass when the driver chains them (BlockIn::znext; otherwise
// by a max loop of its own, after which the block is still in L1), and logits are prefetched
// two blocks ahead (one without chaining, with the fixed-shift softcap and for 16-bit logits).
// 16 KiB was measured the fastest with chaining (the next block's logits then stay in L1 until
// its own pass; blocks past L1 are slower): docs/design.md. Block length does not bound the
// accuracy: float partial sums move into double every 16 additions per lane.
template <class T>
constexpr int64_t kBlock = int64_t(16384 / sizeof(T));

// A softcap of at most kFixedShift<T> bounds z' to [-cap, cap], where exp(z') neither
// overflows nor leaves the normal range: the block pass then shifts by 0 instead of the block
// max (BlockStat::m = 0, s = sum exp(z')), which saves the max pass, the subtraction and the
// exp's underflow test. The row's factor a = s Q / S then spans
// e^+-cap more range than with the max shift; write_grad_block takes a double path for a
// block whose a or b would leave the comfortable range of T (needs_double). 32: Gemma 2's
// final-logit cap of 30 is in, its attention-logit cap of 50 is not.
template <class T>
constexpr T kFixedShift = sizeof(T) == 4 ? T(32) : T(256);

// Whether a softcap of cap (as T, the value the kernel uses) takes the fixed shift: the one
// rule for the block pass (Transform::SoftcapFixedShift) and for the callers' double path.
template <class T>
constexpr bool fixed_shift_cap(T cap) {
  return cap > T(0) && cap <= kFixedShift<T>;
}

// The kernel's modes, by name (each a template parameter of the passes; kernel_modes.hpp
// lists the instantiations).
//
// The transform z -> z' of the logits (alpha: logit scale, cap: softcap; see transform_of).
enum class Transform : uint8_t {
  Identity,           // z' = z (alpha 1, no softcap)
  Scale,              // z' = alpha z
  Softcap,            // z' = cap tanh(alpha z / cap), exp(z' - m') with m' the block max
  SoftcapFixedShift,  // the same with the fixed shift m' = 0 (cap <= kFixedShift<T>): no max
                      // pass, no underflow test
};
// The sums a statistics pass takes besides sum exp(z' - m').
enum class TargetSums : uint8_t {
  None,           // class targets without smoothing
  Smoothed,       // wd = sum w (z' - m'): class targets with label smoothing
  Probabilities,  // wd = sum u (z' - m') and usum = sum u, u = w (q1 p + q0): probability targets
};
// How logits are read and gradients written: in T itself, or as 16 bits (T = float only),
// converted in registers. The public HalfKind maps onto Float16 / BFloat16 at the entry point.
enum class Storage : uint8_t { Native, Float16, BFloat16 };

constexpr bool softcap(Transform tr) {
  return tr == Transform::Softcap || tr == Transform::SoftcapFixedShift;
}

// The transform for a logit scale alpha and a softcap cap (0: none), as T.
template <class T>
constexpr Transform transform_of(T alpha, T cap) {
  if (cap > T(0)) return fixed_shift_cap(cap) ? Transform::SoftcapFixedShift : Transform::Softcap;
  return alpha != T(1) ? Transform::Scale : Transform::Identity;
}

// g = d * (a e - b u), u = w (or 1), or w (q1 p + q0) with probability targets;
// d = 1 - tanh^2 = 4 rho (1 - rho) with a softcap (rho at t, not null), else 1. g may equal e.
template <class T>
struct AffineIn {
  const T* e;
  T* g;
  int64_t n;
  T a, b;
  const T* w;
  const T* p;
  T q1, q0;
  const T* t;
  bool stream;  // non-temporal stores; the caller then calls fence() before reusing g
  // 16-bit gradient (T = float only, no streaming): when gh is set, g is rounded once to
  // `storage` (Float16 or BFloat16) and stored at gh instead of g.
  uint16_t* gh = nullptr;
  Storage storage = Storage::Native;
  // The entropy term (entropy_coef > 0, T storage only): when z is set, g gains
  // d * c * e * x with x = z' - zshift recomputed from the logits z (through alpha, and with a
  // softcap from rho at t and the sign of z), c carrying the chain factor like a (so g =
  // d (a e + c e x - b u)). Where c e is 0 the term is exactly 0 (even at x = -inf).
  const T* z = nullptr;
  T c = 0, zshift = 0, alpha = 1, cap = 0;
};

// What one block pass reads and writes. z' is the transformed logit: cap * tanh(alpha z / cap)
// with a softcap (cap > 0), alpha z without.
template <class T>
struct BlockIn {
  const T* z;
  T* e;             // e = exp(z' - m') is stored here when not null (may equal z)
  T* t;             // softcap only: rho = 1 / (1 + exp(-|2 alpha z / cap|)) is stored here when
                    // e is stored (1 - tanh^2(alpha z / cap) = 4 rho (1 - rho))
  int64_t n;        // <= kBlock<T>
  T alpha;          // logit scale (> 0; 1 for none)
  T cap;            // softcap (0 for none)
  const T* w;       // class weights of the block, or null
  const T* p;       // probability targets of the block, or null
  T q1, q0;         // u = w (q1 p + q0): smoothing of probability targets
  TargetSums sums;  // the sums besides sum exp (see TargetSums)
  // 16-bit logits (T = float only): when zh is set the n logits are read from zh instead of
  // z, as `storage` (Float16 or BFloat16), and converted in registers.
  const uint16_t* zh = nullptr;
  Storage storage = Storage::Native;
  // Another row's gradient block of the same length n (streamed rows: the previous row's
  // block k while this row's block k is computed), written two vectors at a time inside this
  // pass's loop when not null: the output stream then runs under the exp instead of after
  // it. The written values are those of affine(*side) alone; the side is always streamed
  // (its stream flag is not read; the caller fences), has no 16-bit gradient (gh null), and
  // its e and t may alias this block's only at the same offsets (see Row::block_impl).
  const AffineIn<T>* side = nullptr;
  // The next block's logits (T storage; later in the row, or the next row's first block),
  // or null: its raw max comes back as BlockStat::znext_max, taken along this block's loop
  // (its lines then move into L1 under the exp instead of in a max pass of their own).
  const T* znext = nullptr;
  int64_t nnext = 0;
  // has_zmax: zmax is this block's raw max (taken by the previous block's pass).
  bool has_zmax = false;
  T zmax = 0;
  // Also the entropy sum BlockStat::ez = sum e (z' - m') (T storage only).
  bool entropy = false;
};

// Statistics of one block: m = max z' (m'), s = sum exp(z' - m), wd and usum as asked.
// A block with m = -inf (all -inf) has s = 0 (NaN if it holds a NaN) and wd = sum u z.
struct BlockStat {
  double m;
  double s;
  double wd;
  double usum;
  // The raw max of BlockIn::znext; NaN where it was not taken (or is NaN).
  double znext_max = std::numeric_limits<double>::quiet_NaN();
  // sum e (z' - m) (BlockIn::entropy; 0 otherwise and for a block with m = -inf).
  double ez = 0.0;
  // This block's raw max (of z, before the transform) where the pass took it (-inf for a
  // block of -inf); NaN where it did not (the softcap's fixed shift takes no max).
  double zmax = std::numeric_limits<double>::quiet_NaN();
};

// Column tiles, for a class axis that is not the last: the (outer, C, inner) layout. Lane i
// of a tile is one row: its element c sits at z[c * ld + i], i < L. Vectorised across lanes.
template <class T>
struct ColIn {
  const T* z;
  int64_t C, L, ld;
  T* e;  // e = exp(z' - m') stored in z's layout when e is not null
  T* t;  // with a softcap and e: rho (see BlockIn) stored at t[c * tld + i]
  int64_t tld;
  T alpha, cap;
  const T* w;  // class weights (C) or null
  const T* p;  // probability targets in z's layout, or null
  T q1, q0;
  TargetSums sums;  // as BlockIn
  // Per-lane outputs (L each): m' (-inf for a lane of -inf), sum exp, wd, usum.
  double *m, *s, *wd, *usum;
  // Class targets: each lane's class index as T (-1: none), and where to put the lane's raw
  // logit of that class, picked up on the way down the class axis (the class axis has a
  // stride of a whole inner plane, so a separate read of it would miss the cache per row).
  const T* ycls = nullptr;
  T* zy = nullptr;
  int64_t eld = 0;  // e's leading dimension: ld when e is the gradient, kTile for a scratch tile
};

// g = keep ? d (a e - b u) : 0 per lane, u and d as AffineIn; a, b, keep: L values each.
template <class T>
struct ColAffineIn {
  const T* e;
  T* g;
  int64_t C, L, ld;
  const T *a, *b, *keep;
  const T* w;
  const T* p;
  T q1, q0;
  const T* t;
  int64_t tld;
  int64_t eld;  // e's leading dimension (g's is ld)
  // Where a lane's class index (as T; -1: none) matches c, g is the lane's tv instead: the
  // target entries, computed in double by the caller, written in the same pass.
  const T* ycls = nullptr;
  const T* tv = nullptr;
  bool stream = false;  // non-temporal stores of g where aligned; the caller fences
};

template <class T>
struct RowFns {
  BlockStat (*block)(const BlockIn<T>& in);
  // Rows of one block each (see Row::block_rows): `rows` block passes, row r's at in.z + r zs
  // (its e at in.e + r es, its probabilities at in.p + r ps), into out[0 .. rows).
  void (*block_rows)(const BlockIn<T>& in, int64_t rows, int64_t zs, int64_t es, int64_t ps,
                     BlockStat* out);
  void (*affine)(const AffineIn<T>& in);
  void (*col_stats)(const ColIn<T>& in);
  void (*col_affine)(const ColAffineIn<T>& in);
  // Softmax backward pieces: sum_c a_c b_c (float partial sums moved into double every 32 W
  // elements), and out = p * (g - d).
  double (*dot)(const T* a, const T* b, int64_t n);
  void (*mul_sub)(const T* p, const T* g, T d, T* out, int64_t n);
  // The per-row finish of the column and short-row paths, across rows, in double (the same
  // functions for both T): out[i] = log(x[i]) and exp(x[i]), n values (kernel_log.hpp).
  void (*row_log)(const double* x, double* out, int64_t n);
  void (*row_exp)(const double* x, double* out, int64_t n);
};

struct KernelTable {
  const char* name;
  RowFns<float> f32;
  RowFns<double> f64;
  void (*fence)();  // orders non-temporal stores before later stores
  SigmoidFns<float> sig_f32;
  SigmoidFns<double> sig_f64;
  DistillFns<float> dist_f32;
  DistillFns<double> dist_f64;
  // Float16 / BFloat16 storage <-> float32, n elements (storage is never Native).
  void (*half_to_f32)(const uint16_t* src, float* dst, int64_t n, Storage storage);
  void (*f32_to_half)(const float* src, uint16_t* dst, int64_t n, Storage storage);
  // Capabilities the driver asks of the ISA (from its traits, see kernel_caps.hpp).
  bool prefers_streaming_stores;  // large gradients go out with non-temporal stores
};

template <class T>
inline const SigmoidFns<T>& sigmoid_fns(const KernelTable& t);
template <>
inline const SigmoidFns<float>& sigmoid_fns<float>(const KernelTable& t) {
  return t.sig_f32;
}
template <>
inline const SigmoidFns<double>& sigmoid_fns<double>(const KernelTable& t) {
  return t.sig_f64;
}

template <class T>
inline const DistillFns<T>& distill_fns(const KernelTable& t);
template <>
inline const DistillFns<float>& distill_fns<float>(const KernelTable& t) {
  return t.dist_f32;
}
template <>
inline const DistillFns<double>& distill_fns<double>(const KernelTable& t) {
  return t.dist_f64;
}

template <class T>
inline const RowFns<T>& row_fns(const KernelTable& t);
template <>
inline const RowFns<float>& row_fns<float>(const KernelTable& t) {
  return t.f32;
}
template <>
inline const RowFns<double>& row_fns<double>(const KernelTable& t) {
  return t.f64;
}

// One per compiled ISA (each defined in its isa_<name>.cpp), from the registry.
#define FASTXENT_DECLARE_TABLE(name, usable) const KernelTable& name##_table();
FASTXENT_FOR_EACH_ISA(FASTXENT_DECLARE_TABLE)
#undef FASTXENT_DECLARE_TABLE

// The table in use (dispatch.cpp).
const KernelTable& active_table();

}  // namespace fastxent
