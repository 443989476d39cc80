// The C++ tests' one assertion: CHECK(cond, printf-format, ...) counts, prints what failed with
// its location, and lets the test go on; main returns non-zero when g_failures > 0.
#pragma once

#include <cstdio>

inline int g_failures = 0;
inline int g_checks = 0;

#define CHECK(cond, ...)                                          \
  do {                                                            \
    ++g_checks;                                                   \
    if (!(cond)) {                                                \
      ++g_failures;                                               \
      std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::printf(__VA_ARGS__);                                   \
      std::printf("\n");                                          \
    }                                                             \
  } while (0)
