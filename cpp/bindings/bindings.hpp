// What every registration file of the pybind11 module fastxent._core shares: the register_*
// declarations (module.cpp composes them) and the array checks that the C++ API cannot make
// (dtype, shape, strides, writability). Bad arrays throw std::invalid_argument (ValueError).
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "fastxent/fastxent.hpp"

namespace fastxent_py {

namespace py = pybind11;

void register_options(py::module_& m);     // register_options.cpp: _core.Options
void register_rows(py::module_& m);        // register_rows.cpp: cross_entropy(_half)
void register_fast(py::module_& m);        // register_fast.cpp: fast_call(_raw)
void register_companions(py::module_& m);  // register_companions.cpp: softmax & co.
void register_sigmoid(py::module_& m);     // register_sigmoid.cpp
void register_distill(py::module_& m);     // register_distill.cpp
void register_shard(py::module_& m);       // register_shard.cpp
void register_system(py::module_& m);      // register_system.cpp: ISAs, threads, build
#if defined(FASTXENT_XLA_FFI)
void register_xla_ffi(py::module_& m);  // cpp/ffi/register.cpp: the submodule xla_ffi
#endif

// NumPy's notion of "the same type": int64 spelt 'l' or 'q' both match int64_t.
template <class T>
inline bool is_dtype(const py::array& a) {
  return py::detail::npy_api::get().PyArray_EquivTypes_(a.dtype().ptr(), py::dtype::of<T>().ptr());
}

inline bool c_contiguous(const py::array& a) { return (a.flags() & py::array::c_style) != 0; }

template <class T>
inline const T* checked_vector(const py::object& o, py::ssize_t n, const char* what) {
  if (o.is_none()) return nullptr;
  py::array a = py::reinterpret_borrow<py::array>(o);
  if (!is_dtype<T>(a) || a.ndim() != 1 || a.shape(0) != n || !c_contiguous(a))
    throw std::invalid_argument(std::string(what) + ": expected a C-contiguous 1-D array of " +
                                std::to_string(n) + " elements of the logits' dtype");
  return static_cast<const T*>(a.data());
}

// Class targets: None, or a C-contiguous int64 array of the N rows.
inline const int64_t* checked_target(const py::object& o, py::ssize_t N) {
  if (o.is_none()) return nullptr;
  py::array t = py::reinterpret_borrow<py::array>(o);
  if (!is_dtype<int64_t>(t) || t.ndim() != 1 || t.shape(0) != N || !c_contiguous(t))
    throw std::invalid_argument("target: expected a C-contiguous int64 array of N elements");
  return static_cast<const int64_t*>(t.data());
}

template <class T>
inline T* checked_output(const py::object& o, py::ssize_t rows, py::ssize_t cols, int ndim,
                         const char* what) {
  if (o.is_none()) return nullptr;
  py::array a = py::reinterpret_borrow<py::array>(o);
  const bool shape_ok = a.ndim() == ndim && a.shape(0) == rows && (ndim == 1 || a.shape(1) == cols);
  if (!is_dtype<T>(a) || !shape_ok || !c_contiguous(a))
    throw std::invalid_argument(std::string(what) + ": wrong dtype, shape or layout");
  if (!a.writeable()) throw std::invalid_argument(std::string(what) + ": array is read-only");
  return static_cast<T*>(a.mutable_data());
}

// A (rows, C) view with a contiguous class axis: its data pointer and row stride (elements).
template <class T>
inline const T* rows_view(const py::array& a, py::ssize_t N, py::ssize_t C, int64_t* ld,
                          const char* what) {
  const py::ssize_t isz = py::ssize_t(sizeof(T));
  if (!is_dtype<T>(a) || a.ndim() != 2 || a.shape(0) != N || a.shape(1) != C)
    throw std::invalid_argument(std::string(what) +
                                ": expected a (rows, C) array of the logits' dtype");
  if (N > 0 && C > 1 && a.strides(1) != isz)  // (an empty array's strides mean nothing)
    throw std::invalid_argument(std::string(what) + ": the class axis must be contiguous");
  if (N > 1 && (a.strides(0) % isz != 0 || a.strides(0) < C * isz))
    throw std::invalid_argument(std::string(what) + ": rows must not overlap");
  *ld = N > 1 ? a.strides(0) / isz : C;
  return static_cast<const T*>(a.data());
}

}  // namespace fastxent_py
