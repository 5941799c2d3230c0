"""benchmarks/cuda_lab/sdpa.py — the baseline for attn_harness.cu: torch SDPA, FLASH_ATTENTION backend, causal, bf16,
the issue's shapes.
Layout as pyllm's: (B, T, H, D) tensors viewed as (B, H, T, D). Prints cudaEvent medians of 20 after warm-up."""
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
import torch.nn.functional as F


def median_ms(fn, reps=20):
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); b.synchronize()
        ts.append(a.elapsed_time(b))
    return sorted(ts)[reps // 2]


for B, T, H, D in ((8, 1024, 12, 64), (4, 2048, 16, 128)):
    q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    g = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
    ff = 4.0 * B * H * T * T * D / 2
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        f = lambda: F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        with torch.no_grad():
            tf = median_ms(f)
        def fb():
            o = f()
            o.transpose(1, 2).backward(g)
        tfb = median_ms(fb)
    print(f"SDPA flash B{B} T{T} H{H} D{D}: fwd {tf:.3f} ms {ff / tf / 1e9:.0f} TFLOP/s | fwd+bwd {tfb:.3f} ms "
          f"{3.5 * ff / tfb / 1e9:.0f} TFLOP/s | bwd (diff) {tfb - tf:.3f} ms")
