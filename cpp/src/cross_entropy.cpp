// The driver: argument checks, the target pre-pass, OpenMP over rows (or over blocks of the
// class axis when rows are few), the per-row formula around the SIMD block passes, and the
// ordered reduction. Compiled with baseline flags only; every ISA-specific instruction sits
// behind the function pointers of the active KernelTable.
//
// Memory traffic per row: the block pass reads z from memory (prefetching the next block)
// and writes e = exp(z' - m_block) either into the gradient row (in place, or small outputs:
// the row is then rewritten in cache) or into a per-thread scratch row, from which the
// gradient pass streams the result out with non-temporal stores. Forward only writes nothing
// N x C. Determinism: blocks sit at fixed positions and merge in block order, rows are summed
// in row order, so no result depends on the thread count or on how the work was split.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "fastxent/fastxent.hpp"
#include "kernel_table.hpp"

namespace fastxent {

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// Below this many logits a call runs on the calling thread: a parallel region costs a few
// microseconds, more than such a call's whole compute.
constexpr int64_t kSerialGrain = 1 << 15;
// Gradients larger than this (bytes) are written with non-temporal stores from a per-thread
// scratch row: no read-for-ownership of the output, 8 bytes of traffic per float logit.
// Smaller ones stay in cache for whoever reads them next.
constexpr int64_t kStreamBytes = int64_t(8) << 20;

template <class T>
struct Problem {
  Inputs<T> in;
  int64_t ignore_index;
  int64_t C, nb;
  T* grad;
  double eps, lambda, alpha, cap;
  double W;                 // sum of class weights (C without weights)
  const double* block_w;    // class weights per block (class targets with smoothing)
  double s;                 // 1/D for "mean", 1 otherwise
  bool zero_all;            // D == 0 for "mean": loss and gradient are 0
  bool stream;              // non-temporal gradient stores through a scratch row
  bool probs;               // probability targets
  const RowFns<T>* fns;
  void (*fence)();

  int64_t block_len(int64_t k) const { return k + 1 < nb ? kBlock : C - k * kBlock; }
  bool counted(int64_t n) const {
    return !zero_all && (probs || in.target[n] != ignore_index);
  }
};

// z' of one logit in double (the target's, for the loss and the target gradient entry).
template <class T>
double transform(const Problem<T>& p, double z, double* dz) {
  if (p.cap > 0.0) {
    const double t = std::tanh(p.alpha * z / p.cap);
    *dz = p.alpha * (1.0 - t * t);
    return p.cap * t;
  }
  *dz = p.alpha;
  return p.alpha * z;
}

template <class T>
BlockIn<T> block_in(const Problem<T>& p, int64_t n, int64_t k, T* e, T* t) {
  BlockIn<T> b;
  const int64_t off = k * kBlock;
  b.z = p.in.logits + n * p.in.row_stride + off;
  b.e = e ? e + off : nullptr;
  b.t = (e && t) ? t + off : nullptr;
  b.n = p.block_len(k);
  b.alpha = T(p.alpha);
  b.cap = T(p.cap);
  b.w = p.in.weight ? p.in.weight + off : nullptr;
  b.p = p.probs ? p.in.probs + n * p.in.probs_row_stride + off : nullptr;
  b.q1 = T(1.0 - p.eps);
  b.q0 = T(p.eps / double(p.C));
  b.wd_mode = p.probs ? 2 : (p.eps > 0.0 ? 1 : 0);
  return b;
}

// What a counted row needs after its block statistics are merged.
struct RowResult {
  double loss;
  double M;   // row max of z' (-inf: degenerate row)
  double a;   // gradient factor of exp(z' - M), chain factor alpha included
  double b;   // gradient offset per unit of u, alpha included
  double s;   // this row's scale (1/D times its sample weight)
};

// Merges a row's block statistics in block order (independent of who computed them).
template <class T>
RowResult finish_row(const Problem<T>& p, const BlockStat* st, int64_t n, double zy_t) {
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
  const double C = double(p.C);
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
    r.a = r.s * Q / C * p.alpha;
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
    S += st[k].s * std::exp(st[k].m - r.M);
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
  r.a = r.s * (Q + za) / S * p.alpha;
  return r;
}

// Writes block k of a counted row's gradient from its stored exponentials e.
template <class T>
void write_grad_block(const Problem<T>& p, const BlockStat& st, const RowResult& r, int64_t n,
                      const T* e, const T* t, T* g, int64_t k, bool stream) {
  const int64_t off = k * kBlock, len = p.block_len(k);
  AffineIn<T> a;
  a.e = e + off;
  a.g = g + off;
  a.n = len;
  a.b = T(r.b);
  a.w = p.in.weight ? p.in.weight + off : nullptr;
  a.p = p.probs ? p.in.probs + n * p.in.probs_row_stride + off : nullptr;
  a.q1 = T(1.0 - p.eps);
  a.q0 = T(p.eps / double(p.C));
  a.t = t ? t + off : nullptr;
  a.stream = stream;
  if (std::isnan(r.a)) {
    a.a = T(r.a);  // a NaN row stays NaN everywhere
  } else if (r.M == -kInf) {
    // Degenerate row: e holds zeros but the uniform limit needs e = 1: g = a - b u.
    for (int64_t c = 0; c < len; ++c) {
      double u = p.in.weight ? double(p.in.weight[off + c]) : 1.0;
      if (p.probs) u *= (1.0 - p.eps) * double(a.p[c]) + p.eps / double(p.C);
      g[off + c] = T(r.a - r.b * u);
    }
    return;
  } else {
    a.a = T(st.m == -kInf ? 0.0 : r.a * std::exp(st.m - r.M));
  }
  p.fns->affine(a);
}

// The target entry a e_y - q_y cancels when softmax_y is near 1: redo it in double from the
// saved logit, rounding once (class targets only).
template <class T>
void fix_target(const Problem<T>& p, const RowResult& r, double zy_t, double dzy, T* g,
                int64_t y) {
  if (std::isnan(r.a)) return;
  const double wy = p.in.weight ? double(p.in.weight[y]) : 1.0;
  const double ey = r.M == -kInf ? 1.0 : std::exp(zy_t - r.M);
  // r.a and r.b carry alpha; the softcap's chain factor at y replaces it.
  const double scale = dzy / p.alpha;
  g[y] = T(scale * (r.a * ey - r.b * wy - r.s * (1.0 - p.eps) * wy * p.alpha));
}

// The target logit through the transform (class targets; 0 for probability targets).
template <class T>
double target_logit(const Problem<T>& p, int64_t n, double* dz) {
  *dz = p.alpha;
  if (p.probs) return 0.0;
  return transform(p, double(p.in.logits[n * p.in.row_stride + p.in.target[n]]), dz);
}

// One row, start to finish, on the calling thread. st: nb entries; scratch: C entries when
// streaming; tbuf: C entries with a softcap and a gradient.
template <class T>
double compute_row(const Problem<T>& p, int64_t n, BlockStat* st, T* scratch, T* tbuf) {
  T* g = p.grad ? p.grad + n * p.C : nullptr;
  if (!p.counted(n)) {
    if (g) std::memset(static_cast<void*>(g), 0, sizeof(T) * size_t(p.C));
    return 0.0;
  }
  double dzy;
  const double zy_t = target_logit(p, n, &dzy);  // before the in-place passes overwrite z
  T* e = g ? (p.stream ? scratch : g) : nullptr;
  for (int64_t k = 0; k < p.nb; ++k) st[k] = p.fns->block(block_in(p, n, k, e, tbuf));
  const RowResult r = finish_row(p, st, n, zy_t);
  if (g) {
    for (int64_t k = 0; k < p.nb; ++k) write_grad_block(p, st[k], r, n, e, tbuf, g, k, p.stream);
    if (p.stream) p.fence();
    if (!p.probs) fix_target(p, r, zy_t, dzy, g, p.in.target[n]);
  }
  return r.loss;
}

// Fewer rows than threads (e.g. 8 x 256k): the (row, block) pairs are shared out instead of
// rows. Phase 1 computes block statistics and stores e into the gradient rows; the merge
// per row is serial and cheap; phase 2 rewrites each block. Block positions are fixed, so
// the bits match the row-at-a-time path exactly.
template <class T>
void split_classes(const Problem<T>& p, int64_t rows, int nt, double* losses) {
  const int64_t items = rows * p.nb;
  std::vector<BlockStat> st(static_cast<size_t>(items));
  std::vector<RowResult> rr(static_cast<size_t>(rows));
  std::vector<double> zy(static_cast<size_t>(rows)), dz(static_cast<size_t>(rows));
  std::vector<T> tbuf(p.cap > 0.0 && p.grad ? static_cast<size_t>(rows * p.C) : 0);
  for (int64_t n = 0; n < rows; ++n)
    if (p.counted(n)) zy[size_t(n)] = target_logit(p, n, &dz[size_t(n)]);
#if defined(_OPENMP)
#pragma omp parallel num_threads(nt)
#endif
  {
#if defined(_OPENMP)
#pragma omp for schedule(static)
#endif
    for (int64_t it = 0; it < items; ++it) {
      const int64_t n = it / p.nb, k = it % p.nb;
      T* g = p.grad ? p.grad + n * p.C : nullptr;
      if (!p.counted(n)) {
        if (g)
          std::memset(static_cast<void*>(g + k * kBlock), 0, sizeof(T) * size_t(p.block_len(k)));
        continue;
      }
      T* t = tbuf.empty() ? nullptr : tbuf.data() + n * p.C;
      st[size_t(it)] = p.fns->block(block_in(p, n, k, g, t));
    }
#if defined(_OPENMP)
#pragma omp single
#endif
    for (int64_t n = 0; n < rows; ++n) {
      if (p.counted(n)) rr[size_t(n)] = finish_row(p, st.data() + n * p.nb, n, zy[size_t(n)]);
      losses[n] = p.counted(n) ? rr[size_t(n)].loss : 0.0;
    }
    if (p.grad) {
#if defined(_OPENMP)
#pragma omp for schedule(static)
#endif
      for (int64_t it = 0; it < items; ++it) {
        const int64_t n = it / p.nb, k = it % p.nb;
        if (!p.counted(n)) continue;
        T* g = p.grad + n * p.C;
        const T* t = tbuf.empty() ? nullptr : tbuf.data() + n * p.C;
        write_grad_block(p, st[size_t(it)], rr[size_t(n)], n, g, t, g, k, false);
      }
    }
  }
  if (p.grad && !p.probs)
    for (int64_t n = 0; n < rows; ++n)
      if (p.counted(n))
        fix_target(p, rr[size_t(n)], zy[size_t(n)], dz[size_t(n)], p.grad + n * p.C,
                   p.in.target[n]);
}

void check_finite(double v, const char* what, bool positive) {
  if (!std::isfinite(v) || v < 0.0 || (positive && v == 0.0))
    throw std::invalid_argument(std::string(what) + (positive ? " must be finite and > 0, got "
                                                              : " must be finite and >= 0, got ") +
                                std::to_string(v));
}

}  // namespace

int default_num_threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

bool has_openmp() {
#if defined(_OPENMP)
  return true;
#else
  return false;
#endif
}

template <class T>
double cross_entropy(const Inputs<T>& in, const Options& opt, T* grad, T* row_losses) {
  const int64_t rows = in.rows, classes = in.classes;
  // ---- checks: everything is validated before anything is written ----
  if (classes <= 0) throw std::invalid_argument("the class axis has no classes (C = 0)");
  if (rows < 0) throw std::invalid_argument("negative number of rows");
  if (in.row_stride < classes)
    throw std::invalid_argument("row_stride must be at least the number of classes");
  if (opt.reduction != Reduction::None && opt.reduction != Reduction::Sum &&
      opt.reduction != Reduction::Mean)
    throw std::invalid_argument("unknown reduction");
  if (!(opt.label_smoothing >= 0.0 && opt.label_smoothing <= 1.0))
    throw std::invalid_argument("label_smoothing must be in [0, 1], got " +
                                std::to_string(opt.label_smoothing));
  check_finite(opt.z_loss, "z_loss", false);
  check_finite(opt.softcap, "softcap", false);
  check_finite(opt.logit_scale, "logit_scale", true);
  if (opt.has_normalizer) check_finite(opt.normalizer, "normalizer", false);
  if (opt.num_threads < 0) throw std::invalid_argument("num_threads must be positive");
  if (rows > 0 && in.logits == nullptr) throw std::invalid_argument("logits must not be null");
  if (rows > 0 && (in.target == nullptr) == (in.probs == nullptr))
    throw std::invalid_argument("give exactly one of class targets and probability targets");
  if (in.probs && in.probs_row_stride < classes)
    throw std::invalid_argument("probs_row_stride must be at least the number of classes");
  if (rows > 0 && opt.reduction == Reduction::None && row_losses == nullptr)
    throw std::invalid_argument("reduction 'none' needs a row_losses output");
  if (grad != nullptr && grad == in.logits && in.row_stride != classes)
    throw std::invalid_argument("in-place gradient needs contiguous rows (row_stride == C)");

  // ---- target pre-pass: range check and the "mean" denominator ----
  const bool probs = in.probs != nullptr;
  double D = 0.0;
  for (int64_t n = 0; n < rows; ++n) {
    const double sn = in.sample_weight ? double(in.sample_weight[n]) : 1.0;
    if (probs) {
      D += sn;
      continue;
    }
    const int64_t y = in.target[n];
    if (y == opt.ignore_index) continue;
    if (y < 0 || y >= classes)
      throw std::out_of_range("target[" + std::to_string(n) + "] = " + std::to_string(y) +
                              " is outside [0, " + std::to_string(classes) +
                              ") and is not ignore_index (" + std::to_string(opt.ignore_index) +
                              ")");
    D += sn * (in.weight ? double(in.weight[y]) : 1.0);
  }
  if (opt.has_normalizer) D = opt.normalizer;
  const bool mean = opt.reduction == Reduction::Mean;
  const bool none = opt.reduction == Reduction::None;

  Problem<T> p;
  p.in = in;
  p.ignore_index = opt.ignore_index;
  p.C = classes;
  p.nb = (classes + kBlock - 1) / kBlock;
  p.grad = grad;
  p.eps = opt.label_smoothing;
  p.lambda = opt.z_loss;
  p.alpha = opt.logit_scale;
  p.cap = opt.softcap;
  p.probs = probs;
  p.W = double(classes);
  if (in.weight) {
    p.W = 0.0;
    for (int64_t c = 0; c < classes; ++c) p.W += double(in.weight[c]);
  }
  p.zero_all = mean && D == 0.0;
  p.s = mean ? (p.zero_all ? 0.0 : 1.0 / D) : 1.0;
  p.stream = grad != nullptr && grad != in.logits &&
             rows * classes * int64_t(sizeof(T)) >= kStreamBytes;
  const KernelTable& table = active_table();
  p.fns = &row_fns<T>(table);
  p.fence = table.fence;
  std::vector<double> block_w;
  if (in.weight && p.eps > 0.0 && !probs) {
    block_w.assign(size_t(p.nb), 0.0);
    for (int64_t c = 0; c < classes; ++c) block_w[size_t(c / kBlock)] += double(in.weight[c]);
    p.block_w = block_w.data();
  } else {
    p.block_w = nullptr;
  }

  // Row losses in double: O(N), never N x C.
  std::vector<double> losses(static_cast<size_t>(rows));
  int nt = opt.num_threads > 0 ? opt.num_threads : default_num_threads();
  if (rows * classes < kSerialGrain || nt < 1) nt = 1;

  if (nt > 1 && rows < nt && p.nb > 1) {
    split_classes(p, rows, nt, losses.data());
  } else {
    const int team = int(std::min<int64_t>(nt, rows > 0 ? rows : 1));
    auto run_rows = [&](int64_t begin, int64_t end) {
      BlockStat local[4];
      std::vector<BlockStat> heap(p.nb > 4 ? static_cast<size_t>(p.nb) : 0);
      BlockStat* st = p.nb > 4 ? heap.data() : local;
      std::vector<T> scratch(p.stream ? static_cast<size_t>(classes) : 0);
      std::vector<T> tbuf(p.cap > 0.0 && grad ? static_cast<size_t>(classes) : 0);
      for (int64_t n = begin; n < end; ++n)
        losses[size_t(n)] = compute_row(p, n, st, scratch.data(), tbuf.empty() ? nullptr : tbuf.data());
    };
    if (team <= 1) {
      run_rows(0, rows);
    } else {
#if defined(_OPENMP)
#pragma omp parallel num_threads(team)
      {
        // Static contiguous chunks: each row is computed by exactly one thread.
        const int64_t t = omp_get_thread_num(), nth = omp_get_num_threads();
        const int64_t chunk = (rows + nth - 1) / nth;
        const int64_t b0 = std::min(rows, t * chunk), b1 = std::min(rows, b0 + chunk);
        run_rows(b0, b1);
      }
#else
      run_rows(0, rows);
#endif
    }
  }

  if (none) {
    for (int64_t n = 0; n < rows; ++n) row_losses[n] = T(losses[size_t(n)]);
    return 0.0;
  }
  double total = 0.0;
  for (double l : losses) total += l;  // fixed order: independent of the thread count
  if (mean) return p.zero_all ? 0.0 : total / D;
  return total;
}

template double cross_entropy<float>(const Inputs<float>&, const Options&, float*, float*);
template double cross_entropy<double>(const Inputs<double>&, const Options&, double*, double*);

}  // namespace fastxent
