// bindings.cpp — the only pybind11 file: exposes csrc/ kernels to Python as pyllm._C.
// Plain pybind11, no torch headers: tensors arrive as raw addresses (uintptr_t from Tensor.data_ptr()) plus
// sizes, already validated by pyllm/ops.py; the CHECK_* macros below are the last line of defence.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

extern "C" {
#include "cpu/kernels.h"
}

namespace py = pybind11;

#define CHECK_PTR(p) \
    do { if ((p) == 0) throw std::invalid_argument(std::string(__func__) + ": null pointer for " #p); } while (0)
#define CHECK_POS(n) \
    do { if ((n) <= 0) throw std::invalid_argument(std::string(__func__) + ": " #n " must be > 0, got " + std::to_string(n)); } while (0)
#define CHECK_NONNEG(n) \
    do { if ((n) < 0) throw std::invalid_argument(std::string(__func__) + ": " #n " must be >= 0, got " + std::to_string(n)); } while (0)

template <typename T> static T* P(uintptr_t a) { return reinterpret_cast<T*>(a); }

#ifdef PYLLM_WITH_CUDA
extern "C" int pyllm_cuda_device_count(void);
#endif

// --- build / run-time information -----------------------------------------------------------------------
static py::dict build_info() {
    py::dict d;
#ifdef PYLLM_VERSION
    d["version"] = PYLLM_VERSION;
#endif
#if defined(__clang__)
    d["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
    d["compiler"] = std::string("gcc ") + __VERSION__;
#else
    d["compiler"] = "unknown";
#endif
    std::vector<std::string> found;
    for (int i = 0; i < PYLLM_ISA_COUNT; i++)
        if (isa_supported((pyllm_isa)i)) found.push_back(isa_name((pyllm_isa)i));
    d["isa_supported"] = found;
    d["isa_best"] = isa_name(isa_best());
    d["isa_active"] = isa_name(isa_get());
    const char* err = isa_env_error();
    d["isa_env_error"] = err ? py::object(py::str(err)) : py::object(py::none());
    const cpu_features* f = cpu_features_get();
    py::dict feats;
    feats["avx2"] = f->avx2; feats["fma"] = f->fma; feats["avx512f"] = f->avx512f;
    feats["avx512bw"] = f->avx512bw; feats["avx512vl"] = f->avx512vl; feats["avx512dq"] = f->avx512dq;
    feats["avx512bf16"] = f->avx512bf16; feats["amx_tile"] = f->amx_tile; feats["amx_bf16"] = f->amx_bf16;
    d["cpu_features"] = feats;
#ifdef _OPENMP
    d["openmp"] = true;
#else
    d["openmp"] = false;
#endif
    d["threads"] = kernels_get_threads();
#ifdef PYLLM_WITH_CUDA
    d["cuda_built"] = true;
    d["cuda_devices"] = pyllm_cuda_device_count();
#else
    d["cuda_built"] = false;
    d["cuda_devices"] = 0;
#endif
    return d;
}

PYBIND11_MODULE(_C, m) {
    m.doc() = "pyllm's hand-written kernels (CPU; CUDA when built with nvcc). Call through pyllm.ops.";
    m.def("build_info", &build_info, "Version, compiler, instruction sets found and chosen, threads, CUDA.");

    // --- instruction-set path and threads ------------------------------------------------------------------
    m.def("isa_get", []() { return std::string(isa_name(isa_get())); }, "The CPU path in use.");
    m.def("isa_set", [](const std::string& name) {
        int i = isa_parse(name.c_str());
        if (i < 0) throw std::invalid_argument("unknown instruction-set path '" + name + "' (scalar, avx2, avx512)");
        if (isa_set((pyllm_isa)i) != 0) throw std::runtime_error("this CPU cannot run the '" + name + "' path");
    }, py::arg("name"), "Force a CPU path (scalar, avx2, avx512) for every later kernel call.");
    m.def("isa_supported", []() {
        std::vector<std::string> v;
        for (int i = 0; i < PYLLM_ISA_COUNT; i++) if (isa_supported((pyllm_isa)i)) v.push_back(isa_name((pyllm_isa)i));
        return v;
    }, "CPU paths this machine can run, slowest first.");
    m.def("set_threads", &kernels_set_threads, py::arg("n"), "OpenMP threads for the kernels (<= 0: all cores).");
    m.def("get_threads", &kernels_get_threads);

    // --- rmsnorm -------------------------------------------------------------------------------------------
    m.def("rmsnorm_forward", [](uintptr_t out, uintptr_t rstd, uintptr_t x, uintptr_t w, int N, int C, float eps) {
        CHECK_PTR(out); CHECK_PTR(x); CHECK_PTR(w); CHECK_POS(N); CHECK_POS(C);
        rmsnorm_params p{P<float>(out), P<float>(rstd), P<const float>(x), P<const float>(w), N, C, eps};
        py::gil_scoped_release nogil;
        rmsnorm_forward(&p);
    }, py::arg("out"), py::arg("rstd"), py::arg("x"), py::arg("weight"), py::arg("N"), py::arg("C"), py::arg("eps"));
    m.def("rmsnorm_backward", [](uintptr_t dx, uintptr_t dw, uintptr_t dout, uintptr_t x, uintptr_t w, uintptr_t rstd,
                                  int N, int C) {
        CHECK_PTR(dx); CHECK_PTR(dw); CHECK_PTR(dout); CHECK_PTR(x); CHECK_PTR(w); CHECK_PTR(rstd);
        CHECK_POS(N); CHECK_POS(C);
        rmsnorm_backward_params p{P<float>(dx), P<float>(dw), P<const float>(dout), P<const float>(x),
                                  P<const float>(w), P<const float>(rstd), N, C};
        py::gil_scoped_release nogil;
        rmsnorm_backward(&p);
    }, py::arg("dx"), py::arg("dweight"), py::arg("dout"), py::arg("x"), py::arg("weight"), py::arg("rstd"),
       py::arg("N"), py::arg("C"));
    // --- matmul (impl_matmul.h) ----------------------------------------------------------------------------
    // Strides/transposes are passed through; ops.py checks shapes so every index stays inside the tensors.
    m.def("matmul_forward", [](uintptr_t c, uintptr_t a, uintptr_t b, uintptr_t bias, int M, int N, int K, int lda,
                               int ldb, int ldc, bool trans_a, bool trans_b, bool accumulate) {
        CHECK_PTR(c); CHECK_PTR(a); CHECK_PTR(b); CHECK_POS(M); CHECK_POS(N); CHECK_NONNEG(K);
        CHECK_POS(lda); CHECK_POS(ldb); CHECK_POS(ldc);
        matmul_params p{P<float>(c), P<const float>(a), P<const float>(b), P<const float>(bias), M, N, K,
                        lda, ldb, ldc, trans_a, trans_b, accumulate};
        py::gil_scoped_release nogil;
        matmul_forward(&p);
    }, py::arg("C"), py::arg("A"), py::arg("B"), py::arg("bias"), py::arg("M"), py::arg("N"), py::arg("K"),
       py::arg("lda"), py::arg("ldb"), py::arg("ldc"), py::arg("trans_a") = false, py::arg("trans_b") = false,
       py::arg("accumulate") = false, "C(M,N) (+)= op(A)·op(B)ᵀ (+bias), fp32; see kernels.h matmul_params.");
    m.def("matmul_bf16_forward", [](uintptr_t c, uintptr_t a, uintptr_t b, uintptr_t bias, int M, int N, int K,
                                    int lda, int ldb, int ldc, bool trans_a, bool trans_b, bool accumulate) {
        CHECK_PTR(c); CHECK_PTR(a); CHECK_PTR(b); CHECK_POS(M); CHECK_POS(N); CHECK_NONNEG(K);
        CHECK_POS(lda); CHECK_POS(ldb); CHECK_POS(ldc);
        matmul_bf16_params p{P<float>(c), P<const uint16_t>(a), P<const uint16_t>(b), P<const float>(bias), M, N, K,
                             lda, ldb, ldc, trans_a, trans_b, accumulate};
        py::gil_scoped_release nogil;
        matmul_bf16_forward(&p);
    }, py::arg("C"), py::arg("A"), py::arg("B"), py::arg("bias"), py::arg("M"), py::arg("N"), py::arg("K"),
       py::arg("lda"), py::arg("ldb"), py::arg("ldc"), py::arg("trans_a") = false, py::arg("trans_b") = false,
       py::arg("accumulate") = false, "Same as matmul_forward with bf16 A and B, fp32 accumulate and C.");
    m.def("matvec_f32", [](uintptr_t y, uintptr_t w, uintptr_t x, int n, int k) {
        CHECK_PTR(y); CHECK_PTR(w); CHECK_PTR(x); CHECK_POS(n); CHECK_POS(k);
        matvec_params p{P<float>(y), P<const float>(w), P<const float>(x), n, k};
        py::gil_scoped_release nogil;
        matvec_f32(&p);
    }, py::arg("y"), py::arg("W"), py::arg("x"), py::arg("n"), py::arg("k"));
    m.def("quantize_q8", [](uintptr_t q, uintptr_t s, uintptr_t w, int n, int k, int G) {
        CHECK_PTR(q); CHECK_PTR(s); CHECK_PTR(w); CHECK_POS(n); CHECK_POS(k); CHECK_POS(G);
        if (k % G) throw std::invalid_argument("quantize_q8: k must be a multiple of the group size G");
        quantize_q8_params p{P<int8_t>(q), P<float>(s), P<const float>(w), n, k, G};
        py::gil_scoped_release nogil;
        quantize_q8(&p);
    }, py::arg("q"), py::arg("s"), py::arg("w"), py::arg("n"), py::arg("k"), py::arg("G"));
    m.def("matvec_q8", [](uintptr_t y, uintptr_t wq, uintptr_t ws, uintptr_t x, int n, int k, int G) {
        CHECK_PTR(y); CHECK_PTR(wq); CHECK_PTR(ws); CHECK_PTR(x); CHECK_POS(n); CHECK_POS(k); CHECK_POS(G);
        if (k % G) throw std::invalid_argument("matvec_q8: k must be a multiple of the group size G");
        matvec_q8_params p{P<float>(y), P<const int8_t>(wq), P<const float>(ws), P<const float>(x), nullptr, nullptr,
                           n, k, G};
        py::gil_scoped_release nogil;
        matvec_q8(&p);
    }, py::arg("y"), py::arg("wq"), py::arg("ws"), py::arg("x"), py::arg("n"), py::arg("k"), py::arg("G"));
}
