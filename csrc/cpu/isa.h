// isa.h — run-time instruction-set choice for pyllm's CPU kernels (shared by the extension and ./run).
// One kernel source is compiled three times (isa_scalar.c, isa_avx2.c, isa_avx512.c); kernels.c picks a
// table of function pointers at first use from cpuid, or from the PYLLM_ISA env var (scalar|avx2|avx512).
#pragma once
#ifdef __cplusplus
extern "C" {
#endif

typedef enum { PYLLM_ISA_SCALAR = 0, PYLLM_ISA_AVX2 = 1, PYLLM_ISA_AVX512 = 2, PYLLM_ISA_COUNT = 3 } pyllm_isa;

// Optional CPU features that a kernel may use inside one ISA path (checked at run time, never assumed).
typedef struct {
    int avx2, fma, avx512f, avx512bw, avx512vl, avx512dq, avx512bf16, amx_tile, amx_bf16;
    int avx512vnni;  // vpdpbusd on zmm (Q8_0 matvec); PYLLM_NO_VNNI=1 turns it off (tests the fallback)
} cpu_features;

const cpu_features* cpu_features_get(void);     // detected once, cached
int isa_supported(pyllm_isa isa);               // can this machine run that path?
pyllm_isa isa_best(void);                       // best supported path
pyllm_isa isa_get(void);                        // the path in use (resolves PYLLM_ISA on first call)
int isa_set(pyllm_isa isa);                     // 0 on success, -1 if unsupported by this CPU
const char* isa_name(pyllm_isa isa);            // "scalar" | "avx2" | "avx512"
int isa_parse(const char* name);                // name -> pyllm_isa, or -1
const char* isa_env_error(void);                // non-NULL if PYLLM_ISA named a bad or unsupported path

#ifdef __cplusplus
}
#endif
