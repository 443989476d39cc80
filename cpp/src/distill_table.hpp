// The ISA-neutral interface of the distillation kernels (KL divergence and generalised JSD
// between a student's and a teacher's softmax), compiled once per ISA from distill_impl.hpp;
// the driver is distill.cpp.
//
// Per row, with x = alpha s and y = alpha t (alpha = 1 / temperature), lx = x - lse(x) and
// ly = y - lse(y) the log-probabilities, p = exp(lx), q = exp(ly):
//   stats:  (m, S, A) of x and of y: m the row max, S = sum exp(v - m), and
//           A_x = sum exp(x - m_x) (x - y), A_y = sum exp(y - m_y) (y - x)
//           (terms with exp(. - m) = 0 are dropped, so 0 * inf never makes a NaN);
//   sums:   (JSD only) K_s = sum p (lx - lm), K_t = sum q (ly - lm), lm = log(beta q + (1 - beta)
//   p); grad:   the gradients with respect to the student and / or teacher logits (see
//   DistillMode).
#pragma once

#include <cstdint>

namespace fastxent {

// Which divergence a gradient pass writes; the ISA-neutral counterpart of the public Divergence.
//   ForwardKL  KL(q || p):  gs = cs (p - q),             gt = ct q (ly - lx - k_t)
//   ReverseKL  KL(p || q):  gs = cs p (lx - ly - k_s),   gt = ct (q - p)
//   Jsd        m = beta q + (1 - beta) p:
//              gs = cs p (lx - lm - k_s),  gt = ct q (ly - lm - k_t)
// (cs, ct carry the row's weight, the temperature, the reduction's scale and, for JSD, the
// factors (1 - beta) and beta; k_s, k_t are the row's divergences that the softmax's chain
// rule subtracts). Every p (...) or q (...) term is 0 where p (or q) is 0.
enum class DistillMode : int { ForwardKL = 0, ReverseKL = 1, Jsd = 2 };

// Classes per chunk of the statistics pass (each operand's chunk is 8 KiB: the max loop reads
// it, the sum loop reads it again from L1). Chunk k holds classes [k kDistillChunk, ...).
template <class T>
constexpr int64_t kDistillChunk = int64_t(8192 / sizeof(T));

template <class T>
struct DistillRow {
  const T* s;  // student logits (n)
  const T* t;  // teacher logits (n)
  int64_t n;
  T alpha;                 // 1 / temperature
  T lse_x, lse_y;          // log-sum-exp of x = alpha s and y = alpha t (from stats)
  T log_beta, log_1mbeta;  // JSD: log(beta), log(1 - beta)
  T beta, one_m_beta;      // JSD: beta, 1 - beta
  const T* ex;             // exp(x - h_k) from stats (n values); may equal gs
  const T* ey;             // exp(y - g_k) from stats (n values)
  const T* fx;             // per chunk k: exp(h_k - lse_x), 0 for an all -inf chunk
  const T* fy;             // per chunk k: exp(g_k - lse_y), likewise
  T* dm;                   // JSD: lx - lm, written by jsd_sums, read by grad (n values)
  DistillMode mode;
  T* gs;  // student gradient (n) or null; may equal s
  T* gt;  // teacher gradient (n) or null; may equal t
  T cs, ct, k_s, k_t;
};

template <class T>
struct DistillFns {
  // out = {m_x, S_x, A_x, m_y, S_y, A_y} for one row (see the top); ex and ey (n values
  // each, overlapping neither s nor t) get exp(x - h_k) and exp(y - g_k), shift[2k] = h_k and
  // shift[2k + 1] = g_k, -inf for an all -inf chunk (whose exps are 0). A row of n = 0 gives
  // m = -inf, S = A = 0.
  // Only the A that `mode` needs is computed (A_y for ForwardKL, A_x for ReverseKL); the
  // other, and both for Jsd, come out 0.
  void (*stats)(const T* s, const T* t, int64_t n, T alpha, DistillMode mode, double* out, T* ex,
                T* ey, T* shift);
  // out = {K_s, K_t} (JSD), reading everything but the gradient fields.
  void (*jsd_sums)(const DistillRow<T>& r, double* out);
  // Writes gs and / or gt (whichever is not null) for r.mode.
  void (*grad)(const DistillRow<T>& r);
};

}  // namespace fastxent
