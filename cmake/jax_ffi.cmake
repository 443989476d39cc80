# fastxent._core.xla_ffi: the XLA FFI handlers used by fastxent.jax (cpp/ffi/), compiled into _core.
# XLA's FFI headers are not part of this repository: they are taken from the jaxlib installed
# in the build's Python (jaxlib/include/xla/ffi/api/*.h). FASTXENT_JAX_FFI:
#   AUTO (default) builds the handlers when those headers are found, and skips them otherwise
#        (fastxent.jax then runs through jax.pure_callback);
#   ON requires them; OFF never builds them.
# The handlers link against nothing from jaxlib: XLA passes its C API table at call time.
set(FASTXENT_JAX_FFI AUTO CACHE STRING
    "Build the XLA FFI handlers for fastxent.jax (AUTO, ON, OFF)")
set_property(CACHE FASTXENT_JAX_FFI PROPERTY STRINGS AUTO ON OFF)

if(NOT FASTXENT_JAX_FFI STREQUAL "OFF")
  string(CONCAT _jaxlib_py "import os, jaxlib, jaxlib.version as v\n"
         "print(os.path.join(os.path.dirname(jaxlib.__file__), 'include'))\n"
         "print(v.__version__)")
  execute_process(COMMAND "${Python_EXECUTABLE}" -c "${_jaxlib_py}"
                  OUTPUT_VARIABLE _jaxlib_out OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET
                  RESULT_VARIABLE _jaxlib_rc)
  set(_jaxlib_inc "")
  if(_jaxlib_rc EQUAL 0)
    string(REPLACE "\n" ";" _jaxlib_out "${_jaxlib_out}")
    list(GET _jaxlib_out 0 _jaxlib_inc)
    list(GET _jaxlib_out 1 _jaxlib_ver)
  endif()
  if(_jaxlib_inc AND EXISTS "${_jaxlib_inc}/xla/ffi/api/ffi.h")
    message(STATUS "fastxent: XLA FFI handlers for fastxent.jax, headers of jaxlib ${_jaxlib_ver}")
    # Compiled into _core: one copy of the kernel and of its ISA choice (fastxent.set_isa,
    # FASTXENT_ISA) for the NumPy, PyTorch and JAX paths alike.
    target_sources(_core PRIVATE cpp/ffi/register.cpp cpp/ffi/xla_handlers.cpp
                                 cpp/ffi/distill_handlers.cpp)
    target_include_directories(_core SYSTEM PRIVATE "${_jaxlib_inc}")
    target_compile_definitions(_core PRIVATE FASTXENT_XLA_FFI
                               FASTXENT_JAXLIB_VERSION="${_jaxlib_ver}")
  elseif(FASTXENT_JAX_FFI STREQUAL "ON")
    message(FATAL_ERROR "fastxent: FASTXENT_JAX_FFI=ON but no jaxlib with XLA FFI headers in "
                        "${Python_EXECUTABLE}")
  else()
    message(STATUS "fastxent: no jaxlib FFI headers found; fastxent.jax will use pure_callback")
  endif()
endif()
