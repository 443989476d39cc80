// Distillation kernels (KL and generalised JSD between softmax(alpha s) and softmax(alpha t)),
// written once over the vector traits (see kernel_impl.hpp); the interface and the formulas
// are in distill_table.hpp, the row driver in distill.cpp.
//
// Precision: exp through vexp (kernel_exp.hpp; it only sees v - max <= 0), log1p through
// vlog1p01 (kernel_log.hpp); sums in vectors of the storage type over 16 vectors, then
// double; chunks (kChunk) merged in double. Log-probabilities are (v - M) - log S per element,
// so a constant shift of the logits changes nothing but the rounding of v - M.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>

#include "distill_table.hpp"
#include "kernel_impl.hpp"
#include "kernel_log.hpp"  // vlog1p01
#include "sigmoid_impl.hpp"

#include "isa_ns.hpp"

namespace fastxent {
namespace FASTXENT_ISA_NS {

template <class V>
struct Distill {
  using T = typename V::T;
  using R = typename V::R;
  static constexpr int64_t W = V::W;
  static constexpr int64_t kChunk = kDistillChunk<T>;
  static constexpr T kNegInf = -std::numeric_limits<T>::infinity();

  static R loadn(const T* p, int64_t len) {
    return len >= W ? V::load(p) : V::load_partial(p, len, kNegInf);
  }
  static void storen(T* p, R v, int64_t len) {
    if (len >= W) V::store(p, v);
    else V::store_partial(p, v, len);
  }
  // e * d, but 0 where e == 0: a zero probability times an infinite log-ratio counts 0. NaN
  // in e stays NaN. Tested as e == 0, not e < denorm_min: under DAZ (denormals read as zero,
  // as on XLA's CPU threads) 0 < denorm_min is false, and 0 * inf gave NaN.
  static R mul0(R e, R d) {
    const R zero = V::set1(T(0));
    return V::select_eq(e, zero, zero, V::mul(e, d));
  }
  // Accumulates vectors in the storage type and moves them into double every 16 additions.
  template <int K>
  struct Acc {
    R v[K];
    double d[K] = {};
    int pending = 0;
    Acc() {
      for (int k = 0; k < K; ++k) v[k] = V::set1(T(0));
    }
    void flush() {
      for (int k = 0; k < K; ++k) {
        d[k] += V::hsum(v[k]);
        v[k] = V::set1(T(0));
      }
      pending = 0;
    }
    void tick() {
      if (++pending == 16) flush();
    }
  };

  // (M, S) += (m, s): the same sum taken with shift m.
  static void merge(double& M, double& S, double m, double s) {
    if (s == 0.0 && m == -std::numeric_limits<double>::infinity()) return;
    if (m > M) {
      S = S * std::exp(M - m) + s;
      M = m;
    } else {
      S += s * std::exp(m - M);
    }
  }

  static void stats(const T* s, const T* t, int64_t n, T alpha, double* out, T* ex, T* ey_out,
                    T* shift) {
    const R a = V::set1(alpha);
    const double ninf = -std::numeric_limits<double>::infinity();
    double Mx = ninf, Sx = 0, My = ninf, Sy = 0;
    for (int64_t c0 = 0, k = 0; c0 < n; c0 += kChunk, ++k) {
      const int64_t len = n - c0 < kChunk ? n - c0 : kChunk;
      const T* sc = s + c0;
      const T* tc = t + c0;
      R vx = V::set1(kNegInf), vy = V::set1(kNegInf);
      for (int64_t i = 0; i < len; i += W) {
        const int64_t l = len - i < W ? len - i : W;
        vx = V::max(vx, V::mul(a, loadn(sc + i, l)));
        vy = V::max(vy, V::mul(a, loadn(tc + i, l)));
      }
      const T mx = V::hmax(vx), my = V::hmax(vy);
      shift[2 * k] = mx;
      shift[2 * k + 1] = my;
      // An all -inf chunk shifts by 0 (its exps are then 0, not NaN).
      const R shx = V::set1(mx == kNegInf ? T(0) : mx), shy = V::set1(my == kNegInf ? T(0) : my);
      Acc<2> acc;  // S_x, S_y
      // The next chunk's lines are requested while this one's exps run: the max loop above
      // would otherwise wait on memory with the exp units idle, and the exp loop run with
      // the memory idle (hardware prefetchers run only a few lines ahead of the demand).
      const int64_t ahead = n - (c0 + len) < kChunk ? n - (c0 + len) : kChunk;
      for (int64_t i = 0; i < len; i += W) {
        const int64_t l = len - i < W ? len - i : W;
        if (i < ahead && (i * int64_t(sizeof(T))) % 64 < W * int64_t(sizeof(T))) {
          FASTXENT_PREFETCH(sc + kChunk + i);
          FASTXENT_PREFETCH(tc + kChunk + i);
        }
        const R x = V::mul(a, loadn(sc + i, l)), y = V::mul(a, loadn(tc + i, l));
        const R e = vexp<V>(V::sub(x, shx)), ey = vexp<V>(V::sub(y, shy));
        storen(ex + c0 + i, e, l);
        storen(ey_out + c0 + i, ey, l);
        acc.v[0] = V::add(acc.v[0], e);
        acc.v[1] = V::add(acc.v[1], ey);
        acc.tick();
      }
      acc.flush();
      merge(Mx, Sx, double(mx), acc.d[0]);
      merge(My, Sy, double(my), acc.d[1]);
    }
    out[0] = Mx;
    out[1] = Sx;
    out[2] = My;
    out[3] = Sy;
  }

  // What the later passes need at one vector: the log-probabilities, and p and q from the
  // stored exps and their chunk's factors.
  struct Logs {
    R lx, ly, p, q;
  };
  struct Consts {
    R a, mx, my, lsx, lsy;
  };
  static Consts consts(const DistillRow<T>& r) {
    return {V::set1(r.alpha), V::set1(r.max_x), V::set1(r.max_y), V::set1(r.logs_x),
            V::set1(r.logs_y)};
  }
  static Logs logs(const DistillRow<T>& r, const Consts& k, R fx, R fy, int64_t i, int64_t l) {
    Logs g;
    g.lx = V::sub(V::sub(V::mul(k.a, loadn(r.s + i, l)), k.mx), k.lsx);
    g.ly = V::sub(V::sub(V::mul(k.a, loadn(r.t + i, l)), k.my), k.lsy);
    g.p = V::mul(loadn0(r.ex + i, l), fx);
    g.q = V::mul(loadn0(r.ey + i, l), fy);
    return g;
  }
  static R loadn0(const T* p, int64_t len) {
    return len >= W ? V::load(p) : V::load_partial(p, len, T(0));
  }
  // log m, m = beta q + (1 - beta) p: the larger term's log (from ly or lx) plus
  // log1p(smaller / larger); the ratio is 0 where both terms round to 0 (p or q too small for
  // the product), not 0 / 0. NaN only where lx and ly are both -inf (p = q = 0: masked).
  static R log_mix(const Logs& g, R b, R b1, R lb, R l1b) {
    const R u = V::mul(b, g.q), v = V::mul(b1, g.p);
    const R hi = V::max(u, v), lo = V::min(u, v), zero = V::set1(T(0));
    const R ratio = V::select_eq(hi, zero, zero, V::div(lo, hi));
    return V::add(V::max(V::add(g.ly, lb), V::add(g.lx, l1b)), vlog1p01<V>(ratio));
  }

  // Runs body(fx, fy, i, l) over the row, vector by vector, with i's chunk's factors.
  template <class F>
  static void over_chunks(const DistillRow<T>& r, F&& body) {
    for (int64_t c0 = 0, k = 0; c0 < r.n; c0 += kChunk, ++k) {
      const R fx = V::set1(r.fx[k]), fy = V::set1(r.fy[k]);
      const int64_t end = r.n - c0 < kChunk ? r.n : c0 + kChunk;
      for (int64_t i = c0; i < end; i += W) body(fx, fy, i, end - i < W ? end - i : W);
    }
  }

  static void sums(const DistillRow<T>& r, double* out) {
    const Consts k = consts(r);
    const R lb = V::set1(r.log_beta), l1b = V::set1(r.log_1mbeta);
    const R b = V::set1(r.beta), b1 = V::set1(r.one_m_beta);
    Acc<2> acc;
    over_chunks(r, [&](R fx, R fy, int64_t i, int64_t l) {
      const Logs g = logs(r, k, fx, fy, i, l);
      if (r.mode == DistillMode::ForwardKL) {
        acc.v[0] = V::add(acc.v[0], mul0(g.q, V::sub(g.ly, g.lx)));
      } else if (r.mode == DistillMode::ReverseKL) {
        acc.v[0] = V::add(acc.v[0], mul0(g.p, V::sub(g.lx, g.ly)));
      } else {
        const R lm = log_mix(g, b, b1, lb, l1b);
        storen(r.lm + i, lm, l);
        acc.v[0] = V::add(acc.v[0], mul0(g.p, V::sub(g.lx, lm)));
        acc.v[1] = V::add(acc.v[1], mul0(g.q, V::sub(g.ly, lm)));
      }
      acc.tick();
    });
    acc.flush();
    out[0] = acc.d[0];
    out[1] = acc.d[1];
  }

  // The gradient pass; with SUM (ForwardKL without the teacher's gradient, ReverseKL
  // without the student's: the gradients that do not need the divergence) it also takes the
  // divergence, with exactly the operations and order of sums (so the same bits), into
  // *kl, saving sums' pass over the row.
  template <DistillMode M, bool GS, bool GT, bool SUM = false>
  static void grad_impl(const DistillRow<T>& r, double* kl = nullptr) {
    const Consts k = consts(r);
    const R cs = V::set1(r.cs), ct = V::set1(r.ct), ks = V::set1(r.k_s), kt = V::set1(r.k_t);
    (void)ks, (void)kt;  // each mode reads some
    Acc<1> acc;
    over_chunks(r, [&](R fx, R fy, int64_t i, int64_t l) {
      const Logs g = logs(r, k, fx, fy, i, l);  // read before anything is stored
      if constexpr (SUM) {
        static_assert(M != DistillMode::Jsd, "JSD's sums store lm for the gradient pass");
        if constexpr (M == DistillMode::ForwardKL)
          acc.v[0] = V::add(acc.v[0], mul0(g.q, V::sub(g.ly, g.lx)));
        else acc.v[0] = V::add(acc.v[0], mul0(g.p, V::sub(g.lx, g.ly)));
        acc.tick();
      }
      R gs, gt;
      if constexpr (M == DistillMode::ForwardKL) {
        gs = V::mul(cs, V::sub(g.p, g.q));
        gt = V::mul(ct, mul0(g.q, V::sub(V::sub(g.ly, g.lx), kt)));
      } else if constexpr (M == DistillMode::ReverseKL) {
        gs = V::mul(cs, mul0(g.p, V::sub(V::sub(g.lx, g.ly), ks)));
        gt = V::mul(ct, V::sub(g.q, g.p));
      } else {
        const R lm = loadn0(r.lm + i, l);  // from sums
        gs = V::mul(cs, mul0(g.p, V::sub(V::sub(g.lx, lm), ks)));
        gt = V::mul(ct, mul0(g.q, V::sub(V::sub(g.ly, lm), kt)));
      }
      if constexpr (GS) storen(r.gs + i, gs, l);
      if constexpr (GT) storen(r.gt + i, gt, l);
    });
    if constexpr (SUM) {
      acc.flush();
      *kl = acc.d[0];
    }
  }

  static void grad_sums(const DistillRow<T>& r, double* kl) {
    if (r.mode == DistillMode::ForwardKL && r.gs && !r.gt)
      grad_impl<DistillMode::ForwardKL, true, false, true>(r, kl);
    else if (r.mode == DistillMode::ReverseKL && r.gt && !r.gs)
      grad_impl<DistillMode::ReverseKL, false, true, true>(r, kl);
    else throw std::logic_error("grad_sums: a gradient that needs the divergence first");
  }

  template <DistillMode M>
  static void grad_mode(const DistillRow<T>& r) {
    if (r.gs && r.gt) grad_impl<M, true, true>(r);
    else if (r.gs) grad_impl<M, true, false>(r);
    else if (r.gt) grad_impl<M, false, true>(r);
  }

  static void grad(const DistillRow<T>& r) {
    switch (r.mode) {
      case DistillMode::ForwardKL: return grad_mode<DistillMode::ForwardKL>(r);
      case DistillMode::ReverseKL: return grad_mode<DistillMode::ReverseKL>(r);
      case DistillMode::Jsd: return grad_mode<DistillMode::Jsd>(r);
    }
  }

  static DistillFns<T> fns() {
    return {&Distill::stats, &Distill::sums, &Distill::grad, &Distill::grad_sums};
  }
};

}  // namespace FASTXENT_ISA_NS
}  // namespace fastxent
