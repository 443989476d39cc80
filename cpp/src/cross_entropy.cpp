// The row driver's routing: argument checks, the target pre-pass, the problem set-up, the
// choice of path (column layout, short rows, rows split by blocks, streamed or plain rows;
// run_problem), OpenMP over rows and the ordered reduction. Compiled with baseline flags only;
// every ISA-specific instruction sits behind the function pointers of the active KernelTable.
// The rows themselves: ce_rows.cpp; 16-bit logits: cross_entropy_half.cpp.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "ce_driver.hpp"
#include "threads.hpp"

namespace fastxent {
namespace detail {

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

int64_t short_row_classes() {
  static const int64_t c = [] {
    const char* v = std::getenv("FASTXENT_SHORT_ROWS");
    return v ? std::max<int64_t>(0, std::atoll(v)) : kShortRowClasses;
  }();
  return c;
}

template <class T>
void run_problem(const Problem<T>& p, int nt, double* losses) {
  const int64_t rows = p.in.rows;
  if (p.inner > 1) {
    cross_entropy_cols(p, nt, losses);
    return;
  }
  // With outputs (and no entropy term) short rows keep their path, the outputs from a pass
  // of their own first; the entropy term takes the row kernel.
  // Short rows must be one block (kBlock<T> classes): the column kernel's lane statistics
  // are one BlockStat per row (FASTXENT_SHORT_ROWS above it read past them).
  if (p.C <= std::min(short_row_classes(), kBlock<T>) && rows > 1 && p.beta == 0.0) {
    if (p.extras)
      parallel_chunks(int(std::min<int64_t>(nt, rows)), rows,
                      [&](int64_t b, int64_t e) { outputs_only(p, b, e); });
    short_rows(p, nt, losses);
    return;
  }
  if (nt > 1 && rows < nt && p.nb > 1 && !p.extras) {
    split_classes(p, rows, nt, losses);
    return;
  }
  const int team = int(std::min<int64_t>(nt, rows > 0 ? rows : 1));
  auto run_rows = [&](int64_t begin, int64_t end) {
    std::vector<Pending<T>> pending;
    if (p.stream && p.C * int64_t(sizeof(T)) <= kPipelineRowBytes) {
      stream_rows(p, begin, end, losses, &pending);
    } else if (takes_one_block_rows(p)) {
      one_block_rows(p, begin, end, losses);
    } else {
      BlockStat local[4];
      std::vector<BlockStat> heap(p.nb > 4 ? static_cast<size_t>(p.nb) : 0);
      BlockStat* st = p.nb > 4 ? heap.data() : local;
      std::vector<T> scratch(p.stream || p.e_scratch ? static_cast<size_t>(p.C) : 0);
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

template <class T>
double reduce(const Options& opt, const Prepared& pr, const double* losses, int64_t rows,
              T* row_losses) {
  if (opt.reduction == Reduction::None) {
    for (int64_t n = 0; n < rows; ++n) row_losses[n] = T(losses[n]);
    return 0.0;
  }
  // One chain in row order, as prepare's D (an ignored row's 0 then changes no bit).
  double total = 0.0;
  for (int64_t n = 0; n < rows; ++n) total += losses[n];
  if (opt.reduction == Reduction::Mean) return pr.D == 0.0 ? 0.0 : total / pr.D;
  return total;
}

template Prepared prepare<float>(const Options&, int64_t, int64_t, int64_t, const int64_t*, bool,
                                 const float*, const float*);
template Prepared prepare<double>(const Options&, int64_t, int64_t, int64_t, const int64_t*, bool,
                                  const double*, const double*);
template Problem<float> make_problem<float>(const Inputs<float>&, const Options&, float*,
                                            const Prepared&);
template Problem<double> make_problem<double>(const Inputs<double>&, const Options&, double*,
                                              const Prepared&);
template void run_problem<float>(const Problem<float>&, int, double*);
template void run_problem<double>(const Problem<double>&, int, double*);
template double reduce<float>(const Options&, const Prepared&, const double*, int64_t, float*);
template double reduce<double>(const Options&, const Prepared&, const double*, int64_t, double*);

}  // namespace detail

using namespace detail;

void detail::check_class(int64_t n, int64_t y, int64_t classes, int64_t ignore_index) {
  if (y != ignore_index && (y < 0 || y >= classes))
    throw std::out_of_range("target[" + std::to_string(n) + "] = " + std::to_string(y) +
                            " is outside [0, " + std::to_string(classes) +
                            ") and is not ignore_index (" + std::to_string(ignore_index) + ")");
}

void detail::check_finite(double v, const char* what, bool positive) {
  if (!std::isfinite(v) || v < 0.0 || (positive && v == 0.0))
    throw std::invalid_argument(
        std::string(what) +
        (positive ? " must be finite and > 0, got " : " must be finite and >= 0, got ") +
        std::to_string(v));
}

void detail::reject_entropy_coef(const Options& opt, const char* where) {
  if (opt.entropy_coef != 0.0)
    throw std::invalid_argument(std::string("entropy_coef is not implemented for ") + where +
                                " (only float32 / float64 logits with the class axis last)");
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
  check_finite(opt.entropy_coef, "entropy_coef", false);
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
  const bool prefers = active_table().prefers_streaming_stores;
  return (intel || prefers) ? int64_t(64) << 20 : int64_t(0);
}

template <class T>
double cross_entropy(const Inputs<T>& in, const Options& opt, T* grad, T* row_losses) {
  return cross_entropy<T>(in, opt, grad, row_losses, nullptr);
}

template <class T>
double cross_entropy(const Inputs<T>& in, const Options& opt, T* grad, T* row_losses,
                     const RowOutputs<T>* outs) {
  check_call(opt, in.rows, in.classes, in.inner, in.row_stride, in.logits != nullptr,
             in.target != nullptr, in.probs != nullptr, in.probs_row_stride, row_losses != nullptr,
             grad != nullptr && grad == in.logits);
  check_cap_in<T>(opt.softcap, sizeof(T) == 4 ? "float32" : "float64");
  const RowOutputs<T> o = outs ? *outs : RowOutputs<T>{};
  const bool extras = wants_extras(o, opt, in.inner, in.probs != nullptr);
  const Prepared pr = prepare(opt, in.rows, in.classes, in.inner, in.target, in.probs != nullptr,
                              in.weight, in.sample_weight);
  Problem<T> p = make_problem(in, opt, grad, pr);
  if (extras) enable_extras(p, o, opt, grad != nullptr && grad == in.logits);
  // The row losses, O(N), never N x C: on the stack for a small call (no heap allocation).
  constexpr int64_t kStackRows = 256;
  double small[kStackRows];
  std::vector<double> heap(in.rows > kStackRows ? static_cast<size_t>(in.rows) : 0);
  double* losses = in.rows > kStackRows ? heap.data() : small;
  run_problem(p, thread_count(opt, in.rows * in.classes), losses);
  return reduce(opt, pr, losses, in.rows, row_losses);
}

template <class T>
bool detail::wants_extras(const RowOutputs<T>& o, const Options& opt, int64_t inner, bool probs) {
  const bool extras = o.lse || o.entropy || o.argmax || o.target_logprob || opt.entropy_coef > 0.0;
  if (extras && inner > 1)
    throw std::invalid_argument(
        "per-row outputs and entropy_coef are not implemented for a class axis that is not the "
        "last (inner > 1)");
  if (o.target_logprob && probs) throw std::invalid_argument("target_logprob needs class targets");
  return extras;
}

template <class T>
void detail::enable_extras(Problem<T>& p, const RowOutputs<T>& o, const Options& opt,
                           bool in_place) {
  p.extras = true;
  p.outs = o;
  p.beta = opt.entropy_coef;
  p.ent = o.entropy || p.beta > 0.0;
  p.stream = false;
  p.recompute = false;
  // In place, the block pass's e would overwrite the logits that the argmax scan, the
  // entropy gradient and the entropy's redo of a block holding -inf read again.
  p.e_scratch = in_place && p.grad != nullptr && (o.argmax || p.ent);
}

template bool detail::wants_extras<float>(const RowOutputs<float>&, const Options&, int64_t, bool);
template bool detail::wants_extras<double>(const RowOutputs<double>&, const Options&, int64_t,
                                           bool);
template void detail::enable_extras<float>(Problem<float>&, const RowOutputs<float>&,
                                           const Options&, bool);
template void detail::enable_extras<double>(Problem<double>&, const RowOutputs<double>&,
                                            const Options&, bool);

int64_t stream_bytes() { return stream_threshold(); }

int64_t block_classes(int itemsize) {
  if (itemsize == 4) return kBlock<float>;
  if (itemsize == 8) return kBlock<double>;
  throw std::invalid_argument("block_classes: itemsize must be 4 or 8, got " +
                              std::to_string(itemsize));
}

template double cross_entropy<float>(const Inputs<float>&, const Options&, float*, float*);
template double cross_entropy<double>(const Inputs<double>&, const Options&, double*, double*);
template double cross_entropy<float>(const Inputs<float>&, const Options&, float*, float*,
                                     const RowOutputs<float>*);
template double cross_entropy<double>(const Inputs<double>&, const Options&, double*, double*,
                                      const RowOutputs<double>*);

}  // namespace fastxent
