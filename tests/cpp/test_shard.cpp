// C++ tests of the vocabulary-sharded statistics (fastxent/shard.hpp), no framework: each
// CHECK prints what failed; the exit code is nonzero on failure. For every ISA and both float
// types, a few shardings of a (rows, C) problem (block boundaries straddled, 1-column shards,
// one shard of everything) go through shard_stats, merge_stats (both orders, checked to be the
// same bits), stats_loss and shard_grad, and are compared with fastxent::cross_entropy on the
// full logits with the same options. Prints the measured errors.
//
// Tolerances: float64 1e-12, float32 30 u (u = 2^-24) plus 14 u cap + 13 u with a softcap,
// relative to max(|loss|, 1) for the loss and to max |grad| for the gradient: the bounds of
// tests/test_options.py (the sharded path runs the same block and affine passes, and merges
// block statistics in float64 as the kernel does). Measured: ~1e-15 (float64) and < 0.1 of
// the bound (float32).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "fastxent/fastxent.hpp"
#include "fastxent/shard.hpp"
#include "check.hpp"

namespace {

using Shards = std::vector<std::pair<int64_t, int64_t>>;
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr int NF = fastxent::kStatFields;

struct Case {
  const char* name;
  fastxent::Options opt;
  bool weights, probs, sample_weights;
};

template <class T>
struct Problem {
  int64_t N, C;
  std::vector<T> x, w, p, sw;
  std::vector<int64_t> y;
};

template <class T>
Problem<T> make_problem(std::mt19937_64& rng, int64_t N, int64_t C, const Shards& shards) {
  Problem<T> pr{N, C, {}, {}, {}, {}, {}};
  std::normal_distribution<double> nd(0.0, 3.0);
  std::uniform_real_distribution<double> ud(0.25, 2.0);
  for (int64_t i = 0; i < N * C; ++i) pr.x.push_back(T(nd(rng)));
  for (int64_t c = 0; c < C; ++c) pr.w.push_back(T(ud(rng)));
  for (int64_t i = 0; i < N * C; ++i) pr.p.push_back(T(ud(rng) - 0.25));
  for (int64_t n = 0; n < N; ++n) pr.sw.push_back(T(ud(rng)));
  // Targets at the first and last column of every shard, then ignored rows.
  for (int64_t n = 0; n < N; ++n) {
    const auto& s = shards[size_t(n / 2) % shards.size()];
    pr.y.push_back(n % 5 == 4 ? -100 : (n % 2 == 0 ? s.first : s.second - 1));
  }
  return pr;
}

template <class T>
fastxent::ShardInputs<T> shard_in(const Problem<T>& pr, const Case& cs, int64_t a, int64_t b) {
  fastxent::ShardInputs<T> in;
  in.logits = pr.x.data() + a;
  in.rows = pr.N;
  in.classes = b - a;
  in.row_stride = pr.C;  // a strided view of the full logits
  in.offset = a;
  in.num_classes = pr.C;
  if (cs.probs) {
    in.probs = pr.p.data() + a;
    in.probs_row_stride = pr.C;
  } else {
    in.target = pr.y.data();
  }
  in.weight = cs.weights ? pr.w.data() + a : nullptr;
  return in;
}

template <class T>
void run(const char* isa, std::mt19937_64& rng) {
  const char* tn = sizeof(T) == 4 ? "f32" : "f64";
  const double u = sizeof(T) == 4 ? std::ldexp(1.0, -24) : 0.0;
  const int64_t N = 10, C = 5000;
  const std::vector<Shards> shardings = {{{0, 5000}},
                                         {{0, 1}, {1, 2049}, {2049, 4097}, {4097, 5000}},
                                         {{0, 2047}, {2047, 2049}, {2049, 4999}, {4999, 5000}},
                                         {{0, 2500}, {2500, 2501}, {2501, 5000}}};
  std::vector<Case> cases;
  {
    fastxent::Options o;
    cases.push_back({"plain mean", o, false, false, false});
    o.reduction = fastxent::Reduction::Sum;
    o.label_smoothing = 0.1;
    cases.push_back({"weights+smoothing sum", o, true, false, false});
    o.reduction = fastxent::Reduction::None;
    o.z_loss = 1e-3;
    o.softcap = 5.0;
    o.logit_scale = 1.3;
    cases.push_back({"all none", o, true, false, true});
    o.reduction = fastxent::Reduction::Mean;
    o.has_normalizer = true;
    o.normalizer = 7.0;
    cases.push_back({"all mean normalizer", o, true, false, true});
    fastxent::Options q;
    q.label_smoothing = 0.2;
    cases.push_back({"probs smoothing mean", q, true, true, true});
  }
  double worst_l = 0, worst_g = 0;
  for (const Shards& shards : shardings) {
    const Problem<T> pr = make_problem<T>(rng, N, C, shards);
    for (const Case& cs : cases) {
      const fastxent::Options& opt = cs.opt;
      double tol = sizeof(T) == 4 ? 30 * u : 1e-12;
      if (sizeof(T) == 4 && opt.softcap > 0) tol += 14 * u * opt.softcap + 13 * u;
      // The kernel on the full logits.
      fastxent::Inputs<T> fin;
      fin.logits = pr.x.data();
      fin.rows = N;
      fin.classes = C;
      fin.row_stride = C;
      if (cs.probs) {
        fin.probs = pr.p.data();
        fin.probs_row_stride = C;
      } else {
        fin.target = pr.y.data();
      }
      fin.weight = cs.weights ? pr.w.data() : nullptr;
      fin.sample_weight = cs.sample_weights ? pr.sw.data() : nullptr;
      std::vector<T> kg(static_cast<size_t>(N * C)), krl(static_cast<size_t>(N));
      const double kloss = fastxent::cross_entropy<T>(fin, opt, kg.data(), krl.data());
      // The sharded computation: statistics, merged in both orders.
      std::vector<std::vector<double>> st;
      for (const auto& s : shards) {
        st.emplace_back(size_t(N * NF));
        fastxent::shard_stats<T>(shard_in(pr, cs, s.first, s.second), opt, st.back().data());
      }
      std::vector<double> fwd = st[0], rev = st.back();
      for (size_t i = 1; i < st.size(); ++i) {
        fastxent::merge_stats(fwd.data(), st[i].data(), N, fwd.data());
        fastxent::merge_stats(st[st.size() - 1 - i].data(), rev.data(), N, rev.data());
      }
      if (st.size() >= 2) {
        std::vector<double> ab(static_cast<size_t>(N * NF)), ba(static_cast<size_t>(N * NF));
        fastxent::merge_stats(st[0].data(), st[1].data(), N, ab.data());
        fastxent::merge_stats(st[1].data(), st[0].data(), N, ba.data());
        CHECK(std::memcmp(ab.data(), ba.data(), sizeof(double) * ab.size()) == 0,
              "[%s %s] %s: merge_stats not commutative bit for bit", isa, tn, cs.name);
      }
      std::vector<double> sw(pr.sw.begin(), pr.sw.end());
      const double* swp = cs.sample_weights ? sw.data() : nullptr;
      std::vector<double> rl(static_cast<size_t>(N)), rl2(static_cast<size_t>(N));
      const double loss = fastxent::stats_loss(fwd.data(), N, swp, opt, C, rl.data());
      const double loss2 = fastxent::stats_loss(rev.data(), N, swp, opt, C, rl2.data());
      CHECK(std::fabs(loss - loss2) <= 1e-14 * std::max(std::fabs(loss), 1.0),
            "[%s %s] %s: merge order moves the loss: %.17g vs %.17g", isa, tn, cs.name, loss,
            loss2);
      // Gradients of every shard, from the merged statistics, into the full layout.
      std::vector<T> g(static_cast<size_t>(N * C));
      for (const auto& s : shards) {
        const int64_t cs_ = s.second - s.first;
        std::vector<T> gs(static_cast<size_t>(N * cs_));
        fastxent::shard_grad<T>(shard_in(pr, cs, s.first, s.second), fwd.data(),
                                cs.sample_weights ? pr.sw.data() : nullptr, opt, 1.0, gs.data());
        for (int64_t n = 0; n < N; ++n)
          std::copy(gs.begin() + n * cs_, gs.begin() + (n + 1) * cs_, g.begin() + n * C + s.first);
      }
      double el = 0, eg = 0, gmax = 0;
      if (opt.reduction == fastxent::Reduction::None) {
        for (int64_t n = 0; n < N; ++n)
          el = std::max(el, std::fabs(rl[size_t(n)] - double(krl[size_t(n)])) /
                                std::max(std::fabs(double(krl[size_t(n)])), 1.0));
      } else {
        el = std::fabs(loss - kloss) / std::max(std::fabs(kloss), 1.0);
      }
      for (int64_t i = 0; i < N * C; ++i) {
        gmax = std::max(gmax, std::fabs(double(kg[size_t(i)])));
        eg = std::max(eg, std::fabs(double(g[size_t(i)]) - double(kg[size_t(i)])));
      }
      eg /= gmax;
      worst_l = std::max(worst_l, el / tol);
      worst_g = std::max(worst_g, eg / tol);
      CHECK(el <= tol, "[%s %s] %s, %zu shards: loss error %.3g > %.3g", isa, tn, cs.name,
            shards.size(), el, tol);
      CHECK(eg <= tol, "[%s %s] %s, %zu shards: gradient error %.3g > %.3g", isa, tn, cs.name,
            shards.size(), eg, tol);
      // Every row's statistics cover the vocabulary once; counted rows once.
      for (int64_t n = 0; n < N; ++n) {
        CHECK(fwd[size_t(n * NF + fastxent::kStatColumns)] == double(C), "columns");
        const bool counted = cs.probs || pr.y[size_t(n)] != opt.ignore_index;
        CHECK(fwd[size_t(n * NF + fastxent::kStatCount)] == (counted ? 1.0 : 0.0), "count");
      }
    }
  }
  std::printf("  [%s %s] worst loss error %.3g of the bound, gradient %.3g\n", isa, tn, worst_l,
              worst_g);
}

template <class E, class F>
bool throws(F&& f) {
  try {
    f();
  } catch (const E&) {
    return true;
  } catch (...) {
    return false;
  }
  return false;
}

void test_errors() {
  const int64_t N = 3, C = 10;
  std::vector<float> x(size_t(N * C), 0.5f);
  std::vector<int64_t> y = {0, 9, -100};
  fastxent::Options opt;
  fastxent::ShardInputs<float> in;
  in.logits = x.data();
  in.rows = N;
  in.classes = 4;
  in.row_stride = C;
  in.offset = 0;
  in.num_classes = C;
  in.target = y.data();
  const size_t ns = static_cast<size_t>(N * NF);
  std::vector<double> s0(ns, -7.0), s1(ns), m(ns);
  fastxent::shard_stats<float>(in, opt, s0.data());
  fastxent::ShardInputs<float> in1 = in;
  in1.logits = x.data() + 4;
  in1.classes = 6;
  in1.offset = 4;
  fastxent::shard_stats<float>(in1, opt, s1.data());
  fastxent::merge_stats(s0.data(), s1.data(), N, m.data());
  std::vector<double> keep(size_t(N * NF), -7.0);
  std::vector<float> g(size_t(N * 4), 3.0f);
  auto untouched = [&] {
    return std::all_of(g.begin(), g.end(), [](float v) { return v == 3.0f; });
  };

  fastxent::ShardInputs<float> bad = in;
  bad.offset = 7;  // [7, 11) does not fit in 10
  CHECK(throws<std::invalid_argument>([&] { fastxent::shard_stats<float>(bad, opt, keep.data()); }),
        "a shard outside the vocabulary must throw");
  CHECK(std::all_of(keep.begin(), keep.end(), [](double v) { return v == -7.0; }),
        "shard_stats wrote on error");
  CHECK(throws<std::invalid_argument>(
            [&] { fastxent::shard_grad<float>(bad, m.data(), nullptr, opt, 1.0, g.data()); }),
        "shard_grad: a shard outside the vocabulary must throw");
  bad = in;
  bad.offset = -1;
  CHECK(throws<std::invalid_argument>([&] { fastxent::shard_stats<float>(bad, opt, keep.data()); }),
        "a negative offset must throw");
  std::vector<int64_t> ybad = {0, 10, -100};
  bad = in;
  bad.target = ybad.data();
  CHECK(throws<std::out_of_range>([&] { fastxent::shard_stats<float>(bad, opt, keep.data()); }),
        "a target >= num_classes must throw std::out_of_range");
  CHECK(throws<std::out_of_range>(
            [&] { fastxent::shard_grad<float>(bad, m.data(), nullptr, opt, 1.0, g.data()); }),
        "shard_grad: a target >= num_classes must throw std::out_of_range");
  // Statistics of one shard only, or merged twice.
  std::vector<double> twice(static_cast<size_t>(N * NF));
  fastxent::merge_stats(m.data(), s1.data(), N, twice.data());
  std::vector<double> rl(static_cast<size_t>(N));
  for (const std::vector<double>* st : {&s0, &s1, &twice}) {
    CHECK(throws<std::invalid_argument>(
              [&] { fastxent::stats_loss(st->data(), N, nullptr, opt, C, rl.data()); }),
          "stats_loss must reject statistics that do not cover num_classes");
    CHECK(throws<std::invalid_argument>(
              [&] { fastxent::shard_grad<float>(in, st->data(), nullptr, opt, 1.0, g.data()); }),
          "shard_grad must reject statistics that do not cover num_classes");
  }
  CHECK(throws<std::invalid_argument>(
            [&] { fastxent::shard_grad<float>(in, m.data(), nullptr, opt, kNaN, g.data()); }),
        "shard_grad must reject a non-finite scale");
  // The target says row 2 counts; the statistics (ignore_index -100) say it does not.
  std::vector<int64_t> y2 = {0, 9, 3};
  fastxent::ShardInputs<float> other = in;
  other.target = y2.data();
  CHECK(throws<std::invalid_argument>(
            [&] { fastxent::shard_grad<float>(other, m.data(), nullptr, opt, 1.0, g.data()); }),
        "shard_grad must reject statistics computed with another target / ignore_index");
  CHECK(untouched(), "shard_grad wrote on error");
  // The good call works (and writes).
  fastxent::shard_grad<float>(in, m.data(), nullptr, opt, 1.0, g.data());
  CHECK(!untouched(), "shard_grad did not write");
}

// Output statistics (shard_stats' fourth argument, merge_output_stats): the whole row's lse
// and argmax as the one-machine RowOutputs, the argmax merge rules, and no write on error.
void test_output_stats() {
  const int64_t N = 4, C = 10;
  constexpr int OF = fastxent::kOutFields;
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> x = {
      1,    3,    0,    3,    3,    0,    0,    0,    0,    0,  // tie across shards: index 1
      0,    0,    0,    0,    0,    0,    7,    0,    0,    0,  // the max in the second shard
      0,    0,    0,    0,    0,    0,    0,    0,    0,    0,  // a NaN at 6 (below): index 6
      -inf, -inf, -inf, -inf, -inf, -inf, -inf, -inf, -inf, -inf};
  x[size_t(2 * C + 6)] = std::numeric_limits<float>::quiet_NaN();
  std::vector<int64_t> y = {1, 6, -100, 2};
  fastxent::Options opt;
  fastxent::ShardInputs<float> in[2];
  for (int k = 0; k < 2; ++k) {
    in[k].logits = x.data() + 4 * k;
    in[k].rows = N;
    in[k].classes = k == 0 ? 4 : 6;
    in[k].row_stride = C;
    in[k].offset = 4 * k;
    in[k].num_classes = C;
    in[k].target = y.data();
  }
  std::vector<double> s(size_t(N * NF)), o0(size_t(N * OF)), o1(size_t(N * OF));
  std::vector<double> ab(size_t(N * OF)), ba(size_t(N * OF));
  fastxent::shard_stats<float>(in[0], opt, s.data(), o0.data());
  fastxent::shard_stats<float>(in[1], opt, s.data(), o1.data());
  fastxent::merge_output_stats(o0.data(), o1.data(), N, ab.data());
  fastxent::merge_output_stats(o1.data(), o0.data(), N, ba.data());
  CHECK(std::memcmp(ab.data(), ba.data(), sizeof(double) * ab.size()) == 0,
        "merge_output_stats must be commutative bit for bit");
  fastxent::Inputs<float> full;
  full.logits = x.data();
  full.rows = N;
  full.classes = C;
  full.row_stride = C;
  full.target = y.data();
  std::vector<float> lse(static_cast<size_t>(N));
  std::vector<int64_t> am(static_cast<size_t>(N));
  fastxent::RowOutputs<float> ro;
  ro.lse = lse.data();
  ro.argmax = am.data();
  fastxent::Options none;
  none.reduction = fastxent::Reduction::Sum;
  fastxent::cross_entropy<float>(full, none, nullptr, nullptr, &ro);
  const int64_t want[N] = {1, 6, 6, 0};
  for (int64_t n = 0; n < N; ++n) {
    const double* r = ab.data() + n * OF;
    CHECK(r[fastxent::kOutArgIdx] == double(am[size_t(n)]) && am[size_t(n)] == want[n],
          "row %lld: merged argmax %g, one machine %lld", static_cast<long long>(n),
          r[fastxent::kOutArgIdx], static_cast<long long>(am[size_t(n)]));
    CHECK(r[fastxent::kOutColumns] == double(C), "row %lld: columns", static_cast<long long>(n));
    const double l = r[fastxent::kOutMax] + std::log(r[fastxent::kOutSumExp]);
    CHECK((std::isnan(l) && std::isnan(lse[size_t(n)])) || l == double(lse[size_t(n)]) ||
              std::fabs(float(l) - lse[size_t(n)]) <= 1e-6f * std::fabs(lse[size_t(n)]),
          "row %lld: merged lse %g, one machine %g", static_cast<long long>(n), l,
          double(lse[size_t(n)]));
  }
  CHECK(ab[size_t(2 * OF + fastxent::kOutNaN)] == 1.0, "the NaN row must be flagged");
  CHECK(ab[size_t(0 * OF + fastxent::kOutZy)] == 3.0, "row 0: z'_y from the owning shard");
  // A bad call writes neither result.
  std::vector<double> keep(size_t(N * NF), -7.0), okeep(size_t(N * OF), -7.0);
  std::vector<int64_t> ybad = {0, 10, -100, 0};
  fastxent::ShardInputs<float> bad = in[0];
  bad.target = ybad.data();
  CHECK(throws<std::out_of_range>(
            [&] { fastxent::shard_stats<float>(bad, opt, keep.data(), okeep.data()); }),
        "a target >= num_classes must throw std::out_of_range");
  CHECK(std::all_of(keep.begin(), keep.end(), [](double v) { return v == -7.0; }) &&
            std::all_of(okeep.begin(), okeep.end(), [](double v) { return v == -7.0; }),
        "shard_stats wrote on error");
}

}  // namespace

int main() {
  std::mt19937_64 rng(2024);
  for (const std::string& isa : fastxent::available_isas()) {
    fastxent::set_isa(isa);
    std::printf("ISA %s\n", isa.c_str());
    run<float>(isa.c_str(), rng);
    run<double>(isa.c_str(), rng);
  }
  fastxent::set_isa("auto");
  test_errors();
  test_output_stats();
  std::printf("%d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
