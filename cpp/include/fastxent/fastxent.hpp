// fastxent: fused softmax cross-entropy (loss and gradient in one pass) on the CPU.
//
// The plain C++ API: raw pointers, sizes and an options struct; no Python types.
// Everything here is safe to call from C++ directly: bad arguments throw
// std::invalid_argument, a class index outside [0, C) that is not ignore_index throws
// std::out_of_range, and in both cases nothing has been written.
//
// Math (per counted row n, z = logits row, C classes, w class weights (1 if absent),
// eps label smoothing, lse = log sum_c exp(z_c)):
//   row_n = (1 - eps) * w[y_n] * (lse - z[y_n]) + (eps / C) * sum_c w_c * (lse - z_c)
//   "sum" = sum_n row_n,  "mean" = sum_n row_n / D,  D = sum over counted rows of w[y_n]
//   grad[n, c] = s * (Q * softmax(z)_c - q_c),  q_c = (1 - eps) w[y_n] [c == y_n] + (eps / C) w_c,
//   Q = sum_c q_c, s = 1/D for "mean" and 1 otherwise ("none" differentiates the sum of rows).
// Ignored rows (target == ignore_index) have loss 0 and a gradient of exactly 0.
// When D == 0 ("mean" with no counted row, or zero weights) the loss and gradient are 0.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace fastxent {

enum class Reduction : int { None = 0, Sum = 1, Mean = 2 };

struct Options {
  Reduction reduction = Reduction::Mean;
  int64_t ignore_index = -100;
  double label_smoothing = 0.0;  // in [0, 1]
  int num_threads = 0;           // 0: the OpenMP default (omp_get_max_threads); > 0 caps this call
};

// Computes the loss of `rows` rows of `classes` logits each. Row n starts at
// logits + n * row_stride (row_stride >= classes, in elements; the class axis is contiguous).
//   target:      rows class indices (ignore_index marks a row that does not count)
//   weight:      classes class weights, or nullptr
//   grad:        nullptr for the loss alone (nothing N x C is written), or a C-contiguous
//                rows x classes output; grad == logits (with row_stride == classes) is the
//                in-place mode
//   row_losses:  for Reduction::None, rows outputs (required); ignored otherwise
// Returns the reduced loss for "sum" and "mean" (accumulated in double, rows summed in
// order, so the result is bitwise identical for any thread count), and 0 for "none".
template <class T>
double cross_entropy(const T* logits, int64_t rows, int64_t classes, int64_t row_stride,
                     const int64_t* target, const T* weight, const Options& options, T* grad,
                     T* row_losses);

extern template double cross_entropy<float>(const float*, int64_t, int64_t, int64_t,
                                            const int64_t*, const float*, const Options&,
                                            float*, float*);
extern template double cross_entropy<double>(const double*, int64_t, int64_t, int64_t,
                                             const int64_t*, const double*, const Options&,
                                             double*, double*);

// Instruction sets. The kernel is compiled once per ISA and picked at run time.
std::vector<std::string> available_isas();  // what this CPU and OS can run, e.g. scalar, avx2
std::string active_isa();
// Forces an ISA ("" or "auto": the best available). Throws std::invalid_argument naming the
// available ones when `name` is unknown or not supported here.
void set_isa(const std::string& name);

// OpenMP facts for diagnostics: the default thread count, and whether OpenMP is compiled in.
int default_num_threads();
bool has_openmp();

}  // namespace fastxent
