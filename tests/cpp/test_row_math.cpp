// The per-row log and exp of the column and short-row paths (RowFns::row_log / row_exp,
// kernel_log.hpp), per ISA this CPU runs (ctest cpp_row_math): against long double on a dense
// sample of their vectorised domains, log on [1, 2^64) and exp on [kF64Lo, 0] (fails above
// 2 ULP); exactly std::log / std::exp outside them (rows of -inf, NaN, the softcap's fixed
// shift); and every length from 0 to a few vectors, with nothing written past n.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "check.hpp"
#include "exp_coeffs.hpp"
#include "fastxent/fastxent.hpp"
#include "kernel_table.hpp"

namespace {

namespace xc = fastxent::exp_coeffs;
constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

uint64_t bits(double v) {
  uint64_t u;
  std::memcpy(&u, &v, sizeof u);
  return u;
}
double from_bits(uint64_t u) {
  double v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}

// A Weyl sequence in [0, 1): the fractional parts of i * (golden ratio), spread evenly.
double weyl(uint64_t i) { return double((i * 0x9e3779b97f4a7c15ull) >> 11) * 0x1p-53; }

// |got - ref| in ULP of ref rounded to double (0 where both are exactly 0).
double ulp_error(double got, long double ref) {
  const double r = double(ref);
  if (got == 0.0 && ref == 0.0L) return 0.0;
  const double u = std::nextafter(std::fabs(r), kInf) - std::fabs(r);
  return double(std::fabs(static_cast<long double>(got) - ref) / u);
}

using Fn = void (*)(const double*, double*, int64_t);

struct Worst {
  double ulp = 0.0, at = 0.0;
  void see(double err, double x) {
    if (err > ulp || std::isnan(err)) {
      ulp = std::isnan(err) ? kInf : err;
      at = x;
    }
  }
};

// log on [1, 2^64): half uniform in bit pattern (every binade alike), half uniform in value
// on [1, 64] (a row's sum of exponentials relative to its max is in [1, C]), plus 1 + k ulp.
void test_log(const std::string& isa, Fn f) {
  constexpr int64_t n = 1 << 21;
  std::vector<double> x(n), out(n);
  const uint64_t lo = bits(1.0), hi = bits(0x1p64);
  for (int64_t i = 0; i < n; ++i) {
    const double u = weyl(uint64_t(i) + 1);
    if (i < 64) x[i] = from_bits(lo + uint64_t(i));  // 1 and its next 63 doubles
    else if (i & 1) x[i] = from_bits(lo + uint64_t(u * double(hi - lo)));
    else x[i] = 1.0 + 63.0 * u;
  }
  f(x.data(), out.data(), n);
  Worst w;
  for (int64_t i = 0; i < n; ++i)
    w.see(ulp_error(out[i], std::log(static_cast<long double>(x[i]))), x[i]);
  std::printf("  row_log [%s]: max %.3f ULP at x = %.17g over %lld doubles of [1, 2^64)\n",
              isa.c_str(), w.ulp, w.at, (long long)n);
  CHECK(w.ulp <= 2.0, "[%s] row_log error %.3f ULP > 2 at x = %.17g", isa.c_str(), w.ulp, w.at);
  CHECK(out[0] == 0.0 && !std::signbit(out[0]), "[%s] row_log(1) = %.17g, not +0", isa.c_str(),
        out[0]);
}

// exp on [kF64Lo, 0]: half uniform in bit pattern, half uniform in value.
void test_exp(const std::string& isa, Fn f) {
  constexpr int64_t n = 1 << 21;
  std::vector<double> x(n), out(n);
  const uint64_t first = uint64_t(1) << 63, last = bits(xc::kF64Lo);
  for (int64_t i = 0; i < n; ++i) {
    const double u = weyl(uint64_t(i) + 1);
    x[i] = (i & 1) ? from_bits(first + uint64_t(u * double(last - first))) : xc::kF64Lo * u;
  }
  x[0] = 0.0;
  x[2] = -0.0;
  f(x.data(), out.data(), n);
  Worst w;
  for (int64_t i = 0; i < n; ++i)
    w.see(ulp_error(out[i], std::exp(static_cast<long double>(x[i]))), x[i]);
  std::printf("  row_exp [%s]: max %.3f ULP at x = %.17g over %lld doubles of [%.17g, 0]\n",
              isa.c_str(), w.ulp, w.at, (long long)n, xc::kF64Lo);
  CHECK(w.ulp <= 2.0, "[%s] row_exp error %.3f ULP > 2 at x = %.17g", isa.c_str(), w.ulp, w.at);
  CHECK(out[0] == 1.0 && out[2] == 1.0, "[%s] row_exp(+-0) = %.17g, %.17g, not 1", isa.c_str(),
        out[0], out[2]);
}

// Outside the vectorised domains the values are std::log's / std::exp's, bit for bit, in any
// lane position (each value at every offset of a run of 19, so through full and partial
// vectors of every width).
void test_fallbacks(const std::string& isa, Fn flog, Fn fexp) {
  const double logs[] = {0.0,  -0.0, 0.5,  1.0 - 0x1p-53, 0x1p64,    1e300,
                         kInf, -1.0, kNaN, -kInf,         0x1p-1074, 0x1p-1022};
  const double exps[] = {0x1p-60, 0.5,    30.0,   88.0,   256.0, 709.0, 710.0,
                         kInf,    -709.0, -745.0, -746.0, -kInf, kNaN,  xc::kF64Lo - 0x1p-40};
  constexpr int64_t run = 19;
  auto check = [&](Fn f, const double* vals, size_t nv, bool is_log) {
    for (size_t v = 0; v < nv; ++v)
      for (int64_t at = 0; at < run; ++at) {
        std::vector<double> x(run, is_log ? 3.0 : -1.0), out(run);
        x[size_t(at)] = vals[v];
        f(x.data(), out.data(), run);
        const double want = is_log ? std::log(vals[v]) : std::exp(vals[v]);
        const bool same = bits(out[size_t(at)]) == bits(want) ||
                          (std::isnan(want) && std::isnan(out[size_t(at)]));
        CHECK(same, "[%s] %s(%.17g) at lane %lld = %.17g, std:: gives %.17g", isa.c_str(),
              is_log ? "row_log" : "row_exp", vals[v], (long long)at, out[size_t(at)], want);
      }
  };
  check(flog, logs, sizeof logs / sizeof logs[0], true);
  check(fexp, exps, sizeof exps / sizeof exps[0], false);
}

// Every length from 0 to 40: the first n outputs are written (equal to one long call's) and
// nothing after them.
void test_lengths(const std::string& isa, Fn f, double base) {
  constexpr int64_t most = 40;
  std::vector<double> x(most), full(most);
  for (int64_t i = 0; i < most; ++i) x[size_t(i)] = base * (1.0 + 0.37 * double(i));
  f(x.data(), full.data(), most);
  for (int64_t n = 0; n <= most; ++n) {
    std::vector<double> out(most + 8, -7.0);
    f(x.data(), out.data(), n);
    bool ok = true;
    for (int64_t i = 0; i < n; ++i) ok &= bits(out[size_t(i)]) == bits(full[size_t(i)]);
    for (int64_t i = n; i < most + 8; ++i) ok &= out[size_t(i)] == -7.0;
    CHECK(ok, "[%s] length %lld (base %g): wrong values or a write past n", isa.c_str(),
          (long long)n, base);
  }
}

}  // namespace

int main() {
  for (const std::string& isa : fastxent::available_isas()) {
    fastxent::set_isa(isa);
    const fastxent::KernelTable& t = fastxent::active_table();
    std::printf("ISA %s\n", isa.c_str());
    test_log(isa, t.f64.row_log);
    test_exp(isa, t.f64.row_exp);
    test_fallbacks(isa, t.f64.row_log, t.f64.row_exp);
    test_lengths(isa, t.f64.row_log, 1.5);
    test_lengths(isa, t.f64.row_exp, -0.3);
    // The float rows' table holds the same double functions.
    CHECK(t.f32.row_log == t.f64.row_log && t.f32.row_exp == t.f64.row_exp,
          "[%s] the f32 and f64 tables' row_log / row_exp differ", isa.c_str());
  }
  fastxent::set_isa("auto");
  std::printf("%d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
