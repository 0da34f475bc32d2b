// The bindings of the CPU-emulated extension transformer._C_emu: bindings.cpp with TILEFORMER_EMULATE,
// so the ops land in torch.ops.tileformer_emu for the CPU dispatch key. The launchers (.cu) are
// compiled by g++ into the same extension (setup.py generates one wrapper .cpp per .cu).
#ifndef TILEFORMER_EMULATE
#define TILEFORMER_EMULATE 1
#endif
#include "bindings.cpp"
