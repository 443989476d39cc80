// The portable fallback: the kernel of kernel_impl.hpp over one-lane "vectors".
#define FASTXENT_ISA_NS scalar
#include "simd/vec_scalar.hpp"
#include "make_table.hpp"  // defines fastxent::scalar_table()
