// The row kernel, written once over a vector-traits type (VF for float, VD for double) and
// compiled once per ISA: each isa_*.cpp defines FASTXENT_ISA_NS, includes its traits header
// and then this file, so every symbol here lives in an ISA-specific namespace (an inline
// function compiled with AVX-512 flags can never be picked by the linker for an AVX2 caller).
//
//   The kernel's parts, one file each: kernel_caps.hpp (capability detectors, prefetch,
//   in_register), kernel_exp.hpp (exp and the softcap's logistic), kernel_row.hpp (Row and its
//   per-element helpers), kernel_block.hpp (the block pass), kernel_grad.hpp (the gradient
//   pass), kernel_softmax_bwd.hpp (the softmax backward), kernel_col.hpp (the column kernel),
//   kernel_log.hpp (log, and the per-row log and exp of the column path's finish).
//   This file includes them all and gathers the row functions (Row<V>::fns).
//
// Precision policy
// - max: exact (in the storage type).
// - exp(z - m): see kernel_exp.hpp.
// - sums of exp and of w*(z - m): vector accumulators in the storage type over chunks of
//   32 W elements (16 additions per lane), each chunk's total added into a double; blocks
//   (kBlock<T>) and rows are merged in double.
// - gradient: a * e - b * w in the storage type with a, b computed in double and rounded once.
//   The driver recomputes the target-class entry in double (see cross_entropy.cpp).
//
// Expects the traits VF, VD of the same namespace to be declared first.
#pragma once

#include "isa_ns.hpp"
#include "kernel_block.hpp"
#include "kernel_col.hpp"
#include "kernel_grad.hpp"
#include "kernel_log.hpp"
#include "kernel_softmax_bwd.hpp"

namespace fastxent {
namespace FASTXENT_ISA_NS {

template <class V>
RowFns<typename V::T> Row<V>::fns() {
  return {&Row::block, &Row::block_rows, &Row::affine,      &Col<V>::stats,   &Col<V>::affine,
          &Row::dot,   &Row::mul_sub,    &RowMath<VD>::log, &RowMath<VD>::exp};
}

}  // namespace FASTXENT_ISA_NS
}  // namespace fastxent
