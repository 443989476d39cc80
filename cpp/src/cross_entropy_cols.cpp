// The column path: a class axis that is not the last one, PyTorch's (N, C, d1, ..., dk) with
// axis=1, read in place as (outer, C, inner) without a transposed copy. Tiles of kTile
// positions of the inner axis are vectorised across positions (one row per SIMD lane) and
// walk down the class axis; a tile (C x kTile) stays in L1/L2 between the statistics pass and
// the gradient pass. Each row's arithmetic does not depend on the tiling or on the threads,
// so results are bitwise identical for any thread count. The target logits are picked up in
// the statistics pass and the target entries written in the gradient pass (no per-row
// reads or writes across the class axis's plane stride), and a large out= is streamed out
// with non-temporal stores.
#include <algorithm>
#include <array>
#include <utility>
#include <new>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "ce_row.hpp"
#include "threads.hpp"

namespace fastxent {
namespace detail {

namespace {
constexpr int64_t kTile = 256;
}

template <class T>
void cross_entropy_cols(const Problem<T>& problem, int nt, double* losses) {
  const int64_t inner = problem.inner, C = problem.C;
  const int64_t outer = problem.in.rows / inner;
  // Streamed gradients (p.stream): e goes to a scratch tile and the gradient out with
  // non-temporal stores, so the output is never read for ownership (as in the row path). That
  // needs 64-byte aligned class rows: a plane of `inner` positions a multiple of 64 bytes, and
  // a first tile of `head` positions up to the first aligned one, so that the others start
  // aligned (the tiling changes no row's arithmetic, only which positions share a tile).
  const bool stream = problem.stream && problem.grad && (inner * int64_t(sizeof(T))) % 64 == 0 &&
                      reinterpret_cast<uintptr_t>(problem.grad) % sizeof(T) == 0;
  const int64_t head =
      stream ? int64_t((64 - reinterpret_cast<uintptr_t>(problem.grad) % 64) % 64 / sizeof(T)) : 0;
  const int64_t tiles = (head > 0 ? 1 : 0) + (inner - head + kTile - 1) / kTile;
  const int64_t items = outer * tiles;
  const bool smooth = problem.eps > 0.0;

  auto run = [&](int64_t begin, int64_t end) {
    const Problem<T>& p = problem;
    // Per-lane scratch on the stack (about 60 KB at most: a tile has at most kTile lanes),
    // so that a small call (short rows come here once per tile of rows, often of a few rows
    // only) makes no heap allocation. Every lane's entry is written before it is read.
    const int64_t lanes = std::min(kTile, inner);
    double dbuf[9 * kTile];
    double *m = dbuf, *s = m + lanes, *wd = s + lanes, *us = wd + lanes, *zy = us + lanes,
           *dz = zy + lanes, *logs = dz + lanes, *xd = logs + lanes, *ey = xd + lanes;
    T tvals[6 * kTile];
    T *a = tvals, *b = a + lanes, *keep = b + lanes, *ycls = keep + lanes, *zraw = ycls + lanes,
      *tv = zraw + lanes;
    // The lanes' results, left uninitialised (RowResult's default member initialisers would
    // write all kTile of them, 14 KB, on every call); a counted lane's is constructed before
    // it is read, and only counted lanes' are read.
    union RowSlot {
      RowSlot() {}
      RowResult r;
    } slots[kTile];
    auto rr = [&slots](int64_t j) -> RowResult& { return slots[j].r; };
    unsigned char cnt[kTile];  // p.counted per lane
    std::vector<T> tbuf(p.cap > 0.0 && p.grad ? size_t(C * kTile) : 0);
    std::vector<T> etile(stream ? size_t(C * kTile) : 0);
    std::vector<int64_t> late;  // lanes written after the SIMD pass (see below)
    std::vector<T> slow_g;      // gradients of slow lanes, C per lane
    for (int64_t it = begin; it < end; ++it) {
      const int64_t o = it / tiles, k = it % tiles;
      const int64_t i0 = head > 0 ? (k == 0 ? 0 : head + (k - 1) * kTile) : k * kTile;
      const int64_t L = head > 0 && k == 0 ? head : std::min(kTile, inner - i0);
      const int64_t base = o * C * inner + i0;
      const int64_t n0 = o * inner + i0;
      // Class targets: the kernel picks each lane's target logit up on its way down the class
      // axis (reading them here would miss the cache once per row), and writes the target
      // entry of the gradient in its own pass. Its class counter is a T, exact below
      // 2^digits classes; past that (never in practice) the logits are read here and the
      // target entries written after.
      const bool capture = !p.probs && C < (int64_t(1) << std::numeric_limits<T>::digits);
      for (int64_t j = 0; j < L; ++j) cnt[j] = p.counted(n0 + j);
      if (capture) {
        for (int64_t j = 0; j < L; ++j) ycls[j] = cnt[j] ? T(p.in.target[n0 + j]) : T(-1);
      } else {
        for (int64_t j = 0; j < L; ++j)
          if (cnt[j]) zy[j] = target_logit(p, n0 + j, &dz[j]);  // before in place
      }
      T* g = p.grad ? p.grad + base : nullptr;
      T* e = etile.empty() ? g : etile.data();
      const int64_t eld = etile.empty() ? inner : kTile;
      ColIn<T> ci;
      ci.z = p.in.logits + base;
      ci.C = C;
      ci.L = L;
      ci.ld = inner;
      ci.e = e;
      ci.eld = eld;
      // The softcap's rho goes to a (C x L, leading dimension kTile) scratch tile.
      ci.t = tbuf.empty() ? nullptr : tbuf.data();
      ci.tld = kTile;
      ci.alpha = T(p.alpha);
      ci.cap = T(p.cap);
      ci.w = p.u_weight();
      ci.p = p.probs ? p.in.probs + base : nullptr;
      ci.q1 = T(1.0 - p.eps);
      ci.q0 = T(p.eps / double(C));
      ci.sums =
          p.probs ? TargetSums::Probabilities : (smooth ? TargetSums::Smoothed : TargetSums::None);
      ci.m = m;
      ci.s = s;
      ci.wd = wd;
      ci.usum = us;
      ci.ycls = capture ? ycls : nullptr;
      ci.zy = capture ? zraw : nullptr;
      p.fns->col_stats(ci);
      if (capture)
        for (int64_t j = 0; j < L; ++j)
          if (cnt[j]) zy[j] = transform(p, double(zraw[j]), &dz[j]);
      // Each row's log(sum exp) and its target's exponential exp(zy - m), across the tile's
      // rows in vectors (one libm call per row each was a quarter of a 32 x 10 call).
      p.fns->row_log(s, logs, L);
      if (capture && g) {
        for (int64_t j = 0; j < L; ++j) xd[j] = cnt[j] ? zy[j] - m[j] : 0.0;
        p.fns->row_exp(xd, ey, L);
      }
      for (int64_t j = 0; j < L; ++j) {
        const int64_t n = n0 + j;
        if (!cnt[j]) {
          losses[n] = 0.0;
          a[j] = b[j] = keep[j] = T(0);
          continue;
        }
        const BlockStat st{m[j], s[j], wd[j], us[j]};
        const RowResult& r = *new (&slots[j].r) RowResult(finish_row(p, &st, n, zy[j], &logs[j]));
        losses[n] = r.loss;
        a[j] = T(r.a);
        b[j] = T(r.b);
        keep[j] = T(1);
      }
      if (!g) continue;
      // Lanes the SIMD pass cannot finish: rows of all -inf (the uniform limit), factors
      // outside T's range (needs_double: the double path), NaN rows, and with `capture` off,
      // the target entries. The other lanes' target entries go into the SIMD pass (tv).
      late.clear();
      for (int64_t j = 0; j < L; ++j) {
        if (!cnt[j]) {
          if (capture) ycls[j] = T(-1);  // the SIMD pass writes 0 there
          continue;
        }
        const RowResult& r = rr(j);
        // NaN rows (one quiet NaN, as write_grad_block), rows of all -inf, the double path,
        // and the target entries when they are not picked up in the SIMD pass.
        if (std::isnan(r.a) || r.M == -kInf || needs_double(p, r, r.a) || (!capture && !p.probs)) {
          late.push_back(j);
          if (capture) ycls[j] = T(-1);
          continue;
        }
        if (capture) tv[j] = target_value(p, r, zy[j], dz[j], p.in.target[n0 + j], &ey[j]);
      }
      // The slow lanes' gradients from e before the SIMD pass overwrites it (in place).
      slow_g.resize(late.size() * size_t(C));
      for (size_t k = 0; k < late.size(); ++k) {
        const int64_t j = late[k];
        if (std::isnan(rr(j).a) || rr(j).M == -kInf || !needs_double(p, rr(j), rr(j).a)) continue;
        for (int64_t c = 0; c < C; ++c)
          slow_g[k * size_t(C) + size_t(c)] = T(grad_entry(
              p, rr(j), 1.0 / rr(j).S, double(e[c * eld + j]),
              ci.t ? ci.t + c * kTile + j : nullptr, p.u_weight() ? double(p.u_weight()[c]) : 1.0,
              ci.p ? ci.p + c * inner + j : nullptr));
      }
      ColAffineIn<T> ca;
      ca.e = e;
      ca.eld = eld;
      ca.g = g;
      ca.C = C;
      ca.L = L;
      ca.ld = inner;
      ca.a = a;
      ca.b = b;
      ca.keep = keep;
      ca.w = p.u_weight();
      ca.p = ci.p;
      ca.q1 = ci.q1;
      ca.q0 = ci.q0;
      ca.t = ci.t;
      ca.tld = kTile;
      ca.ycls = capture ? ycls : nullptr;
      ca.tv = tv;
      ca.stream = !etile.empty();
      p.fns->col_affine(ca);
      if (late.empty()) continue;
      // Plain stores into lines that may still be in flight from non-temporal ones.
      if (ca.stream) p.fence();
      for (size_t k = 0; k < late.size(); ++k) {
        const int64_t j = late[k], n = n0 + j;
        const RowResult& r = rr(j);
        if (std::isnan(r.a)) {
          for (int64_t c = 0; c < C; ++c) g[c * inner + j] = T(kNaN);
          continue;
        }
        if (r.M == -kInf) {
          // Every class -inf: the uniform limit g = a - b u (e is 0 there).
          for (int64_t c = 0; c < C; ++c) {
            double u = p.u_weight() ? double(p.u_weight()[c]) : 1.0;
            if (p.probs) u *= (1.0 - p.eps) * double(ci.p[c * inner + j]) + p.eps / double(C);
            g[c * inner + j] = T(r.a - r.b * u);
          }
        } else if (needs_double(p, r, r.a)) {
          for (int64_t c = 0; c < C; ++c) g[c * inner + j] = slow_g[k * size_t(C) + size_t(c)];
        }
        if (!p.probs) {
          const int64_t y = p.in.target[n];
          g[y * inner + j] = target_value(p, r, zy[j], dz[j], y, capture ? &ey[j] : nullptr);
        }
      }
    }
    if (!etile.empty()) p.fence();
  };

  parallel_chunks(int(std::min<int64_t>(nt, std::max<int64_t>(items, 1))), items, run);
}

namespace {
// The short-row transposes, with the class count a template parameter (CC > 0) for every
// count up to kShortRowClasses: a row's loop is then unrolled (the run-time count's loop overhead
// was most of the transposes' time at 32 x 10).
template <int CC, class T>
void transpose_rows_n(const T* src, int64_t ld, int64_t C, int64_t L, T* dst) {
  const int64_t n = CC > 0 ? CC : C;
  for (int64_t r = 0; r < L; ++r)
    for (int64_t c = 0; c < n; ++c) dst[c * L + r] = src[r * ld + c];
}
template <int CC, class T>
void transpose_tile_n(const T* src, int64_t C, int64_t L, T* dst) {
  const int64_t n = CC > 0 ? CC : C;
  for (int64_t r = 0; r < L; ++r)
    for (int64_t c = 0; c < n; ++c) dst[r * n + c] = src[c * L + r];
}
// The instantiations for CC = 0 (any count) and 1 .. kShortRowClasses, indexed by C (above:
// the run-time count, for FASTXENT_SHORT_ROWS past the default).
template <class T, int... CC>
constexpr auto transpose_tables(std::integer_sequence<int, CC...>) {
  using In = void (*)(const T*, int64_t, int64_t, int64_t, T*);
  using Out = void (*)(const T*, int64_t, int64_t, T*);
  return std::make_pair(std::array<In, sizeof...(CC)>{&transpose_rows_n<CC, T>...},
                        std::array<Out, sizeof...(CC)>{&transpose_tile_n<CC, T>...});
}
template <class T>
constexpr auto kTransposes =
    transpose_tables<T>(std::make_integer_sequence<int, int(kShortRowClasses) + 1>{});
// (L x C) rows at stride ld -> a (C x L) tile: element (r, c) at c * L + r.
template <class T>
void transpose_rows(const T* src, int64_t ld, int64_t C, int64_t L, T* dst) {
  kTransposes<T>.first[C <= kShortRowClasses ? size_t(C) : 0](src, ld, C, L, dst);
}
// A (C x L) tile -> (L x C) contiguous rows.
template <class T>
void transpose_tile(const T* src, int64_t C, int64_t L, T* dst) {
  kTransposes<T>.second[C <= kShortRowClasses ? size_t(C) : 0](src, C, L, dst);
}
}  // namespace

// Short rows (the row layout with C <= kShortRowClasses): the row kernel's fixed cost per row
// (its block pass, the merge and the gradient pass) would dwarf a few classes of work, so
// tiles of 240 rows are transposed into a C x L scratch tile, run through the column kernel
// above (one row per SIMD lane: its max, exp and sums vectorised across rows), and the
// gradient tile transposed back. Scratch is O(threads x C x 240), never N x C; tiles are
// fixed by row index, so the bits do not depend on the threads.
template <class T>
void short_rows(const Problem<T>& p, int nt, double* losses) {
  // 240 rows (15 vectors of 16 floats): a tile's leading dimension of 960 bytes, not a
  // multiple of 256, spreads the transposed stores over L1's sets (256 rows put a C = 64
  // tile's 64 lines into 4 sets, and took 3 times as long).
  constexpr int64_t kRows = 240;
  static_assert(kRows <= kTile, "a short-row tile is one column tile");
  const int64_t rows = p.in.rows, C = p.C;
  const int64_t tiles = (rows + kRows - 1) / kRows;
  auto run = [&](int64_t begin, int64_t end) {
    const size_t tile = size_t(C * std::min(kRows, rows));
    const size_t need = tile * (1 + (p.grad ? 1 : 0) + (p.probs ? 1 : 0));
    // A small call's tiles on the stack (no heap allocation), larger ones on the heap.
    constexpr size_t kStack = 2048;
    T small[kStack];
    std::vector<T> heap(need > kStack ? need : 0);
    T* zt = need > kStack ? heap.data() : small;
    T* gt = p.grad ? zt + tile : nullptr;
    T* pt = p.probs ? zt + need - tile : nullptr;
    for (int64_t it = begin; it < end; ++it) {
      const int64_t r0 = it * kRows, L = std::min(kRows, rows - r0);
      // (L x C) rows -> (C x L) tile: element (r, c) at c * L + r.
      transpose_rows(p.in.logits + r0 * p.in.row_stride, p.in.row_stride, C, L, zt);
      if (p.probs)
        transpose_rows(p.in.probs + r0 * p.in.probs_row_stride, p.in.probs_row_stride, C, L, pt);
      Problem<T> q = p;
      q.in.logits = zt;
      q.in.rows = L;
      q.in.row_stride = C;
      q.in.target = p.in.target ? p.in.target + r0 : nullptr;
      q.in.probs = pt;
      q.in.probs_row_stride = C;
      q.in.sample_weight = p.in.sample_weight ? p.in.sample_weight + r0 : nullptr;
      q.inner = L;
      q.grad = gt;
      q.stream = false;
      q.recompute = false;
      cross_entropy_cols(q, 1, losses + r0);
      if (p.grad) transpose_tile(gt, C, L, p.grad + r0 * C);
    }
  };
  const int team = rows * C >= kSerialGrain ? int(std::min<int64_t>(nt, tiles)) : 1;
  parallel_chunks(team, tiles, run);
}

template void short_rows<float>(const Problem<float>&, int, double*);
template void short_rows<double>(const Problem<double>&, int, double*);

template void cross_entropy_cols<float>(const Problem<float>&, int, double*);
template void cross_entropy_cols<double>(const Problem<double>&, int, double*);

}  // namespace detail
}  // namespace fastxent
