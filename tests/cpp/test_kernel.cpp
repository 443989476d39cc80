// C++ tests of the kernel, no framework: each CHECK prints what failed; the exit code is the
// number of failures. Run by ctest (cpp_kernel) under every ISA this CPU can run.
#include <algorithm>
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
#include "kernel_table.hpp"
#include "check.hpp"

namespace {

template <class T>
double ulp_of(double ref) {
  const T r = T(ref);
  return double(std::nextafter(r, std::numeric_limits<T>::infinity())) - double(r);
}

// The plain block pass: no transform, no weights, no targets.
template <class T>
fastxent::BlockStat plain_block(const fastxent::RowFns<T>& f, const T* z, T* e, int64_t n) {
  fastxent::BlockIn<T> in{};
  in.z = z;
  in.e = e;
  in.n = n;
  in.alpha = T(1);
  return f.block(in);
}

// exp through the kernel's block pass: with a 0 in the block its max is 0, so e = exp(x).
template <class T>
void test_exp(const fastxent::KernelTable& table, double lo, double max_ulp_allowed) {
  const auto& f = fastxent::row_fns<T>(table);
  const int64_t n = fastxent::kBlock<T> - 1;  // not a multiple of any W: exercises the masked tail
  std::vector<T> x(static_cast<size_t>(n)), e(static_cast<size_t>(n));
  double worst = 0.0, worst_x = 0.0;
  for (int rep = 0; rep < 128; ++rep) {
    x[0] = T(0);
    for (int64_t i = 1; i < n; ++i) x[i] = T(lo + (0.0 - lo) * double(rep * n + i) / (128.0 * n));
    const fastxent::BlockStat st = plain_block<T>(f, x.data(), e.data(), n);
    CHECK(st.m == 0.0, "%s: block max %g", table.name, st.m);
    long double sum = 0.0L;  // reference sum in extended precision
    for (int64_t i = 0; i < n; ++i) {
      const double ref = std::exp(double(x[i]));
      sum += std::exp(static_cast<long double>(x[i]));
      const double err = std::fabs(double(e[i]) - ref) / ulp_of<T>(ref);
      if (err > worst) {
        worst = err;
        worst_x = double(x[i]);
      }
    }
    // Bound: 16 float additions per lane per chunk (16 u) plus the exp error (2 ULP = 2 u
    // relative, u = 2^-24 or 2^-53) on a sum of positive terms.
    const double u = std::numeric_limits<T>::epsilon() / 2;
    CHECK(std::fabs(st.s - double(sum)) <= 18 * u * double(sum), "%s: block sum %.17g vs %.17g",
          table.name, st.s, double(sum));
  }
  std::printf("  exp<%s> [%s]: max error %.2f ULP (at x = %.9g)\n", sizeof(T) == 4 ? "f32" : "f64",
              table.name, worst, worst_x);
  CHECK(worst <= max_ulp_allowed, "%s exp error %.3f ULP > %.1f", table.name, worst,
        max_ulp_allowed);

  // Below the normal range the result flushes to +0; -inf gives 0; exp(0) is exactly 1.
  T special[4] = {T(0), T(lo) * T(1.01), -std::numeric_limits<T>::infinity(), T(-1)};
  T out[4];
  plain_block<T>(f, special, out, 4);
  CHECK(out[0] == T(1), "%s: exp(0) = %.17g", table.name, double(out[0]));
  CHECK(out[1] == T(0) && !std::signbit(out[1]), "%s: exp below range = %g", table.name,
        double(out[1]));
  CHECK(out[2] == T(0), "%s: exp(-inf) = %g", table.name, double(out[2]));
  // NaN propagates into the sum wherever it sits.
  for (int pos = 0; pos < 3; ++pos) {
    T v[3] = {T(0.5), T(-2), T(1)};
    v[pos] = std::numeric_limits<T>::quiet_NaN();
    const fastxent::BlockStat st = plain_block<T>(f, v, nullptr, 3);
    CHECK(std::isnan(st.s) || std::isnan(st.m), "%s: NaN at %d lost", table.name, pos);
  }
  // A block of -inf: m = -inf, s = 0; with a NaN among them, s = NaN.
  T ninf[3] = {-std::numeric_limits<T>::infinity(), -std::numeric_limits<T>::infinity(),
               -std::numeric_limits<T>::infinity()};
  CHECK(plain_block<T>(f, ninf, nullptr, 3).s == 0.0, "%s: -inf block sum", table.name);
  ninf[1] = std::numeric_limits<T>::quiet_NaN();
  CHECK(std::isnan(plain_block<T>(f, ninf, nullptr, 3).s), "%s: NaN in -inf block", table.name);
}

// The softcap through the block pass (alpha, cap): rho = 1 / (1 + exp(-|u|)), u = 2 alpha z /
// cap, stored at t, and e = exp(z' - m'), z' = cap tanh(u / 2). Errors against double from
// the kernel's own u = z * fl(2 alpha / cap) (exact in double): rho relative, tanh = 2 rho - 1
// and the chain factor 4 rho (1 - rho) = 1 - tanh^2 absolute, z' absolute over cap (through
// log e, so it includes the exp's error of up to 2.6 u relative on e, 2.6 u / cap here). In
// units of u = 2^-24 or 2^-53.
template <class T>
void test_softcap(const fastxent::KernelTable& table, T alpha, T cap, double bound_rho,
                  double bound_t, double bound_d, double bound_z) {
  const auto& f = fastxent::row_fns<T>(table);
  const int64_t n = fastxent::kBlock<T> - 3;
  std::vector<T> z(static_cast<size_t>(n)), e(z.size()), t(z.size());
  const double u = std::numeric_limits<T>::epsilon() / 2;
  const double inv = double(T(T(2) * alpha / cap));
  double w_rho = 0, w_t = 0, w_d = 0, w_z = 0;
  for (int rep = 0; rep < 16; ++rep) {
    // Logits from -40 cap / alpha to 40 cap / alpha, dense near 0 (where tanh ~ its argument).
    for (int64_t i = 0; i < n; ++i) {
      const double v = -1.0 + 2.0 * double(rep * n + i) / (16.0 * n);
      z[size_t(i)] = T(40.0 * v * v * v * double(cap) / double(alpha));
    }
    fastxent::BlockIn<T> in{};
    in.z = z.data();
    in.e = e.data();
    in.t = t.data();
    in.n = n;
    in.alpha = alpha;
    in.cap = cap;
    const fastxent::BlockStat st = f.block(in);
    for (int64_t i = 0; i < n; ++i) {
      // long double: the float64 kernel is measured against more than float64.
      using L = long double;
      const L uu = L(z[size_t(i)]) * L(inv);
      const L rho = 1 / (1 + std::exp(-std::fabs(uu))), th = std::tanh(std::fabs(uu) / 2);
      const L r = L(t[size_t(i)]);
      w_rho = std::max(w_rho, double(std::fabs(r - rho) / rho) / u);
      w_t = std::max(w_t, double(std::fabs((2 * r - 1) - th)) / u);
      w_d = std::max(w_d, double(std::fabs(4 * r * (1 - r) - (1 - th * th))) / u);
      const L zp = std::copysign(L(cap) * th, uu);
      w_z = std::max(w_z, double(std::fabs(std::log(L(e[size_t(i)])) + L(st.m) - zp) / L(cap)) / u);
    }
  }
  std::printf(
      "  softcap<%s> [%s] alpha %g cap %g: rho %.2f u rel, tanh %.2f u, 1 - tanh^2 "
      "%.2f u, z' %.2f u cap\n",
      sizeof(T) == 4 ? "f32" : "f64", table.name, double(alpha), double(cap), w_rho, w_t, w_d, w_z);
  CHECK(w_rho <= bound_rho && w_t <= bound_t && w_d <= bound_d && w_z <= bound_z,
        "%s softcap errors over their bounds", table.name);
}

// Straightforward double-precision reference of the whole contract.
template <class T>
double reference(const std::vector<T>& z, int64_t N, int64_t C, const std::vector<int64_t>& y,
                 const std::vector<T>* w, const fastxent::Options& o, std::vector<double>& g,
                 std::vector<double>& rows) {
  g.assign(size_t(N * C), 0.0);
  rows.assign(size_t(N), 0.0);
  double D = 0.0, total = 0.0, W = 0.0;
  for (int64_t c = 0; c < C; ++c) W += w ? double((*w)[c]) : 1.0;
  for (int64_t n = 0; n < N; ++n)
    if (y[n] != o.ignore_index) D += w ? double((*w)[y[n]]) : 1.0;
  const bool mean = o.reduction == fastxent::Reduction::Mean;
  const double s = mean ? (D > 0 ? 1.0 / D : 0.0) : 1.0;
  const double eps = o.label_smoothing;
  for (int64_t n = 0; n < N; ++n) {
    if (y[n] == o.ignore_index) continue;
    const T* r = z.data() + n * C;
    double m = -INFINITY, sum = 0.0;
    for (int64_t c = 0; c < C; ++c) m = std::max(m, double(r[c]));
    for (int64_t c = 0; c < C; ++c) sum += std::exp(double(r[c]) - m);
    const double lse = m + std::log(sum);
    const double wy = w ? double((*w)[y[n]]) : 1.0;
    double l = (1 - eps) * wy * (lse - double(r[y[n]]));
    for (int64_t c = 0; c < C; ++c)
      l += eps / double(C) * (w ? double((*w)[c]) : 1.0) * (lse - double(r[c]));
    rows[n] = l;
    total += l;
    const double Q = (1 - eps) * wy + eps / double(C) * W;
    for (int64_t c = 0; c < C; ++c) {
      const double q =
          (c == y[n] ? (1 - eps) * wy : 0.0) + eps / double(C) * (w ? double((*w)[c]) : 1.0);
      g[size_t(n * C + c)] = s * (Q * std::exp(double(r[c]) - lse) - q);
    }
  }
  return mean ? (D > 0 ? total / D : 0.0) : total;
}

template <class T>
void test_against_reference(const char* isa, std::mt19937_64& rng) {
  const double tol = sizeof(T) == 4 ? 2e-6 : 1e-13;  // relative, see the precision policy
  std::normal_distribution<double> nd(0.0, 3.0);
  const int64_t Cs[] = {1, 2, 7, 15, 16, 17, 33, 1000, 5003};
  for (int64_t C : Cs) {
    for (int red = 0; red < 3; ++red) {
      const int64_t N = 37;
      std::vector<T> z(static_cast<size_t>(N * C)), w(static_cast<size_t>(C));
      for (auto& v : z) v = T(nd(rng));
      for (auto& v : w) v = T(0.25 + std::fabs(nd(rng)));
      std::vector<int64_t> y(static_cast<size_t>(N));
      for (int64_t n = 0; n < N; ++n) y[n] = int64_t(rng() % uint64_t(C));
      y[3] = -100;  // ignored
      fastxent::Options o;
      o.reduction = fastxent::Reduction(red);
      o.label_smoothing = (C % 2) ? 0.1 : 0.0;
      const std::vector<T>* wp = (C % 3 == 0) ? &w : nullptr;
      std::vector<double> gref, rref;
      const double lref = reference(z, N, C, y, wp, o, gref, rref);
      std::vector<T> g(size_t(N * C), T(-7)), rows(static_cast<size_t>(N));
      const double l = fastxent::cross_entropy<T>(
          z.data(), N, C, C, y.data(), wp ? wp->data() : nullptr, o, g.data(), rows.data());
      double gmax = 0.0, gerr = 0.0;
      for (size_t i = 0; i < g.size(); ++i) {
        gmax = std::max(gmax, std::fabs(gref[i]));
        gerr = std::max(gerr, std::fabs(double(g[i]) - gref[i]));
      }
      CHECK(gerr <= tol * std::max(gmax, 1e-30) * 4, "[%s] C=%lld red=%d grad err %.3g (max %.3g)",
            isa, (long long)C, red, gerr, gmax);
      if (red == 0) {
        for (int64_t n = 0; n < N; ++n)
          CHECK(std::fabs(double(rows[n]) - rref[n]) <= tol * (1.0 + std::fabs(rref[n])),
                "[%s] C=%lld row %lld: %.10g vs %.10g", isa, (long long)C, (long long)n,
                double(rows[n]), rref[n]);
        CHECK(rows[3] == T(0), "ignored row loss");
      } else {
        CHECK(std::fabs(l - lref) <= tol * (1.0 + std::fabs(lref)),
              "[%s] C=%lld red=%d: %.12g vs %.12g", isa, (long long)C, red, l, lref);
      }
      for (int64_t c = 0; c < C; ++c) CHECK(g[size_t(3 * C + c)] == T(0), "ignored row gradient");

      // In place gives the same bits as out of place.
      std::vector<T> zi = z, rows2(static_cast<size_t>(N));
      const double l2 = fastxent::cross_entropy<T>(
          zi.data(), N, C, C, y.data(), wp ? wp->data() : nullptr, o, zi.data(), rows2.data());
      CHECK(std::memcmp(zi.data(), g.data(), sizeof(T) * g.size()) == 0 && l2 == l,
            "[%s] in place differs from out of place (C=%lld)", isa, (long long)C);
    }
  }
}

void test_errors() {
  std::vector<float> z(12, 1.0f), g(12, 5.0f);
  std::vector<int64_t> y = {0, 1, 7};  // 7 is out of range for C = 4
  fastxent::Options o;
  bool threw = false;
  try {
    fastxent::cross_entropy<float>(z.data(), 3, 4, 4, y.data(), nullptr, o, g.data(), nullptr);
  } catch (const std::out_of_range& e) {
    threw = std::string(e.what()).find("target[2] = 7") != std::string::npos;
  }
  CHECK(threw, "out-of-range target must throw std::out_of_range naming row and value");
  for (float v : g) CHECK(v == 5.0f, "nothing may be written on error");
  threw = false;
  try {
    fastxent::cross_entropy<float>(z.data(), 3, 0, 0, y.data(), nullptr, o, g.data(), nullptr);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  CHECK(threw, "C = 0 must throw std::invalid_argument");
  threw = false;
  o.label_smoothing = 1.5;
  try {
    y[2] = 1;
    fastxent::cross_entropy<float>(z.data(), 3, 4, 4, y.data(), nullptr, o, g.data(), nullptr);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  CHECK(threw, "label_smoothing outside [0, 1] must throw");
  bool bad_isa = false;
  try {
    fastxent::set_isa("no-such-isa");
  } catch (const std::invalid_argument&) {
    bad_isa = true;
  }
  CHECK(bad_isa, "unknown ISA must throw");
}

void test_threads_deterministic() {
  const int64_t N = 301, C = 1000;
  std::mt19937_64 rng(7);
  std::normal_distribution<float> nd(0.0f, 4.0f);
  std::vector<float> z(static_cast<size_t>(N * C));
  for (auto& v : z) v = nd(rng);
  std::vector<int64_t> y(static_cast<size_t>(N));
  for (auto& v : y) v = int64_t(rng() % C);
  std::vector<float> g1(z.size()), g2(z.size());
  fastxent::Options o;
  o.num_threads = 1;
  const double l1 =
      fastxent::cross_entropy<float>(z.data(), N, C, C, y.data(), nullptr, o, g1.data(), nullptr);
  for (int t : {2, 3, 4, 8}) {
    o.num_threads = t;
    const double l2 =
        fastxent::cross_entropy<float>(z.data(), N, C, C, y.data(), nullptr, o, g2.data(), nullptr);
    CHECK(l1 == l2 && std::memcmp(g1.data(), g2.data(), sizeof(float) * g1.size()) == 0,
          "results differ between 1 and %d threads", t);
  }
}

// float16 / bfloat16 conversions: every 16-bit pattern round-trips (NaN stays NaN), and every
// ISA rounds random float bit patterns exactly as the scalar build does.
void test_half_conversions() {
  const fastxent::KernelTable& ref = fastxent::scalar_table();
  std::vector<uint16_t> h(65536), back(65536);
  std::vector<float> f(65536);
  std::mt19937 rng(99);
  std::vector<float> rnd(1 << 16);
  for (auto& v : rnd) {
    uint32_t b = rng();
    std::memcpy(&v, &b, 4);
  }
  rnd[0] = 65519.99f;
  rnd[1] = 65520.0f;
  rnd[2] = 2.9802322e-08f;  // 2^-25: the tie below the smallest float16 subnormal
  rnd[3] = -0.0f;
  std::vector<uint16_t> a(rnd.size()), b(rnd.size());
  for (const std::string& isa : fastxent::available_isas()) {
    fastxent::set_isa(isa);
    const fastxent::KernelTable& t = fastxent::active_table();
    for (int kind = 0; kind < 2; ++kind) {
      const fastxent::Storage st =
          kind == 0 ? fastxent::Storage::Float16 : fastxent::Storage::BFloat16;
      for (uint32_t i = 0; i < 65536; ++i) h[i] = uint16_t(i);
      t.half_to_f32(h.data(), f.data(), 65536, st);
      t.f32_to_half(f.data(), back.data(), 65536, st);
      auto is_nan16 = [kind](uint16_t x) {
        return kind == 0 ? ((x & 0x7c00) == 0x7c00 && (x & 0x3ff) != 0)
                         : ((x & 0x7f80) == 0x7f80 && (x & 0x7f) != 0);
      };
      int bad = 0;
      for (uint32_t i = 0; i < 65536; ++i)
        bad += std::isnan(f[i]) ? !(is_nan16(h[i]) && is_nan16(back[i])) : back[i] != h[i];
      CHECK(bad == 0, "[%s] kind %d: %d patterns do not round-trip", isa.c_str(), kind, bad);
      t.f32_to_half(rnd.data(), a.data(), int64_t(rnd.size()), st);
      ref.f32_to_half(rnd.data(), b.data(), int64_t(rnd.size()), st);
      int diff = 0;
      for (size_t i = 0; i < rnd.size(); ++i) {
        const bool nan_a = is_nan16(a[i]), nan_b = is_nan16(b[i]);
        diff += (nan_a || nan_b) ? nan_a != nan_b : a[i] != b[i];
      }
      CHECK(diff == 0, "[%s] kind %d: %d roundings differ from the scalar build", isa.c_str(), kind,
            diff);
    }
  }
  // Spot values of the scalar rounding.
  uint16_t o[4];
  const float v[4] = {65519.99f, 65520.0f, 2.9802322e-08f, 1.0f + 1.0f / 2048};  // last: a tie
  ref.f32_to_half(v, o, 4, fastxent::Storage::Float16);
  CHECK(o[0] == 0x7bff && o[1] == 0x7c00 && o[2] == 0x0000 && o[3] == 0x3c00,
        "float16 rounding: %x %x %x %x", o[0], o[1], o[2], o[3]);
  fastxent::set_isa("auto");
}

// On aarch64 the NEON kernel is compiled in, usable, ranked above scalar and the default.
void test_isa_order() {
  const std::vector<std::string> isas = fastxent::available_isas();
  CHECK(!isas.empty() && isas.front() == "scalar", "scalar must come first (worst)");
  fastxent::set_isa("auto");
  CHECK(fastxent::active_isa() == isas.back(), "auto must pick the last (best) ISA");
#if defined(__aarch64__)
  CHECK(isas == std::vector<std::string>({"scalar", "neon"}), "aarch64: scalar, neon expected");
#endif
}

}  // namespace

int main() {
  std::mt19937_64 rng(12345);
  for (const std::string& isa : fastxent::available_isas()) {
    fastxent::set_isa(isa);
    std::printf("ISA %s\n", isa.c_str());
    const fastxent::KernelTable& t = fastxent::active_table();
    test_exp<float>(t, -87.33, 2.0);
    test_exp<double>(t, -708.3, 2.0);
    // Bounds derived in tests/test_options.py (rho 3.4 u, tanh 6.8 u, 1 - tanh^2 14.6 u, z'
    // 9.2 u cap plus the exp's 2.6 u / cap through log e).
    test_softcap<float>(t, 1.0f, 30.0f, 3.4, 6.8, 14.6, 9.3);
    test_softcap<float>(t, 0.7f, 5.0f, 3.4, 6.8, 14.6, 9.8);
    test_softcap<double>(t, 1.0, 30.0, 3.4, 6.8, 14.6, 9.3);
    // Above the fixed shift's range (kFixedShift): the block max shift.
    test_softcap<float>(t, 1.0f, 50.0f, 3.4, 6.8, 14.6, 9.3);
    test_softcap<double>(t, 1.0, 300.0, 3.4, 6.8, 14.6, 9.3);
    test_against_reference<float>(isa.c_str(), rng);
    test_against_reference<double>(isa.c_str(), rng);
    test_threads_deterministic();
  }
  test_isa_order();
  test_half_conversions();
  test_errors();
  std::printf("%d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
