// The driver: argument checks, the target pre-pass, OpenMP over rows, the per-row formula
// around the SIMD passes, and the ordered reduction. Compiled with baseline flags only; every
// ISA-specific instruction sits behind the function pointers of the active KernelTable.
//
// Memory traffic per row (fused, out-of-place): pass 1 reads z (max), pass 2 reads z again
// from cache and writes e = exp(z - m) into the gradient row, pass 3 rewrites that row in
// cache as a * e - b * w. The row stays in L1/L2 between passes for C up to ~100k floats.
// Determinism: each row is computed entirely by one thread with a fixed operation order, and
// the reduction over rows runs serially in row order, so results do not depend on threads.
#include <cmath>
#include <algorithm>
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

// Below this many logits a call runs on the calling thread: a parallel region costs a few
// microseconds, more than such a call's whole compute.
constexpr int64_t kSerialGrain = 1 << 15;
// Gradients larger than this (bytes) are written with non-temporal stores from a per-thread
// scratch row: no read-for-ownership of the output, 8 bytes of traffic per float logit.
// Smaller ones stay in cache for whoever reads them next.
constexpr int64_t kStreamBytes = int64_t(8) << 20;

int resolve_threads(int requested, int64_t work) {
  int nt = requested > 0 ? requested : default_num_threads();
  if (work < kSerialGrain) nt = 1;
  return nt < 1 ? 1 : nt;
}

template <class T>
struct Problem {
  const T* logits;
  int64_t C, ld, nb;
  const int64_t* target;
  const T* weight;
  const double* block_w;  // sum of weights per block (nullptr: unit weights)
  T* grad;
  int64_t ignore_index;
  double eps;      // label smoothing
  double W;        // sum of class weights (C without weights)
  double s;        // gradient scale: 1/D for "mean", 1 otherwise
  bool zero_all;   // "mean" with D == 0: loss and gradient are 0
  bool stream;     // non-temporal gradient stores through a scratch row
  const RowFns<T>* fns;
  void (*fence)();

  int64_t block_len(int64_t b) const { return b + 1 < nb ? kBlock : C - b * kBlock; }
  double block_weight(int64_t b) const { return block_w ? block_w[b] : double(block_len(b)); }
  bool counted(int64_t n) const { return target[n] != ignore_index && !zero_all; }
};

// What a row needs after its block statistics are merged.
struct RowResult {
  double loss;
  double M;   // row max (-inf: degenerate row)
  double a;   // gradient factor of exp(z - M); per block a * exp(m_b - M)
  double b;   // gradient offset per unit weight
};

// Merges a row's block statistics (in block order: independent of who computed them).
template <class T>
RowResult finish_row(const Problem<T>& p, const BlockStat* st, int64_t n, double zy) {
  const int64_t y = p.target[n];
  const double wy = p.weight ? double(p.weight[y]) : 1.0;
  double M = -std::numeric_limits<double>::infinity();
  bool nan = false;
  for (int64_t k = 0; k < p.nb; ++k) {
    if (st[k].m > M) M = st[k].m;
    nan |= std::isnan(st[k].m) || std::isnan(st[k].s);
  }
  const double C = double(p.C);
  const double Q = (1.0 - p.eps) * wy + p.eps / C * p.W;
  RowResult r{0.0, M, 0.0, p.s * p.eps / C};
  if (nan) {
    r.loss = r.a = std::numeric_limits<double>::quiet_NaN();
    return r;
  }
  if (M == -std::numeric_limits<double>::infinity()) {
    // Every class is -inf: the loss is +inf (the target sits on a -inf class) and the
    // gradient is the limit of equal logits, uniform softmax minus q (see degenerate rows).
    r.loss = std::numeric_limits<double>::infinity();
    r.a = p.s * Q / C;
    return r;
  }
  double S = 0.0, WD = 0.0;
  const bool smooth = p.eps > 0.0;
  for (int64_t k = 0; k < p.nb; ++k) {
    if (st[k].m == -std::numeric_limits<double>::infinity()) {
      if (smooth) WD += st[k].wd - M * p.block_weight(k);
      continue;
    }
    S += st[k].s * std::exp(st[k].m - M);
    if (smooth) WD += st[k].wd + (st[k].m - M) * p.block_weight(k);
  }
  const double log_sum = std::log(S);
  // Terms with a zero factor are skipped, not multiplied: 0 * inf would be NaN.
  if (p.eps < 1.0) r.loss += (1.0 - p.eps) * wy * (log_sum + (M - zy));
  if (smooth) r.loss += p.eps / C * (p.W * log_sum - WD);
  r.a = p.s * Q / S;
  return r;
}

// Writes a counted row's gradient from its stored exponentials e (relative to block maxima).
template <class T>
void write_grad_block(const Problem<T>& p, const BlockStat& st, const RowResult& r, const T* e,
                      T* g, int64_t k, bool stream) {
  const int64_t off = k * kBlock;
  const T* src = e + off;
  const double ninf = -std::numeric_limits<double>::infinity();
  double ak;
  if (std::isnan(r.a)) {
    ak = r.a;  // a NaN row stays NaN everywhere
  } else if (r.M == ninf) {
    // Degenerate row: e holds zeros, but the uniform limit needs e = 1: g = a - b w.
    const int64_t len = p.block_len(k);
    for (int64_t c = 0; c < len; ++c)
      g[off + c] = T(r.a - r.b * (p.weight ? double(p.weight[off + c]) : 1.0));
    return;
  } else {
    ak = st.m == ninf ? 0.0 : r.a * std::exp(st.m - r.M);
  }
  p.fns->affine(src, g + off, p.block_len(k), T(ak), T(r.b), p.weight ? p.weight + off : nullptr,
                stream);
}

// The target entry a e_y - q_y cancels when softmax_y is near 1: redo it in double from the
// saved logit, rounding once.
template <class T>
void fix_target(const Problem<T>& p, const RowResult& r, double zy, T* g, int64_t y) {
  if (std::isnan(r.a)) return;
  const double wy = p.weight ? double(p.weight[y]) : 1.0;
  const double ey = r.M == -std::numeric_limits<double>::infinity() ? 1.0 : std::exp(zy - r.M);
  g[y] = T(r.a * ey - r.b * wy - p.s * (1.0 - p.eps) * wy);
}

// One row, start to finish, on the calling thread. st: nb entries; scratch: C entries when
// streaming.
template <class T>
double compute_row(const Problem<T>& p, int64_t n, BlockStat* st, T* scratch) {
  const T* z = p.logits + n * p.ld;
  T* g = p.grad ? p.grad + n * p.C : nullptr;
  if (!p.counted(n)) {
    if (g) std::memset(static_cast<void*>(g), 0, sizeof(T) * size_t(p.C));
    return 0.0;
  }
  const int64_t y = p.target[n];
  const double zy = double(z[y]);  // read before the in-place passes overwrite z
  T* e = g ? (p.stream ? scratch : g) : nullptr;
  const bool smooth = p.eps > 0.0;
  for (int64_t k = 0; k < p.nb; ++k)
    st[k] = p.fns->block(z + k * kBlock, e ? e + k * kBlock : nullptr, p.block_len(k),
                         p.weight ? p.weight + k * kBlock : nullptr, smooth);
  const RowResult r = finish_row(p, st, n, zy);
  if (g) {
    for (int64_t k = 0; k < p.nb; ++k) write_grad_block(p, st[k], r, e, g, k, p.stream);
    if (p.stream) p.fence();
    fix_target(p, r, zy, g, y);
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
  std::vector<double> zy(static_cast<size_t>(rows));
  const bool smooth = p.eps > 0.0;
  for (int64_t n = 0; n < rows; ++n)
    if (p.counted(n)) zy[size_t(n)] = double(p.logits[n * p.ld + p.target[n]]);
#if defined(_OPENMP)
#pragma omp parallel num_threads(nt)
#endif
  {
#if defined(_OPENMP)
#pragma omp for schedule(static)
#endif
    for (int64_t it = 0; it < items; ++it) {
      const int64_t n = it / p.nb, k = it % p.nb;
      T* g = p.grad ? p.grad + n * p.C + k * kBlock : nullptr;
      if (!p.counted(n)) {
        if (g) std::memset(static_cast<void*>(g), 0, sizeof(T) * size_t(p.block_len(k)));
        continue;
      }
      st[size_t(it)] = p.fns->block(p.logits + n * p.ld + k * kBlock, g, p.block_len(k),
                                    p.weight ? p.weight + k * kBlock : nullptr, smooth);
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
        write_grad_block(p, st[size_t(it)], rr[size_t(n)], g, g, k, false);
      }
    }
  }
  if (p.grad)
    for (int64_t n = 0; n < rows; ++n)
      if (p.counted(n)) fix_target(p, rr[size_t(n)], zy[size_t(n)], p.grad + n * p.C, p.target[n]);
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
double cross_entropy(const T* logits, int64_t rows, int64_t classes, int64_t row_stride,
                     const int64_t* target, const T* weight, const Options& opt, T* grad,
                     T* row_losses) {
  // ---- checks: everything is validated before anything is written ----
  if (classes <= 0) throw std::invalid_argument("the class axis has no classes (C = 0)");
  if (rows < 0) throw std::invalid_argument("negative number of rows");
  if (row_stride < classes)
    throw std::invalid_argument("row_stride must be at least the number of classes");
  if (opt.reduction != Reduction::None && opt.reduction != Reduction::Sum &&
      opt.reduction != Reduction::Mean)
    throw std::invalid_argument("unknown reduction");
  if (!(opt.label_smoothing >= 0.0 && opt.label_smoothing <= 1.0))
    throw std::invalid_argument("label_smoothing must be in [0, 1], got " +
                                std::to_string(opt.label_smoothing));
  if (opt.num_threads < 0) throw std::invalid_argument("num_threads must be positive");
  if (rows > 0 && (logits == nullptr || target == nullptr))
    throw std::invalid_argument("logits and target must not be null");
  if (rows > 0 && opt.reduction == Reduction::None && row_losses == nullptr)
    throw std::invalid_argument("reduction 'none' needs a row_losses output");
  if (grad != nullptr && grad == logits && row_stride != classes)
    throw std::invalid_argument("in-place gradient needs contiguous rows (row_stride == C)");

  // ---- target pre-pass: range check and the "mean" denominator ----
  double D = 0.0;
  for (int64_t n = 0; n < rows; ++n) {
    const int64_t y = target[n];
    if (y == opt.ignore_index) continue;
    if (y < 0 || y >= classes)
      throw std::out_of_range("target[" + std::to_string(n) + "] = " + std::to_string(y) +
                              " is outside [0, " + std::to_string(classes) +
                              ") and is not ignore_index (" + std::to_string(opt.ignore_index) +
                              ")");
    D += weight ? double(weight[y]) : 1.0;
  }
  double W = double(classes);
  if (weight) {
    W = 0.0;
    for (int64_t c = 0; c < classes; ++c) W += double(weight[c]);
  }
  const bool mean = opt.reduction == Reduction::Mean;
  const bool none = opt.reduction == Reduction::None;

  Problem<T> p;
  p.logits = logits;
  p.C = classes;
  p.ld = row_stride;
  p.nb = (classes + kBlock - 1) / kBlock;
  p.target = target;
  p.weight = weight;
  p.grad = grad;
  p.ignore_index = opt.ignore_index;
  p.eps = opt.label_smoothing;
  p.W = W;
  p.zero_all = mean && D == 0.0;
  p.s = mean ? (p.zero_all ? 0.0 : 1.0 / D) : 1.0;
  p.stream = grad != nullptr && grad != logits &&
             rows * classes * int64_t(sizeof(T)) >= kStreamBytes;
  const KernelTable& table = active_table();
  p.fns = &row_fns<T>(table);
  p.fence = table.fence;
  std::vector<double> block_w;
  if (weight && p.eps > 0.0) {
    block_w.assign(size_t(p.nb), 0.0);
    for (int64_t c = 0; c < classes; ++c) block_w[size_t(c / kBlock)] += double(weight[c]);
    p.block_w = block_w.data();
  } else {
    p.block_w = nullptr;
  }

  // Row losses in double: O(N), never N x C.
  std::vector<double> losses(static_cast<size_t>(rows));
  const int nt = resolve_threads(opt.num_threads, rows * classes);

  if (nt > 1 && rows < nt && p.nb > 1) {
    split_classes(p, rows, nt, losses.data());
  } else {
    const int team = int(std::min<int64_t>(nt, rows > 0 ? rows : 1));
    auto run_rows = [&](int64_t begin, int64_t end, int64_t step) {
      std::vector<BlockStat> st(static_cast<size_t>(p.nb));
      std::vector<T> scratch(p.stream ? size_t(classes) : 0);
      for (int64_t n = begin; n < end; n += step)
        losses[size_t(n)] = compute_row(p, n, st.data(), scratch.data());
    };
    if (team <= 1) {
      run_rows(0, rows, 1);
    } else {
#if defined(_OPENMP)
#pragma omp parallel num_threads(team)
      {
        // Static contiguous chunks: each row is computed by exactly one thread.
        const int64_t t = omp_get_thread_num(), T_ = omp_get_num_threads();
        const int64_t chunk = (rows + T_ - 1) / T_;
        const int64_t b0 = std::min(rows, t * chunk), b1 = std::min(rows, b0 + chunk);
        run_rows(b0, b1, 1);
      }
#else
      run_rows(0, rows, 1);
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
template double cross_entropy<float>(const float*, int64_t, int64_t, int64_t, const int64_t*,
                                     const float*, const Options&, float*, float*);
template double cross_entropy<double>(const double*, int64_t, int64_t, int64_t, const int64_t*,
                                      const double*, const Options&, double*, double*);

}  // namespace fastxent
