// The last include of each isa_*.cpp: gathers that ISA's kernels into its KernelTable.
#pragma once

#include "half_impl.hpp"
#include "kernel_impl.hpp"
#include "sigmoid_impl.hpp"

namespace fastxent {
namespace FASTXENT_ISA_NS {

inline KernelTable make_table(const char* name) {
  return {name,          Row<VF>::fns(),        Row<VD>::fns(),      &V_fence,
          Sigmoid<VF>::fns(), Sigmoid<VD>::fns(), &Half<VF>::to_f32, &Half<VF>::from_f32};
}

}  // namespace FASTXENT_ISA_NS
}  // namespace fastxent
