// Owns the loss entry points cross_entropy (float32 / float64) and cross_entropy_half
// (float16 / bfloat16 as uint16 views): the row layout (rows, C) with a contiguous class axis
// and the column layout (outer, C, inner) with the class axis not last, their targets,
// weights and outputs. Each takes one _core.Options.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "bindings.hpp"

namespace fastxent_py {

namespace {

// The column layout (class axis not last): a C-contiguous (outer, C, inner) array.
template <class T>
const T* cols_view(const py::array& a, py::ssize_t outer, py::ssize_t C, py::ssize_t inner,
                   const char* what) {
  if (!is_dtype<T>(a) || a.ndim() != 3 || a.shape(0) != outer || a.shape(1) != C ||
      a.shape(2) != inner || !c_contiguous(a))
    throw std::invalid_argument(
        std::string(what) +
        ": expected a C-contiguous (outer, C, inner) array of the logits' dtype");
  return static_cast<const T*>(a.data());
}

// Fills the layout, targets and weights shared by fastxent::Inputs<T> and HalfInputs from
// the Python arguments: S is the storage type of logits and probabilities, W that of the
// weights. Returns the gradient pointer (null without out=).
template <class S, class W, class In>
S* fill_inputs(In& in, const py::array& logits, const py::object& target, const py::object& probs,
               const py::object& weight, const py::object& sample_weight, const py::object& grad) {
  py::ssize_t N, C;
  if (logits.ndim() == 3) {
    const py::ssize_t outer = logits.shape(0), inner = logits.shape(2);
    C = logits.shape(1);
    N = outer * inner;
    in.inner = inner;
    in.row_stride = C * inner;  // unused when inner > 1; a valid row layout when inner == 1
    in.logits = cols_view<S>(logits, outer, C, inner, "logits");
    if (!probs.is_none())
      in.probs = cols_view<S>(py::reinterpret_borrow<py::array>(probs), outer, C, inner,
                              "probability target");
  } else if (logits.ndim() == 2) {
    N = logits.shape(0);
    C = logits.shape(1);
    in.logits = rows_view<S>(logits, N, C, &in.row_stride, "logits");
    if (!probs.is_none())
      in.probs = rows_view<S>(py::reinterpret_borrow<py::array>(probs), N, C, &in.probs_row_stride,
                              "probability target");
  } else {
    throw std::invalid_argument("logits: expected a 2-D (rows, C) or 3-D (outer, C, inner) array");
  }
  in.rows = N;
  in.classes = C;
  in.target = checked_target(target, N);
  in.weight = checked_vector<W>(weight, C, "weight");
  in.sample_weight = checked_vector<W>(sample_weight, N, "sample_weight");
  if (grad.is_none()) return nullptr;
  py::array ga = py::reinterpret_borrow<py::array>(grad);
  if (!is_dtype<S>(ga) || ga.ndim() != logits.ndim() || !c_contiguous(ga))
    throw std::invalid_argument("out: wrong dtype, shape or layout");
  for (py::ssize_t d = 0; d < ga.ndim(); ++d)
    if (ga.shape(d) != logits.shape(d)) throw std::invalid_argument("out: wrong shape");
  if (!ga.writeable()) throw std::invalid_argument("out: array is read-only");
  return static_cast<S*>(ga.mutable_data());
}

// A per-row output: None, or a writable C-contiguous 1-D array of `rows` elements of S.
template <class S>
S* row_output(const py::object& a, py::ssize_t rows, const char* what) {
  if (a.is_none()) return nullptr;
  py::array arr = py::reinterpret_borrow<py::array>(a);
  if (!is_dtype<S>(arr) || arr.ndim() != 1 || arr.shape(0) != rows || !c_contiguous(arr) ||
      !arr.writeable())
    throw std::invalid_argument(std::string(what) +
                                ": expected a writable contiguous 1-D array of one value per row");
  return static_cast<S*>(arr.mutable_data());
}

template <class T>
double run(const py::array& logits, const py::object& target, const py::object& probs,
           const py::object& weight, const py::object& sample_weight, fastxent::Options opt,
           const py::object& grad, const py::object& row_losses, const py::object& lse,
           const py::object& entropy, const py::object& argmax, const py::object& target_logprob) {
  fastxent::Inputs<T> in;
  T* g = fill_inputs<T, T>(in, logits, target, probs, weight, sample_weight, grad);
  T* rl = checked_output<T>(row_losses, in.rows, 1, 1, "row_losses");
  fastxent::RowOutputs<T> outs;
  outs.lse = row_output<T>(lse, in.rows, "lse");
  outs.entropy = row_output<T>(entropy, in.rows, "entropy");
  outs.argmax = row_output<int64_t>(argmax, in.rows, "argmax");
  outs.target_logprob = row_output<T>(target_logprob, in.rows, "target_logprob");
  // Safe without the GIL: the arrays are kept alive by the caller's references for the whole
  // call, and the kernel touches no Python object.
  py::gil_scoped_release release;
  // Rounded to T here: a float32 loss beyond the float range is inf, quietly, as "none" rows.
  return double(T(fastxent::cross_entropy<T>(in, opt, g, rl, &outs)));
}

// float16 / bfloat16 logits arrive as uint16 views; weights as float32.
double run_half(const py::array& logits, int kind, const py::object& target,
                const py::object& probs, const py::object& weight, const py::object& sample_weight,
                fastxent::Options opt, const py::object& grad, const py::object& row_losses,
                const py::object& lse, const py::object& entropy, const py::object& argmax,
                const py::object& target_logprob) {
  fastxent::HalfInputs in;
  if (kind != 0 && kind != 1) throw std::invalid_argument("kind: 0 (float16) or 1 (bfloat16)");
  in.kind = static_cast<fastxent::HalfKind>(kind);
  uint16_t* g =
      fill_inputs<uint16_t, float>(in, logits, target, probs, weight, sample_weight, grad);
  float* rl = checked_output<float>(row_losses, in.rows, 1, 1, "row_losses");
  fastxent::RowOutputs<float> outs;
  outs.lse = row_output<float>(lse, in.rows, "lse");
  outs.entropy = row_output<float>(entropy, in.rows, "entropy");
  outs.argmax = row_output<int64_t>(argmax, in.rows, "argmax");
  outs.target_logprob = row_output<float>(target_logprob, in.rows, "target_logprob");
  py::gil_scoped_release release;  // as in run(): no Python object is touched
  return double(float(fastxent::cross_entropy_half(in, opt, g, rl, &outs)));
}

}  // namespace

void register_rows(py::module_& m) {
  m.def(
      "cross_entropy",
      [](const py::array& logits, const py::object& target, const py::object& probs,
         const py::object& weight, const py::object& sample_weight,
         const fastxent::Options& options, const py::object& grad, const py::object& row_losses,
         const py::object& lse, const py::object& entropy, const py::object& argmax,
         const py::object& target_logprob) -> double {
        if (is_dtype<float>(logits))
          return run<float>(logits, target, probs, weight, sample_weight, options, grad, row_losses,
                            lse, entropy, argmax, target_logprob);
        if (is_dtype<double>(logits))
          return run<double>(logits, target, probs, weight, sample_weight, options, grad,
                             row_losses, lse, entropy, argmax, target_logprob);
        throw py::type_error("logits: expected float32 or float64");
      },
      py::arg("logits"), py::arg("target"), py::arg("probs"), py::arg("weight"),
      py::arg("sample_weight"), py::arg("options"), py::arg("grad"), py::arg("row_losses"),
      py::arg("lse") = py::none(), py::arg("entropy") = py::none(), py::arg("argmax") = py::none(),
      py::arg("target_logprob") = py::none(),
      "Low-level kernel call on a 2-D logits view (rows, C) with a contiguous class axis, or a "
      "C-contiguous (outer, C, inner) array (class axis not last): "
      "int64 class targets or a (rows, C) probability target, and an Options. Returns the "
      "reduced loss (0 for none). lse, entropy, target_logprob (the logits' dtype) and argmax "
      "(int64): optional per-row outputs (row layout only).");

  m.def("cross_entropy_half", &run_half, py::arg("logits"), py::arg("kind"), py::arg("target"),
        py::arg("probs"), py::arg("weight"), py::arg("sample_weight"), py::arg("options"),
        py::arg("grad"), py::arg("row_losses"), py::arg("lse") = py::none(),
        py::arg("entropy") = py::none(), py::arg("argmax") = py::none(),
        py::arg("target_logprob") = py::none(),
        "As cross_entropy, for float16 (kind 0) / bfloat16 (kind 1) logits passed as uint16 "
        "views; float32 weights, float32 row losses, float32 loss and per-row outputs.");
}

}  // namespace fastxent_py
