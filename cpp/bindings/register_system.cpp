// Owns the module's facts and switches: the instruction sets (available, active, forced),
// OpenMP's thread facts, the kernel's block and streaming sizes, build_info and __version__.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "bindings.hpp"

namespace fastxent_py {

void register_system(py::module_& m) {
  m.def("available_isas", &fastxent::available_isas,
        "Instruction sets this CPU and OS can run, best last.");
  m.def("active_isa", &fastxent::active_isa, "The instruction set in use.");
  m.def("set_isa", &fastxent::set_isa, py::arg("name"),
        "Force an instruction set ('auto' or '' for the best).");
  m.def("default_num_threads", &fastxent::default_num_threads,
        "OpenMP's default thread count (omp_get_max_threads).");
  m.def("block_classes", &fastxent::block_classes, py::arg("itemsize"),
        "Classes per kernel block for 4-byte (float32, 16-bit) or 8-byte (float64) elements.");
  m.def("stream_bytes", &fastxent::stream_bytes,
        "Gradients of at least this many bytes (not in place) go out with non-temporal "
        "stores under the active ISA; 0 = never (FASTXENT_STREAM_BYTES=N sets it).");
  m.def("has_openmp", &fastxent::has_openmp, "Whether the core was built with OpenMP.");

  py::dict info;
  info["version"] = FASTXENT_VERSION;
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = std::string("gcc ") + __VERSION__;
#elif defined(_MSC_VER)
  info["compiler"] = std::string("msvc ") + std::to_string(_MSC_VER);
#else
  info["compiler"] = "unknown";
#endif
  info["cxx_flags"] = FASTXENT_CXX_FLAGS;
#if defined(_OPENMP)
  info["openmp"] = _OPENMP;
#else
  info["openmp"] = py::none();
#endif
  m.attr("build_info") = info;
  m.attr("__version__") = FASTXENT_VERSION;
}

}  // namespace fastxent_py
