// The portable fallback: the kernel of kernel_impl.hpp over one-lane "vectors".
#define FASTXENT_ISA_NS scalar
#include "simd/vec_scalar.hpp"
#include "make_table.hpp"

const fastxent::KernelTable& fastxent::scalar_table() {
  static const KernelTable table = scalar::make_table("scalar");
  return table;
}
