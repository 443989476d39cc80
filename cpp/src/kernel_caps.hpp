// What a vector-traits type or the compiler offers beyond the required operations: the
// capability detectors (fused AVX-512 operations, the 2^(j/16) table), the prefetch macros
// and in_register (keeps an accumulator in a vector register).
#pragma once

#include <cstdint>

// A read prefetch into L2 (MSVC has no __builtin_prefetch).
#ifndef FASTXENT_PREFETCH
#if defined(_MSC_VER) && !defined(__clang__)
#include <xmmintrin.h>
#define FASTXENT_PREFETCH(p) _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T1)
#else
#define FASTXENT_PREFETCH(p) __builtin_prefetch((p), 0, 2)
#endif
#endif
// A prefetch for writing (PREFETCHW where the ISA flags allow it, else into L1).
#ifndef FASTXENT_PREFETCH_W
#if defined(_MSC_VER) && !defined(__clang__)
#include <intrin.h>
#define FASTXENT_PREFETCH_W(p) _m_prefetchw(reinterpret_cast<const void*>(p))
#else
#define FASTXENT_PREFETCH_W(p) __builtin_prefetch((p), 1, 3)
#endif
#endif

#ifndef FASTXENT_ISA_NS
#error "define FASTXENT_ISA_NS (the ISA namespace) before including this header"
#endif

namespace fastxent {
namespace FASTXENT_ISA_NS {

// An empty asm that takes v in a vector register and may change it (GCC and Clang on x86):
// without it GCC 12 kept a sum accumulator of several AVX-512 block passes (the plain forward
// and fused ones among them) in a stack slot, an add, store and reload per step of the loop.
// With it (Zen 4, 1 thread, in cache): forward 64x4000 61.0 -> 58.3 us, 256x1000 83.3 -> 81.0.
template <class R>
inline void in_register(R& v) {
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
  asm("" : "+v"(v));
#else
  (void)v;
#endif
}

// Whether the traits V offer the fused AVX-512 operations (scale_unless_below,
// fmadd_unless_zero, recip12, neg_abs).
template <class V, class = void>
struct HasFused {
  static constexpr bool value = false;
};
template <class V>
struct HasFused<V, decltype(void(V::kFused))> {
  static constexpr bool value = V::kFused;
};
template <class V>
constexpr bool fused() {
  return HasFused<V>::value;
}

// Whether the traits V look up 2^(j/16) (exp2_sixteenths): then vexp uses the table form
// (AVX-512 float, where it saves two of ten multiply-add-pipe operations; see vexp).
template <class V, class = void>
struct HasExpTable {
  static constexpr bool value = false;
};
template <class V>
struct HasExpTable<V, decltype(void(V::kExpTable))> {
  static constexpr bool value = V::kExpTable;
};
template <class V>
constexpr bool exp_table() {
  return HasExpTable<V>::value;
}

}  // namespace FASTXENT_ISA_NS
}  // namespace fastxent
