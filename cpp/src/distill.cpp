// Driver of the distillation losses (fastxent/distill.hpp): checks, rows over OpenMP threads
// (each row on one thread), the per-row finish in double and the ordered reduction. Baseline
// flags only; the element passes are in distill_impl.hpp behind the active KernelTable.
//
// Passes per row: statistics (both lse's, the sums that give the KL divergences, and the
// shifted exps of both rows stored for the later passes: the student's in the student
// gradient's buffer when it is a separate one, the rest in per-thread scratch rows); for JSD
// one more pass for KL(p || m) and KL(q || m) (storing lx - lm); then the gradient pass, which
// needs no exp or log. So every element costs two exps (the least that gives both lse's), the
// JSD one division and a log1p more. The passes after the first read the row from cache (a
// few hundred KiB). 16-bit rows are converted to float in per-thread row buffers. No
// rows x classes temporary. Determinism: every row is computed by one thread with the same
// operations whatever is asked for (in place or not, with or without the teacher's
// gradient); the row losses are added in row order.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "fastxent/distill.hpp"
#include "kernel_table.hpp"
#include "threads.hpp"

namespace fastxent {

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

bool overlap(const void* a, int64_t na, const void* b, int64_t nb) {
  const auto pa = reinterpret_cast<uintptr_t>(a), pb = reinterpret_cast<uintptr_t>(b);
  return a && b && na > 0 && nb > 0 && pa < pb + uintptr_t(nb) && pb < pa + uintptr_t(na);
}

// Bytes spanned by rows x classes with the given row stride.
int64_t span(int64_t rows, int64_t classes, int64_t stride, int64_t size) {
  return rows > 0 ? ((rows - 1) * stride + classes) * size : 0;
}

template <class T>
void check(const DistillInputs<T>& in, const DistillOptions& o, const T* gs, const T* gt,
           const double* losses) {
  if (in.rows < 0) throw std::invalid_argument("negative number of rows");
  if (in.classes < 1) throw std::invalid_argument("the class axis has no classes (C = 0)");
  if (in.student_stride < in.classes || in.teacher_stride < in.classes)
    throw std::invalid_argument("row strides must be at least the number of classes");
  if (in.rows > 0 && (in.student == nullptr || in.teacher == nullptr))
    throw std::invalid_argument("student and teacher must not be null");
  if (o.divergence != Divergence::ForwardKL && o.divergence != Divergence::ReverseKL &&
      o.divergence != Divergence::Jsd)
    throw std::invalid_argument("unknown divergence");
  if (!(o.temperature > 0.0) || !std::isfinite(o.temperature))
    throw std::invalid_argument("temperature must be finite and > 0");
  if (!(o.beta >= 0.0 && o.beta <= 1.0)) throw std::invalid_argument("beta must be in [0, 1]");
  if (o.reduction != Reduction::None && o.reduction != Reduction::Sum &&
      o.reduction != Reduction::Mean)
    throw std::invalid_argument("unknown reduction");
  if (o.num_threads < 0) throw std::invalid_argument("num_threads must be positive");
  if (in.row_weight)
    for (int64_t n = 0; n < in.rows; ++n)
      if (!(in.row_weight[n] >= 0.0) || !std::isfinite(in.row_weight[n]))
        throw std::invalid_argument("row weights must be finite and >= 0");
  if constexpr (std::is_same_v<T, uint16_t>) {
    if (in.half != HalfKind::Float16 && in.half != HalfKind::BFloat16)
      throw std::invalid_argument("unknown 16-bit kind");
  }
  const int64_t sz = int64_t(sizeof(T));
  const int64_t xs = span(in.rows, in.classes, in.student_stride, sz);
  const int64_t ts = span(in.rows, in.classes, in.teacher_stride, sz);
  const int64_t gb = in.rows * in.classes * sz;
  const int64_t wb = in.row_weight ? in.rows * 8 : 0;
  const int64_t lb = losses ? in.rows * 8 : 0;
  const bool gs_in_place = gs && gs == in.student && in.student_stride == in.classes;
  const bool gt_in_place = gt && gt == in.teacher && in.teacher_stride == in.classes;
  if ((!gs_in_place && overlap(gs, gb, in.student, xs)) || overlap(gs, gb, in.teacher, ts) ||
      overlap(gs, gb, in.row_weight, wb) || overlap(gs, gb, losses, lb))
    throw std::invalid_argument(
        "grad_student overlaps an input or output (only grad_student == student is allowed)");
  if ((!gt_in_place && overlap(gt, gb, in.teacher, ts)) || overlap(gt, gb, in.student, xs) ||
      overlap(gt, gb, in.row_weight, wb) || overlap(gt, gb, losses, lb) || overlap(gt, gb, gs, gb))
    throw std::invalid_argument(
        "grad_teacher overlaps an input or output (only grad_teacher == teacher is allowed)");
  if (overlap(losses, lb, in.student, xs) || overlap(losses, lb, in.teacher, ts) ||
      overlap(losses, lb, in.row_weight, wb))
    throw std::invalid_argument("row_losses overlaps an input");
}

}  // namespace

template <class S>
double distill(const DistillInputs<S>& in, const DistillOptions& opt, S* gs, S* gt,
               double* losses) {
  check(in, opt, gs, gt, losses);
  constexpr bool kHalf = std::is_same_v<S, uint16_t>;
  using T = std::conditional_t<kHalf, float, S>;
  const KernelTable& table = active_table();
  const DistillFns<T>& fns = distill_fns<T>(table);
  const int64_t N = in.rows, C = in.classes;
  const double tau = opt.temperature;
  const bool mean = opt.reduction == Reduction::Mean;
  double den = double(N);
  if (in.row_weight) {
    den = 0.0;
    for (int64_t n = 0; n < N; ++n) den += in.row_weight[n];
  }
  // "mean" over a total weight of 0: loss 0 and gradient 0, as fastxent's cross-entropy (an
  // empty batch contributes nothing; PyTorch would give 0/0 = NaN).
  const double g = mean ? (den > 0.0 ? 1.0 / den : 0.0) : 1.0;
  DistillMode mode = DistillMode(int(opt.divergence));
  if (mode == DistillMode::Jsd && opt.beta == 0.0) mode = DistillMode::ForwardKL;
  if (mode == DistillMode::Jsd && opt.beta == 1.0) mode = DistillMode::ReverseKL;
  const double beta = opt.beta;
  std::vector<double> part(size_t(N), 0.0);
  const Storage storage =
      in.half == HalfKind::BFloat16 ? Storage::BFloat16 : Storage::Float16;  // kHalf only

  const int64_t chunks = (C + kDistillChunk<T> - 1) / kDistillChunk<T>;
  auto body = [&](int64_t b0, int64_t b1) {
    // Per thread: 16-bit rows as float (student, teacher, grad_student, grad_teacher); rows
    // of scratch for exp(y - g), lx - lm (JSD) and exp(x - h) where no student gradient buffer
    // of our own can hold it (loss only, in place); the chunk shifts and factors.
    std::vector<T> buf, scratch(size_t(mode == DistillMode::Jsd ? 3 : 2) * size_t(C));
    std::vector<T> shift(2 * static_cast<size_t>(chunks)), fx(static_cast<size_t>(chunks)),
        fy(static_cast<size_t>(chunks));
    if constexpr (kHalf) buf.resize(size_t(4 * C));
    for (int64_t n = b0; n < b1; ++n) {
      const double r = in.row_weight ? in.row_weight[n] : 1.0;
      S* gsr = gs ? gs + n * C : nullptr;
      S* gtr = gt ? gt + n * C : nullptr;
      if (r == 0.0) {
        for (int64_t c = 0; gsr && c < C; ++c) gsr[c] = S(0);
        for (int64_t c = 0; gtr && c < C; ++c) gtr[c] = S(0);
        part[size_t(n)] = 0.0;
        continue;
      }
      const S* sr = in.student + n * in.student_stride;
      const S* tr = in.teacher + n * in.teacher_stride;
      DistillRow<T> row{};
      if constexpr (kHalf) {
        table.half_to_f32(sr, buf.data(), C, storage);
        table.half_to_f32(tr, buf.data() + C, C, storage);
        row.s = buf.data();
        row.t = buf.data() + C;
        row.gs = gsr ? buf.data() + 2 * C : nullptr;
        row.gt = gtr ? buf.data() + 3 * C : nullptr;
      } else {
        row.s = sr;
        row.t = tr;
        row.gs = gsr;
        row.gt = gtr;
      }
      T* ex = row.gs && row.gs != row.s ? row.gs : scratch.data();
      T* ey = scratch.data() + C;
      row.ex = ex;
      row.ey = ey;
      row.fx = fx.data();
      row.fy = fy.data();
      row.lm = mode == DistillMode::Jsd ? scratch.data() + 2 * C : nullptr;
      row.n = C;
      row.alpha = T(1.0 / tau);
      row.mode = mode;
      double st[4];
      fns.stats(row.s, row.t, C, row.alpha, st, ex, ey, shift.data());
      // Chunk factors exp(h - M) / S: an all -inf chunk's exps are 0 (factor 0), unless the
      // whole row is -inf (M = -inf): its softmax is then NaN, as PyTorch's (factor NaN).
      auto factor = [](double h, double M, double sum) {
        if (M == -kInf) return T(std::numeric_limits<double>::quiet_NaN());
        return h == -kInf ? T(0) : T(std::exp(h - M) / sum);
      };
      for (size_t k = 0; k < size_t(chunks); ++k) {
        fx[k] = factor(double(shift[2 * k]), st[0], st[1]);
        fy[k] = factor(double(shift[2 * k + 1]), st[2], st[3]);
      }
      row.max_x = T(st[0]);  // exactly: the maxima are values of T
      row.max_y = T(st[2]);
      row.logs_x = T(std::log(st[1]));
      row.logs_y = T(std::log(st[3]));
      if (mode == DistillMode::Jsd) {
        row.log_beta = T(std::log(beta));
        row.log_1mbeta = T(std::log1p(-beta));
        row.beta = T(beta);
        row.one_m_beta = T(1.0 - beta);
      }
      const double c = g * r * tau;
      // The student's gradient of the forward KL (the teacher's of the reverse) needs not the
      // divergence: one pass for both.
      const bool fused = (mode == DistillMode::ForwardKL && row.gs && !row.gt) ||
                         (mode == DistillMode::ReverseKL && row.gt && !row.gs);
      if (fused) {
        row.cs = row.ct = T(c);
        double D;
        fns.grad_sums(row, &D);
        part[size_t(n)] = r * tau * tau * D;
        if constexpr (kHalf) {
          if (gsr) table.f32_to_half(row.gs, gsr, C, storage);
          if (gtr) table.f32_to_half(row.gt, gtr, C, storage);
        }
        continue;
      }
      double k[2];
      fns.sums(row, k);
      const double ks = k[0], kt = k[1];
      const double D = mode == DistillMode::Jsd ? beta * kt + (1.0 - beta) * ks : k[0];
      part[size_t(n)] = r * tau * tau * D;
      if (row.gs || row.gt) {
        if (mode == DistillMode::Jsd) {
          row.cs = T(c * (1.0 - beta));
          row.ct = T(c * beta);
          row.k_s = T(ks);
          row.k_t = T(kt);
        } else {
          row.cs = row.ct = T(c);
          row.k_s = row.k_t = T(D);
        }
        fns.grad(row);
        if constexpr (kHalf) {
          if (gsr) table.f32_to_half(row.gs, gsr, C, storage);
          if (gtr) table.f32_to_half(row.gt, gtr, C, storage);
        }
      }
    }
  };
  const int team = detail::resolve_threads(opt.num_threads, N * C);
  detail::parallel_chunks(int(std::min<int64_t>(team, std::max<int64_t>(N, 1))), N, body);

  double total = 0.0;
  for (int64_t n = 0; n < N; ++n) {
    if (losses) losses[n] = part[size_t(n)];
    total += part[size_t(n)];  // row order: independent of the thread count
  }
  if (opt.reduction == Reduction::None) return 0.0;
  return mean ? (den > 0.0 ? total / den : 0.0) : total;
}

template double distill<float>(const DistillInputs<float>&, const DistillOptions&, float*, float*,
                               double*);
template double distill<double>(const DistillInputs<double>&, const DistillOptions&, double*,
                                double*, double*);
template double distill<uint16_t>(const DistillInputs<uint16_t>&, const DistillOptions&, uint16_t*,
                                  uint16_t*, double*);

}  // namespace fastxent
