// The ISA-neutral interface of the sigmoid (binary / multi-label) cross-entropy kernels
// (sigmoid_impl.hpp, compiled once per ISA; the driver is sigmoid.cpp).
#pragma once

#include <cstdint>

namespace fastxent {

// One contiguous run of elements. p and w, when not null, are aligned with x (the driver
// hands out runs that never cross a period of a broadcast pos_weight / weight).
template <class T>
struct SigmoidSeg {
  const T* x;  // logits
  const T* y;  // targets
  const T* p;  // pos_weight per element, or null (1)
  const T* w;  // weight per element, or null (1)
  int64_t n;
  T* loss;   // per-element losses, or null
  T* grad;   // gradient, or null; may equal x (in place)
  T gscale;  // gradient factor (1/n for "mean", else 1)
};

template <class T>
struct SigmoidFns {
  // Writes what seg asks for; returns the sum of the run's element losses (in double).
  double (*seg)(const SigmoidSeg<T>& seg);
  // out[i] = log1p(e[i]) for e in [0, 1]: the vectorised helper itself, for the tests.
  void (*log1p01)(const T* e, T* out, int64_t n);
};

}  // namespace fastxent
