// Driver of the sigmoid (binary / multi-label) cross-entropy: checks, broadcasting of
// pos_weight / weight, OpenMP over fixed chunks, and the ordered reduction. Baseline flags
// only; the element math is in sigmoid_impl.hpp behind the active KernelTable.
//
// Determinism: the elements are cut into chunks of kChunk at fixed positions, each chunk
// into runs at fixed positions (the broadcast periods); every run's sum comes back in double
// and the chunk sums are added in chunk order. No bit depends on the thread count.
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "fastxent/fastxent.hpp"
#include "fastxent/sigmoid.hpp"
#include "kernel_table.hpp"
#include "threads.hpp"

namespace fastxent {

namespace {

constexpr int64_t kChunk = 8192;      // elements per chunk (the unit of parallel work)
constexpr int64_t kMinPeriod = 1024;  // a short last axis is tiled to at least this

// A broadcast operand as the kernel sees it: element i reads data[i % period] (period n: one
// value per element). A Last operand shorter than kMinPeriod is tiled so that runs between
// period boundaries stay long (a 1-element pos_weight must not mean 1-element runs).
template <class T>
struct Operand {
  const T* data = nullptr;
  int64_t period = 0;  // 0: absent
  std::vector<T> tiled;

  Operand(const T* p, Broadcast mode, int64_t n, int64_t last) {
    if (mode == Broadcast::None || n == 0) return;
    data = p;
    period = mode == Broadcast::Full ? n : last;
    if (mode == Broadcast::Last && last < kMinPeriod) {
      period = last * ((kMinPeriod + last - 1) / last);
      tiled.resize(size_t(period));
      for (int64_t i = 0; i < period; ++i) tiled[size_t(i)] = p[i % last];
      data = tiled.data();
    }
  }
  const T* at(int64_t i) const { return period ? data + i % period : nullptr; }
  // The first period boundary after i (or `end`).
  int64_t next(int64_t i, int64_t end) const {
    if (!period) return end;
    const int64_t b = (i / period + 1) * period;
    return b < end ? b : end;
  }
};

bool overlap(const void* a, int64_t na, const void* b, int64_t nb) {
  const auto pa = reinterpret_cast<uintptr_t>(a), pb = reinterpret_cast<uintptr_t>(b);
  return a && b && na > 0 && nb > 0 && pa < pb + uintptr_t(nb) && pb < pa + uintptr_t(na);
}

}  // namespace

template <class T>
double sigmoid_cross_entropy(const SigmoidInputs<T>& in, const SigmoidOptions& opt, T* grad,
                             T* losses) {
  const int64_t n = in.n;
  // ---- checks: everything is validated before anything is written ----
  if (n < 0) throw std::invalid_argument("negative number of elements");
  if (opt.reduction != Reduction::None && opt.reduction != Reduction::Sum &&
      opt.reduction != Reduction::Mean)
    throw std::invalid_argument("unknown reduction");
  if (opt.num_threads < 0) throw std::invalid_argument("num_threads must be positive");
  if (n > 0 && (in.logits == nullptr || in.target == nullptr))
    throw std::invalid_argument("logits and target must not be null");
  if (n > 0 && opt.reduction == Reduction::None && losses == nullptr)
    throw std::invalid_argument("reduction 'none' needs a losses output");
  struct Arr {
    const char* name;
    const T* p;
    Broadcast mode;
  };
  const Arr ops[2] = {{"pos_weight", in.pos_weight, in.pos_weight_mode},
                      {"weight", in.weight, in.weight_mode}};
  for (const Arr& a : ops) {
    if (a.mode != Broadcast::None && a.mode != Broadcast::Last && a.mode != Broadcast::Full)
      throw std::invalid_argument(std::string(a.name) + ": unknown broadcast mode");
    if (a.mode == Broadcast::Last && (in.last < 1 || n % in.last != 0))
      throw std::invalid_argument(std::string(a.name) +
                                  ": the last axis length must be >= 1 and divide n");
    if (n > 0 && a.mode != Broadcast::None && a.p == nullptr)
      throw std::invalid_argument(std::string(a.name) + " must not be null");
  }
  const int64_t bytes = n * int64_t(sizeof(T));
  auto span = [&](const Arr& a) {
    const int64_t count = a.mode == Broadcast::Full ? n : a.mode == Broadcast::Last ? in.last : 0;
    return int64_t(sizeof(T)) * count;
  };
  const struct {
    const char* name;
    T* p;
    bool in_place_ok;
  } outs[2] = {{"grad", grad, true}, {"losses", losses, false}};
  for (const auto& o : outs) {
    if (overlap(o.p, bytes, in.target, bytes) || overlap(o.p, bytes, ops[0].p, span(ops[0])) ||
        overlap(o.p, bytes, ops[1].p, span(ops[1])) ||
        (!(o.in_place_ok && o.p == in.logits) && overlap(o.p, bytes, in.logits, bytes)))
      throw std::invalid_argument(std::string(o.name) +
                                  " overlaps an input (only grad == logits is allowed)");
  }
  if (overlap(grad, bytes, losses, bytes)) throw std::invalid_argument("grad and losses overlap");

  // ---- compute ----
  const bool mean = opt.reduction == Reduction::Mean;
  const Operand<T> pw(in.pos_weight, in.pos_weight_mode, n, in.last);
  const Operand<T> wt(in.weight, in.weight_mode, n, in.last);
  const SigmoidFns<T>& fns = sigmoid_fns<T>(active_table());
  const T gscale = T(mean && n > 0 ? 1.0 / double(n) : 1.0);
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> part(size_t(chunks), 0.0);

  auto run_chunk = [&](int64_t k) {
    const int64_t end = (k + 1) * kChunk < n ? (k + 1) * kChunk : n;
    double s = 0.0;
    for (int64_t i = k * kChunk; i < end;) {
      const int64_t j = wt.next(i, pw.next(i, end));
      SigmoidSeg<T> seg{in.logits + i,
                        in.target + i,
                        pw.at(i),
                        wt.at(i),
                        j - i,
                        losses ? losses + i : nullptr,
                        grad ? grad + i : nullptr,
                        gscale};
      s += fns.seg(seg);
      i = j;
    }
    part[size_t(k)] = s;
  };

  int nt = detail::resolve_threads(opt.num_threads, n);  // serial when small or forked
  if (nt == 1) {
    for (int64_t k = 0; k < chunks; ++k) run_chunk(k);
  } else {
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) num_threads(nt)
#endif
    for (int64_t k = 0; k < chunks; ++k) run_chunk(k);
  }

  if (opt.reduction == Reduction::None) return 0.0;
  double total = 0.0;
  for (double s : part) total += s;  // chunk order: independent of the thread count
  return mean ? (n > 0 ? total / double(n) : 0.0) : total;
}

template double sigmoid_cross_entropy<float>(const SigmoidInputs<float>&, const SigmoidOptions&,
                                             float*, float*);
template double sigmoid_cross_entropy<double>(const SigmoidInputs<double>&, const SigmoidOptions&,
                                              double*, double*);

}  // namespace fastxent
