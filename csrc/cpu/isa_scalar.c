// isa_scalar.c — the scalar build of every kernel in kernels_impl.h (symbols end in _scalar).
// portable x86-64 baseline (SSE2): no target pragma
#include <stdlib.h>
#define KFN(name) name##_scalar
#include "kernels_impl.h"
