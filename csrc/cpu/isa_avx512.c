// isa_avx512.c — the avx512 build of every kernel in kernels_impl.h (symbols end in _avx512).
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2")
#include <stdlib.h>
#define KFN(name) name##_avx512
#include "kernels_impl.h"
