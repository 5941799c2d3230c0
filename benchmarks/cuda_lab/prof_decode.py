# benchmarks/cuda_lab/prof_decode.py — where a CUDA decode step and the CUDA sampler spend time (cProfile + torch.profiler)
# run on a GPU machine from the repo root: PYTHONPATH=$PWD python3 benchmarks/cuda_lab/prof_decode.py
import cProfile, pstats, io, time, torch
from pyllm.config import preset
from pyllm.model import GPT
cfg = preset("110M", vocab_size=50304, max_seq_len=1024)
m = GPT(cfg, backend="pyllm").cuda().eval()
idx = torch.randint(0, cfg.vocab_size, (1, 16), device="cuda")
with torch.no_grad():
    m.generate(idx, 8, temperature=0)
    torch.cuda.synchronize()
    t = time.perf_counter(); m.generate(idx, 64, temperature=0); torch.cuda.synchronize()
    print(f"decode 64 tokens: {64 / (time.perf_counter() - t):.0f} tok/s")
    pr = cProfile.Profile(); pr.enable(); m.generate(idx, 32, temperature=0); torch.cuda.synchronize(); pr.disable()
    s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(22); print(s.getvalue()[:6000])
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        m.generate(idx, 16, temperature=0); torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
    from pyllm import ops
    for B in (1, 256):
        x = torch.randn(B, 50257, device="cuda") * 3
        for i in range(3): ops.sample(x, temperature=1.0, top_p=0.9, seed=1, step=i)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for i in range(50): ops.sample(x, temperature=1.0, top_p=0.9, seed=1, step=i)
        t1 = time.perf_counter(); torch.cuda.synchronize(); t2 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for i in range(10): ops.sample(x, temperature=1.0, top_p=0.9, seed=1, step=i)
            torch.cuda.synchronize()
        k = [e for e in prof.key_averages() if "sample" in e.key]
        print(f"sample B{B}: host {1e6 * (t1 - t) / 50:.1f} us/call, wall {1e6 * (t2 - t) / 50:.1f} us/call, kernel",
              [(e.key[:40], round(e.device_time_total / e.count, 1)) for e in k])
