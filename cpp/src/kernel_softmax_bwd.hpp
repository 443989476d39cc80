// The softmax backward's row operations: dot(a, b) (in double over float chunks) and
// out = p (g - d).
#pragma once

#include <cstdint>

#include "kernel_row.hpp"

#ifndef FASTXENT_ISA_NS
#error "define FASTXENT_ISA_NS (the ISA namespace) before including this header"
#endif

namespace fastxent {
namespace FASTXENT_ISA_NS {

template <class V>
inline double Row<V>::dot(const T* a, const T* b, int64_t n) {
  double total = 0.0;
  constexpr int64_t kChunk = 32 * W;
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const int64_t c1 = c0 + kChunk < n ? c0 + kChunk : n;
    R s0 = V::set1(T(0)), s1 = s0;
    int64_t i = c0;
    for (; i + 2 * W <= c1; i += 2 * W) {
      s0 = V::fmadd(V::load(a + i), V::load(b + i), s0);
      s1 = V::fmadd(V::load(a + i + W), V::load(b + i + W), s1);
    }
    for (; i < c1; i += W) s0 = V::fmadd(loadn(a + i, c1 - i), loadn(b + i, c1 - i), s0);
    total += V::hsum(V::add(s0, s1));
  }
  return total;
}

template <class V>
inline void Row<V>::mul_sub(const T* p, const T* g, T d, T* out, int64_t n) {
  const R vd = V::set1(d);
  for (int64_t i = 0; i < n; i += W) {
    const int64_t len = n - i < W ? n - i : W;
    storen(out + i, V::mul(loadn(p + i, len), V::sub(loadn(g + i, len), vd)), len);
  }
}

}  // namespace FASTXENT_ISA_NS
}  // namespace fastxent
