// Exhaustive ULP check of the kernel's exp, per ISA this CPU runs (ctest cpp_exp_ulp).
// float32: every float x in [kF32Lo, -0] (about 1.1e9 values, plus +0 in every block) through
// each ISA's block pass (the variant that ISA ships: rr2-p6 for scalar and AVX2, lut16-p3 for
// AVX-512), against exp in double rounded to float, and every float below kF32Lo flushing to
// +0. double (taylor13): a dense sample of [kF64Lo, -0], against expl. Fails above 2 ULP;
// prints the max ULP per variant per ISA and a hash of every result (equal hashes: identical
// bits). Under a sanitizer or without optimisation it takes every 16th (64th) block instead;
// FASTXENT_EXP_ULP_STRIDE=k sets the stride (1: exhaustive).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "exp_coeffs.hpp"
#include "fastxent/fastxent.hpp"
#include "kernel_table.hpp"
#include "check.hpp"

#if defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(undefined_behavior_sanitizer)
#define FASTXENT_TEST_SANITIZED 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__)
#define FASTXENT_TEST_SANITIZED 1
#endif

namespace {

namespace xc = fastxent::exp_coeffs;

int64_t default_stride() {
  if (const char* s = std::getenv("FASTXENT_EXP_ULP_STRIDE")) {
    const long long k = std::atoll(s);
    if (k >= 1) return k;
  }
#if defined(FASTXENT_TEST_SANITIZED)
  return 16;
#elif !defined(NDEBUG)
  return 64;
#else
  return 1;
#endif
}

template <class T, class U>
U bits_of(T v) {
  U u;
  std::memcpy(&u, &v, sizeof u);
  return u;
}
template <class T, class U>
T from_bits(U u) {
  T v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}

// 1 / ulp(r) for a float r >= 0: 2^(23 - exponent), with 2^-149 below the normal range.
inline double inv_ulp_f32(float r) {
  const uint64_t e = bits_of<float, uint32_t>(r) >> 23;  // biased exponent
  return from_bits<double>((uint64_t(1023 + 150) - (e > 0 ? e : 1)) << 52);
}

// Order-independent hash of results: per block, the sum of each result's bits times an odd
// multiplier of its position, mixed with the block's first position (splitmix64's finaliser).
inline uint64_t mix(uint64_t h, uint64_t where) {
  uint64_t z = h + 0x9e3779b97f4a7c15ull * (where + 1);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

struct Worst {
  double ulp = 0.0, at = 0.0;
  uint64_t hash = 0, count = 0, flush_bad = 0, bad_max = 0;  // bad_max: blocks whose max != 0
  void merge(const Worst& o) {
    if (o.ulp > ulp) {
      ulp = o.ulp;
      at = o.at;
    }
    hash += o.hash;
    count += o.count;
    flush_bad += o.flush_bad;
    bad_max += o.bad_max;
  }
};

struct Isa {
  std::string name;
  const fastxent::KernelTable* table;
};

const char* f32_variant(const std::string& isa) { return isa == "avx512" ? "lut16-p3" : "rr2-p6"; }

// e = exp(x) for x[0 .. n) through the plain block pass (x[0] = 0 makes the block max 0).
template <class T>
bool block_exp(const fastxent::KernelTable& t, const T* x, T* e, int64_t n) {
  fastxent::BlockIn<T> in{};
  in.z = x;
  in.e = e;
  in.n = n;
  in.alpha = T(1);
  return fastxent::row_fns<T>(t).block(in).m == 0.0;
}

// Every float in [kF32Lo, -0]: block k holds +0 and the n - 1 floats of bit patterns
// 0x80000000 + k (n - 1) + j. Below kF32Lo (down to -inf), every result must be +0.
void test_f32(const std::vector<Isa>& isas, int64_t stride) {
  constexpr int64_t n = fastxent::kBlock<float>;
  constexpr int64_t per = n - 1;
  const uint64_t first = 0x80000000u, last = bits_of<float, uint32_t>(xc::kF32Lo);
  const uint64_t inf = bits_of<float, uint32_t>(-std::numeric_limits<float>::infinity());
  const int64_t in_range = int64_t(last - first + 1), below = int64_t(inf - last);
  const int64_t blocks = (in_range + per - 1) / per, blocks_below = (below + per - 1) / per;
  const size_t ni = isas.size();
  std::vector<Worst> worst(ni);
#pragma omp parallel
  {
    std::vector<float> x(n), e(n);
    std::vector<double> ref(n), iu(n);
    std::vector<Worst> mine(ni);
#pragma omp for schedule(dynamic, 16) nowait
    for (int64_t k = 0; k < blocks + blocks_below; k += stride) {
      const bool flush = k >= blocks;
      const uint64_t b0 = flush ? last + 1 + uint64_t(k - blocks) * per  // first below kF32Lo
                                : first + uint64_t(k) * per;
      const int64_t m = 1 + std::min<int64_t>(per, int64_t((flush ? inf : last) - b0 + 1));
      x[0] = 0.0f;
      for (int64_t j = 1; j < m; ++j) x[j] = from_bits<float>(uint32_t(b0 + uint64_t(j - 1)));
      if (!flush) {
        for (int64_t j = 0; j < m; ++j) {
          ref[j] = std::exp(double(x[j]));
          iu[j] = inv_ulp_f32(float(ref[j]));
        }
      }
      for (size_t i = 0; i < ni; ++i) {
        Worst& w = mine[i];
        w.bad_max += !block_exp<float>(*isas[i].table, x.data(), e.data(), m);
        if (flush) {
          for (int64_t j = 1; j < m; ++j) w.flush_bad += bits_of<float, uint32_t>(e[j]) != 0;
          continue;
        }
        double top = 0.0;
        uint64_t h = 0;
        for (int64_t j = 1; j < m; ++j) {
          top = std::max(top, std::fabs(double(e[j]) - ref[j]) * iu[j]);
          h += uint64_t(bits_of<float, uint32_t>(e[j])) * uint64_t(2 * j + 1);
        }
        w.hash += mix(h, b0);
        if (top > w.ulp) {
          for (int64_t j = 1; j < m; ++j) {
            if (std::fabs(double(e[j]) - ref[j]) * iu[j] == top) {
              w.ulp = top;
              w.at = double(x[j]);
              break;
            }
          }
        }
        w.count += uint64_t(m - 1);
        w.flush_bad += e[0] != 1.0f;  // exp(+0) = 1 exactly
      }
    }
#pragma omp critical
    for (size_t i = 0; i < ni; ++i) worst[i].merge(mine[i]);
  }
  for (size_t i = 0; i < ni; ++i) {
    const Worst& w = worst[i];
    std::printf(
        "  exp f32 %-8s [%s]: max %.3f ULP at x = %.9g over %llu floats of [%.9g, -0]"
        " (stride %lld), hash %016llx\n",
        f32_variant(isas[i].name), isas[i].name.c_str(), w.ulp, w.at, (unsigned long long)w.count,
        double(xc::kF32Lo), (long long)stride, (unsigned long long)w.hash);
    CHECK(w.ulp <= 2.0 && w.bad_max == 0,
          "[%s] exp f32 error %.3f ULP > 2 (or %llu blocks "
          "with a max other than 0)",
          isas[i].name.c_str(), w.ulp, (unsigned long long)w.bad_max);
    CHECK(w.flush_bad == 0, "[%s] %llu floats below kF32Lo (or +0) not flushed to +0 (or 1)",
          isas[i].name.c_str(), (unsigned long long)w.flush_bad);
    CHECK(stride > 1 || w.count == uint64_t(in_range), "[%s] %llu of %lld floats checked",
          isas[i].name.c_str(), (unsigned long long)w.count, (long long)in_range);
  }
}

// taylor13 on a dense sample of [kF64Lo, -0]: half uniform in bit pattern (every binade
// alike, down to the smallest negative double), half uniform in value; reference expl.
void test_f64(const std::vector<Isa>& isas, int64_t stride) {
  constexpr int64_t n = fastxent::kBlock<double>;
  constexpr int64_t per = n - 1;
  const int64_t blocks = int64_t(1) << 13;  // 2^13 blocks of 2047: 16.8M values
  const uint64_t first = uint64_t(1) << 63, last = bits_of<double, uint64_t>(xc::kF64Lo);
  const size_t ni = isas.size();
  std::vector<Worst> worst(ni);
#pragma omp parallel
  {
    std::vector<double> x(n), e(n);
    std::vector<long double> ref(n), ulp(n);
    std::vector<Worst> mine(ni);
#pragma omp for schedule(dynamic, 4) nowait
    for (int64_t k = 0; k < blocks; k += stride) {
      x[0] = 0.0;
      for (int64_t j = 1; j < n; ++j) {
        // A Weyl sequence: the fractional parts of i * (golden ratio) are spread evenly.
        const uint64_t i = uint64_t(k * per + j);
        const double u = double((i * 0x9e3779b97f4a7c15ull) >> 11) * 0x1p-53;  // [0, 1)
        x[j] = (i & 1) ? from_bits<double>(first + uint64_t(u * double(last - first)))
                       : xc::kF64Lo * u;
        ref[j] = std::exp(static_cast<long double>(x[j]));
        const double r = double(ref[j]);  // its ULP may be subnormal: no reciprocal
        ulp[j] = std::nextafter(r, std::numeric_limits<double>::infinity()) - r;
      }
      for (size_t i = 0; i < ni; ++i) {
        Worst& w = mine[i];
        w.bad_max += !block_exp<double>(*isas[i].table, x.data(), e.data(), n);
        uint64_t h = 0;
        for (int64_t j = 1; j < n; ++j) {
          const double err = double(std::fabs(static_cast<long double>(e[j]) - ref[j]) / ulp[j]);
          if (err > w.ulp) {
            w.ulp = err;
            w.at = x[j];
          }
          h += bits_of<double, uint64_t>(e[j]) * uint64_t(2 * j + 1);
        }
        w.hash += mix(h, uint64_t(k));
        w.count += uint64_t(per);
      }
    }
#pragma omp critical
    for (size_t i = 0; i < ni; ++i) worst[i].merge(mine[i]);
  }
  for (size_t i = 0; i < ni; ++i) {
    const Worst& w = worst[i];
    std::printf(
        "  exp f64 taylor13 [%s]: max %.3f ULP at x = %.17g over %llu sampled doubles"
        " of [%.17g, -0], hash %016llx\n",
        isas[i].name.c_str(), w.ulp, w.at, (unsigned long long)w.count, xc::kF64Lo,
        (unsigned long long)w.hash);
    CHECK(w.ulp <= 2.0 && w.bad_max == 0,
          "[%s] exp f64 error %.3f ULP > 2 (or %llu blocks "
          "with a max other than 0)",
          isas[i].name.c_str(), w.ulp, (unsigned long long)w.bad_max);
  }
}

}  // namespace

int main() {
  std::vector<Isa> isas;
  for (const std::string& isa : fastxent::available_isas()) {
    fastxent::set_isa(isa);
    isas.push_back({isa, &fastxent::active_table()});
  }
  fastxent::set_isa("auto");
  const int64_t stride = default_stride();
  test_f32(isas, stride);
  test_f64(isas, stride);
  std::printf("%d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
