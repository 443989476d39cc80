// The ISA registry: every kernel build this library can contain, best last. From this one list
// come the table declarations (kernel_table.hpp) and the dispatch entries (dispatch.cpp).
//
// FASTXENT_FOR_EACH_ISA(X) calls X(name, usable) for every ISA compiled in:
//   name    the ISA's namespace and file stem: isa_<name>.cpp defines <name>_table();
//   usable  whether this CPU and OS can run it, an expression over `cpu` (dispatch.cpp's
//           Features, detected once); `true` for the portable scalar build.
// An ISA other than scalar is compiled in where CMake defines FASTXENT_HAVE_<NAME> (it adds
// isa_<name>.cpp with that ISA's flags, see CMakeLists.txt).
//
// Adding an ISA: a traits header under simd/ (the contract: kernel_contract.hpp), a three-line
// isa_<name>.cpp, its entry below, and its flags and FASTXENT_HAVE_<NAME> in CMakeLists.txt.
#pragma once

#if defined(FASTXENT_HAVE_NEON)  // AdvSIMD: baseline on every aarch64 CPU
#define FASTXENT_ISA_NEON(X) X(neon, true)
#else
#define FASTXENT_ISA_NEON(X)
#endif

#if defined(FASTXENT_HAVE_AVX2)
#define FASTXENT_ISA_AVX2(X) X(avx2, cpu.avx2)
#else
#define FASTXENT_ISA_AVX2(X)
#endif

#if defined(FASTXENT_HAVE_AVX512)
#define FASTXENT_ISA_AVX512(X) X(avx512, cpu.avx512)
#else
#define FASTXENT_ISA_AVX512(X)
#endif

#define FASTXENT_FOR_EACH_ISA(X) \
  X(scalar, true) FASTXENT_ISA_NEON(X) FASTXENT_ISA_AVX2(X) FASTXENT_ISA_AVX512(X)
