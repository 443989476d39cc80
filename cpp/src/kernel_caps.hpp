// What a vector-traits type or the compiler offers beyond the required operations: the
// capability detectors (fused AVX-512 operations, the 2^(j/16) table), the prefetch macros
// and in_register (keeps an accumulator in a vector register).
#pragma once

#include <cstdint>
#include <type_traits>

#include "isa_ns.hpp"

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

namespace fastxent {
namespace FASTXENT_ISA_NS {

// An empty asm that takes v in a vector register and may change it (GCC and Clang on x86; the
// one place with a target-specific constraint: elsewhere it does nothing, and an ISA for
// another target adds its register constraint here):
// without it GCC 12 kept a sum accumulator of several AVX-512 block passes (the plain forward
// and fused ones among them) in a stack slot, an add, store and reload per step of the loop.
template <class R>
inline void in_register(R& v) {
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
  asm("" : "+v"(v));
#else
  (void)v;
#endif
}

// Optional capabilities of a traits type V: fn<V>() is V::member where V declares it, else
// false (the operations each one promises: kernel_contract.hpp).
#define FASTXENT_TRAITS_FLAG(fn, member)                                             \
  template <class V, class = void>                                                   \
  struct fn##_flag : std::false_type {};                                             \
  template <class V>                                                                 \
  struct fn##_flag<V, decltype(void(V::member))> : std::bool_constant<V::member> {}; \
  template <class V>                                                                 \
  constexpr bool fn() {                                                              \
    return fn##_flag<V>::value;                                                      \
  }

// The fused AVX-512 operations (scale, scale_unless_below, fmadd_unless_zero, recip12,
// neg_abs).
FASTXENT_TRAITS_FLAG(fused, kFused)
// A lookup of 2^(j/16) (exp2_sixteenths): then vexp uses the table form (AVX-512 float, where
// it saves two of ten multiply-add-pipe operations; see vexp).
FASTXENT_TRAITS_FLAG(exp_table, kExpTable)
// Large gradients go out with non-temporal stores (KernelTable::prefers_streaming_stores; the
// default threshold of stream_threshold).
FASTXENT_TRAITS_FLAG(prefers_streaming_stores, kPrefersStreamingStores)
#undef FASTXENT_TRAITS_FLAG

}  // namespace FASTXENT_ISA_NS
}  // namespace fastxent
