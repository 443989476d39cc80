// fastxent._core.xla_ffi: the XLA FFI handlers of xla_handlers.cpp as PyCapsules, for
// jax.ffi.register_ffi_target (python/fastxent/_jax_ffi.py). Compiled into _core (one kernel,
// one ISA choice for every path) only when jaxlib's FFI headers were found at build time
// (cmake/jax_ffi.cmake defines FASTXENT_XLA_FFI); JAX is never imported here.
#include <pybind11/pybind11.h>

#include "xla/ffi/api/api.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(FastxentCe);
XLA_FFI_DECLARE_HANDLER_SYMBOL(FastxentCeGrad);
XLA_FFI_DECLARE_HANDLER_SYMBOL(FastxentCeStats);
XLA_FFI_DECLARE_HANDLER_SYMBOL(FastxentDistill);  // distill_handlers.cpp
XLA_FFI_DECLARE_HANDLER_SYMBOL(FastxentDistillGrad);

namespace py = pybind11;

namespace fastxent_py {

void register_xla_ffi(py::module_& core) {
  py::module_ m = core.def_submodule(
      "xla_ffi", "fastxent's XLA FFI custom-call handlers (private; used by fastxent.jax)");
  m.def(
      "handlers",
      [] {
        py::dict d;
        d["fastxent_ce"] = py::capsule(reinterpret_cast<void*>(&FastxentCe));
        d["fastxent_ce_grad"] = py::capsule(reinterpret_cast<void*>(&FastxentCeGrad));
        d["fastxent_ce_stats"] = py::capsule(reinterpret_cast<void*>(&FastxentCeStats));
        d["fastxent_distill"] = py::capsule(reinterpret_cast<void*>(&FastxentDistill));
        d["fastxent_distill_grad"] = py::capsule(reinterpret_cast<void*>(&FastxentDistillGrad));
        return d;
      },
      "Target name -> PyCapsule of the handler.");
  // The jaxlib whose headers the handlers were compiled against: an older jaxlib at run time
  // may not accept this FFI API version, and fastxent.jax then keeps its pure_callback path.
  m.attr("jaxlib_version") = FASTXENT_JAXLIB_VERSION;
  m.attr("api_version") = py::make_tuple(XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR);
}

}  // namespace fastxent_py
