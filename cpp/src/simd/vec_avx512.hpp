// AVX-512 (F/BW/DQ/VL) traits: 16 floats / 8 doubles per register, k-mask tails.
// Lives in namespace fastxent::FASTXENT_ISA_NS; compiled only with the AVX-512 flags.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "exp_coeffs.hpp"

#include "isa_ns.hpp"

namespace fastxent {
namespace FASTXENT_ISA_NS {

inline void V_fence() { _mm_sfence(); }

struct VD {
  using T = double;
  using R = __m512d;
  static constexpr int64_t W = 8;
  static constexpr bool kHasHalf = false;
  static __mmask8 mask(int64_t n) { return static_cast<__mmask8>((1u << n) - 1u); }
  static R load(const T* p) { return _mm512_loadu_pd(p); }
  static R load_partial(const T* p, int64_t n, T fill) {
    return _mm512_mask_loadu_pd(_mm512_set1_pd(fill), mask(n), p);
  }
  static void store(T* p, R v) { _mm512_storeu_pd(p, v); }
  static void store_partial(T* p, R v, int64_t n) { _mm512_mask_storeu_pd(p, mask(n), v); }
  static void stream(T* p, R v) { _mm512_stream_pd(p, v); }
  static R keep_first(R v, int64_t n) { return _mm512_maskz_mov_pd(mask(n), v); }
  static R set1(T v) { return _mm512_set1_pd(v); }
  static R add(R a, R b) { return _mm512_add_pd(a, b); }
  static R sub(R a, R b) { return _mm512_sub_pd(a, b); }
  static R mul(R a, R b) { return _mm512_mul_pd(a, b); }
  static R fmadd(R a, R b, R c) { return _mm512_fmadd_pd(a, b, c); }
  static R fmsub(R a, R b, R c) { return _mm512_fmsub_pd(a, b, c); }
  static R fnmadd(R a, R b, R c) { return _mm512_fnmadd_pd(a, b, c); }
  static R max(R a, R b) { return _mm512_max_pd(a, b); }
  static R abs(R a) { return _mm512_andnot_pd(_mm512_set1_pd(-0.0), a); }
  static R div(R a, R b) { return _mm512_div_pd(a, b); }
  static R copysign(R mag, R sgn) {
    const R sign = _mm512_set1_pd(-0.0);
    return _mm512_or_pd(_mm512_andnot_pd(sign, mag), _mm512_and_pd(sign, sgn));
  }
  static R min(R a, R b) { return _mm512_min_pd(a, b); }
  static R select_eq(R a, R b, R x, R y) {
    return _mm512_mask_blend_pd(_mm512_cmp_pd_mask(a, b, _CMP_EQ_OQ), y, x);
  }
  static R zero_if_less(R x, R lo, R v) {
    return _mm512_mask_mov_pd(v, _mm512_cmp_pd_mask(x, lo, _CMP_LT_OQ), _mm512_setzero_pd());
  }
  static R pow2_from_magic(R t, uint64_t bias, int shift) {
    __m512i b = _mm512_add_epi64(_mm512_castpd_si512(t), _mm512_set1_epi64(int64_t(bias)));
    return _mm512_castsi512_pd(_mm512_sll_epi64(b, _mm_cvtsi32_si128(shift)));
  }
  static constexpr bool kFused = true;
  static R scale(R p, R n) { return _mm512_scalef_pd(p, n); }
  static R scale_unless_below(R p, R n, R x, R lo) {
    return _mm512_maskz_scalef_pd(_mm512_cmp_pd_mask(x, lo, _CMP_NLT_UQ), p, n);
  }
  static R fmadd_unless_zero(R u, R x, R acc) {
    return _mm512_mask3_fmadd_pd(u, x, acc,
                                 _mm512_cmp_pd_mask(u, _mm512_setzero_pd(), _CMP_NEQ_UQ));
  }
  static R recip12(R d) { return _mm512_div_pd(_mm512_set1_pd(1.0), d); }
  static R neg_abs(R a) { return _mm512_or_pd(a, _mm512_set1_pd(-0.0)); }
  static double hsum(R v) {
    __m256d h4 = _mm256_add_pd(_mm512_castpd512_pd256(v), _mm512_extractf64x4_pd(v, 1));
    __m128d h = _mm_add_pd(_mm256_castpd256_pd128(h4), _mm256_extractf128_pd(h4, 1));
    return _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
  }
  static T hmax(R v) {
    __m256d h4 = _mm256_max_pd(_mm512_castpd512_pd256(v), _mm512_extractf64x4_pd(v, 1));
    __m128d h = _mm_max_pd(_mm256_castpd256_pd128(h4), _mm256_extractf128_pd(h4, 1));
    return _mm_cvtsd_f64(_mm_max_sd(h, _mm_unpackhi_pd(h, h)));
  }
};

struct VF {
  using T = float;
  using R = __m512;
  static constexpr int64_t W = 16;
  static constexpr bool kHasHalf = true;
  // Streaming stores measured faster with this kernel on every machine tried (see
  // stream_threshold).
  static constexpr bool kPrefersStreamingStores = true;
  static R load_f16(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static void store_f16(uint16_t* p, R v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                        _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
  static R load_bf16(const uint16_t* p) {
    __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
  static void store_bf16(uint16_t* p, R v) {
    const __m512i x = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(
        _mm512_add_epi32(_mm512_add_epi32(x, _mm512_set1_epi32(0x7fff)), lsb), 16);
    const __m512i qnan = _mm512_or_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(0x40));
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), qnan);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
  }
  static __mmask16 mask(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }
  static R load(const T* p) { return _mm512_loadu_ps(p); }
  static R load_partial(const T* p, int64_t n, T fill) {
    return _mm512_mask_loadu_ps(_mm512_set1_ps(fill), mask(n), p);
  }
  static void store(T* p, R v) { _mm512_storeu_ps(p, v); }
  static void store_partial(T* p, R v, int64_t n) { _mm512_mask_storeu_ps(p, mask(n), v); }
  static void stream(T* p, R v) { _mm512_stream_ps(p, v); }
  static R keep_first(R v, int64_t n) { return _mm512_maskz_mov_ps(mask(n), v); }
  static R set1(T v) { return _mm512_set1_ps(v); }
  static R add(R a, R b) { return _mm512_add_ps(a, b); }
  static R sub(R a, R b) { return _mm512_sub_ps(a, b); }
  static R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  static R fmadd(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static R fmsub(R a, R b, R c) { return _mm512_fmsub_ps(a, b, c); }
  static R fnmadd(R a, R b, R c) { return _mm512_fnmadd_ps(a, b, c); }
  static R max(R a, R b) { return _mm512_max_ps(a, b); }
  static R abs(R a) { return _mm512_andnot_ps(_mm512_set1_ps(-0.0f), a); }
  static R div(R a, R b) { return _mm512_div_ps(a, b); }
  static R copysign(R mag, R sgn) {
    const R sign = _mm512_set1_ps(-0.0f);
    return _mm512_or_ps(_mm512_andnot_ps(sign, mag), _mm512_and_ps(sign, sgn));
  }
  static R min(R a, R b) { return _mm512_min_ps(a, b); }
  static R select_eq(R a, R b, R x, R y) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ), y, x);
  }
  static R zero_if_less(R x, R lo, R v) {
    return _mm512_mask_mov_ps(v, _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ), _mm512_setzero_ps());
  }
  static R pow2_from_magic(R t, uint32_t bias, int shift) {
    __m512i b = _mm512_add_epi32(_mm512_castps_si512(t), _mm512_set1_epi32(int32_t(bias)));
    return _mm512_castsi512_ps(_mm512_sll_epi32(b, _mm_cvtsi32_si128(shift)));
  }
  // AVX-512 shortcuts the kernel takes when kFused is set (one instruction for several):
  // p * 2^n (n integral), and 0 instead where x < lo (a NaN x keeps the NaN).
  static constexpr bool kFused = true;
  static R scale(R p, R n) { return _mm512_scalef_ps(p, n); }
  static R scale_unless_below(R p, R n, R x, R lo) {
    return _mm512_maskz_scalef_ps(_mm512_cmp_ps_mask(x, lo, _CMP_NLT_UQ), p, n);
  }
  // 2^(j/16) rounded to float (exp_coeffs::kExp2Sixteenths_j), j = the low 4 bits of each lane
  // of t (one vpermps): the table of the lut16-p3 exp (kernel_exp.hpp).
  static constexpr bool kExpTable = true;
  static R exp2_sixteenths(R t) {
    namespace xc = exp_coeffs;
    const R tab = _mm512_setr_ps(
        xc::kExp2Sixteenths_0, xc::kExp2Sixteenths_1, xc::kExp2Sixteenths_2, xc::kExp2Sixteenths_3,
        xc::kExp2Sixteenths_4, xc::kExp2Sixteenths_5, xc::kExp2Sixteenths_6, xc::kExp2Sixteenths_7,
        xc::kExp2Sixteenths_8, xc::kExp2Sixteenths_9, xc::kExp2Sixteenths_10,
        xc::kExp2Sixteenths_11, xc::kExp2Sixteenths_12, xc::kExp2Sixteenths_13,
        xc::kExp2Sixteenths_14, xc::kExp2Sixteenths_15);
    return _mm512_permutexvar_ps(_mm512_castps_si512(t), tab);
  }
  // acc + u * x in one rounding, but acc itself where u == 0 (0 * inf adds nothing).
  static R fmadd_unless_zero(R u, R x, R acc) {
    return _mm512_mask3_fmadd_ps(u, x, acc,
                                 _mm512_cmp_ps_mask(u, _mm512_setzero_ps(), _CMP_NEQ_UQ));
  }
  // 1 / d for d in [1, 2]: the 14-bit estimate and one Newton step (relative error < 2^-23).
  static R recip12(R d) {
    const R r = _mm512_rcp14_ps(d);
    return _mm512_fmadd_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(1.0f)), r);
  }
  // -|a|
  static R neg_abs(R a) { return _mm512_or_ps(a, _mm512_set1_ps(-0.0f)); }
  static double hsum(R v) {
    __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
    __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    return VD::hsum(_mm512_add_pd(lo, hi));
  }
  static T hmax(R v) {
    // Explicit halving (GCC 12's _mm512_reduce_max_ps trips -Wuninitialized in its header).
    __m256 h8 = _mm256_max_ps(_mm512_castps512_ps256(v),
                              _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(h8), _mm256_extractf128_ps(h8, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
  }
};

}  // namespace FASTXENT_ISA_NS
}  // namespace fastxent
