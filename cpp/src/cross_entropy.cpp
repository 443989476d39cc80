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

int resolve_threads(int requested, int64_t rows, int64_t work) {
  int nt = requested > 0 ? requested : default_num_threads();
  if (work < kSerialGrain) nt = 1;
  if (int64_t(nt) > rows) nt = int(rows > 0 ? rows : 1);
  return nt < 1 ? 1 : nt;
}

template <class T>
struct Problem {
  const T* logits;
  int64_t C, ld;
  const int64_t* target;
  const T* weight;
  T* grad;
  int64_t ignore_index;
  double eps;      // label smoothing
  double W;        // sum of class weights (C without weights)
  double s;        // gradient scale: 1/D for "mean", 1 otherwise
  bool zero_all;   // "mean" with D == 0: loss and gradient are 0
  const RowFns<T>* fns;
};

// A row whose maximum is -inf: every class is -inf (or NaN hides among -inf entries).
// The loss is +inf (the target sits on a -inf class); the gradient is the limit of equal
// logits, uniform softmax minus q. NaN anywhere makes the whole row NaN.
template <class T>
double degenerate_row(const Problem<T>& p, const T* z, T* g, int64_t y, double wy) {
  bool nan = false;
  for (int64_t c = 0; c < p.C; ++c) nan |= std::isnan(z[c]);
  if (g) {
    const double b = p.s * p.eps / double(p.C);
    const double a = p.s * ((1.0 - p.eps) * wy + p.eps / double(p.C) * p.W) / double(p.C);
    for (int64_t c = 0; c < p.C; ++c) {
      const double wc = p.weight ? double(p.weight[c]) : 1.0;
      g[c] = nan ? std::numeric_limits<T>::quiet_NaN() : T(a - b * wc);
    }
    if (!nan) g[y] = T(a - b * wy - p.s * (1.0 - p.eps) * wy);
  }
  return nan ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
}

template <class T>
double compute_row(const Problem<T>& p, int64_t n) {
  const T* z = p.logits + n * p.ld;
  T* g = p.grad ? p.grad + n * p.C : nullptr;
  const int64_t y = p.target[n];
  if (y == p.ignore_index || p.zero_all) {
    if (g) std::memset(g, 0, sizeof(T) * size_t(p.C));
    return 0.0;
  }
  const double wy = p.weight ? double(p.weight[y]) : 1.0;
  const double zy = double(z[y]);  // read before the in-place passes overwrite z
  const T m = p.fns->max(z, p.C);
  if (m == -std::numeric_limits<T>::infinity()) return degenerate_row(p, z, g, y, wy);

  const bool smooth = p.eps > 0.0;
  const ExpSum es = p.fns->exp_sum(z, g, p.C, m, p.weight, smooth);
  const double log_sum = std::log(es.sum);
  double loss = 0.0;
  // Terms with a zero factor are skipped, not multiplied: 0 * inf would be NaN.
  if (p.eps < 1.0) loss += (1.0 - p.eps) * wy * (log_sum + (double(m) - zy));
  if (smooth) loss += p.eps / double(p.C) * (p.W * log_sum - es.wd);

  if (g) {
    const double Q = (1.0 - p.eps) * wy + p.eps / double(p.C) * p.W;
    const double a = p.s * Q / es.sum;
    const double b = p.s * p.eps / double(p.C);
    p.fns->affine(g, g, p.C, T(a), T(b), p.weight);
    // The target entry a * e_y - q_y cancels when softmax_y is near 1: redo it in double
    // from the saved logit, rounding once.
    const double ey = std::exp(zy - double(m));
    g[y] = T(a * ey - b * wy - p.s * (1.0 - p.eps) * wy);
  }
  return loss;
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

  Problem<T> p;
  p.logits = logits;
  p.C = classes;
  p.ld = row_stride;
  p.target = target;
  p.weight = weight;
  p.grad = grad;
  p.ignore_index = opt.ignore_index;
  p.eps = opt.label_smoothing;
  p.W = W;
  p.zero_all = mean && D == 0.0;
  p.s = mean ? (p.zero_all ? 0.0 : 1.0 / D) : 1.0;
  p.fns = &row_fns<T>(active_table());

  // Row losses in double for "sum"/"mean": O(N), never N x C.
  std::vector<double> tmp(opt.reduction == Reduction::None ? 0 : size_t(rows));
  const bool none = opt.reduction == Reduction::None;
  auto body = [&](int64_t n) {
    const double l = compute_row(p, n);
    if (none) row_losses[n] = T(l); else tmp[size_t(n)] = l;
  };

  const int nt = resolve_threads(opt.num_threads, rows, rows * classes);
  if (nt <= 1) {
    for (int64_t n = 0; n < rows; ++n) body(n);
  } else {
#if defined(_OPENMP)
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t n = 0; n < rows; ++n) body(n);
#else
    for (int64_t n = 0; n < rows; ++n) body(n);
#endif
  }

  if (none) return 0.0;
  double total = 0.0;
  for (double l : tmp) total += l;  // fixed order: independent of the thread count
  if (mean) return p.zero_all ? 0.0 : total / D;
  return total;
}

template double cross_entropy<float>(const float*, int64_t, int64_t, int64_t, const int64_t*,
                                     const float*, const Options&, float*, float*);
template double cross_entropy<double>(const double*, int64_t, int64_t, int64_t, const int64_t*,
                                      const double*, const Options&, double*, double*);

}  // namespace fastxent
