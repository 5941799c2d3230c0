"""CUDA versions of the pyllm.ops functions (same signatures), over the cuda_* kernels in pyllm._C.

pyllm.ops dispatches here for CUDA tensors (see the CUDA section at the end of ops.py); call ops.<name>, not this.
Kernels run on torch's current stream (its handle is passed to the kernel), take contiguous fp32 tensors (linear
also bf16, and attention bf16 with head dim 64/128: the tensor-core paths) and are checked after every launch.
Other half-precision inputs to the fp32 kernels are upcast here, which costs a copy; bf16 norm kernels are future
work (benchmarks/bench_cuda.py).
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ._ext import C

# The ops that have CUDA kernels (ops.CUDA_OPS re-exports this; pyllm.model uses ops.<name> on CUDA for these).
NAMES = ("rmsnorm", "linear", "attention", "attention_with_lse", "rope", "swiglu", "cross_entropy", "sample",
         "decode_attention")


_AVAILABLE: bool | None = None


def available() -> bool:
    """True when pyllm._C was compiled with nvcc (the kernels exist; a GPU may still be absent). Asked once: every
    op calls it, and the build cannot change under a running process."""
    global _AVAILABLE
    if _AVAILABLE is None:
        try:
            _AVAILABLE = bool(C().build_info()["cuda_built"])
        except ImportError:
            return False
    return _AVAILABLE


def require_built(name: str):
    if not available():
        raise RuntimeError(f"{name}: got CUDA tensors but pyllm._C was built without CUDA (no nvcc at build time, "
                           "or PYLLM_NO_CUDA=1); rebuild with nvcc on PATH, or use backend='torch'")


_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _stream(t: torch.Tensor) -> int:
    """The handle of torch's current stream on t's device. torch.cuda.current_stream() builds a Stream object
    (~20 us of Python a call, measured on an H100 host: most of a decode step's per-op cost); the raw getter,
    which torch's own compiled code uses, returns the handle directly."""
    if _raw_stream is not None:
        return _raw_stream(t.device.index)
    return torch.cuda.current_stream(t.device).cuda_stream


def on_device(t: torch.Tensor):
    """The context that makes t's GPU the current device (the kernels launch there), or nothing when it is already
    (torch.cuda.device() costs a few us)."""
    import contextlib
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def _ops():
    """pyllm.ops, imported on first use (it imports this module at its end): its check() and the op validators
    (_check_<op>) are shared, so both backends take and refuse the same inputs with the same messages."""
    from . import ops
    return ops


def _check(t, name, dtype=torch.float32, shape=None, device=None):
    """ops.check for CUDA tensors: on `device` when given, else on any CUDA device."""
    return _ops().check(t, name, dtype, shape, device=device if device is not None else "cuda")


def _f32(t: torch.Tensor) -> torch.Tensor:
    """Half inputs (bf16 autocast outputs) go to the fp32 kernels as fp32: differentiable, costs one copy."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


# --- matmul -----------------------------------------------------------------------------------------------
def _mm(a: torch.Tensor, b: torch.Tensor, out_dtype=None) -> torch.Tensor:
    """C (M, N) = a (M, K) @ b (N, K).T on the pyllm kernel; a, b contiguous, same dtype (fp32, bf16 or fp16)."""
    M, K = a.shape
    N = b.shape[0]
    dtype = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[a.dtype]
    out_dtype = out_dtype or a.dtype
    c = torch.empty(M, N, dtype=out_dtype, device=a.device)
    C().cuda_matmul(c.data_ptr(), a.data_ptr(), b.data_ptr(), M, N, K, dtype, int(out_dtype == torch.float32),
                    _stream(a))
    return c


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):
        K = x.shape[-1]
        x2 = x.reshape(-1, K).contiguous()
        ctx.save_for_backward(x2, weight)
        return _mm(x2, weight).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        x2, weight = ctx.saved_tensors
        dout2 = dout.reshape(x2.shape[0], weight.shape[0]).to(x2.dtype).contiguous()  # (M, N); -1 fails at N=0
        # The kernel is NT only (both operands K-contiguous), so the other two products pay a transpose copy.
        dx = _mm(dout2, weight.t().contiguous())                    # (M, K) = dout . W
        dw = _mm(dout2.t().contiguous(), x2.t().contiguous())       # (N, K) = dout^T . x
        return dx.view(*dout.shape[:-1], x2.shape[1]), dw


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ weight (N, K).T -> (..., N). fp32 -> fp32 FFMA kernel; bf16 / fp16 (or fp32 under bf16 / fp16
    autocast) -> tensor-core kernel, 16-bit out."""
    require_built("linear")
    if torch.is_autocast_enabled("cuda"):  # as torch's linear under autocast: both operands in the autocast dtype
        dt = torch.get_autocast_dtype("cuda")  # (x may already be bf16: the bf16 attention's output)
        if x.is_floating_point() and weight.is_floating_point():
            x, weight = x.to(dt), weight.to(dt)
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"linear x: expected float32, bfloat16 or float16, got {x.dtype}")
    _check(weight, "linear weight", dtype=x.dtype, device=x.device)
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1] or x.numel() == 0:
        raise ValueError(f"linear: x {tuple(x.shape)} and weight {tuple(weight.shape)} do not match (..., K) x (N, K)")
    return _ops()._apply(_Linear, x, weight)


# --- rmsnorm ----------------------------------------------------------------------------------------------
class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        C_ = x.shape[-1]
        x2 = x.reshape(-1, C_)
        N = x2.shape[0]
        out = torch.empty_like(x2)
        rstd = torch.empty(N, dtype=torch.float32, device=x.device)
        C().cuda_rmsnorm_forward(out.data_ptr(), rstd.data_ptr(), x2.data_ptr(), weight.data_ptr(), N, C_,
                                 float(eps), _stream(x))
        ctx.save_for_backward(x2, weight, rstd)
        return out.view_as(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        x2, weight, rstd = ctx.saved_tensors
        N, C_ = x2.shape
        dout2 = dout.reshape(N, C_).float().contiguous()
        dx, dw = torch.empty_like(x2), torch.empty_like(weight)
        C().cuda_rmsnorm_backward(dx.data_ptr(), dw.data_ptr(), dout2.data_ptr(), x2.data_ptr(), weight.data_ptr(),
                                  rstd.data_ptr(), N, C_, _stream(x2))
        return dx.view(dout.shape), dw, None


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    require_built("rmsnorm")
    x = _f32(x).contiguous()
    _ops()._check_rmsnorm(x, weight, device="cuda", eps=eps)
    return _ops()._apply(_RMSNorm, x, weight, eps)


# --- attention --------------------------------------------------------------------------------------------
class _Attention(torch.autograd.Function):
    """The fp32 kernels (attention.cu), or with bf16=True the tensor-core ones (attention_bf16.cu: bf16 q, k, v,
    contiguous and 16-byte aligned, D 64 or 128; out and grads bf16, which autograd casts back when the inputs were
    fp32 under autocast). lse is fp32 either way; both pairs of kernels take the same arguments."""
    @staticmethod
    def forward(ctx, q, k, v, doc_ids, bf16):
        B, T, H, D = q.shape
        Hkv = k.shape[2]
        out = torch.empty_like(q)
        lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
        dp = 0 if doc_ids is None else doc_ids.data_ptr()
        fwd = C().cuda_attention_bf16_forward if bf16 else C().cuda_attention_forward
        fwd(out.data_ptr(), lse.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), dp, B, T, H, Hkv, D, _stream(q))
        ctx.bf16 = bf16
        ctx.save_for_backward(q, k, v, out, lse, doc_ids)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, doc_ids = ctx.saved_tensors
        B, T, H, D = q.shape
        Hkv = k.shape[2]
        dout = _aligned16(dout.to(torch.bfloat16).contiguous()) if ctx.bf16 else dout.float().contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        delta = torch.empty(B, H, T, dtype=torch.float32, device=q.device)  # rowsum(dout * out) scratch
        dp = 0 if doc_ids is None else doc_ids.data_ptr()
        bwd = C().cuda_attention_bf16_backward if ctx.bf16 else C().cuda_attention_backward
        bwd(dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), dout.data_ptr(), out.data_ptr(), lse.data_ptr(), q.data_ptr(),
            k.data_ptr(), v.data_ptr(), dp, delta.data_ptr(), B, T, H, Hkv, D, _stream(q))
        return dq, dk, dv, None, None


def _aligned16(t: torch.Tensor) -> torch.Tensor:
    """The bf16 kernels copy 16-byte chunks: a contiguous view at an odd offset gets a fresh (aligned) copy."""
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _bf16_attention(q, k, v) -> bool:
    """The tensor-core path: bf16 q (or fp32 under bf16 autocast) with head dim 64 or 128. Anything else (malformed
    inputs included) takes the fp32 path, which validates them with the CPU op's messages."""
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 and t.is_floating_point() for t in (q, k, v)):
        return False
    if q.shape[-1] not in (64, 128) or k.shape[-1] != q.shape[-1] or v.shape[-1] != q.shape[-1]:
        return False
    return q.dtype == torch.bfloat16 or (q.dtype == torch.float32 and torch.is_autocast_enabled("cuda")
                                         and torch.get_autocast_dtype("cuda") == torch.bfloat16)


def attention_with_lse(q, k, v, doc_ids=None):
    require_built("attention")
    if _bf16_attention(q, k, v):
        q, k, v = (_aligned16(t.to(torch.bfloat16).contiguous()) for t in (q, k, v))
        _ops()._check_attention(q, k, v, doc_ids, device="cuda", dtype=torch.bfloat16)
        return _ops()._apply(_Attention, q, k, v, doc_ids, True)
    q, k, v = (_f32(t).contiguous() for t in (q, k, v))
    _ops()._check_attention(q, k, v, doc_ids, device="cuda")
    return _ops()._apply(_Attention, q, k, v, doc_ids, False)


def attention(q, k, v, doc_ids=None):
    return attention_with_lse(q, k, v, doc_ids)[0]


def decode_attention(q, k_cache, v_cache, n_ctx):
    require_built("decode_attention")
    q = _f32(q).contiguous()
    B, H, Hkv, D, n_ctx = _ops()._check_decode_attention(q, k_cache, v_cache, n_ctx, device="cuda")
    _ops()._no_autograd("decode_attention", q, k_cache, v_cache)  # as the CPU op: no backward here either
    n_dev = 0
    if isinstance(n_ctx, torch.Tensor):  # read on the device: the bound T_max fixes the grid and the scratch
        n_dev, n_ctx = n_ctx.data_ptr(), k_cache.shape[1]
    out = torch.empty_like(q)
    ws = torch.empty(C().cuda_decode_attention_ws_floats(B, H, Hkv, D, n_ctx), dtype=torch.float32, device=q.device)
    C().cuda_decode_attention(out.data_ptr(), q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                              k_cache.stride(0), k_cache.stride(1), B, H, Hkv, D, n_ctx, n_dev, ws.data_ptr(),
                              _stream(q))
    return out


# --- rope, swiglu -----------------------------------------------------------------------------------------
class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        out = torch.empty_like(x)
        B, T, H, D = x.shape
        C().cuda_rope(out.data_ptr(), x.data_ptr(), cos.data_ptr(), sin.data_ptr(), B, T, H, D, 0, _stream(x))
        ctx.save_for_backward(cos, sin)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        cos, sin = ctx.saved_tensors
        dout = dout.float().contiguous()
        dx = torch.empty_like(dout)
        B, T, H, D = dout.shape
        C().cuda_rope(dx.data_ptr(), dout.data_ptr(), cos.data_ptr(), sin.data_ptr(), B, T, H, D, 1, _stream(dout))
        return dx, None, None


def rope(x, cos, sin):
    require_built("rope")
    x = _f32(x).contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    _ops()._check_rope(x, cos, sin, device="cuda")
    return _ops()._apply(_Rope, x, cos, sin)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        out = torch.empty_like(gate)
        C().cuda_swiglu(out.data_ptr(), 0, 0, gate.data_ptr(), up.data_ptr(), 0, gate.numel(), _stream(gate))
        ctx.save_for_backward(gate, up)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        gate, up = ctx.saved_tensors
        dout = dout.float().contiguous()
        dg, du = torch.empty_like(gate), torch.empty_like(up)
        C().cuda_swiglu(0, dg.data_ptr(), du.data_ptr(), gate.data_ptr(), up.data_ptr(), dout.data_ptr(),
                        gate.numel(), _stream(gate))
        return dg, du


def swiglu(gate, up):
    require_built("swiglu")
    gate, up = _f32(gate).contiguous(), _f32(up).contiguous()
    _ops()._check_swiglu(gate, up, device="cuda")
    return _ops()._apply(_SwiGLU, gate, up)


# --- cross-entropy ----------------------------------------------------------------------------------------
class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index):
        N, V = logits.shape
        losses = torch.empty(N, dtype=torch.float32, device=logits.device)
        dlogits = torch.empty_like(logits) if logits.requires_grad else None  # d(sum of losses)/dlogits
        C().cuda_cross_entropy(losses.data_ptr(), 0 if dlogits is None else dlogits.data_ptr(), logits.data_ptr(),
                               targets.data_ptr(), N, V, int(ignore_index), 1.0, _stream(logits))
        n_valid = (targets != ignore_index).sum().clamp(min=1).float()
        ctx.save_for_backward(dlogits, n_valid)
        return losses.sum() / n_valid  # 0 when every target is ignored (all losses are 0)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        dlogits, n_valid = ctx.saved_tensors
        return dlogits * (dout / n_valid), None, None  # one extra pass over (N, V) keeps the forward sync-free


def cross_entropy(logits, targets, ignore_index=-1):
    require_built("cross_entropy")
    logits = _f32(logits).contiguous()
    _ops()._check_cross_entropy(logits, targets, ignore_index, device="cuda")
    return _ops()._apply(_CrossEntropy, logits, targets, ignore_index)


# --- sampling ---------------------------------------------------------------------------------------------
def sample(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, mask=None, seed=0, step=0):
    """-> (tokens (B,) int64, logprobs (B,) fp32); see csrc/cuda/kernels_cuda.h sample_cuda."""
    require_built("sample")
    logits = _f32(logits).contiguous()
    B, V = _ops()._check_sample(logits, temperature, top_k, top_p, min_p, mask, device="cuda")
    mp = 0
    if mask is not None:
        if not bool(mask.any(-1).all()):
            raise ValueError("sample mask: some row allows no token")
        mask = mask.view(torch.uint8)
        mp = mask.data_ptr()
    tokens = torch.empty(B, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(B, dtype=torch.float32, device=logits.device)
    seed = _ops().check_int(seed, "sample seed", 0, 2 ** 64 - 1)  # as the CPU op: not wrapped to another seed
    step = _ops().check_int(step, "sample step", 0, 2 ** 64 - 1)
    f32 = _ops().f32_positive
    C().cuda_sample(tokens.data_ptr(), logprobs.data_ptr(), logits.data_ptr(), mp, B, V, f32(temperature), int(top_k),
                    f32(top_p), f32(min_p), seed, step, _stream(logits))
    return tokens, logprobs


# --- AdamW (not in the model table; used by a fused optimizer step) ----------------------------------------
@torch.no_grad()
def adamw_step(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step):
    """One in-place AdamW step on fp32 CUDA tensors of the same shape (PyTorch's formula)."""
    require_built("adamw_step")
    ts = (("param", param), ("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq))
    for name, t in ts:
        _check(t, f"adamw_step {name}", shape=tuple(param.shape), device=param.device)
    for i, (n0, a) in enumerate(ts):  # as the CPU op: each its own memory (an aliased pair gave wrong updates)
        for n1, b in ts[i + 1:]:
            if _ops()._overlap(a, b):
                raise ValueError(f"adamw_step {n1}: shares memory with {n0}")
    _ops()._check_adamw(lr, beta1, beta2, eps, weight_decay, "adamw_step")
    step = min(_ops().check_int(step, "adamw_step step", 1), 2 ** 31 - 1)  # int32 in the kernel (see ops.py)
    if param.numel() == 0:  # the binding refuses a null pointer; nothing to update
        return
    with on_device(param):  # not an op of the model's table (those switch in ops._cuda_dispatch)
        C().cuda_adamw(param.data_ptr(), exp_avg.data_ptr(), exp_avg_sq.data_ptr(), grad.data_ptr(), param.numel(),
                       float(lr), float(beta1), float(beta2), float(eps), float(weight_decay), int(step),
                       _stream(param))
