// The ISA-neutral interface of the sigmoid (binary / multi-label) cross-entropy kernels.
#pragma once

#include <cstdint>

namespace fastxent {

template <class T>
struct SigmoidFns {
  // TODO(sigmoid): the per-ISA entry points of the sigmoid cross-entropy.
  void (*unused)();
};

}  // namespace fastxent
