// The contract of a vector-traits type V (simd/vec_*.hpp): what the kernels (kernel_*.hpp,
// sigmoid_impl.hpp, half_impl.hpp) may call, checked at compile time by check_traits<V>()
// (make_table.hpp), one static_assert per operation, so a traits header that lacks one fails
// with the operation's name instead of deep inside a kernel.
//
// Types and constants
//   T         the lane type: float (VF) or double (VD)
//   R         a vector of W lanes of T (a register type; T itself for one lane)
//   W         lanes per vector, int64_t >= 1
//   kHasHalf  bool: the 16-bit conversions below are provided (float traits only)
// Memory (p need not be aligned unless stated; n: a lane count, 0 <= n < W where partial)
//   load(const T* p) -> R               W lanes
//   load_partial(const T* p, n, T fill) -> R   the first n lanes, the others fill; reads
//                                       only p[0 .. n)
//   store(T* p, R), store_partial(T* p, R, n)   W lanes / the first n lanes
//   stream(T* p, R)                     W lanes, non-temporal where the ISA has it, at an
//                                       address aligned to W * sizeof(T); ordered by V_fence()
//   keep_first(R v, n) -> R             v in the first n lanes, +0 in the others
// Arithmetic (lane-wise, IEEE binary32 / binary64, one rounding each)
//   set1(T) -> R
//   add, sub, mul, div(R a, R b) -> R
//   fmadd(a, b, c) = a b + c, fmsub(a, b, c) = a b - c, fnmadd(a, b, c) = c - a b: fused,
//                                       one rounding (the bit-identity across ISAs needs it)
//   max(R a, R b) -> R                  x86 semantics: b where either is NaN or both are zero
//   abs(R) -> R, copysign(R mag, R sgn) -> R
//   select_eq(a, b, x, y) -> R          x where a == b, else y
//   zero_if_less(x, lo, v) -> R         +0 where x < lo (ordered), else v
//   pow2_from_magic(R t, Bits bias, int shift) -> R   2^n for t = n + magic, n an integer:
//                                       the bits (bits(t) + bias) << shift (Bits: uint32_t
//                                       for float, uint64_t for double)
// Reductions (a fixed lane order per ISA: results are deterministic)
//   hsum(R) -> double                   the sum of the lanes, in double
//   hmax(R) -> T                        the max of the lanes
// 16-bit storage (where kHasHalf; round to nearest even, NaN stays a quiet NaN)
//   load_f16, load_bf16(const uint16_t*) -> R;  store_f16, store_bf16(uint16_t*, R)
// Optional capabilities (kernel_caps.hpp), each with the operations it promises:
//   kFused: scale(p, n) = p 2^n, scale_unless_below(p, n, x, lo) = +0 where x < lo else
//           p 2^n, fmadd_unless_zero(u, x, acc) = acc where u == 0 else u x + acc,
//           recip12(d) = 1 / d to within 1 ULP for d in [1, 2], neg_abs(a) = -|a|
//   kExpTable: exp2_sixteenths(t) = 2^(j/16), j the low 4 bits of t (see vexp)
//   kPrefersStreamingStores: the table's prefers_streaming_stores (see stream_threshold)
// And in the ISA namespace: V_fence(), which orders the non-temporal stores before later ones.
#pragma once

#include <cstdint>
#include <type_traits>
#include <utility>

#include "isa_ns.hpp"
#include "kernel_caps.hpp"

namespace fastxent {
namespace FASTXENT_ISA_NS {
namespace contract {

// Vector register types (__m256 and the like) carry attributes that a template argument drops,
// harmlessly here (the vector size is part of the type): GCC would warn at every check.
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"
#endif

template <class V>
using Bits = std::conditional_t<sizeof(typename V::T) == 4, uint32_t, uint64_t>;

// op_<name><V>::value: V::<name>, called with the contract's arguments, has the contract's
// result type.
#define FASTXENT_TRAITS_OP(name, result, ...)                                                   \
  template <class V, class = void>                                                              \
  struct op_##name : std::false_type {};                                                        \
  template <class V>                                                                            \
  struct op_##name<V, std::enable_if_t<std::is_same_v<result, decltype(V::name(__VA_ARGS__))>>> \
      : std::true_type {};

#define FASTXENT_R std::declval<typename V::R>()
#define FASTXENT_T std::declval<typename V::T>()
#define FASTXENT_N std::declval<int64_t>()
FASTXENT_TRAITS_OP(load, typename V::R, std::declval<const typename V::T*>())
FASTXENT_TRAITS_OP(load_partial, typename V::R, std::declval<const typename V::T*>(), FASTXENT_N,
                   FASTXENT_T)
FASTXENT_TRAITS_OP(store, void, std::declval<typename V::T*>(), FASTXENT_R)
FASTXENT_TRAITS_OP(store_partial, void, std::declval<typename V::T*>(), FASTXENT_R, FASTXENT_N)
FASTXENT_TRAITS_OP(stream, void, std::declval<typename V::T*>(), FASTXENT_R)
FASTXENT_TRAITS_OP(keep_first, typename V::R, FASTXENT_R, FASTXENT_N)
FASTXENT_TRAITS_OP(set1, typename V::R, FASTXENT_T)
FASTXENT_TRAITS_OP(add, typename V::R, FASTXENT_R, FASTXENT_R)
FASTXENT_TRAITS_OP(sub, typename V::R, FASTXENT_R, FASTXENT_R)
FASTXENT_TRAITS_OP(mul, typename V::R, FASTXENT_R, FASTXENT_R)
FASTXENT_TRAITS_OP(div, typename V::R, FASTXENT_R, FASTXENT_R)
FASTXENT_TRAITS_OP(fmadd, typename V::R, FASTXENT_R, FASTXENT_R, FASTXENT_R)
FASTXENT_TRAITS_OP(fmsub, typename V::R, FASTXENT_R, FASTXENT_R, FASTXENT_R)
FASTXENT_TRAITS_OP(fnmadd, typename V::R, FASTXENT_R, FASTXENT_R, FASTXENT_R)
FASTXENT_TRAITS_OP(max, typename V::R, FASTXENT_R, FASTXENT_R)
FASTXENT_TRAITS_OP(abs, typename V::R, FASTXENT_R)
FASTXENT_TRAITS_OP(copysign, typename V::R, FASTXENT_R, FASTXENT_R)
FASTXENT_TRAITS_OP(select_eq, typename V::R, FASTXENT_R, FASTXENT_R, FASTXENT_R, FASTXENT_R)
FASTXENT_TRAITS_OP(zero_if_less, typename V::R, FASTXENT_R, FASTXENT_R, FASTXENT_R)
FASTXENT_TRAITS_OP(pow2_from_magic, typename V::R, FASTXENT_R, std::declval<Bits<V>>(),
                   std::declval<int>())
FASTXENT_TRAITS_OP(hsum, double, FASTXENT_R)
FASTXENT_TRAITS_OP(hmax, typename V::T, FASTXENT_R)
FASTXENT_TRAITS_OP(load_f16, typename V::R, std::declval<const uint16_t*>())
FASTXENT_TRAITS_OP(load_bf16, typename V::R, std::declval<const uint16_t*>())
FASTXENT_TRAITS_OP(store_f16, void, std::declval<uint16_t*>(), FASTXENT_R)
FASTXENT_TRAITS_OP(store_bf16, void, std::declval<uint16_t*>(), FASTXENT_R)
FASTXENT_TRAITS_OP(scale, typename V::R, FASTXENT_R, FASTXENT_R)
FASTXENT_TRAITS_OP(scale_unless_below, typename V::R, FASTXENT_R, FASTXENT_R, FASTXENT_R,
                   FASTXENT_R)
FASTXENT_TRAITS_OP(fmadd_unless_zero, typename V::R, FASTXENT_R, FASTXENT_R, FASTXENT_R)
FASTXENT_TRAITS_OP(recip12, typename V::R, FASTXENT_R)
FASTXENT_TRAITS_OP(neg_abs, typename V::R, FASTXENT_R)
FASTXENT_TRAITS_OP(exp2_sixteenths, typename V::R, FASTXENT_R)
#undef FASTXENT_N
#undef FASTXENT_T
#undef FASTXENT_R
#undef FASTXENT_TRAITS_OP

}  // namespace contract

// True, or a compile error naming the first operation of the contract V lacks.
template <class V>
constexpr bool check_traits() {
  using namespace contract;
  using T = typename V::T;
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "traits: T is float or double");
  static_assert(std::is_same_v<decltype(V::W), const int64_t> && V::W >= 1,
                "traits: W, int64_t >= 1");
  static_assert(std::is_same_v<decltype(V::kHasHalf), const bool>, "traits: kHasHalf (bool)");
  static_assert(op_load<V>::value, "traits: load(const T*) -> R");
  static_assert(op_load_partial<V>::value, "traits: load_partial(const T*, int64_t, T) -> R");
  static_assert(op_store<V>::value, "traits: store(T*, R)");
  static_assert(op_store_partial<V>::value, "traits: store_partial(T*, R, int64_t)");
  static_assert(op_stream<V>::value, "traits: stream(T*, R)");
  static_assert(op_keep_first<V>::value, "traits: keep_first(R, int64_t) -> R");
  static_assert(op_set1<V>::value, "traits: set1(T) -> R");
  static_assert(op_add<V>::value, "traits: add(R, R) -> R");
  static_assert(op_sub<V>::value, "traits: sub(R, R) -> R");
  static_assert(op_mul<V>::value, "traits: mul(R, R) -> R");
  static_assert(op_div<V>::value, "traits: div(R, R) -> R");
  static_assert(op_fmadd<V>::value, "traits: fmadd(R, R, R) -> R");
  static_assert(op_fmsub<V>::value, "traits: fmsub(R, R, R) -> R");
  static_assert(op_fnmadd<V>::value, "traits: fnmadd(R, R, R) -> R");
  static_assert(op_max<V>::value, "traits: max(R, R) -> R");
  static_assert(op_abs<V>::value, "traits: abs(R) -> R");
  static_assert(op_copysign<V>::value, "traits: copysign(R, R) -> R");
  static_assert(op_select_eq<V>::value, "traits: select_eq(R, R, R, R) -> R");
  static_assert(op_zero_if_less<V>::value, "traits: zero_if_less(R, R, R) -> R");
  static_assert(op_pow2_from_magic<V>::value, "traits: pow2_from_magic(R, Bits, int) -> R");
  static_assert(op_hsum<V>::value, "traits: hsum(R) -> double");
  static_assert(op_hmax<V>::value, "traits: hmax(R) -> T");
  if constexpr (V::kHasHalf) {
    static_assert(std::is_same_v<T, float>, "traits: kHasHalf only for float");
    static_assert(op_load_f16<V>::value && op_load_bf16<V>::value,
                  "traits: load_f16, load_bf16(const uint16_t*) -> R (kHasHalf)");
    static_assert(op_store_f16<V>::value && op_store_bf16<V>::value,
                  "traits: store_f16, store_bf16(uint16_t*, R) (kHasHalf)");
  }
  if constexpr (fused<V>()) {
    static_assert(op_scale<V>::value && op_scale_unless_below<V>::value &&
                      op_fmadd_unless_zero<V>::value && op_recip12<V>::value &&
                      op_neg_abs<V>::value,
                  "traits: scale, scale_unless_below, fmadd_unless_zero, recip12, neg_abs "
                  "(kFused)");
  }
  if constexpr (exp_table<V>()) {
    static_assert(op_exp2_sixteenths<V>::value, "traits: exp2_sixteenths(R) -> R (kExpTable)");
  }
  return true;
}

#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif

}  // namespace FASTXENT_ISA_NS
}  // namespace fastxent
