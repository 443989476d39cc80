// Thread counts, and fork safety.
//
// GNU libgomp keeps its worker pool across fork(), but the workers do not exist in the child:
// the child's next parallel region waits forever for them (GCC bugs 52303, 58378, 60035).
// Data loaders fork all the time (multiprocessing "fork" pools), so a pthread_atfork child
// handler marks the child, and every later call in it runs on the calling thread: slower in
// that child, never hung. The handler is registered when this library is loaded.
#include "threads.hpp"

#include <atomic>

#if defined(_OPENMP)
#include <omp.h>
#endif
#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#define FASTXENT_HAVE_ATFORK 1
#endif

#include "fastxent/fastxent.hpp"

namespace fastxent {
namespace detail {
namespace {

std::atomic<bool> g_forked{false};

#if defined(FASTXENT_HAVE_ATFORK)
void on_fork_child() { g_forked.store(true); }
const bool g_registered = [] {
  pthread_atfork(nullptr, nullptr, &on_fork_child);
  return true;
}();
#endif

}  // namespace

bool forked_child() { return g_forked.load(std::memory_order_relaxed); }

int resolve_threads(int requested, int64_t work) {
  if (work < kSerialGrain || forked_child()) return 1;
  const int nt = requested > 0 ? requested : default_num_threads();
  return nt < 1 ? 1 : nt;
}

}  // namespace detail

int default_num_threads() {
#if defined(_OPENMP)
  return detail::forked_child() ? 1 : omp_get_max_threads();
#else
  return 1;
#endif
}

bool has_openmp() {
#if defined(_OPENMP)
  return true;
#else
  return false;
#endif
}

}  // namespace fastxent
