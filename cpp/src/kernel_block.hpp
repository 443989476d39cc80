// The row block pass: the statistics of one block of a row (max, sum of exp, weighted sums),
// optionally storing the exponentials, writing another row's gradient block alongside (the
// side) and taking the next block's max; and the dispatch from a BlockIn to the
// instantiation of block_impl that serves it.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "isa_ns.hpp"
#include "kernel_row.hpp"

namespace fastxent {
namespace FASTXENT_ISA_NS {

// Elements lo .. hi of the side gradient block (BlockIn::side), through affine.
template <class V>
inline void Row<V>::side_piece(const AffineIn<T>& side, int64_t lo, int64_t hi) {
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
//   STORE: write e = exp(z' - mt); TR: the transform (Softcap: also writes rho (see
//   transform) to t when STORE; SoftcapFixedShift: the same with mt = 0: x = z', and no
//   underflow test); WD: the sums (TargetSums): None: nothing more; Smoothed: wd = sum w
//   (z' - mt); Probabilities: wd = sum u (z' - mt), usum = sum u, u = w (q1 p + q0);
//   HK: the logits' storage.
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
//   ENT: also ez = sum e (z' - mt) (the entropy's sum; exactly 0 where e is 0, even at a -inf
//   logit).
template <class V>
template <bool STORE, Transform TR, TargetSums WD, bool HAS_W, Storage HK, bool SIDE, bool NEXT,
          bool ENT>
inline BlockStat Row<V>::block_impl(const BlockIn<T>& in_ref, T mt) {
  // A local copy: the stores through e and t cannot alias it, so its pointers stay in
  // registers instead of being reloaded after every store.
  const BlockIn<T> in = in_ref;
  const int64_t n = in.n;
  const R vm = V::set1(mt);
  const Xf xf(in.alpha, in.cap);
  const R vq1 = V::set1(in.q1), vq0 = V::set1(in.q0);
  double sum = 0.0, wd = 0.0, usum = 0.0;
  [[maybe_unused]] double ez = 0.0;
  // Chunks of kChunk elements: two float accumulators of W lanes each take 16 additions
  // per lane at most before the chunk's total moves into a double, so the float
  // accumulation error stays below 16 u of the chunk's sum whatever the block length.
  constexpr int64_t kChunk = 32 * W;
  // The side's constants, the first of its elements at an aligned position of its g (hd),
  // and the end of what the loop has written of it (sdone).
  static_assert(!SIDE || (STORE && HK == Storage::Native),
                "the side runs with stored exponentials");
  const AffineIn<T>* side = SIDE ? in.side : nullptr;
  const GradK<HAS_W, WD == TargetSums::Probabilities, softcap(TR)> gk(SIDE ? *side : AffineIn<T>{});
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
  static_assert(!NEXT || HK == Storage::Native, "the next block's max is taken from T storage");
  const T ninf = -std::numeric_limits<T>::infinity();
  R mx0 = V::set1(ninf), mx1 = mx0;
  int64_t nx = 0;
  constexpr int64_t kAhead = NEXT ? 2 * kBlock<T> : kBlock<T>;
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const int64_t c1 = c0 + kChunk < n ? c0 + kChunk : n;
    // Two sets of accumulators (sum of e, of w z', of u), kept in registers (in_register).
    R s0 = V::set1(T(0)), s1 = s0, w0 = s0, w1 = s0, u0 = s0, u1 = s0, h0 = s0, h1 = s0;
    int64_t i = c0;
    auto step = [&](int64_t j, int64_t len, R& as, R& aw, R& au, [[maybe_unused]] R& ah) {
      R t;
      R x = transform<TR>(loadz<HK>(in, j, len, T(0)), xf, &t);
      if constexpr (TR != Transform::SoftcapFixedShift) x = V::sub(x, vm);
      if (len < W) x = V::keep_first(x, len);  // masked lanes add nothing to any sum
      R y = vexp<V, TR == Transform::SoftcapFixedShift>(x);
      if (len < W) y = V::keep_first(y, len);
      if constexpr (STORE) {
        storen(in.e + j, y, len);
        if constexpr (softcap(TR)) storen(in.t + j, t, len);
      }
      as = V::add(as, y);
      // y x: one operation. x = -inf (a -inf logit, where y = 0) makes it NaN: such a block
      // is summed again by ent_redo below (x is finite with a softcap).
      if constexpr (ENT) ah = V::fmadd(y, x, ah);
      if constexpr (WD == TargetSums::Smoothed) {
        if constexpr (HAS_W) {
          aw = add_weighted<TR>(aw, loadn(in.w + j, len), x);
        } else {
          aw = V::add(aw, x);
        }
      }
      if constexpr (WD == TargetSums::Probabilities) {
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
      if constexpr (HK == Storage::Native) {
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
      step(i, W, s0, w0, u0, h0);
      step(i + W, W, s1, w1, u1, h1);
      in_register(s0);
      in_register(s1);
      if constexpr (ENT) {
        in_register(h0);
        in_register(h1);
      }
      if constexpr (WD != TargetSums::None) {
        in_register(w0);
        in_register(w1);
      }
      if constexpr (WD == TargetSums::Probabilities) {
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
    for (; i < c1; i += W) step(i, c1 - i, s0, w0, u0, h0);
    // The side's tail, half-way through the block (long blocks; before the block's
    // stores reach it).
    if constexpr (SIDE) {
      if (!tail_first && c0 < n / 2 && c1 >= n / 2) side_piece(*side, send, n);
    }
    sum += V::hsum(V::add(s0, s1));
    if constexpr (WD != TargetSums::None) wd += V::hsum(V::add(w0, w1));
    if constexpr (WD == TargetSums::Probabilities) usum += V::hsum(V::add(u0, u1));
    if constexpr (ENT) ez += V::hsum(V::add(h0, h1));
  }
  BlockStat st{double(mt), sum, wd, usum};
  if constexpr (ENT) {
    // A NaN entropy sum with a number for sum e: the block holds -inf logits (0 * -inf).
    if constexpr (!softcap(TR)) {
      if (ez != ez && sum == sum) ez = ent_redo<TR, HK>(in, mt);
    }
    st.ez = ez;
  }
  if constexpr (NEXT) {
    for (; nx + W <= in.nnext; nx += W) mx0 = V::max(mx0, V::load(in.znext + nx));
    if (nx < in.nnext) mx1 = V::max(mx1, V::load_partial(in.znext + nx, in.nnext - nx, ninf));
    st.znext_max = double(V::hmax(V::max(mx0, mx1)));
  }
  return st;
}

// The entropy sum sum e (z' - mt) of a block holding -inf logits, each counting 0 (x clamped to
// the lowest finite T, so that 0 * x = 0): the rare second pass of block_impl's ENT sum.
template <class V>
template <Transform TR, Storage HK>
inline double Row<V>::ent_redo(const BlockIn<T>& in, T mt) {
  const R vm = V::set1(mt), lo = V::set1(std::numeric_limits<T>::lowest());
  const Xf xf(in.alpha, in.cap);
  double ez = 0.0;
  for (int64_t c0 = 0; c0 < in.n; c0 += 16 * W) {
    const int64_t c1 = c0 + 16 * W < in.n ? c0 + 16 * W : in.n;
    R h = V::set1(T(0));
    for (int64_t i = c0; i < c1; i += W) {
      const int64_t len = c1 - i < W ? c1 - i : W;
      R t;
      R x = V::sub(transform<TR>(loadz<HK>(in, i, len, T(0)), xf, &t), vm);
      if (len < W) x = V::keep_first(x, len);
      R y = vexp<V, false>(x);
      if (len < W) y = V::keep_first(y, len);
      h = V::fmadd(y, V::max(x, lo), h);
    }
    ez += V::hsum(h);
  }
  return ez;
}

// A block whose transformed max is -inf: every entry is -inf (or finite but taken to -inf by
// the scale), or NaN hides among -inf entries. Rare; scalar. wd is the raw sum u z' here
// (the caller cannot shift by a -inf max).
template <class V>
template <Storage HK>
inline BlockStat Row<V>::degenerate(const BlockIn<T>& in) {
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
    // (z' = alpha z in T: -inf also where the scale overflows a finite z)
    if (u != 0.0) wz += u * double(T(in.alpha * z));  // no weight: no contribution, even at -inf
    usum += u;
    if (in.e) in.e[i] = z != z ? z : T(0);
  }
  BlockStat st{-std::numeric_limits<double>::infinity(),
               nan ? std::numeric_limits<double>::quiet_NaN() : 0.0, wz, usum};
  st.zmax = -std::numeric_limits<double>::infinity();
  return st;
}

template <class V>
inline BlockStat Row<V>::block(const BlockIn<T>& in) {
  if constexpr (sizeof(T) == 4) {
    if (in.zh) {
      return in.storage == Storage::Float16 ? block_for<Storage::Float16>(in)
                                            : block_for<Storage::BFloat16>(in);
    }
  }
  return block_for<Storage::Native>(in);
}

// Rows of one block each (n <= kBlock<T>, T storage, no side, no next block of their own):
// row r's block pass at in.z + r zs (e at in.e + r es, probabilities at in.p + r ps), each
// taking the next row's max on the way and the next row using it, as the driver's chained
// passes (chained_block) do one call at a time: the same passes, so the same results bit for
// bit, without a call, a copy of the block's description and a dispatch per row (256 x 1000
// float32 in cache, forward, 1 thread: 69 -> 63 us on a Zen 4).
template <class V>
inline void Row<V>::block_rows(const BlockIn<T>& in, int64_t rows, int64_t zs, int64_t es,
                               int64_t ps, BlockStat* out) {
  BlockIn<T> b = in;
  for (int64_t r = 0; r < rows; ++r) {
    b.znext = r + 1 < rows ? b.z + zs : nullptr;
    b.nnext = r + 1 < rows ? b.n : 0;
    const BlockStat st = block_for<Storage::Native>(b);
    out[r] = st;
    b.has_zmax = r + 1 < rows && !std::isnan(st.znext_max);
    b.zmax = T(st.znext_max);
    b.z += zs;
    if (b.e) b.e += es;
    if (b.p) b.p += ps;
  }
}

// The block's shift mt (its transformed max, 0 for the fixed shift), or the degenerate block.
template <class V>
template <Storage HK>
inline BlockStat Row<V>::block_for(const BlockIn<T>& in) {
  BlockMode mode;
  mode.store = in.e != nullptr;
  mode.tr = transform_of(in.alpha, in.cap);
  mode.storage = HK;
  if (mode.tr == Transform::SoftcapFixedShift) return run_block(mode, in, T(0));
  const T m = in.has_zmax ? in.zmax : maxz<HK>(in);
  // All -inf: masked, unless a softcap maps -inf to the finite -cap (then the block is
  // ordinary: every z' = -cap).
  if (m == -std::numeric_limits<T>::infinity() && !(in.cap > T(0))) return degenerate<HK>(in);
  // The transformed max through the same vector code as the elements, so that the block's
  // largest element gives exactly x = 0. (alpha > 0 and tanh are increasing.)
  R t;
  const R vm = V::set1(m);
  const Xf xf(in.alpha, in.cap);
  BlockStat st;
  switch (mode.tr) {
    case Transform::Softcap:
      st = run_block(mode, in, V::hmax(transform<Transform::Softcap>(vm, xf, &t)));
      break;
    case Transform::Scale: {
      const T mt = V::hmax(transform<Transform::Scale>(vm, xf, &t));
      // A finite max that the scale takes to -inf (|alpha z| beyond T's range): every z' of
      // the block is -inf, the block is degenerate (shifting by -inf would give NaN), but
      // its raw max stays the argmax's.
      if (mt == -std::numeric_limits<T>::infinity()) {
        st = degenerate<HK>(in);
        st.zmax = double(m);
        return st;
      }
      st = run_block(mode, in, mt);
      break;
    }
    default: st = run_block(mode, in, m);
  }
  st.zmax = double(m);
  return st;
}

template <class V>
template <int I>
constexpr typename Row<V>::BlockFn Row<V>::entry() {
  constexpr BlockMode m = BlockMode::at(I);
  if constexpr (m.reachable(sizeof(T) == 4)) {
    return &block_impl<m.store, m.tr, m.sums, m.has_w, m.storage, m.side, m.next, m.ent>;
  } else {
    return nullptr;
  }
}

// The one dispatch of the block pass: completes the mode from in and calls its instantiation.
template <class V>
inline BlockStat Row<V>::run_block(BlockMode m, const BlockIn<T>& in, T mt) {
  m.sums = in.sums;
  // The side inside the loop only where exponentials are stored from T storage (the streamed
  // rows); anywhere else it is written first, as in degenerate.
  m.ent = in.entropy && m.storage == Storage::Native;
  if (in.side) {
    if (m.store && m.storage == Storage::Native && !m.ent && !in.side->z) m.side = true;
    else affine(*in.side);
  }
  // The next block's max only from T storage and where blocks take a max.
  m.next =
      in.znext != nullptr && m.storage == Storage::Native && m.tr != Transform::SoftcapFixedShift;
  // TargetSums::None reads no weights itself; with a side, HAS_W is the side's (g = a e - b w).
  m.has_w = in.w != nullptr && (m.sums != TargetSums::None || m.side);
  static constexpr auto table = mode_table<BlockFn, Row>(BlockMode::indices());
  return table[size_t(m.index())](in, mt);
}

}  // namespace FASTXENT_ISA_NS
}  // namespace fastxent
