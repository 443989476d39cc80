// The pybind11 module fastxent._core: only composes one registration function per area
// (declared in bindings.hpp). Each register_*.cpp checks what the C++ API cannot see (dtypes,
// shapes, strides, writability), releases the GIL around the compute, and lets pybind11 map
// the C++ exceptions (std::invalid_argument -> ValueError, std::out_of_range -> IndexError).
// The user-facing argument handling (array-likes, axis, reduction names, option validation)
// is in Python (python/fastxent/_options.py and the modules using it).
#include <pybind11/pybind11.h>

#include "bindings.hpp"

PYBIND11_MODULE(_core, m) {
  m.doc() = "fastxent compiled core: fused softmax cross-entropy kernels (private; use fastxent)";
  fastxent_py::register_options(m);  // first: the other entry points take an Options
  fastxent_py::register_rows(m);
  fastxent_py::register_fast(m);
  fastxent_py::register_companions(m);
  fastxent_py::register_sigmoid(m);
  fastxent_py::register_distill(m);
  fastxent_py::register_shard(m);
  fastxent_py::register_system(m);
#if defined(FASTXENT_XLA_FFI)
  fastxent_py::register_xla_ffi(m);  // XLA FFI handlers for fastxent.jax, when built
#endif
}
