// softmax, log_softmax, logsumexp and softmax_backward: the same block pass as the loss
// (per-block (max, sum) merged in block order in double), then one elementwise pass.
#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "fastxent/fastxent.hpp"
#include "kernel_table.hpp"
#include "threads.hpp"

namespace fastxent {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

void check(int64_t rows, int64_t classes, int64_t row_stride, int num_threads) {
  if (classes <= 0) throw std::invalid_argument("the class axis has no classes (C = 0)");
  if (rows < 0) throw std::invalid_argument("negative number of rows");
  if (row_stride < classes)
    throw std::invalid_argument("row_stride must be at least the number of classes");
  if (num_threads < 0) throw std::invalid_argument("num_threads must be positive");
}

// Runs body(n) for every row, each row on one thread (static contiguous chunks).
template <class F>
void for_rows(int64_t rows, int64_t classes, int num_threads, F body) {
  int nt = detail::resolve_threads(num_threads, rows * classes);
  nt = int(std::min<int64_t>(nt, std::max<int64_t>(rows, 1)));
  if (nt <= 1) {
    for (int64_t n = 0; n < rows; ++n) body(n);
    return;
  }
#if defined(_OPENMP)
#pragma omp parallel for num_threads(nt) schedule(static)
#endif
  for (int64_t n = 0; n < rows; ++n) body(n);
}

// lse of one row; st receives the block statistics, e (optional) exp(x - m_block).
template <class T>
double row_lse(const RowFns<T>& f, const T* z, T* e, int64_t C, std::vector<BlockStat>& st,
               double* M_out = nullptr, double* S_out = nullptr) {
  const int64_t nb = (C + kBlock<T> - 1) / kBlock<T>;
  st.resize(size_t(nb));
  for (int64_t k = 0; k < nb; ++k) {
    BlockIn<T> in{};
    in.z = z + k * kBlock<T>;
    in.e = e ? e + k * kBlock<T> : nullptr;
    in.n = k + 1 < nb ? kBlock<T> : C - k * kBlock<T>;
    in.alpha = T(1);
    st[size_t(k)] = f.block(in);
  }
  double M = -kInf;
  bool nan = false;
  for (const BlockStat& b : st) {
    M = std::max(M, b.m);
    nan |= std::isnan(b.m) || std::isnan(b.s);
  }
  if (nan) return std::numeric_limits<double>::quiet_NaN();
  if (M == -kInf) return -kInf;
  double S = 0.0;
  for (const BlockStat& b : st)
    if (b.m != -kInf) S += b.s * std::exp(b.m - M);
  if (M_out) *M_out = M;
  if (S_out) *S_out = S;
  return M + std::log(S);
}

}  // namespace

template <class T>
void softmax(const T* x, int64_t rows, int64_t C, int64_t ld, T* out, bool log, int nt) {
  check(rows, C, ld, nt);
  const RowFns<T>& f = row_fns<T>(active_table());
  for_rows(rows, C, nt, [&](int64_t n) {
    thread_local std::vector<BlockStat> st;
    const T* z = x + n * ld;
    T* o = out + n * C;
    double M = 0.0, S = 1.0;
    const double lse = row_lse(f, z, log ? nullptr : o, C, st, &M, &S);
    const bool bad = std::isnan(lse) || lse == -kInf;  // NaN, or a row of all -inf: NaN out
    const int64_t nb = int64_t(st.size());
    for (int64_t k = 0; k < nb; ++k) {
      AffineIn<T> a{};
      a.n = k + 1 < nb ? kBlock<T> : C - k * kBlock<T>;
      a.g = o + k * kBlock<T>;
      if (log) {
        // (x - M) - log S, in two roundings as PyTorch: x - lse would lose log S next to a
        // huge M.
        a.e = z + k * kBlock<T>;
        a.a = T(1);
        a.b = bad ? std::numeric_limits<T>::quiet_NaN() : T(M);
        f.affine(a);
        a.e = a.g;
        a.b = bad ? T(0) : T(std::log(S));
      } else {
        // exp(x - m_k) * exp(m_k - M) / S (not exp(m_k - lse): lse rounds away log S when M is
        // huge).
        a.e = o + k * kBlock<T>;
        a.a = bad                        ? std::numeric_limits<T>::quiet_NaN()
              : st[size_t(k)].m == -kInf ? T(0)
                                         : T(std::exp(st[size_t(k)].m - M) / S);
        a.b = T(0);
      }
      f.affine(a);
    }
  });
}

template <class T>
void logsumexp(const T* x, int64_t rows, int64_t C, int64_t ld, T* out, int nt) {
  check(rows, C, ld, nt);
  const RowFns<T>& f = row_fns<T>(active_table());
  for_rows(rows, C, nt, [&](int64_t n) {
    thread_local std::vector<BlockStat> st;
    out[n] = T(row_lse(f, x + n * ld, static_cast<T*>(nullptr), C, st));
  });
}

template <class T>
void softmax_backward(const T* p, const T* g, int64_t rows, int64_t C, T* out, int nt) {
  check(rows, C, C, nt);
  const RowFns<T>& f = row_fns<T>(active_table());
  for_rows(rows, C, nt, [&](int64_t n) {
    const T* pr = p + n * C;
    const T* gr = g + n * C;
    f.mul_sub(pr, gr, T(f.dot(pr, gr, C)), out + n * C, C);
  });
}

#define FASTXENT_INSTANTIATE(T)                                                 \
  template void softmax<T>(const T*, int64_t, int64_t, int64_t, T*, bool, int); \
  template void logsumexp<T>(const T*, int64_t, int64_t, int64_t, T*, int);     \
  template void softmax_backward<T>(const T*, const T*, int64_t, int64_t, T*, int);
FASTXENT_INSTANTIATE(float)
FASTXENT_INSTANTIATE(double)
#undef FASTXENT_INSTANTIATE

}  // namespace fastxent
