// fastxent: distillation losses between a student's and a teacher's logits, loss and gradients
// in one call. The plain C++ API: raw pointers, sizes and options; no Python types. Bad
// arguments throw std::invalid_argument before anything is written.
//
// Math, per row n (C classes), tau the temperature, p = softmax(s / tau) the student's and
// q = softmax(t / tau) the teacher's distribution, r_n the row weight:
//   ForwardKL  D_n = KL(q || p) = sum_c q_c (log q_c - log p_c)
//   ReverseKL  D_n = KL(p || q) = sum_c p_c (log p_c - log q_c)
//   Jsd        m = beta q + (1 - beta) p,  D_n = beta KL(q || m) + (1 - beta) KL(p || m)
//              (beta in (0, 1); beta = 0 is ForwardKL and beta = 1 ReverseKL, as Liger-Kernel's
//              generalised JSD defines its end points)
//   row loss   l_n = r_n tau^2 D_n (the tau^2 keeps gradient magnitudes independent of tau).
// "sum" adds the row losses, "mean" divides the sum by sum_n r_n (the number of rows without
// row weights: PyTorch's "batchmean"; 0 with a zero gradient when that sum is 0, as for the
// cross-entropy), "none" returns 0 and writes them (row_losses).
// Gradients (of the reduced loss; for "none", of the sum of the row losses), g = 1 / sum r for
// "mean", else 1:
//   ForwardKL  dL/ds = g r tau (p - q);            dL/dt = g r tau q (log q - log p - D)
//   ReverseKL  dL/ds = g r tau p (log p - log q - D);  dL/dt = g r tau (q - p)
//   Jsd        dL/ds = g r tau (1 - beta) p (log p - log m - KL(p || m))
//              dL/dt = g r tau beta q (log q - log m - KL(q || m))
// A row of weight 0 is skipped: loss 0 and gradient 0 whatever its logits hold. NaN in a row
// gives NaN in its loss and gradient; a row whose logits are all -inf gives NaN (as PyTorch's
// log_softmax). Zero probabilities times infinite log-ratios count 0.
#pragma once

#include <cstdint>

#include "fastxent/fastxent.hpp"  // Reduction, HalfKind

namespace fastxent {

enum class Divergence : int { ForwardKL = 0, ReverseKL = 1, Jsd = 2 };

struct DistillOptions {
  Divergence divergence = Divergence::ForwardKL;
  double beta = 0.5;         // Jsd only: in [0, 1]
  double temperature = 1.0;  // finite, > 0
  Reduction reduction = Reduction::Mean;
  int num_threads = 0;  // 0: the OpenMP default; > 0 caps. Bitwise identical for any count.
};

// T: float, double, or uint16_t for 16-bit logits (`half` says which; computed in float).
template <class T>
struct DistillInputs {
  const T* student = nullptr;
  const T* teacher = nullptr;
  int64_t rows = 0;
  int64_t classes = 0;
  int64_t student_stride = 0;  // elements between rows (>= classes)
  int64_t teacher_stride = 0;
  const double* row_weight = nullptr;  // rows values, finite and >= 0, or null (all 1)
  HalfKind half = HalfKind::Float16;   // read only when T = uint16_t
};

// grad_student / grad_teacher: null, or rows x classes contiguous outputs of the same type.
// grad_student == student (with student_stride == classes) is the in-place mode, likewise
// grad_teacher == teacher; any other overlap between outputs and inputs is rejected.
// row_losses: null or rows doubles. Returns the reduced loss (0 for "none").
template <class T>
double distill(const DistillInputs<T>& in, const DistillOptions& options, T* grad_student,
               T* grad_teacher, double* row_losses);

extern template double distill<float>(const DistillInputs<float>&, const DistillOptions&, float*,
                                      float*, double*);
extern template double distill<double>(const DistillInputs<double>&, const DistillOptions&, double*,
                                       double*, double*);
extern template double distill<uint16_t>(const DistillInputs<uint16_t>&, const DistillOptions&,
                                         uint16_t*, uint16_t*, double*);

}  // namespace fastxent
