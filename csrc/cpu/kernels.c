// kernels.c — builds one function table per instruction-set path and the public entry points of kernels.h.
#include "kernels.h"
#ifdef _OPENMP
#include <omp.h>
#endif

typedef struct {
#define X(name, P) void (*name)(const P*);
    PYLLM_KERNELS(X)
#undef X
} kernel_table;

// Variant symbols, one set per compiled path (isa_scalar.c, isa_avx2.c, isa_avx512.c).
#define X(name, P) void name##_scalar(const P*); void name##_avx2(const P*); void name##_avx512(const P*);
PYLLM_KERNELS(X)
#undef X

static const kernel_table g_tables[PYLLM_ISA_COUNT] = {
#define X(name, P) name##_scalar,
    {PYLLM_KERNELS(X)},
#undef X
#define X(name, P) name##_avx2,
    {PYLLM_KERNELS(X)},
#undef X
#define X(name, P) name##_avx512,
    {PYLLM_KERNELS(X)},
#undef X
};

#define X(name, P) void name(const P* p) { g_tables[isa_get()].name(p); }
PYLLM_KERNELS(X)
#undef X

static unsigned g_oom;
void kernels_oom_note(void) { __atomic_add_fetch(&g_oom, 1u, __ATOMIC_RELAXED); }
unsigned kernels_oom_count(void) { return __atomic_load_n(&g_oom, __ATOMIC_RELAXED); }

void kernels_set_threads(int n) {
#ifdef _OPENMP
    if (n <= 0) n = omp_get_num_procs();
    omp_set_num_threads(n);
#else
    (void)n;
#endif
}

int kernels_get_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}
