// fastxent: vocabulary-sharded cross-entropy (tensor parallelism, Dask, any engine that can sum
// and take a max).
//
// A shard holds columns [offset, offset + classes) of the full vocabulary of num_classes
// classes, for every row. Three steps give exactly the one-machine loss and gradient:
//   1. shard_stats: per row, kStatFields doubles from one pass over the shard's logits;
//   2. merge_stats (or an all-reduce: max of field 0, then sums of the rest after rescaling
//      field 1 by exp(max_r - max)): the statistics of the whole row;
//   3. stats_loss (the loss from the merged statistics, no logits needed) and shard_grad (each
//      shard's own gradient from its logits and the merged statistics: no communication).
//
// Fields of one row (z' = the transformed logit, softcap * tanh(alpha z / softcap) or alpha z;
// u_c the soft target weight of class c: (1 - eps) w_y [c == y] + (eps / C) w_c for a class
// target y, w_c ((1 - eps) p_c + eps / C) for probability targets p; C = num_classes):
//   kStatMax      the row's reference point m: max_c z'_c over the shard (-inf: no finite
//                 column or an ignored row; NaN if any z' is NaN), except with a softcap of at
//                 most 32 (float32) or 256 (float64), where m = 0 (z' is bounded by the cap,
//                 so exp(z') is safe as it is); any m merges the same way
//   kStatSumExp   sum_c exp(z'_c - m)
//   kStatQ        sum_c u_c
//   kStatQZ       sum_c u_c z'_c (terms with u_c == 0 skipped only where u is known to be 0)
//   kStatWy       w_y for the shard that owns the class target y (the row's share of the
//                 "mean" denominator); 1 for probability targets in the shard at offset 0
//   kStatCount    1 for the shard that counts the row (owns its target, or offset 0 for
//                 probability targets), 0 otherwise; ignored rows count nowhere
//   kStatColumns  the number of columns the statistics cover (classes); merged: num_classes
// Merged row loss (count 1): s_n [Q lse - QZ + lambda lse^2], lse = max + log(sumexp);
// 0 for count 0. "mean" divides by D = normalizer, or sum_n s_n Wy_n.
#pragma once

#include <cstdint>

#include "fastxent/fastxent.hpp"

namespace fastxent {

enum StatField : int {
  kStatMax = 0,
  kStatSumExp = 1,
  kStatQ = 2,
  kStatQZ = 3,
  kStatWy = 4,
  kStatCount = 5,
  kStatColumns = 6,
};
constexpr int kStatFields = 7;

// Per-row outputs across shards (RowOutputs' lse, entropy, argmax and target_logprob of the
// whole row), from shard_stats' optional second result: kOutFields doubles per row, taken for
// every row (ignored ones too), merged by merge_output_stats. Fields of one row:
//   kOutMax      reference point m, as kStatMax (but also for ignored rows)
//   kOutSumExp   sum_c exp(z'_c - m)             (NaN with m where the row holds NaN or +inf)
//   kOutH        sum_c exp(z'_c - m) (z'_c - m)  (entropy = log S - H / S)
//   kOutNaN      1 where the row holds a NaN logit, else 0
//   kOutArgVal   the largest raw logit (NaN in a NaN row; -inf in a row of -inf)
//   kOutArgIdx   the global index of its first occurrence (of the first NaN in a NaN row)
//   kOutZy       z'_y in the shard that owns the row's class target, else 0
//   kOutColumns  the number of columns covered; merged: num_classes
enum OutField : int {
  kOutMax = 0,
  kOutSumExp = 1,
  kOutH = 2,
  kOutNaN = 3,
  kOutArgVal = 4,
  kOutArgIdx = 5,
  kOutZy = 6,
  kOutColumns = 7,
};
constexpr int kOutFields = 8;

// One shard of a (rows, num_classes) problem: row n of the shard's logits starts at
// logits + n * row_stride and holds `classes` values. Exactly one of target (global class
// indices, or ignore_index) and probs (the shard's columns of the probability targets) is
// given. weight: the shard's `classes` class weights, or null.
template <class T>
struct ShardInputs {
  const T* logits = nullptr;
  int64_t rows = 0;
  int64_t classes = 0;
  int64_t row_stride = 0;
  int64_t offset = 0;
  int64_t num_classes = 0;
  const int64_t* target = nullptr;
  const T* probs = nullptr;
  int64_t probs_row_stride = 0;
  const T* weight = nullptr;
};

// Writes rows * kStatFields doubles (row-major) to stats. Uses the options ignore_index,
// label_smoothing, softcap, logit_scale and num_threads. Throws (writing nothing) on bad
// arguments or a target outside [0, num_classes) that is not ignore_index.
template <class T>
void shard_stats(const ShardInputs<T>& in, const Options& options, double* stats);

// The same, also writing rows * kOutFields doubles of output statistics to out_stats (when not
// null) from the same pass; stats are those of the call without them, bit for bit.
template <class T>
void shard_stats(const ShardInputs<T>& in, const Options& options, double* stats,
                 double* out_stats);

// out = a (+) b for output statistics (kOutFields per row); out may alias a or b.
// Commutative bit for bit; associative up to rounding of the sums (the argmax exactly): the
// larger maximum, then the smaller index; NaN rows take the first NaN's index.
void merge_output_stats(const double* a, const double* b, int64_t rows, double* out);

// out = a (+) b for `rows` rows; out may alias a or b. Commutative bit for bit; associative up
// to rounding. A row all -inf in one operand takes the other's max and sum.
void merge_stats(const double* a, const double* b, int64_t rows, double* out);

// The "mean" denominator of merged statistics: sum over counted rows of s_n Wy_n
// (sample_weight: rows values, or null for 1).
double stats_denominator(const double* stats, int64_t rows, const double* sample_weight);

// The loss from merged statistics (options: reduction, z_loss, normalizer). row_losses (rows
// values, may be null unless reduction is None) receives s_n [Q lse - QZ + lambda lse^2].
// num_classes > 0 checks that every row's statistics cover exactly num_classes columns and
// have a count of 0 or 1 (otherwise std::invalid_argument, nothing written).
double stats_loss(const double* stats, int64_t rows, const double* sample_weight,
                  const Options& options, int64_t num_classes, double* row_losses);

// The gradient of the shard's logits, from merged statistics of the same rows: one pass,
// written to grad (rows x classes, C-contiguous; grad == logits is the in-place mode).
// Options as shard_stats plus reduction, z_loss and normalizer: "mean" divides by the
// normalizer, or by stats_denominator of these rows. The whole gradient is multiplied by
// `scale` (an upstream gradient). Rows whose merged count is 0 get a zero gradient.
template <class T>
void shard_grad(const ShardInputs<T>& in, const double* stats, const T* sample_weight,
                const Options& options, double scale, T* grad);

extern template void shard_stats<float>(const ShardInputs<float>&, const Options&, double*);
extern template void shard_stats<double>(const ShardInputs<double>&, const Options&, double*);
extern template void shard_stats<float>(const ShardInputs<float>&, const Options&, double*,
                                        double*);
extern template void shard_stats<double>(const ShardInputs<double>&, const Options&, double*,
                                         double*);
extern template void shard_grad<float>(const ShardInputs<float>&, const double*, const float*,
                                       const Options&, double, float*);
extern template void shard_grad<double>(const ShardInputs<double>&, const double*, const double*,
                                        const Options&, double, double*);

}  // namespace fastxent
