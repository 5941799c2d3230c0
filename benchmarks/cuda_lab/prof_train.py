# benchmarks/cuda_lab/prof_train.py — kernel profile of one CUDA training step, 110M shape, bf16 autocast, pyllm vs torch
# run on a GPU machine from the repo root: PYTHONPATH=$PWD python3 benchmarks/cuda_lab/prof_train.py [B]
import sys, time, torch
from torch.profiler import profile, ProfilerActivity
from pyllm.config import preset
from pyllm.model import GPT
B = int(sys.argv[1]) if len(sys.argv) > 1 else 4
cfg = preset("110M", vocab_size=50304, max_seq_len=1024)
for backend in ("pyllm", "torch"):
    torch.manual_seed(0)
    m = GPT(cfg, backend=backend).cuda()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True)
    idx = torch.randint(0, cfg.vocab_size, (B, 1024), device="cuda")
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = m(idx, idx)
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    for _ in range(3): step()
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(5): step()
    torch.cuda.synchronize(); dt = (time.perf_counter() - t) / 5
    print(f"{backend}: {dt * 1e3:.1f} ms/step, {B * 1024 / dt:.0f} tok/s")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step(); torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=14, max_name_column_width=50))
    del m, opt
