// C++ tests of the sigmoid cross-entropy, no framework: each CHECK prints what failed; the exit
// code is nonzero on failure. Runs under every ISA this CPU can run and prints the measured
// errors (long double references; x86 long double has a 64-bit mantissa).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "fastxent/fastxent.hpp"
#include "fastxent/sigmoid.hpp"
#include "kernel_table.hpp"
#include "check.hpp"

namespace {

using LD = long double;

template <class T>
LD ulps(T got, LD ref) {
  if (ref == 0) return got == 0 ? 0 : std::numeric_limits<LD>::infinity();
  int ex;
  std::frexp(ref, &ex);  // |ref| in [2^(ex-1), 2^ex)
  const LD ulp = std::ldexp(LD(1), ex - 1 - (std::numeric_limits<T>::digits - 1));
  return std::fabs(LD(got) - ref) / ulp;
}

// log1p01 over e in [0, 1]: a uniform grid, a geometric one down to the smallest normal,
// and 1 itself. Fails above 2 ULP.
template <class T>
void test_log1p(const fastxent::KernelTable& table) {
  std::vector<T> e;
  const int64_t n = 1 << 20;
  for (int64_t i = 0; i <= n; ++i) e.push_back(T(double(i) / double(n)));
  for (T v = T(1); v >= std::numeric_limits<T>::min(); v *= T(0.9993)) e.push_back(v);
  std::vector<T> out(e.size());
  fastxent::sigmoid_fns<T>(table).log1p01(e.data(), out.data(), int64_t(e.size()));
  LD worst = 0, at = 0;
  for (size_t i = 0; i < e.size(); ++i) {
    const LD u = ulps<T>(out[i], std::log1p(LD(e[i])));
    if (u > worst) worst = u, at = e[i];
  }
  std::printf("  log1p01<%s> [%s]: max error %.2Lf ULP (at e = %.9Lg)\n",
              sizeof(T) == 4 ? "f32" : "f64", table.name, worst, at);
  CHECK(worst <= 2.0, "%s: log1p01 error %.2Lf ULP", table.name, worst);
}

// Element-wise loss and gradient against long double, y in [0, 1], p in [0, 4], x over a
// wide range. The loss is a sum of non-negative terms: relative error. The gradient
// (1 - y) s - p y (1 - s) cancels: error relative to (1 - y) s + p y (1 - s).
template <class T>
void test_elements(const fastxent::KernelTable& table, std::mt19937_64& rng) {
  const int64_t n = 200003;
  std::vector<T> x(n), y(n), p(n), loss(n), g(n);
  std::uniform_real_distribution<double> u01(0.0, 1.0);
  for (int64_t i = 0; i < n; ++i) {
    const double mag = std::pow(10.0, 6.0 * u01(rng) - 4.0);  // 1e-4 .. 100
    x[i] = T(u01(rng) < 0.5 ? -mag : mag);
    y[i] = T(i % 3 == 0 ? std::round(u01(rng)) : u01(rng));
    p[i] = T(4.0 * u01(rng));
  }
  fastxent::SigmoidSeg<T> s{x.data(), y.data(), p.data(), nullptr, n, loss.data(), g.data(), T(1)};
  fastxent::sigmoid_fns<T>(table).seg(s);
  LD wl = 0, wg = 0;
  for (int64_t i = 0; i < n; ++i) {
    const LD X = x[i], Y = y[i], P = p[i];
    // (1 - y) x + (1 + (p - 1) y) softplus(-x), rearranged so that nothing cancels.
    const LD ref = (X >= 0 ? (1 - Y) * X : -P * Y * X) +
                   (1 + (P - 1) * Y) * std::log1p(std::exp(-std::fabs(X)));
    const LD sg = 1 / (1 + std::exp(-X)), sgm = 1 / (1 + std::exp(X));
    const LD gref = (1 - Y) * sg - P * Y * sgm, gscale = (1 - Y) * sg + P * Y * sgm;
    // exp(-|x|) flushes to 0 below the smallest normal: losses and gradients below
    // (1 + p) times it may come out 0 (an absolute error, never more).
    const LD tiny = 8 * LD(std::numeric_limits<T>::min());
    if (ref < tiny) {
      CHECK(std::fabs(LD(loss[i]) - ref) < tiny, "%s: x=%g y=%g: loss %g", table.name, double(X),
            double(Y), double(loss[i]));
    } else {
      wl = std::fmax(wl, ulps<T>(loss[i], ref));
    }
    if (gscale < tiny) {
      CHECK(std::fabs(LD(g[i]) - gref) < tiny, "%s: x=%g: grad %g", table.name, double(X),
            double(g[i]));
    } else {
      wg = std::fmax(wg,
                     std::fabs(LD(g[i]) - gref) / gscale / (std::numeric_limits<T>::epsilon() / 2));
    }
  }
  std::printf("  elements<%s> [%s]: loss max %.2Lf ULP, gradient max %.2Lf u (of its scale)\n",
              sizeof(T) == 4 ? "f32" : "f64", table.name, wl, wg);
  CHECK(wl <= 8.0, "%s: loss error %.2Lf ULP", table.name, wl);
  CHECK(wg <= 8.0, "%s: gradient error %.2Lf u", table.name, wg);
}

// Extremes: never NaN for finite input, the documented limits at +-inf.
template <class T>
void test_extremes(const fastxent::KernelTable& table) {
  const T big = std::numeric_limits<T>::max(), inf = std::numeric_limits<T>::infinity();
  const T xs[] = {big, -big, inf, -inf, inf, -inf, T(0), -T(0)};
  const T ys[] = {T(1), T(0), T(1), T(0), T(0.5), T(0.5), T(1), T(0)};
  T loss[8], g[8];
  fastxent::SigmoidSeg<T> s{xs, ys, nullptr, nullptr, 8, loss, g, T(1)};
  fastxent::sigmoid_fns<T>(table).seg(s);
  for (int i = 0; i < 8; ++i)
    CHECK(!std::isnan(loss[i]) && !std::isnan(g[i]) && std::isfinite(g[i]),
          "%s: x=%g y=%g: loss %g grad %g", table.name, double(xs[i]), double(ys[i]),
          double(loss[i]), double(g[i]));
  CHECK(loss[0] == 0 && loss[1] == 0 && loss[2] == 0 && loss[3] == 0, "%s: confident and right",
        table.name);
  CHECK(loss[4] == inf && loss[5] == inf && g[4] == T(0.5) && g[5] == T(-0.5),
        "%s: soft target at inf", table.name);
}

void test_threads_and_errors() {
  const int64_t n = 3 * 65536 + 17;
  std::mt19937_64 rng(7);
  std::normal_distribution<float> nd(0.0f, 3.0f);
  std::vector<float> x(n), y(n), w(n), g1(n), g2(n), pw(5);
  for (int64_t i = 0; i < n; ++i) x[i] = nd(rng), y[i] = float(i % 2), w[i] = nd(rng);
  for (float& v : pw) v = 2.0f;
  fastxent::SigmoidInputs<float> in;
  in.logits = x.data();
  in.target = y.data();
  in.n = n - 5;  // a multiple of 5
  in.last = 5;
  in.pos_weight = pw.data();
  in.pos_weight_mode = fastxent::Broadcast::Last;
  in.weight = w.data();
  in.weight_mode = fastxent::Broadcast::Full;
  fastxent::SigmoidOptions o;
  o.num_threads = 1;
  const double l1 = fastxent::sigmoid_cross_entropy<float>(in, o, g1.data(), nullptr);
  for (int t : {2, 3, 8}) {
    o.num_threads = t;
    const double l2 = fastxent::sigmoid_cross_entropy<float>(in, o, g2.data(), nullptr);
    CHECK(l1 == l2 && std::memcmp(g1.data(), g2.data(), sizeof(float) * size_t(n - 5)) == 0,
          "results differ between 1 and %d threads", t);
  }
  auto throws = [&](fastxent::SigmoidInputs<float> bad, float* g, float* l) {
    try {
      fastxent::sigmoid_cross_entropy<float>(bad, o, g, l);
    } catch (const std::invalid_argument&) {
      return true;
    }
    return false;
  };
  fastxent::SigmoidInputs<float> bad = in;
  bad.n = n - 2;  // not a multiple of last
  CHECK(throws(bad, g1.data(), nullptr), "n not a multiple of last");
  CHECK(throws(in, y.data() + 1, nullptr), "grad overlapping the target");
  CHECK(throws(in, x.data() + 1, nullptr), "grad partly overlapping the logits");
  CHECK(!throws(in, x.data(), nullptr), "in place");
}

}  // namespace

int main() {
  std::mt19937_64 rng(12345);
  for (const std::string& isa : fastxent::available_isas()) {
    fastxent::set_isa(isa);
    std::printf("ISA %s\n", isa.c_str());
    const fastxent::KernelTable& t = fastxent::active_table();
    test_log1p<float>(t);
    test_log1p<double>(t);
    test_elements<float>(t, rng);
    test_elements<double>(t, rng);
    test_extremes<float>(t);
    test_extremes<double>(t);
  }
  fastxent::set_isa("auto");
  test_threads_and_errors();
  std::printf("%d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
