// The ISA-neutral interface between the driver (cross_entropy.cpp, baseline flags) and the
// per-row SIMD passes, which are compiled once per ISA (isa_*.cpp) from kernel_impl.hpp.
// Adding an ISA: a traits header under simd/, a three-line isa_<name>.cpp, a line in
// dispatch.cpp, and its flags in CMakeLists.txt.
#pragma once

#include <cstdint>

namespace fastxent {

// Result of the exp pass over one row (or one block range of a row).
struct ExpSum {
  double sum;  // sum_c exp(z_c - m)
  double wd;   // sum_c w_c * (z_c - m) (w_c = 1 without weights); only when asked for
};

template <class T>
struct RowFns {
  // max_c z_c over [0, n). NaN entries may or may not win; the exp pass turns them into NaN.
  T (*max)(const T* z, int64_t n);
  // e_c = exp(z_c - m) written to e (when e != nullptr; e may equal z), returning the sums.
  // want_wd: also accumulate sum_c w_c (z_c - m) (w == nullptr: unit weights).
  ExpSum (*exp_sum)(const T* z, T* e, int64_t n, T m, const T* w, bool want_wd);
  // g_c = a * e_c - b * w_c (w == nullptr: unit weights). g may equal e.
  void (*affine)(const T* e, T* g, int64_t n, T a, T b, const T* w);
};

struct KernelTable {
  const char* name;
  RowFns<float> f32;
  RowFns<double> f64;
};

template <class T>
inline const RowFns<T>& row_fns(const KernelTable& t);
template <>
inline const RowFns<float>& row_fns<float>(const KernelTable& t) { return t.f32; }
template <>
inline const RowFns<double>& row_fns<double>(const KernelTable& t) { return t.f64; }

// One per compiled ISA (each defined in its isa_*.cpp).
const KernelTable& scalar_table();
#if defined(FASTXENT_HAVE_AVX2)
const KernelTable& avx2_table();
#endif
#if defined(FASTXENT_HAVE_AVX512)
const KernelTable& avx512_table();
#endif

// The table in use (dispatch.cpp).
const KernelTable& active_table();

}  // namespace fastxent
