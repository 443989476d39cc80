// Included by every header whose code lives in the ISA namespace: each isa_<name>.cpp defines
// FASTXENT_ISA_NS (its namespace, fastxent::<name>) before including them, so that an inline
// function compiled with one ISA's flags can never be picked by the linker for another's caller.
#ifndef FASTXENT_ISA_NS
#error "define FASTXENT_ISA_NS (the ISA namespace) before including this header"
#endif
