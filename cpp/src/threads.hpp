// How many OpenMP threads a call uses. One place for every kernel (loss, companions, sigmoid).
#pragma once

#include <cstdint>

namespace fastxent {
namespace detail {

// Below this many elements a call runs on the calling thread: a parallel region costs a few
// microseconds, more than such a call's whole compute.
inline constexpr int64_t kSerialGrain = 1 << 15;

// requested > 0 caps the call, 0 means OpenMP's default; small work runs serially; and in a
// process forked after OpenMP started its threads, everything runs serially (see threads.cpp).
int resolve_threads(int requested, int64_t work);

// Whether this process is a fork child of a process that had started fastxent (always false
// where fork does not exist).
bool forked_child();

}  // namespace detail
}  // namespace fastxent
