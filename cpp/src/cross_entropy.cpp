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

#include "ce_detail.hpp"

namespace fastxent {

namespace {

using namespace detail;

// Below this many logits a call runs on the calling thread: a parallel region costs a few
// microseconds, more than such a call's whole compute.
constexpr int64_t kSerialGrain = 1 << 15;

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
  if (in.inner < 1) throw std::invalid_argument("inner must be at least 1");
  if (in.inner > 1 && rows % in.inner != 0)
    throw std::invalid_argument("rows must be a multiple of inner");
  if (in.inner == 1 && in.row_stride < classes)
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
  if (in.probs && in.inner == 1 && in.probs_row_stride < classes)
    throw std::invalid_argument("probs_row_stride must be at least the number of classes");
  if (rows > 0 && opt.reduction == Reduction::None && row_losses == nullptr)
    throw std::invalid_argument("reduction 'none' needs a row_losses output");
  if (grad != nullptr && grad == in.logits && in.inner == 1 && in.row_stride != classes)
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
  p.inner = in.inner;
  p.nb = in.inner > 1 ? 1 : (classes + kBlock - 1) / kBlock;
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
  p.stream = grad != nullptr && grad != in.logits && in.inner == 1 &&
             rows * classes * int64_t(sizeof(T)) >= kStreamBytes;
  const KernelTable& table = active_table();
  p.fns = &row_fns<T>(table);
  p.fence = table.fence;
  std::vector<double> block_w;
  if (in.weight && p.eps > 0.0 && !probs) {
    // Class-weight sums per block; in the column layout the single "block" is the whole axis.
    block_w.assign(size_t(p.nb), 0.0);
    for (int64_t c = 0; c < classes; ++c)
      block_w[p.nb == 1 ? 0 : size_t(c / kBlock)] += double(in.weight[c]);
    p.block_w = block_w.data();
  } else {
    p.block_w = nullptr;
  }

  // Row losses in double: O(N), never N x C.
  std::vector<double> losses(static_cast<size_t>(rows));
  int nt = opt.num_threads > 0 ? opt.num_threads : default_num_threads();
  if (rows * classes < kSerialGrain || nt < 1) nt = 1;

  if (p.inner > 1) {
    cross_entropy_cols(p, nt, losses.data());
  } else if (nt > 1 && rows < nt && p.nb > 1) {
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
