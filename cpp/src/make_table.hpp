// The last include of each isa_<name>.cpp: checks that ISA's traits against the contract
// (kernel_contract.hpp), gathers its kernels into its KernelTable and defines <name>_table()
// (name = FASTXENT_ISA_NS, an entry of isa_list.hpp).
#pragma once

#include "distill_impl.hpp"
#include "half_impl.hpp"
#include "kernel_contract.hpp"
#include "kernel_impl.hpp"
#include "sigmoid_impl.hpp"

namespace fastxent {
namespace FASTXENT_ISA_NS {

static_assert(check_traits<VF>() && check_traits<VD>(), "the traits meet the contract");
static_assert(std::is_same_v<typename VF::T, float> && std::is_same_v<typename VD::T, double>,
              "VF holds floats, VD doubles");

inline KernelTable make_table(const char* name) {
  return {name,
          Row<VF>::fns(),
          Row<VD>::fns(),
          &V_fence,
          Sigmoid<VF>::fns(),
          Sigmoid<VD>::fns(),
          Distill<VF>::fns(),
          Distill<VD>::fns(),
          &Half<VF>::to_f32,
          &Half<VF>::from_f32,
          prefers_streaming_stores<VF>()};
}

}  // namespace FASTXENT_ISA_NS
}  // namespace fastxent

#define FASTXENT_TABLE_STR2(x) #x
#define FASTXENT_TABLE_STR(x) FASTXENT_TABLE_STR2(x)
#define FASTXENT_TABLE_FN2(x) x##_table
#define FASTXENT_TABLE_FN(x) FASTXENT_TABLE_FN2(x)

const fastxent::KernelTable& fastxent::FASTXENT_TABLE_FN(FASTXENT_ISA_NS)() {
  static const KernelTable table = FASTXENT_ISA_NS::make_table(FASTXENT_TABLE_STR(FASTXENT_ISA_NS));
  return table;
}
