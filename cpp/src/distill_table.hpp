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

template <class T>
struct DistillRow {
  const T* s;  // student logits (n)
  const T* t;  // teacher logits (n)
  int64_t n;
  T alpha;                 // 1 / temperature
  T lse_x, lse_y;          // log-sum-exp of x = alpha s and y = alpha t (from stats)
  T log_beta, log_1mbeta;  // JSD: log(beta), log(1 - beta)
  DistillMode mode;
  T* gs;  // student gradient (n) or null; may equal s
  T* gt;  // teacher gradient (n) or null; may equal t
  T cs, ct, k_s, k_t;
};

template <class T>
struct DistillFns {
  // out = {m_x, S_x, A_x, m_y, S_y, A_y} for one row (see the top). A row of n = 0 gives
  // m = -inf, S = A = 0.
  void (*stats)(const T* s, const T* t, int64_t n, T alpha, double* out);
  // out = {K_s, K_t} (JSD), reading s, t, n, alpha, lse_x, lse_y, log_beta, log_1mbeta.
  void (*jsd_sums)(const DistillRow<T>& r, double* out);
  // Writes gs and / or gt (whichever is not null) for r.mode.
  void (*grad)(const DistillRow<T>& r);
};

}  // namespace fastxent
