// Owns _core.Options: the C++ fastxent::Options bound once, field for field, and handed whole
// to every entry point that takes options (rows, 16-bit, column layout, shard, sigmoid).
// Python builds it in one call from a validated fastxent._options.LossOptions (the same
// fields in the same order: the positional constructor); a new scalar option is one
// constructor argument and one def_readwrite line here. The values are checked by the core.
#include <pybind11/pybind11.h>

#include "bindings.hpp"

namespace fastxent_py {

void register_options(py::module_& m) {
  using fastxent::Options;
  // The plain `type` metaclass (no static properties here): stubtest then sees the class the
  // stub declares, not pybind11's own metaclass. Module-local: pybind11's type registry is
  // shared by every extension built with the same pybind11 internals, so a second copy of
  // this module in one process (two fastxent builds side by side, as
  // tools/bench_side_by_side.py loads them) would otherwise fail with "generic_type: type
  // "Options" is already registered!".
  py::class_<Options>(m, "Options", py::metaclass(reinterpret_cast<PyObject*>(&PyType_Type)),
                      py::module_local(),
                      "The scalar options of one call (fastxent::Options): reduction 0=none "
                      "1=sum 2=mean, softcap 0 = off, normalizer None = the default "
                      "denominator, num_threads 0 = OpenMP's default.")
      .def(py::init<>())
      .def(py::init([](int reduction, int64_t ignore_index, double label_smoothing, double z_loss,
                       double softcap, double logit_scale, const py::object& normalizer,
                       int num_threads, double entropy_coef) {
             Options o;
             o.reduction = static_cast<fastxent::Reduction>(reduction);
             o.ignore_index = ignore_index;
             o.label_smoothing = label_smoothing;
             o.z_loss = z_loss;
             o.softcap = softcap;
             o.logit_scale = logit_scale;
             o.has_normalizer = !normalizer.is_none();
             o.normalizer = o.has_normalizer ? normalizer.cast<double>() : 0.0;
             o.num_threads = num_threads;
             o.entropy_coef = entropy_coef;
             return o;
           }),
           py::arg("reduction"), py::arg("ignore_index"), py::arg("label_smoothing"),
           py::arg("z_loss"), py::arg("softcap"), py::arg("logit_scale"), py::arg("normalizer"),
           py::arg("num_threads"), py::arg("entropy_coef") = 0.0)
      .def_property(
          "reduction", [](const Options& o) { return static_cast<int>(o.reduction); },
          [](Options& o, int r) { o.reduction = static_cast<fastxent::Reduction>(r); })
      .def_readwrite("ignore_index", &Options::ignore_index)
      .def_readwrite("label_smoothing", &Options::label_smoothing)
      .def_readwrite("z_loss", &Options::z_loss)
      .def_readwrite("softcap", &Options::softcap)
      .def_readwrite("logit_scale", &Options::logit_scale)
      .def_property(
          "normalizer",
          [](const Options& o) -> py::object {
            return o.has_normalizer ? py::object(py::float_(o.normalizer)) : py::none();
          },
          [](Options& o, const py::object& v) {
            o.has_normalizer = !v.is_none();
            o.normalizer = o.has_normalizer ? v.cast<double>() : 0.0;
          })
      .def_readwrite("num_threads", &Options::num_threads)
      .def_readwrite("entropy_coef", &Options::entropy_coef);
}

}  // namespace fastxent_py
