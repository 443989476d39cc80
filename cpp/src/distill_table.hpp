// The ISA-neutral interface of the distillation kernels (KL divergence and generalised JSD
// between a student's and a teacher's softmax), compiled once per ISA from distill_impl.hpp;
// the driver is distill.cpp.
//
// Per row, with x = alpha s and y = alpha t (alpha = 1 / temperature), M_x, M_y the row maxima,
// S_x = sum exp(x - M_x), S_y likewise, the log-probabilities are formed per element as
//   lx = (x - M_x) - log S_x,   ly = (y - M_y) - log S_y
// (exact near the maximum, whatever the logits' magnitude), p = softmax(x), q = softmax(y).
//   stats:  M and S of both rows, storing ex = exp(x - h_k) and ey = exp(y - g_k) (h_k, g_k:
//           chunk k's maxima, 0 for an all -inf chunk) and the chunk maxima, so that the later
//           passes get p = ex * (exp(h_k - M_x) / S_x) and q likewise, without an exp;
//   sums:   the row's divergence from per-element terms (no difference of large sums):
//           ForwardKL sum q (ly - lx); ReverseKL sum p (lx - ly); Jsd K_s = sum p (lx - lm) and
//           K_t = sum q (ly - lm), lm = log(beta q + (1 - beta) p), storing lm for the gradient;
//   grad:   the gradients with respect to the student and / or teacher logits (DistillMode).
// Every p (...) or q (...) term is 0 where p (or q) is 0 (0 * inf := 0). Every pass computes
// p, q, lx, ly the same way whatever the call writes, so results do not depend on which
// gradients are asked for or on in place or not.
#pragma once

#include <cstdint>

namespace fastxent {

// Which divergence a pass computes; the ISA-neutral counterpart of the public Divergence.
//   ForwardKL  KL(q || p):  gs = cs (p - q),             gt = ct q (ly - lx - k_t)
//   ReverseKL  KL(p || q):  gs = cs p (lx - ly - k_s),   gt = ct (q - p)
//   Jsd        m = beta q + (1 - beta) p:
//              gs = cs p (lx - lm - k_s),  gt = ct q (ly - lm - k_t)
// (cs, ct carry the row's weight, the temperature, the reduction's scale and, for JSD, the
// factors (1 - beta) and beta; k_s, k_t are the divergences the softmax's chain rule subtracts).
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
  T max_x, max_y;          // M_x, M_y (as computed: maxima of alpha s, alpha t)
  T logs_x, logs_y;        // log S_x, log S_y (rounded once)
  T log_beta, log_1mbeta;  // JSD: log(beta), log(1 - beta)
  T beta, one_m_beta;      // JSD: beta, 1 - beta
  DistillMode mode;
  const T* ex;  // exp(x - h_k) from stats (n values); may equal gs
  const T* ey;  // exp(y - g_k) from stats (n values)
  const T* fx;  // per chunk k: exp(h_k - M_x) / S_x (0 for an all -inf chunk)
  const T* fy;  // per chunk k: exp(g_k - M_y) / S_y, likewise
  T* lm;        // JSD: lm, written by sums, read by grad (n values)
  T* gs;        // student gradient (n) or null; may equal s
  T* gt;        // teacher gradient (n) or null; may equal t
  T cs, ct, k_s, k_t;
};

template <class T>
struct DistillFns {
  // out = {M_x, S_x, M_y, S_y} for one row; ex and ey (n values each, overlapping neither s
  // nor t) get exp(x - h_k) and exp(y - g_k), shift[2k] = h_k and shift[2k + 1] = g_k (-inf
  // for an all -inf chunk, whose exps are 0). A row of n = 0 gives M = -inf, S = 0.
  void (*stats)(const T* s, const T* t, int64_t n, T alpha, double* out, T* ex, T* ey, T* shift);
  // out[0] = the divergence (ForwardKL, ReverseKL) or out = {K_s, K_t} (Jsd, storing lm);
  // reads every field but the gradient ones.
  void (*sums)(const DistillRow<T>& r, double* out);
  // Writes gs and / or gt (whichever is not null) for r.mode.
  void (*grad)(const DistillRow<T>& r);
  // sums and grad in one pass, for the gradients that do not need the divergence (ForwardKL
  // with gs alone, ReverseKL with gt alone; r.cs / r.ct set, r.k_s / r.k_t unused): *out
  // gets sums' out[0], the same bits.
  void (*grad_sums)(const DistillRow<T>& r, double* out);
};

}  // namespace fastxent
