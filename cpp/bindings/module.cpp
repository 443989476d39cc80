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

#include "bindings.hpp"
#include "fastxent/fastxent.hpp"

namespace py = pybind11;

namespace {

using namespace fastxent_py;

// The column layout (class axis not last): a C-contiguous (outer, C, inner) array.
template <class T>
const T* cols_view(const py::array& a, py::ssize_t outer, py::ssize_t C, py::ssize_t inner,
                   const char* what) {
  if (!is_dtype<T>(a) || a.ndim() != 3 || a.shape(0) != outer || a.shape(1) != C ||
      a.shape(2) != inner || !c_contiguous(a))
    throw std::invalid_argument(std::string(what) +
                                ": expected a C-contiguous (outer, C, inner) array of the logits' dtype");
  return static_cast<const T*>(a.data());
}

// Fills the layout, targets and weights shared by fastxent::Inputs<T> and HalfInputs from
// the Python arguments: S is the storage type of logits and probabilities, W that of the
// weights. Returns the gradient pointer (null without out=).
template <class S, class W, class In>
S* fill_inputs(In& in, const py::array& logits, const py::object& target,
               const py::object& probs, const py::object& weight,
               const py::object& sample_weight, const py::object& grad) {
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
      in.probs = rows_view<S>(py::reinterpret_borrow<py::array>(probs), N, C,
                              &in.probs_row_stride, "probability target");
  } else {
    throw std::invalid_argument("logits: expected a 2-D (rows, C) or 3-D (outer, C, inner) array");
  }
  in.rows = N;
  in.classes = C;
  if (!target.is_none()) {
    py::array t = py::reinterpret_borrow<py::array>(target);
    if (!is_dtype<int64_t>(t) || t.ndim() != 1 || t.shape(0) != N || !c_contiguous(t))
      throw std::invalid_argument("target: expected a C-contiguous int64 array of N elements");
    in.target = static_cast<const int64_t*>(t.data());
  }
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

template <class T>
double run(const py::array& logits, const py::object& target, const py::object& probs,
           const py::object& weight, const py::object& sample_weight,
           fastxent::Options opt, const py::object& grad, const py::object& row_losses) {
  fastxent::Inputs<T> in;
  T* g = fill_inputs<T, T>(in, logits, target, probs, weight, sample_weight, grad);
  T* rl = checked_output<T>(row_losses, in.rows, 1, 1, "row_losses");
  // Safe without the GIL: the arrays are kept alive by the caller's references for the whole
  // call, and the kernel touches no Python object.
  py::gil_scoped_release release;
  // Rounded to T here: a float32 loss beyond the float range is inf, quietly, as "none" rows.
  return double(T(fastxent::cross_entropy<T>(in, opt, g, rl)));
}

// float16 / bfloat16 logits arrive as uint16 views; weights as float32.
double run_half(const py::array& logits, int kind, const py::object& target,
                const py::object& probs, const py::object& weight,
                const py::object& sample_weight, fastxent::Options opt, const py::object& grad,
                const py::object& row_losses) {
  fastxent::HalfInputs in;
  if (kind != 0 && kind != 1) throw std::invalid_argument("kind: 0 (float16) or 1 (bfloat16)");
  in.kind = static_cast<fastxent::HalfKind>(kind);
  uint16_t* g =
      fill_inputs<uint16_t, float>(in, logits, target, probs, weight, sample_weight, grad);
  float* rl = checked_output<float>(row_losses, in.rows, 1, 1, "row_losses");
  py::gil_scoped_release release;  // as in run(): no Python object is touched
  return double(float(fastxent::cross_entropy_half(in, opt, g, rl)));
}

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

// The small-call fast path: every check of the common call (2-D C-contiguous native
// float32/float64 logits, C > 0, int64 targets of N elements, no options, out= absent or
// logits itself or a separate C-contiguous writable array) done here in C++, with None
// returned whenever the general Python path is needed (which also produces every error
// message, including that of a bad class index).
bool native_c2(const py::array& a) {
  return c_contiguous(a) && a.dtype().byteorder() != '>' && a.dtype().byteorder() != '!';
}

bool overlaps(const py::array& a, const py::array& b) {
  const char* a0 = static_cast<const char*>(a.data());
  const char* b0 = static_cast<const char*>(b.data());
  return a0 < b0 + b.nbytes() && b0 < a0 + a.nbytes();
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
      if (!py::isinstance<py::array>(out)) return py::none();
      py::array o = py::reinterpret_borrow<py::array>(out);
      if (!is_dtype<T>(o) || o.ndim() != 2 || o.shape(0) != N || o.shape(1) != C ||
          !native_c2(o) || !o.writeable() || overlaps(o, t) ||
          (o.ptr() != x.ptr() && overlaps(o, x)))
        return py::none();
      grad = o;
    }
  }
  py::array_t<T> rows;
  if (reduction == 0) rows = py::array_t<T>(N);
  fastxent::Options opt;
  opt.reduction = static_cast<fastxent::Reduction>(reduction);
  opt.num_threads = num_threads;
  fastxent::Inputs<T> in;
  in.logits = static_cast<const T*>(x.data());
  in.rows = N;
  in.classes = C;
  in.row_stride = C;
  in.target = static_cast<const int64_t*>(t.data());
  T* g = want_grad ? static_cast<T*>(grad.mutable_data()) : nullptr;
  T* rl = reduction == 0 ? rows.mutable_data() : nullptr;
  double total;
  try {
    py::gil_scoped_release release;
    total = fastxent::cross_entropy<T>(in, opt, g, rl);
  } catch (const std::out_of_range&) {
    return py::none();  // a bad class index: the general path raises the detailed error
  }
  py::object loss;
  if (reduction == 0) {
    loss = rows;
  } else {
    // Never destroyed: a static py::object would be released after the interpreter.
    static py::object* scalar = new py::object(
        py::module_::import("numpy").attr(sizeof(T) == 4 ? "float32" : "float64"));
    loss = (*scalar)(double(T(total)));
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
  fastxent::Options opt;
  opt.reduction = static_cast<fastxent::Reduction>(reduction);
  fastxent::Inputs<T> in;
  in.logits = reinterpret_cast<const T*>(x);
  in.rows = N;
  in.classes = C;
  in.row_stride = C;
  in.target = reinterpret_cast<const int64_t*>(t);
  T* g = grad ? reinterpret_cast<T*>(grad) : nullptr;
  T* rl = reduction == 0 ? reinterpret_cast<T*>(loss) : nullptr;
  double total;
  try {
    py::gil_scoped_release release;
    total = fastxent::cross_entropy<T>(in, opt, g, rl);
  } catch (const std::out_of_range&) {
    return false;
  }
  if (reduction != 0) *reinterpret_cast<T*>(loss) = T(total);
  return true;
}

}  // namespace

#if defined(FASTXENT_XLA_FFI)
namespace fastxent_py {
void register_xla_ffi(py::module_& core);  // cpp/ffi/register.cpp: the submodule xla_ffi
}
#endif

PYBIND11_MODULE(_core, m) {
  m.doc() = "fastxent compiled core: fused softmax cross-entropy kernels (private; use fastxent)";
#if defined(FASTXENT_XLA_FFI)
  fastxent_py::register_xla_ffi(m);
#endif

  m.def(
      "cross_entropy",
      [](const py::array& logits, const py::object& target, const py::object& probs,
         const py::object& weight, const py::object& sample_weight, int reduction,
         int64_t ignore_index, double label_smoothing, double z_loss, double softcap,
         double logit_scale, const py::object& normalizer, int num_threads,
         const py::object& grad, const py::object& row_losses) -> double {
        const fastxent::Options opt = make_options(reduction, ignore_index, label_smoothing,
                                                   z_loss, softcap, logit_scale, normalizer,
                                                   num_threads);
        if (is_dtype<float>(logits))
          return run<float>(logits, target, probs, weight, sample_weight, opt, grad, row_losses);
        if (is_dtype<double>(logits))
          return run<double>(logits, target, probs, weight, sample_weight, opt, grad, row_losses);
        throw py::type_error("logits: expected float32 or float64");
      },
      py::arg("logits"), py::arg("target"), py::arg("probs"), py::arg("weight"),
      py::arg("sample_weight"), py::arg("reduction"), py::arg("ignore_index"),
      py::arg("label_smoothing"), py::arg("z_loss"), py::arg("softcap"), py::arg("logit_scale"),
      py::arg("normalizer"), py::arg("num_threads"), py::arg("grad"), py::arg("row_losses"),
      "Low-level kernel call on a 2-D logits view (rows, C) with a contiguous class axis, or a "
      "C-contiguous (outer, C, inner) array (class axis not last): "
      "int64 class targets or a (rows, C) probability target, reduction 0=none 1=sum 2=mean, "
      "softcap 0 = off. Returns the reduced loss (0 for none).");

  m.def(
      "fast_call",
      [](const py::object& logits, const py::object& target, int reduction, bool want_grad,
         const py::object& out, int num_threads) -> py::object {
        if (!py::isinstance<py::array>(logits) || !py::isinstance<py::array>(target))
          return py::none();
        py::array x = py::reinterpret_borrow<py::array>(logits);
        py::array t = py::reinterpret_borrow<py::array>(target);
        if (x.ndim() != 2 || x.shape(1) == 0 || !native_c2(x) || t.ndim() != 1 ||
            t.shape(0) != x.shape(0) || !is_dtype<int64_t>(t) || !native_c2(t) ||
            reduction < 0 || reduction > 2 || num_threads < 0)
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

  m.def(
      "cross_entropy_half",
      [](const py::array& logits, int kind, const py::object& target, const py::object& probs,
         const py::object& weight, const py::object& sample_weight, int reduction,
         int64_t ignore_index, double label_smoothing, double z_loss, double softcap,
         double logit_scale, const py::object& normalizer, int num_threads,
         const py::object& grad, const py::object& row_losses) -> double {
        return run_half(logits, kind, target, probs, weight, sample_weight,
                        make_options(reduction, ignore_index, label_smoothing, z_loss, softcap,
                                     logit_scale, normalizer, num_threads),
                        grad, row_losses);
      },
      py::arg("logits"), py::arg("kind"), py::arg("target"), py::arg("probs"), py::arg("weight"),
      py::arg("sample_weight"), py::arg("reduction"), py::arg("ignore_index"),
      py::arg("label_smoothing"), py::arg("z_loss"), py::arg("softcap"), py::arg("logit_scale"),
      py::arg("normalizer"), py::arg("num_threads"), py::arg("grad"), py::arg("row_losses"),
      "As cross_entropy, for float16 (kind 0) / bfloat16 (kind 1) logits passed as uint16 "
      "views; float32 weights, float32 row losses, float32 loss.");

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

  fastxent_py::bind_sigmoid(m);
  fastxent_py::bind_shard(m);

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
