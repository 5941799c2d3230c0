"""torch autograd Functions over pyllm._C: validate tensors here, pass data_ptr() and sizes to the kernels."""
from __future__ import annotations

import functools
import math
import numbers
import operator
import sys
import threading

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from ._ext import C
from .runtime import f32_positive  # noqa: F401 (also ops_cuda's)


# --- validation -------------------------------------------------------------------------------------------
def check(t: torch.Tensor, name: str, dtype=torch.float32, shape: tuple | None = None, device="cpu"):
    """One-line errors for what the kernels cannot take: wrong dtype/device/shape, or a strided view.
    device: a type ("cpu", "cuda": any index) or a torch.device (that exact one). ops_cuda uses it too."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, got {t.dtype}")
    if device == "cpu":   # the common case, without building a torch.device per call (~1 us: 400 calls a step)
        if t.device.type != "cpu":
            raise ValueError(f"{name}: expected a tensor on {device}, got {t.device}")
    else:
        want = torch.device(device)
        if t.device.type != want.type or (want.index is not None and t.device != want):
            raise ValueError(f"{name}: expected a tensor on {device}, got {t.device}")
    if shape is not None and t.shape != shape:   # an exact match is one C compare; None is a wildcard
        if len(shape) != t.dim() or any(s is not None and s != d for s, d in zip(shape, t.shape)):
            raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.layout != torch.strided:  # sparse / mkldnn: torch's own error from is_contiguous or data_ptr
        raise ValueError(f"{name}: expected a dense (strided) tensor, got layout {t.layout}")
    if not t.is_contiguous():
        raise ValueError(f"{name}: must be contiguous (call .contiguous())")
    if t.is_neg():  # a lazy negation (x.conj().imag): the kernel would read the bytes without the sign
        raise ValueError(f"{name}: has a lazy negation bit (call .resolve_neg())")
    if t.dim() and max(t.shape) > INT_MAX:  # the kernels' sizes are C ints (was pybind11's 4-line type error)
        raise ValueError(f"{name}: a dimension of {max(t.shape)} is beyond the kernels' 32-bit sizes (2^31 - 1)")
    return t


INT_MAX = 2 ** 31 - 1


def _no_autograd(where: str, *tensors) -> None:
    """The ops without a backward: an input that requires grad gave an output with no graph, and the gradient was
    silently never computed; an out= that requires grad was overwritten in place (torch refuses both)."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise ValueError(f"{where}: records no gradient; call it under torch.no_grad() (for gradients: linear, "
                         f"attention)")


def check_int(v, name: str, lo: int | None = None, hi: int | None = None) -> int:
    """An integer argument as a Python int (numpy / 0-d integer tensors fine); a float, bool or string is a TypeError
    (top_k=2.7 was cut to 2, seed='7' accepted), a value outside [lo, hi] a ValueError (a seed of -1 or 2**64
    wrapped around to another seed)."""
    if isinstance(v, bool):
        raise TypeError(f"{name}: expected an integer, got {v!r}")
    try:
        v = operator.index(v)
    except TypeError:
        raise TypeError(f"{name}: expected an integer, got {v!r}") from None
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ValueError(f"{_subject(name)} must be {_range_text(lo, hi, False)}, got {v}")
    return v


def _subject(name: str) -> str:
    """'sample seed:' for an argument, '--lr' for a command-line flag (as the stages' other flag errors read)."""
    return name if name.startswith("--") else f"{name}:"


def _range_text(lo, hi, lo_open: bool) -> str:
    """'>= 0', '> 0', '<= 5' or 'in [0, 1]' / 'in (0, 1]' for the range errors."""
    def t(x):  # integers exactly (a seed's 2**64 - 1), floats short
        return f"{x:g}" if isinstance(x, float) else str(x)
    if hi is None:
        return f"{'>' if lo_open else '>='} {t(lo)}"
    if lo is None:
        return f"<= {t(hi)}"
    return f"in {'(' if lo_open else '['}{t(lo)}, {t(hi)}]"


def check_float(v, name: str, lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> float:
    """A finite real argument as a float, in [lo, hi] ((lo, hi] with lo_open); NaN / inf, None and strings are
    errors naming the argument (lr=nan turned every parameter to NaN)."""
    if isinstance(v, bool) or not (isinstance(v, numbers.Real) or (isinstance(v, torch.Tensor) and v.numel() == 1
                                                                    and not v.dtype.is_complex)):
        raise TypeError(f"{name}: expected a number, got {v!r}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"{_subject(name)} must be a finite number, got {v}")
    if (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
        raise ValueError(f"{_subject(name)} must be {_range_text(lo, hi, lo_open)}, got {v:g}")
    return v


def _same(t: torch.Tensor, device):
    """The device an op's other tensors must be on: "cpu", or exactly the first tensor's CUDA device."""
    return "cpu" if device == "cpu" else t.device


# The op validators below serve both pyllm.ops (device "cpu") and pyllm.ops_cuda (device "cuda"): one set of
# rules and messages for every backend. Each checks, raises a one-line error, and returns the op's sizes.
def _check_rmsnorm(x, weight, device="cpu", eps=0.0):
    check_float(eps, "rmsnorm eps", lo=0)  # < 0: NaN rows (the kernel takes any float)
    check(x, "rmsnorm x", device=device)
    if x.dim() == 0 or x.numel() == 0:
        raise ValueError(f"rmsnorm x: expected a non-empty tensor of at least 1 dim, got shape {tuple(x.shape)}")
    check(weight, "rmsnorm weight", shape=(x.shape[-1],), device=_same(x, device))


def _check_rope(x, cos, sin, device="cpu"):
    check(x, "rope x", device=device)
    if x.dim() != 4 or x.numel() == 0 or x.shape[-1] % 2:
        raise ValueError(f"rope x: expected a non-empty (B, T, H, D) tensor with even D, got {tuple(x.shape)}")
    T, D = x.shape[1], x.shape[3]
    check(cos, "rope cos", shape=(T, D // 2), device=_same(x, device))
    check(sin, "rope sin", shape=(T, D // 2), device=_same(x, device))
    _check_fixed_tables(cos, sin, "rope")


def _check_fixed_tables(cos, sin, where: str) -> None:
    """The kernels give no gradient to the rotary tables (nobody learns them): one that asked for one got an output
    that required grad and a None .grad, silently."""
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        raise ValueError(f"{where} cos/sin: the rotary tables get no gradient here; pass them detached "
                         f"(or use pyllm.ref.rope)")


def _check_swiglu(gate, up, device="cpu"):
    check(gate, "swiglu gate", device=device)
    check(up, "swiglu up", shape=tuple(gate.shape), device=_same(gate, device))
    if gate.numel() == 0:
        raise ValueError("swiglu gate: empty tensor")


def _check_cross_entropy(logits, targets, ignore_index, device="cpu"):
    check(logits, "cross_entropy logits", device=device)
    if logits.dim() != 2 or logits.numel() == 0:
        raise ValueError(f"cross_entropy logits: expected a non-empty (N, V) tensor, got {tuple(logits.shape)}")
    N, V = logits.shape
    check(targets, "cross_entropy targets", dtype=torch.int64, shape=(N,), device=_same(logits, device))
    # an int64 (1.5 was ignored as 1 by the kernel but counted as no row by the mean: a wrong loss)
    check_int(ignore_index, "cross_entropy ignore_index", -2 ** 63, 2 ** 63 - 1)
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
    if bool(bad.any()):  # on CUDA a host sync, but an out-of-range target must be an error, not NaN
        raise ValueError(f"cross_entropy targets: {int(targets[bad][0])} is out of range [0, {V}) "
                         f"and not ignore_index {ignore_index}")
    return N, V


def _check_sample(logits, temperature, top_k, top_p, min_p, mask, device="cpu"):
    check(logits, "sample logits", device=device)
    if logits.dim() != 2 or logits.numel() == 0:
        raise ValueError(f"sample logits: expected a non-empty (B, V) tensor, got shape {tuple(logits.shape)}")
    B, V = logits.shape
    if mask is not None:
        check(mask, "sample mask", dtype=torch.bool, shape=(B, V), device=_same(logits, device))
    check_sample_settings(temperature, top_k, top_p, min_p, "sample")
    return B, V


def check_sample_settings(temperature, top_k, top_p, min_p, where: str) -> None:
    """The sampling filters' ranges, for sample() on every backend and for model.generate up front."""
    check_float(temperature, f"{where} temperature", 0.0)
    check_int(top_k, f"{where} top_k", 0, 2 ** 31 - 1)
    check_float(top_p, f"{where} top_p", 0.0, 1.0, lo_open=True)
    check_float(min_p, f"{where} min_p", 0.0, 1.0)


def _check_attention(q, k, v, doc_ids, device="cpu", dtype=torch.float32):
    check(q, "attention q", dtype=dtype, device=device)
    if q.dim() != 4:
        raise ValueError(f"attention q: expected shape (B, T, H, D), got {tuple(q.shape)}")
    B, T, H, D = q.shape
    dev = _same(q, device)
    check(k, "attention k", dtype=dtype, device=dev)
    if k.dim() != 4:
        raise ValueError(f"attention k: expected shape (B, T, Hkv, D), got {tuple(k.shape)}")
    Hkv = k.shape[2]
    check(k, "attention k", dtype=dtype, shape=(B, T, Hkv, D), device=dev)
    check(v, "attention v", dtype=dtype, shape=(B, T, Hkv, D), device=dev)
    if min(B, T, H, D, Hkv) == 0:
        raise ValueError(f"attention q: empty tensor of shape {tuple(q.shape)}")
    if H % Hkv != 0:
        raise ValueError(f"attention k: {H} query heads is not a multiple of {Hkv} kv heads")
    if D > 256:
        raise ValueError(f"attention q: head dim {D} > 256 is not supported")
    if doc_ids is not None:
        check(doc_ids, "attention doc_ids", dtype=torch.int32, shape=(B, T), device=dev)
    return B, T, H, Hkv, D


def _check_decode_attention(q, k_cache, v_cache, n_ctx, device="cpu"):
    check(q, "decode_attention q", device=device)
    if q.dim() != 3:
        raise ValueError(f"decode_attention q: expected shape (B, H, D), got {tuple(q.shape)}")
    B, H, D = q.shape
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.device != q.device:
            raise TypeError(f"decode_attention {name}: expected a float32 tensor on {q.device}")
        if t.dim() != 4 or t.shape[0] != B or t.shape[3] != D:
            raise ValueError(f"decode_attention {name}: expected shape ({B}, T_max, Hkv, {D}), got {tuple(t.shape)}")
        if t.stride(3) != 1 or t.stride(2) != D:
            raise ValueError(f"decode_attention {name}: its last two dims (Hkv, D) must be contiguous")
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError("decode_attention v_cache: must have the same shape and strides as k_cache")
    T_max, Hkv = k_cache.shape[1], k_cache.shape[2]
    if min(B, H, D, Hkv) == 0 or H % Hkv != 0 or D > 256:
        raise ValueError(f"decode_attention q: bad shape {tuple(q.shape)} for {Hkv} kv heads (H % Hkv, D <= 256)")
    # the batch and position strides are free: the caches are only read (a time-major (T, B, ...) cache permuted to
    # (B, T, ...), or one prefix expand()ed over the batch, was refused as "overlapping rows")
    if isinstance(n_ctx, torch.Tensor):
        # the length kept on the device (GPT's decode step, which a CUDA graph replays): not read here, a sync;
        # the CUDA kernel reads it and clamps it to [1, T_max]; the CPU op reads it (no sync on the host)
        if n_ctx.dtype != torch.int64 or n_ctx.numel() != 1 or n_ctx.device != q.device:
            raise TypeError(f"decode_attention n_ctx: expected an int or a 1-element int64 tensor on {q.device}, "
                            f"got {n_ctx.dtype} {tuple(n_ctx.shape)} on {n_ctx.device}")
        if device != "cpu":
            return B, H, Hkv, D, n_ctx
        n_ctx = int(n_ctx)
    n_ctx = check_int(n_ctx, "decode_attention n_ctx", 1, T_max)
    return B, H, Hkv, D, n_ctx


class _NoGraphCtx:
    """What the Functions' forwards touch on ctx, for a call that records no autograd graph."""
    needs_input_grad = (False,) * 16

    def save_for_backward(self, *tensors):
        pass

    def mark_non_differentiable(self, *tensors):
        pass


def _apply(fn, *args):
    """fn.apply(*args), or fn.forward directly when nothing is to be differentiated (no_grad, or no input that
    requires grad: decoding, sampling, evaluation): Function.apply costs ~9 us a call, a third of a small op's
    Python on CPU, and ~160 op calls make a decode step of a 12-layer model."""
    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return fn.apply(*args)
    return fn.forward(_NoGraphCtx(), *args)


def ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _written(*tensors) -> None:
    """Tell autograd that a kernel changed these tensors in place through their data pointers (as torch's in-place
    ops do): a graph that saved one then refuses its backward, where it backpropagated through the new values without
    a word (a step of pyllm's AdamW before loss.backward(), a matmul out= saved by an earlier op). Inference tensors
    have no version counter."""
    torch.autograd.graph.increment_version([t for t in tensors if not t.is_inference()])


# --- big output buffers -----------------------------------------------------------------------------------
# A fresh multi-MB tensor is fresh memory: glibc maps blocks over 32 MB anew on every allocation (and trims freed
# heap), so each training step page-faults its logits, dlogits and activations in again, inside the kernels that
# first write them: 115-150 ms of system time per step of the issue-3 model on 1 thread (6-7% of it; 6-14 ms with
# the pool, and the step 0-6% faster), and 32 of the 47 ms of a 64 MB cross-entropy backward. So the ops take
# their big fp32 outputs from a pool that keeps freed buffers: a pooled buffer is free again when nothing but the
# pool references it (torch.from_numpy's storage holds one reference to the array; CPython counts it). Bounded by
# POOL_MAX_BYTES (the issue-3 model uses ~510 MB): when full, its free buffers go (shapes that changed, e.g.
# variable-length batches), and past that, plain torch.empty.
POOL_MIN_BYTES = 1 << 20
POOL_MAX_BYTES = 1 << 30
_pool: dict[int, list] = {}   # element count -> arrays of that size
_pool_bytes = 0
_pool_lock = threading.Lock()


def _pool_drop_free() -> int:
    """With _pool_lock held: drop every buffer nothing else references. Returns the bytes dropped."""
    global _pool_bytes
    freed = 0
    for n, arrays in _pool.items():
        keep = [a for a in arrays if sys.getrefcount(a) > 3]   # `arrays`, `a`, the argument: + a holder
        freed += (len(arrays) - len(keep)) * n * 4
        arrays[:] = keep
    _pool_bytes -= freed
    return freed


def empty(*shape: int) -> torch.Tensor:
    """An uninitialised fp32 tensor of `shape`; from the pool when it is at least POOL_MIN_BYTES."""
    global _pool_bytes
    n = math.prod(shape)
    if n * 4 < POOL_MIN_BYTES:
        return torch.empty(shape, dtype=torch.float32)
    with _pool_lock:
        arrays = _pool.setdefault(n, [])
        for a in arrays:
            if sys.getrefcount(a) == 3:   # `arrays`, `a` and getrefcount's argument: no tensor holds it
                return torch.from_numpy(a).view(shape)
        if _pool_bytes + n * 4 > POOL_MAX_BYTES:   # full: free buffers of other sizes (shapes that changed) go
            _pool_drop_free()
        if _pool_bytes + n * 4 <= POOL_MAX_BYTES:
            a = np.empty(n, dtype=np.float32)
            arrays.append(a)                       # (_pool_drop_free filtered `arrays` in place)
            _pool_bytes += n * 4
            return torch.from_numpy(a).view(shape)
    return torch.empty(shape, dtype=torch.float32)


def empty_pool_release() -> int:
    """Give the pool's free buffers back to the allocator (e.g. after training, in a long-lived process).
    Buffers still in use stay. Returns the bytes released."""
    with _pool_lock:
        return _pool_drop_free()


# --- rmsnorm ----------------------------------------------------------------------------------------------
class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        C_ = x.shape[-1]
        x2 = x.reshape(-1, C_)
        N = x2.shape[0]
        out = empty(*x2.shape)
        rstd = torch.empty(N, dtype=torch.float32)
        C().rmsnorm_forward(ptr(out), ptr(rstd), ptr(x2), ptr(weight), N, C_, float(eps))
        ctx.save_for_backward(x2, weight, rstd)
        return out.view_as(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        x2, weight, rstd = ctx.saved_tensors
        N, C_ = x2.shape
        dout2 = dout.reshape(N, C_).contiguous()
        dx = empty(*x2.shape)
        dw = torch.zeros_like(weight)
        C().rmsnorm_backward(ptr(dx), ptr(dw), ptr(dout2), ptr(x2), ptr(weight), ptr(rstd), N, C_)
        return dx.view(dout.shape), dw, None


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """RMSNorm over the last dim. x (..., C) fp32 contiguous, weight (C)."""
    _check_rmsnorm(x, weight, eps=eps)
    return _apply(_RMSNorm, x, weight, eps)


# --- matmul -----------------------------------------------------------------------------------------------
def _autocast_bf16() -> bool:
    """True inside torch.autocast("cpu", dtype=torch.bfloat16): linear() and block() then run their GEMMs on bf16
    operands (fp32 accumulate and fp32 outputs); parameters, the activations between ops, gradients and the
    optimizer state stay fp32. The choice is made in the forward and kept for the backward."""
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def _bf16_operand(t: torch.Tensor) -> torch.Tensor:
    """A GEMM operand rounded to bf16 (what _gemm(bf16=True) does to each fp32 operand), for one that several GEMMs
    read: rounded once. The rounding is torch's (round to nearest even), as torch's autocast does."""
    return t.to(torch.bfloat16)


def _as_is(t: torch.Tensor) -> torch.Tensor:
    return t


def _gemm(a, b, M, N, K, trans_a=False, trans_b=False, bias=None, out=None, accumulate=False, bf16=False):
    """The one launch of the GEMM kernel, without checks: matmul() checks first; linear's tensors are checked once
    per layer call (3 GEMMs per linear, ~87 a step of a small model, where checks cost ~10 us each against
    ~100-500 us kernels). Shapes and flags as in matmul(); bf16: round fp32 operands to bf16 first (a copy each)."""
    if out is None:
        out = empty(M, N)
    if M == 0 or N == 0:
        return out
    if K == 0:    # the empty sum (the operands have no data pointer)
        if not accumulate:
            out.zero_()
        return out if bias is None else out.add_(bias)
    if bf16:
        a, b = a.to(torch.bfloat16), b.to(torch.bfloat16)
    fn = C().matmul_bf16_forward if a.dtype == torch.bfloat16 else C().matmul_forward
    fn(ptr(out), ptr(a), ptr(b), ptr(bias), M, N, K, _ld(a), _ld(b), _ld(out), bool(trans_a), bool(trans_b),
       bool(accumulate))
    return out


def _ld(t: torch.Tensor) -> int:
    """The row stride of a 2-D operand whose rows are contiguous (contiguous, or a padded_rows() view)."""
    return t.stride(0) if t.shape[0] > 1 else max(1, t.shape[1])


def padded_rows(rows: int, cols: int) -> torch.Tensor:
    """An uninitialised fp32 (rows, cols) view whose row stride is not a multiple of 4 KiB (cols + 16 where it
    would be). The GEMM reads a row-major A in place but for such a stride (its MR rows would share one L1 set) and
    packs it instead: for the step's narrow products (N = 384) that packing cost ~10% (2048x384x2048 with A's rows
    8 KiB apart 97 GFLOP/s, padded 108; 2048x384x8192 98 / 109; 1 thread, session 34). So the buffers that are a
    GEMM's A (the MLP's [dgate | dup], the LM head's dlogits) are made with this stride."""
    ld = cols + 16 if (cols * 4) % 4096 == 0 else cols
    return empty(rows, ld)[:, :cols]


def matmul(a, b, bias=None, trans_a=False, trans_b=False, out=None, accumulate=False):
    """C (M, N) = op(a) @ op(b).T (+ bias), one call of the packed GEMM kernel (no autograd).
    op(a) = a (M, K), or a.T when trans_a (a stored (K, M)); op(b) = b (N, K), or b.T when trans_b (b (K, N)).
    a, b fp32 (or both bf16: fp32 accumulate, fp32 result). out (M, N) fp32 is written (or added to when
    accumulate); a new tensor is returned when out is None."""
    dt = torch.bfloat16 if isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 else torch.float32
    check(a, "matmul a", dt)
    check(b, "matmul b", dt)
    _no_autograd("matmul", a, b, bias if isinstance(bias, torch.Tensor) else None,
                 out if isinstance(out, torch.Tensor) else None)
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"matmul: a and b must be 2-D, got {tuple(a.shape)} and {tuple(b.shape)}")
    M, K = (a.shape[1], a.shape[0]) if trans_a else tuple(a.shape)
    N, Kb = (b.shape[1], b.shape[0]) if trans_b else tuple(b.shape)
    if K != Kb:
        raise ValueError(f"matmul: inner dimensions differ: op(a) is ({M}, {K}), op(b).T needs ({Kb}, {N})")
    if bias is not None:
        check(bias, "matmul bias", shape=(N,))
    out_given = out is not None
    if out is None:
        if accumulate:
            raise ValueError("matmul: accumulate=True needs out")
    else:
        check(out, "matmul out", shape=(M, N))
        for t, name in ((a, "a"), (b, "b"), (bias, "bias")):
            if _overlap(out, t):  # the kernel reads its operands while writing out: a wrong result, not an error
                raise ValueError(f"matmul out: shares memory with {name}")
    out = _gemm(a, b, M, N, K, trans_a, trans_b, bias, out, accumulate)
    if out_given:
        _written(out)
    return out


def _overlap(x: torch.Tensor, y: torch.Tensor | None) -> bool:
    """Do two contiguous tensors' bytes intersect?"""
    if y is None or x.numel() == 0 or y.numel() == 0:
        return False
    x0, y0 = x.data_ptr(), y.data_ptr()
    return x0 < y0 + y.numel() * y.element_size() and y0 < x0 + x.numel() * x.element_size()


def matmul_bf16(a, b):
    """a (M, K) bf16, b (N, K) bf16 -> (M, N) fp32 = a @ b.T with fp32 accumulation."""
    check(a, "matmul_bf16 a", torch.bfloat16)
    check(b, "matmul_bf16 b", torch.bfloat16)
    return matmul(a, b)


class _Linear(torch.autograd.Function):
    # Backward uses the kernel's transpose flags on the saved tensors: no transposed copies are made.
    @staticmethod
    def forward(ctx, x, weight, bias):
        K = x.shape[-1]
        x2 = x.reshape(-1, K)                                    # (M, K) view
        N = weight.shape[0]
        ctx.bf16 = _autocast_bf16()
        if ctx.bf16:   # rounded once: the backward's GEMMs read the same bf16 operands
            x2, weight = _bf16_operand(x2), _bf16_operand(weight)
        y = _gemm(x2, weight, x2.shape[0], N, K, bias=bias, bf16=ctx.bf16)     # (M, N)
        ctx.save_for_backward(x2, weight)
        ctx.has_bias = bias is not None
        return y.view(*x.shape[:-1], N)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x2, weight = ctx.saved_tensors
        N, K = weight.shape
        M = x2.shape[0]
        dy2 = dy.reshape(M, N)                                   # (M, N) (-1 failed for N = 0)
        if dy2.dtype != torch.float32 or dy2.device.type != "cpu":
            raise TypeError(f"linear backward: expected a float32 cpu gradient, got {dy2.dtype} on {dy2.device}")
        if dy2.stride(1) != 1 or (M > 1 and dy2.stride(0) < N):   # rows contiguous (a padded_rows() view) will do
            dy2 = dy2.contiguous()
        dyg = _bf16_operand(dy2) if ctx.bf16 else dy2           # the GEMMs' operand (db sums the fp32 dy)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = _gemm(dyg, weight, M, K, N, trans_b=True, bf16=ctx.bf16).view(*dy.shape[:-1], K)
        if ctx.needs_input_grad[1]:                              # (N, K) = dYᵀ·X;  dX (M, K) = dY·W above
            dw = _gemm(dyg, x2, N, K, M, trans_a=True, trans_b=True, bf16=ctx.bf16)   # M = 0: zeros
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0)
        return dx, dw, db


def linear(x, weight, bias=None):
    """x (..., K) fp32 contiguous, weight (N, K), bias (N) or None -> (..., N) = x @ weight.T (+ bias)."""
    check(x, "linear x")
    if x.dim() == 0 or x.shape[-1] == 0:  # K = 0 was torch's "cannot reshape tensor of 0 elements" from _Linear
        raise ValueError(f"linear x: expected (..., K) with K >= 1, got {tuple(x.shape)}")
    check(weight, "linear weight", shape=(None, x.shape[-1]))
    if bias is not None:
        check(bias, "linear bias", shape=(weight.shape[0],))
    return _apply(_Linear, x, weight, bias)


# --- matvec and Q8_0 (the C binary's decode path; exposed for tests) ---------------------------------------
def matvec(W, x):
    """W (n, k) fp32, x (k) -> y (n) = W @ x."""
    check(W, "matvec W")
    if W.dim() != 2 or W.numel() == 0:  # an empty W was the binding's "null pointer for w"
        raise ValueError(f"matvec W: expected a non-empty 2-D tensor, got {tuple(W.shape)}")
    check(x, "matvec x", shape=(W.shape[1],))
    _no_autograd("matvec", W, x)
    y = torch.empty(W.shape[0], dtype=torch.float32)
    C().matvec_f32(ptr(y), ptr(W), ptr(x), W.shape[0], W.shape[1])
    return y


def quantize_q8(w, G):
    """w (n, k) fp32, k % G == 0 -> (q (n, k) int8, s (n, k/G) fp32); Q8_0: s = max|w|/127, q = roundf(w/s)."""
    check(w, "quantize_q8 w")
    _no_autograd("quantize_q8", w)
    G = check_int(G, "quantize_q8 G", 1, 2 ** 31 - 1)  # 2.0 was torch.empty's TypeError
    if w.dim() != 2 or w.numel() == 0 or w.shape[1] % G:  # empty: the binding's "null pointer for q"
        raise ValueError(f"quantize_q8 w: expected a non-empty (n, k) with k a multiple of G={G}, got "
                         f"{tuple(w.shape)}")
    n, k = w.shape
    q = torch.empty(n, k, dtype=torch.int8)
    s = torch.empty(n, k // G, dtype=torch.float32)
    C().quantize_q8(ptr(q), ptr(s), ptr(w), n, k, G)
    return q, s


def matvec_q8(wq, ws, x):
    """wq (n, k) int8, ws (n, k/G) fp32, x (k) fp32 -> y (n): x is Q8_0-quantized per group inside the kernel."""
    check(wq, "matvec_q8 wq", torch.int8)
    if wq.dim() != 2 or wq.numel() == 0:  # empty: the binding's "null pointer for y"
        raise ValueError(f"matvec_q8 wq: expected a non-empty 2-D tensor, got {tuple(wq.shape)}")
    n, k = wq.shape
    check(ws, "matvec_q8 ws", shape=(n, None))
    if ws.shape[1] == 0 or k % ws.shape[1]:
        raise ValueError(f"matvec_q8 ws: k={k} is not a multiple of the number of groups {ws.shape[1]}")
    check(x, "matvec_q8 x", shape=(k,))
    _no_autograd("matvec_q8", ws, x)
    y = torch.empty(n, dtype=torch.float32)
    C().matvec_q8(ptr(y), ptr(wq), ptr(ws), ptr(x), n, k, k // ws.shape[1])
    return y
# --- sampling ---------------------------------------------------------------------------------------------
def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
           mask: torch.Tensor | None = None, seed: int = 0, step: int = 0):
    """Draw one token per row. logits (B, V) fp32; mask (B, V) bool of ALLOWED tokens or None.
    temperature 0 = greedy. Filters in HF order: mask, temperature, top-k, top-p, min-p.
    The draw is a pure function of (seed, row, step): same seed -> same tokens on every CPU path.
    Returns (tokens (B,) int64, logprobs (B,) fp32) with logprob = log_softmax(logits / T)[token] (T = 1 if greedy)."""
    B, V = _check_sample(logits, temperature, top_k, top_p, min_p, mask)
    seed = check_int(seed, "sample seed", 0, 2 ** 64 - 1)
    step = check_int(step, "sample step", 0, 2 ** 64 - 1)
    tokens = torch.empty(B, dtype=torch.int64)
    logprobs = torch.empty(B, dtype=torch.float32)
    C().sample_forward(ptr(tokens), ptr(logprobs), ptr(logits), ptr(mask), B, V, f32_positive(temperature),
                       int(top_k), f32_positive(top_p), f32_positive(min_p), seed, step)
    bad = tokens < 0
    if bool(bad.any()):
        b = int(bad.nonzero()[0, 0])
        code = int(tokens[b])
        why = {-1: "no allowed token (the mask or -inf logits remove every token)",
               -2: "NaN or +inf in the logits"}.get(code, "out of memory for the scratch buffers")
        raise ValueError(f"sample: row {b}: {why}")
    return tokens, logprobs


# --- fused training ops: rope, swiglu, cross-entropy, AdamW ----------------------------------------------
class _RoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        B, T, H, D = x.shape
        out = torch.empty_like(x)
        C().rope_forward(ptr(out), ptr(x), ptr(cos), ptr(sin), B, T, H, D, 0)
        ctx.save_for_backward(cos, sin)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        cos, sin = ctx.saved_tensors
        dout = dout.contiguous()
        B, T, H, D = dout.shape
        dx = torch.empty_like(dout)
        C().rope_forward(ptr(dx), ptr(dout), ptr(cos), ptr(sin), B, T, H, D, 1)
        return dx, None, None


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, HF rotate-half layout. x (B, T, H, D) fp32; cos/sin (T, D/2) -> (B, T, H, D)."""
    _check_rope(x, cos, sin)
    return _apply(_RoPE, x, cos, sin)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        out = empty(*gate.shape)
        C().swiglu_forward(ptr(out), ptr(gate), ptr(up), gate.numel())
        ctx.save_for_backward(gate, up)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        gate, up = ctx.saved_tensors
        dout = dout.contiguous()
        dg, du = empty(*gate.shape), empty(*up.shape)
        C().swiglu_backward(ptr(dg), ptr(du), ptr(dout), ptr(gate), ptr(up), gate.numel())
        return dg, du


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up; gate and up fp32, same shape."""
    _check_swiglu(gate, up)
    return _apply(_SwiGLU, gate, up)


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index):
        N, V = logits.shape
        loss_rows = torch.empty(N, dtype=torch.float32)
        stats = torch.empty(N, 2, dtype=torch.float32)  # (N, 2) row max, log-sum
        n_valid = max(int((targets != ignore_index).sum()), 1)
        # the gradient of the mean loss, written by the same pass over the logits (the backward only scales it)
        # (rows padded_rows(): the LM head's dX GEMM reads it in place)
        dlogits = padded_rows(N, V) if ctx.needs_input_grad[0] else None
        C().cross_entropy_forward(ptr(loss_rows), ptr(stats), ptr(logits), ptr(targets), N, V, int(ignore_index),
                                  ptr(dlogits), 1.0 / n_valid, 0 if dlogits is None else _ld(dlogits))
        ctx.dlogits = dlogits
        ctx.dlogits_version = None if dlogits is None else dlogits._version
        return loss_rows.sum(dtype=torch.float64).float() / n_valid

    @staticmethod
    @once_differentiable
    def backward(ctx, dloss):
        if ctx.dlogits is None:
            raise RuntimeError("cross_entropy: the logits did not require grad in the forward")
        if ctx.dlogits._version != ctx.dlogits_version:  # the buffer an earlier backward returned, changed since
            raise RuntimeError("cross_entropy backward: the gradient an earlier backward of this graph returned was "
                               "modified in place (it is the buffer this backward returns): clone it before changing "
                               "it")
        # loss.backward() passes exactly 1: the forward's buffer is the gradient (a copy would be one more pass
        # over (N, V)); the buffer is not changed in place, so a retained graph's second backward still sees it
        return (ctx.dlogits if float(dloss) == 1.0 else ctx.dlogits * float(dloss)), None, None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -1) -> torch.Tensor:
    """Mean cross-entropy over non-ignored targets (0 if none). logits (N, V) fp32, targets (N) int64.
    When the logits require grad, the forward's one pass over them also writes (softmax - onehot) / n_valid, and
    the backward returns it (times dloss unless that is 1)."""
    _check_cross_entropy(logits, targets, ignore_index)
    return _apply(_CrossEntropy, logits, targets, ignore_index)


def adamw_step(params, grads, ms, vs, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
               step: int) -> None:
    """One AdamW step in place on lists of fp32 contiguous tensors (torch.optim.AdamW semantics, decoupled
    decay; step is 1-based for the bias correction)."""
    if not (len(params) == len(grads) == len(ms) == len(vs)):
        raise ValueError("adamw_step: params, grads, ms, vs must have the same length")
    step = check_int(step, "adamw_step step", 1)
    _check_adamw(lr, beta1, beta2, eps, weight_decay, "adamw_step")
    for i, (p, g, m, v) in enumerate(zip(params, grads, ms, vs)):  # all checked before any is updated
        check(p, f"adamw_step params[{i}]")
        for t, name in ((g, "grads"), (m, "ms"), (v, "vs")):
            check(t, f"adamw_step {name}[{i}]", shape=tuple(p.shape))
            if _overlap(p, t):
                raise ValueError(f"adamw_step {name}[{i}]: shares memory with params[{i}]")
    # every tensor its own bytes (p, m, v are written, g read): ms[i] = vs[i] (or a parameter listed twice) gave
    # wrong updates without an error. Sorted by address, an overlap shows between neighbours: O(n log n).
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * 4, f"{name}[{i}]")
                   for name, ts in (("params", params), ("grads", grads), ("ms", ms), ("vs", vs))
                   for i, t in enumerate(ts) if t.numel())
    for (s0, e0, n0), (s1, e1, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise ValueError(f"adamw_step {n1}: shares memory with {n0}")
    # the kernel's step is an int32 (2^31 was pybind11's 4-line type error): beyond it the fp32 bias corrections
    # 1 - beta^step are exactly 1 for every beta < 1, so the clamp changes nothing
    step = min(step, 2 ** 31 - 1)
    for p, g, m, v in zip(params, grads, ms, vs):
        if p.numel():
            C().adamw_step(ptr(p), ptr(g), ptr(m), ptr(v), p.numel(), float(lr), float(beta1), float(beta2),
                           float(eps), float(weight_decay), step)
    _written(*params, *ms, *vs)


def _check_adamw(lr, beta1, beta2, eps, weight_decay, where):
    check_float(lr, f"{where} lr", 0.0)
    check_float(beta1, f"{where} beta1", 0.0, 1.0)
    check_float(beta2, f"{where} beta2", 0.0, 1.0)
    for b, name in ((beta1, "beta1"), (beta2, "beta2")):
        if b >= 1:  # 1 - beta^t = 0: a division by zero in the bias correction
            raise ValueError(f"{where} {name}: must be in [0, 1), got {b:g}")
    check_float(eps, f"{where} eps", 0.0)
    check_float(weight_decay, f"{where} weight_decay", 0.0)


class AdamW(torch.optim.Optimizer):
    """torch.optim.AdamW (decoupled weight decay, no amsgrad) running pyllm's fused kernel on CPU fp32 params."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"AdamW betas: expected a pair (beta1, beta2), got {betas!r}")
        _check_adamw(lr, betas[0], betas[1], eps, weight_decay, "AdamW")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            ps, gs, ms, vs = [], [], [], []
            for j, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.layout != torch.strided:  # was torch's "unsupported memory format option Contiguous"
                    raise ValueError(f"AdamW: parameter {j} of group {self.param_groups.index(group)} has a "
                                     f"{'sparse' if p.grad.is_sparse else p.grad.layout} gradient (only dense "
                                     f"gradients are supported)")
                st = self.state[p]
                if not st:
                    st["step"] = torch.tensor(0.0)  # a tensor like torch's, so state_dicts interchange
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                ps.append(p)
                gs.append(p.grad.contiguous())
                ms.append(st["exp_avg"])
                vs.append(st["exp_avg_sq"])
            steps = {int(self.state[p]["step"]) + 1 for p in ps}  # counted once the step has run (a failing one
            for s in steps:                                           # left its parameters at the next step)
                idx = [i for i, p in enumerate(ps) if int(self.state[p]["step"]) + 1 == s]
                adamw_step([ps[i] for i in idx], [gs[i] for i in idx], [ms[i] for i in idx], [vs[i] for i in idx],
                           group["lr"], group["betas"][0], group["betas"][1], group["eps"], group["weight_decay"], s)
                for i in idx:
                    self.state[ps[i]]["step"] += 1
        return loss
# --- attention (csrc/cpu/impl_attention.h) ------------------------------------------------------------------
class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, doc_ids):
        B, T, H, Hkv, D = _check_attention(q, k, v, doc_ids)
        out = empty(*q.shape)
        lse = torch.empty(B, H, T, dtype=torch.float32)
        C().attention_forward(ptr(out), ptr(lse), ptr(q), ptr(k), ptr(v), ptr(doc_ids), B, T, H, Hkv, D)
        ctx.save_for_backward(q, k, v, out, lse, doc_ids)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, doc_ids = ctx.saved_tensors
        B, T, H, D = q.shape
        Hkv = k.shape[2]
        dout = dout.contiguous()
        dq, dk, dv = empty(*q.shape), empty(*k.shape), empty(*v.shape)
        C().attention_backward(ptr(dq), ptr(dk), ptr(dv), ptr(dout), ptr(out), ptr(lse), ptr(q), ptr(k), ptr(v),
                               ptr(doc_ids), B, T, H, Hkv, D)
        return dq, dk, dv, None


def attention_with_lse(q, k, v, doc_ids=None):
    """Like attention() but also returns lse (B, H, T): log-sum-exp of each query row's scaled scores. lse carries no
    gradient (it is marked non-differentiable: lse.requires_grad is False), so a loss must not be built on it."""
    return _apply(_Attention, q, k, v, doc_ids)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention, scale 1/sqrt(D). q (B, T, H, D), k/v (B, T, Hkv, D) fp32 contiguous, H % Hkv == 0;
    doc_ids (B, T) int32 or None: token i attends to j only if j <= i and both are in the same document.
    -> (B, T, H, D). Differentiable in q, k, v (flash-attention backward; T x T is never stored)."""
    return _apply(_Attention, q, k, v, doc_ids)[0]


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, n_ctx) -> torch.Tensor:
    """One query per sequence over cache positions [0, n_ctx). q (B, H, D); k_cache/v_cache (B, T_max, Hkv, D)
    fp32 whose last two dims are contiguous (a slice of a bigger cache is fine) -> (B, H, D). No autograd.
    n_ctx: an int, or a 1-element int64 tensor on q's device (read by the kernel: CUDA-graph friendly)."""
    B, H, Hkv, D, n_ctx = _check_decode_attention(q, k_cache, v_cache, n_ctx)
    _no_autograd("decode_attention", q, k_cache, v_cache)
    out = torch.empty_like(q)
    C().decode_attention(ptr(out), ptr(q), ptr(k_cache), ptr(v_cache), k_cache.stride(0), k_cache.stride(1), B, H, Hkv, D, n_ctx)
    return out


# --- one transformer block as one autograd Function (the training path) -----------------------------------
class _Block(torch.autograd.Function):
    """x + attn(rmsnorm(x)) then + mlp(rmsnorm(.)) with a hand-written backward, as llm.c does: one autograd node
    per layer instead of ~16 (the per-op path's Python/autograd glue was ~14 ms of a 70 ms Tiny Shakespeare step),
    q|k|v and gate|up as one GEMM each over the concatenated weights (the model's parameters are unchanged; the
    concatenation is a ~0.2 MB copy per call), the residual adds folded into the GEMM (accumulate) and RMSNorm's
    backward (dres), and no gradient sums: dX of q, k, v is one GEMM with K = (H + 2 Hkv) D. The attention kernels
    read q, k, v in place in that GEMM's output and rotate q, k (RoPE) as they read them, and write the pre-RoPE
    dq, dk, dv into the dX GEMM's input: no rope pass, no q/k/v copies (~1% of the issue-3 step, session 27)."""

    @staticmethod
    def forward(ctx, x, w_in, wq, wk, wv, wo, w_post, wg, wu, wd, cos, sin, doc_ids, H, Hkv, eps):
        B, T, Cm = x.shape
        M, HD, F = B * T, wq.shape[0], wg.shape[0]
        D = HD // H
        KD = Hkv * D
        N3 = HD + 2 * KD
        k_ = C()
        ctx.bf16 = _autocast_bf16()
        mm = functools.partial(_gemm, bf16=ctx.bf16)                        # bf16 GEMM operands under autocast
        cv = _bf16_operand if ctx.bf16 else _as_is
        x2d = x.reshape(M, Cm)                                              # (M, C)
        h1, r1 = empty(M, Cm), torch.empty(M)
        k_.rmsnorm_forward(ptr(h1), ptr(r1), ptr(x2d), ptr(w_in), M, Cm, float(eps))
        # Under autocast each GEMM operand is rounded to bf16 once: the copies that the backward's GEMMs read too
        # are saved in place of their fp32 originals (h1, h2, s and the weights are read by GEMMs only)
        h1, wqkv = cv(h1), cv(torch.cat((wq, wk, wv)))                      # (M, C), (N3, C)
        qkv = mm(h1, wqkv, M, N3, Cm)                                       # (M, N3) = [q | k | v] per row
        # attention reads q, k, v in place in qkv and rotates q, k (RoPE) as it reads them: no rope pass or copy
        y, lse = empty(B, T, H, D), torch.empty(B, H, T)
        q0 = qkv.data_ptr()
        k_.attention_forward(ptr(y), ptr(lse), q0, q0 + 4 * HD, q0 + 4 * (HD + KD), ptr(doc_ids), B, T, H, Hkv, D,
                             N3, N3, ptr(cos), ptr(sin))
        y2d = cv(y.view(M, HD))                                             # y itself stays: attention's bwd
        wo = cv(wo)
        x2 = empty(M, Cm).copy_(x2d)                                        # x + y Woᵀ
        mm(y2d, wo, M, Cm, HD, out=x2, accumulate=True)
        h2, r2 = empty(M, Cm), torch.empty(M)
        k_.rmsnorm_forward(ptr(h2), ptr(r2), ptr(x2), ptr(w_post), M, Cm, float(eps))
        h2, wgu = cv(h2), cv(torch.cat((wg, wu)))                           # (M, C), (2F, C)
        gu = mm(h2, wgu, M, 2 * F, Cm, out=padded_rows(M, 2 * F))          # (M, 2F) = [gate | up] per row
        s = empty(M, F)
        k_.swiglu_forward(ptr(s), ptr(gu), gu.data_ptr() + 4 * F, M * F, F, gu.stride(0))
        s, wd = cv(s), cv(wd)
        out = empty(M, Cm).copy_(x2)                                        # x2 + s Wdᵀ
        mm(s, wd, M, Cm, F, out=out, accumulate=True)
        ctx.save_for_backward(x2d, h1, r1, qkv, y, y2d, lse, x2, h2, r2, gu, s, w_in, wqkv, wo, w_post, wgu,
                              wd, cos, sin, doc_ids)
        ctx.dims = (B, T, Cm, H, Hkv, D, F)
        return out.view(B, T, Cm)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        (x2d, h1, r1, qkv, y, y2d, lse, x2, h2, r2, gu, s, w_in, wqkv, wo, w_post, wgu, wd, cos, sin,
         doc_ids) = ctx.saved_tensors
        B, T, Cm, H, Hkv, D, F = ctx.dims
        M, HD, KD = B * T, H * D, Hkv * D
        N3 = HD + 2 * KD
        if dout.dtype != torch.float32 or dout.device.type != "cpu":
            raise TypeError(f"block backward: expected a float32 cpu gradient, got {dout.dtype} on {dout.device}")
        k_ = C()
        mm = functools.partial(_gemm, bf16=ctx.bf16)
        cv = _bf16_operand if ctx.bf16 else _as_is          # each gradient that two GEMMs read: rounded once
        d = dout.reshape(M, Cm).contiguous()                                # (M, C)
        need = ctx.needs_input_grad
        # MLP: out = x2 + swiglu(h2 Wgᵀ, h2 Wuᵀ) Wdᵀ
        dc = cv(d)
        dwd = mm(dc, s, Cm, F, M, trans_a=True, trans_b=True) if need[9] else None       # (C, F)
        ds = mm(dc, wd, M, F, Cm, trans_b=True)                            # (M, F)
        dgu = padded_rows(M, 2 * F)        # [dgate | dup] per row, at gu's row stride (swiglu's one ld)
        k_.swiglu_backward(ptr(dgu), dgu.data_ptr() + 4 * F, ptr(ds), ptr(gu), gu.data_ptr() + 4 * F, M * F, F,
                           gu.stride(0))
        dgu = cv(dgu)
        dwgu = mm(dgu, h2, 2 * F, Cm, M, trans_a=True, trans_b=True) if (need[7] or need[8]) else None
        dh2 = mm(dgu, wgu, M, Cm, 2 * F, trans_b=True)                      # (M, C), one GEMM for gate and up
        dx2, dw_post = empty(M, Cm), torch.zeros(Cm)
        k_.rmsnorm_backward(ptr(dx2), ptr(dw_post), ptr(dh2), ptr(x2), ptr(w_post), ptr(r2), M, Cm, ptr(d))
        # attention: x2 = x + attn(rmsnorm(x)) Woᵀ
        dx2c = cv(dx2)
        dwo = mm(dx2c, y2d, Cm, HD, M, trans_a=True, trans_b=True) if need[5] else None    # (C, HD)
        dy = mm(dx2c, wo, M, HD, Cm, trans_b=True)                         # (M, HD)
        dqkv = empty(M, N3)                                                 # [dq | dk | dv] per row, pre-RoPE
        q0, d0 = qkv.data_ptr(), dqkv.data_ptr()
        k_.attention_backward(d0, d0 + 4 * HD, d0 + 4 * (HD + KD), ptr(dy), ptr(y), ptr(lse), q0, q0 + 4 * HD,
                              q0 + 4 * (HD + KD), ptr(doc_ids), B, T, H, Hkv, D, N3, N3, ptr(cos), ptr(sin), N3, N3)
        dqkv = cv(dqkv)
        dwqkv = (mm(dqkv, h1, N3, Cm, M, trans_a=True, trans_b=True)        # (N3, C)
                 if (need[2] or need[3] or need[4]) else None)
        dh1 = mm(dqkv, wqkv, M, Cm, N3, trans_b=True)                       # (M, C), one GEMM for q, k and v
        dx, dw_in = empty(M, Cm), torch.zeros(Cm)
        k_.rmsnorm_backward(ptr(dx), ptr(dw_in), ptr(dh1), ptr(x2d), ptr(w_in), ptr(r1), M, Cm, ptr(dx2))
        dq_w = dk_w = dv_w = dg_w = du_w = None
        if dwqkv is not None:
            dq_w, dk_w, dv_w = dwqkv[:HD], dwqkv[HD:HD + KD], dwqkv[HD + KD:]
        if dwgu is not None:
            dg_w, du_w = dwgu[:F], dwgu[F:]
        return (dx.view(B, T, Cm), dw_in, dq_w, dk_w, dv_w, dwo, dw_post, dg_w, du_w, dwd,
                None, None, None, None, None, None)


def block(x, w_in, wq, wk, wv, wo, w_post, wg, wu, wd, cos, sin, doc_ids=None, n_heads: int = 1,
          n_kv_heads: int = 1, eps: float = 1e-5) -> torch.Tensor:
    """One pre-norm decoder layer in one autograd node: h = x + attention(rope(q), rope(k), v) Woᵀ with
    q|k|v = rmsnorm(x, w_in) W{q,k,v}ᵀ, then out = h + swiglu(g, u) Wdᵀ with g|u = rmsnorm(h, w_post) W{g,u}ᵀ.
    x (B, T, C); wq (H*D, C), wk/wv (Hkv*D, C), wo (C, H*D), wg/wu (F, C), wd (C, F); cos/sin (T, D/2);
    doc_ids (B, T) int32 or None -> (B, T, C). Same values and gradients as the per-op composition (model.Block)."""
    check(x, "block x")
    check_float(eps, "block eps", lo=0)
    if x.dim() != 3 or x.numel() == 0:
        raise ValueError(f"block x: expected a non-empty (B, T, C) tensor, got {tuple(x.shape)}")
    B, T, Cm = x.shape
    H, Hkv = check_int(n_heads, "block n_heads", 1), check_int(n_kv_heads, "block n_kv_heads", 1)
    check(wq, "block wq")  # before its shape is read (None was an AttributeError)
    check(wg, "block wg")
    if wq.dim() != 2 or wg.dim() != 2 or H % Hkv or wq.shape[0] % H:
        raise ValueError(f"block: bad heads H={H}, Hkv={Hkv} for wq of shape {tuple(wq.shape)}")
    D = wq.shape[0] // H
    if D % 2 or D > 256 or D == 0:
        raise ValueError(f"block: head dim {D} must be even, > 0 and <= 256")
    F = wg.shape[0]
    if F == 0:  # (and D = 0 above) was the binding's "null pointer for out"
        raise ValueError(f"block wg: expected (F, C) with F >= 1, got {tuple(wg.shape)}")
    for t, name, shp in ((w_in, "w_in", (Cm,)), (wq, "wq", (H * D, Cm)), (wk, "wk", (Hkv * D, Cm)),
                         (wv, "wv", (Hkv * D, Cm)), (wo, "wo", (Cm, H * D)), (w_post, "w_post", (Cm,)),
                         (wg, "wg", (F, Cm)), (wu, "wu", (F, Cm)), (wd, "wd", (Cm, F)),
                         (cos, "cos", (T, D // 2)), (sin, "sin", (T, D // 2))):
        check(t, f"block {name}", shape=shp)
    _check_fixed_tables(cos, sin, "block")
    if doc_ids is not None:
        check(doc_ids, "block doc_ids", dtype=torch.int32, shape=(B, T))
    return _apply(_Block, x, w_in, wq, wk, wv, wo, w_post, wg, wu, wd, cos, sin, doc_ids, H, Hkv, eps)


# --- one decoder layer of a decode step (generate on CPU) ---------------------------------------------------
def _check_cache_pair(k_cache, v_cache, B, Hkv, D, where):
    """The layer's KV cache as decode_block writes it: (B, T_max, Hkv, D) fp32 on the CPU, (Hkv, D) contiguous,
    k and v alike, and no two (b, t) rows in the same memory (an expand()ed cache would take every row's write)."""
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.device.type != "cpu":
            raise TypeError(f"{where} {name}: expected a float32 cpu tensor")
    t = k_cache                                         # v_cache: the same shape and strides, checked below
    if t.dim() != 4 or t.shape[0] != B or t.shape[2] != Hkv or t.shape[3] != D:
        raise ValueError(f"{where} k_cache: expected shape ({B}, T_max, {Hkv}, {D}), got {tuple(t.shape)}")
    st = t.stride()
    if st[3] != 1 or st[2] != D:
        raise ValueError(f"{where} k_cache: its last two dims (Hkv, D) must be contiguous")
    span = Hkv * D                                      # what the rows so far cover, in elements
    for stride, n in sorted(((st[0], t.shape[0]), (st[1], t.shape[1]))):
        if n > 1:
            if stride < span:
                raise ValueError(f"{where} k_cache: its (batch, position) rows overlap (an expand()ed cache?): "
                                 "each sequence needs its own cache rows")
            span = stride * n
    if k_cache.shape != v_cache.shape or st != v_cache.stride():
        raise ValueError(f"{where} v_cache: must have the same shape and strides as k_cache")
    if _caches_meet(k_cache, v_cache):  # v is written, then k over it: every layer's attention read wrong values
        raise ValueError(f"{where} v_cache: shares memory with k_cache (each needs its own rows)")


def _caches_meet(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Do two KV caches (B, T_max, Hkv, D) share an element? Rows (Hkv, D) contiguous and not overlapping one another
    (_check_cache_pair). With equal strides, exactly: is b's start, from a's, within a row of some whole-row step
    sum i0*s0 + i1*s1 (|i| < n); the largest stride first, the rest reach less than it. Not a byte-range test:
    interleaved caches (buf[:, :, 0], buf[:, :, 1] of one (B, T, 2, Hkv, D) buffer) are a valid layout. Other
    strides: any common byte range counts."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    def ext(t):  # bytes from the first element to past the last
        return 4 * (1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride())))
    a0, b0 = a.data_ptr(), b.data_ptr()
    if a0 >= b0 + ext(b) or b0 >= a0 + ext(a):
        return False
    if a.shape != b.shape or a.stride() != b.stride():
        return True
    width = 4 * a.shape[2] * a.shape[3]
    steps = sorted((4 * st, n) for st, n in zip(a.stride()[:2], a.shape[:2]) if n > 1)

    def meet(delta, steps):
        if not steps:
            return -width < delta < width
        st, n = steps[-1]
        i0 = delta // st
        return any(-n < i < n and meet(delta - i * st, steps[:-1]) for i in (i0 - 1, i0, i0 + 1))
    return meet(b0 - a0, steps)


def _decode_block_check(x, w_in, wq, wk, wv, wo, w_post, wg, wu, wd, cos, sin, k_cache, v_cache, n_heads, n_kv_heads,
                        eps, where="decode_block"):
    """decode_block's input checks (all but pos) -> (B, C, H, Hkv, D, F, T_max)."""
    check(x, f"{where} x")
    check_float(eps, f"{where} eps", lo=0)
    if x.dim() != 3 or x.shape[1] != 1 or x.numel() == 0:
        raise ValueError(f"{where} x: expected a non-empty (B, 1, C) tensor, got {tuple(x.shape)}")
    B, _, Cm = x.shape
    H, Hkv = check_int(n_heads, f"{where} n_heads", 1), check_int(n_kv_heads, f"{where} n_kv_heads", 1)
    check(wq, f"{where} wq")
    check(wg, f"{where} wg")
    if wq.dim() != 2 or wg.dim() != 2 or H % Hkv or wq.shape[0] % H:
        raise ValueError(f"{where}: bad heads H={H}, Hkv={Hkv} for wq of shape {tuple(wq.shape)}")
    D, F = wq.shape[0] // H, wg.shape[0]
    if D % 2 or D > 256 or D == 0:
        raise ValueError(f"{where}: head dim {D} must be even, > 0 and <= 256")
    if F == 0:  # (and D = 0 above) was the binding's "null pointer for c"
        raise ValueError(f"{where} wg: expected (F, C) with F >= 1, got {tuple(wg.shape)}")
    HD, KD = H * D, Hkv * D
    weights = (x, w_in, wq, wk, wv, wo, w_post, wg, wu, wd)
    for t, name, shp in ((w_in, "w_in", (Cm,)), (wk, "wk", (KD, Cm)), (wv, "wv", (KD, Cm)), (wo, "wo", (Cm, HD)),
                         (w_post, "w_post", (Cm,)), (wu, "wu", (F, Cm)), (wd, "wd", (Cm, F)),
                         (wq, "wq", (HD, Cm)), (wg, "wg", (F, Cm)), (cos, "cos", (1, D // 2)), (sin, "sin", (1, D // 2))):
        check(t, f"{where} {name}", shape=shp)
    if torch.is_grad_enabled() and any(t.requires_grad for t in weights):
        raise ValueError(f"{where}: it records no gradient; call it under torch.no_grad() (or use block())")
    _check_cache_pair(k_cache, v_cache, B, Hkv, D, where)
    return B, Cm, H, Hkv, D, F, k_cache.shape[1]


def _decode_pos(pos, T_max, where):
    """A decode position: an int or a 1-element int64 cpu tensor, in [0, T_max) -> int."""
    if isinstance(pos, torch.Tensor):
        if pos.dtype != torch.int64 or pos.numel() != 1 or pos.device.type != "cpu":
            raise TypeError(f"{where} pos: expected an int or a 1-element int64 cpu tensor, got {pos.dtype} "
                            f"{tuple(pos.shape)} on {pos.device}")
        pos = int(pos)
    return check_int(pos, f"{where} pos", 0, T_max - 1)


def _decode_buffers(B, Cm, H, Hkv, D, F):
    """Scratch of one decode layer: h (B, C), r (B), [q | k] (B, H*D + Hkv*D), q and y (B, H, D), [gate | up]
    (B, 2F), s (B, F)."""
    return (torch.empty(B, Cm), torch.empty(B), torch.empty(B, (H + Hkv) * D), torch.empty(B, H, D),
            torch.empty(B, H, D), torch.empty(B, 2 * F), torch.empty(B, F))


def _decode_block_kernels(x, w, cosp, sinp, k_cache, v_cache, pos, dims, bufs, eps):
    """The kernel calls of one decode layer on checked inputs. x (B, C) is the residual stream, updated in place:
    x + attn(rmsnorm(x)), then + mlp(rmsnorm(.)). w = (w_in, wq, wk, wv, wo, w_post, wg, wu, wd); cosp/sinp the
    addresses of the (D/2) rotary rows at pos; dims from _decode_block_check; bufs from _decode_buffers."""
    w_in, wq, wk, wv, wo, w_post, wg, wu, wd = w
    B, Cm, H, Hkv, D, F, _ = dims
    h, r, qk, q, y, gu, s = bufs
    k_, M, ldb, ldt = C(), B, k_cache.stride(0), k_cache.stride(1)
    HD, KD = H * D, Hkv * D
    ldw = ldb if B > 1 else KD    # the row stride of the cache writes (one row: any; a size-1 dim's stride may be 0)
    kp, vp = k_cache.data_ptr() + 4 * pos * ldt, v_cache.data_ptr() + 4 * pos * ldt   # (B, Hkv, D) rows ldb apart
    xp, hp, rp, qkp, sp, gup = ptr(x), ptr(h), ptr(r), ptr(qk), ptr(s), ptr(gu)
    k_.rmsnorm_forward(hp, rp, xp, ptr(w_in), M, Cm, float(eps))
    k_.matmul_forward(qkp, hp, ptr(wq), 0, M, HD, Cm, Cm, Cm, HD + KD, False, False, False)
    k_.matmul_forward(qkp + 4 * HD, hp, ptr(wk), 0, M, KD, Cm, Cm, Cm, HD + KD, False, False, False)
    k_.matmul_forward(vp, hp, ptr(wv), 0, M, KD, Cm, Cm, Cm, ldw, False, False, False)   # v into the cache
    k_.rope_forward(ptr(q), qkp, cosp, sinp, M, 1, H, D, 0, HD + KD, 0)
    k_.rope_forward(kp, qkp + 4 * HD, cosp, sinp, M, 1, Hkv, D, 0, HD + KD, ldw)        # k into it
    k_.decode_attention(ptr(y), ptr(q), ptr(k_cache), ptr(v_cache), ldb, ldt, B, H, Hkv, D, pos + 1)
    k_.matmul_forward(xp, ptr(y), ptr(wo), 0, M, Cm, HD, HD, HD, Cm, False, False, True)     # x += y Woᵀ
    k_.rmsnorm_forward(hp, rp, xp, ptr(w_post), M, Cm, float(eps))
    k_.matmul_forward(gup, hp, ptr(wg), 0, M, F, Cm, Cm, Cm, 2 * F, False, False, False)
    k_.matmul_forward(gup + 4 * F, hp, ptr(wu), 0, M, F, Cm, Cm, Cm, 2 * F, False, False, False)
    k_.swiglu_forward(sp, gup, gup + 4 * F, M * F, F, 2 * F)
    k_.matmul_forward(xp, sp, ptr(wd), 0, M, Cm, F, F, F, Cm, False, False, True)           # x += s Wdᵀ


def decode_block(x, w_in, wq, wk, wv, wo, w_post, wg, wu, wd, cos, sin, k_cache, v_cache, pos, n_heads: int = 1,
                 n_kv_heads: int = 1, eps: float = 1e-5) -> torch.Tensor:
    """One pre-norm decoder layer for one new token per sequence, with a KV cache: what model.Block computes in a
    decode step (rmsnorm, q/k/v, RoPE, k and v written at position pos of the cache, decode attention over
    [0, pos], o, rmsnorm, SwiGLU MLP), as direct kernel calls. x (B, 1, C); weights as in block(); cos/sin (1, D/2)
    at pos; k_cache/v_cache (B, T_max, Hkv, D); pos an int or a 1-element int64 tensor -> (B, 1, C).
    No autograd (generate decodes under no_grad): the ~17 op calls of the per-op path cost ~200 us of Python a layer,
    ~1.2 ms of a 6-layer model's token; the k/v projections go straight into the cache and the residual adds into
    the o and down GEMMs (accumulate), so values match the per-op path to rounding (fp32 tolerance).
    DecodeStack runs the same kernels over all of a model's layers with the checks done once per generate."""
    dims = _decode_block_check(x, w_in, wq, wk, wv, wo, w_post, wg, wu, wd, cos, sin, k_cache, v_cache, n_heads,
                               n_kv_heads, eps)
    pos = _decode_pos(pos, dims[6], "decode_block")
    B, Cm = dims[0], dims[1]
    out = x.reshape(B, Cm).clone()                                                # x + y Woᵀ, then + s Wdᵀ
    _decode_block_kernels(out, (w_in, wq, wk, wv, wo, w_post, wg, wu, wd), ptr(cos), ptr(sin), k_cache, v_cache,
                          pos, dims, _decode_buffers(*dims[:6]), eps)
    return out.view(B, 1, Cm)


class DecodeStack:
    """decode_block over all layers of a model for one generate call: every layer's weights, its KV cache and the
    rotary tables are checked once, here, and the scratch allocated once; a step then makes only the kernel calls
    (13 a layer). GPT.generate per token, 1 thread (session 25): 6 layers of dim 16 0.52 -> 0.19 ms, the 15M
    shape 4.55 -> 4.03 ms, an RL rollout of the demo's model (B 512) 20.7 -> 19.8 ms: decode_block's checks, nn.Module
    dispatch and fresh scratch per layer, gone. The weights are read here, once: a parametrised weight (LoRA) is
    merged once per generate, not per token.
    layers: per layer (w_in, wq, wk, wv, wo, w_post, wg, wu, wd); k_caches/v_caches: per layer (B, T_max, Hkv, D);
    rope_cos/rope_sin (T_rope, D/2) fp32 contiguous; B the batch."""

    def __init__(self, layers, k_caches, v_caches, rope_cos, rope_sin, B: int, n_heads: int, n_kv_heads: int,
                 eps: float = 1e-5):
        if not (len(layers) == len(k_caches) == len(v_caches)) or not layers:
            raise ValueError("DecodeStack: layers, k_caches and v_caches must be non-empty lists of one length")
        check(rope_cos, "DecodeStack rope_cos")
        check(rope_sin, "DecodeStack rope_sin", shape=tuple(rope_cos.shape))
        if rope_cos.dim() != 2:
            raise ValueError(f"DecodeStack rope_cos: expected (T, D/2), got {tuple(rope_cos.shape)}")
        B = check_int(B, "DecodeStack B", 1)
        for i, w in enumerate(layers):
            if len(w) != 9:
                raise ValueError(f"DecodeStack layer {i}: expected 9 weights, got {len(w)}")
        w_in0 = check(layers[0][0], "DecodeStack layer 0 w_in")
        if w_in0.dim() != 1 or w_in0.numel() == 0:
            raise ValueError(f"DecodeStack layer 0 w_in: expected a non-empty (C) tensor, got {tuple(w_in0.shape)}")
        x0 = torch.empty(B, 1, w_in0.shape[0])
        self.layers, self.dims = [], None
        for i, (w, kc, vc) in enumerate(zip(layers, k_caches, v_caches)):
            dims = _decode_block_check(x0, *w, rope_cos[:1], rope_sin[:1], kc, vc, n_heads, n_kv_heads, eps,
                                       where=f"DecodeStack layer {i}")
            if self.dims is not None and dims != self.dims:
                raise ValueError(f"DecodeStack layer {i}: shapes {dims} differ from layer 0's {self.dims}")
            self.dims = dims
            for j, (_, kj, vj) in enumerate(self.layers):  # two layers' caches in the same memory: each step's
                for a, an in ((kc, "k_cache"), (vc, "v_cache")):  # writes of one overwrote the other's
                    for c, cn in ((kj, "k_cache"), (vj, "v_cache")):
                        if _caches_meet(a, c):
                            raise ValueError(f"DecodeStack layer {i} {an}: shares memory with layer {j}'s {cn}")
            self.layers.append((tuple(w), kc, vc))
        self.cos, self.sin, self.eps = rope_cos, rope_sin, float(eps)
        self.T = min(self.dims[6], rope_cos.shape[0])
        self.bufs = _decode_buffers(*self.dims[:6])

    def __call__(self, x: torch.Tensor, pos) -> torch.Tensor:
        """x (B, 1, C) fp32 contiguous, the new tokens' embeddings at position pos (int or 1-element int64 cpu
        tensor): updated in place to the last layer's output, and returned."""
        B, Cm, D = self.dims[0], self.dims[1], self.dims[4]
        check(x, "DecodeStack x", shape=(B, 1, Cm))
        if x.requires_grad:
            raise ValueError("DecodeStack x: it records no gradient; call it under torch.no_grad()")
        pos = _decode_pos(pos, self.T, "DecodeStack")
        cosp = self.cos.data_ptr() + 4 * pos * (D // 2)
        sinp = self.sin.data_ptr() + 4 * pos * (D // 2)
        xm = x.view(B, Cm)
        for w, kc, vc in self.layers:
            _decode_block_kernels(xm, w, cosp, sinp, kc, vc, pos, self.dims, self.bufs, self.eps)
        return x


# === CUDA section (cuda helper). Keep it LAST in this file: it wraps the op functions defined above so that
# CUDA tensors go to pyllm/ops_cuda.py and everything else to the unchanged CPU code (or to ref.<op> where no CPU
# kernel exists yet). tests/test_cuda.py checks that every name in CUDA_OPS is wrapped. ===
def _cuda_dispatch(name: str):
    cpu_fn = globals().get(name)

    def fn(*args, **kwargs):
        first = args[0] if args else next(iter(kwargs.values()), None)  # none given: the CPU function's TypeError
        if isinstance(first, torch.Tensor) and first.is_cuda:
            from . import ops_cuda
            ops_cuda.require_built(name)
            with ops_cuda.on_device(first):  # the kernels launch on the current device: cuda:1 tensors were
                return getattr(ops_cuda, name)(*args, **kwargs)  # read from GPU 0
        if cpu_fn is not None:
            return cpu_fn(*args, **kwargs)
        from . import ref
        return getattr(ref, name)(*args, **kwargs)

    if cpu_fn is not None:  # help() and inspect.signature show the op's own arguments, not (*args, **kwargs)
        functools.update_wrapper(fn, cpu_fn)
    fn.__name__ = name
    fn.__doc__ = (cpu_fn.__doc__ if cpu_fn is not None else f"ref.{name} on CPU") + " (CUDA: pyllm.ops_cuda)"
    fn._pyllm_cuda_dispatch = True
    fn._pyllm_cpu_fn = cpu_fn
    return fn


def _cuda_ops() -> tuple:
    from . import ops_cuda
    return ops_cuda.NAMES if ops_cuda.available() else ()


CUDA_OPS = _cuda_ops()  # ops with CUDA kernels in this build (empty when built without CUDA)
for _name in ("rmsnorm", "linear", "attention", "attention_with_lse", "rope", "swiglu", "cross_entropy", "sample",
              "decode_attention"):
    globals()[_name] = _cuda_dispatch(_name)
del _name
