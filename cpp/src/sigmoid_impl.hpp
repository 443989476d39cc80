// Sigmoid cross-entropy kernels, written once over the vector traits (see kernel_impl.hpp).
#pragma once

#include "kernel_impl.hpp"
#include "sigmoid_table.hpp"

#ifndef FASTXENT_ISA_NS
#error "define FASTXENT_ISA_NS (the ISA namespace) before including this header"
#endif

namespace fastxent {
namespace FASTXENT_ISA_NS {

template <class V>
struct Sigmoid {
  static SigmoidFns<typename V::T> fns() { return {nullptr}; }
};

}  // namespace FASTXENT_ISA_NS
}  // namespace fastxent
