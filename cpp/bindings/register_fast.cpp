// Owns the small-call fast path: fast_call (the common NumPy call without options, every
// check made here, None when the general Python path is needed) and fast_call_raw
// (fastxent.torch's lean path, on memory given by address). Both build their Options here,
// from the reduction and thread count alone, so a call costs no Python-side options object.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <optional>
#include <stdexcept>

#include "bindings.hpp"

namespace fastxent_py {

namespace {

// Logits below this many elements are computed holding the GIL.
constexpr int64_t kReleaseGil = 1 << 14;

// The small-call fast path: every check of the common call (exact ndarrays: 2-D C-contiguous native
// float32/float64 logits, C > 0, int64 targets of N elements, no options, out= absent or
// logits itself or a separate C-contiguous writable array) done here in C++, with None
// returned whenever the general Python path is needed (which also produces every error
// message, including that of a bad class index).
bool native_c2(const py::array& a) {
  return c_contiguous(a) && a.dtype().byteorder() != '>' && a.dtype().byteorder() != '!';
}

// Exactly numpy.ndarray: a subclass (np.matrix, a memmap, a masked array) takes the general
// path, which converts it and returns plain arrays.
bool exact_ndarray(const py::handle& h) {
  return Py_TYPE(h.ptr()) == py::detail::npy_api::get().PyArray_Type_;
}

bool overlaps(const py::array& a, const py::array& b) {
  const char* a0 = static_cast<const char*>(a.data());
  const char* b0 = static_cast<const char*>(b.data());
  return a0 < b0 + b.nbytes() && b0 < a0 + a.nbytes();
}

// NumPy's PyArray_Scalar (slot 60 of its C API table, the same in NumPy 1.x and 2.x): a
// float32/float64 scalar from a C value in about 40 ns, where calling numpy.float32(x) from
// C++ took about 150 (a tenth of a 32 x 10 call). The table comes from the _ARRAY_API capsule
// of NumPy's _multiarray_umath, as NumPy's own import_array finds it (pybind11 exposes
// PyArray_Scalar only from 3.0; this project supports 2.12).
using ScalarFn = PyObject* (*)(void*, PyObject*, PyObject*);
ScalarFn numpy_scalar_fn() {
  static const ScalarFn fn = [] {
    py::module_ m;
    try {
      m = py::module_::import("numpy._core._multiarray_umath");
    } catch (const py::error_already_set&) {
      m = py::module_::import("numpy.core._multiarray_umath");
    }
    py::object cap = m.attr("_ARRAY_API");
    void** api = static_cast<void**>(PyCapsule_GetPointer(cap.ptr(), nullptr));
    if (!api) throw py::error_already_set();
    return reinterpret_cast<ScalarFn>(api[60]);
  }();
  return fn;
}

// A NumPy scalar of T's dtype holding v.
template <class T>
py::object numpy_scalar(T v) {
  // Never destroyed: a static py::object would be released after the interpreter.
  static py::object* descr = new py::object(py::dtype::of<T>());
  PyObject* r = numpy_scalar_fn()(&v, descr->ptr(), nullptr);
  if (!r) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(r);
}

// The call without options on N x C contiguous logits and their N int64 targets, into g (or
// no gradient) and rl (N row losses for reduction 0): false for a class index out of range
// (the caller then takes the general path, which names the row), else the kernel's total.
template <class T>
bool run_plain(const T* x, int64_t N, int64_t C, const int64_t* t, int reduction, int num_threads,
               T* g, T* rl, double* total) {
  fastxent::Options opt;
  opt.reduction = static_cast<fastxent::Reduction>(reduction);
  opt.num_threads = num_threads;
  fastxent::Inputs<T> in;
  in.logits = x;
  in.rows = N;
  in.classes = C;
  in.row_stride = C;
  in.target = t;
  try {
    // The GIL is released only for a call long enough to be worth it (its release and
    // re-acquisition cost about as much as the kernel on a few hundred logits).
    std::optional<py::gil_scoped_release> release;
    if (N * C >= kReleaseGil) release.emplace();
    *total = fastxent::cross_entropy<T>(in, opt, g, rl);
  } catch (const std::out_of_range&) {
    return false;
  }
  return true;
}

template <class T>
py::object fast_call(const py::array& x, const py::array& t, int reduction, bool want_grad,
                     const py::object& out, int num_threads) {
  const py::ssize_t N = x.shape(0), C = x.shape(1);
  py::array grad;
  if (want_grad) {
    if (out.is_none()) {
      grad = py::array_t<T>({N, C});
    } else {
      if (!exact_ndarray(out)) return py::none();
      py::array o = py::reinterpret_borrow<py::array>(out);
      if (!is_dtype<T>(o) || o.ndim() != 2 || o.shape(0) != N || o.shape(1) != C || !native_c2(o) ||
          !o.writeable() || overlaps(o, t) || (o.ptr() != x.ptr() && overlaps(o, x)))
        return py::none();
      grad = o;
    }
  }
  py::array_t<T> rows;
  if (reduction == 0) rows = py::array_t<T>(N);
  T* g = want_grad ? static_cast<T*>(grad.mutable_data()) : nullptr;
  T* rl = reduction == 0 ? rows.mutable_data() : nullptr;
  double total;
  if (!run_plain<T>(static_cast<const T*>(x.data()), N, C, static_cast<const int64_t*>(t.data()),
                    reduction, num_threads, g, rl, &total))
    return py::none();  // a bad class index: the general path raises the detailed error
  py::object loss;
  if (reduction == 0) {
    loss = rows;
  } else {
    loss = numpy_scalar<T>(T(total));
  }
  if (!want_grad) return loss;
  return py::make_tuple(loss, grad);
}

// fastxent.torch's lean path: the call without options on memory given by address (a
// C-contiguous (N, C) float32/float64 tensor, its N int64 targets, an (N, C) gradient buffer
// or none, and the loss's memory: one value, or N row losses for reduction 0), all checked
// by the caller, which holds the tensors for the duration of the call. Returns false for a
// class index out of range: the caller then takes the general path, which names the row.
template <class T>
bool fast_raw(std::uintptr_t x, int64_t N, int64_t C, std::uintptr_t t, int reduction,
              std::uintptr_t grad, std::uintptr_t loss) {
  double total;
  if (!run_plain<T>(reinterpret_cast<const T*>(x), N, C, reinterpret_cast<const int64_t*>(t),
                    reduction, 0, grad ? reinterpret_cast<T*>(grad) : nullptr,
                    reduction == 0 ? reinterpret_cast<T*>(loss) : nullptr, &total))
    return false;
  if (reduction != 0) *reinterpret_cast<T*>(loss) = T(total);
  return true;
}

}  // namespace

void register_fast(py::module_& m) {
  m.def(
      "fast_call",
      [](const py::object& logits, const py::object& target, int reduction, bool want_grad,
         const py::object& out, int num_threads) -> py::object {
        if (!exact_ndarray(logits) || !exact_ndarray(target)) return py::none();
        py::array x = py::reinterpret_borrow<py::array>(logits);
        py::array t = py::reinterpret_borrow<py::array>(target);
        if (x.ndim() != 2 || x.shape(1) == 0 || !native_c2(x) || t.ndim() != 1 ||
            t.shape(0) != x.shape(0) || !is_dtype<int64_t>(t) || !native_c2(t) || reduction < 0 ||
            reduction > 2 || num_threads < 0)
          return py::none();
        if (is_dtype<float>(x))
          return fast_call<float>(x, t, reduction, want_grad, out, num_threads);
        if (is_dtype<double>(x))
          return fast_call<double>(x, t, reduction, want_grad, out, num_threads);
        return py::none();
      },
      py::arg("logits"), py::arg("target"), py::arg("reduction"), py::arg("want_grad"),
      py::arg("out"), py::arg("num_threads"),
      "The common call without options, checked here; None when the general path is needed.");

  m.def(
      "fast_call_raw",
      [](std::uintptr_t x, int64_t N, int64_t C, int itemsize, std::uintptr_t t, int reduction,
         std::uintptr_t grad, std::uintptr_t loss) -> bool {
        if (!x || !t || !loss || N < 1 || C < 1 || reduction < 0 || reduction > 2)
          throw std::invalid_argument("fast_call_raw: bad addresses or sizes");
        if (itemsize == 4) return fast_raw<float>(x, N, C, t, reduction, grad, loss);
        if (itemsize == 8) return fast_raw<double>(x, N, C, t, reduction, grad, loss);
        throw std::invalid_argument("fast_call_raw: itemsize must be 4 or 8");
      },
      py::arg("logits"), py::arg("rows"), py::arg("classes"), py::arg("itemsize"),
      py::arg("target"), py::arg("reduction"), py::arg("grad"), py::arg("loss"),
      "Private to fastxent.torch's lean path: the call without options on memory given by "
      "address (unchecked: the caller checks layout and dtype and holds the memory). False "
      "for a class index out of range.");
}

}  // namespace fastxent_py
