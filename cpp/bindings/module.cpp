// pybind11 layer of fastxent._core: checks what the C++ API cannot see (dtypes, shapes,
// strides, writability), releases the GIL around the compute, and lets pybind11 map the C++
// exceptions (std::invalid_argument -> ValueError, std::out_of_range -> IndexError).
// The user-facing argument handling (array-likes, axis, reduction names) is in Python.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "fastxent/fastxent.hpp"

namespace py = pybind11;

namespace {

template <class T>
bool is_dtype(const py::array& a) {
  return a.dtype().is(py::dtype::of<T>());
}

bool c_contiguous(const py::array& a) {
  return (a.flags() & py::array::c_style) != 0;
}

template <class T>
const T* checked_vector(const py::object& o, py::ssize_t n, const char* what) {
  if (o.is_none()) return nullptr;
  py::array a = py::reinterpret_borrow<py::array>(o);
  if (!is_dtype<T>(a) || a.ndim() != 1 || a.shape(0) != n || !c_contiguous(a))
    throw std::invalid_argument(std::string(what) + ": expected a C-contiguous 1-D array of " +
                                std::to_string(n) + " elements of the logits' dtype");
  return static_cast<const T*>(a.data());
}

template <class T>
T* checked_output(const py::object& o, py::ssize_t rows, py::ssize_t cols, int ndim,
                  const char* what) {
  if (o.is_none()) return nullptr;
  py::array a = py::reinterpret_borrow<py::array>(o);
  const bool shape_ok = a.ndim() == ndim && a.shape(0) == rows && (ndim == 1 || a.shape(1) == cols);
  if (!is_dtype<T>(a) || !shape_ok || !c_contiguous(a))
    throw std::invalid_argument(std::string(what) + ": wrong dtype, shape or layout");
  if (!a.writeable()) throw std::invalid_argument(std::string(what) + ": array is read-only");
  return static_cast<T*>(a.mutable_data());
}

template <class T>
double run(const py::array& logits, const py::array& target, const py::object& weight,
           int reduction, int64_t ignore_index, double label_smoothing, int num_threads,
           const py::object& grad, const py::object& row_losses) {
  if (logits.ndim() != 2) throw std::invalid_argument("logits: expected a 2-D array");
  const py::ssize_t N = logits.shape(0), C = logits.shape(1);
  const py::ssize_t isz = py::ssize_t(sizeof(T));
  if (C > 1 && logits.strides(1) != isz)
    throw std::invalid_argument("logits: the class axis must be contiguous");
  if (N > 1 && (logits.strides(0) % isz != 0 || logits.strides(0) < C * isz))
    throw std::invalid_argument("logits: rows must not overlap");
  const int64_t ld = N > 1 ? logits.strides(0) / isz : C;
  if (!target.dtype().is(py::dtype::of<int64_t>()) || target.ndim() != 1 ||
      target.shape(0) != N || !c_contiguous(target))
    throw std::invalid_argument("target: expected a C-contiguous int64 array of N elements");

  const T* w = checked_vector<T>(weight, C, "weight");
  T* g = checked_output<T>(grad, N, C, 2, "out");
  T* rl = checked_output<T>(row_losses, N, 1, 1, "row_losses");

  fastxent::Options opt;
  opt.reduction = static_cast<fastxent::Reduction>(reduction);
  opt.ignore_index = ignore_index;
  opt.label_smoothing = label_smoothing;
  opt.num_threads = num_threads;
  const T* z = static_cast<const T*>(logits.data());
  const int64_t* y = static_cast<const int64_t*>(target.data());
  // Safe without the GIL: the arrays are kept alive by the caller's references for the whole
  // call, and the kernel touches no Python object.
  py::gil_scoped_release release;
  return fastxent::cross_entropy<T>(z, N, C, ld, y, w, opt, g, rl);
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "fastxent compiled core: fused softmax cross-entropy kernels (private; use fastxent)";

  m.def(
      "cross_entropy",
      [](const py::array& logits, const py::array& target, const py::object& weight,
         int reduction, int64_t ignore_index, double label_smoothing, int num_threads,
         const py::object& grad, const py::object& row_losses) -> double {
        if (is_dtype<float>(logits))
          return run<float>(logits, target, weight, reduction, ignore_index, label_smoothing,
                            num_threads, grad, row_losses);
        if (is_dtype<double>(logits))
          return run<double>(logits, target, weight, reduction, ignore_index, label_smoothing,
                             num_threads, grad, row_losses);
        throw py::type_error("logits: expected float32 or float64");
      },
      py::arg("logits"), py::arg("target"), py::arg("weight"), py::arg("reduction"),
      py::arg("ignore_index"), py::arg("label_smoothing"), py::arg("num_threads"),
      py::arg("grad"), py::arg("row_losses"),
      "Low-level kernel call on a 2-D logits view (rows, C) with a contiguous class axis, "
      "int64 targets, reduction 0=none 1=sum 2=mean. Returns the reduced loss (0 for none).");

  m.def("available_isas", &fastxent::available_isas,
        "Instruction sets this CPU and OS can run, best last.");
  m.def("active_isa", &fastxent::active_isa, "The instruction set in use.");
  m.def("set_isa", &fastxent::set_isa, py::arg("name"),
        "Force an instruction set ('auto' or '' for the best).");
  m.def("default_num_threads", &fastxent::default_num_threads,
        "OpenMP's default thread count (omp_get_max_threads).");
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
