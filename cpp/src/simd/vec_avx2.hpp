// AVX2 + FMA traits: 8 floats / 4 doubles per register, masked loads and stores for tails.
// Lives in namespace fastxent::FASTXENT_ISA_NS; compiled only with -mavx2 -mfma.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "isa_ns.hpp"

namespace fastxent {
namespace FASTXENT_ISA_NS {

namespace detail {
// Lanes [0, n) set: a window into {-1 x 8, 0 x 8}.
alignas(32) static const int32_t kTailMask32[16] = {-1, -1, -1, -1, -1, -1, -1, -1,
                                                    0,  0,  0,  0,  0,  0,  0,  0};
alignas(32) static const int64_t kTailMask64[8] = {-1, -1, -1, -1, 0, 0, 0, 0};
inline __m256i mask32(int64_t n) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kTailMask32 + 8 - n));
}
inline __m256i mask64(int64_t n) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kTailMask64 + 4 - n));
}
}  // namespace detail

inline void V_fence() { _mm_sfence(); }

struct VF {
  using T = float;
  using R = __m256;
  static constexpr int64_t W = 8;
  static constexpr bool kHasHalf = true;
  // float16 through F16C; bfloat16 is the top half of a float: shift in, round to nearest
  // even out (NaN forced quiet so rounding cannot carry it into inf).
  static R load_f16(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static void store_f16(uint16_t* p, R v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
  static R load_bf16(const uint16_t* p) {
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  static void store_bf16(uint16_t* p, R v) {
    const __m256i x = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(
        _mm256_add_epi32(_mm256_add_epi32(x, _mm256_set1_epi32(0x7fff)), lsb), 16);
    const __m256i qnan = _mm256_or_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(0x40));
    r = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(qnan),
                                             _mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  }
  static R load(const T* p) { return _mm256_loadu_ps(p); }
  static R load_partial(const T* p, int64_t n, T fill) {
    __m256i m = detail::mask32(n);
    return _mm256_blendv_ps(_mm256_set1_ps(fill), _mm256_maskload_ps(p, m), _mm256_castsi256_ps(m));
  }
  static void store(T* p, R v) { _mm256_storeu_ps(p, v); }
  static void store_partial(T* p, R v, int64_t n) { _mm256_maskstore_ps(p, detail::mask32(n), v); }
  static void stream(T* p, R v) { _mm256_stream_ps(p, v); }
  static R keep_first(R v, int64_t n) {
    return _mm256_and_ps(v, _mm256_castsi256_ps(detail::mask32(n)));
  }
  static R set1(T v) { return _mm256_set1_ps(v); }
  static R add(R a, R b) { return _mm256_add_ps(a, b); }
  static R sub(R a, R b) { return _mm256_sub_ps(a, b); }
  static R mul(R a, R b) { return _mm256_mul_ps(a, b); }
  static R fmadd(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static R fmsub(R a, R b, R c) { return _mm256_fmsub_ps(a, b, c); }
  static R fnmadd(R a, R b, R c) { return _mm256_fnmadd_ps(a, b, c); }
  static R max(R a, R b) { return _mm256_max_ps(a, b); }
  static R abs(R a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
  static R div(R a, R b) { return _mm256_div_ps(a, b); }
  static R copysign(R mag, R sgn) {
    const R sign = _mm256_set1_ps(-0.0f);
    return _mm256_or_ps(_mm256_andnot_ps(sign, mag), _mm256_and_ps(sign, sgn));
  }
  static R min(R a, R b) { return _mm256_min_ps(a, b); }
  static R select_eq(R a, R b, R x, R y) {
    return _mm256_blendv_ps(y, x, _mm256_cmp_ps(a, b, _CMP_EQ_OQ));
  }
  static R zero_if_less(R x, R lo, R v) {
    return _mm256_andnot_ps(_mm256_cmp_ps(x, lo, _CMP_LT_OQ), v);
  }
  static R pow2_from_magic(R t, uint32_t bias, int shift) {
    __m256i b = _mm256_add_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(int32_t(bias)));
    return _mm256_castsi256_ps(_mm256_sll_epi32(b, _mm_cvtsi32_si128(shift)));
  }
  static double hsum(R v) {
    __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
    __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
    __m256d s = _mm256_add_pd(lo, hi);
    __m128d h = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
    return _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
  }
  static T hmax(R v) {
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
  }
};

struct VD {
  using T = double;
  using R = __m256d;
  static constexpr int64_t W = 4;
  static constexpr bool kHasHalf = false;
  static R load(const T* p) { return _mm256_loadu_pd(p); }
  static R load_partial(const T* p, int64_t n, T fill) {
    __m256i m = detail::mask64(n);
    return _mm256_blendv_pd(_mm256_set1_pd(fill), _mm256_maskload_pd(p, m), _mm256_castsi256_pd(m));
  }
  static void store(T* p, R v) { _mm256_storeu_pd(p, v); }
  static void store_partial(T* p, R v, int64_t n) { _mm256_maskstore_pd(p, detail::mask64(n), v); }
  static void stream(T* p, R v) { _mm256_stream_pd(p, v); }
  static R keep_first(R v, int64_t n) {
    return _mm256_and_pd(v, _mm256_castsi256_pd(detail::mask64(n)));
  }
  static R set1(T v) { return _mm256_set1_pd(v); }
  static R add(R a, R b) { return _mm256_add_pd(a, b); }
  static R sub(R a, R b) { return _mm256_sub_pd(a, b); }
  static R mul(R a, R b) { return _mm256_mul_pd(a, b); }
  static R fmadd(R a, R b, R c) { return _mm256_fmadd_pd(a, b, c); }
  static R fmsub(R a, R b, R c) { return _mm256_fmsub_pd(a, b, c); }
  static R fnmadd(R a, R b, R c) { return _mm256_fnmadd_pd(a, b, c); }
  static R max(R a, R b) { return _mm256_max_pd(a, b); }
  static R abs(R a) { return _mm256_andnot_pd(_mm256_set1_pd(-0.0), a); }
  static R div(R a, R b) { return _mm256_div_pd(a, b); }
  static R copysign(R mag, R sgn) {
    const R sign = _mm256_set1_pd(-0.0);
    return _mm256_or_pd(_mm256_andnot_pd(sign, mag), _mm256_and_pd(sign, sgn));
  }
  static R min(R a, R b) { return _mm256_min_pd(a, b); }
  static R select_eq(R a, R b, R x, R y) {
    return _mm256_blendv_pd(y, x, _mm256_cmp_pd(a, b, _CMP_EQ_OQ));
  }
  static R zero_if_less(R x, R lo, R v) {
    return _mm256_andnot_pd(_mm256_cmp_pd(x, lo, _CMP_LT_OQ), v);
  }
  static R pow2_from_magic(R t, uint64_t bias, int shift) {
    __m256i b = _mm256_add_epi64(_mm256_castpd_si256(t), _mm256_set1_epi64x(int64_t(bias)));
    return _mm256_castsi256_pd(_mm256_sll_epi64(b, _mm_cvtsi32_si128(shift)));
  }
  static double hsum(R v) {
    __m128d h = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
  }
  static T hmax(R v) {
    __m128d h = _mm_max_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_max_sd(h, _mm_unpackhi_pd(h, h)));
  }
};

}  // namespace FASTXENT_ISA_NS
}  // namespace fastxent
