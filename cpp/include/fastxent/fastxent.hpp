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
  int64_t ignore_index = -100;   // class targets only
  double label_smoothing = 0.0;  // eps in [0, 1]
  double z_loss = 0.0;           // lambda >= 0: adds lambda * lse^2 per counted row
  double softcap = 0.0;          // s > 0: z' = s * tanh(alpha * z / s); 0: off
  double logit_scale = 1.0;      // alpha > 0: z' = alpha * z (inside the softcap)
  bool has_normalizer = false;   // "mean" divides by `normalizer` instead of D
  double normalizer = 0.0;       // >= 0
  int num_threads = 0;           // 0: the OpenMP default (omp_get_max_threads); > 0 caps
  // beta >= 0: the loss becomes CE - beta * (entropy of softmax(z') per counted row, weighted
  // by the sample weight, reduced like the loss), with its gradient. Row layout with float32 /
  // float64 logits only (cross_entropy with inner == 1); the other entry points refuse it.
  double entropy_coef = 0.0;
};

// The arrays of one call. With inner == 1, row n of the logits starts at logits + n * row_stride
// (in elements, >= classes; the class axis is contiguous). With inner > 1 the class axis is not
// the last one: the logits are a C-contiguous (rows / inner, classes, inner) array, row
// n = o * inner + i being the column (o, :, i) (PyTorch's (N, C, d1, ..., dk) with
// inner = d1 * ... * dk); probs and grad then have the same layout and row_stride is unused.
// Exactly one of `target` (class indices, one per row, in row order) and `probs` (probability
// targets, rows x classes with its own row stride, or the logits' layout) is given.
template <class T>
struct Inputs {
  const T* logits = nullptr;
  int64_t rows = 0;
  int64_t classes = 0;
  int64_t row_stride = 0;
  int64_t inner = 1;
  const int64_t* target = nullptr;
  const T* probs = nullptr;
  int64_t probs_row_stride = 0;
  const T* weight = nullptr;         // classes class weights, or null
  const T* sample_weight = nullptr;  // rows per-row weights, or null
};

// Per-row statistics from the same pass (each output optional: null = not computed), rows
// values each in row order. With z' the transformed logits of row n:
//   lse[n] = logsumexp(z'_n); entropy[n] = lse[n] - sum_c softmax(z'_n)_c z'_nc;
//   argmax[n] = the first index of the largest logit (PyTorch's rule; the transform is
//     increasing, so it is the argmax of z' but for roundings of z' that make distinct logits
//     equal); in a row holding NaN, the first NaN's index (PyTorch's torch.argmax);
//   target_logprob[n] = z'_n[y_n] - lse[n] (class targets; 0 for an ignored row).
// Computed for every row, ignored ones included (target_logprob aside). A row of all -inf:
// lse = -inf, target_logprob = -inf, entropy = log C (the limit of equal logits, as its
// gradient), argmax 0. A NaN row gives NaN (argmax: as above).
template <class T>
struct RowOutputs {
  T* lse = nullptr;
  T* entropy = nullptr;
  int64_t* argmax = nullptr;
  T* target_logprob = nullptr;
};

// Computes the loss and, when grad is not null, its gradient. With z' the transformed logits
// (softcap * tanh(alpha z / softcap), or alpha z) and lse = logsumexp(z'), for class targets
//   row_n = s_n [(1 - eps) w[y_n] (lse - z'[y_n]) + (eps / C) sum_c w_c (lse - z'_c) + lambda
//   lse^2]
// for counted rows (target != ignore_index), 0 for the others, and for probability targets
//   row_n = s_n [sum_c w_c q_nc (lse - z'_c) + lambda lse^2],  q = p (1 - eps) + eps / C.
// "sum" adds the rows; "mean" divides by D = normalizer if given, else sum over counted rows of
// s_n w[y_n] (class targets) or sum_n s_n (probability targets). D == 0 gives a 0 loss and
// gradient. grad (C-contiguous rows x classes; grad == logits is the in-place mode) receives
// d(loss)/d(logits); for "none", the gradient of the sum of the rows. row_losses (rows values)
// is required for "none". Returns the reduced loss (double, rows summed in order), 0 for
// "none". Every check happens before anything is written.
template <class T>
double cross_entropy(const Inputs<T>& in, const Options& options, T* grad, T* row_losses);

// The same with per-row outputs (see RowOutputs; outputs may be null). Per-row outputs and
// Options::entropy_coef need the row layout (inner == 1); the loss and gradient are those of
// the call without outputs bit for bit (with entropy_coef = 0).
template <class T>
double cross_entropy(const Inputs<T>& in, const Options& options, T* grad, T* row_losses,
                     const RowOutputs<T>* outputs);

// Shorthand for class targets.
template <class T>
double cross_entropy(const T* logits, int64_t rows, int64_t classes, int64_t row_stride,
                     const int64_t* target, const T* weight, const Options& options, T* grad,
                     T* row_losses) {
  Inputs<T> in;
  in.logits = logits;
  in.rows = rows;
  in.classes = classes;
  in.row_stride = row_stride;
  in.target = target;
  in.weight = weight;
  return cross_entropy<T>(in, options, grad, row_losses);
}

extern template double cross_entropy<float>(const Inputs<float>&, const Options&, float*, float*);
extern template double cross_entropy<double>(const Inputs<double>&, const Options&, double*,
                                             double*);
extern template double cross_entropy<float>(const Inputs<float>&, const Options&, float*, float*,
                                            const RowOutputs<float>*);
extern template double cross_entropy<double>(const Inputs<double>&, const Options&, double*,
                                             double*, const RowOutputs<double>*);

// 16-bit floating-point logits (float32 math inside; loss and row losses in float32).
enum class HalfKind : int { Float16 = 0, BFloat16 = 1 };

struct HalfInputs {
  const uint16_t* logits = nullptr;  // IEEE float16 or bfloat16 bit patterns
  HalfKind kind = HalfKind::Float16;
  int64_t rows = 0;
  int64_t classes = 0;
  int64_t row_stride = 0;
  int64_t inner = 1;
  const int64_t* target = nullptr;
  const uint16_t* probs = nullptr;  // same kind as the logits
  int64_t probs_row_stride = 0;
  const float* weight = nullptr;
  const float* sample_weight = nullptr;
};

// As cross_entropy, for float16/bfloat16 logits. Rows are converted to float32 in chunks of a
// fixed size (a few hundred KiB, not N x C), run through the float32 kernel, and the gradient
// rounded once to the 16-bit type. grad == logits is the in-place mode.
double cross_entropy_half(const HalfInputs& in, const Options& options, uint16_t* grad,
                          float* row_losses);

// The same with per-row outputs in float32 (see RowOutputs) and Options::entropy_coef (row
// layout only): the values of the float32 call on the logits converted to float32, the loss
// and gradient those of the call without outputs bit for bit. Such calls take the chunked
// float32 path (one more pass over each chunk, in cache).
double cross_entropy_half(const HalfInputs& in, const Options& options, uint16_t* grad,
                          float* row_losses, const RowOutputs<float>* outputs);

// Companions from the same derivation, on `rows` rows of `classes` contiguous values
// (row n at x + n * row_stride; outputs C-contiguous, may alias x for softmax/log_softmax):
//   softmax:      out = exp(x - lse)              (a row of all -inf gives NaN, as PyTorch)
//   log_softmax:  out = x - lse
//   logsumexp:    out[n] = lse_n = max + log sum exp(x - max)   (-inf for a row of all -inf)
//   softmax_backward: out = p * (g - <p, g>), the vector-Jacobian product of softmax
// num_threads as in Options. All bitwise identical for any thread count.
template <class T>
void softmax(const T* x, int64_t rows, int64_t classes, int64_t row_stride, T* out, bool log,
             int num_threads);
template <class T>
void logsumexp(const T* x, int64_t rows, int64_t classes, int64_t row_stride, T* out,
               int num_threads);
template <class T>
void softmax_backward(const T* p, const T* g, int64_t rows, int64_t classes, T* out,
                      int num_threads);

// Instruction sets. The kernel is compiled once per ISA and picked at run time.
std::vector<std::string> available_isas();  // what this CPU and OS can run, e.g. scalar, avx2
std::string active_isa();
// Forces an ISA ("" or "auto": the best available). Throws std::invalid_argument naming the
// available ones when `name` is unknown or not supported here.
void set_isa(const std::string& name);

// Classes per block of the row kernel for elements of `itemsize` bytes (4: float32 and the
// 16-bit types, computed in float32; 8: float64). Rows are cut into blocks at the fixed
// positions 0, B, 2B, ...; results do not depend on which thread computes which block.
int64_t block_classes(int itemsize);

// The size in bytes from which a gradient written to a separate output (not in place) goes
// out with non-temporal stores, for the active ISA; 0 = never. FASTXENT_STREAM_BYTES=N (read
// once) sets it; by default 64 MiB on Intel CPUs and under the AVX-512 kernel, else never
// (measurements in docs/design.md). Results are bit-identical either way.
int64_t stream_bytes();

// OpenMP facts for diagnostics: the default thread count, and whether OpenMP is compiled in.
int default_num_threads();
bool has_openmp();

}  // namespace fastxent
