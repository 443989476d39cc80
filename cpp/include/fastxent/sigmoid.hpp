// fastxent: sigmoid (binary / multi-label) cross-entropy with logits, loss and gradient in one
// pass. The plain C++ API: raw pointers, sizes and options; no Python types. Bad arguments
// throw std::invalid_argument before anything is written.
//
// Math (PyTorch's binary_cross_entropy_with_logits), per element i of n, x logits, y targets,
// p pos_weight and w weight (1 when absent):
//   loss_i = w_i [(1 - y_i) x_i + (1 + (p_i - 1) y_i) softplus(-x_i)]
//   grad_i = s w_i [(1 + (p_i - 1) y_i) sigmoid(x_i) - p_i y_i],  s = 1/n for "mean", else 1
// "sum" adds the losses, "mean" divides the sum by n (0 when n == 0), "none" writes them.
// Computed without overflow for any finite x; x = +-inf gives a finite gradient and a loss of
// +inf, or 0 where its factor is 0 (0 * inf := 0, also for a zero weight). NaN propagates.
#pragma once

#include <cstdint>

#include "fastxent/fastxent.hpp"  // Reduction, default_num_threads

namespace fastxent {

// How a pos_weight or weight array lines up with the n elements (viewed as rows of `last`).
enum class Broadcast : int {
  None = 0,  // absent (pointer ignored, may be null)
  Last = 1,  // `last` values, repeated along the last axis: element i uses [i % last]
  Full = 2,  // n values, one per element
};

template <class T>
struct SigmoidInputs {
  const T* logits = nullptr;  // n values, contiguous
  const T* target = nullptr;  // n values, contiguous
  int64_t n = 0;              // number of elements
  int64_t last = 1;           // length of the last axis (n must be a multiple when Last is used)
  const T* pos_weight = nullptr;
  Broadcast pos_weight_mode = Broadcast::None;
  const T* weight = nullptr;
  Broadcast weight_mode = Broadcast::None;
};

struct SigmoidOptions {
  Reduction reduction = Reduction::Mean;
  int num_threads = 0;  // 0: the OpenMP default; > 0 caps. Results are bitwise identical
                        // for every thread count.
};

// Computes the loss and, when grad is not null, its gradient (n values; grad == logits is the
// in-place mode, any other overlap of an output with an input is rejected). losses (n values)
// is required for "none" and may be given for the other reductions too. Returns the reduced
// loss (double; the element losses are summed in fixed chunks, in order), 0 for "none".
template <class T>
double sigmoid_cross_entropy(const SigmoidInputs<T>& in, const SigmoidOptions& options, T* grad,
                             T* losses);

extern template double sigmoid_cross_entropy<float>(const SigmoidInputs<float>&,
                                                    const SigmoidOptions&, float*, float*);
extern template double sigmoid_cross_entropy<double>(const SigmoidInputs<double>&,
                                                     const SigmoidOptions&, double*, double*);

}  // namespace fastxent
