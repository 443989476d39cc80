// The row driver's shared declarations, between the routing (cross_entropy.cpp: the target
// pre-pass, the problem, run_problem, the reduction), the rows (ce_rows.cpp: one row, the
// streamed rows, rows split by blocks) and the 16-bit entry point (cross_entropy_half.cpp).
#pragma once

#include <cstdint>
#include <vector>

#include "ce_row.hpp"

namespace fastxent {
namespace detail {

// Streamed rows of up to this many bytes take stream_rows (two rows of logits, a scratch row
// of e and one of rho with a softcap, held in L2 at once); longer ones compute_row.
constexpr int64_t kPipelineRowBytes = int64_t(1) << 20;

// The target pre-pass's results (prepare).
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

// The target pre-pass: range check and the "mean" denominator; class-weight sums.
template <class T>
Prepared prepare(const Options& opt, int64_t rows, int64_t classes, int64_t inner,
                 const int64_t* target, bool probs, const T* weight, const T* sample_weight);

template <class T>
Problem<T> make_problem(const Inputs<T>& in, const Options& opt, T* grad, const Prepared& pr);

int thread_count(const Options& opt, int64_t work);

// The short-row threshold: kShortRowClasses, or FASTXENT_SHORT_ROWS=N (0: never), read once.
int64_t short_row_classes();

// Whether a call asks for per-row outputs or the entropy term; throws std::invalid_argument
// where they are not implemented (the column layout; target_logprob of probability targets).
template <class T>
bool wants_extras(const RowOutputs<T>& o, const Options& opt, int64_t inner, bool probs);

// Sets up p for the per-row outputs `o` (row n of p writing entry n) and the entropy term:
// the row path one row at a time (see Problem::extras), the same bits as without. in_place:
// the gradient overwrites the logits.
template <class T>
void enable_extras(Problem<T>& p, const RowOutputs<T>& o, const Options& opt, bool in_place);

// Every row's loss (double) into losses, and the gradient when p.grad is set.
template <class T>
void run_problem(const Problem<T>& p, int nt, double* losses);

// The reduction over rows, in row order: independent of the thread count.
template <class T>
double reduce(const Options& opt, const Prepared& pr, const double* losses, int64_t rows,
              T* row_losses);

// One row, start to finish, on the calling thread (streamed rows up to kPipelineRowBytes go
// through stream_rows instead). st: nb entries; scratch: C entries for 16-bit or streamed
// rows; tbuf: C entries with a softcap and a gradient; pending: the target entries of
// streamed rows, written after the fence.
template <class T>
double compute_row(const Problem<T>& p, int64_t n, const RowPtrs<T>& rp, BlockStat* st, T* scratch,
                   T* tbuf, std::vector<Pending<T>>* pending = nullptr, const T* next_row = nullptr,
                   MaxCarry<T>* carry = nullptr);

// Whether the problem's rows go through one_block_rows: rows of one block, logits in T storage,
// exponentials stored into the gradient row or nowhere, no per-row outputs or entropy sums.
template <class T>
bool takes_one_block_rows(const Problem<T>& p);

// Rows of one block begin .. end (takes_one_block_rows), in groups (see ce_rows.cpp).
template <class T>
void one_block_rows(const Problem<T>& p, int64_t begin, int64_t end, double* losses);

// Streamed rows (p.stream) begin .. end, software-pipelined (see ce_rows.cpp).
template <class T>
void stream_rows(const Problem<T>& p, int64_t begin, int64_t end, double* losses,
                 std::vector<Pending<T>>* pending);

// The per-row outputs alone of rows begin .. end (see ce_rows.cpp).
template <class T>
void outputs_only(const Problem<T>& p, int64_t begin, int64_t end);

// Fewer rows than threads: (row, block) pairs shared out (see ce_rows.cpp).
template <class T>
void split_classes(const Problem<T>& p, int64_t rows, int nt, double* losses);

}  // namespace detail
}  // namespace fastxent
