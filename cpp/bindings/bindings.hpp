// Registration functions of the pybind11 module, one per source file of cpp/bindings/.
#pragma once

#include <pybind11/pybind11.h>

namespace fastxent_py {
void bind_sigmoid(pybind11::module_& m);
}  // namespace fastxent_py
