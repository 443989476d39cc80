// The row kernel, written once over a vector-traits type (VF for float, VD for double) and
// compiled once per ISA: each isa_*.cpp defines FASTXENT_ISA_NS, includes its traits header
// and then this file, so every symbol here lives in an ISA-specific namespace (an inline
// function compiled with AVX-512 flags can never be picked by the linker for an AVX2 caller).
//
// Precision policy
// - max: exact (in the storage type).
// - exp(z - m): polynomial in the storage type (below), after Cody-Waite range reduction
//   x = n ln2 + r, |r| <= ln2/2. float: degree 6, max error 1.3 ULP; double: Taylor to
//   degree 13, max error 1.0 ULP. AVX-512 float: n in sixteenths, |r| <= ln2/32, a 16-entry
//   table of 2^(j/16) and degree 3, max error 1.05 ULP (two fewer multiply-adds; see vexp).
//   All measured over [ln(min normal), 0] by tests/cpp/test_kernel.cpp, which fails above
//   2 ULP. Results below the smallest normal (x < ln(FLT_MIN) = -87.34, or ln(DBL_MIN) =
//   -708.4) flush to +0. Domain x <= 0 (the kernel only feeds z - max). NaN propagates.
// - sums of exp and of w*(z - m): vector accumulators in the storage type over chunks of
//   32 W elements (16 additions per lane), each chunk's total added into a double; blocks
//   (kBlock<T>) and rows are merged in double.
// - gradient: a * e - b * w in the storage type with a, b computed in double and rounded once.
//   The driver recomputes the target-class entry in double (see cross_entropy.cpp).
//
// Expects the traits VF, VD of the same namespace to be declared first.

#pragma once

#include <cstdint>
#include <limits>

#include "half_impl.hpp"
#include "kernel_table.hpp"

#ifndef FASTXENT_ISA_NS
#error "define FASTXENT_ISA_NS (the ISA namespace) before including this header"
#endif

// A read prefetch into L2 (MSVC has no __builtin_prefetch).
#ifndef FASTXENT_PREFETCH
#if defined(_MSC_VER) && !defined(__clang__)
#include <xmmintrin.h>
#define FASTXENT_PREFETCH(p) _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T1)
#else
#define FASTXENT_PREFETCH(p) __builtin_prefetch((p), 0, 2)
#endif
#endif
// A prefetch for writing (PREFETCHW where the ISA flags allow it, else into L1).
#ifndef FASTXENT_PREFETCH_W
#if defined(_MSC_VER) && !defined(__clang__)
#include <intrin.h>
#define FASTXENT_PREFETCH_W(p) _m_prefetchw(reinterpret_cast<const void*>(p))
#else
#define FASTXENT_PREFETCH_W(p) __builtin_prefetch((p), 1, 3)
#endif
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
  static constexpr float magic16 = 786432.0f;  // 1.5 * 2^19: rounds to a multiple of 1/16
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

// An empty asm that takes v in a vector register and may change it (GCC and Clang on x86):
// without it GCC 12 kept a sum accumulator of several AVX-512 block passes (the plain forward
// and fused ones among them) in a stack slot, an add, store and reload per step of the loop.
// With it (Zen 4, 1 thread, in cache): forward 64x4000 61.0 -> 58.3 us, 256x1000 83.3 -> 81.0.
template <class R>
inline void in_register(R& v) {
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
  asm("" : "+v"(v));
#else
  (void)v;
#endif
}

// Whether the traits V offer the fused AVX-512 operations (scale_unless_below,
// fmadd_unless_zero, recip12, neg_abs).
template <class V, class = void>
struct HasFused {
  static constexpr bool value = false;
};
template <class V>
struct HasFused<V, decltype(void(V::kFused))> {
  static constexpr bool value = V::kFused;
};
template <class V>
constexpr bool fused() {
  return HasFused<V>::value;
}

// Whether the traits V look up 2^(j/16) (exp2_sixteenths): then vexp uses the table form
// (AVX-512 float, where it saves two of ten multiply-add-pipe operations; see vexp).
template <class V, class = void>
struct HasExpTable {
  static constexpr bool value = false;
};
template <class V>
struct HasExpTable<V, decltype(void(V::kExpTable))> {
  static constexpr bool value = V::kExpTable;
};
template <class V>
constexpr bool exp_table() {
  return HasExpTable<V>::value;
}

// exp(x) for x <= 0 (the kernel feeds x = z - max). No clamping: inputs below lo produce
// garbage in the range reduction, which the final select replaces by +0. RANGED: the caller
// guarantees x in [lo, 88] (or NaN): no select (the softcap with a fixed shift).
template <class V, bool RANGED = false>
inline typename V::R vexp(typename V::R x) {
  using T = typename V::T;
  using K = ExpConst<T>;
  if constexpr (exp_table<V>()) {
    // x = n ln2 + r with n a multiple of 1/16 (magic16) and |r| <= ln2/32: exp(x) =
    // 2^floor(n) * T_j * exp(r), T_j = 2^(j/16), j = 16 (n - floor(n)) = the low 4 bits of t
    // (the table's index; vscalefps takes floor(n) itself). exp(r) = 1 + r q with
    // q = 1 + r/2 + r^2/6, and T_j exp(r) = T_j + (T_j r) q in one rounding. Error, in ULP
    // of the result: T_j's rounding <= 0.45 (T_0 = 1 is exact; for j >= 1 the result is in
    // [1, 2)), the final rounding 0.5, truncation <= 0.15: <= 1.1 (1.05 measured by the
    // kernel test; 1.07 at most over 2.5M points of [-87.3, 88], the softcap's range).
    // exp(0) = 1 exactly. Cost: 8 operations on the multiply-add pipes per vector instead of
    // 10 (plus one vpermps): the exp loop alone runs 17% faster on Zen 4 (0.150 vs 0.180 ns
    // per float, in cache). AVX2's vpermps has 8 entries: a 16-entry table would take two
    // and a blend, so the AVX2 and scalar kernels keep the degree-6 polynomial.
    const typename V::R t = V::fmadd(x, V::set1(K::log2e), V::set1(K::magic16));
    const typename V::R n = V::sub(t, V::set1(K::magic16));
    typename V::R r = V::fmadd(n, V::set1(-K::ln2_hi), x);
    r = V::fmadd(n, V::set1(-K::ln2_lo), r);
    const typename V::R tj = V::exp2_sixteenths(t);
    typename V::R q = V::fmadd(V::set1(T(1) / T(6)), r, V::set1(T(0.5)));
    q = V::fmadd(q, r, V::set1(T(1)));
    const typename V::R y = V::fmadd(V::mul(tj, r), q, tj);
    if constexpr (RANGED) return V::scale(y, n);
    else return V::scale_unless_below(y, n, x, V::set1(K::lo));
  }
  typename V::R t = V::fmadd(x, V::set1(K::log2e), V::set1(K::magic));
  typename V::R n = V::sub(t, V::set1(K::magic));
  typename V::R r = V::fmadd(n, V::set1(-K::ln2_hi), x);
  r = V::fmadd(n, V::set1(-K::ln2_lo), r);
  if constexpr (fused<V>()) {
    // One vscalefps (p * 2^n, exact) under a zero mask: the same bits as below.
    if constexpr (RANGED) return V::scale(exp_poly<V>(r), n);
    else return V::scale_unless_below(exp_poly<V>(r), n, x, V::set1(K::lo));
  } else {
    typename V::R y = V::mul(exp_poly<V>(r), V::pow2_from_magic(t, K::bias, K::shift));
    if constexpr (RANGED) return y;
    else return V::zero_if_less(x, V::set1(K::lo), y);
  }
}

// rho = 1 / (1 + exp(-|u|)), in [1/2, 1]: the softcap's tanh is |tanh(u / 2)| = 2 rho - 1 and
// its derivative 1 - tanh^2(u / 2) = 4 rho (1 - rho). exp(-|u|) <= 1 stays in vexp's domain.
// The caller passes u = 2 v (the 2 folded into its scale). rho carries about 1 ULP of 1/2, so
// 2 rho - 1 about 2 ULP of 1/2 = 1 ULP of 1 in absolute terms (below the ULP of cap tanh
// once multiplied by cap; relative error grows as |u| -> 0, where tanh(u / 2) ~ u / 2).
template <class V>
inline typename V::R vsoftcap_rho(typename V::R u) {
  using T = typename V::T;
  const typename V::R one = V::set1(T(1));
  if constexpr (fused<V>()) {
    // 1 + e is in [1, 2]: a reciprocal estimate refined once instead of the division.
    return V::recip12(V::add(one, vexp<V>(V::neg_abs(u))));
  } else {
    return V::div(one, V::add(one, vexp<V>(V::sub(V::set1(T(0)), V::abs(u)))));
  }
}

template <class V>
struct Row {
  using T = typename V::T;
  using R = typename V::R;
  static constexpr int64_t W = V::W;

  // 16-bit storage (T = float): HK 1 float16, 2 bfloat16. len < W lanes are filled with
  // `fill`; the conversions are exact, and the roundings to 16 bits those of half_impl.hpp.
  template <int HK>
  static R loadh(const uint16_t* p, int64_t len, T fill) {
    if constexpr (V::kHasHalf) {
      if (len >= W) return HK == 1 ? V::load_f16(p) : V::load_bf16(p);
    }
    T tmp[W];
    for (int64_t j = 0; j < len && j < W; ++j)
      tmp[j] = T(HK == 1 ? f16_to_f32_scalar(p[j]) : bf16_to_f32_scalar(p[j]));
    return V::load_partial(tmp, len, fill);
  }
  template <int HK>
  static void storeh(uint16_t* p, R v, int64_t len) {
    if constexpr (V::kHasHalf) {
      if (len >= W) {
        if constexpr (HK == 1) V::store_f16(p, v); else V::store_bf16(p, v);
        return;
      }
    }
    T tmp[W];
    V::store(tmp, v);
    for (int64_t j = 0; j < len && j < W; ++j)
      p[j] = HK == 1 ? f32_to_f16_scalar(float(tmp[j])) : f32_to_bf16_scalar(float(tmp[j]));
  }

  // Logits i .. i + len of a block, from T storage (HK 0) or 16-bit storage.
  template <int HK>
  static R loadz(const BlockIn<T>& in, int64_t i, int64_t len, T fill) {
    if constexpr (HK == 0) return len >= W ? V::load(in.z + i) : V::load_partial(in.z + i, len, fill);
    else return loadh<HK>(in.zh + i, len, fill);
  }
  template <int HK>
  static T zat(const BlockIn<T>& in, int64_t i) {
    if constexpr (HK == 0) return in.z[i];
    else return T(HK == 1 ? f16_to_f32_scalar(in.zh[i]) : bf16_to_f32_scalar(in.zh[i]));
  }

  template <int HK>
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

  // Gradient entries i .. i + len of an AffineIn (see AffineIn).
  template <bool HAS_W, bool HAS_P, bool CAP>
  struct GradK {
    R va, vb, vq1, vq0;
    explicit GradK(const AffineIn<T>& in)
        : va(V::set1(CAP ? T(4) * in.a : in.a)), vb(V::set1(CAP ? T(4) * in.b : in.b)),
          vq1(V::set1(in.q1)), vq0(V::set1(in.q0)) {}
    R operator()(const AffineIn<T>& in, int64_t i, int64_t len) const {
      R bu = vb;
      if constexpr (HAS_P || HAS_W) {
        R u = HAS_P ? V::fmadd(loadn(in.p + i, len), vq1, vq0) : loadn(in.w + i, len);
        if constexpr (HAS_P && HAS_W) u = V::mul(u, loadn(in.w + i, len));
        bu = V::mul(vb, u);
      }
      // One rounding for a * e - b u when u = 1 (the cancellation near softmax = target).
      R r = V::fmsub(loadn(in.e + i, len), va, bu);
      if constexpr (CAP) {
        const R rho = loadn(in.t + i, len);
        r = V::mul(r, V::fnmadd(rho, rho, rho));
      }
      return r;
    }
  };

  // u * x, but exactly 0 where u == 0: a class with no weight (or no probability) contributes
  // nothing even when its logit is -inf (0 * -inf would be NaN). TR = 2 (softcap): x is
  // finite (z' lies in [-cap, cap]) or NaN (and a NaN logit makes the row NaN anyway), so the
  // plain fused multiply-add gives the same result.
  // acc + u * x (one rounding where the ISA fuses it).
  template <int TR = 0>
  static R add_weighted(R acc, R u, R x) {
    if constexpr (TR >= 2) {
      return V::fmadd(u, x, acc);
    } else if constexpr (fused<V>()) {
      return V::fmadd_unless_zero(u, x, acc);
    } else {
      return V::add(acc, V::zero_if_less(V::abs(u), V::set1(std::numeric_limits<T>::denorm_min()),
                                         V::mul(u, x)));
    }
  }

  static R loadn(const T* p, int64_t len) {
    return len >= W ? V::load(p) : V::load_partial(p, len, T(0));
  }
  static void storen(T* p, R v, int64_t len) {
    if (len >= W) V::store(p, v); else V::store_partial(p, v, len);
  }

  // The constants of the transform: alpha, 2 alpha / cap (the tanh is taken of half its
  // argument), cap and 2 cap.
  struct Xf {
    R alpha, inv, cap, cap2;
    Xf(T a, T c)
        : alpha(V::set1(a)), inv(V::set1(c > T(0) ? T(2) * a / c : T(0))), cap(V::set1(c)),
          cap2(V::set1(T(2) * c)) {}
  };

  // z' by transform kind TR: 0 identity, 1 alpha z, 2 cap * tanh(alpha z / cap), computed as
  // sign(z) (2 cap rho - cap) with rho = vsoftcap_rho(2 alpha z / cap), which goes to *rho
  // (the gradient pass takes 1 - tanh^2 = 4 rho (1 - rho) from it).
  template <int TR>
  static R transform(R zz, const Xf& k, R* rho) {
    if constexpr (TR >= 2) {
      const R u = V::mul(zz, k.inv);
      *rho = vsoftcap_rho<V>(u);
      return V::copysign(V::fmsub(*rho, k.cap2, k.cap), u);
    } else if constexpr (TR == 1) {
      return V::mul(zz, k.alpha);
    } else {
      return zz;
    }
  }

  // 3: the softcap with the fixed shift 0 (cap <= kFixedShift<T>), 2: with the block max.
  static int transform_kind(T alpha, T cap) {
    if (cap > T(0)) return fixed_shift_cap(cap) ? 3 : 2;
    return alpha != T(1) ? 1 : 0;
  }

  // Elements lo .. hi of the side gradient block (BlockIn::side), through affine.
  static void side_piece(const AffineIn<T>& side, int64_t lo, int64_t hi) {
    if (hi <= lo) return;
    AffineIn<T> a = side;
    a.e += lo;
    if (a.g) a.g += lo;
    if (a.gh) a.gh += lo;
    if (a.w) a.w += lo;
    if (a.p) a.p += lo;
    if (a.t) a.t += lo;
    a.n = hi - lo;
    affine(a);
  }

  // The statistics of one block, given its transformed max mt. Template flags:
  //   STORE: write e = exp(z' - mt); TR: the transform (2: softcap, also writes rho (see
  //   transform) to t when STORE; 3: the same with mt = 0: x = z', and no underflow test);
  //   WD 0: nothing more; 1: wd = sum w (z' - mt) (class targets with smoothing);
  //   2: wd = sum u (z' - mt), usum = sum u, u = w (q1 p + q0) (probability targets).
  //   SIDE: also write in.side (another row's gradient block of the same length, always with
  //   non-temporal stores: the caller fences), two vectors of it before each two vectors of
  //   this block, at positions of its g aligned to a vector (W T); the head up to the first
  //   goes through side_piece first, and the tail after the last too, first in a short block
  //   and half-way through a long one. The side is always ahead of the block: its e and t
  //   may be this block's e and t at the same offsets (one scratch row for both rows: each
  //   line is read for the side just before the block overwrites it, so the block's stores
  //   find it in L1). HAS_W is then the side's as well.
  //   NEXT: also the max of in.znext (see BlockIn), two vectors after each two vectors of
  //   this block; prefetching then runs two blocks ahead (the lines of the next block must
  //   be in L2 by the time this block's loop loads them).
  template <bool STORE, int TR, int WD, bool HAS_W, int HK, bool SIDE = false, bool NEXT = false>
  static BlockStat block_impl(const BlockIn<T>& in_ref, T mt) {
    // A local copy: the stores through e and t cannot alias it, so its pointers stay in
    // registers instead of being reloaded after every store.
    const BlockIn<T> in = in_ref;
    const int64_t n = in.n;
    const R vm = V::set1(mt);
    const Xf xf(in.alpha, in.cap);
    const R vq1 = V::set1(in.q1), vq0 = V::set1(in.q0);
    double sum = 0.0, wd = 0.0, usum = 0.0;
    // Chunks of kChunk elements: two float accumulators of W lanes each take 16 additions
    // per lane at most before the chunk's total moves into a double, so the float
    // accumulation error stays below 16 u of the chunk's sum whatever the block length.
    constexpr int64_t kChunk = 32 * W;
    // The side's constants, the first of its elements at an aligned position of its g (hd),
    // and the end of what the loop has written of it (sdone).
    static_assert(!SIDE || (STORE && HK == 0), "the side runs with stored exponentials");
    const AffineIn<T>* side = SIDE ? in.side : nullptr;
    const GradK<HAS_W, WD == 2, (TR >= 2)> gk(SIDE ? *side : AffineIn<T>{});
    int64_t sdone = 0, send = 0;
    const bool tail_first = n < 4 * kChunk;  // else half-way (see below)
    if constexpr (SIDE) {
      const int64_t mis = int64_t(reinterpret_cast<uintptr_t>(side->g) % (W * sizeof(T)));
      int64_t hd = mis == 0 ? 0 : (int64_t(W * sizeof(T)) - mis) / int64_t(sizeof(T));
      if (mis % int64_t(sizeof(T)) != 0 || hd > n) hd = n;  // unaligned T: no streaming
      // The loop below makes n / (2 W) steps of two vectors; the side takes 2 W elements in
      // each while they last, from hd to send.
      const int64_t steps = (n - hd) / (2 * W);
      sdone = hd;
      send = hd + steps * 2 * W;
      // The tail's last line, partly this block's and partly the next one's (unless g is
      // aligned to a vector), takes plain stores: in a long block it is fetched for writing
      // now and written half-way through, so that its read for ownership does not hold up the
      // stream (the next block's head then finds the line in cache).
      if (hd != 0) FASTXENT_PREFETCH_W(side->g + n);
      side_piece(*side, 0, hd);
      if (tail_first) side_piece(*side, send, n);
    }
    static_assert(!NEXT || HK == 0, "the next block's max is taken from T storage");
    const T ninf = -std::numeric_limits<T>::infinity();
    R mx0 = V::set1(ninf), mx1 = mx0;
    int64_t nx = 0;
    constexpr int64_t kAhead = NEXT ? 2 * kBlock<T> : kBlock<T>;
    for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
      const int64_t c1 = c0 + kChunk < n ? c0 + kChunk : n;
      // Two sets of accumulators (sum of e, of w z', of u), kept in registers (in_register).
      R s0 = V::set1(T(0)), s1 = s0, w0 = s0, w1 = s0, u0 = s0, u1 = s0;
      int64_t i = c0;
      auto step = [&](int64_t j, int64_t len, R& as, R& aw, R& au) {
        R t;
        R x = transform<TR>(loadz<HK>(in, j, len, T(0)), xf, &t);
        if constexpr (TR != 3) x = V::sub(x, vm);
        if (len < W) x = V::keep_first(x, len);  // masked lanes add nothing to any sum
        R y = vexp<V, TR == 3>(x);
        if (len < W) y = V::keep_first(y, len);
        if constexpr (STORE) {
          storen(in.e + j, y, len);
          if constexpr (TR >= 2) storen(in.t + j, t, len);
        }
        as = V::add(as, y);
        if constexpr (WD == 1) {
          if constexpr (HAS_W) {
            aw = add_weighted<TR>(aw, loadn(in.w + j, len), x);
          } else {
            aw = V::add(aw, x);
          }
        }
        if constexpr (WD == 2) {
          R u = V::fmadd(loadn(in.p + j, len), vq1, vq0);
          if constexpr (HAS_W) u = V::mul(u, loadn(in.w + j, len));
          if (len < W) u = V::keep_first(u, len);
          aw = add_weighted<TR>(aw, u, x);
          au = V::add(au, u);
        }
      };
      for (; i + 2 * W <= c1; i += 2 * W) {
        // The next block streams in from memory while this one is computed from L1: every
        // 64-byte line of it (2 W elements span two lines with AVX-512 floats).
        if constexpr (HK == 0) {
          for (int64_t b = 0; b < 2 * W * int64_t(sizeof(T)); b += 64)
            FASTXENT_PREFETCH(reinterpret_cast<const char*>(in.z + i + kAhead) + b);
        } else {
          for (int64_t b = 0; b < 2 * W * 2; b += 64)
            FASTXENT_PREFETCH(reinterpret_cast<const char*>(in.zh + i + kBlock<T>) + b);
        }
        if constexpr (SIDE) {
          if (sdone < send) {
            V::stream(side->g + sdone, gk(*side, sdone, W));
            V::stream(side->g + sdone + W, gk(*side, sdone + W, W));
            sdone += 2 * W;
          }
        }
        step(i, W, s0, w0, u0);
        step(i + W, W, s1, w1, u1);
        in_register(s0);
        in_register(s1);
        if constexpr (WD != 0) {
          in_register(w0);
          in_register(w1);
        }
        if constexpr (WD == 2) {
          in_register(u0);
          in_register(u1);
        }
        if constexpr (NEXT) {
          if (nx + 2 * W <= in.nnext) {
            mx0 = V::max(mx0, V::load(in.znext + nx));
            mx1 = V::max(mx1, V::load(in.znext + nx + W));
            nx += 2 * W;
          }
        }
      }
      for (; i < c1; i += W) step(i, c1 - i, s0, w0, u0);
      // The side's tail, half-way through the block (long blocks; before the block's
      // stores reach it).
      if constexpr (SIDE) {
        if (!tail_first && c0 < n / 2 && c1 >= n / 2) side_piece(*side, send, n);
      }
      sum += V::hsum(V::add(s0, s1));
      if constexpr (WD != 0) wd += V::hsum(V::add(w0, w1));
      if constexpr (WD == 2) usum += V::hsum(V::add(u0, u1));
    }
    BlockStat st{double(mt), sum, wd, usum};
    if constexpr (NEXT) {
      for (; nx + W <= in.nnext; nx += W) mx0 = V::max(mx0, V::load(in.znext + nx));
      if (nx < in.nnext) mx1 = V::max(mx1, V::load_partial(in.znext + nx, in.nnext - nx, ninf));
      st.znext_max = double(V::hmax(V::max(mx0, mx1)));
    }
    return st;
  }

  // A block whose max is -inf: every entry is -inf, or NaN hides among -inf entries. Rare;
  // scalar. wd is the raw sum u z' here (the caller cannot shift by a -inf max).
  template <int HK>
  static BlockStat degenerate(const BlockIn<T>& in) {
    // The side first: its e may be the scratch row this block's e goes to (see block_impl).
    if (in.side) affine(*in.side);
    bool nan = false;
    double wz = 0.0, usum = 0.0;
    for (int64_t i = 0; i < in.n; ++i) {
      const T z = zat<HK>(in, i);
      nan |= z != z;
      double u = in.w ? double(in.w[i]) : 1.0;
      if (in.p) u *= double(in.q1) * double(in.p[i]) + double(in.q0);
      // z' of -inf is -inf (also through the softcap: cap * tanh(-inf) = -cap, but a -inf
      // logit means "masked", so it stays masked).
      if (u != 0.0) wz += u * double(z);  // no weight: no contribution, even at -inf
      usum += u;
      if (in.e) in.e[i] = z != z ? z : T(0);
    }
    return {-std::numeric_limits<double>::infinity(),
            nan ? std::numeric_limits<double>::quiet_NaN() : 0.0, wz, usum};
  }

  template <bool STORE, int TR, int HK, bool SIDE, bool NEXT>
  static BlockStat block_mode_n(const BlockIn<T>& in, T mt) {
    switch (in.wd_mode) {
      // WD 0 reads no weights itself; with a side, HAS_W is the side's (its g = a e - b w).
      case 0: return SIDE && in.w ? block_impl<STORE, TR, 0, true, HK, SIDE, NEXT>(in, mt)
                                  : block_impl<STORE, TR, 0, false, HK, SIDE, NEXT>(in, mt);
      case 1: return in.w ? block_impl<STORE, TR, 1, true, HK, SIDE, NEXT>(in, mt)
                          : block_impl<STORE, TR, 1, false, HK, SIDE, NEXT>(in, mt);
      default: return in.w ? block_impl<STORE, TR, 2, true, HK, SIDE, NEXT>(in, mt)
                           : block_impl<STORE, TR, 2, false, HK, SIDE, NEXT>(in, mt);
    }
  }
  // The next block's max only from T storage and where blocks take a max (not TR 3).
  template <bool STORE, int TR, int HK, bool SIDE>
  static BlockStat block_mode_s(const BlockIn<T>& in, T mt) {
    if constexpr (HK == 0 && TR != 3) {
      if (in.znext) return block_mode_n<STORE, TR, HK, SIDE, true>(in, mt);
    }
    return block_mode_n<STORE, TR, HK, SIDE, false>(in, mt);
  }
  // With a side only where exponentials are stored from T storage (the streamed rows).
  template <bool STORE, int TR, int HK>
  static BlockStat block_mode(const BlockIn<T>& in, T mt) {
    if constexpr (STORE && HK == 0) {
      if (in.side) return block_mode_s<true, TR, 0, true>(in, mt);
    } else {
      if (in.side) {
        affine(*in.side);  // first, as in degenerate
        return block_mode_s<STORE, TR, HK, false>(in, mt);
      }
    }
    return block_mode_s<STORE, TR, HK, false>(in, mt);
  }

  static BlockStat block(const BlockIn<T>& in) {
    if constexpr (sizeof(T) == 4) {
      if (in.zh) return in.hk == 1 ? block_k<1>(in) : block_k<2>(in);
    }
    return block_k<0>(in);
  }

  template <int HK>
  static BlockStat block_k(const BlockIn<T>& in) {
    const int kind = transform_kind(in.alpha, in.cap);
    if (kind == 3) return in.e ? block_mode<true, 3, HK>(in, T(0)) : block_mode<false, 3, HK>(in, T(0));
    const T m = in.has_zmax ? in.zmax : maxz<HK>(in);
    // All -inf: masked, unless a softcap maps -inf to the finite -cap (then the block is
    // ordinary: every z' = -cap).
    if (m == -std::numeric_limits<T>::infinity() && !(in.cap > T(0))) return degenerate<HK>(in);
    // The transformed max through the same vector code as the elements, so that the block's
    // largest element gives exactly x = 0. (alpha > 0 and tanh are increasing.)
    R t;
    const R vm = V::set1(m);
    const Xf xf(in.alpha, in.cap);
    switch (kind) {
      case 2: {
        const T mt = V::hmax(transform<2>(vm, xf, &t));
        return in.e ? block_mode<true, 2, HK>(in, mt) : block_mode<false, 2, HK>(in, mt);
      }
      case 1: {
        const T mt = V::hmax(transform<1>(vm, xf, &t));
        return in.e ? block_mode<true, 1, HK>(in, mt) : block_mode<false, 1, HK>(in, mt);
      }
      default:
        return in.e ? block_mode<true, 0, HK>(in, m) : block_mode<false, 0, HK>(in, m);
    }
  }

  // g = d * (a * e - b * u): u = w (or 1) without probability targets, w (q1 p + q0) with
  // them; d = 1 - tanh^2 = 4 rho (1 - rho) with a softcap (rho stored at t; the 4 goes into
  // a and b, exactly), else 1.
  template <bool HAS_W, bool HAS_P, bool CAP, bool STREAM, int HK>
  static void affine_impl(const AffineIn<T>& in) {
    const GradK<HAS_W, HAS_P, CAP> gk(in);
    T* g = in.g;
    const int64_t n = in.n;
    auto f = [&](int64_t i, int64_t len) { return gk(in, i, len); };
    int64_t i = 0;
    if constexpr (HK != 0) {
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

  template <bool HAS_W, bool HAS_P, bool CAP>
  static void affine_s(const AffineIn<T>& in) {
    if constexpr (sizeof(T) == 4) {
      if (in.gh) {
        if (in.hk == 1) affine_impl<HAS_W, HAS_P, CAP, false, 1>(in);
        else affine_impl<HAS_W, HAS_P, CAP, false, 2>(in);
        return;
      }
    }
    if (in.stream) affine_impl<HAS_W, HAS_P, CAP, true, 0>(in);
    else affine_impl<HAS_W, HAS_P, CAP, false, 0>(in);
  }
  template <bool HAS_W, bool HAS_P>
  static void affine_c(const AffineIn<T>& in) {
    if (in.t) affine_s<HAS_W, HAS_P, true>(in); else affine_s<HAS_W, HAS_P, false>(in);
  }
  static void affine(const AffineIn<T>& in) {
    if (in.w) {
      if (in.p) affine_c<true, true>(in); else affine_c<true, false>(in);
    } else {
      if (in.p) affine_c<false, true>(in); else affine_c<false, false>(in);
    }
  }

  static double dot(const T* a, const T* b, int64_t n) {
    double total = 0.0;
    constexpr int64_t kChunk = 32 * W;
    for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
      const int64_t c1 = c0 + kChunk < n ? c0 + kChunk : n;
      R s0 = V::set1(T(0)), s1 = s0;
      int64_t i = c0;
      for (; i + 2 * W <= c1; i += 2 * W) {
        s0 = V::fmadd(V::load(a + i), V::load(b + i), s0);
        s1 = V::fmadd(V::load(a + i + W), V::load(b + i + W), s1);
      }
      for (; i < c1; i += W) s0 = V::fmadd(loadn(a + i, c1 - i), loadn(b + i, c1 - i), s0);
      total += V::hsum(V::add(s0, s1));
    }
    return total;
  }

  static void mul_sub(const T* p, const T* g, T d, T* out, int64_t n) {
    const R vd = V::set1(d);
    for (int64_t i = 0; i < n; i += W) {
      const int64_t len = n - i < W ? n - i : W;
      storen(out + i, V::mul(loadn(p + i, len), V::sub(loadn(g + i, len), vd)), len);
    }
  }

  static RowFns<T> fns();
};

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

  template <bool STORE, int TR, int WD, bool HAS_W, bool CAPTURE>
  static void group(const ColIn<T>& in, int64_t i0, int64_t len) {
    const int64_t C = in.C, ld = in.ld;
    const T ninf = -std::numeric_limits<T>::infinity();
    R m = V::set1(TR == 3 ? T(0) : ninf);
    // CAPTURE: zy = z[y] per lane (see ColIn::ycls), in the first pass down the class axis.
    const R one = V::set1(T(1));
    R vy = V::set1(T(-1)), vc = V::set1(T(0)), zy = V::set1(T(0));
    if constexpr (CAPTURE) vy = Rw::loadn(in.ycls + i0, len);
    if constexpr (TR != 3) {
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
    // TR 3: the fixed shift 0 (see kFixedShift).
    R mt = TR == 3 ? m : Rw::template transform<TR>(m, xf, &tm);
    // Lanes whose max is -inf (all -inf) use 0 as their shift: their e come out 0, not NaN.
    const R lowest = V::set1(std::numeric_limits<T>::lowest());
    const R shift = TR >= 2 ? mt : V::zero_if_less(m, lowest, mt);
    {
      T tmpm[W], tmpt[W];
      V::store(tmpm, m);
      V::store(tmpt, mt);
      for (int64_t j = 0; j < len; ++j) {
        in.m[i0 + j] = tmpm[j] == ninf && TR < 2 ? -std::numeric_limits<double>::infinity()
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
        if constexpr (CAPTURE && TR == 3) {
          zy = V::select_eq(vy, vc, z, zy);
          vc = V::add(vc, one);
        }
        R x = Rw::template transform<TR>(z, xf, &t);
        if constexpr (TR != 3) x = V::sub(x, shift);
        R y = vexp<V, TR == 3>(x);
        if constexpr (STORE) {
          Rw::storen(in.e + c * in.eld + i0, y, len);
          if constexpr (TR >= 2) Rw::storen(in.t + c * in.tld + i0, t, len);
        }
        s = V::add(s, y);
        const R wc = V::set1(HAS_W ? in.w[c] : T(1));
        if constexpr (WD == 1) d = Rw::template add_weighted<TR>(d, wc, x);
        if constexpr (WD == 2) {
          R u = V::mul(V::fmadd(Rw::loadn(in.p + off, len), vq1, vq0), wc);
          d = Rw::template add_weighted<TR>(d, u, x);
          us = V::add(us, u);
        }
      }
      flush(s, in.s + i0, len);
      if constexpr (WD != 0) flush(d, in.wd + i0, len);
      if constexpr (WD == 2) flush(us, in.usum + i0, len);
    }
    if constexpr (CAPTURE) Rw::storen(in.zy + i0, zy, len);
  }

  template <bool STORE, int TR, int WD, bool HAS_W>
  static void stats_impl(const ColIn<T>& in) {
    for (int64_t i0 = 0; i0 < in.L; i0 += W) {
      const int64_t len = in.L - i0 < W ? in.L - i0 : W;
      if (in.ycls) group<STORE, TR, WD, HAS_W, true>(in, i0, len);
      else group<STORE, TR, WD, HAS_W, false>(in, i0, len);
    }
  }
  template <bool STORE, int TR>
  static void stats_mode(const ColIn<T>& in) {
    switch (in.wd_mode) {
      case 0: return stats_impl<STORE, TR, 0, false>(in);
      case 1: return in.w ? stats_impl<STORE, TR, 1, true>(in) : stats_impl<STORE, TR, 1, false>(in);
      default: return in.w ? stats_impl<STORE, TR, 2, true>(in) : stats_impl<STORE, TR, 2, false>(in);
    }
  }
  static void stats(const ColIn<T>& in) {
    switch (Rw::transform_kind(in.alpha, in.cap)) {
      case 3: return in.e ? stats_mode<true, 3>(in) : stats_mode<false, 3>(in);
      case 2: return in.e ? stats_mode<true, 2>(in) : stats_mode<false, 2>(in);
      case 1: return in.e ? stats_mode<true, 1>(in) : stats_mode<false, 1>(in);
      default: return in.e ? stats_mode<true, 0>(in) : stats_mode<false, 0>(in);
    }
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
      const R va = V::mul(four, Rw::loadn(in.a + i0, len)), vb = V::mul(four, Rw::loadn(in.b + i0, len));
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
  template <bool HAS_W, bool HAS_P, bool CAP>
  static void affine_t(const ColAffineIn<T>& in) {
    if (in.ycls) affine_impl<HAS_W, HAS_P, CAP, true>(in);
    else affine_impl<HAS_W, HAS_P, CAP, false>(in);
  }
  template <bool HAS_W, bool HAS_P>
  static void affine_c(const ColAffineIn<T>& in) {
    if (in.t) affine_t<HAS_W, HAS_P, true>(in); else affine_t<HAS_W, HAS_P, false>(in);
  }
  static void affine(const ColAffineIn<T>& in) {
    if (in.w) {
      if (in.p) affine_c<true, true>(in); else affine_c<true, false>(in);
    } else {
      if (in.p) affine_c<false, true>(in); else affine_c<false, false>(in);
    }
  }
};

template <class V>
RowFns<typename V::T> Row<V>::fns() {
  return {&Row::block, &Row::affine, &Col<V>::stats, &Col<V>::affine, &Row::dot, &Row::mul_sub};
}

}  // namespace FASTXENT_ISA_NS
}  // namespace fastxent
