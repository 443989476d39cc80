// How many OpenMP threads a call uses. One place for every kernel (loss, companions, sigmoid).
#pragma once

#include <cstdint>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace fastxent {
namespace detail {

// Below this many elements a call runs on the calling thread: a parallel region costs a few
// microseconds, more than such a call's whole compute.
inline constexpr int64_t kSerialGrain = 1 << 15;

// requested > 0 caps the call, 0 means OpenMP's default; small work runs serially; and in a
// process forked after OpenMP started its threads, everything runs serially (see threads.cpp).
int resolve_threads(int requested, int64_t work);

// Runs body(begin, end) over [0, total) on `team` threads, each taking one contiguous static
// chunk (so each item is computed by exactly one thread), or on the calling thread alone.
template <class F>
void parallel_chunks(int team, int64_t total, F&& body) {
#if defined(_OPENMP)
  if (team > 1) {
#pragma omp parallel num_threads(team)
    {
      const int64_t t = omp_get_thread_num(), nth = omp_get_num_threads();
      const int64_t chunk = (total + nth - 1) / nth;
      const int64_t b0 = t * chunk < total ? t * chunk : total;
      const int64_t b1 = b0 + chunk < total ? b0 + chunk : total;
      body(b0, b1);
    }
    return;
  }
#endif
  (void)team;
  body(int64_t(0), total);
}

// Whether this process is a fork child of a process that had started fastxent (always false
// where fork does not exist).
bool forked_child();

}  // namespace detail
}  // namespace fastxent
