// The ISA-neutral interface between the driver (cross_entropy.cpp, baseline flags) and the
// per-row SIMD passes, which are compiled once per ISA (isa_*.cpp) from kernel_impl.hpp.
// Adding an ISA: a traits header under simd/, a three-line isa_<name>.cpp, a line in
// dispatch.cpp, and its flags in CMakeLists.txt.
#pragma once

#include <cstdint>

namespace fastxent {

// Rows are processed in blocks of kBlock classes at fixed positions (0, kBlock, 2 kBlock, ...).
// Each block yields its own (max, sum) statistics, merged in block order in double: the result
// is the same whichever thread computed which block, so the class axis can be split across
// threads without changing a bit. 2048 floats (8 KiB) keep a block in L1 between its max and
// exp loops, and bound the float accumulation to 2048 / (2 W) additions per lane.
constexpr int64_t kBlock = 2048;

// Statistics of one block z[0, n): m = max, s = sum exp(z - m), wd = sum w (z - m).
// A block with m = -inf (all -inf) has s = 0 (NaN if it holds a NaN) and wd = sum w z.
struct BlockStat {
  double m;
  double s;
  double wd;
};

template <class T>
struct RowFns {
  // Statistics of z[0, n), n <= kBlock; stores e = exp(z - m) when e != nullptr (e may be z).
  // want_wd: also sum w_c (z_c - m) (w == nullptr: unit weights).
  BlockStat (*block)(const T* z, T* e, int64_t n, const T* w, bool want_wd);
  // g = a * e - b * w (w == nullptr: unit weights); g may equal e. stream: non-temporal
  // stores (no read-for-ownership of g); the caller then calls fence() before reusing g.
  void (*affine)(const T* e, T* g, int64_t n, T a, T b, const T* w, bool stream);
};

struct KernelTable {
  const char* name;
  RowFns<float> f32;
  RowFns<double> f64;
  void (*fence)();  // orders non-temporal stores before later stores
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
