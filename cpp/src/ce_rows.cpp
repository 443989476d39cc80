// The rows of the row layout: one row start to finish (compute_row), rows of one block in groups
// (one_block_rows), the streamed rows' software pipeline (stream_rows) and rows split by blocks
// across threads (split_classes).
//
// Memory traffic per row: the block pass reads z from memory (prefetching two blocks ahead),
// takes the max of the block after it on the way (chained_block: no max pass of its own), and
// writes e = exp(z' - m_block) either into the gradient row (in place, or small outputs: the
// row is then rewritten in cache) or into a per-thread scratch row, from which each row's
// gradient streams out with non-temporal stores inside the next row's block passes
// (stream_rows, BlockIn::side). Forward only writes nothing N x C. Determinism: blocks sit at
// fixed positions and merge in block order, rows are summed in row order, so no result
// depends on the thread count or on how the work was split.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "ce_driver.hpp"

namespace fastxent {
namespace detail {

namespace {

// Block pass k of a row from b, taking the max of the block after it on the way: the next
// block of the row, or next_row's first (null: none), and using the carried max of this block
// where the previous pass took it. The results are those of the plain pass bit for bit: the
// max is exact, though a block whose max is 0 may carry +0 where its own max loop gives -0
// (x86 max returns its second operand for two zeros, and the loops group lanes differently);
// z - (+0) and z - (-0) are equal for every z but -0, whose exp is 1 either way, so the sign
// reaches no output (checked against the unchained split_classes path).
template <class T>
BlockStat chained_block(const Problem<T>& p, BlockIn<T> b, int64_t k, const T* next_row,
                        MaxCarry<T>* carry) {
  if (b.z && carry->z == b.z) {
    b.has_zmax = true;
    b.zmax = carry->m;
  }
  if (b.z && !b.zh) {
    if (k + 1 < p.nb) {
      b.znext = b.z + kBlock<T>;
      b.nnext = p.block_len(k + 1);
    } else if (next_row) {
      b.znext = next_row;
      b.nnext = p.block_len(0);
    }
  }
  const BlockStat st = p.fns->block(b);
  carry->z = b.znext && !std::isnan(st.znext_max) ? b.znext : nullptr;
  carry->m = T(st.znext_max);
  return st;
}

}  // namespace

// One row, start to finish, on the calling thread (streamed rows up to kPipelineRowBytes go
// through stream_rows instead). st: nb entries; scratch: C entries for 16-bit or streamed
// rows; tbuf: C entries with a softcap and a gradient; pending: the target entries of
// streamed rows, written after the fence.
template <class T>
double compute_row(const Problem<T>& p, int64_t n, const RowPtrs<T>& rp, BlockStat* st, T* scratch,
                   T* tbuf, std::vector<Pending<T>>* pending, const T* next_row,
                   MaxCarry<T>* carry) {
  T* g = rp.g;
  const bool want_grad = g || rp.gh;
  if (!p.counted(n)) {
    if (p.extras) {
      // The outputs of a row that does not count: its statistics alone (nothing stored), and
      // before the zeros below (in place, they overwrite the logits).
      for (int64_t k = 0; k < p.nb; ++k)
        st[k] =
            p.fns->block(block_in(p, rp, k, static_cast<T*>(nullptr), static_cast<T*>(nullptr)));
      const bool has_y = !p.probs && p.in.target[n] != p.ignore_index;  // D = 0
      double dzy;
      const double zy_t = has_y ? target_logit(p, n, &dzy, rp.z) : 0.0;
      write_row_outputs(p, n, stats_only(p, st), st, rp.z, zy_t, has_y);
    }
    if (g) std::memset(static_cast<void*>(g), 0, sizeof(T) * size_t(p.C));
    if (rp.gh) std::memset(static_cast<void*>(rp.gh), 0, sizeof(uint16_t) * size_t(p.C));
    return 0.0;
  }
  double dzy;
  // Before in place overwrites z.
  const double zy_t =
      rp.zh ? target_logit(p, n, &dzy, static_cast<const T*>(nullptr), rp.zh, rp.storage)
            : target_logit(p, n, &dzy, rp.z);
  // 16-bit rows keep e in the float scratch row; the gradient is rounded out of it.
  T* e = want_grad && !p.recompute ? ((p.stream || rp.gh || p.e_scratch) ? scratch : g) : nullptr;
  for (int64_t k = 0; k < p.nb; ++k) {
    const BlockIn<T> b = block_in(p, rp, k, e, tbuf);
    st[k] = carry ? chained_block(p, b, k, next_row, carry) : p.fns->block(b);
  }
  const RowResult r = finish_row(p, st, n, zy_t);
  if (p.extras) write_row_outputs(p, n, r, st, rp.z, zy_t, true);  // before in place writes
  if (rp.gh) {
    for (int64_t k = 0; k < p.nb; ++k)
      write_grad_block(p, st[k], r, rp.prob, e, tbuf, static_cast<T*>(nullptr), k, false, rp.gh,
                       rp.storage);
    if (!p.probs)
      fix_target(p, r, zy_t, dzy, static_cast<T*>(nullptr), p.in.target[n], rp.gh, rp.storage);
  } else if (g && p.recompute) {
    // Each block's exponentials again, with the same block max (the same value, see
    // chained_block, so the same bits), straight into the gradient block while it is in L1:
    // the row is read twice and written once.
    for (int64_t k = 0; k < p.nb; ++k) {
      p.fns->block(block_in(p, rp, k, g, tbuf));
      write_grad_block(p, st[k], r, rp.prob, g, tbuf, g, k, false);
    }
    if (!p.probs) fix_target(p, r, zy_t, dzy, g, p.in.target[n]);
  } else if (g) {
    const T* zent = p.beta > 0.0 ? rp.z : nullptr;  // the entropy term reads the logits
    for (int64_t k = 0; k < p.nb; ++k)
      write_grad_block(p, st[k], r, rp.prob, e, tbuf, g, k, p.stream, nullptr, Storage::Native,
                       zent);
    if (!p.probs) {
      const int64_t y = p.in.target[n];
      // A plain store into a line still in flight from non-temporal stores needs a fence
      // first: one fence per thread (not per row), after its rows.
      if (p.stream) {
        if (!std::isnan(r.a)) pending->push_back({g + y, target_value(p, r, zy_t, dzy, y)});
      } else {
        fix_target(p, r, zy_t, dzy, g, y);
      }
    }
  }
  return r.loss;
}

// Rows whose gradient is streamed out (p.stream), software-pipelined: while row n's blocks
// are computed (logits read from memory, e = exp(z' - m) kept in a scratch row), row n - 1's
// gradient is written from the same scratch row with non-temporal stores, two vectors of it
// before each two vectors of row n's block k (the block pass's side reads each line of row
// n - 1's e just before the block overwrites it with row n's, so those stores find the line
// in L1 instead of fetching it from L2 for ownership). Reading, the exp and the output stream
// then overlap, instead of a whole row's read-and-exp phase alternating with a whole row's
// write phase (one scratch row serves both rows; the line a block's gradient shares with the
// next block is fetched for writing ahead of its plain stores, see Row::block_impl). Longer rows
// with plain stores stay one row at a time: pipelining them measured slower (docs/design.md).
// The results are those of compute_row bit for bit: the same block passes and the same
// gradient formula, only in another order.
// Target entries are collected in `pending` and written after the caller's fence. An ignored
// row (zeroed at once) leaves the pipeline as it is: the previous row's gradient goes out
// with the next counted row's blocks.
template <class T>
void stream_rows(const Problem<T>& p, int64_t begin, int64_t end, double* losses,
                 std::vector<Pending<T>>* pending) {
  const size_t C = size_t(p.C), nb = size_t(p.nb);
  const bool cap = p.cap > 0.0;
  // e of both rows of the pipeline in one scratch row (the side reads each line of the
  // previous row's e before the block pass overwrites it with this row's), and rho the same
  // with a softcap.
  std::vector<T> buf((cap ? 2 : 1) * C);
  T* const escr = buf.data();
  T* const tscr = cap ? buf.data() + C : nullptr;
  std::vector<BlockStat> st(2 * nb);
  struct Prev {
    bool live = false;
    int slot = 0;
    RowResult r{};
    const T* prob = nullptr;
    T* g = nullptr;
  } prev;
  // Block k of the previous row's gradient: written here (see grad_block_affine), or *a set
  // for the SIMD pass (true).
  auto prev_block = [&](int64_t k, AffineIn<T>* a) {
    return grad_block_affine(p, st[size_t(prev.slot) * nb + size_t(k)], prev.r, prev.prob, escr,
                             tscr, prev.g, k, true, a);
  };
  int cur = 0;
  MaxCarry<T> carry;
  for (int64_t n = begin; n < end; ++n) {
    const RowPtrs<T> rp = row_ptrs(p, n);
    const T* next_row = n + 1 < end ? row_ptrs(p, n + 1).z : nullptr;
    if (!p.counted(n)) {
      std::memset(static_cast<void*>(rp.g), 0, sizeof(T) * C);
      losses[n] = 0.0;
      continue;
    }
    double dzy;
    const double zy_t = target_logit(p, n, &dzy, rp.z);
    BlockStat* sc = st.data() + size_t(cur) * nb;
    for (int64_t k = 0; k < p.nb; ++k) {
      BlockIn<T> b = block_in(p, rp, k, escr, tscr);
      AffineIn<T> side;
      if (prev.live && prev_block(k, &side)) b.side = &side;
      sc[k] = chained_block(p, b, k, next_row, &carry);
    }
    const RowResult r = finish_row(p, sc, n, zy_t);
    losses[n] = r.loss;
    if (!p.probs && !std::isnan(r.a)) {
      const int64_t y = p.in.target[n];
      pending->push_back({rp.g + y, target_value(p, r, zy_t, dzy, y)});
    }
    prev.live = true;
    prev.slot = cur;
    prev.r = r;
    prev.prob = rp.prob;
    prev.g = rp.g;
    cur ^= 1;
  }
  if (prev.live) {
    for (int64_t k = 0; k < p.nb; ++k) {
      AffineIn<T> a;
      if (prev_block(k, &a)) p.fns->affine(a);
    }
  }
}

template <class T>
bool takes_one_block_rows(const Problem<T>& p) {
  // The softcap's rho goes to one scratch row, which a group would overwrite before the
  // gradient reads it.
  return p.nb == 1 && !p.stream && !p.recompute && !p.e_scratch && !p.extras && !p.ent &&
         !(p.cap > 0.0 && p.grad);
}

// Rows of one block (takes_one_block_rows), in groups: the block passes of each run of counted
// rows of a group in one kernel call (Row::block_rows: each takes the next row's max on the
// way, as compute_row's chained passes), then each row's merge, gradient block (from the
// exponentials stored in it) and target entry. The same passes, formula and order of
// operations as compute_row, so the same bits; ignored rows take no pass (zeroed, as there).
// A group's gradient rows fit in L1 (16 KiB) while they are rewritten.
template <class T>
void one_block_rows(const Problem<T>& p, int64_t begin, int64_t end, double* losses) {
  constexpr int64_t kMaxGroup = 32;
  const int64_t row_bytes = p.C * int64_t(sizeof(T));
  const int64_t group =
      p.grad ? std::max<int64_t>(1, std::min<int64_t>(kMaxGroup, 16384 / row_bytes)) : kMaxGroup;
  // In place, the passes overwrite the logits: the target logits are read before them;
  // otherwise after them, from cache.
  const bool in_place = p.grad != nullptr && p.grad == p.in.logits;
  BlockStat st[kMaxGroup];
  double zy[kMaxGroup] = {}, dz[kMaxGroup] = {};
  for (int64_t n0 = begin; n0 < end; n0 += group) {
    const int64_t cnt = std::min(group, end - n0);
    if (in_place)
      for (int64_t i = 0; i < cnt; ++i)
        if (p.counted(n0 + i)) zy[i] = target_logit(p, n0 + i, &dz[i], row_ptrs(p, n0 + i).z);
    for (int64_t a = 0; a < cnt;) {
      if (!p.counted(n0 + a)) {
        ++a;
        continue;
      }
      int64_t b = a + 1;
      while (b < cnt && p.counted(n0 + b)) ++b;
      const RowPtrs<T> rpa = row_ptrs(p, n0 + a);
      p.fns->block_rows(block_in(p, rpa, 0, rpa.g, static_cast<T*>(nullptr)), b - a,
                        p.in.row_stride, p.C, p.probs ? p.in.probs_row_stride : 0, st + a);
      a = b;
    }
    for (int64_t i = 0; i < cnt; ++i) {
      const int64_t n = n0 + i;
      const RowPtrs<T> rp = row_ptrs(p, n);
      if (!in_place && p.counted(n)) zy[i] = target_logit(p, n, &dz[i], rp.z);
      if (!p.counted(n)) {
        if (rp.g) std::memset(static_cast<void*>(rp.g), 0, sizeof(T) * size_t(p.C));
        losses[n] = 0.0;
        continue;
      }
      const RowResult r = finish_row(p, &st[i], n, zy[i]);
      if (rp.g) {
        write_grad_block(p, st[i], r, rp.prob, rp.g, static_cast<T*>(nullptr), rp.g, 0, false);
        if (!p.probs) fix_target(p, r, zy[i], dz[i], rp.g, p.in.target[n]);
      }
      losses[n] = r.loss;
    }
  }
}

// Fewer rows than threads (e.g. 8 x 256k): the (row, block) pairs are shared out instead of
// rows. Phase 1 computes block statistics and stores e into the gradient rows; the merge
// per row is serial and cheap; phase 2 rewrites each block. Block positions are fixed, so
// the bits match the row-at-a-time path exactly.
template <class T>
void split_classes(const Problem<T>& p, int64_t rows, int nt, double* losses) {
  (void)nt;  // only read by the OpenMP pragma
  const int64_t items = rows * p.nb;
  std::vector<BlockStat> st(static_cast<size_t>(items));
  std::vector<RowResult> rr(static_cast<size_t>(rows));
  std::vector<double> zy(static_cast<size_t>(rows)), dz(static_cast<size_t>(rows));
  std::vector<T> tbuf(p.cap > 0.0 && p.grad ? static_cast<size_t>(rows * p.C) : 0);
  for (int64_t n = 0; n < rows; ++n)
    if (p.counted(n)) zy[size_t(n)] = target_logit(p, n, &dz[size_t(n)]);
#if defined(_OPENMP)
#pragma omp parallel num_threads(nt)
#endif
  {
#if defined(_OPENMP)
#pragma omp for schedule(static)
#endif
    for (int64_t it = 0; it < items; ++it) {
      const int64_t n = it / p.nb, k = it % p.nb;
      T* g = p.grad ? p.grad + n * p.C : nullptr;
      if (!p.counted(n)) {
        if (g)
          std::memset(static_cast<void*>(g + k * kBlock<T>), 0, sizeof(T) * size_t(p.block_len(k)));
        continue;
      }
      T* t = tbuf.empty() ? nullptr : tbuf.data() + n * p.C;
      st[size_t(it)] = p.fns->block(block_in(p, row_ptrs(p, n), k, g, t));
    }
#if defined(_OPENMP)
#pragma omp single
#endif
    for (int64_t n = 0; n < rows; ++n) {
      if (p.counted(n)) rr[size_t(n)] = finish_row(p, st.data() + n * p.nb, n, zy[size_t(n)]);
      losses[n] = p.counted(n) ? rr[size_t(n)].loss : 0.0;
    }
    if (p.grad) {
#if defined(_OPENMP)
#pragma omp for schedule(static)
#endif
      for (int64_t it = 0; it < items; ++it) {
        const int64_t n = it / p.nb, k = it % p.nb;
        if (!p.counted(n)) continue;
        T* g = p.grad + n * p.C;
        const T* t = tbuf.empty() ? nullptr : tbuf.data() + n * p.C;
        write_grad_block(p, st[size_t(it)], rr[size_t(n)], row_ptrs(p, n).prob, g, t, g, k, false);
      }
    }
  }
  if (p.grad && !p.probs)
    for (int64_t n = 0; n < rows; ++n)
      if (p.counted(n))
        fix_target(p, rr[size_t(n)], zy[size_t(n)], dz[size_t(n)], p.grad + n * p.C,
                   p.in.target[n]);
}

// The per-row outputs alone (p.outs) of rows begin .. end: block passes that store nothing,
// before a path without them (short rows) computes the loss and gradient, which then keep the
// bits of the call without outputs (in place, before the gradient overwrites the logits).
template <class T>
void outputs_only(const Problem<T>& p, int64_t begin, int64_t end) {
  std::vector<BlockStat> st(static_cast<size_t>(p.nb));
  for (int64_t n = begin; n < end; ++n) {
    const RowPtrs<T> rp = row_ptrs(p, n);
    for (int64_t k = 0; k < p.nb; ++k)
      st[size_t(k)] =
          p.fns->block(block_in(p, rp, k, static_cast<T*>(nullptr), static_cast<T*>(nullptr)));
    // target_logprob for every row with a class target (a zero weight or D = 0 included).
    const bool has_y = !p.probs && p.in.target[n] != p.ignore_index;
    double dzy;
    const double zy_t = has_y ? target_logit(p, n, &dzy, rp.z) : 0.0;
    write_row_outputs(p, n, stats_only(p, st.data()), st.data(), rp.z, zy_t, has_y);
  }
}

template double compute_row<float>(const Problem<float>&, int64_t, const RowPtrs<float>&,
                                   BlockStat*, float*, float*, std::vector<Pending<float>>*,
                                   const float*, MaxCarry<float>*);
template double compute_row<double>(const Problem<double>&, int64_t, const RowPtrs<double>&,
                                    BlockStat*, double*, double*, std::vector<Pending<double>>*,
                                    const double*, MaxCarry<double>*);
template void stream_rows<float>(const Problem<float>&, int64_t, int64_t, double*,
                                 std::vector<Pending<float>>*);
template void stream_rows<double>(const Problem<double>&, int64_t, int64_t, double*,
                                  std::vector<Pending<double>>*);
template void outputs_only<float>(const Problem<float>&, int64_t, int64_t);
template void outputs_only<double>(const Problem<double>&, int64_t, int64_t);
template bool takes_one_block_rows<float>(const Problem<float>&);
template bool takes_one_block_rows<double>(const Problem<double>&);
template void one_block_rows<float>(const Problem<float>&, int64_t, int64_t, double*);
template void one_block_rows<double>(const Problem<double>&, int64_t, int64_t, double*);
template void split_classes<float>(const Problem<float>&, int64_t, int, double*);
template void split_classes<double>(const Problem<double>&, int64_t, int, double*);

}  // namespace detail
}  // namespace fastxent
