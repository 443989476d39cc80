// Vocabulary-sharded statistics, their merge, the loss from them, and a shard's gradient
// (fastxent/shard.hpp). The SIMD work is the one-machine kernel's block pass and affine pass
// (kernel_table.hpp), run over the shard's columns; blocks sit at fixed positions of the
// shard, rows are independent, so every result is the same for any thread count.
#include "fastxent/shard.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "ce_row.hpp"
#include "threads.hpp"

namespace fastxent {

namespace {

using namespace detail;

template <class T>
void check_shard(const ShardInputs<T>& in, const Options& opt, bool in_place) {
  check_call(opt, in.rows, in.classes, 1, in.row_stride, in.logits != nullptr, in.target != nullptr,
             in.probs != nullptr, in.probs_row_stride, true, in_place);
  check_cap_in<T>(opt.softcap, sizeof(T) == 4 ? "float32" : "float64");
  reject_entropy_coef(opt, "shards");
  if (in.offset < 0) throw std::invalid_argument("offset must be >= 0");
  if (in.num_classes < in.classes || in.offset > in.num_classes - in.classes)
    throw std::invalid_argument(
        "the shard [offset, offset + classes) = [" + std::to_string(in.offset) + ", " +
        std::to_string(in.offset + in.classes) +
        ") does not fit in num_classes = " + std::to_string(in.num_classes));
  if (in.target)
    for (int64_t n = 0; n < in.rows; ++n)
      check_class(n, in.target[n], in.num_classes, opt.ignore_index);
}

// The one-machine problem description over the shard's columns; eps / C uses the whole
// vocabulary.
template <class T>
Problem<T> shard_problem(const ShardInputs<T>& in, const Options& opt, T* grad) {
  Problem<T> p;
  p.in.logits = in.logits;
  p.in.rows = in.rows;
  p.in.classes = in.classes;
  p.in.row_stride = in.row_stride;
  p.in.target = in.target;
  p.in.probs = in.probs;
  p.in.probs_row_stride = in.probs_row_stride;
  p.in.weight = in.weight;
  p.ignore_index = opt.ignore_index;
  p.C = in.classes;
  p.C_total = in.num_classes;
  p.nb = (in.classes + kBlock<T> - 1) / kBlock<T>;
  p.inner = 1;
  p.grad = grad;
  p.eps = opt.label_smoothing;
  p.lambda = opt.z_loss;
  p.alpha = opt.logit_scale;
  p.cap = opt.softcap;
  p.W = 0.0;  // unused: the shard's own weight sums are taken per block
  p.block_w = nullptr;
  p.s = 1.0;
  p.zero_all = false;
  p.stream = false;
  p.probs = in.probs != nullptr;
  use_active_kernels(p);
  return p;
}

// Whether the shard's row n owns its class target (local index in *y).
template <class T>
bool owns_target(const Problem<T>& p, int64_t offset, int64_t n, int64_t* y) {
  const int64_t t = p.in.target[n];
  if (t == p.ignore_index || t < offset || t >= offset + p.C) return false;
  *y = t - offset;
  return true;
}

double row_lse(const double* st) { return st[kStatMax] + std::log(st[kStatSumExp]); }

bool row_nan(const double* st) { return std::isnan(st[kStatMax]) || std::isnan(st[kStatSumExp]); }

// Count and coverage of merged statistics; throws naming the first bad row.
void check_merged(const double* stats, int64_t rows, int64_t num_classes) {
  for (int64_t n = 0; n < rows; ++n) {
    const double* st = stats + n * kStatFields;
    if (st[kStatColumns] != double(num_classes))
      throw std::invalid_argument("statistics of row " + std::to_string(n) + " cover " +
                                  std::to_string(st[kStatColumns]) +
                                  " columns, not num_classes = " + std::to_string(num_classes) +
                                  ": merge the statistics of every shard, once each");
    if (st[kStatCount] != 0.0 && st[kStatCount] != 1.0)
      throw std::invalid_argument("statistics of row " + std::to_string(n) + " have count " +
                                  std::to_string(st[kStatCount]) +
                                  " (0 or 1 expected): shards overlap or were merged twice");
  }
}

// Row n's output statistics (kOutFields at o) from its blocks' statistics.
template <class T>
void output_row(const Problem<T>& p, const ShardInputs<T>& in, int64_t n, const RowPtrs<T>& rp,
                const BlockStat* st, double* o) {
  const RowResult r = stats_only(p, st);
  const bool nan = std::isnan(r.a), degen = !nan && r.M == -kInf;
  o[kOutMax] = nan ? kNaN : r.M;
  o[kOutSumExp] = nan ? kNaN : degen ? 0.0 : r.S;
  o[kOutH] = nan ? kNaN : degen ? 0.0 : r.E;
  const int64_t i = row_argmax(p, rp.z, st, nan);
  const double v = double(rp.z[i]);
  o[kOutNaN] = std::isnan(v) ? 1.0 : 0.0;
  o[kOutArgVal] = v;
  o[kOutArgIdx] = double(in.offset + i);
  int64_t y;
  double dz;
  o[kOutZy] =
      !p.probs && owns_target(p, in.offset, n, &y) ? transform(p, double(rp.z[y]), &dz) : 0.0;
  o[kOutColumns] = double(in.classes);
}

}  // namespace

template <class T>
void shard_stats(const ShardInputs<T>& in, const Options& opt, double* stats) {
  shard_stats(in, opt, stats, nullptr);
}

template <class T>
void shard_stats(const ShardInputs<T>& in, const Options& opt, double* stats, double* outs) {
  check_shard(in, opt, false);
  if (in.rows > 0 && stats == nullptr) throw std::invalid_argument("stats must not be null");
  Problem<T> p = shard_problem(in, opt, static_cast<T*>(nullptr));
  p.ent = outs != nullptr;  // the entropy sums (the other sums are the same bits)
  const bool smooth = !p.probs && p.eps > 0.0;
  // Class-weight sums per block (for sum u z' = wd + m' * sum u), and of the shard.
  std::vector<double> bw(static_cast<size_t>(p.nb), 0.0);
  double W = 0.0;
  for (int64_t k = 0; k < p.nb; ++k) {
    const int64_t off = k * kBlock<T>, len = p.block_len(k);
    const double b = in.weight ? sum_f64(in.weight + off, len) : double(len);
    bw[size_t(k)] = b;
    W += b;
  }
  const double C = double(in.num_classes);
  const int nt = resolve_threads(opt.num_threads, in.rows * in.classes);
  const int team = int(std::min<int64_t>(nt, std::max<int64_t>(in.rows, 1)));
  parallel_chunks(team, in.rows, [&](int64_t begin, int64_t end) {
    std::vector<BlockStat> st(static_cast<size_t>(p.nb));
    for (int64_t n = begin; n < end; ++n) {
      double* out = stats + n * kStatFields;
      std::fill(out, out + kStatFields, 0.0);
      out[kStatColumns] = double(in.classes);
      const bool ignored = !p.probs && p.in.target[n] == p.ignore_index;
      if (ignored && !outs) {
        out[kStatMax] = -kInf;
        continue;
      }
      const RowPtrs<T> rp = row_ptrs(p, n);
      double M = -kInf;
      bool nan = false;
      for (int64_t k = 0; k < p.nb; ++k) {
        st[size_t(k)] =
            p.fns->block(block_in(p, rp, k, static_cast<T*>(nullptr), static_cast<T*>(nullptr)));
        M = std::max(M, st[size_t(k)].m);
        nan |= std::isnan(st[size_t(k)].m) || std::isnan(st[size_t(k)].s);
      }
      if (outs) output_row(p, in, n, rp, st.data(), outs + n * kOutFields);
      if (ignored) {
        out[kStatMax] = -kInf;
        continue;
      }
      double S = 0.0, U = 0.0, UZ = 0.0;  // sum exp(z' - M), sum u, sum u z'
      for (int64_t k = 0; k < p.nb; ++k) {
        const BlockStat& b = st[size_t(k)];
        if (b.m != -kInf && !nan) S += b.s * rescale(b.m, M);
        if (p.probs || smooth) {
          const double uk = p.probs ? b.usum : bw[size_t(k)];
          U += uk;
          // wd is relative to the block max, or absolute for a block of -inf.
          UZ += b.m == -kInf ? b.wd : b.wd + b.m * uk;
        }
      }
      out[kStatMax] = nan ? kNaN : M;
      out[kStatSumExp] = nan ? kNaN : S;
      if (p.probs) {
        out[kStatQ] = U;
        out[kStatQZ] = UZ;
        if (in.offset == 0) out[kStatWy] = out[kStatCount] = 1.0;
        continue;
      }
      if (smooth) {
        out[kStatQ] = p.eps / C * W;
        out[kStatQZ] = p.eps / C * UZ;
      }
      int64_t y;
      if (owns_target(p, in.offset, n, &y)) {
        const double wy = in.weight ? double(in.weight[y]) : 1.0;
        const double f = (1.0 - p.eps) * wy;
        if (f != 0.0) {  // 0 * (-inf) would be NaN: a zero term is skipped
          double dz;
          out[kStatQ] += f;
          out[kStatQZ] += f * transform(p, double(rp.z[y]), &dz);
        }
        out[kStatWy] = wy;
        out[kStatCount] = 1.0;
      }
    }
  });
}

void merge_stats(const double* a, const double* b, int64_t rows, double* out) {
  for (int64_t n = 0; n < rows; ++n) {
    const double* x = a + n * kStatFields;
    const double* y = b + n * kStatFields;
    double r[kStatFields];
    if (row_nan(x) || row_nan(y)) {
      r[kStatMax] = r[kStatSumExp] = kNaN;
    } else {
      // std::max(-0.0, +0.0) returns its first argument: equal maxima take +0.0 over -0.0,
      // whichever side it is on, so that the merge stays commutative bit for bit.
      const double mx = x[kStatMax], my = y[kStatMax];
      const double M = mx == my ? (std::signbit(mx) ? my : mx) : std::max(mx, my);
      r[kStatMax] = M;
      // A side of -inf (no finite column) adds nothing; rescale() is exactly 1 at the max.
      r[kStatSumExp] = (x[kStatMax] == -kInf ? 0.0 : x[kStatSumExp] * rescale(x[kStatMax], M)) +
                       (y[kStatMax] == -kInf ? 0.0 : y[kStatSumExp] * rescale(y[kStatMax], M));
    }
    // The sum of two NaNs is the first one's payload: one NaN for both orders.
    for (int f = kStatQ; f < kStatFields; ++f) {
      r[f] = x[f] + y[f];
      if (std::isnan(r[f])) r[f] = kNaN;
    }
    std::memcpy(out + n * kStatFields, r, sizeof r);
  }
}

void merge_output_stats(const double* a, const double* b, int64_t rows, double* out) {
  for (int64_t n = 0; n < rows; ++n) {
    const double* x = a + n * kOutFields;
    const double* y = b + n * kOutFields;
    double r[kOutFields];
    const auto nan_side = [](const double* s) {
      return std::isnan(s[kOutMax]) || std::isnan(s[kOutSumExp]);
    };
    if (nan_side(x) || nan_side(y)) {
      r[kOutMax] = r[kOutSumExp] = r[kOutH] = kNaN;
    } else {
      const double mx = x[kOutMax], my = y[kOutMax];
      const double M = mx == my ? (std::signbit(mx) ? my : mx) : std::max(mx, my);
      double S = 0.0, H = 0.0;
      for (const double* s : {x, y}) {
        // As the blocks of one row (stats_only): a side of -inf, or one whose rescale is 0
        // ((m - M) S may overflow there, times 0), adds nothing.
        if (s[kOutMax] == -kInf) continue;
        const double f = rescale(s[kOutMax], M);
        S += s[kOutSumExp] * f;
        if (f != 0.0) H += (s[kOutH] + (s[kOutMax] - M) * s[kOutSumExp]) * f;
      }
      r[kOutMax] = M;
      r[kOutSumExp] = S;
      r[kOutH] = H;
    }
    // The argmax: a NaN row's first NaN; else the larger value, then the smaller index (both
    // the value and the index from one side, so -0.0 and +0.0 keep the first one's sign).
    const bool take_y =
        x[kOutNaN] != y[kOutNaN]
            ? y[kOutNaN] > x[kOutNaN]
            : (x[kOutNaN] == 0.0 && x[kOutArgVal] != y[kOutArgVal] ? y[kOutArgVal] > x[kOutArgVal]
                                                                   : y[kOutArgIdx] < x[kOutArgIdx]);
    const double* w = take_y ? y : x;
    r[kOutNaN] = w[kOutNaN];
    r[kOutArgVal] = w[kOutArgVal];
    r[kOutArgIdx] = w[kOutArgIdx];
    for (int f : {int(kOutZy), int(kOutColumns)}) {
      r[f] = x[f] + y[f];
      if (std::isnan(r[f])) r[f] = kNaN;
    }
    std::memcpy(out + n * kOutFields, r, sizeof r);
  }
}

double stats_denominator(const double* stats, int64_t rows, const double* sample_weight) {
  double D = 0.0;
  for (int64_t n = 0; n < rows; ++n) {
    const double* st = stats + n * kStatFields;
    if (st[kStatCount] == 0.0) continue;
    D += (sample_weight ? sample_weight[n] : 1.0) * st[kStatWy];
  }
  return D;
}

double stats_loss(const double* stats, int64_t rows, const double* sample_weight,
                  const Options& opt, int64_t num_classes, double* row_losses) {
  if (rows < 0) throw std::invalid_argument("negative number of rows");
  if (opt.reduction != Reduction::None && opt.reduction != Reduction::Sum &&
      opt.reduction != Reduction::Mean)
    throw std::invalid_argument("unknown reduction");
  check_finite(opt.z_loss, "z_loss", false);
  reject_entropy_coef(opt, "shards");
  if (opt.has_normalizer) check_finite(opt.normalizer, "normalizer", false);
  if (opt.reduction == Reduction::None && rows > 0 && !row_losses)
    throw std::invalid_argument("reduction 'none' needs a row_losses output");
  if (num_classes > 0) check_merged(stats, rows, num_classes);
  const bool mean = opt.reduction == Reduction::Mean;
  const double D =
      opt.has_normalizer ? opt.normalizer : stats_denominator(stats, rows, sample_weight);
  double total = 0.0;
  for (int64_t n = 0; n < rows; ++n) {
    const double* st = stats + n * kStatFields;
    double loss = 0.0;
    if (st[kStatCount] != 0.0 && !(mean && D == 0.0)) {
      if (row_nan(st)) {
        loss = kNaN;
      } else if (st[kStatMax] == -kInf) {
        loss = kInf;  // every class -inf, as the one-machine kernel
      } else {
        const double lse = row_lse(st);
        // Q lse - QZ as (Q max - QZ) + Q log(sumexp): max - z'_y first, as the one-machine
        // kernel, so a small loss is not lost against a large max (exact for a class target
        // without weights or smoothing; otherwise an absolute error of a few ULPs of Q max).
        const double Q = st[kStatQ];
        if (Q != 0.0) loss = (Q * st[kStatMax] - st[kStatQZ]) + Q * std::log(st[kStatSumExp]);
        loss += opt.z_loss * lse * lse;
      }
      loss *= sample_weight ? sample_weight[n] : 1.0;
    }
    if (row_losses) row_losses[n] = loss;
    total += loss;
  }
  if (opt.reduction == Reduction::None) return 0.0;
  if (mean) return D == 0.0 ? 0.0 : total / D;
  return total;
}

template <class T>
void shard_grad(const ShardInputs<T>& in, const double* stats, const T* sample_weight,
                const Options& opt, double scale, T* grad) {
  check_shard(in, opt, grad != nullptr && grad == in.logits);
  if (!std::isfinite(scale)) throw std::invalid_argument("scale must be finite");
  if (in.rows > 0 && (stats == nullptr || grad == nullptr))
    throw std::invalid_argument("stats and grad must not be null");
  check_merged(stats, in.rows, in.num_classes);
  for (int64_t n = 0; n < in.rows; ++n) {
    const bool counted = in.probs || in.target[n] != opt.ignore_index;
    if (counted != (stats[n * kStatFields + kStatCount] == 1.0))
      throw std::invalid_argument(
          "statistics of row " + std::to_string(n) + (counted ? " do not count it" : " count it") +
          " but its target says otherwise: were they computed with the same target and "
          "ignore_index?");
  }
  Problem<T> p = shard_problem(in, opt, grad);
  double s = scale;
  if (opt.reduction == Reduction::Mean) {
    std::vector<double> sw;
    if (sample_weight) sw.assign(sample_weight, sample_weight + in.rows);
    const double D = opt.has_normalizer
                         ? opt.normalizer
                         : stats_denominator(stats, in.rows, sample_weight ? sw.data() : nullptr);
    s = D == 0.0 ? 0.0 : scale / D;
  }
  const double C = double(in.num_classes);
  const int nt = resolve_threads(opt.num_threads, in.rows * in.classes);
  const int team = int(std::min<int64_t>(nt, std::max<int64_t>(in.rows, 1)));
  parallel_chunks(team, in.rows, [&](int64_t begin, int64_t end) {
    std::vector<T> tbuf(p.cap > 0.0 ? static_cast<size_t>(p.C) : 0);
    T* t = tbuf.empty() ? nullptr : tbuf.data();
    for (int64_t n = begin; n < end; ++n) {
      const double* st = stats + n * kStatFields;
      T* g = grad + n * p.C;
      const RowPtrs<T> rp = row_ptrs(p, n);
      if (st[kStatCount] == 0.0 || s == 0.0) {
        std::memset(static_cast<void*>(g), 0, sizeof(T) * size_t(p.C));
        continue;
      }
      int64_t y = -1;
      double zy = 0.0, dzy = p.alpha;
      const bool own = !p.probs && owns_target(p, in.offset, n, &y);
      if (own) zy = transform(p, double(rp.z[y]), &dzy);  // before in place overwrites it
      RowResult r{0.0, st[kStatMax], 0.0, 0.0,
                  s * (sample_weight ? double(sample_weight[n]) : 1.0)};
      r.b = r.s * (p.probs ? 1.0 : p.eps / C) * p.alpha;
      if (row_nan(st)) {
        r.a = kNaN;
      } else if (r.M == -kInf) {
        r.a = r.an = r.s * st[kStatQ] / C * p.alpha;  // the uniform limit, as one machine
      } else {
        const double za = 2.0 * p.lambda * row_lse(st);
        r.an = r.s * (st[kStatQ] + za) * p.alpha;
        r.S = st[kStatSumExp];
        r.a = r.s * (st[kStatQ] + za) / st[kStatSumExp] * p.alpha;
      }
      for (int64_t k = 0; k < p.nb; ++k) {
        const BlockStat b = p.fns->block(block_in(p, rp, k, g, t));
        write_grad_block(p, b, r, rp.prob, g, t, g, k, false);
      }
      if (own) fix_target(p, r, zy, dzy, g, y);
    }
  });
}

template void shard_stats<float>(const ShardInputs<float>&, const Options&, double*);
template void shard_stats<double>(const ShardInputs<double>&, const Options&, double*);
template void shard_stats<float>(const ShardInputs<float>&, const Options&, double*, double*);
template void shard_stats<double>(const ShardInputs<double>&, const Options&, double*, double*);
template void shard_grad<float>(const ShardInputs<float>&, const double*, const float*,
                                const Options&, double, float*);
template void shard_grad<double>(const ShardInputs<double>&, const double*, const double*,
                                 const Options&, double, double*);

}  // namespace fastxent
