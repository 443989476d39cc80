// fastxent._xla_ffi: the XLA FFI handlers of xla_handlers.cpp as PyCapsules, for
// jax.ffi.register_ffi_target (python/fastxent/_jax_ffi.py). Built only when jaxlib's FFI
// headers were found at build time (cmake/jax_ffi.cmake); JAX is never imported here.
#include <pybind11/pybind11.h>

#include "xla/ffi/api/api.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(FastxentCe);
XLA_FFI_DECLARE_HANDLER_SYMBOL(FastxentCeGrad);

namespace py = pybind11;

PYBIND11_MODULE(_xla_ffi, m) {
  m.doc() = "fastxent's XLA FFI custom-call handlers (private; used by fastxent.jax)";
  m.def("handlers", [] {
    py::dict d;
    d["fastxent_ce"] = py::capsule(reinterpret_cast<void*>(&FastxentCe));
    d["fastxent_ce_grad"] = py::capsule(reinterpret_cast<void*>(&FastxentCeGrad));
    return d;
  }, "Target name -> PyCapsule of the handler.");
  // The jaxlib whose headers the handlers were compiled against: an older jaxlib at run time
  // may not accept this FFI API version, and fastxent.jax then keeps its pure_callback path.
  m.attr("jaxlib_version") = FASTXENT_JAXLIB_VERSION;
  m.attr("api_version") = py::make_tuple(XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR);
}
