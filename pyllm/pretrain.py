"""`pyllm pretrain`: train a base model on shards from `pyllm prepare`; one process, or many under torchrun.

    pyllm pretrain --data data/ --depth 4 --seq-len 256 --batch-size 16 --max-steps 2000 --out out/base
    torchrun --nproc-per-node 2 -m pyllm pretrain --data data/ --depth 12 --device cuda [--fsdp]
    pyllm pretrain --data data/ --out out/base --resume          # continue from out/base/latest exactly
Writes out/metrics.jsonl (one JSON row per step / eval), out/loss.png, out/samples.txt and checkpoints
out/ckpt_<step>/ (model.safetensors + config.json via pyllm.checkpoint, plus trainer_state.safetensors/.json:
optimizer moments, step, data position, RNG), each written to a temporary directory and renamed.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

import torch

from . import data as D
from .config import ModelConfig, depth_config, preset
from .progress import Progress
from .sft import run_args

SHAPE_FLAGS = ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim")


# --- small pieces ------------------------------------------------------------------------------------------
def lr_at(step: int, lr: float, warmup: int, max_steps: int, decay: str, min_lr_frac: float) -> float:
    """Linear warmup over `warmup` steps, then cosine / linear decay to lr*min_lr_frac at max_steps (or constant)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if decay == "constant":
        return lr
    prog = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    f = 0.5 * (1 + math.cos(math.pi * prog)) if decay == "cosine" else 1 - prog
    return lr * (min_lr_frac + (1 - min_lr_frac) * f)


def default_peak_flops(device: torch.device) -> float:
    """Rough dense peak for MFU: bf16 tensor-core peak on known GPUs; AVX-512 fp32 FMA (64 flop/cycle, 3 GHz) per
    CPU thread. Pass --peak-flops for an exact figure (benchmarks/machine.py measures the CPU one)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, f in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12), ("4090", 165e12)):
            if key in name:
                return f
        return 100e12
    return 64 * 3e9 * torch.get_num_threads()


def build_config(args, vocab_size: int) -> ModelConfig:
    """Model shape: --preset, else --depth (nanochat family), else explicit --dim/--n-layers/..., else depth 4."""
    over = {k: getattr(args, k) for k in SHAPE_FLAGS if getattr(args, k, None) is not None}
    if args.tie_embeddings:
        over["tie_embeddings"] = True
    base = dict(vocab_size=vocab_size, max_seq_len=args.seq_len)
    if args.preset:
        return preset(args.preset, **base, **over)
    if args.depth is not None or not over:
        return depth_config(args.depth or 4, **base, **over)
    return ModelConfig(**base, **over)


def make_optimizer(model, lr: float, weight_decay: float, betas, backend: str, device: torch.device):
    """model.configure_optimizer's groups; pyllm's kernel AdamW (pyllm.ops.AdamW) when present on CPU."""
    opt = model.configure_optimizer(lr=lr, weight_decay=weight_decay, betas=betas)
    if backend == "pyllm" and device.type == "cpu":
        from . import ops
        if hasattr(ops, "AdamW"):
            groups = [{k: v for k, v in g.items() if k in ("params", "weight_decay")} for g in opt.param_groups]
            try:
                opt = ops.AdamW(groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
            except TypeError as e:  # an incompatible signature: keep torch's AdamW rather than fail the run
                print(f"pretrain: pyllm.ops.AdamW unusable ({e}); using torch.optim.AdamW")
    return opt


def optimizer_state(opt) -> tuple[dict, dict]:
    """Optimizer state_dict -> (tensors for safetensors, JSON-able rest). No pickle."""
    sd = opt.state_dict()
    tensors, scalars, shapes = {}, {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            name = f"optim.{pid}.{k}"
            if torch.is_tensor(v):
                shapes[name] = list(v.shape)
                tensors[name] = v.detach().to("cpu").reshape(-1).contiguous()
            else:
                scalars[name] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars, "shapes": shapes}


def load_optimizer_state(opt, tensors: dict, meta: dict, source=None) -> None:
    """source: the checkpoint directory (its trainer_state.{json,safetensors} are named in the errors)."""
    from .sft import check_adam_state, checked_param_groups
    state: dict = {}
    for name, shape in meta["shapes"].items():
        _, pid, k = name.split(".", 2)
        state.setdefault(int(pid) if pid.isdigit() else pid, {})[k] = tensors[name].reshape(shape)
    for name, v in meta["scalars"].items():
        _, pid, k = name.split(".", 2)
        state.setdefault(int(pid) if pid.isdigit() else pid, {})[k] = v
    if source is not None:  # the groups went to torch unchecked: "betas": "x" an IndexError, "eps" deleted a KeyError
        source = Path(source)  # (tracebacks from inside the optimizer), a NaN moment an all-NaN model
        tf = source / "trainer_state.safetensors"
        bad = next((pid for pid in state if type(pid) is not int), None)  # (an --fsdp run's names: rekeyed already)
        if bad is not None:
            raise ValueError(f"{tf}: 'optim.{bad}' names no parameter being trained (corrupt trainer state)")
        check_adam_state(opt, state, tf, complete=True)
        groups = checked_param_groups(opt, meta["param_groups"], source / "trainer_state.json")
    else:
        groups = meta["param_groups"]
    opt.load_state_dict({"state": state, "param_groups": groups})


def rekey_optimizer_state(tensors: dict, meta: dict, names: list[str], by_name: bool) -> tuple[dict, dict]:
    """The saved optimizer state keyed as this run keys it: an --fsdp run saves it by parameter name, a run without
    by number, over the same parameters in the same order (names: this run's, in its optimizer's order). So a
    checkpoint resumes with or without --fsdp, on any number of ranks; each side refused the other's (one "resume it
    with --fsdp under torchrun", the other "corrupt trainer state"). A key that names no parameter is left as it is
    (the checks that follow name it)."""
    if bool(meta.get("fsdp")) == by_name:
        return tensors, meta
    key = {str(i): n for i, n in enumerate(names)} if by_name else {n: i for i, n in enumerate(names)}

    def rekey(name):
        pid, _, k = name.removeprefix("optim.").rpartition(".")
        return f"optim.{key[pid]}.{k}" if name.startswith("optim.") and pid in key else name

    def param(q):
        return key.get(str(q) if by_name else q, q) if isinstance(q, (int, str)) else q
    groups = meta["param_groups"]
    if isinstance(groups, list):
        groups = [{**g, "params": [param(q) for q in g["params"]]}
                  if isinstance(g, dict) and isinstance(g.get("params"), list) else g for g in groups]
    sides = {side: {rekey(k): v for k, v in meta[side].items()} for side in ("shapes", "scalars")}
    return {rekey(k): v for k, v in tensors.items()}, {**meta, **sides, "param_groups": groups, "fsdp": by_name}


def _dist_setup(device_arg: str):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    if device_arg == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA GPU is available to torch")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not torch.distributed.is_initialized():
        from .cli import start_process_group
        start_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def fsdp_layout(model) -> dict:
    """What fully_shard did, read back from the model (run.json records it; tests check it): the FSDP groups by
    module name, and per group whether every parameter is a DTensor sharded on dim 0 across all ranks."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, Shard
    world = torch.distributed.get_world_size()
    mods = {name or "<root>": m for name, m in model.named_modules() if isinstance(m, FSDPModule)}
    groups, seen = {}, set()
    for name in sorted(mods, key=lambda n: -n.count(".") if n != "<root>" else 1):  # innermost groups first
        own = [p for p in mods[name].parameters() if id(p) not in seen]
        seen.update(id(p) for p in own)
        groups[name] = len(own) > 0 and all(isinstance(p, DTensor) and tuple(p.placements) == (Shard(0),)
                                            and p.device_mesh.size() == world for p in own)
    return {"groups": list(groups), "sharded": groups}


def _all_mean(x: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        x = x.clone()
        torch.distributed.all_reduce(x)
        x /= world
    return x


def _latest(out: Path) -> Path | None:
    from .checkpoint import read_latest
    p = out / "latest"
    return out / read_latest(p) if p.is_file() else None


# --- checkpoints -----------------------------------------------------------------------------------------------
def save(out: Path, step: int, model, full_sd, opt_state, loader, tok, config, args, rank: int, keep: int):
    """Rank 0 writes out/ckpt_<step> (save_checkpoint swaps the whole directory in atomically, trainer state
    included), then the `latest` pointer."""
    if rank != 0:
        return
    from .checkpoint import save_checkpoint
    from .model import GPT
    from .safetensors_io import save_file
    name = f"ckpt_{step:07d}"
    if full_sd is not None:  # FSDP: the gathered full state dict goes into a plain CPU model for saving
        plain = GPT(config)
        plain.load_state_dict(full_sd)
        model = plain
    from .sft import check_finite_weights
    check_finite_weights(model.state_dict().items(), step)
    tensors, meta = opt_state
    tensors["rng.torch"] = torch.get_rng_state()
    meta.update(step=step, loader=loader.state_dict(), config=config.to_dict(), args=run_args(args),
                tokenizer_hash=D.tokenizer_hash(tok), time=time.time(),
                tokens_per_step=loader.B * loader.T * loader.world * loader.accum)

    def trainer_files(tmp: Path):
        save_file(tensors, str(Path(tmp) / "trainer_state.safetensors"), {"format": "pyllm-trainer", "step": str(step)})
        D.atomic_write_text(Path(tmp) / "trainer_state.json", json.dumps(meta, indent=1))
    save_checkpoint(str(out / name), model, tokenizer=tok, extra={"step": step}, extra_files=trainer_files)
    D.atomic_write_text(out / "latest", name + "\n")
    # only ckpt_<step> dirs count: a run killed mid-save leaves ckpt_<step>.tmp-<pid>, which was counted (and kept)
    # in place of a real checkpoint; those leftovers are removed here
    # and only earlier steps: a run started over in the same --out rotated its own checkpoints out while keeping the
    # earlier run's later-numbered ones
    old = sorted(p for p in out.glob("ckpt_*") if p.is_dir() and re.fullmatch(r"ckpt_\d+", p.name) and p.name < name)
    stale = [p for p in out.glob("ckpt_*.tmp-*") if p.is_dir()]
    for p in old[:max(0, len(old) - (keep - 1))] + stale:
        shutil.rmtree(p, ignore_errors=True)


def load_resume(path: Path, config: ModelConfig):
    """(model state, trainer tensors, trainer meta) from a checkpoint dir; a different model shape is one error."""
    from .checkpoint import load_checkpoint
    from .safetensors_io import load_file
    tj = path / "trainer_state.json"
    if not tj.is_file():
        raise FileNotFoundError(f"{path}: no trainer_state.json (not a pretrain checkpoint)")
    meta = D.read_json(tj, "corrupt trainer state")
    need = ("param_groups", "scalars", "shapes", "step", "loader", "config")
    if isinstance(meta, dict) and meta.get("stage") not in (None, "pretrain"):
        raise ValueError(f"{path}: a `pyllm {meta['stage']}` checkpoint, not a pretrain one (use it as --model of the "
                         f"next stage, or resume it with `pyllm {meta['stage']} --resume`)")
    if not isinstance(meta, dict) or not set(need) <= set(meta) or not isinstance(meta["config"], dict):
        raise ValueError(f"{tj}: corrupt trainer state (expected an object with {', '.join(need)})")
    # the JSON side's structure before anything indexes it: a hand-edited or damaged file was an AttributeError,
    # KeyError or TypeError traceback (scalars a string, a loader field deleted, a shape ["x"]) or, with a loader
    # position of Infinity, int()'s OverflowError
    ld = meta["loader"]
    if not (isinstance(ld, dict) and all(type(ld.get(k)) is int and ld[k] >= 0
                                         for k in ("epoch", "pos", "seed", "n_windows", "seq_len"))):
        raise ValueError(f"{tj}: corrupt trainer state (loader must hold integers epoch, pos, seed, n_windows and "
                         f"seq_len >= 0)")
    if not isinstance(meta["scalars"], dict) or not isinstance(meta["shapes"], dict) or not all(
            isinstance(v, list) and all(type(d) is int and d >= 0 for d in v) for v in meta["shapes"].values()):
        raise ValueError(f"{tj}: corrupt trainer state (scalars and shapes must be objects, each shape a list of "
                         f"sizes)")
    tps = meta.get("tokens_per_step")  # (absent: saved before pyllm kept it)
    if tps is not None and not (type(tps) is int and tps > 0):
        raise ValueError(f"{tj}: corrupt trainer state (tokens_per_step {tps!r})")
    if meta["config"] != config.to_dict():
        diff = {k: (meta["config"].get(k), v) for k, v in config.to_dict().items() if meta["config"].get(k) != v}
        raise ValueError(f"{path}: checkpoint is a different model shape (checkpoint vs this run: "
                         + ", ".join(f"{k} {a} vs {b}" for k, (a, b) in diff.items())
                         + "); resume with the same --depth/--preset/--dim/... and --seq-len")
    ck_model, _ = load_checkpoint(str(path))
    tf = path / "trainer_state.safetensors"
    tensors = load_file(str(tf))
    # each tensor the JSON side names, with its size (a missing rng.torch was a KeyError, a wrong-sized moment
    # reshape's RuntimeError from inside the resume)
    shapes = meta["shapes"] if isinstance(meta["shapes"], dict) else {}
    for name, shape in [("rng.torch", None), *shapes.items()]:
        t = tensors.get(name)
        if t is None:
            raise ValueError(f"{tf}: missing tensor {name!r} (corrupt trainer state)")
        if shape is not None and (not isinstance(shape, list) or t.numel() != math.prod(shape)):
            raise ValueError(f"{tf}: tensor {name!r} has {t.numel()} elements, trainer_state.json says shape "
                             f"{shape} (corrupt trainer state)")
    if tensors["rng.torch"].dtype != torch.uint8:
        raise ValueError(f"{tf}: tensor 'rng.torch' is {tensors['rng.torch'].dtype}, not a torch RNG state")
    n_rng = torch.get_rng_state().numel()  # another size was torch's RuntimeError traceback from set_rng_state
    if tensors["rng.torch"].numel() != n_rng:
        raise ValueError(f"{tf}: tensor 'rng.torch' has {tensors['rng.torch'].numel()} bytes, a torch RNG state "
                         f"{n_rng}")
    return ck_model.state_dict(), tensors, meta


# --- training ----------------------------------------------------------------------------------------------------
def train(args) -> dict:
    """The training loop; returns {"step", "train_loss", "val_loss", "losses": [...]}."""
    from .model import GPT
    from .tokenizer import Tokenizer
    rank, world, device = _dist_setup(args.device)
    torch.manual_seed(args.seed)
    data_dir, out = Path(args.data), Path(args.out)
    man = D.read_manifest(data_dir)
    tok = Tokenizer.load(str(data_dir / "tokenizer.json"))
    thash = D.tokenizer_hash(tok)
    config = build_config(args, man["vocab_size"])
    train_stream = D.TokenStream(data_dir, "train", tokenizer_hash=thash, vocab_size=config.vocab_size)
    if man["bos_id"] != tok.bos_id:  # the loader marks documents by the manifest's bos: another id silently let
        # attention run across document boundaries (the tokenizer is the data's: TokenStream checked its hash)
        raise ValueError(f"{data_dir / D.MANIFEST}: corrupt manifest (bos_id {man['bos_id']}, but its tokenizer.json's "
                         f"bos token is {tok.bos_id})")
    has_val = any(s["split"] == "val" for s in man["shards"])
    val_stream = D.TokenStream(data_dir, "val", tokenizer_hash=thash) if has_val else None
    if val_stream is not None:
        try:
            D.PackedLoader(val_stream, args.batch_size, args.seq_len, world_size=int(os.environ.get("WORLD_SIZE", "1")),
                           shuffle=False)
        except ValueError as e:
            print(f"pretrain: no evaluation: validation split too small ({e})")
            val_stream = None
    step, resume_meta = 0, None
    resume_from = None
    if args.resume:
        resume_from = _latest(out) if args.resume == "latest" else Path(args.resume)
        if resume_from is None or not resume_from.is_dir():
            raise FileNotFoundError(f"--resume: no checkpoint at {resume_from or out / 'latest'}")
        weights, rtensors, resume_meta = load_resume(resume_from, config)
    B, T = args.batch_size, args.seq_len
    micro_tokens = B * T * world
    # a resumed run keeps its tokens per step on another number of ranks by accumulating: without
    # --total-batch-tokens (one micro-batch per rank) it took another batch size, data order and loss curve silently
    total = args.total_batch_tokens or (resume_meta or {}).get("tokens_per_step") or micro_tokens
    if total % micro_tokens and resume_meta is not None:
        raise ValueError(f"{resume_from}: the run takes {total} tokens per step, which {world} rank(s) x --batch-size "
                         f"{B} x --seq-len {T} = {micro_tokens} do not divide; resume it on as many ranks as it was "
                         f"saved with (or fewer)")
    if total % micro_tokens:
        raise ValueError(f"--total-batch-tokens {total} is not a multiple of batch-size*seq-len*world = {micro_tokens}")
    accum = total // micro_tokens
    if not args.max_steps:  # nanochat/Chinchilla sizing: about 20 training tokens per parameter
        args.max_steps = max(1, math.ceil(args.tokens_per_param * config.num_params() / total))
    loader = D.PackedLoader(train_stream, B, T, seed=args.seed, rank=rank, world_size=world, accum=accum)
    if accum * B * world > loader.n_windows:  # (the loader checked one micro-batch) a step re-reading the data over
        # and over: --total-batch-tokens 2^31 on a small corpus ran 33 million micro-batches a step and never ended
        raise ValueError(f"--total-batch-tokens {total}: one optimizer step needs {accum * B * world} windows of "
                         f"{T}+1 tokens, but the training data makes {loader.n_windows}; lower --total-batch-tokens, "
                         f"or add data")
    backend = args.backend or ("pyllm" if device.type == "cpu" else "torch")
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else None, "fp32": None,
             "bf16": torch.bfloat16}[args.dtype]
    model = GPT(config, backend=backend)
    if resume_meta is not None:
        if resume_meta.get("tokenizer_hash") != thash:
            raise ValueError(f"{resume_from}: checkpoint was trained with tokenizer "
                             f"{resume_meta.get('tokenizer_hash')}, but {data_dir} uses {thash}")
        missing = model.load_state_dict(weights, strict=False)
        if missing.missing_keys or missing.unexpected_keys:
            raise ValueError(f"{resume_from}: weights do not match the model ({missing})")
        step = resume_meta["step"]
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"{resume_from}/trainer_state.json: corrupt trainer state (step {step!r})")
        if step > args.max_steps:  # the schedule would be past its end and the loop would train nothing
            raise ValueError(f"{resume_from}: checkpoint is at step {step}, past --max-steps {args.max_steps}; raise "
                             f"--max-steps to continue it")
        if args.stop_at and args.stop_at <= step:  # else a run that exits 0 having trained nothing
            raise ValueError(f"{resume_from}: checkpoint is at step {step}, already at or past --stop-at "
                             f"{args.stop_at}; raise --stop-at (or drop it) to continue")
        loader.load_state_dict(resume_meta["loader"])
        torch.set_rng_state(rtensors["rng.torch"])
    model.to(device)
    raw = model
    args.fsdp = bool(args.fsdp and world > 1)
    fsdp_info = None
    if args.fsdp:
        # FSDP2 (per-parameter sharding; CPU/gloo and GPU), as its docs wrap a transformer: each Block is its own
        # group (GPT runs blocks through their module call, so a block's parameters are gathered just for its
        # forward and backward and freed after), then the root takes what is left (embeddings, final norm, head).
        # Parameters, gradients and optimizer moments are sharded at rest.
        from torch.distributed.fsdp import fully_shard
        for blk in model.layers:
            fully_shard(blk)
        fully_shard(model)
        fsdp_info = fsdp_layout(model)
    elif world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                          else None)
    opt = make_optimizer(raw, args.lr, args.weight_decay, (args.beta1, args.beta2),
                         "torch" if args.fsdp else backend, device)
    if resume_meta is not None:
        name_of = {id(p): n for n, p in raw.named_parameters()}
        names = [name_of[id(p)] for g in opt.param_groups for p in g["params"]]
        rtensors, resume_meta = rekey_optimizer_state(rtensors, resume_meta, names, args.fsdp)
        if args.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
            osd = _unflatten_fsdp(model, opt, rtensors, resume_meta, resume_from)
            set_optimizer_state_dict(model, opt, osd, options=StateDictOptions(full_state_dict=True))
        else:
            load_optimizer_state(opt, {k: v.to(device) for k, v in rtensors.items()}, resume_meta, resume_from)
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
    peak = args.peak_flops or default_peak_flops(device)
    flops_step = config.flops_per_token(T) * total
    if rank == 0:
        if not args.resume and _latest(out) is not None:  # as the assistant stages warn (nanoGPT overwrites silently)
            print(f"{out}: holds an earlier run (latest {_latest(out).name}); starting over from step 0 (pass --resume "
                  f"to continue it)", file=sys.stderr)
            # the pointer goes with the earlier run's metrics (dropped just below): this run killed before its first
            # checkpoint, then --resume'd, continued the earlier run under this run's metrics rows
            (out / "latest").unlink()
        out.mkdir(parents=True, exist_ok=True)
        D.atomic_write_text(out / "run.json", json.dumps(dict(args=run_args(args), config=config.to_dict(),
                                                              world_size=world, accum=accum, device=str(device),
                                                              backend=backend, params=config.num_params(),
                                                              fsdp=fsdp_info), indent=1))
        metrics = _open_metrics(out / "metrics.jsonl", step)
        _trim_samples(out / "samples.txt", step)
        print(f"pretrain: {config.num_params() / 1e6:.2f}M params ({config.n_layers} layers, dim {config.dim}), "
              f"{train_stream.n_tokens} train tokens, {total} tokens/step = {world} rank(s) x {accum} micro x {B}x{T}, "
              f"{args.max_steps} steps, backend {backend}, device {device}"
              + (f", resumed at step {step}" if step else ""), flush=True)
    bar = Progress(total=args.max_steps, initial=step, desc="pretrain", unit="step", disable=rank != 0 or None)
    losses, val_loss, last_loss = [], None, None

    def evaluate():
        if val_stream is None or args.eval_batches <= 0:
            return None
        model.eval()
        vl = D.PackedLoader(val_stream, B, T, rank=rank, world_size=world, shuffle=False)
        n = min(args.eval_batches, vl.n_windows // (B * world))
        tot = torch.zeros((), device=device)
        with torch.no_grad(), autocast():
            for _ in range(n):
                x, y, d = vl.next_batch(device)
                tot += model(x, y, d)[1].float()
        model.train()
        return float(_all_mean(tot / n, world))

    def sample():
        if rank != 0 or args.sample_tokens <= 0 or args.fsdp:
            return
        raw.eval()
        rng = torch.get_rng_state()
        n = min(args.sample_tokens, config.max_seq_len - 1)
        with torch.no_grad(), autocast():
            ids = raw.generate(torch.tensor([[tok.bos_id]], device=device), n, temperature=0.8, top_k=50,
                               seed=args.seed + step)
        torch.set_rng_state(rng)
        raw.train()
        text = tok.decode(ids[0, 1:].tolist())
        with open(out / "samples.txt", "a") as f:
            f.write(f"--- step {step}\n{text}\n")
        bar.write(f"sample @ {step}: {text[:200]!r}")

    def log(row):
        if rank == 0:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()

    model.train()
    try:
        stop = min(args.max_steps, args.stop_at or args.max_steps)
        while step < stop:
            if args.eval_every and step % args.eval_every == 0 and (step > 0 or args.eval_at_start):
                val_loss = evaluate()
                if val_loss is not None:
                    log({"step": step, "val_loss": val_loss})
                    if rank == 0:
                        bar.write(f"step {step}: val loss {val_loss:.4f}")
                sample()
            t0 = time.perf_counter()
            lr = lr_at(step, args.lr, args.warmup_steps, args.max_steps, args.decay, args.min_lr_frac)
            for g in opt.param_groups:
                g["lr"] = lr
            acc = torch.zeros((), device=device)
            for micro in range(accum):
                x, y, d = loader.next_batch(device)
                sync = contextlib.nullcontext() if (world == 1 or micro == accum - 1 or args.fsdp) else model.no_sync()
                with sync:
                    with autocast():
                        _, loss = model(x, y, d)
                    (loss / accum).backward()
                acc += loss.detach().float()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip if args.grad_clip > 0 else
                                                   float("inf"))
            if hasattr(gnorm, "full_tensor"):  # FSDP2: a DTensor
                gnorm = gnorm.full_tensor()
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            last_loss = float(_all_mean(acc / accum, world))
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            losses.append(last_loss)
            row = {"step": step, "loss": last_loss, "lr": lr, "grad_norm": float(gnorm), "tokens": step * total,
                   "dt": dt, "tok_per_s": total / dt, "mfu": flops_step / dt / (peak * world)}
            log(row)
            bar.set_postfix(loss=last_loss, lr=f"{lr:.2e}", tok_s=f"{total / dt:.0f}", mfu=f"{100 * row['mfu']:.1f}%")
            bar.update(1)
            if not math.isfinite(last_loss):
                raise ValueError(f"loss is {last_loss} at step {step}; lower --lr or check the data")
            if (args.checkpoint_every and step % args.checkpoint_every == 0) or step == stop:
                _checkpoint(out, step, model, raw, opt, loader, tok, config, args, rank, world)
        if step == args.max_steps:
            val_loss = evaluate()
            if val_loss is not None:
                log({"step": step, "val_loss": val_loss})
                if rank == 0:
                    bar.write(f"step {step}: val loss {val_loss:.4f}")
            sample()
    finally:
        bar.close()
        if rank == 0:
            metrics.close()
            plot_metrics(out)
    if world > 1:
        torch.distributed.barrier()  # no rank tears down its connections while another still talks to it
    return {"step": step, "train_loss": last_loss, "val_loss": val_loss, "losses": losses}


def _checkpoint(out, step, model, raw, opt, loader, tok, config, args, rank, world):
    if args.fsdp:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        o = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full = get_model_state_dict(model, options=o)  # collective: every rank takes part, rank 0 gets it all
        osd = get_optimizer_state_dict(model, opt, options=o)
        save(out, step, raw, full, _flatten_fsdp(osd), loader, tok, config, args, rank, args.keep_checkpoints)
    else:
        save(out, step, raw, None, optimizer_state(opt), loader, tok, config, args, rank, args.keep_checkpoints)
    if world > 1:
        torch.distributed.barrier()


def _flatten_fsdp(osd: dict) -> tuple[dict, dict]:
    """A full optimizer state dict keyed by parameter name -> (tensors for safetensors, JSON-able rest)."""
    tensors, meta = {}, {"fsdp": True, "shapes": {}, "scalars": {}, "param_groups": osd.get("param_groups", [])}
    for pname, st in osd.get("state", {}).items():
        for k, v in st.items():
            key = f"optim.{pname}.{k}"
            if torch.is_tensor(v):
                meta["shapes"][key] = list(v.shape)
                tensors[key] = v.detach().cpu().reshape(-1).contiguous()
            else:
                meta["scalars"][key] = v
    return tensors, meta


def _unflatten_fsdp(model, opt, tensors, meta, source) -> dict:
    """The FSDP checkpoint's optimizer state {param name: {step, exp_avg, exp_avg_sq}} as set_optimizer_state_dict
    takes it, checked first as the one-process resume checks its numbered state: handed over unchecked, a NaN or
    negative moment trained on ("loss is nan", or with --stop-at an all-NaN checkpoint and exit 0), an integer one was
    truncated in, param groups with "betas": "x", a parameter's state missing or a moment of another shape were
    tracebacks from inside torch, "maximize": true or shuffled "params" trained on silently."""
    from .sft import check_adam_state, checked_param_groups
    source = Path(source)
    tf, tj = source / "trainer_state.safetensors", source / "trainer_state.json"
    name_of = {id(p): n for n, p in model.named_parameters()}
    cur = [[name_of[id(p)] for p in g["params"]] for g in opt.param_groups]
    names = [n for g in cur for n in g]
    number = {n: i for i, n in enumerate(names)}
    saved = meta["param_groups"]
    if isinstance(saved, list) and len(saved) == len(cur) and all(isinstance(g, dict) for g in saved):
        for i, (g, mine) in enumerate(zip(saved, cur)):  # saved by name: each group must name this run's parameters
            if g.get("params") != mine:
                raise ValueError(f"{tj}: corrupt trainer state (optimizer param group {i} lists parameters "
                                 f"{str(g.get('params'))[:60]}..., expected {mine[:2]}...)")
        saved = [{**g, "params": [number[n] for n in g["params"]]} for g in saved]
    groups = checked_param_groups(opt, saved, tj)
    state: dict = {}
    for side in ("shapes", "scalars"):
        for name, v in meta[side].items():
            pname, _, k = name.removeprefix("optim.").rpartition(".")
            if not name.startswith("optim.") or pname not in number:
                raise ValueError(f"{tf if side == 'shapes' else tj}: {name!r} names no parameter being trained "
                                 f"(corrupt trainer state)")
            state.setdefault(pname, {})[k] = tensors[name].reshape(v) if side == "shapes" else v
    # complete: a parameter's state missing failed deep inside torch's set_optimizer_state_dict
    check_adam_state(opt, {number[n]: st for n, st in state.items()}, tf, names=names, complete=True)
    return {"state": state, "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in groups]}


def _open_metrics(path: Path, step: int):
    """Open metrics.jsonl for appending, first dropping rows past `step` (a resumed run rewrites them)."""
    rows = []
    if step and path.is_file():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            # dropped like a line cut short by a kill: a row that is not an object with an integer step ([1] was
            # an AttributeError traceback, {"step": "x"} a TypeError, on every --resume of the run)
            if not isinstance(r, dict) or type(r.get("step")) is not int:
                continue
            if r["step"] <= step and not ("val_loss" in r and r["step"] == step):
                rows.append(line)
    D.atomic_write_text(path, "".join(r + "\n" for r in rows))
    return open(path, "a")


def _trim_samples(path: Path, step: int) -> None:
    """Drop samples.txt's entries from `step` on, as _open_metrics drops the metrics rows: a run killed after a
    sample and before its next checkpoint wrote that sample again on --resume ("--- step 20" twice), and a run
    started over (step 0) appended to the earlier run's samples."""
    if not path.is_file():
        return
    lines = path.read_text(errors="replace").splitlines(keepends=True)
    for i, line in enumerate(lines):
        m = re.fullmatch(r"--- step (\d+)\n?", line)
        if m and int(m.group(1)) >= step:
            D.atomic_write_text(path, "".join(lines[:i]))
            return


def plot_metrics(out: Path) -> None:
    """out/loss.png from out/metrics.jsonl: train loss per step and val loss per eval."""
    from .plot import line_plot
    p = out / "metrics.jsonl"
    if not p.is_file():
        return
    tr, va = ([], []), ([], [])
    for line in p.read_text().splitlines():
        r = json.loads(line)
        dst = va if "val_loss" in r else tr
        dst[0].append(r["step"])
        dst[1].append(r.get("val_loss", r.get("loss")))
    if tr[0] or va[0]:
        line_plot(str(out / "loss.png"), {"train loss": tr, "val loss": va})


# --- CLI -----------------------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--data", required=True, help="data directory written by `pyllm prepare`")
    p.add_argument("--out", default="out/pretrain", help="output directory: checkpoints, metrics, plot (out/pretrain)")
    g = p.add_argument_group("model shape (default: --depth 4)")
    g.add_argument("--depth", type=int, help="nanochat-style size: n_layers = depth, dim = 64*depth")
    g.add_argument("--preset", help="a named preset from pyllm.config (260K, 15M, 42M, 110M, d<N>)")
    g.add_argument("--dim", type=int, help="model width (overrides the preset/depth)")
    g.add_argument("--n-layers", type=int, help="number of layers")
    g.add_argument("--n-heads", type=int, help="attention heads")
    g.add_argument("--n-kv-heads", type=int, help="key/value heads (grouped-query attention); default n-heads")
    g.add_argument("--hidden-dim", type=int, help="SwiGLU width; default Llama's 8/3*dim rounded")
    g.add_argument("--tie-embeddings", action="store_true", help="share the input embedding and output head")
    g.add_argument("--seq-len", type=int, default=256, help="context length T of training rows (256)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=16, help="rows per micro-batch per process (16)")
    g.add_argument("--total-batch-tokens", type=int, default=0,
                   help="tokens per optimizer step; gradient accumulation fills it (0 = one micro-batch per rank)")
    g.add_argument("--max-steps", type=int, default=0,
                   help="optimizer steps (0 = sized from the model: --tokens-per-param x parameters / tokens per step)")
    g.add_argument("--tokens-per-param", type=float, default=20.0,
                   help="training tokens per parameter when --max-steps is 0 (Chinchilla/nanochat: 20)")
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (1e-3)")
    g.add_argument("--warmup-steps", type=int, default=100, help="linear warmup steps (100)")
    g.add_argument("--decay", choices=("cosine", "linear", "constant"), default="cosine",
                   help="schedule after warmup (cosine)")
    g.add_argument("--min-lr-frac", type=float, default=0.1, help="final lr as a fraction of --lr (0.1)")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay on matrices (0.1)")
    g.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1 (0.9)")
    g.add_argument("--beta2", type=float, default=0.95, help="AdamW beta2 (0.95)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the global grad norm to this (0 = off; 1.0)")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=1337, help="seed for init, data order and samples (1337)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto = cuda if available")
    g.add_argument("--backend", choices=("pyllm", "torch"), default=None,
                   help="pyllm kernels or plain torch ops (default: pyllm on CPU, torch on CUDA)")
    g.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="autocast dtype (auto = bf16 on CUDA, fp32 on CPU; bf16 with the pyllm CPU kernels = bf16 GEMM operands, fp32 weights)")
    g.add_argument("--fsdp", action=argparse.BooleanOptionalAction, default=False,
                   help="shard the model with torch FSDP (under torchrun); --no-fsdp resumes an --fsdp run with DDP")
    g.add_argument("--eval-every", type=int, default=250, help="eval val loss + sample every N steps (0 = end only)")
    g.add_argument("--eval-at-start", action="store_true", help="also evaluate before the first step")
    g.add_argument("--eval-batches", type=int, default=20, help="validation batches per eval (20)")
    g.add_argument("--sample-tokens", type=int, default=64, help="tokens to sample at each eval (0 = none)")
    g.add_argument("--checkpoint-every", type=int, default=500, help="save a checkpoint every N steps (and at the end)")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="how many recent checkpoints to keep (2)")
    g.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CKPT",
                   help="continue from a checkpoint dir (default: <out>/latest)")
    g.add_argument("--stop-at", type=int, default=0, metavar="STEP",
                   help="checkpoint and exit after this step; the lr schedule still targets --max-steps (resume later)")
    g.add_argument("--peak-flops", type=float, default=0.0,
                   help="peak FLOP/s per process for MFU (0 = a guess from the device)")


# FSDP2 measured per torch release (tests/test_pretrain.py's 2-rank FSDP run, CPU/gloo, 2026-11-25): 2.6 fails in its
# first step (no Stream.record_event on CPU); 2.7 and 2.8 train, but a --resume from the sharded checkpoint is off by
# up to 8e-5 in the loss of the next steps; 2.9 and 2.13 match one process exactly.
FSDP_MIN_TORCH = "2.9"


def check_fsdp_torch(fsdp: bool, torch_version: str) -> None:
    from packaging.version import Version
    if fsdp and Version(torch_version).release < Version(FSDP_MIN_TORCH).release:
        raise ValueError(f"--fsdp needs torch >= {FSDP_MIN_TORCH} (this is {torch_version}: its FSDP2 fails on CPU or "
                         "resumes inexactly); upgrade torch, or drop --fsdp to train with DDP")


def check_args(args) -> None:
    """The flags' values, one line naming the flag; run again on the values --resume restores from the run."""
    if args.max_steps < 0:
        raise ValueError(f"--max-steps must be >= 0, got {args.max_steps}")
    for k in ("batch_size", "seq_len", "keep_checkpoints"):
        if getattr(args, k) <= 0:
            raise ValueError(f"--{k.replace('_', '-')} must be positive, got {getattr(args, k)}")
    if args.warmup_steps < 0 or not 0 < args.lr < math.inf:
        raise ValueError("--warmup-steps must be >= 0 and --lr > 0")
    if not 0 <= args.seed < 2 ** 63:  # was torch's "expected non-negative integer" / "Overflow when unpacking"
        raise ValueError(f"--seed must be in [0, 2^63), got {args.seed}")
    # a negative period made `step % n == 0` true every step (an eval / a checkpoint per step), not "off"
    for k in ("eval_every", "checkpoint_every", "eval_batches", "sample_tokens", "stop_at", "total_batch_tokens"):
        if getattr(args, k) < 0:
            raise ValueError(f"--{k.replace('_', '-')} must be >= 0 (0 = off), got {getattr(args, k)}")
    if args.depth is not None and args.preset:  # --depth was ignored without a word
        raise ValueError("--depth and --preset each give the whole model shape: pass one of them")
    if args.depth is not None and args.depth <= 0:  # was silently replaced by the default depth 4
        raise ValueError(f"--depth must be positive, got {args.depth}")
    from .sft import check_float_ranges
    check_float_ranges(args, {"weight_decay": (0.0, None, False), "grad_clip": (0.0, None, False),
                              "beta1": (0.0, 1.0, False), "beta2": (0.0, 1.0, False),
                              "min_lr_frac": (0.0, 1.0, False), "tokens_per_param": (0.0, None, True)})
    for k in ("beta1", "beta2"):  # 1 itself: the optimizer's "Invalid beta parameter at index 1" named no flag
        if getattr(args, k) == 1.0:
            raise ValueError(f"--{k} must be in [0, 1), got 1")
    from .sft import check_adamw
    check_adamw(args.lr, args.weight_decay, args.beta1)
    if not 0 <= args.peak_flops < math.inf:  # a negative figure printed a negative MFU
        raise ValueError("--peak-flops must be a finite number >= 0 (0 = a guess from the device), "
                         f"got {args.peak_flops}")
    check_fsdp_torch(args.fsdp, torch.__version__)


def main(args) -> int:
    from .sft import resume_args
    check_args(args)
    if args.resume:  # before anything reads the flags: the run's own settings for those left out
        ck = _latest(Path(args.out)) if args.resume == "latest" else Path(args.resume)
        tj = ck / "trainer_state.json" if ck is not None else None
        if tj is not None and tj.is_file():
            meta = D.read_json(tj, "corrupt trainer state")
            resume_args(args, meta.get("args") if isinstance(meta, dict) else None, ck, check=check_args)
    try:
        train(args)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":  # python -m pyllm.pretrain ... == pyllm <command> ...
    from .cli import module_main
    raise SystemExit(module_main(__spec__.name))
