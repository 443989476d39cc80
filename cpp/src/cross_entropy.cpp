// The driver: argument checks, the target pre-pass, OpenMP over rows (or over blocks of the
// class axis when rows are few), the per-row formula around the SIMD block passes, and the
// ordered reduction. Compiled with baseline flags only; every ISA-specific instruction sits
// behind the function pointers of the active KernelTable.
//
// Memory traffic per row: the block pass reads z from memory (prefetching two blocks ahead),
// takes the max of the block after it on the way (chained_block: no max pass of its own), and
// writes e = exp(z' - m_block) either into the gradient row (in place, or small outputs: the
// row is then rewritten in cache) or into a per-thread scratch row, from which each row's
// gradient streams out with non-temporal stores inside the next row's block passes
// (stream_rows, BlockIn::side). Forward only writes nothing N x C. Determinism: blocks sit at
// fixed positions and merge in block order, rows are summed in row order, so no result
// depends on the thread count or on how the work was split.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "ce_detail.hpp"
#include "threads.hpp"

namespace fastxent {

namespace {

using namespace detail;

// Streamed rows of up to this many bytes take stream_rows (two rows of logits, a scratch row
// of e and one of rho with a softcap, held in L2 at once); longer ones compute_row.
constexpr int64_t kPipelineRowBytes = int64_t(1) << 20;

// Elements per float32 chunk of 16-bit logits (1 MiB as float32).
constexpr int64_t kHalfChunk = 1 << 18;

struct Prepared {
  double D = 0.0;               // the "mean" denominator
  double W = 0.0;               // sum of class weights (C without)
  int64_t nb = 1;               // blocks per row
  std::vector<double> block_w;  // class-weight sums per block (weights with smoothing)
};

// A gradient entry to write after the non-temporal stores of its row are fenced.
template <class T>
struct Pending {
  T* at;
  T value;
};

// The raw max of a block taken by the previous block pass (BlockIn::znext), for the block
// at z.
template <class T>
struct MaxCarry {
  const T* z = nullptr;
  T m = T(0);
};

// Block pass k of a row from b, taking the max of the block after it on the way: the next
// block of the row, or next_row's first (null: none), and using the carried max of this block
// where the previous pass took it. The results are those of the plain pass bit for bit: the
// max is exact, though a block whose max is 0 may carry +0 where its own max loop gives -0
// (x86 max returns its second operand for two zeros, and the loops group lanes differently);
// z - (+0) and z - (-0) are equal for every z but -0, whose exp is 1 either way, so the sign
// reaches no output (checked against the unchained split_classes path).
template <class T>
BlockStat chained_block(const Problem<T>& p, BlockIn<T> b, int64_t k, const T* next_row,
                        MaxCarry<T>* carry) {
  if (b.z && carry->z == b.z) {
    b.has_zmax = true;
    b.zmax = carry->m;
  }
  if (b.z && !b.zh) {
    if (k + 1 < p.nb) {
      b.znext = b.z + kBlock<T>;
      b.nnext = p.block_len(k + 1);
    } else if (next_row) {
      b.znext = next_row;
      b.nnext = p.block_len(0);
    }
  }
  const BlockStat st = p.fns->block(b);
  carry->z = b.znext && !std::isnan(st.znext_max) ? b.znext : nullptr;
  carry->m = T(st.znext_max);
  return st;
}

// One row, start to finish, on the calling thread (streamed rows up to kPipelineRowBytes go
// through stream_rows instead). st: nb entries; scratch: C entries for 16-bit or streamed
// rows; tbuf: C entries with a softcap and a gradient; pending: the target entries of
// streamed rows, written after the fence.
template <class T>
double compute_row(const Problem<T>& p, int64_t n, const RowPtrs<T>& rp, BlockStat* st,
                   T* scratch, T* tbuf, std::vector<Pending<T>>* pending = nullptr,
                   const T* next_row = nullptr, MaxCarry<T>* carry = nullptr) {
  T* g = rp.g;
  const bool want_grad = g || rp.gh;
  if (!p.counted(n)) {
    if (g) std::memset(static_cast<void*>(g), 0, sizeof(T) * size_t(p.C));
    if (rp.gh) std::memset(static_cast<void*>(rp.gh), 0, sizeof(uint16_t) * size_t(p.C));
    return 0.0;
  }
  double dzy;
  // Before in place overwrites z.
  const double zy_t = rp.zh ? target_logit(p, n, &dzy, static_cast<const T*>(nullptr), rp.zh,
                                           rp.hk)
                            : target_logit(p, n, &dzy, rp.z);
  // 16-bit rows keep e in the float scratch row; the gradient is rounded out of it.
  T* e = want_grad && !p.recompute ? ((p.stream || rp.gh) ? scratch : g) : nullptr;
  for (int64_t k = 0; k < p.nb; ++k) {
    const BlockIn<T> b = block_in(p, rp, k, e, tbuf);
    st[k] = carry ? chained_block(p, b, k, next_row, carry) : p.fns->block(b);
  }
  const RowResult r = finish_row(p, st, n, zy_t);
  if (rp.gh) {
    for (int64_t k = 0; k < p.nb; ++k)
      write_grad_block(p, st[k], r, rp.prob, e, tbuf, static_cast<T*>(nullptr), k, false,
                       rp.gh, rp.hk);
    if (!p.probs) fix_target(p, r, zy_t, dzy, static_cast<T*>(nullptr), p.in.target[n], rp.gh,
                             rp.hk);
  } else if (g && p.recompute) {
    // Each block's exponentials again, with the same block max (the same value, see
    // chained_block, so the same bits), straight into the gradient block while it is in L1:
    // the row is read twice and written once.
    for (int64_t k = 0; k < p.nb; ++k) {
      p.fns->block(block_in(p, rp, k, g, tbuf));
      write_grad_block(p, st[k], r, rp.prob, g, tbuf, g, k, false);
    }
    if (!p.probs) fix_target(p, r, zy_t, dzy, g, p.in.target[n]);
  } else if (g) {
    for (int64_t k = 0; k < p.nb; ++k)
      write_grad_block(p, st[k], r, rp.prob, e, tbuf, g, k, p.stream);
    if (!p.probs) {
      const int64_t y = p.in.target[n];
      // A plain store into a line still in flight from non-temporal stores needs a fence
      // first: one fence per thread (not per row), after its rows.
      if (p.stream) {
        if (!std::isnan(r.a)) pending->push_back({g + y, target_value(p, r, zy_t, dzy, y)});
      } else {
        fix_target(p, r, zy_t, dzy, g, y);
      }
    }
  }
  return r.loss;
}

// Rows whose gradient is streamed out (p.stream), software-pipelined: while row n's blocks
// are computed (logits read from memory, e = exp(z' - m) kept in a scratch row), row n - 1's
// gradient is written from the same scratch row with non-temporal stores, two vectors of it
// before each two vectors of row n's block k (the block pass's side reads each line of row
// n - 1's e just before the block overwrites it with row n's, so those stores find the line
// in L1 instead of fetching it from L2 for ownership). Reading, the exp and the output stream
// then overlap, instead of a whole row's read-and-exp phase alternating with a whole row's
// write phase. Measured on the 2-core Xeon, 4096 x 32000 float32 out=: on 2 threads 40-42 ms
// one row at a time, 36-38 with row n - 1's block k written after row n's block k, about 35
// with the side inside the block loop; on 1 thread 74-79 -> 69-71 ms for that last step,
// 67-68 -> 64-65 with one scratch row instead of two, and 1-2 ms more from fetching the line
// a block's gradient shares with the next block for writing ahead of its plain stores
// (Row::block_impl). The same pipelining of plain-store rows, in place, measured slower
// (1 thread 45 -> 50 ms with the side inside the loop; no different with whole blocks), so
// those stay one row at a time. The results are those of compute_row bit for bit: the same
// block passes and the same gradient formula, only in another order.
// Target entries are collected in `pending` and written after the caller's fence. An ignored
// row (zeroed at once) leaves the pipeline as it is: the previous row's gradient goes out
// with the next counted row's blocks.
template <class T>
void stream_rows(const Problem<T>& p, int64_t begin, int64_t end, double* losses,
                 std::vector<Pending<T>>* pending) {
  const size_t C = size_t(p.C), nb = size_t(p.nb);
  const bool cap = p.cap > 0.0;
  // e of both rows of the pipeline in one scratch row (the side reads each line of the
  // previous row's e before the block pass overwrites it with this row's), and rho the same
  // with a softcap.
  std::vector<T> buf((cap ? 2 : 1) * C);
  T* const escr = buf.data();
  T* const tscr = cap ? buf.data() + C : nullptr;
  std::vector<BlockStat> st(2 * nb);
  struct Prev {
    bool live = false;
    int slot = 0;
    RowResult r{};
    const T* prob = nullptr;
    T* g = nullptr;
  } prev;
  // Block k of the previous row's gradient: written here (see grad_block_affine), or *a set
  // for the SIMD pass (true).
  auto prev_block = [&](int64_t k, AffineIn<T>* a) {
    return grad_block_affine(p, st[size_t(prev.slot) * nb + size_t(k)], prev.r, prev.prob,
                             escr, tscr, prev.g, k, true, a);
  };
  int cur = 0;
  MaxCarry<T> carry;
  for (int64_t n = begin; n < end; ++n) {
    const RowPtrs<T> rp = row_ptrs(p, n);
    const T* next_row = n + 1 < end ? row_ptrs(p, n + 1).z : nullptr;
    if (!p.counted(n)) {
      std::memset(static_cast<void*>(rp.g), 0, sizeof(T) * C);
      losses[n] = 0.0;
      continue;
    }
    double dzy;
    const double zy_t = target_logit(p, n, &dzy, rp.z);
    BlockStat* sc = st.data() + size_t(cur) * nb;
    for (int64_t k = 0; k < p.nb; ++k) {
      BlockIn<T> b = block_in(p, rp, k, escr, tscr);
      AffineIn<T> side;
      if (prev.live && prev_block(k, &side)) b.side = &side;
      sc[k] = chained_block(p, b, k, next_row, &carry);
    }
    const RowResult r = finish_row(p, sc, n, zy_t);
    losses[n] = r.loss;
    if (!p.probs && !std::isnan(r.a)) {
      const int64_t y = p.in.target[n];
      pending->push_back({rp.g + y, target_value(p, r, zy_t, dzy, y)});
    }
    prev.live = true;
    prev.slot = cur;
    prev.r = r;
    prev.prob = rp.prob;
    prev.g = rp.g;
    cur ^= 1;
  }
  if (prev.live) {
    for (int64_t k = 0; k < p.nb; ++k) {
      AffineIn<T> a;
      if (prev_block(k, &a)) p.fns->affine(a);
    }
  }
}

// Fewer rows than threads (e.g. 8 x 256k): the (row, block) pairs are shared out instead of
// rows. Phase 1 computes block statistics and stores e into the gradient rows; the merge
// per row is serial and cheap; phase 2 rewrites each block. Block positions are fixed, so
// the bits match the row-at-a-time path exactly.
template <class T>
void split_classes(const Problem<T>& p, int64_t rows, int nt, double* losses) {
  (void)nt;  // only read by the OpenMP pragma
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
          std::memset(static_cast<void*>(g + k * kBlock<T>), 0, sizeof(T) * size_t(p.block_len(k)));
        continue;
      }
      T* t = tbuf.empty() ? nullptr : tbuf.data() + n * p.C;
      st[size_t(it)] = p.fns->block(block_in(p, row_ptrs(p, n), k, g, t));
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
        write_grad_block(p, st[size_t(it)], rr[size_t(n)], row_ptrs(p, n).prob, g, t, g, k, false);
      }
    }
  }
  if (p.grad && !p.probs)
    for (int64_t n = 0; n < rows; ++n)
      if (p.counted(n))
        fix_target(p, rr[size_t(n)], zy[size_t(n)], dz[size_t(n)], p.grad + n * p.C,
                   p.in.target[n]);
}

// The target pre-pass: range check and the "mean" denominator; class-weight sums.
template <class T>
Prepared prepare(const Options& opt, int64_t rows, int64_t classes, int64_t inner,
                 const int64_t* target, bool probs, const T* weight, const T* sample_weight) {
  Prepared pr;
  // One chain of additions in row order (not partial sums, which would be faster): an
  // ignored row then drops out of the sum exactly, bit for bit.
  double D = 0.0;
  for (int64_t n = 0; n < rows; ++n) {
    const double sn = sample_weight ? double(sample_weight[n]) : 1.0;
    if (probs) {
      D += sn;
      continue;
    }
    const int64_t y = target[n];
    if (y == opt.ignore_index) continue;
    if (static_cast<uint64_t>(y) >= static_cast<uint64_t>(classes))
      check_class(n, y, classes, opt.ignore_index);  // throws
    D += sn * (weight ? double(weight[y]) : 1.0);
  }
  pr.D = opt.has_normalizer ? opt.normalizer : D;
  pr.nb = inner > 1 ? 1 : (classes + kBlock<T> - 1) / kBlock<T>;
  pr.W = double(classes);
  if (weight) {
    if (opt.label_smoothing > 0.0 && !probs) {
      // Class-weight sums per block (in the column layout the single "block" is the axis),
      // and W as their sum.
      pr.block_w.assign(size_t(pr.nb), 0.0);
      pr.W = 0.0;
      for (int64_t k = 0; k < pr.nb; ++k) {
        const int64_t c0 = pr.nb == 1 ? 0 : k * kBlock<T>;
        const int64_t len = pr.nb == 1 ? classes : std::min(kBlock<T>, classes - c0);
        pr.block_w[size_t(k)] = sum_f64(weight + c0, len);
        pr.W += pr.block_w[size_t(k)];
      }
    } else {
      pr.W = sum_f64(weight, classes);
    }
  }
  return pr;
}

template <class T>
Problem<T> make_problem(const Inputs<T>& in, const Options& opt, T* grad, const Prepared& pr) {
  Problem<T> p;
  p.in = in;
  p.ignore_index = opt.ignore_index;
  p.C = in.classes;
  p.C_total = in.classes;
  p.inner = in.inner;
  p.nb = pr.nb;
  p.grad = grad;
  p.eps = opt.label_smoothing;
  p.lambda = opt.z_loss;
  p.alpha = opt.logit_scale;
  p.cap = opt.softcap;
  p.probs = in.probs != nullptr;
  p.W = pr.W;
  p.block_w = pr.block_w.empty() ? nullptr : pr.block_w.data();
  const bool mean = opt.reduction == Reduction::Mean;
  p.zero_all = mean && pr.D == 0.0;
  p.s = mean ? (p.zero_all ? 0.0 : 1.0 / pr.D) : 1.0;
  const int64_t recompute_bytes = recompute_threshold();
  p.recompute = recompute_bytes > 0 && grad != nullptr && in.inner == 1 &&
                in.classes * int64_t(sizeof(T)) >= recompute_bytes;
  const int64_t stream_min = stream_threshold();
  p.stream = stream_min > 0 && !p.recompute && grad != nullptr && grad != in.logits &&
             in.rows * in.classes * int64_t(sizeof(T)) >= stream_min;
  use_active_kernels(p);
  return p;
}

int thread_count(const Options& opt, int64_t work) {
  return resolve_threads(opt.num_threads, work);
}

// The short-row threshold: kShortRowClasses, or FASTXENT_SHORT_ROWS=N (0: never), read once.
int64_t short_row_classes() {
  static const int64_t c = [] {
    const char* v = std::getenv("FASTXENT_SHORT_ROWS");
    return v ? std::max<int64_t>(0, std::atoll(v)) : kShortRowClasses;
  }();
  return c;
}

// Every row's loss (double) into losses, and the gradient when p.grad is set.
template <class T>
void run_problem(const Problem<T>& p, int nt, double* losses) {
  const int64_t rows = p.in.rows;
  if (p.inner > 1) {
    cross_entropy_cols(p, nt, losses);
    return;
  }
  if (p.C <= short_row_classes() && rows > 1) {
    short_rows(p, nt, losses);
    return;
  }
  if (nt > 1 && rows < nt && p.nb > 1) {
    split_classes(p, rows, nt, losses);
    return;
  }
  const int team = int(std::min<int64_t>(nt, rows > 0 ? rows : 1));
  auto run_rows = [&](int64_t begin, int64_t end) {
    std::vector<Pending<T>> pending;
    if (p.stream && p.C * int64_t(sizeof(T)) <= kPipelineRowBytes) {
      stream_rows(p, begin, end, losses, &pending);
    } else {
      BlockStat local[4];
      std::vector<BlockStat> heap(p.nb > 4 ? static_cast<size_t>(p.nb) : 0);
      BlockStat* st = p.nb > 4 ? heap.data() : local;
      std::vector<T> scratch(p.stream ? static_cast<size_t>(p.C) : 0);
      std::vector<T> tbuf(p.cap > 0.0 && p.grad ? static_cast<size_t>(p.C) : 0);
      MaxCarry<T> carry;
      for (int64_t n = begin; n < end; ++n)
        losses[n] = compute_row(p, n, row_ptrs(p, n), st, scratch.data(),
                                tbuf.empty() ? nullptr : tbuf.data(), &pending,
                                n + 1 < end ? row_ptrs(p, n + 1).z : nullptr, &carry);
    }
    if (p.stream) p.fence();
    for (const Pending<T>& q : pending) *q.at = q.value;
  };
  parallel_chunks(team, rows, run_rows);
}

// The reduction over rows, in row order: independent of the thread count.
template <class T>
double reduce(const Options& opt, const Prepared& pr, const std::vector<double>& losses,
              int64_t rows, T* row_losses) {
  if (opt.reduction == Reduction::None) {
    for (int64_t n = 0; n < rows; ++n) row_losses[n] = T(losses[size_t(n)]);
    return 0.0;
  }
  // One chain in row order, as prepare's D (an ignored row's 0 then changes no bit).
  double total = 0.0;
  for (double l : losses) total += l;
  if (opt.reduction == Reduction::Mean) return pr.D == 0.0 ? 0.0 : total / pr.D;
  return total;
}

}  // namespace

void detail::check_class(int64_t n, int64_t y, int64_t classes, int64_t ignore_index) {
  if (y != ignore_index && (y < 0 || y >= classes))
    throw std::out_of_range("target[" + std::to_string(n) + "] = " + std::to_string(y) +
                            " is outside [0, " + std::to_string(classes) +
                            ") and is not ignore_index (" + std::to_string(ignore_index) + ")");
}

void detail::check_finite(double v, const char* what, bool positive) {
  if (!std::isfinite(v) || v < 0.0 || (positive && v == 0.0))
    throw std::invalid_argument(std::string(what) + (positive ? " must be finite and > 0, got "
                                                              : " must be finite and >= 0, got ") +
                                std::to_string(v));
}

void detail::check_call(const Options& opt, int64_t rows, int64_t classes, int64_t inner,
                int64_t row_stride, bool have_logits, bool have_target, bool have_probs,
                int64_t probs_row_stride, bool have_row_losses, bool in_place) {
  if (classes <= 0) throw std::invalid_argument("the class axis has no classes (C = 0)");
  if (rows < 0) throw std::invalid_argument("negative number of rows");
  if (inner < 1) throw std::invalid_argument("inner must be at least 1");
  if (inner > 1 && rows % inner != 0)
    throw std::invalid_argument("rows must be a multiple of inner");
  if (inner == 1 && row_stride < classes)
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
  if (rows > 0 && !have_logits) throw std::invalid_argument("logits must not be null");
  if (rows > 0 && have_target == have_probs)
    throw std::invalid_argument("give exactly one of class targets and probability targets");
  if (have_probs && inner == 1 && probs_row_stride < classes)
    throw std::invalid_argument("probs_row_stride must be at least the number of classes");
  if (rows > 0 && opt.reduction == Reduction::None && !have_row_losses)
    throw std::invalid_argument("reduction 'none' needs a row_losses output");
  if (in_place && inner == 1 && row_stride != classes)
    throw std::invalid_argument("in-place gradient needs contiguous rows (row_stride == C)");
}

int64_t detail::recompute_threshold() {
  static const int64_t bytes = [] {
    const char* v = std::getenv("FASTXENT_RECOMPUTE_BYTES");
    return v ? std::max<int64_t>(0, std::atoll(v)) : int64_t(0);
  }();
  return bytes;
}

int64_t detail::stream_threshold() {
  static const int64_t env_bytes = [] {
    const char* v = std::getenv("FASTXENT_STREAM_BYTES");
    return v ? std::max<int64_t>(0, std::atoll(v)) : int64_t(-1);
  }();
  if (env_bytes >= 0) return env_bytes;
  // Per call: the active kernel can change (FASTXENT_ISA, set_isa).
  static const bool intel = cpu_is_intel();
#if defined(FASTXENT_HAVE_AVX512)
  const bool avx512 = &active_table() == &avx512_table();
#else
  const bool avx512 = false;
#endif
  return (intel || avx512) ? int64_t(64) << 20 : int64_t(0);
}

template <class T>
double cross_entropy(const Inputs<T>& in, const Options& opt, T* grad, T* row_losses) {
  check_call(opt, in.rows, in.classes, in.inner, in.row_stride, in.logits != nullptr,
             in.target != nullptr, in.probs != nullptr, in.probs_row_stride,
             row_losses != nullptr, grad != nullptr && grad == in.logits);
  check_cap_in<T>(opt.softcap, sizeof(T) == 4 ? "float32" : "float64");
  const Prepared pr = prepare(opt, in.rows, in.classes, in.inner, in.target,
                              in.probs != nullptr, in.weight, in.sample_weight);
  const Problem<T> p = make_problem(in, opt, grad, pr);
  std::vector<double> losses(static_cast<size_t>(in.rows));  // O(N), never N x C
  run_problem(p, thread_count(opt, in.rows * in.classes), losses.data());
  return reduce(opt, pr, losses, in.rows, row_losses);
}

double cross_entropy_half(const HalfInputs& in, const Options& opt, uint16_t* grad,
                          float* row_losses) {
  check_call(opt, in.rows, in.classes, in.inner, in.row_stride, in.logits != nullptr,
             in.target != nullptr, in.probs != nullptr, in.probs_row_stride,
             row_losses != nullptr, grad != nullptr && grad == in.logits);
  check_cap_in<float>(opt.softcap, "float32 (the math of 16-bit logits)");
  const Prepared pr = prepare(opt, in.rows, in.classes, in.inner, in.target,
                              in.probs != nullptr, in.weight, in.sample_weight);
  const KernelTable& table = active_table();
  const int kind = int(in.kind);
  const int64_t C = in.classes, rows = in.rows;
  // (Short rows take the chunked float32 path below, so that they run through the same
  // short-row kernel as float32 logits: the same bits, rounded once.)
  if (in.inner == 1 && !(C <= short_row_classes() && rows > 1) &&
      !(thread_count(opt, rows * C) > 1 && rows < thread_count(opt, rows * C) && pr.nb > 1)) {
    // Rows: one parallel region; each thread converts a row into its own float32 buffer, runs
    // the float32 row through the kernel in place there, and rounds the gradient out once.
    Inputs<float> ci;
    ci.rows = rows;
    ci.classes = C;
    ci.row_stride = C;
    ci.target = in.target;
    ci.probs = nullptr;
    ci.weight = in.weight;
    ci.sample_weight = in.sample_weight;
    Problem<float> p = make_problem(ci, opt, static_cast<float*>(nullptr), pr);
    p.probs = in.probs != nullptr;
    std::vector<double> losses(static_cast<size_t>(rows));
    const int nt = thread_count(opt, rows * C);
    const int team = int(std::min<int64_t>(nt, std::max<int64_t>(rows, 1)));
    auto run_rows = [&](int64_t begin, int64_t end) {
      // e = exp(z' - m) of a row in float32 (the 16-bit logits are read, and the gradient
      // written, by the SIMD passes themselves), and the row's probability targets.
      std::vector<float> ef(grad ? size_t(C) : 0), pf(in.probs ? size_t(C) : 0);
      std::vector<BlockStat> st(static_cast<size_t>(pr.nb));
      std::vector<float> tbuf(opt.softcap > 0.0 && grad ? size_t(C) : 0);
      for (int64_t n = begin; n < end; ++n) {
        if (in.probs) table.half_to_f32(in.probs + n * in.probs_row_stride, pf.data(), C, kind);
        RowPtrs<float> rp{nullptr, in.probs ? pf.data() : nullptr, nullptr};
        rp.zh = in.logits + n * in.row_stride;
        rp.gh = grad ? grad + n * C : nullptr;
        rp.hk = kind + 1;
        losses[size_t(n)] = compute_row(p, n, rp, st.data(), grad ? ef.data() : nullptr,
                                        tbuf.empty() ? nullptr : tbuf.data());
      }
    };
    parallel_chunks(team, rows, run_rows);
    return reduce(opt, pr, losses, rows, row_losses);
  }
  // The column layout, short rows, or few rows over many classes: fixed chunks through the
  // float32 path.
  // Chunks of whole rows (whole (C, inner) slices in the column layout) of about kHalfChunk
  // elements: fixed, so the work split never depends on the thread count.
  const int64_t slice = in.inner > 1 ? C * in.inner : C;
  const int64_t per = std::max<int64_t>(1, kHalfChunk / slice);  // slices per chunk
  const int64_t nslices = in.inner > 1 ? rows / in.inner : rows;
  std::vector<float> zf(static_cast<size_t>(std::min(per, std::max<int64_t>(nslices, 1)) * slice));
  std::vector<float> pf(in.probs ? zf.size() : 0);
  std::vector<double> losses(static_cast<size_t>(rows));
  const int nt = thread_count(opt, rows * C);

  // Converts `count` slices starting at slice s0 between the strided 16-bit array and a
  // contiguous float buffer, in parallel over slices.
  auto convert = [&](auto fn, int64_t s0, int64_t count, int64_t ld, auto* half, auto* flt) {
    const int team = (count * slice >= kSerialGrain) ? nt : 1;
    (void)team;  // only read by the OpenMP pragma
#if defined(_OPENMP)
#pragma omp parallel for num_threads(team) schedule(static) if (team > 1)
#endif
    for (int64_t k = 0; k < count; ++k) fn(half + (s0 + k) * ld, flt + k * slice, k);
  };
  const int64_t zld = in.inner > 1 ? slice : in.row_stride;
  const int64_t pld = in.inner > 1 ? slice : in.probs_row_stride;

  for (int64_t s0 = 0; s0 < nslices; s0 += per) {
    const int64_t count = std::min(per, nslices - s0);
    convert([&](const uint16_t* h, float* f, int64_t) { table.half_to_f32(h, f, slice, kind); },
            s0, count, zld, in.logits, zf.data());
    if (in.probs)
      convert([&](const uint16_t* h, float* f, int64_t) { table.half_to_f32(h, f, slice, kind); },
              s0, count, pld, in.probs, pf.data());
    const int64_t r0 = in.inner > 1 ? s0 * in.inner : s0;
    Inputs<float> ci;
    ci.logits = zf.data();
    ci.rows = in.inner > 1 ? count * in.inner : count;
    ci.classes = C;
    ci.row_stride = C;
    ci.inner = in.inner;
    ci.target = in.target ? in.target + r0 : nullptr;
    ci.probs = in.probs ? pf.data() : nullptr;
    ci.probs_row_stride = C;
    ci.weight = in.weight;
    ci.sample_weight = in.sample_weight ? in.sample_weight + r0 : nullptr;
    // The gradient overwrites the float chunk in place, then is rounded once to 16 bits.
    const Problem<float> p = make_problem(ci, opt, grad ? zf.data() : nullptr, pr);
    run_problem(p, nt, losses.data() + r0);
    if (grad)
      convert([&](uint16_t* h, float* f, int64_t) { table.f32_to_half(f, h, slice, kind); }, s0,
              count, slice, grad, zf.data());
  }
  return reduce(opt, pr, losses, rows, row_losses);
}

int64_t stream_bytes() { return stream_threshold(); }

int64_t block_classes(int itemsize) {
  if (itemsize == 4) return kBlock<float>;
  if (itemsize == 8) return kBlock<double>;
  throw std::invalid_argument("block_classes: itemsize must be 4 or 8, got " +
                              std::to_string(itemsize));
}

template double cross_entropy<float>(const Inputs<float>&, const Options&, float*, float*);
template double cross_entropy<double>(const Inputs<double>&, const Options&, double*, double*);

}  // namespace fastxent
