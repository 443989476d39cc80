// Driver of the sigmoid (binary / multi-label) cross-entropy.
#include "fastxent/fastxent.hpp"
#include "kernel_table.hpp"
