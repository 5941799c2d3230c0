"""Stage 2, supervised fine-tuning: `pyllm sft --model base/ --data sft.jsonl --out sft/` (tests/test_sft.py).

Data: JSONL, one conversation per line, TRL's formats: {"messages": [{"role": "system"|"user"|"assistant",
"content": ...}, ...]} or {"prompt": str|messages, "completion": str|messages}. Each conversation is rendered with
pyllm.chat's template; the loss covers assistant tokens only (their content and end-of-turn), or every token with
--train-on-prompt. Conversations are packed several per row; doc_ids keep attention inside each conversation, so
packing changes throughput, not the result. Also home of the helpers every assistant stage shares (JSONL reading
with file:line errors, devices and DDP, metrics, atomic checkpoints with resumable trainer state).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
from pathlib import Path

import torch
import torch.nn as nn

from .data import tokenizer_hash

ROLES = ("system", "user", "assistant")


# ---------------------------------------------------------------------------------------------------------------
# data: JSONL with file:line errors
class BadLine(ValueError):
    """A data line that cannot be used; the message starts with file:line."""


def read_jsonl(path, parse, skip_bad: bool = False, what: str = "data") -> tuple[list, int]:
    """[(parse(obj, where)) for each non-blank line]; a bad line raises BadLine (file:line: problem) or, with
    skip_bad, is counted and skipped. Returns (records, n_skipped)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: {what} file not found")
    if path.is_dir():
        raise ValueError(f"{path}: is a directory, expected a JSONL {what} file")
    out, skipped = [], 0
    with open(path, "rb") as f:  # bytes, so a non-UTF-8 line is a file:line error like any other bad line
        for lineno, raw in enumerate(f, 1):
            if lineno == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 BOM (Windows editors) is not JSON
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                try:
                    obj = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as e:
                    raise BadLine(f"{where}: not valid UTF-8 (byte {e.start})") from None
                except json.JSONDecodeError as e:
                    raise BadLine(f"{where}: not valid JSON ({e.msg})") from None
                except RecursionError:  # json's C scanner recurses per nesting level
                    raise BadLine(f"{where}: not valid JSON (nested too deeply)") from None
                except ValueError as e:  # an integer past int()'s 4300-digit limit: the line was not named
                    raise BadLine(f"{where}: not valid JSON ({str(e).split(';')[0]})") from None
                if not isinstance(obj, dict):
                    raise BadLine(f"{where}: expected a JSON object, got {type(obj).__name__}")
                out.append(parse(obj, where))
            except BadLine as e:
                if not skip_bad:
                    raise BadLine(f"{e} (or pass --skip-bad-lines to skip such lines)") from None
                skipped += 1
    if skipped:
        print(f"{path}: skipped {skipped} bad line(s) (--skip-bad-lines)", file=sys.stderr)
    if not out:
        raise BadLine(f"{path}: no usable {what} lines")
    return out, skipped


def check_messages(msgs, where: str, field: str = "messages", weights: bool = False) -> list[dict]:
    """Validate a message list: known roles, string content, no empty assistant turn. weights (SFT): an assistant
    turn's "weight" (0 or 1) is kept; elsewhere (preference pairs, prompts, scoring) it is ignored, as before."""
    if not isinstance(msgs, list) or not msgs:
        raise BadLine(f"{where}: '{field}' must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise BadLine(f"{where}: {field}[{i}] must be an object with 'role' and 'content'")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise BadLine(f"{where}: {field}[{i}] has unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise BadLine(f"{where}: {field}[{i}] content must be a string")
        if role == "assistant" and not content.strip():
            raise BadLine(f"{where}: {field}[{i}] is an empty assistant turn")
        out.append({"role": role, "content": content})
        if weights and "weight" in m:  # OpenAI's fine-tuning format: weight 0 keeps an assistant turn out of the loss (it was
            w = m["weight"]  # ignored: every such turn trained on)
            if role != "assistant" or type(w) not in (int, bool) or w not in (0, 1):
                raise BadLine(f"{where}: {field}[{i}] weight must be 0 or 1 on an assistant turn, got {w!r} on a "
                              f"{role} turn")
            out[-1]["weight"] = int(w)
    return out


def as_messages(x, where: str, field: str, default_role: str) -> list[dict]:
    """A string (one turn of default_role) or a message list."""
    if isinstance(x, str):
        if default_role == "assistant" and not x.strip():
            raise BadLine(f"{where}: '{field}' is an empty assistant turn")
        return [{"role": default_role, "content": x}]
    return check_messages(x, where, field)


def parse_conversation(obj: dict, where: str) -> list[dict]:
    """{"messages": [...]} or {"prompt", "completion"} -> validated messages with at least one assistant turn."""
    if "messages" in obj:
        msgs = check_messages(obj["messages"], where, weights=True)
    elif "prompt" in obj and "completion" in obj:
        msgs = as_messages(obj["prompt"], where, "prompt", "user") + \
            as_messages(obj["completion"], where, "completion", "assistant")
    else:
        raise BadLine(f"{where}: expected 'messages' or 'prompt'+'completion' keys, got {sorted(obj)}")
    if not any(m["role"] == "assistant" and m.get("weight", 1) for m in msgs):
        raise BadLine(f"{where}: conversation has no assistant turn to train on")
    return msgs


def render_checked(msgs, tok, where: str, max_len: int, add_generation_prompt: bool = False,
                   hint: str = "shorten it or raise --seq-len up to the model's max_seq_len"):
    """chat.render with the context check: (ids, loss_mask) or BadLine naming the line and the lengths (and, hint,
    what to do: a command without --seq-len says something else)."""
    from .chat import render
    try:
        ids, mask = render(msgs, tok, add_generation_prompt=add_generation_prompt)
    except (ValueError, KeyError) as e:
        raise BadLine(f"{where}: {e}") from None
    if len(ids) > max_len:
        raise BadLine(f"{where}: {len(ids)} tokens is longer than the context ({max_len}); {hint}")
    return list(ids), list(mask)


def pack_rows(examples, seq_len: int, pad_id: int, train_on_prompt: bool = False, packing: bool = True):
    """examples [(ids, mask)] -> rows x, y (R, T) int64 and doc_ids (R, T) int32.

    Each conversation of n tokens gives n-1 (input, target) pairs; target = -1 where the mask is 0. Rows are
    filled first-fit, longest first; padding gets targets -1 and a doc id of its own so it attends nowhere else.
    """
    pieces = []
    for ids, mask in examples:
        x = ids[:-1]
        y = [t if (m or train_on_prompt) else -1 for t, m in zip(ids[1:], mask[1:])]
        pieces.append((x, y))
    order = sorted(range(len(pieces)), key=lambda i: -len(pieces[i][0])) if packing else range(len(pieces))
    rows: list[list[int]] = []  # piece indices per row
    free: list[int] = []
    open_rows: list[int] = []   # rows that can still take the shortest piece; only the newest 256 are searched,
    min_len = min(len(p[0]) for p in pieces) if pieces else 0  # so packing stays O(N) on big sets
    for i in order:
        n = len(pieces[i][0])
        for r in (open_rows[-256:] if packing else ()):
            if free[r] >= n:
                rows[r].append(i)
                free[r] -= n
                if free[r] < min_len:
                    open_rows.remove(r)
                break
        else:
            rows.append([i])
            free.append(seq_len - n)
            if free[-1] >= min_len:
                open_rows.append(len(rows) - 1)
    R = len(rows)
    X = torch.full((R, seq_len), pad_id, dtype=torch.long)
    Y = torch.full((R, seq_len), -1, dtype=torch.long)
    D = torch.full((R, seq_len), -1, dtype=torch.int32)  # -1: padding, its own "document"
    for r, members in enumerate(rows):
        t = 0
        for d, i in enumerate(members):
            x, y = pieces[i]
            X[r, t:t + len(x)] = torch.tensor(x)
            Y[r, t:t + len(y)] = torch.tensor(y)
            D[r, t:t + len(x)] = d
            t += len(x)
    return X, Y, D


def split_eval(items: list, eval_frac: float, seed: int) -> tuple[list, list]:
    """A fixed shuffled split: (train, eval); eval gets round(frac*n) items, at least 1 when frac > 0 and n > 1."""
    idx = list(range(len(items)))
    random.Random(seed).shuffle(idx)
    n_eval = 0 if eval_frac <= 0 or len(items) < 2 else max(1, int(round(eval_frac * len(items))))
    ev = [items[i] for i in idx[:n_eval]]
    tr = [items[i] for i in idx[n_eval:]]
    return tr, ev


# ---------------------------------------------------------------------------------------------------------------
# runtime: device, DDP, progress, metrics, LR
class Dist:
    """torchrun's environment: rank/world/local_rank; `main` says who writes files and prints."""

    def __init__(self, device_arg: str | None):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        dev = device_arg or ("cuda" if torch.cuda.is_available() else "cpu")
        if dev.startswith("cuda"):
            if not torch.cuda.is_available():
                raise ValueError("--device cuda: no CUDA GPU is visible to torch")
            if self.world > 1:
                dev = f"cuda:{self.local_rank}"
            torch.cuda.set_device(torch.device(dev))
        elif dev != "cpu":
            raise ValueError(f"--device must be cpu or cuda, got {dev!r}")
        self.device = torch.device(dev)
        self.main = self.rank == 0
        if self.world > 1 and not torch.distributed.is_initialized():
            from .cli import start_process_group
            start_process_group("nccl" if self.device.type == "cuda" else "gloo")

    def wrap(self, module: nn.Module) -> nn.Module:
        """DDP over the trainable parameters when launched by torchrun with more than one process."""
        if self.world == 1:
            return module
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(module, device_ids=ids, find_unused_parameters=False)

    def shard(self, items: list) -> list:
        return items[self.rank::self.world]

    def _all_reduce(self, x, dtype, op: str):
        t = torch.tensor([x], dtype=dtype, device=self.device)
        torch.distributed.all_reduce(t, op=getattr(torch.distributed.ReduceOp, op))
        return t.item()

    def mean(self, x: float) -> float:
        return x if self.world == 1 else self._all_reduce(x, torch.float64, "SUM") / self.world

    def sum(self, x: float) -> float:
        return x if self.world == 1 else self._all_reduce(x, torch.float64, "SUM")

    def min(self, x: int) -> int:
        return x if self.world == 1 else int(self._all_reduce(x, torch.int64, "MIN"))

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's t (the same shape on each), in rank order, on the CPU."""
        if self.world == 1:
            return [t]
        t = t.to(self.device)
        out = [torch.empty_like(t) for _ in range(self.world)]
        torch.distributed.all_gather(out, t)
        return [o.cpu() for o in out]

    def close(self):
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()  # no rank tears down its connections while rank 0 still saves (as pretrain)
            torch.distributed.destroy_process_group()


class Bar:
    """pyllm.progress bar for a stage (silent on ranks other than 0), with the latest metrics as postfix."""

    def __init__(self, total: int, desc: str, enabled: bool = True, initial: int = 0):
        from .progress import Progress
        self.p = Progress(total=total, desc=desc, unit="step", disable=None if enabled else True, initial=initial)

    def update(self, n: int = 1, **info):
        self.p.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in info.items()})
        self.p.update(n)

    def close(self):
        self.p.close()


class Metrics:
    """Append-only JSONL (one object per logged step, flushed per line); rank 0 only. resume=True with the step
    the run resumes at first drops the rows past it: the interrupted run logged steps after its last checkpoint,
    which the resumed run logs again (they were kept: steps 1..7, 6, 7, 8 in the file and the plots)."""

    def __init__(self, path, enabled: bool = True, resume: bool = False, step: int = 0):
        self.path, self.enabled = Path(path), enabled
        if enabled:  # the directory is made by the first log(): a run that fails before its first step leaves none
            if not resume and self.path.exists():
                self.path.unlink()
            elif resume and self.path.is_file():
                from .data import atomic_write_text
                keep = []
                for line in self.path.read_text().splitlines():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:  # a line cut short by the kill
                        continue
                    # {"step": "x"} was a TypeError traceback on every --resume of the run: dropped like a cut line
                    if isinstance(row, dict) and type(row.get("step")) is int and row["step"] <= step:
                        keep.append(line + "\n")
                atomic_write_text(self.path, "".join(keep))

    def log(self, **row):
        if not self.enabled:
            return
        row = {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in row.items()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as e:
            from .data import named
            raise named(e, self.path) from e


def read_metrics(path) -> list[dict]:
    path = Path(path)
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []


def lr_at(step: int, total: int, lr: float, warmup: int, final_frac: float = 0.0) -> float:
    """Linear warmup then cosine decay to final_frac * lr (nanoGPT's schedule)."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    prog = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * prog)))


def set_lr(opt, lr: float):
    for g in opt.param_groups:
        g["lr"] = lr


def check_adamw(lr: float, weight_decay: float, beta1: float) -> None:
    """The learning rate against what AdamW makes of it, in float32: its first step is lr / (1 - beta1), and its
    decoupled decay multiplies the weights by 1 - lr * weight_decay every step (past 1 it flips their sign each
    step). --lr 3.4e38, or --lr 3e38 --weight-decay 3e38, was torch's "value cannot be converted to type float
    without overflow" traceback from inside the optimizer."""
    from .cli import FLOAT32_MAX
    if lr / (1 - beta1) > FLOAT32_MAX:
        raise ValueError(f"--lr must be <= {FLOAT32_MAX * (1 - beta1):.3g} (AdamW's first step, lr / (1 - beta1 "
                         f"{beta1:g}), must fit a float32), got {lr:g}")
    if lr * weight_decay > 1:
        raise ValueError(f"--lr {lr:g} x --weight-decay {weight_decay:g} must be <= 1 (AdamW multiplies the weights "
                         f"by 1 - lr x weight decay each step), got {lr * weight_decay:g}")


def make_optimizer(params, lr: float, weight_decay: float, betas=(0.9, 0.95), device=None):
    """AdamW; no decay on 1-D parameters (norms, heads' biases), as nanoGPT."""
    check_adamw(lr, weight_decay, betas[0])
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device is not None and torch.device(device).type == "cuda"
    return torch.optim.AdamW(groups, lr=lr, betas=betas, **({"fused": True} if fused else {}))


# ---------------------------------------------------------------------------------------------------------------
# checkpoints: model (merged when LoRA) + adapters + extra tensors + resumable trainer state
def _atomic_text(path: Path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_policy(model_dir, device, tokenizer_path=None):
    """load_checkpoint(dir) -> (GPT on device, tokenizer); the tokenizer may come from --tokenizer instead."""
    from .checkpoint import load_checkpoint
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: model checkpoint directory not found")
    model, tok = load_checkpoint(str(model_dir), dtype=torch.float32)  # an HF bf16/fp16 checkpoint trains in fp32
    if tokenizer_path:
        from .tokenizer import Tokenizer
        given = Tokenizer.load(str(tokenizer_path))
        # a model trained on other ids took it silently; export failed only much later
        if tok is not None and tokenizer_hash(given) != tokenizer_hash(tok):
            raise ValueError(f"{tokenizer_path}: --tokenizer differs from the checkpoint's own tokenizer.json "
                             f"({given.vocab_size} vs {tok.vocab_size} tokens): the model was trained on the other ids "
                             f"(leave --tokenizer out)")
        tok = given
    if tok is None:
        raise ValueError(f"{model_dir}: checkpoint has no tokenizer.json; pass --tokenizer")
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"{model_dir}: tokenizer has {tok.vocab_size} tokens but the model only "
                         f"{model.config.vocab_size}")
    if device.type == "cuda" and hasattr(model, "set_backend"):
        model.set_backend("torch")
    return model.to(device), tok


def check_same_tokenizer(tok, other, path, what: str):
    """A second model fed the policy's token ids (DPO's reference, RL's reward model) must share its tokenizer, else
    it silently reads them as other tokens."""
    if tokenizer_hash(other) != tokenizer_hash(tok):
        raise ValueError(f"{path}: the {what}'s tokenizer differs from the policy's ({other.vocab_size} vs "
                         f"{tok.vocab_size} tokens); it would read the policy's token ids as other tokens")


def check_context(policy_T: int, other_T: int, path, what: str) -> None:
    """The second model reads the policy's sequences (checked against the policy's context): a shorter context
    failed at the first step or after the first rollout, naming neither the flag nor the file."""
    if other_T < policy_T:
        raise ValueError(f"{path}: the {what}'s context (max_seq_len {other_T}) is shorter than the policy's "
                         f"({policy_T}); it could not read the policy's longest sequences")


def plain_copy(model: nn.Module) -> nn.Module:
    """A plain GPT with the same (LoRA-merged) weights, on CPU: what checkpoints and references are made from."""
    from .lora import has_lora, merged_state_dict
    from .model import GPT
    if not has_lora(model):
        import copy
        return copy.deepcopy(model).cpu()
    m = GPT(model.config)
    m.load_state_dict({k: v.cpu() for k, v in merged_state_dict(model).items()})
    return m


def optimizer_tensors(opt) -> tuple[dict, dict]:
    """AdamW state as flat tensors (safetensors holds tensors only) + its JSON side (param groups)."""
    sd = opt.state_dict()
    tensors = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            t = v if isinstance(v, torch.Tensor) else torch.tensor(v)
            tensors[f"opt.{pid}.{k}"] = t.detach().cpu().contiguous()
    groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    for g in groups:
        if isinstance(g.get("betas"), tuple):
            g["betas"] = list(g["betas"])
    return tensors, {"param_groups": groups}


# The param-group settings that change the update. The others (foreach, fused, capturable, differentiable) say how
# it runs on this device: a run started on CPU resumes on CUDA with the fused kernel.
OPT_MATH_KEYS = ("betas", "eps", "weight_decay", "amsgrad", "maximize", "decoupled_weight_decay")


def checked_param_groups(opt, saved, source) -> list[dict]:
    """The param groups to load: the optimizer's own settings with the saved parameter numbering, after checking that
    the saved groups are the same (a resumed run rebuilds its optimizer from the run's own flags, so they can differ
    only in a corrupt or foreign file). Handed to torch unchecked, a hand-edited or damaged trainer_state.json was a
    TypeError/KeyError/AssertionError traceback from inside torch's Adam at the first step, or trained silently with
    "maximize": true or a NaN eps."""
    cur = opt.param_groups
    if not isinstance(saved, list) or len(saved) != len(cur) or not all(isinstance(g, dict) for g in saved):
        raise ValueError(f"{source}: corrupt trainer state (optimizer param_groups: expected a list of {len(cur)} "
                         f"objects)")
    out, n = [], 0
    for i, (g, c) in enumerate(zip(saved, cur)):
        ids, want = g.get("params"), list(range(n, n + len(c["params"])))
        n += len(c["params"])
        if not isinstance(ids, list) or any(type(x) is not int for x in ids):
            raise ValueError(f"{source}: corrupt trainer state (optimizer param group {i}: 'params' must be a list "
                             f"of parameter numbers)")
        if len(ids) != len(want):  # torch's "parameter group that doesn't match the size of optimizer's group"
            raise ValueError(f"{source}: the saved optimizer state does not fit the parameters being trained (group "
                             f"{i} has {len(ids)} parameters, this run {len(want)}: resumed with another "
                             f"--lora-r/--lora-targets, or saved by an older pyllm?)")
        if ids != want:  # torch maps the saved state by these numbers: a wrong one dropped that parameter's moments
            raise ValueError(f"{source}: corrupt trainer state (optimizer param group {i} numbers its parameters "
                             f"{ids[:4]}..., expected {want[:4]}...)")
        for k in OPT_MATH_KEYS:
            if k in g and k in c:
                v, mine = g[k], c[k]
                if isinstance(v, list):
                    v = tuple(v)
                if not (v == mine and type(v) is type(mine) or _same_number(v, mine)):
                    raise ValueError(f"{source}: corrupt trainer state (optimizer param group {i} has {k} {g[k]!r}, "
                                     f"this run's optimizer {mine!r})")
        out.append({**{k: v for k, v in c.items() if k != "params"}, "params": ids})
    return out


def check_adam_state(opt, state: dict, source, prefix: str = "optim", names=None, complete: bool = False) -> None:
    """The saved AdamW state {param number: {step, exp_avg, exp_avg_sq}} before torch takes it: a NaN moment or step
    trained on and saved an all-NaN model with exit status 0 (the loss of the step it poisons is still finite), an
    integer moment was copied in truncated, a parameter with part of its state a KeyError 'exp_avg' from inside
    torch's Adam, a moment of another shape a failure inside the update naming no file. names: how the file names
    parameter number i (FSDP's state is keyed by parameter name). complete: every parameter must have its state
    (pretrain trains all of them from step 1: a state removed restarted its moments silently)."""
    params = [p for g in opt.param_groups for p in g["params"]]  # torch numbers them in this order
    n = len(params)
    if complete:
        for pid in range(n):
            if pid not in state:
                raise ValueError(f"{source}: missing tensor '{prefix}.{names[pid] if names else pid}.exp_avg' "
                                 f"(corrupt trainer state)")
    for pid, st in state.items():
        if type(pid) is not int or not 0 <= pid < n:
            raise ValueError(f"{source}: '{prefix}.{pid}' names no parameter of the {n} being trained")
        label = names[pid] if names else pid
        lack = [k for k in ("step", "exp_avg", "exp_avg_sq") if k not in st]
        if lack:
            raise ValueError(f"{source}: missing tensor '{prefix}.{label}.{lack[0]}' (corrupt trainer state)")
        for name, v in st.items():
            k = f"{prefix}.{label}.{name}"
            if not isinstance(v, torch.Tensor):  # pretrain's JSON scalars: a number, as torch saves a step
                v = torch.tensor(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
                if v is None:
                    raise ValueError(f"{source}: {k!r} is not a number (corrupt trainer state)")
            if v.dtype == torch.bool or (name != "step" and not v.is_floating_point()):
                raise ValueError(f"{source}: tensor {k!r} has dtype {v.dtype}, expected a float tensor")
            if not bool(torch.isfinite(v).all()) or (name in ("step", "exp_avg_sq", "max_exp_avg_sq")
                                                      and bool((v < 0).any())):
                raise ValueError(f"{source}: tensor {k!r} holds NaN, infinite or (a step or squared moment) "
                                 f"negative values (corrupt trainer state)")
            if name != "step" and tuple(v.shape) != tuple(params[pid].shape):
                raise ValueError(f"{source}: tensor {k!r} has shape {tuple(v.shape)}, the parameter "
                                 f"{tuple(params[pid].shape)} (corrupt trainer state)")


def _same_number(a, b) -> bool:
    """0 and 0.0 (JSON keeps an int an int), never True and 1."""
    num = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)  # noqa: E731
    return num(a) and num(b) and a == b


def load_optimizer_tensors(opt, tensors: dict, side: dict, source: str = "trainer_state.safetensors"):
    state: dict = {}
    params = [p for g in opt.param_groups for p in g["params"]]  # torch numbers them in this order
    for k, v in tensors.items():
        if not k.startswith("opt."):
            continue
        _, pid, name = (k.split(".", 2) + ["", ""])[:3]
        if not pid.isdigit() or int(pid) >= len(params) or not name:
            raise ValueError(f"{source}: tensor {k!r} names no parameter of the {len(params)} being trained")
        state.setdefault(int(pid), {})[name] = v
    check_adam_state(opt, state, source, prefix="opt")
    groups = checked_param_groups(opt, side.get("param_groups"), Path(source).with_suffix(".json"))
    try:
        opt.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError) as e:  # torch's "parameter group that doesn't match the size of optimizer's group"
        raise ValueError(f"{source}: the saved optimizer state does not fit the parameters being trained (resumed "
                         f"with another --lora-r/--lora-targets, or saved by an older pyllm?): {e}") from None


KEEP = (".jsonl", ".png", ".txt")  # run outputs (metrics, plots) carried into each new checkpoint directory


def save_stage(out, model: nn.Module, tok, *, step: int, opt=None, state: dict | None = None,
               extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None, base: str | None = None,
               trainer_tensors: dict[str, torch.Tensor] | None = None):
    """One stage checkpoint in `out`: model.safetensors etc. (LoRA merged), adapter files when LoRA, extra
    safetensors files (e.g. the reward head), trainer_state.{safetensors,json}, and the run's metrics/plots.
    Everything is written into save_checkpoint's temporary directory, which then replaces `out` in one rename,
    so a crash mid-save leaves the previous complete checkpoint."""
    import shutil
    from .checkpoint import save_checkpoint
    from .lora import has_lora, save_adapter
    from .safetensors_io import save_file
    out = Path(out)
    tt, side = optimizer_tensors(opt) if opt is not None else ({}, {})
    tt.update({k: v.detach().cpu().contiguous() for k, v in (trainer_tensors or {}).items()})

    def extra_files(tmp: Path):
        if has_lora(model):
            save_adapter(tmp, model, base_model=base)
        for fname, tensors in (extra_tensors or {}).items():
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / fname)
        save_file(tt if tt else {"step": torch.tensor([step])}, tmp / "trainer_state.safetensors")
        _atomic_text(tmp / "trainer_state.json", json.dumps({"step": step, "optimizer": side, "world_size": int(
            os.environ.get("WORLD_SIZE", "1")), **(state or {})}, indent=1) + "\n")
        if out.is_dir():
            for f in out.iterdir():
                if f.is_file() and f.suffix in KEEP and not (tmp / f.name).exists():
                    shutil.copy2(f, tmp / f.name)

    plain = plain_copy(model)
    check_finite_weights([*plain.state_dict().items(), *((k, v) for t in (extra_tensors or {}).values()
                                                         for k, v in t.items())], step)
    save_checkpoint(out, plain, tok, extra={"stage": (state or {}).get("stage"), "step": step},
                    extra_files=extra_files)


def check_finite_weights(named_tensors, step: int) -> None:
    """Before a save: weights that an update made NaN or infinite are an error, not a checkpoint. The gradient-norm
    check (clip_and_step) stops a diverged loss before its update, but not one huge update from a finite gradient:
    a 1-step run at --lr 1e308 (or --weight-decay 1e308, before those were bounded) saved an all-inf model and
    exited 0."""
    for name, t in named_tensors:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"step {step}: {name} holds NaN or inf after the update (training diverged: lower --lr "
                             f"or --weight-decay); not saved (the last saved checkpoint is kept)")


def load_trainer_state(out) -> tuple[dict, dict] | None:
    """(json side, tensors) of out/trainer_state.*, or None when out has no resumable state."""
    from .safetensors_io import load_file
    out = Path(out)
    if not (out / "trainer_state.json").exists():
        return None
    tj = out / "trainer_state.json"
    from .data import read_json
    side = read_json(tj, "corrupt trainer state")
    if not (isinstance(side, dict) and isinstance(side.get("step"), int) and not isinstance(side["step"], bool)
            and side["step"] >= 0 and isinstance(side.get("optimizer"), dict)):
        raise ValueError(f"{tj}: corrupt trainer state (expected an object with an integer 'step' >= 0 and "
                         f"'optimizer')")
    return side, load_file(str(out / "trainer_state.safetensors"))


def resume_step(side: dict, steps: int, out) -> int:
    """The saved step to continue from; past this run's step count, or saved by another number of processes, is an
    error (a resumed run with fewer --steps did nothing and exited 0, its progress bar at 200%)."""
    world, saved = int(os.environ.get("WORLD_SIZE", "1")), side.get("world_size", None)
    if saved is not None and (type(saved) is not int or saved < 1):
        raise ValueError(f"{Path(out) / 'trainer_state.json'}: corrupt trainer state (world_size {saved!r})")
    # a step is --batch-size rows per process: on another number of processes the step count, the rows each step
    # takes (the data order) and the sampling seeds are another run's, and resuming went on silently with them
    if saved is not None and saved != world:
        how = "as one process, without torchrun" if saved == 1 else f"with torchrun --nproc-per-node {saved}"
        raise ValueError(f"{out}: the run was saved by {saved} process(es), this resume runs {world} (each takes "
                         f"--batch-size a step: the steps and data order would change); resume it {how}")
    if side["step"] > steps:
        raise ValueError(f"{out}: the saved run is at step {side['step']}, past this run's {steps} steps; raise "
                         f"--steps (or --epochs) to continue it")
    return side["step"]


DEFAULT_LR = (1e-4, 1e-3)  # --lr when not given: (full fine-tuning, LoRA)


def add_common_args(p, lora: bool = True, default_lr: tuple | None = None, evals: bool = True):
    """Flags every assistant stage shares (TRL/nanoGPT names where they exist). default_lr: the stage's (full
    fine-tuning, LoRA) learning rates when --lr is not given, for --help. evals=False: a stage with no held-out
    evaluation (rl) does not offer --eval-frac/--eval-every, which it would ignore."""
    p.add_argument("--out", required=True, help="output checkpoint directory (created; resumable)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json to use instead of the checkpoint's")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="device (default: cuda if available)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate" + (
        f" (default: {default_lr[0]:g}; {default_lr[1]:g} with --lora-r)" if default_lr else ""))
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (not on 1-D params)")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear LR warmup steps")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the global grad norm (0 = off)")
    p.add_argument("--batch-size", type=int, default=8, help="rows (or pairs/prompts) per step per process")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps (0 = --epochs over the data)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the training data when --steps is 0")
    p.add_argument("--seed", type=int, default=1337, help="data order / sampling seed")
    if evals:
        p.add_argument("--eval-frac", type=float, default=0.05, help="held-out fraction of the data for eval")
        p.add_argument("--eval-every", type=int, default=50, help="evaluate every N steps (and at the end)")
    p.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (and at the end)")
    p.add_argument("--log-every", type=int, default=1, help="write a metrics line every N steps")
    p.add_argument("--resume", action="store_true", help="continue from the trainer state in --out")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip (and count) bad data lines instead of "
                                                                  "stopping at the first")
    if lora:
        p.add_argument("--lora-r", type=int, default=0, help="LoRA rank (0 = full fine-tuning)")
        p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default 2*r)")
        p.add_argument("--lora-targets", default=None,
                       help="comma-separated modules for LoRA (default q_proj,k_proj,v_proj,o_proj,gate_proj,"
                            "up_proj,down_proj)")


# the smallest value each count flag can run with (getattr: a stage without the flag skips it)
MIN_FLAGS = {"batch_size": 1, "steps": 0, "warmup_steps": 0, "eval_every": 1, "save_every": 1, "log_every": 1,
             "seq_len": 0, "num_samples": 0, "max_new_tokens": 1, "ppo_epochs": 1, "minibatches": 1,
             "prefilter_samples": 0, "top_k": 0}


# float flags' ranges, (low, high, low excluded): a value outside trained silently wrong (a negative --grad-clip
# meant "off", a negative --hard-prompts meant "off", --gamma 2 made returns grow) rather than failing. --hard-prompts
# past 20 draws the hardest prompts only already ((0.55 / 0.15) ** 20 = 2e11), and from ~34 (1.05 - p) ** a
# underflows float32 to 0: --hard-prompts 1e9 was torch.multinomial's "invalid multinomial distribution" traceback
FLOAT_RANGES = {"weight_decay": (0.0, None, False), "grad_clip": (0.0, None, False), "lr": (0.0, None, True),
                "lora_alpha": (0.0, None, True), "kl_coef": (0.0, None, False), "clip_range": (0.0, None, True),
                "clip_range_value": (0.0, None, True), "vf_coef": (0.0, None, False), "gamma": (0.0, 1.0, False),
                "lam": (0.0, 1.0, False), "reward_clip": (0.0, None, False), "temperature": (0.0, None, False),
                "rft_hard_weight": (0.0, None, False), "rft_neg_mode": (0.0, None, False),
                "hard_prompts": (0.0, 20.0, False), "beta": (0.0, None, True)}


def check_float_ranges(args, ranges: dict = FLOAT_RANGES):
    """A one-line error for the first float flag of `ranges` outside its range (flags the stage lacks, or left
    at None = its default, are skipped)."""
    from .ops import check_float
    for name, (lo, hi, lo_open) in ranges.items():
        v = getattr(args, name, None)
        if v is not None:
            check_float(v, f"--{name.replace('_', '-')}", lo, hi, lo_open=lo_open)


def check_common_args(args):
    """Every stage calls this first: a flag value it cannot run with is a one-line error naming the flag, not a
    ZeroDivisionError mid-run or a run that silently trains nothing."""
    for name, lo in MIN_FLAGS.items():
        v = getattr(args, name, None)
        if v is not None and v < lo:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {lo}, got {v}")
    if getattr(args, "top_k", 0) > 2 ** 31 - 1:  # was generate's "top_k: must be in ...", after the models loaded
        raise ValueError(f"--top-k must be <= {2 ** 31 - 1} (0 = off), got {args.top_k}")
    if not args.epochs > 0:
        raise ValueError(f"--epochs must be > 0, got {args.epochs}")
    if not 0 <= args.seed < 2 ** 63:
        raise ValueError(f"--seed must be in [0, 2^63), got {args.seed}")
    if not 0 <= getattr(args, "eval_frac", 0) < 1:
        raise ValueError(f"--eval-frac must be in [0, 1), got {args.eval_frac}")
    ev, tr = getattr(args, "eval_data", None), getattr(args, "data", None)
    if ev and tr and os.path.exists(ev) and os.path.realpath(ev) == os.path.realpath(tr):
        raise ValueError(f"--eval-data {ev}: is the --data file; the eval loss would be measured on training data "
                         f"(leave it out to hold out --eval-frac of --data)")
    check_float_ranges(args)
    out = getattr(args, "out", None)
    if out is not None and Path(out).exists() and not Path(out).is_dir():  # before the run, not at its first save
        raise ValueError(f"{out}: File exists and is not a directory")


def check_step_size(flags: str, n_seqs: int, n_tokens: int) -> None:
    """One step runs n_seqs sequences of at least n_tokens tokens each through the model at once; the kernels' row
    counts are C ints, so past 2^31 - 1 tokens it cannot run. A --batch-size of 2^31 (or 2^64) was taken: the run
    spent its time building the step's rows (sft: an epoch shuffle per 2 rows) and never trained, or asked torch for
    terabytes (rl --num-samples: "can't allocate memory" traceback)."""
    from .ops import INT_MAX
    if n_seqs * n_tokens > INT_MAX:
        raise ValueError(f"{flags}: one step would run {n_seqs} sequences of {n_tokens}+ tokens at once, more than "
                         f"the kernels' 2^31 - 1 tokens; lower it")


def prepare_model(args, dist: "Dist", resume_dir=None):
    """Load --model (or the resume checkpoint) onto the device and add LoRA adapters when asked."""
    from .lora import apply_lora, load_adapter
    lora_r = getattr(args, "lora_r", 0)
    resume = resume_dir is not None and (Path(resume_dir) / "trainer_state.json").exists()
    if resume and not lora_r:
        model, tok = load_policy(resume_dir, dist.device, args.tokenizer)
    else:
        model, tok = load_policy(args.model, dist.device, args.tokenizer)
        if lora_r:
            if resume:
                load_adapter(model, resume_dir, r=lora_r)
            else:
                apply_lora(model, lora_r, args.lora_alpha, args.lora_targets, verbose=dist.main)
            model.to(dist.device)
    return model, tok


# Flags a resumed run may change when given (how it is run, watched and saved); every other flag is the run itself.
RESUME_FREE = {"device", "backend", "dtype", "fsdp", "eval_every", "eval_batches", "eval_data", "sample_tokens",
               "checkpoint_every", "keep_checkpoints", "peak_flops", "save_every", "log_every", "skip_bad_lines",
               "max_steps", "steps", "tokenizer"}


RESUME_ONCE = {"stop_at", "eval_at_start"}  # belong to one invocation: neither restored nor compared


def _abs_path(v):
    """A value that names a file, made absolute (a `file.py:function` spec's file part too), so a resume from another
    directory compares and restores the same file; (absolute form, whether it names something that exists)."""
    if not isinstance(v, str) or not v:
        return v, False
    path, fn = v, ""
    if ".py:" in v:  # --reward-fn file.py:function
        path, fn = v.rsplit(":", 1)
        fn = ":" + fn
    if not os.path.exists(path):
        return v, False
    return os.path.realpath(path) + fn, True


def run_args(args) -> dict:
    """The flags as a run saves them (JSON values; a path that exists made absolute)."""
    out = {}
    for k, v in vars(args).items():
        if k.startswith("_") or k in ("command", "out", "resume"):
            continue
        if isinstance(v, Path):
            v = str(v)
        v = _abs_path(v)[0]
        if isinstance(v, (str, int, float, bool, list, type(None))):
            out[k] = v
    return out


def _same_setting(old, new) -> bool:
    """Equal, or the same file: relative or absolute, from any directory. A saved path that no longer exists cannot
    be compared (the run's input moved or went; what the resume loads comes from --out), so it is not a change."""
    if old == new:
        return True
    if isinstance(old, str) and isinstance(new, str):
        o, o_exists = _abs_path(old)
        n, _ = _abs_path(new)
        return o == n or (os.path.isabs(old) and not o_exists)  # saved absolute (an existing path), since gone
    return False


def check_lora_flags(args) -> None:
    if not getattr(args, "lora_r", 0) and (getattr(args, "lora_alpha", None) is not None or
                                           getattr(args, "lora_targets", None) is not None):
        # these did nothing without a rank: the run fine-tuned every weight, without a word
        raise ValueError("--lora-alpha/--lora-targets need --lora-r (the LoRA rank; 0 = full fine-tuning)")


def resume_args(args, saved, where, check=None) -> None:
    """--resume continues the run as it was started: a flag left out takes the run's saved value (the defaults
    restarted the warmup, changed the batch and the schedule's length); a flag given with another value is an error,
    except the operational ones in RESUME_FREE. Runs saved before the flags were kept (no "args") resume as given.
    check(args): the stage's flag checks, run again on the restored values (the given ones passed them already)."""
    if not isinstance(saved, dict):
        return
    given = getattr(args, "_given", None)  # None (a library call): every flag counts as given
    cur = run_args(args)
    changed, restored = [], []
    for k, old in saved.items():
        if k not in cur or k in RESUME_ONCE or _same_setting(old, cur[k]):
            continue
        if given is not None and k not in given:
            value, bad = _saved_value(getattr(args, "_parser", None), k, old)
            if bad:
                raise ValueError(f"{Path(where) / 'trainer_state.json'}: corrupt trainer state (the run's saved "
                                 f"--{k.replace('_', '-')} {old!r} {bad})")
            setattr(args, k, value)
            restored.append(k)
        elif k not in RESUME_FREE:
            changed.append(f"--{k.replace('_', '-')} {old!r} -> {cur[k]!r}")
    if changed:
        raise ValueError(f"{where}: --resume continues the run with its own settings, and this command changes "
                         f"{', '.join(changed)} (leave them out, or start a new run in another --out)")
    if restored and check is not None:
        try:  # a saved "save_every": 0 was a ZeroDivisionError mid-run, a "grad_clip": -1 trained on silently
            check(args)
        except ValueError as e:
            raise ValueError(f"{Path(where) / 'trainer_state.json'}: corrupt trainer state (the run's saved "
                             f"settings: {e})") from None
    if restored and int(os.environ.get("RANK", "0")) == 0:
        print(f"{where}: resuming with the run's " + " ".join(_flag_text(k, saved[k]) for k in restored),
              file=sys.stderr)


def _saved_value(parser, dest: str, v):
    """(the value, None), or (None, why) a saved flag value is not one the command line could have given: restored
    unchecked, a "batch_size": "x" or a "seed": 1.5 was a TypeError traceback mid-run, a "skip_bad_lines": "x" a
    switch silently on. Parsed as argparse would parse its text (the flag's type and choices: a float flag's 2**64
    is the float argparse makes of it, not an int too big for the kernels); a switch takes true or false."""
    action = next((a for a in (parser._actions if parser is not None else ()) if a.dest == dest), None)
    if action is None:  # a library call (no parser): nothing to compare with
        return v, None
    if action.nargs == 0:  # store_true / store_false
        return (v, None) if isinstance(v, bool) else (None, "is not true or false")
    if v is None:
        return (None, None) if action.default is None else (None, "is null, and the flag takes a value")
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        return None, "is not a value of that flag"
    try:
        parsed = (action.type or str)(str(v))
    except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
        return None, f"is not a value of that flag ({e})"
    if parsed != v:  # "5" for an int flag, 5 for a path
        return None, "is not a value of that flag"
    if action.choices is not None and parsed not in action.choices:
        return None, f"is not one of {', '.join(map(str, action.choices))}"
    return parsed, None


def _flag_text(k: str, v) -> str:
    flag = "--" + k.replace("_", "-")
    if isinstance(v, bool):  # a switch: "--no-packing", not "--no-packing True"
        return flag if v else f"(no {flag})"
    return f"{flag} {v}"


def resume_state(args, stage: str | None = None):
    """The trainer state to continue from (None when starting fresh); --resume without state, or with another
    stage's state (its optimizer and step count would be taken over silently), is an error."""
    from .checkpoint import recover_interrupted_save
    recover_interrupted_save(args.out)  # a save killed mid-way: its leftovers removed, or the previous one put back
    st = load_trainer_state(args.out) if args.resume else None
    if args.resume and st is None:
        raise FileNotFoundError(f"{args.out}: --resume but no trainer_state.json there")
    found = st[0].get("stage") if st else None
    if stage and found not in (None, stage):
        raise ValueError(f"{args.out}: holds a `pyllm {found}` run; `pyllm {stage} --resume` continues only its own "
                         f"runs (use another --out)")
    if st:
        resume_args(args, st[0].get("args"), args.out, check=check_common_args)
    check_lora_flags(args)  # after the run's own LoRA flags are restored
    inputs = [("--policy" if stage == "rl" else "--model", getattr(args, "model", None))]
    inputs += [(f, getattr(args, a, None))
               for f, a in (("--reward-model", "reward_model"), ("--ref-model", "ref_model"))]
    check_out_dir(args.out, inputs, stage)
    if not args.resume and (Path(args.out) / "trainer_state.json").exists():
        print(f"{args.out}: existing checkpoint will be overwritten (pass --resume to continue it)",
              file=sys.stderr)
    return st


def check_out_dir(out, inputs=(), stage: str | None = None) -> None:
    """Before any work: --out is replaced as a whole by each save (save_checkpoint's swap keeps only the run's
    metrics and plots), so it must be new, empty, or a checkpoint of this stage's runs. A project directory (notes
    and code deleted), a pretraining run's directory (its ckpt_* and `latest` deleted), a model the run reads
    (inputs: (flag, path); `rl --out` = its --reward-model replaced the reward model by the policy), another stage's
    run, or `.` (a whole run trained, then "'.' has an empty name") were each accepted."""
    out = Path(out)
    where = out.resolve()
    if where == Path.cwd().resolve() or where in Path.cwd().resolve().parents:
        raise ValueError(f"--out {out}: is the current directory or holds it; name a new directory for the run")
    for flag, path in inputs:
        if path is not None and Path(path).exists() and where == Path(path).resolve():
            what = "starts from" if flag in ("--model", "--policy") else "reads"
            raise ValueError(f"--out {out}: is the {flag} it {what} (each save replaces --out); use a new directory")
    if stage and (out / "trainer_state.json").is_file():
        try:
            found = json.loads((out / "trainer_state.json").read_text()).get("stage")
        except (OSError, ValueError, AttributeError):  # unreadable: --resume says so; a fresh run replaces it
            found = None
        if found not in (None, stage):
            raise ValueError(f"--out {out}: holds a `pyllm {found}` run; `pyllm {stage}` replaces only its own "
                             f"runs (use another --out)")
    if out.is_dir() and not (out / "trainer_state.json").is_file():  # (a file: check_common_args said so)
        # a run's own logs (stopped before its first save): metrics.jsonl and its plots; a folder of data
        # (train.jsonl, corpus.txt) was taken for one, its files then carried into every checkpoint
        held = sorted(f.name for f in out.iterdir() if not (f.is_file() and (f.name == "metrics.jsonl" or
                                                                            f.suffix == ".png")))
        if held:
            shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
            raise ValueError(f"--out {out}: exists and is not a stage checkpoint (it holds {shown}); each save "
                             f"replaces --out as a whole, so name a new or empty directory")


def step_items(items: list, step: int, per_step: int, seed: int, dist: "Dist") -> list:
    """This rank's share of step `step`'s items: one shuffle per epoch seeded by seed + epoch and read in order, so a
    resumed run continues the same sequence (per_step may exceed len(items)). A step that straddles epochs takes
    the next epoch's first items from that epoch's shuffle (wrapping into the same one showed its first items twice
    in an epoch and skipped the next epoch's first items: --epochs 2 did not show every item twice)."""
    n = len(items)
    start, stop = step * per_step, (step + 1) * per_step
    picked: list = []
    for epoch in range(start // n, (stop - 1) // n + 1):
        g = torch.Generator()
        g.manual_seed(seed + epoch)
        perm = torch.randperm(n, generator=g).tolist()
        picked += perm[max(start - epoch * n, 0):min(stop - epoch * n, n)]
    return [items[i] for i in picked[dist.rank::dist.world]]


def clip_and_step(opt, params, grad_clip: float, step: int | None = None, lower: str = "--lr") -> float:
    """Clip, then step. A non-finite gradient norm (a diverged loss) stops the run before the update, as pretrain
    does: an all-NaN model was saved and the run exited 0 (and a --resume of a good run replaced it). step: the
    step about to be taken, for the message; lower: the flags the message says to lower (dpo: its --beta too,
    which scales every gradient: --beta 1e19 blamed --lr alone)."""
    gn = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    if not math.isfinite(float(gn)):
        at = f" at step {step}" if step is not None else ""
        raise ValueError(f"gradient norm is {float(gn)}{at} (the loss diverged); lower {lower} or check the data "
                         f"(the last saved checkpoint is kept)")
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(gn)


# ---------------------------------------------------------------------------------------------------------------
# SFT
def add_arguments(p):
    p.add_argument("--model", required=True, help="base checkpoint directory (pyllm pretrain output)")
    p.add_argument("--data", required=True, help="JSONL of {'messages': [...]} or {'prompt', 'completion'}")
    p.add_argument("--eval-data", default=None, help="held-out JSONL (default: --eval-frac of --data)")
    p.add_argument("--seq-len", type=int, default=0, help="row length (default: the model's max_seq_len)")
    p.add_argument("--train-on-prompt", action="store_true", help="also train on system/user tokens")
    p.add_argument("--no-packing", action="store_true", help="one conversation per row (padded)")
    add_common_args(p, default_lr=DEFAULT_LR)


def load_sft_data(path, tok, seq_len: int, skip_bad: bool):
    def parse(obj, where):
        return render_checked(parse_conversation(obj, where), tok, where, seq_len + 1)
    return read_jsonl(path, parse, skip_bad, "conversation")[0]


@torch.no_grad()
def eval_loss(model, rows, device, batch_size: int) -> float:
    """Token-weighted mean loss over rows (X, Y, D)."""
    X, Y, D = rows
    model.eval()
    tot, n = 0.0, 0
    for i in range(0, X.shape[0], batch_size):
        y = Y[i:i + batch_size].to(device)
        k = int((y >= 0).sum())
        if k == 0:
            continue
        _, loss = model(X[i:i + batch_size].to(device), targets=y, doc_ids=D[i:i + batch_size].to(device))[:2]
        tot += float(loss) * k
        n += k
    model.train()
    return tot / max(n, 1)


def main(args) -> int:
    check_common_args(args)
    dist = Dist(args.device)
    st = resume_state(args, "sft")
    torch.manual_seed(args.seed)  # after resume_state: a resumed run's own --seed
    model, tok = prepare_model(args, dist, args.out if st else None)
    T = args.seq_len or model.config.max_seq_len
    if T > model.config.max_seq_len:
        raise ValueError(f"--seq-len {T} exceeds the model's max_seq_len {model.config.max_seq_len}")
    convs = load_sft_data(args.data, tok, T, args.skip_bad_lines)
    if args.eval_data:
        train, ev = convs, load_sft_data(args.eval_data, tok, T, args.skip_bad_lines)
    else:
        train, ev = split_eval(convs, args.eval_frac, args.seed)
    pad = tok.special_ids.get("<|pad|>", 0) if hasattr(tok, "special_ids") else 0
    rows = pack_rows(train, T, pad, args.train_on_prompt, not args.no_packing)
    erows = pack_rows(ev, T, pad, args.train_on_prompt, not args.no_packing) if ev else None
    n_rows = rows[0].shape[0]
    check_step_size(f"--batch-size {args.batch_size}", args.batch_size, T)
    per_step = args.batch_size * dist.world
    steps = args.steps or max(1, math.ceil(args.epochs * n_rows / per_step))
    if dist.main:
        print(f"sft: {len(train)} train / {len(ev)} eval conversations -> {n_rows} packed rows of {T}; "
              f"{steps} steps of {per_step} rows")
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.lora_r != 0]
    opt = make_optimizer(model.parameters(), lr, args.weight_decay, device=dist.device)
    step = 0
    if st:
        side, tens = st
        load_optimizer_tensors(opt, tens, side["optimizer"], f"{args.out}/trainer_state.safetensors")
        step = resume_step(side, steps, args.out)
        if dist.main:
            print(f"sft: resuming at step {step}")
    dmodel = dist.wrap(model)
    metrics = Metrics(Path(args.out) / "metrics.jsonl", dist.main, resume=bool(st), step=step)
    bar = Bar(steps, "sft", dist.main, initial=step)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    while step < steps:
        # the data order is a function of (seed, epoch), so --resume continues at the same row
        idx = torch.tensor(step_items(range(n_rows), step, per_step, args.seed, dist), dtype=torch.long)
        x, y, d = (t[idx].to(dist.device) for t in rows)
        set_lr(opt, lr_at(step, steps, lr, args.warmup_steps))
        _, loss = dmodel(x, targets=y, doc_ids=d)[:2]
        # DDP averages the ranks' gradients: weighting each rank's token mean by its share of the step's target
        # tokens makes the update the mean over all of them, as one process with the whole batch computes it
        n_tok = int((y >= 0).sum())
        n_all = dist.sum(n_tok)
        share = dist.world * n_tok / max(n_all, 1)
        (loss * share).backward()
        gn = clip_and_step(opt, params, args.grad_clip, step + 1)
        step += 1
        row = {"step": step, "loss": dist.mean(loss.item() * share), "lr": opt.param_groups[0]["lr"],
               "grad_norm": gn, "tokens": int(n_all)}
        if erows is not None and (step % args.eval_every == 0 or step == steps):
            row["eval_loss"] = eval_loss(model, erows, dist.device, args.batch_size)
        if step % args.log_every == 0 or "eval_loss" in row:
            metrics.log(**row)
        bar.update(1, loss=row["loss"])
        if dist.main and (step % args.save_every == 0 or step == steps):
            save_stage(args.out, model, tok, step=step, opt=opt, base=str(args.model),
                       state={"stage": "sft", "steps": steps, "args": run_args(args)})
    bar.close()
    if dist.main:
        print(f"sft: saved {args.out} (step {step})")
    dist.close()
    return 0


if __name__ == "__main__":  # python -m pyllm.sft ... == pyllm <command> ...
    from .cli import module_main
    raise SystemExit(module_main(__spec__.name))
