// kernels_impl.h — every kernel body, compiled once per path by isa_{scalar,avx2,avx512}.c.
// Each includer sets the target pragma and KFN(name) (the symbol suffix) before including this file.
#include <math.h>
#include <stdint.h>
#include <string.h>
#include "kernels.h"
#include "simd.h"
#ifdef _OPENMP
#include <omp.h>
#endif

// for (int i = 0; i < n; i++) { ... }, as an OpenMP static loop when `big` and the caller is not already inside a
// parallel region, else as a plain loop. run.c's forward calls the kernels from inside its own region, once per
// thread: a nested `omp parallel for if (0)` there still builds a one-thread team in libgomp (0.5-0.9 us per call
// measured here, ~90 calls per token for llama2.c's 15M model, ~10% of a 2-thread Q8_0 token).
#ifdef _OPENMP
#define K_FOR(big, i, n, ...)                                                                               \
    do {                                                                                                    \
        if ((big) && omp_get_level() == 0) {                                                                \
            _Pragma("omp parallel for schedule(static)") for (int i = 0; i < (n); i++) { __VA_ARGS__; }     \
        } else {                                                                                            \
            for (int i = 0; i < (n); i++) { __VA_ARGS__; }                                                  \
        }                                                                                                   \
    } while (0)
#else
#define K_FOR(big, i, n, ...) do { for (int i = 0; i < (n); i++) { __VA_ARGS__; } } while (0)
#endif

#include "impl_norm.h"
#include "impl_matvec.h"
#include "impl_matmul.h"
#include "impl_sample.h"
#include "impl_fused.h"
#include "impl_attention.h"
