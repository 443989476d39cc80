// AVX2 + FMA build of kernel_impl.hpp. Only this file gets -mavx2 -mfma (see CMakeLists.txt).
#define FASTXENT_ISA_NS avx2
#include "simd/vec_avx2.hpp"
#include "make_table.hpp"  // defines fastxent::avx2_table()
