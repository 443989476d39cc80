// Owns the distillation entry point (_core.distill): checks what the C++ API cannot see
// (dtypes, shapes, layouts, writability), then calls fastxent::distill without the GIL. The
// user-facing argument handling is in python/fastxent/_distill.py.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "bindings.hpp"
#include "fastxent/distill.hpp"

namespace py = pybind11;

namespace {

template <class T>
bool is_dtype(const py::array& a) {
  return a.dtype().is(py::dtype::of<T>());
}

// A 2-D (rows, C) operand with a contiguous class axis: its data and row stride (elements).
template <class T>
const T* operand(const py::array& a, const char* what, int64_t& stride) {
  const py::ssize_t sz = py::ssize_t(sizeof(T));
  // Strides of axes of length <= 1 do not matter (NumPy may report anything there).
  const bool rows_ok =
      a.ndim() == 2 && (a.shape(0) <= 1 || (a.strides(0) >= 0 && a.strides(0) % sz == 0));
  if (!rows_ok || (a.shape(0) > 0 && a.shape(1) > 1 && a.strides(1) != sz))
    throw std::invalid_argument(std::string(what) +
                                ": expected a 2-D array with a contiguous class axis");
  stride = a.shape(0) > 1 ? int64_t(a.strides(0) / sz) : int64_t(a.shape(1));
  if (a.shape(0) > 1 && stride < a.shape(1))
    throw std::invalid_argument(std::string(what) + ": rows overlap (row stride < C)");
  return static_cast<const T*>(a.data());
}

// None, or a C-contiguous writable array of `size` elements of T.
template <class T>
T* output(const py::object& o, py::ssize_t size, const char* what) {
  if (o.is_none()) return nullptr;
  if (!py::isinstance<py::array>(o))
    throw std::invalid_argument(std::string(what) + ": expected a NumPy array");
  py::array a = py::reinterpret_borrow<py::array>(o);
  if (!is_dtype<T>(a) || a.size() != size || (a.flags() & py::array::c_style) == 0)
    throw std::invalid_argument(std::string(what) + ": expected a C-contiguous array of " +
                                std::to_string(size) + " elements of the right dtype");
  if (!a.writeable()) throw std::invalid_argument(std::string(what) + ": read-only");
  return static_cast<T*>(a.mutable_data());
}

template <class T>
double run(const py::array& student, const py::array& teacher, const py::object& row_weight,
           const fastxent::DistillOptions& opt, int half, const py::object& grad_student,
           const py::object& grad_teacher, const py::object& row_losses) {
  fastxent::DistillInputs<T> in;
  in.student = operand<T>(student, "student", in.student_stride);
  in.teacher = operand<T>(teacher, "teacher", in.teacher_stride);
  if (teacher.shape(0) != student.shape(0) || teacher.shape(1) != student.shape(1))
    throw std::invalid_argument("teacher and student must have the same shape");
  in.rows = student.shape(0);
  in.classes = student.shape(1);
  if (half == 1) in.half = fastxent::HalfKind::BFloat16;
  const py::ssize_t N = in.rows, n = in.rows * in.classes;
  in.row_weight = output<double>(row_weight, N, "row_weight");
  T* gs = output<T>(grad_student, n, "grad_student");
  T* gt = output<T>(grad_teacher, n, "grad_teacher");
  double* lp = output<double>(row_losses, N, "row_losses");
  py::gil_scoped_release release;
  return fastxent::distill<T>(in, opt, gs, gt, lp);
}

}  // namespace

namespace fastxent_py {

void register_distill(py::module_& m) {
  m.def(
      "distill",
      [](const py::array& student, const py::array& teacher, int divergence, double beta,
         double temperature, int reduction, const py::object& row_weight, int num_threads, int half,
         const py::object& grad_student, const py::object& grad_teacher,
         const py::object& row_losses) -> double {
        fastxent::DistillOptions opt;
        opt.divergence = static_cast<fastxent::Divergence>(divergence);
        opt.beta = beta;
        opt.temperature = temperature;
        opt.reduction = static_cast<fastxent::Reduction>(reduction);
        opt.num_threads = num_threads;
        if (!student.dtype().is(teacher.dtype()))
          throw py::type_error("student and teacher must have the same dtype");
        if (half != -1 && half != 0 && half != 1)
          throw std::invalid_argument("half: -1 (none), 0 (float16) or 1 (bfloat16)");
        if (half >= 0) {
          if (!is_dtype<uint16_t>(student))
            throw py::type_error("16-bit logits are passed as uint16 views");
          return run<uint16_t>(student, teacher, row_weight, opt, half, grad_student, grad_teacher,
                               row_losses);
        }
        if (is_dtype<float>(student))
          return run<float>(student, teacher, row_weight, opt, half, grad_student, grad_teacher,
                            row_losses);
        if (is_dtype<double>(student))
          return run<double>(student, teacher, row_weight, opt, half, grad_student, grad_teacher,
                             row_losses);
        throw py::type_error("student: expected float32 or float64 (or a uint16 view)");
      },
      py::arg("student"), py::arg("teacher"), py::arg("divergence"), py::arg("beta"),
      py::arg("temperature"), py::arg("reduction"), py::arg("row_weight"), py::arg("num_threads"),
      py::arg("half"), py::arg("grad_student"), py::arg("grad_teacher"), py::arg("row_losses"),
      "Low-level distillation loss on 2-D (rows, C) arrays with a contiguous class axis: "
      "divergence 0=forward KL(teacher||student) 1=reverse KL 2=JSD(beta); reduction 0=none "
      "1=sum 2=mean (over the sum of row weights); row_weight float64 (rows) or None; half -1 "
      "for float32/float64, 0/1 for float16/bfloat16 passed as uint16; outputs C-contiguous or "
      "None (row_losses float64). Returns the reduced loss (0 for none).");
}

}  // namespace fastxent_py
