// isa_avx2.c — the avx2 build of every kernel in kernels_impl.h (symbols end in _avx2).
#pragma GCC target("avx2,fma,f16c,bmi,bmi2")
#include <stdlib.h>
#define KFN(name) name##_avx2
#include "kernels_impl.h"
