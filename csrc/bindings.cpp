// bindings.cpp — the only pybind11 file: exposes csrc/ kernels to Python as pyllm._C.
// Plain pybind11, no torch headers: tensors arrive as raw addresses (uintptr_t from Tensor.data_ptr()) plus
// sizes, already validated by pyllm/ops.py; the CHECK_* macros below are the last line of defence.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <new>
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

// Runs a CPU kernel; one that could not get its heap scratch (kernels_oom_count moved) left its outputs unwritten:
// MemoryError (pybind11 maps std::bad_alloc, what() as the message). Called with the GIL released.
struct kernel_oom : std::bad_alloc {
    std::string msg;
    explicit kernel_oom(const char* k) : msg(std::string(k) + ": out of memory for its scratch buffers") {}
    const char* what() const noexcept override { return msg.c_str(); }
};
#define KCALL(kernel, params)                                  \
    do {                                                       \
        const unsigned oom0_ = kernels_oom_count();            \
        kernel(params);                                        \
        if (kernels_oom_count() != oom0_) throw kernel_oom(#kernel); \
    } while (0)

// Attention's optional layout: row strides of q and of k/v (0 = contiguous, else at least H*D / Hkv*D) and the
// RoPE tables, both or neither (D even to rotate).
static void check_attention_layout(const char* fn, int H, int Hkv, int D, long ldq, long ldkv, uintptr_t cos,
                                   uintptr_t sin) {
    const std::string f(fn);
    if (ldq < 0 || (ldq && ldq < (long)H * D))
        throw std::invalid_argument(f + ": q row stride " + std::to_string(ldq) + " must be 0 or >= H*D");
    if (ldkv < 0 || (ldkv && ldkv < (long)Hkv * D))
        throw std::invalid_argument(f + ": k/v row stride " + std::to_string(ldkv) + " must be 0 or >= Hkv*D");
    if ((cos == 0) != (sin == 0)) throw std::invalid_argument(f + ": cos and sin go together");
    if (cos && D % 2) throw std::invalid_argument(f + ": RoPE needs an even head dim, got " + std::to_string(D));
}

#ifdef PYLLM_WITH_CUDA
#include "cuda/kernels_cuda.h"  // declares pyllm_cuda_device_count and the CUDA kernels' C API
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
    feats["avx512vnni"] = f->avx512vnni;
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
        KCALL(rmsnorm_forward, &p);
    }, py::arg("out"), py::arg("rstd"), py::arg("x"), py::arg("weight"), py::arg("N"), py::arg("C"), py::arg("eps"));
    m.def("rmsnorm_backward", [](uintptr_t dx, uintptr_t dw, uintptr_t dout, uintptr_t x, uintptr_t w, uintptr_t rstd,
                                  int N, int C, uintptr_t dres) {
        CHECK_PTR(dx); CHECK_PTR(dw); CHECK_PTR(dout); CHECK_PTR(x); CHECK_PTR(w); CHECK_PTR(rstd);
        CHECK_POS(N); CHECK_POS(C);
        rmsnorm_backward_params p{P<float>(dx), P<float>(dw), P<const float>(dout), P<const float>(x),
                                  P<const float>(w), P<const float>(rstd), N, C, P<const float>(dres)};
        py::gil_scoped_release nogil;
        KCALL(rmsnorm_backward, &p);
    }, py::arg("dx"), py::arg("dweight"), py::arg("dout"), py::arg("x"), py::arg("weight"), py::arg("rstd"),
       py::arg("N"), py::arg("C"), py::arg("dres") = 0);
    // --- matmul (impl_matmul.h) ----------------------------------------------------------------------------
    // Strides/transposes are passed through; ops.py checks shapes so every index stays inside the tensors.
    m.def("matmul_forward", [](uintptr_t c, uintptr_t a, uintptr_t b, uintptr_t bias, int M, int N, int K, int lda,
                               int ldb, int ldc, bool trans_a, bool trans_b, bool accumulate) {
        CHECK_PTR(c); CHECK_PTR(a); CHECK_PTR(b); CHECK_POS(M); CHECK_POS(N); CHECK_NONNEG(K);
        CHECK_POS(lda); CHECK_POS(ldb); CHECK_POS(ldc);
        matmul_params p{P<float>(c), P<const float>(a), P<const float>(b), P<const float>(bias), M, N, K,
                        lda, ldb, ldc, trans_a, trans_b, accumulate};
        py::gil_scoped_release nogil;
        KCALL(matmul_forward, &p);
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
        KCALL(matmul_bf16_forward, &p);
    }, py::arg("C"), py::arg("A"), py::arg("B"), py::arg("bias"), py::arg("M"), py::arg("N"), py::arg("K"),
       py::arg("lda"), py::arg("ldb"), py::arg("ldc"), py::arg("trans_a") = false, py::arg("trans_b") = false,
       py::arg("accumulate") = false, "Same as matmul_forward with bf16 A and B, fp32 accumulate and C.");
    m.def("matvec_f32", [](uintptr_t y, uintptr_t w, uintptr_t x, int n, int k) {
        CHECK_PTR(y); CHECK_PTR(w); CHECK_PTR(x); CHECK_POS(n); CHECK_POS(k);
        matvec_params p{P<float>(y), P<const float>(w), P<const float>(x), n, k};
        py::gil_scoped_release nogil;
        KCALL(matvec_f32, &p);
    }, py::arg("y"), py::arg("W"), py::arg("x"), py::arg("n"), py::arg("k"));
    m.def("quantize_q8", [](uintptr_t q, uintptr_t s, uintptr_t w, int n, int k, int G) {
        CHECK_PTR(q); CHECK_PTR(s); CHECK_PTR(w); CHECK_POS(n); CHECK_POS(k); CHECK_POS(G);
        if (k % G) throw std::invalid_argument("quantize_q8: k must be a multiple of the group size G");
        quantize_q8_params p{P<int8_t>(q), P<float>(s), P<const float>(w), n, k, G};
        py::gil_scoped_release nogil;
        KCALL(quantize_q8, &p);
    }, py::arg("q"), py::arg("s"), py::arg("w"), py::arg("n"), py::arg("k"), py::arg("G"));
    m.def("matvec_q8", [](uintptr_t y, uintptr_t wq, uintptr_t ws, uintptr_t x, int n, int k, int G) {
        CHECK_PTR(y); CHECK_PTR(wq); CHECK_PTR(ws); CHECK_PTR(x); CHECK_POS(n); CHECK_POS(k); CHECK_POS(G);
        if (k % G) throw std::invalid_argument("matvec_q8: k must be a multiple of the group size G");
        matvec_q8_params p{P<float>(y), P<const int8_t>(wq), P<const float>(ws), P<const float>(x), nullptr, nullptr,
                           n, k, G};
        py::gil_scoped_release nogil;
        KCALL(matvec_q8, &p);
    }, py::arg("y"), py::arg("wq"), py::arg("ws"), py::arg("x"), py::arg("n"), py::arg("k"), py::arg("G"));
    // --- sampling (impl_sample.h) ----------------------------------------------------------------------------
    m.def("sample_forward", [](uintptr_t tokens, uintptr_t logprobs, uintptr_t logits, uintptr_t mask, int B, int V,
                               float temperature, int top_k, float top_p, float min_p, uint64_t seed, uint64_t step) {
        CHECK_PTR(tokens); CHECK_PTR(logprobs); CHECK_PTR(logits); CHECK_POS(B); CHECK_POS(V); CHECK_NONNEG(top_k);
        if (!(temperature >= 0.f)) throw std::invalid_argument("sample_forward: temperature must be >= 0");
        if (!(top_p > 0.f && top_p <= 1.f)) throw std::invalid_argument("sample_forward: top_p must be in (0, 1]");
        if (!(min_p >= 0.f && min_p <= 1.f)) throw std::invalid_argument("sample_forward: min_p must be in [0, 1]");
        sample_params p{P<int64_t>(tokens), P<float>(logprobs), P<const float>(logits), P<const uint8_t>(mask),
                        B, V, temperature, top_k, top_p, min_p, seed, step};
        py::gil_scoped_release nogil;
        KCALL(sample_forward, &p);
    }, py::arg("tokens"), py::arg("logprobs"), py::arg("logits"), py::arg("mask"), py::arg("B"), py::arg("V"),
       py::arg("temperature"), py::arg("top_k"), py::arg("top_p"), py::arg("min_p"), py::arg("seed"), py::arg("step"));
    // --- fused training ops (impl_fused.h) -------------------------------------------------------------------
    m.def("rope_forward", [](uintptr_t out, uintptr_t x, uintptr_t cos, uintptr_t sin, int B, int T, int H, int D,
                             int backward, int ldx, int ldo) {
        CHECK_PTR(out); CHECK_PTR(x); CHECK_PTR(cos); CHECK_PTR(sin);
        CHECK_POS(B); CHECK_POS(T); CHECK_POS(H); CHECK_POS(D);
        if (D % 2) throw std::invalid_argument("rope_forward: head dim D must be even, got " + std::to_string(D));
        if (ldx < 0 || ldo < 0 || (ldx && ldx < H * D) || (ldo && ldo < H * D))
            throw std::invalid_argument("rope_forward: row strides ldx/ldo must be 0 or >= H*D");
        rope_params p{P<float>(out), P<const float>(x), P<const float>(cos), P<const float>(sin), B, T, H, D, backward,
                      ldx, ldo};
        py::gil_scoped_release nogil;
        KCALL(rope_forward, &p);
    }, py::arg("out"), py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("B"), py::arg("T"), py::arg("H"),
       py::arg("D"), py::arg("backward"), py::arg("ldx") = 0, py::arg("ldo") = 0);
    m.def("swiglu_forward", [](uintptr_t out, uintptr_t gate, uintptr_t up, long n, int cols, int ld) {
        CHECK_PTR(out); CHECK_PTR(gate); CHECK_PTR(up); CHECK_POS(n);
        if (cols < 0 || (cols && (n % cols || ld < cols)))
            throw std::invalid_argument("swiglu_forward: cols must be 0 or divide n, with ld >= cols");
        swiglu_params p{P<float>(out), P<const float>(gate), P<const float>(up), n, cols, ld};
        py::gil_scoped_release nogil;
        KCALL(swiglu_forward, &p);
    }, py::arg("out"), py::arg("gate"), py::arg("up"), py::arg("n"), py::arg("cols") = 0, py::arg("ld") = 0);
    m.def("swiglu_backward", [](uintptr_t dgate, uintptr_t dup, uintptr_t dout, uintptr_t gate, uintptr_t up, long n,
                                int cols, int ld) {
        CHECK_PTR(dgate); CHECK_PTR(dup); CHECK_PTR(dout); CHECK_PTR(gate); CHECK_PTR(up); CHECK_POS(n);
        if (cols < 0 || (cols && (n % cols || ld < cols)))
            throw std::invalid_argument("swiglu_backward: cols must be 0 or divide n, with ld >= cols");
        swiglu_backward_params p{P<float>(dgate), P<float>(dup), P<const float>(dout), P<const float>(gate),
                                 P<const float>(up), n, cols, ld};
        py::gil_scoped_release nogil;
        KCALL(swiglu_backward, &p);
    }, py::arg("dgate"), py::arg("dup"), py::arg("dout"), py::arg("gate"), py::arg("up"), py::arg("n"),
       py::arg("cols") = 0, py::arg("ld") = 0);
    m.def("cross_entropy_forward", [](uintptr_t loss, uintptr_t stats, uintptr_t logits, uintptr_t targets, int N,
                                      int V, int64_t ignore_index, uintptr_t dlogits, float scale, int ld_dlogits) {
        CHECK_PTR(loss); CHECK_PTR(stats); CHECK_PTR(logits); CHECK_PTR(targets); CHECK_POS(N); CHECK_POS(V);
        if (ld_dlogits != 0 && ld_dlogits < V)
            throw std::invalid_argument("cross_entropy_forward: ld_dlogits must be 0 or >= V");
        if (ld_dlogits != 0 && ld_dlogits != V && dlogits == logits)
            throw std::invalid_argument("cross_entropy_forward: dlogits may alias logits only at the same row stride");
        cross_entropy_params p{P<float>(loss), P<float>(stats), P<const float>(logits), P<const int64_t>(targets), N, V,
                               ignore_index, P<float>(dlogits), scale, ld_dlogits};
        py::gil_scoped_release nogil;
        KCALL(cross_entropy_forward, &p);
    }, py::arg("loss"), py::arg("stats"), py::arg("logits"), py::arg("targets"), py::arg("N"), py::arg("V"),
       py::arg("ignore_index"), py::arg("dlogits") = 0, py::arg("scale") = 1.0f, py::arg("ld_dlogits") = 0);
    m.def("adamw_step", [](uintptr_t params, uintptr_t grads, uintptr_t m_, uintptr_t v_, long n, float lr, float beta1,
                           float beta2, float eps, float weight_decay, int step) {
        CHECK_PTR(params); CHECK_PTR(grads); CHECK_PTR(m_); CHECK_PTR(v_); CHECK_POS(n); CHECK_POS(step);
        adamw_params p{P<float>(params), P<const float>(grads), P<float>(m_), P<float>(v_), n, lr, beta1, beta2, eps,
                       weight_decay, step};
        py::gil_scoped_release nogil;
        KCALL(adamw_step, &p);
    }, py::arg("params"), py::arg("grads"), py::arg("m"), py::arg("v"), py::arg("n"), py::arg("lr"), py::arg("beta1"),
       py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("step"));

    // --- attention (csrc/cpu/impl_attention.h) --------------------------------------------------------------
    m.def("attention_forward", [](uintptr_t out, uintptr_t lse, uintptr_t q, uintptr_t k, uintptr_t v,
                                   uintptr_t doc_ids, int B, int T, int H, int Hkv, int D, long ldq, long ldkv,
                                   uintptr_t cos, uintptr_t sin) {
        CHECK_PTR(out); CHECK_PTR(lse); CHECK_PTR(q); CHECK_PTR(k); CHECK_PTR(v);
        CHECK_POS(B); CHECK_POS(T); CHECK_POS(H); CHECK_POS(Hkv); CHECK_POS(D);
        if (H % Hkv != 0) throw std::invalid_argument("attention_forward: H must be a multiple of Hkv");
        if (D > 256) throw std::invalid_argument("attention_forward: head dim D must be <= 256");
        check_attention_layout("attention_forward", H, Hkv, D, ldq, ldkv, cos, sin);
        attention_params p{P<float>(out), P<float>(lse), P<const float>(q), P<const float>(k), P<const float>(v),
                           P<const int32_t>(doc_ids), B, T, H, Hkv, D, ldq, ldkv, P<const float>(cos),
                           P<const float>(sin)};
        py::gil_scoped_release nogil;
        KCALL(attention_forward, &p);
    }, py::arg("out"), py::arg("lse"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("doc_ids"), py::arg("B"),
       py::arg("T"), py::arg("H"), py::arg("Hkv"), py::arg("D"), py::arg("ldq") = 0, py::arg("ldkv") = 0,
       py::arg("cos") = 0, py::arg("sin") = 0);
    m.def("attention_backward", [](uintptr_t dq, uintptr_t dk, uintptr_t dv, uintptr_t dout, uintptr_t out,
                                    uintptr_t lse, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t doc_ids,
                                    int B, int T, int H, int Hkv, int D, long ldq, long ldkv, uintptr_t cos,
                                    uintptr_t sin, long ld_dq, long ld_dkv) {
        CHECK_PTR(dq); CHECK_PTR(dk); CHECK_PTR(dv); CHECK_PTR(dout); CHECK_PTR(out); CHECK_PTR(lse);
        CHECK_PTR(q); CHECK_PTR(k); CHECK_PTR(v);
        CHECK_POS(B); CHECK_POS(T); CHECK_POS(H); CHECK_POS(Hkv); CHECK_POS(D);
        if (H % Hkv != 0) throw std::invalid_argument("attention_backward: H must be a multiple of Hkv");
        if (D > 256) throw std::invalid_argument("attention_backward: head dim D must be <= 256");
        check_attention_layout("attention_backward", H, Hkv, D, ldq, ldkv, cos, sin);
        check_attention_layout("attention_backward", H, Hkv, D, ld_dq, ld_dkv, 0, 0);
        attention_backward_params p{P<float>(dq), P<float>(dk), P<float>(dv), P<const float>(dout),
                                    P<const float>(out), P<const float>(lse), P<const float>(q), P<const float>(k),
                                    P<const float>(v), P<const int32_t>(doc_ids), B, T, H, Hkv, D, ldq, ldkv,
                                    P<const float>(cos), P<const float>(sin), ld_dq, ld_dkv};
        py::gil_scoped_release nogil;
        KCALL(attention_backward, &p);
    }, py::arg("dq"), py::arg("dk"), py::arg("dv"), py::arg("dout"), py::arg("out"), py::arg("lse"), py::arg("q"),
       py::arg("k"), py::arg("v"), py::arg("doc_ids"), py::arg("B"), py::arg("T"), py::arg("H"), py::arg("Hkv"),
       py::arg("D"), py::arg("ldq") = 0, py::arg("ldkv") = 0, py::arg("cos") = 0, py::arg("sin") = 0,
       py::arg("ld_dq") = 0, py::arg("ld_dkv") = 0);
    m.def("decode_attention", [](uintptr_t out, uintptr_t q, uintptr_t k_cache, uintptr_t v_cache, long ld_b,
                                  long ld_t, int B, int H, int Hkv, int D, int n_ctx) {
        CHECK_PTR(out); CHECK_PTR(q); CHECK_PTR(k_cache); CHECK_PTR(v_cache);
        CHECK_POS(B); CHECK_POS(H); CHECK_POS(Hkv); CHECK_POS(D); CHECK_POS(n_ctx); CHECK_NONNEG(ld_b);
        CHECK_NONNEG(ld_t);  // only read: any strides (0: an expand()ed cache)
        if (H % Hkv != 0) throw std::invalid_argument("decode_attention: H must be a multiple of Hkv");
        if (D > 256) throw std::invalid_argument("decode_attention: head dim D must be <= 256");
        decode_attention_params p{P<float>(out), P<const float>(q), P<const float>(k_cache), P<const float>(v_cache),
                                  ld_b, ld_t, B, H, Hkv, D, n_ctx};
        py::gil_scoped_release nogil;
        KCALL(decode_attention, &p);
    }, py::arg("out"), py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("ld_b"), py::arg("ld_t"),
       py::arg("B"), py::arg("H"), py::arg("Hkv"), py::arg("D"), py::arg("n_ctx"));

#ifdef PYLLM_WITH_CUDA
    // --- CUDA kernels (csrc/cuda/): device pointers, the caller's stream as an integer -----------------------
    // ops_cuda.py passes torch.cuda.current_stream().cuda_stream; a kernel's error string becomes RuntimeError.
    auto cu = [](const char* err) { if (err) throw std::runtime_error(err); };
    auto S = [](uintptr_t s) { return reinterpret_cast<pyllm_stream>(s); };
    m.def("cuda_matmul", [cu, S](uintptr_t c, uintptr_t a, uintptr_t b, int M, int N, int K, int dtype, int out_f32,
                                 uintptr_t stream) {
        CHECK_PTR(c); CHECK_PTR(a); CHECK_PTR(b); CHECK_POS(M); CHECK_POS(N); CHECK_POS(K);
        matmul_cuda_params p{P<void>(c), P<const void>(a), P<const void>(b), M, N, K, dtype, out_f32};
        py::gil_scoped_release nogil;
        cu(matmul_cuda(&p, S(stream)));
    }, py::arg("c"), py::arg("a"), py::arg("b"), py::arg("M"), py::arg("N"), py::arg("K"), py::arg("dtype"),
       py::arg("out_f32"), py::arg("stream"));
    m.def("cuda_attention_forward", [cu, S](uintptr_t out, uintptr_t lse, uintptr_t q, uintptr_t k, uintptr_t v,
                                            uintptr_t doc_ids, int B, int T, int H, int Hkv, int D, uintptr_t stream) {
        CHECK_PTR(out); CHECK_PTR(lse); CHECK_PTR(q); CHECK_PTR(k); CHECK_PTR(v);
        CHECK_POS(B); CHECK_POS(T); CHECK_POS(H); CHECK_POS(Hkv); CHECK_POS(D);
        attention_params p{P<float>(out), P<float>(lse), P<const float>(q), P<const float>(k), P<const float>(v),
                           P<const int32_t>(doc_ids), B, T, H, Hkv, D};
        py::gil_scoped_release nogil;
        cu(attention_forward_cuda(&p, S(stream)));
    });
    m.def("cuda_attention_backward", [cu, S](uintptr_t dq, uintptr_t dk, uintptr_t dv, uintptr_t dout, uintptr_t out,
                                             uintptr_t lse, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t doc_ids,
                                             uintptr_t delta, int B, int T, int H, int Hkv, int D, uintptr_t stream) {
        CHECK_PTR(dq); CHECK_PTR(dk); CHECK_PTR(dv); CHECK_PTR(dout); CHECK_PTR(out); CHECK_PTR(lse);
        CHECK_PTR(q); CHECK_PTR(k); CHECK_PTR(v); CHECK_PTR(delta);
        CHECK_POS(B); CHECK_POS(T); CHECK_POS(H); CHECK_POS(Hkv); CHECK_POS(D);
        attention_backward_params p{P<float>(dq), P<float>(dk), P<float>(dv), P<const float>(dout),
                                    P<const float>(out), P<const float>(lse), P<const float>(q), P<const float>(k),
                                    P<const float>(v), P<const int32_t>(doc_ids), B, T, H, Hkv, D};
        py::gil_scoped_release nogil;
        cu(attention_backward_cuda(&p, P<float>(delta), S(stream)));
    });
    m.def("cuda_attention_bf16_forward", [cu, S](uintptr_t out, uintptr_t lse, uintptr_t q, uintptr_t k,
                                                 uintptr_t v, uintptr_t doc_ids, int B, int T, int H, int Hkv, int D,
                                                 uintptr_t stream) {
        CHECK_PTR(out); CHECK_PTR(lse); CHECK_PTR(q); CHECK_PTR(k); CHECK_PTR(v);
        CHECK_POS(B); CHECK_POS(T); CHECK_POS(H); CHECK_POS(Hkv); CHECK_POS(D);
        attention_bf16_params p{P<void>(out), P<float>(lse), P<const void>(q), P<const void>(k), P<const void>(v),
                                P<const int32_t>(doc_ids), B, T, H, Hkv, D};
        py::gil_scoped_release nogil;
        cu(attention_bf16_forward_cuda(&p, S(stream)));
    });
    m.def("cuda_attention_bf16_backward", [cu, S](uintptr_t dq, uintptr_t dk, uintptr_t dv, uintptr_t dout,
                                                  uintptr_t out, uintptr_t lse, uintptr_t q, uintptr_t k, uintptr_t v,
                                                  uintptr_t doc_ids, uintptr_t delta, int B, int T, int H, int Hkv,
                                                  int D, uintptr_t stream) {
        CHECK_PTR(dq); CHECK_PTR(dk); CHECK_PTR(dv); CHECK_PTR(dout); CHECK_PTR(out); CHECK_PTR(lse);
        CHECK_PTR(q); CHECK_PTR(k); CHECK_PTR(v); CHECK_PTR(delta);
        CHECK_POS(B); CHECK_POS(T); CHECK_POS(H); CHECK_POS(Hkv); CHECK_POS(D);
        attention_bf16_backward_params p{P<void>(dq), P<void>(dk), P<void>(dv), P<const void>(dout),
                                         P<const void>(out), P<const float>(lse), P<const void>(q), P<const void>(k),
                                         P<const void>(v), P<const int32_t>(doc_ids), B, T, H, Hkv, D};
        py::gil_scoped_release nogil;
        cu(attention_bf16_backward_cuda(&p, P<float>(delta), S(stream)));
    });
    m.def("cuda_decode_attention_ws_floats", [](int B, int H, int Hkv, int D, int n_ctx) {
        decode_attention_params p{nullptr, nullptr, nullptr, nullptr, 0, 0, B, H, Hkv, D, n_ctx};
        return decode_attention_cuda_ws_floats(&p);
    });
    m.def("cuda_decode_attention", [cu, S](uintptr_t out, uintptr_t q, uintptr_t k_cache, uintptr_t v_cache, long ld_b,
                                           long ld_t, int B, int H, int Hkv, int D, int n_ctx, uintptr_t n_ctx_dev,
                                           uintptr_t ws, uintptr_t stream) {
        CHECK_PTR(out); CHECK_PTR(q); CHECK_PTR(k_cache); CHECK_PTR(v_cache); CHECK_PTR(ws);
        CHECK_POS(B); CHECK_POS(H); CHECK_POS(Hkv); CHECK_POS(D); CHECK_POS(n_ctx);
        decode_attention_params p{P<float>(out), P<const float>(q), P<const float>(k_cache), P<const float>(v_cache),
                                  ld_b, ld_t, B, H, Hkv, D, n_ctx};
        py::gil_scoped_release nogil;
        cu(decode_attention_cuda(&p, P<const long long>(n_ctx_dev), P<float>(ws), S(stream)));
    });
    m.def("cuda_sample", [cu, S](uintptr_t tokens, uintptr_t logprobs, uintptr_t logits, uintptr_t mask, int B, int V,
                                 float temperature, int top_k, float top_p, float min_p, uint64_t seed, uint64_t step,
                                 uintptr_t stream) {
        CHECK_PTR(tokens); CHECK_PTR(logprobs); CHECK_PTR(logits); CHECK_POS(B); CHECK_POS(V);
        sample_cuda_params p{P<int64_t>(tokens), P<float>(logprobs), P<const float>(logits), P<const uint8_t>(mask),
                             B, V, temperature, top_p, min_p, top_k, seed, step};
        py::gil_scoped_release nogil;
        cu(sample_cuda(&p, S(stream)));
    });
    m.def("cuda_rmsnorm_forward", [cu, S](uintptr_t out, uintptr_t rstd, uintptr_t x, uintptr_t w, int N, int C,
                                          float eps, uintptr_t stream) {
        CHECK_PTR(out); CHECK_PTR(x); CHECK_PTR(w); CHECK_POS(N); CHECK_POS(C);
        rmsnorm_params p{P<float>(out), P<float>(rstd), P<const float>(x), P<const float>(w), N, C, eps};
        py::gil_scoped_release nogil;
        cu(rmsnorm_forward_cuda(&p, S(stream)));
    });
    m.def("cuda_rmsnorm_backward", [cu, S](uintptr_t dx, uintptr_t dw, uintptr_t dout, uintptr_t x, uintptr_t w,
                                           uintptr_t rstd, int N, int C, uintptr_t stream) {
        CHECK_PTR(dx); CHECK_PTR(dw); CHECK_PTR(dout); CHECK_PTR(x); CHECK_PTR(w); CHECK_PTR(rstd);
        CHECK_POS(N); CHECK_POS(C);
        rmsnorm_backward_params p{P<float>(dx), P<float>(dw), P<const float>(dout), P<const float>(x),
                                  P<const float>(w), P<const float>(rstd), N, C};
        py::gil_scoped_release nogil;
        cu(rmsnorm_backward_cuda(&p, S(stream)));
    });
    m.def("cuda_rope", [cu, S](uintptr_t out, uintptr_t x, uintptr_t cos, uintptr_t sin, int B, int T, int H, int D,
                               int inverse, uintptr_t stream) {
        CHECK_PTR(out); CHECK_PTR(x); CHECK_PTR(cos); CHECK_PTR(sin);
        CHECK_POS(B); CHECK_POS(T); CHECK_POS(H); CHECK_POS(D);
        rope_cuda_params p{P<float>(out), P<const float>(x), P<const float>(cos), P<const float>(sin), B, T, H, D,
                           inverse};
        py::gil_scoped_release nogil;
        cu(rope_cuda(&p, S(stream)));
    });
    m.def("cuda_swiglu", [cu, S](uintptr_t out, uintptr_t dgate, uintptr_t dup, uintptr_t gate, uintptr_t up,
                                 uintptr_t dout, long n, uintptr_t stream) {
        CHECK_PTR(gate); CHECK_PTR(up); CHECK_POS(n);
        if (dout ? (!dgate || !dup) : !out) throw std::invalid_argument("cuda_swiglu: missing output pointer");
        swiglu_cuda_params p{P<float>(out), P<float>(dgate), P<float>(dup), P<const float>(gate), P<const float>(up),
                             P<const float>(dout), n};
        py::gil_scoped_release nogil;
        cu(swiglu_cuda(&p, S(stream)));
    });
    m.def("cuda_cross_entropy", [cu, S](uintptr_t losses, uintptr_t dlogits, uintptr_t logits, uintptr_t targets,
                                        int N, int V, long ignore_index, float scale, uintptr_t stream) {
        CHECK_PTR(losses); CHECK_PTR(logits); CHECK_PTR(targets); CHECK_POS(N); CHECK_POS(V);
        cross_entropy_cuda_params p{P<float>(losses), P<float>(dlogits), P<const float>(logits),
                                    P<const int64_t>(targets), N, V, ignore_index, scale};
        py::gil_scoped_release nogil;
        cu(cross_entropy_cuda(&p, S(stream)));
    });
    m.def("cuda_adamw", [cu, S](uintptr_t param, uintptr_t mom, uintptr_t var, uintptr_t grad, long n, float lr,
                                float beta1, float beta2, float eps, float weight_decay, int step, uintptr_t stream) {
        CHECK_PTR(param); CHECK_PTR(mom); CHECK_PTR(var); CHECK_PTR(grad); CHECK_POS(n); CHECK_POS(step);
        adamw_cuda_params p{P<float>(param), P<float>(mom), P<float>(var), P<const float>(grad), n, lr, beta1, beta2,
                            eps, weight_decay, step};
        py::gil_scoped_release nogil;
        cu(adamw_cuda(&p, S(stream)));
    });
#endif
}
