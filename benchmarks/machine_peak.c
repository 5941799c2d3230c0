// machine_peak.c — measures this machine's fp32 FMA peak and copy bandwidth, the floors that benchmarks
// quote ratios against. Built and loaded by benchmarks/machine.py (gcc -O3 -march=native -fopenmp -shared).
#include <omp.h>
#include <stdlib.h>
#include <string.h>
#include <immintrin.h>

// FLOPs done by `iters` rounds of 12 independent FMA chains per thread (enough to cover FMA latency x ports).
double peak_fma(long iters, int threads) {
    double flops = 0;
    #pragma omp parallel num_threads(threads) reduction(+:flops)
    {
#if defined(__AVX512F__)
        __m512 acc[12], m = _mm512_set1_ps(0.999999f), a = _mm512_set1_ps(1e-6f);
        for (int i = 0; i < 12; i++) acc[i] = _mm512_set1_ps((float)i);
        for (long it = 0; it < iters; it++)
            for (int i = 0; i < 12; i++) acc[i] = _mm512_fmadd_ps(acc[i], m, a);
        float s[16]; __m512 t = acc[0];
        for (int i = 1; i < 12; i++) t = _mm512_add_ps(t, acc[i]);
        _mm512_storeu_ps(s, t);
        flops += iters * 12.0 * 16 * 2 + (s[0] == 12345.f);
#elif defined(__AVX2__)
        __m256 acc[12], m = _mm256_set1_ps(0.999999f), a = _mm256_set1_ps(1e-6f);
        for (int i = 0; i < 12; i++) acc[i] = _mm256_set1_ps((float)i);
        for (long it = 0; it < iters; it++)
            for (int i = 0; i < 12; i++) acc[i] = _mm256_fmadd_ps(acc[i], m, a);
        float s[8]; __m256 t = acc[0];
        for (int i = 1; i < 12; i++) t = _mm256_add_ps(t, acc[i]);
        _mm256_storeu_ps(s, t);
        flops += iters * 12.0 * 8 * 2 + (s[0] == 12345.f);
#endif
    }
    return flops;
}

// The AVX512_BF16 dot-product peak: `iters` rounds of 12 independent vdpbf16ps chains per thread. Each
// instruction does 32 bf16 multiply-adds into 16 fp32 lanes (64 flops). Returns 0 where the CPU lacks it.
// Compare with peak_fma: where this is no higher, bf16 matmul cannot beat fp32 matmul (no AMX).
#if defined(__AVX512BF16__)
double peak_bf16_dot(long iters, int threads) {
    double flops = 0;
    #pragma omp parallel num_threads(threads) reduction(+:flops)
    {
        __m512 acc[12];
        __m512bh a = (__m512bh)_mm512_set1_epi16(0x3f80), b = (__m512bh)_mm512_set1_epi16(0x3380);  // 1.0, ~6e-8
        for (int i = 0; i < 12; i++) acc[i] = _mm512_set1_ps((float)i);
        for (long it = 0; it < iters; it++)
            for (int i = 0; i < 12; i++) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
        float s[16]; __m512 t = acc[0];
        for (int i = 1; i < 12; i++) t = _mm512_add_ps(t, acc[i]);
        _mm512_storeu_ps(s, t);
        flops += iters * 12.0 * 32 * 2 + (s[0] == 12345.f);
    }
    return flops;
}
#else
double peak_bf16_dot(long iters, int threads) { (void)iters; (void)threads; return 0; }
#endif

// Copies n floats src -> dst with `threads` threads (memcpy per static chunk); returns bytes moved (read+write).
double copy_bytes(float* dst, const float* src, long n, int threads) {
    #pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        long lo = n * t / nt, hi = n * (t + 1) / nt;
        memcpy(dst + lo, src + lo, (hi - lo) * sizeof(float));
    }
    return 2.0 * n * sizeof(float);
}
