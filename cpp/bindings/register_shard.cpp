// Owns the entry points of the vocabulary-sharded statistics (fastxent/shard.hpp): dtype,
// shape and layout checks, then the C++ calls without the GIL; shard_stats, stats_loss and
// shard_grad take the shared _core.Options. Argument handling for users (array likes,
// reductions by name, leading axes) is in python/fastxent/_shard.py.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "bindings.hpp"
#include "fastxent/shard.hpp"

namespace fastxent_py {

namespace {

// A (rows, fields) C-contiguous float64 array (fields: kStatFields, or kOutFields for output
// statistics).
double* stats_array(const py::object& o, py::ssize_t rows, bool writable, const char* what,
                    int fields = fastxent::kStatFields) {
  py::array a = py::reinterpret_borrow<py::array>(o);
  if (!is_dtype<double>(a) || a.ndim() != 2 || a.shape(0) != rows || a.shape(1) != fields ||
      !c_contiguous(a))
    throw std::invalid_argument(std::string(what) +
                                ": expected a C-contiguous float64 array "
                                "of shape (" +
                                std::to_string(rows) + ", " + std::to_string(fields) + ")");
  if (writable && !a.writeable()) throw std::invalid_argument(std::string(what) + ": read-only");
  return static_cast<double*>(const_cast<void*>(a.data()));
}

template <class T>
fastxent::ShardInputs<T> shard_inputs(const py::array& logits, const py::object& target,
                                      const py::object& probs, const py::object& weight,
                                      int64_t offset, int64_t num_classes) {
  fastxent::ShardInputs<T> in;
  if (logits.ndim() != 2) throw std::invalid_argument("logits: expected a 2-D (rows, C) array");
  const py::ssize_t N = logits.shape(0), C = logits.shape(1);
  in.logits = rows_view<T>(logits, N, C, &in.row_stride, "logits");
  in.rows = N;
  in.classes = C;
  in.offset = offset;
  in.num_classes = num_classes;
  in.target = checked_target(target, N);
  if (!probs.is_none())
    in.probs = rows_view<T>(py::reinterpret_borrow<py::array>(probs), N, C, &in.probs_row_stride,
                            "probability target");
  in.weight = checked_vector<T>(weight, C, "weight");
  return in;
}

template <class T>
void stats_impl(const py::array& logits, const py::object& target, const py::object& probs,
                const py::object& weight, int64_t offset, int64_t num_classes,
                const fastxent::Options& opt, const py::object& out, const py::object& outs) {
  const fastxent::ShardInputs<T> in =
      shard_inputs<T>(logits, target, probs, weight, offset, num_classes);
  double* st = stats_array(out, in.rows, true, "out");
  double* os =
      outs.is_none() ? nullptr : stats_array(outs, in.rows, true, "outs", fastxent::kOutFields);
  py::gil_scoped_release release;
  fastxent::shard_stats<T>(in, opt, st, os);
}

template <class T>
void grad_impl(const py::array& logits, const py::object& target, const py::object& probs,
               const py::object& weight, const py::object& stats, const py::object& sample_weight,
               int64_t offset, int64_t num_classes, const fastxent::Options& opt, double scale,
               const py::object& grad) {
  const fastxent::ShardInputs<T> in =
      shard_inputs<T>(logits, target, probs, weight, offset, num_classes);
  const double* st = stats_array(stats, in.rows, false, "stats");
  const T* sw = checked_vector<T>(sample_weight, in.rows, "sample_weight");
  T* g = checked_output<T>(grad, in.rows, in.classes, 2, "out");
  py::gil_scoped_release release;
  fastxent::shard_grad<T>(in, st, sw, opt, scale, g);
}

// out = a (+) b through merge, for (rows, fields) arrays.
void merge_impl(const py::object& a, const py::object& b, const py::object& out, int fields,
                void (*merge)(const double*, const double*, int64_t, double*)) {
  const py::array aa = py::reinterpret_borrow<py::array>(a);
  const py::ssize_t rows = aa.ndim() == 2 ? aa.shape(0) : -1;
  const double* pa = stats_array(a, rows, false, "a", fields);
  const double* pb = stats_array(b, rows, false, "b", fields);
  double* po = stats_array(out, rows, true, "out", fields);
  py::gil_scoped_release release;
  merge(pa, pb, rows, po);
}

}  // namespace

void register_shard(py::module_& m) {
  m.attr("STAT_FIELDS") = py::int_(fastxent::kStatFields);
  m.attr("OUT_FIELDS") = py::int_(fastxent::kOutFields);
  m.def(
      "shard_stats",
      [](const py::array& logits, const py::object& target, const py::object& probs,
         const py::object& weight, int64_t offset, int64_t num_classes,
         const fastxent::Options& options, const py::object& out, const py::object& outs) {
        const fastxent::Options opt = options;  // a copy: read without the GIL
        if (is_dtype<float>(logits))
          return stats_impl<float>(logits, target, probs, weight, offset, num_classes, opt, out,
                                   outs);
        if (is_dtype<double>(logits))
          return stats_impl<double>(logits, target, probs, weight, offset, num_classes, opt, out,
                                    outs);
        throw py::type_error("logits: expected float32 or float64");
      },
      py::arg("logits"), py::arg("target"), py::arg("probs"), py::arg("weight"), py::arg("offset"),
      py::arg("num_classes"), py::arg("options"), py::arg("out"), py::arg("outs") = py::none(),
      "Per-row statistics of one vocabulary shard into out (rows, STAT_FIELDS) float64 and, "
      "unless outs is None, output statistics into outs (rows, OUT_FIELDS) (Options: "
      "ignore_index, label_smoothing, softcap, logit_scale, num_threads).");
  m.def(
      "merge_output_stats",
      [](const py::object& a, const py::object& b, const py::object& out) {
        merge_impl(a, b, out, fastxent::kOutFields, &fastxent::merge_output_stats);
      },
      py::arg("a"), py::arg("b"), py::arg("out"),
      "out = a (+) b for output statistics, row by row (out may alias).");
  m.def(
      "merge_stats",
      [](const py::object& a, const py::object& b, const py::object& out) {
        merge_impl(a, b, out, fastxent::kStatFields, &fastxent::merge_stats);
      },
      py::arg("a"), py::arg("b"), py::arg("out"), "out = a (+) b, row by row (out may alias).");
  m.def(
      "stats_loss",
      [](const py::object& stats, const py::object& sample_weight, const fastxent::Options& options,
         int64_t num_classes, const py::object& row_losses) {
        py::array a = py::reinterpret_borrow<py::array>(stats);
        const py::ssize_t rows = a.ndim() == 2 ? a.shape(0) : -1;
        const double* st = stats_array(stats, rows, false, "stats");
        const double* sw = checked_vector<double>(sample_weight, rows, "sample_weight");
        double* rl = checked_output<double>(row_losses, rows, 1, 1, "row_losses");
        const fastxent::Options opt = options;  // a copy: read without the GIL
        py::gil_scoped_release release;
        return fastxent::stats_loss(st, rows, sw, opt, num_classes, rl);
      },
      py::arg("stats"), py::arg("sample_weight"), py::arg("options"), py::arg("num_classes"),
      py::arg("row_losses"),
      "The loss from merged statistics (float64 sample weights and row losses; Options: "
      "reduction, z_loss, normalizer).");
  m.def(
      "stats_denominator",
      [](const py::object& stats, const py::object& sample_weight) {
        py::array a = py::reinterpret_borrow<py::array>(stats);
        const py::ssize_t rows = a.ndim() == 2 ? a.shape(0) : -1;
        const double* st = stats_array(stats, rows, false, "stats");
        const double* sw = checked_vector<double>(sample_weight, rows, "sample_weight");
        return fastxent::stats_denominator(st, rows, sw);
      },
      py::arg("stats"), py::arg("sample_weight"),
      "The 'mean' denominator of merged statistics (float64 sample weights).");
  m.def(
      "shard_grad",
      [](const py::array& logits, const py::object& target, const py::object& probs,
         const py::object& weight, const py::object& stats, const py::object& sample_weight,
         int64_t offset, int64_t num_classes, const fastxent::Options& options, double scale,
         const py::object& grad) {
        const fastxent::Options opt = options;  // a copy: read without the GIL
        if (is_dtype<float>(logits))
          return grad_impl<float>(logits, target, probs, weight, stats, sample_weight, offset,
                                  num_classes, opt, scale, grad);
        if (is_dtype<double>(logits))
          return grad_impl<double>(logits, target, probs, weight, stats, sample_weight, offset,
                                   num_classes, opt, scale, grad);
        throw py::type_error("logits: expected float32 or float64");
      },
      py::arg("logits"), py::arg("target"), py::arg("probs"), py::arg("weight"), py::arg("stats"),
      py::arg("sample_weight"), py::arg("offset"), py::arg("num_classes"), py::arg("options"),
      py::arg("scale"), py::arg("grad"),
      "The gradient of one shard from merged statistics, into grad (may be the logits).");
}

}  // namespace fastxent_py
