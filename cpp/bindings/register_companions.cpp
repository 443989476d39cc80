// Owns the companion entry point: softmax, log_softmax, logsumexp and softmax_backward on a
// (rows, C) float32 / float64 view (the axis handling is in python/fastxent/_companions.py).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>

#include "bindings.hpp"

namespace fastxent_py {

namespace {

template <class T>
void companion(const py::array& x, const py::array& out, int which, int num_threads,
               const py::object& g) {
  const py::ssize_t N = x.shape(0), C = x.shape(1);
  int64_t ld = C;
  const T* xp = rows_view<T>(x, N, C, &ld, "x");
  py::array o = out;
  const bool vec = which == 2;  // logsumexp: one value per row
  if (!is_dtype<T>(o) || !c_contiguous(o) || !o.writeable() || o.shape(0) != N ||
      (vec ? o.ndim() != 1 : (o.ndim() != 2 || o.shape(1) != C)))
    throw std::invalid_argument("out: wrong dtype, shape or layout, or read-only");
  T* op = static_cast<T*>(o.mutable_data());
  const T* gp = nullptr;
  if (which == 3) {
    int64_t gld = C;
    gp = rows_view<T>(py::reinterpret_borrow<py::array>(g), N, C, &gld, "grad");
    if (gld != C || ld != C) throw std::invalid_argument("softmax_backward: contiguous rows");
  }
  py::gil_scoped_release release;
  switch (which) {
    case 0: fastxent::softmax<T>(xp, N, C, ld, op, false, num_threads); break;
    case 1: fastxent::softmax<T>(xp, N, C, ld, op, true, num_threads); break;
    case 2: fastxent::logsumexp<T>(xp, N, C, ld, op, num_threads); break;
    default: fastxent::softmax_backward<T>(xp, gp, N, C, op, num_threads); break;
  }
}

}  // namespace

void register_companions(py::module_& m) {
  m.def(
      "companion",
      [](const py::array& x, const py::array& out, int which, int num_threads,
         const py::object& g) {
        if (x.ndim() != 2) throw std::invalid_argument("x: expected a 2-D array");
        if (is_dtype<float>(x)) return companion<float>(x, out, which, num_threads, g);
        if (is_dtype<double>(x)) return companion<double>(x, out, which, num_threads, g);
        throw py::type_error("x: expected float32 or float64");
      },
      py::arg("x"), py::arg("out"), py::arg("which"), py::arg("num_threads"),
      py::arg("g") = py::none(),
      "Row-wise companions on a (rows, C) view: which 0 softmax, 1 log_softmax, 2 logsumexp "
      "(out has one value per row), 3 softmax_backward (x = probs, g = upstream grad).");
}

}  // namespace fastxent_py
