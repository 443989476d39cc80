// Distillation kernels (KL and generalised JSD between softmax(alpha s) and softmax(alpha t)),
// written once over the vector traits (see kernel_impl.hpp); the interface and the formulas
// are in distill_table.hpp, the row driver in distill.cpp.
//
// Precision: exp through vexp (kernel_exp.hpp), log1p through vlog1p01 (sigmoid_impl.hpp);
// sums in vectors of the storage type over 16 vectors, then double; chunks (kChunk) merged in
// double. The per-element log-probabilities lx = x - lse_x are formed in the storage type
// (lse rounded once), so lx <= 0 exactly where x <= max and vexp stays in its domain.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "distill_table.hpp"
#include "kernel_impl.hpp"
#include "sigmoid_impl.hpp"  // vlog1p01

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

  // (M, S, A) += (m, s, a) for the same quantity taken with shift m.
  static void merge(double& M, double& S, double& A, double m, double s, double a) {
    if (s == 0.0 && a == 0.0 && m == -std::numeric_limits<double>::infinity()) return;
    if (m > M) {
      const double f = std::exp(M - m);
      S = S * f + s;
      A = A * f + a;
      M = m;
    } else {
      const double f = std::exp(m - M);
      S += s * f;
      A += a * f;
    }
  }

  // AX / AY: whether A_x / A_y are needed (the reverse / forward KL; JSD needs neither).
  template <bool AX, bool AY>
  static void stats_impl(const T* s, const T* t, int64_t n, T alpha, double* out, T* ex, T* ey_out,
                         T* shift) {
    const R a = V::set1(alpha);
    const double ninf = -std::numeric_limits<double>::infinity();
    double Mx = ninf, Sx = 0, Ax = 0, My = ninf, Sy = 0, Ay = 0;
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
      Acc<4> acc;  // S_x, A_x, S_y, A_y
      for (int64_t i = 0; i < len; i += W) {
        const int64_t l = len - i < W ? len - i : W;
        const R x = V::mul(a, loadn(sc + i, l)), y = V::mul(a, loadn(tc + i, l));
        const R e = vexp<V>(V::sub(x, shx)), ey = vexp<V>(V::sub(y, shy));
        const R d = V::sub(x, y);
        storen(ex + c0 + i, e, l);
        storen(ey_out + c0 + i, ey, l);
        acc.v[0] = V::add(acc.v[0], e);
        if constexpr (AX) acc.v[1] = V::add(acc.v[1], mul0(e, d));
        acc.v[2] = V::add(acc.v[2], ey);
        if constexpr (AY) acc.v[3] = V::sub(acc.v[3], mul0(ey, d));
        acc.tick();
      }
      acc.flush();
      merge(Mx, Sx, Ax, double(mx), acc.d[0], acc.d[1]);
      merge(My, Sy, Ay, double(my), acc.d[2], acc.d[3]);
    }
    out[0] = Mx;
    out[1] = Sx;
    out[2] = Ax;
    out[3] = My;
    out[4] = Sy;
    out[5] = Ay;
  }
  static void stats(const T* s, const T* t, int64_t n, T alpha, DistillMode mode, double* out,
                    T* ex, T* ey, T* shift) {
    if (mode == DistillMode::ForwardKL)
      return stats_impl<false, true>(s, t, n, alpha, out, ex, ey, shift);
    if (mode == DistillMode::ReverseKL)
      return stats_impl<true, false>(s, t, n, alpha, out, ex, ey, shift);
    stats_impl<false, false>(s, t, n, alpha, out, ex, ey, shift);
  }

  // What every later pass needs at one vector: the log-probabilities, and p and q from the
  // stored exps and their chunk's factors.
  struct Logs {
    R lx, ly, p, q;
  };
  static Logs logs(const DistillRow<T>& r, R a, R lsx, R lsy, R fx, R fy, int64_t i, int64_t l) {
    Logs g;
    g.lx = V::sub(V::mul(a, loadn(r.s + i, l)), lsx);
    g.ly = V::sub(V::mul(a, loadn(r.t + i, l)), lsy);
    g.p = V::mul(loadn0(r.ex + i, l), fx);
    g.q = V::mul(loadn0(r.ey + i, l), fy);
    return g;
  }
  static R loadn0(const T* p, int64_t len) {
    return len >= W ? V::load(p) : V::load_partial(p, len, T(0));
  }
  // log m, m = beta q + (1 - beta) p: the larger term's log (exact from ly or lx) plus
  // log1p(smaller / larger). NaN where p = q = 0 (callers mask it).
  static R log_mix(const Logs& g, R b, R b1, R lb, R l1b) {
    const R u = V::mul(b, g.q), v = V::mul(b1, g.p);
    const R hi = V::max(u, v), lo = V::min(u, v);
    return V::add(V::max(V::add(g.ly, lb), V::add(g.lx, l1b)), vlog1p01<V>(V::div(lo, hi)));
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

  static void jsd_sums(const DistillRow<T>& r, double* out) {
    const R a = V::set1(r.alpha), lsx = V::set1(r.lse_x), lsy = V::set1(r.lse_y);
    const R lb = V::set1(r.log_beta), l1b = V::set1(r.log_1mbeta);
    const R b = V::set1(r.beta), b1 = V::set1(r.one_m_beta);
    Acc<2> acc;  // K_s, K_t
    over_chunks(r, [&](R fx, R fy, int64_t i, int64_t l) {
      const Logs g = logs(r, a, lsx, lsy, fx, fy, i, l);
      const R dm = V::sub(g.lx, log_mix(g, b, b1, lb, l1b));
      storen(r.dm + i, dm, l);
      acc.v[0] = V::add(acc.v[0], mul0(g.p, dm));
      acc.v[1] = V::add(acc.v[1], mul0(g.q, V::add(V::sub(dm, g.lx), g.ly)));  // ly - lm
      acc.tick();
    });
    acc.flush();
    out[0] = acc.d[0];
    out[1] = acc.d[1];
  }

  template <DistillMode M, bool GS, bool GT>
  static void grad_impl(const DistillRow<T>& r) {
    const R a = V::set1(r.alpha), lsx = V::set1(r.lse_x), lsy = V::set1(r.lse_y);
    const R lb = V::set1(r.log_beta), l1b = V::set1(r.log_1mbeta);
    const R b = V::set1(r.beta), b1 = V::set1(r.one_m_beta);
    const R cs = V::set1(r.cs), ct = V::set1(r.ct), ks = V::set1(r.k_s), kt = V::set1(r.k_t);
    (void)lb, (void)l1b, (void)b, (void)b1, (void)ks, (void)kt;  // each mode reads some
    over_chunks(r, [&](R fx, R fy, int64_t i, int64_t l) {
      const Logs g = logs(r, a, lsx, lsy, fx, fy, i, l);  // read before anything is stored
      R gs, gt;
      if constexpr (M == DistillMode::ForwardKL) {
        gs = V::mul(cs, V::sub(g.p, g.q));
        gt = V::mul(ct, mul0(g.q, V::sub(V::sub(g.ly, g.lx), kt)));
      } else if constexpr (M == DistillMode::ReverseKL) {
        gs = V::mul(cs, mul0(g.p, V::sub(V::sub(g.lx, g.ly), ks)));
        gt = V::mul(ct, V::sub(g.q, g.p));
      } else {
        const R dm = loadn0(r.dm + i, l);  // lx - lm, from jsd_sums; ly - lm = dm - lx + ly
        gs = V::mul(cs, mul0(g.p, V::sub(dm, ks)));
        gt = V::mul(ct, mul0(g.q, V::sub(V::add(V::sub(dm, g.lx), g.ly), kt)));
      }
      if constexpr (GS) storen(r.gs + i, gs, l);
      if constexpr (GT) storen(r.gt + i, gt, l);
    });
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

  static DistillFns<T> fns() { return {&Distill::stats, &Distill::jsd_sums, &Distill::grad}; }
};

}  // namespace FASTXENT_ISA_NS
}  // namespace fastxent
