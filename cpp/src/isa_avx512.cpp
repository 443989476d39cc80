// AVX-512 (F/BW/DQ/VL) build of kernel_impl.hpp. Only this file gets the AVX-512 flags.
#define FASTXENT_ISA_NS avx512
#include "simd/vec_avx512.hpp"
#include "make_table.hpp"  // defines fastxent::avx512_table()
