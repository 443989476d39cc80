// AArch64 AdvSIMD (NEON) build of kernel_impl.hpp. AdvSIMD is baseline on aarch64: this file
// needs no extra flags, and CMakeLists.txt compiles it only when targeting aarch64.
#define FASTXENT_ISA_NS neon
#include "simd/vec_neon.hpp"
#include "make_table.hpp"  // defines fastxent::neon_table()
