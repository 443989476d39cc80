// Owns the sigmoid cross-entropy entry point: checks what the C++ API cannot see (dtypes,
// sizes, contiguity, writability), then calls it without the GIL. It takes the shared
// _core.Options, of which the sigmoid loss reads reduction and num_threads. The user-facing
// argument handling (array-likes, broadcasting, reduction names) is in
// python/fastxent/_sigmoid.py.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "bindings.hpp"
#include "fastxent/sigmoid.hpp"

namespace py = pybind11;

namespace {

template <class T>
bool is_dtype(const py::array& a) {
  return a.dtype().is(py::dtype::of<T>());
}

// The data of a C-contiguous array of `size` elements of T (any shape); null for None. The
// caller's references keep the array alive.
template <class T>
T* checked(const py::object& o, py::ssize_t size, const char* what, bool writable) {
  if (o.is_none()) return nullptr;
  if (!py::isinstance<py::array>(o))
    throw std::invalid_argument(std::string(what) + ": expected a NumPy array");
  py::array a = py::reinterpret_borrow<py::array>(o);
  if (!is_dtype<T>(a) || a.size() != size || (a.flags() & py::array::c_style) == 0)
    throw std::invalid_argument(std::string(what) + ": expected a C-contiguous array of " +
                                std::to_string(size) + " elements of the logits' dtype");
  if (!writable) return static_cast<T*>(const_cast<void*>(a.data()));
  if (!a.writeable()) throw std::invalid_argument(std::string(what) + ": read-only");
  return static_cast<T*>(a.mutable_data());
}

template <class T>
double run(const py::array& logits, const py::object& target, const py::object& pos_weight,
           int pw_mode, const py::object& weight, int w_mode, int64_t last,
           fastxent::SigmoidOptions opt, const py::object& grad, const py::object& losses) {
  const py::ssize_t n = logits.size();
  auto size_of = [&](int mode) -> py::ssize_t { return mode == 2 ? n : mode == 1 ? last : 0; };
  if (target.is_none()) throw std::invalid_argument("target: required");
  if (pos_weight.is_none() != (pw_mode == 0) || weight.is_none() != (w_mode == 0))
    throw std::invalid_argument("pos_weight / weight: array and broadcast mode disagree");
  fastxent::SigmoidInputs<T> in;
  in.logits = checked<T>(logits, n, "logits", false);
  in.target = checked<T>(target, n, "target", false);
  in.n = n;
  in.last = last;
  in.pos_weight = checked<T>(pos_weight, size_of(pw_mode), "pos_weight", false);
  in.pos_weight_mode = static_cast<fastxent::Broadcast>(pw_mode);
  in.weight = checked<T>(weight, size_of(w_mode), "weight", false);
  in.weight_mode = static_cast<fastxent::Broadcast>(w_mode);
  T* gp = checked<T>(grad, n, "out", true);
  T* lp = checked<T>(losses, n, "losses", true);
  // The arrays stay alive through the caller's references; the kernel touches no Python object.
  py::gil_scoped_release release;
  return fastxent::sigmoid_cross_entropy<T>(in, opt, gp, lp);
}

}  // namespace

namespace fastxent_py {

void register_sigmoid(py::module_& m) {
  m.def(
      "sigmoid_cross_entropy",
      [](const py::array& logits, const py::object& target, const py::object& pos_weight,
         int pw_mode, const py::object& weight, int w_mode, int64_t last,
         const fastxent::Options& options, const py::object& grad,
         const py::object& losses) -> double {
        fastxent::SigmoidOptions opt;
        opt.reduction = options.reduction;
        opt.num_threads = options.num_threads;
        if (is_dtype<float>(logits))
          return run<float>(logits, target, pos_weight, pw_mode, weight, w_mode, last, opt, grad,
                            losses);
        if (is_dtype<double>(logits))
          return run<double>(logits, target, pos_weight, pw_mode, weight, w_mode, last, opt, grad,
                             losses);
        throw py::type_error("logits: expected float32 or float64");
      },
      py::arg("logits"), py::arg("target"), py::arg("pos_weight"), py::arg("pos_weight_mode"),
      py::arg("weight"), py::arg("weight_mode"), py::arg("last"), py::arg("options"),
      py::arg("grad"), py::arg("losses"),
      "Low-level sigmoid cross-entropy on C-contiguous arrays of n elements (any shape): "
      "pos_weight / weight broadcast mode 0=absent 1=`last` values along the last axis "
      "2=n values; Options.reduction and .num_threads (the other fields are not read). Returns the "
      "reduced loss (0 for none).");
}

}  // namespace fastxent_py
