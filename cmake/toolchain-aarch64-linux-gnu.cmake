# Cross-compiling for aarch64 Linux with Debian's toolchain (g++-aarch64-linux-gnu); the
# binaries run under qemu-user (qemu-aarch64) with the toolchain's sysroot, so ctest runs the
# C++ tests as on an ARM machine. Used by .ci/arm:
#   cmake -S . -B build/arm -DCMAKE_TOOLCHAIN_FILE=cmake/toolchain-aarch64-linux-gnu.cmake
# FASTXENT_AARCH64_SYSROOT overrides the sysroot (default /usr/aarch64-linux-gnu).
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)

if(NOT FASTXENT_AARCH64_SYSROOT)
  set(FASTXENT_AARCH64_SYSROOT /usr/aarch64-linux-gnu)
endif()
set(CMAKE_FIND_ROOT_PATH ${FASTXENT_AARCH64_SYSROOT})
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)

# ctest (and add_test commands naming a target) run the test binaries through qemu.
set(CMAKE_CROSSCOMPILING_EMULATOR qemu-aarch64 -L ${FASTXENT_AARCH64_SYSROOT})
