// isa.c — cpuid feature detection and the PYLLM_ISA override; see isa.h.
#define _GNU_SOURCE   // syscall() under -std=c11
#include "isa.h"
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

static cpu_features g_features;
static int g_features_done = 0;
static int g_isa = -1;
static const char* g_env_error = NULL;

#if defined(__x86_64__) || defined(__i386__)
static unsigned long long xgetbv0(void) {
    unsigned int eax, edx;
    __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
    return ((unsigned long long)edx << 32) | eax;
}
#endif

// Fills a local copy first: threads racing through the first call (run.c calls kernels from inside a parallel
// region) must never see a half-filled or zeroed g_features; a second writer stores the same values.
const cpu_features* cpu_features_get(void) {
    if (__atomic_load_n(&g_features_done, __ATOMIC_ACQUIRE)) return &g_features;
    cpu_features f;
    memset(&f, 0, sizeof(f));
#if defined(__x86_64__) || defined(__i386__)
    unsigned int a, b, c, d;
    if (__get_cpuid(1, &a, &b, &c, &d)) {
        int osxsave = (c >> 27) & 1, fma = (c >> 12) & 1;
        unsigned long long xcr0 = osxsave ? xgetbv0() : 0;
        int ymm_ok = (xcr0 & 0x6) == 0x6;             // OS saves SSE+AVX state
        int zmm_ok = (xcr0 & 0xe6) == 0xe6;           // ... and opmask + ZMM state
        if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) {
            f.avx2 = ymm_ok && ((b >> 5) & 1);
            f.fma = ymm_ok && fma;
            f.avx512f = zmm_ok && ((b >> 16) & 1);
            f.avx512dq = zmm_ok && ((b >> 17) & 1);
            f.avx512bw = zmm_ok && ((b >> 30) & 1);
            f.avx512vl = zmm_ok && ((b >> 31) & 1);
            const char* no_vnni = getenv("PYLLM_NO_VNNI");
            f.avx512vnni = f.avx512f && ((c >> 11) & 1) && !(no_vnni && *no_vnni && *no_vnni != '0');
            int amx_os = ((xcr0 >> 17) & 3) == 3;   // XTILECFG + XTILEDATA enabled
            f.amx_bf16 = amx_os && ((d >> 22) & 1);
            f.amx_tile = amx_os && ((d >> 24) & 1);
            const char* no_amx = getenv("PYLLM_NO_AMX");
            if (no_amx && *no_amx && *no_amx != '0') f.amx_bf16 = f.amx_tile = 0;
#if defined(__linux__) && defined(SYS_arch_prctl)
            // Linux hands out the 8 KiB tile state only on request (ARCH_REQ_XCOMP_PERM for XTILEDATA, feature
            // 18), once per process; a tile instruction without it is SIGILL. No permission: no AMX.
            if (f.amx_tile && syscall(SYS_arch_prctl, 0x1023, 18) != 0) f.amx_bf16 = f.amx_tile = 0;
#endif
            unsigned int a1, b1, c1, d1;
            if (__get_cpuid_count(7, 1, &a1, &b1, &c1, &d1))
                f.avx512bf16 = f.avx512f && ((a1 >> 5) & 1);
        }
    }
#endif
#ifdef PYLLM_EMULATE_AVX512
    // tests/test_avx512_emu.py's build: the avx512 path runs on a C model of the instructions (tests/avx512_emu.h),
    // AMX on impl_amx.h's tile model, wherever AVX2 runs; the same PYLLM_NO_VNNI / PYLLM_NO_AMX switches apply
    {
        const char* no_vnni = getenv("PYLLM_NO_VNNI");
        const char* no_amx = getenv("PYLLM_NO_AMX");
        f.avx512f = f.avx512bw = f.avx512vl = f.avx512dq = f.avx2 && f.fma;
        f.avx512vnni = f.avx512f && !(no_vnni && *no_vnni && *no_vnni != '0');
        f.avx512bf16 = f.avx512f;   // vdpbf16ps modelled too (PYLLM_NO_BF16DP=1 turns the k-pair GEMM off)
        f.amx_tile = f.amx_bf16 = f.avx512f && !(no_amx && *no_amx && *no_amx != '0');
    }
#endif
    g_features = f;
    __atomic_store_n(&g_features_done, 1, __ATOMIC_RELEASE);
    return &g_features;
}

int isa_supported(pyllm_isa isa) {
    const cpu_features* f = cpu_features_get();
    switch (isa) {
    case PYLLM_ISA_SCALAR: return 1;
    case PYLLM_ISA_AVX2: return f->avx2 && f->fma;
    case PYLLM_ISA_AVX512: return f->avx2 && f->fma && f->avx512f && f->avx512bw && f->avx512vl && f->avx512dq;
    default: return 0;
    }
}

pyllm_isa isa_best(void) {
    if (isa_supported(PYLLM_ISA_AVX512)) return PYLLM_ISA_AVX512;
    if (isa_supported(PYLLM_ISA_AVX2)) return PYLLM_ISA_AVX2;
    return PYLLM_ISA_SCALAR;
}

const char* isa_name(pyllm_isa isa) {
    static const char* names[] = {"scalar", "avx2", "avx512"};
    return (isa >= 0 && isa < PYLLM_ISA_COUNT) ? names[isa] : "unknown";
}

int isa_parse(const char* name) {
    for (int i = 0; i < PYLLM_ISA_COUNT; i++)
        if (strcmp(name, isa_name((pyllm_isa)i)) == 0) return i;
    return -1;
}

pyllm_isa isa_get(void) {
    int isa = __atomic_load_n(&g_isa, __ATOMIC_ACQUIRE);
    if (isa >= 0) return (pyllm_isa)isa;
    isa = isa_best();  // decided in a local, stored once: a racing caller never sees the pre-override value
    const char* env = getenv("PYLLM_ISA");
    if (env && *env && strcmp(env, "auto") != 0) {
        int want = isa_parse(env);
        if (want < 0) g_env_error = "PYLLM_ISA must be one of scalar, avx2, avx512, auto";
        else if (!isa_supported((pyllm_isa)want)) g_env_error = "PYLLM_ISA names a path this CPU cannot run";
        else isa = want;
    }
    __atomic_store_n(&g_isa, isa, __ATOMIC_RELEASE);
    return (pyllm_isa)isa;
}

int isa_set(pyllm_isa isa) {
    if (!isa_supported(isa)) return -1;
    g_isa = isa;
    return 0;
}

const char* isa_env_error(void) { isa_get(); return g_env_error; }
