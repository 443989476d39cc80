// The column path: a class axis that is not the last one, PyTorch's (N, C, d1, ..., dk) with
// axis=1, read in place as (outer, C, inner) without a transposed copy. Tiles of kTile
// positions of the inner axis are vectorised across positions (one row per SIMD lane) and
// walk down the class axis; a tile (C x kTile) stays in L1/L2 between the statistics pass and
// the gradient pass. Each row's arithmetic does not depend on the tiling or on the threads,
// so results are bitwise identical for any thread count.
#include <algorithm>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "ce_detail.hpp"
#include "threads.hpp"

namespace fastxent {
namespace detail {

namespace {
constexpr int64_t kTile = 256;
}

template <class T>
void cross_entropy_cols(const Problem<T>& p, int nt, double* losses) {
  const int64_t inner = p.inner, C = p.C;
  const int64_t outer = p.in.rows / inner;
  const int64_t tiles = (inner + kTile - 1) / kTile;
  const int64_t items = outer * tiles;
  const bool smooth = p.eps > 0.0;

  auto run = [&](int64_t begin, int64_t end) {
    std::vector<double> m(kTile), s(kTile), wd(kTile), us(kTile), zy(kTile), dz(kTile);
    std::vector<T> a(kTile), b(kTile), keep(kTile);
    std::vector<RowResult> rr(kTile);
    std::vector<T> tbuf(p.cap > 0.0 && p.grad ? size_t(C * kTile) : 0);
    for (int64_t it = begin; it < end; ++it) {
      const int64_t o = it / tiles, i0 = (it % tiles) * kTile;
      const int64_t L = std::min(kTile, inner - i0);
      const int64_t base = o * C * inner + i0;
      const int64_t n0 = o * inner + i0;
      for (int64_t j = 0; j < L; ++j)
        if (p.counted(n0 + j)) zy[j] = target_logit(p, n0 + j, &dz[j]);  // before in place
      T* g = p.grad ? p.grad + base : nullptr;
      ColIn<T> ci;
      ci.z = p.in.logits + base;
      ci.C = C;
      ci.L = L;
      ci.ld = inner;
      ci.e = g;
      // The softcap's tanh goes to a (C x L, leading dimension kTile) scratch tile.
      ci.t = tbuf.empty() ? nullptr : tbuf.data();
      ci.tld = kTile;
      ci.alpha = T(p.alpha);
      ci.cap = T(p.cap);
      ci.w = p.in.weight;
      ci.p = p.probs ? p.in.probs + base : nullptr;
      ci.q1 = T(1.0 - p.eps);
      ci.q0 = T(p.eps / double(C));
      ci.wd_mode = p.probs ? 2 : (smooth ? 1 : 0);
      ci.m = m.data();
      ci.s = s.data();
      ci.wd = wd.data();
      ci.usum = us.data();
      p.fns->col_stats(ci);
      for (int64_t j = 0; j < L; ++j) {
        const int64_t n = n0 + j;
        if (!p.counted(n)) {
          losses[n] = 0.0;
          a[j] = b[j] = keep[j] = T(0);
          continue;
        }
        const BlockStat st{m[j], s[j], wd[j], us[j]};
        rr[j] = finish_row(p, &st, n, zy[j]);
        losses[n] = rr[j].loss;
        a[j] = T(rr[j].a);
        b[j] = T(rr[j].b);
        keep[j] = T(1);
      }
      if (!g) continue;
      ColAffineIn<T> ca;
      ca.e = g;
      ca.g = g;
      ca.C = C;
      ca.L = L;
      ca.ld = inner;
      ca.a = a.data();
      ca.b = b.data();
      ca.keep = keep.data();
      ca.w = p.in.weight;
      ca.p = ci.p;
      ca.q1 = ci.q1;
      ca.q0 = ci.q0;
      ca.t = ci.t;
      ca.tld = kTile;
      p.fns->col_affine(ca);
      for (int64_t j = 0; j < L; ++j) {
        const int64_t n = n0 + j;
        if (!p.counted(n) || std::isnan(rr[j].a)) continue;
        const RowResult& r = rr[j];
        if (r.M == -kInf) {
          // Every class -inf: the uniform limit g = a - b u (e is 0 there).
          for (int64_t c = 0; c < C; ++c) {
            double u = p.in.weight ? double(p.in.weight[c]) : 1.0;
            if (p.probs) u *= (1.0 - p.eps) * double(ci.p[c * inner + j]) + p.eps / double(C);
            g[c * inner + j] = T(r.a - r.b * u);
          }
        }
        if (!p.probs) {
          const int64_t y = p.in.target[n];
          const double wy = p.in.weight ? double(p.in.weight[y]) : 1.0;
          const double ey = r.M == -kInf ? 1.0 : std::exp(zy[j] - r.M);
          g[y * inner + j] =
              T(dz[j] / p.alpha * (r.a * ey - r.b * wy - r.s * (1.0 - p.eps) * wy * p.alpha));
        }
      }
    }
  };

  parallel_chunks(int(std::min<int64_t>(nt, std::max<int64_t>(items, 1))), items, run);
}

template void cross_entropy_cols<float>(const Problem<float>&, int, double*);
template void cross_entropy_cols<double>(const Problem<double>&, int, double*);

}  // namespace detail
}  // namespace fastxent
