"""Stage 3, reward modeling: `pyllm reward --model sft/ --data prefs.jsonl --out rm/` (tests/test_reward.py).

Data: preference JSONL as TRL's RewardTrainer takes it: {"prompt": str|messages, "chosen": str|messages,
"rejected": str|messages, "margin": float (optional)}; a string prompt is one user turn, a string answer one
assistant turn. The model is the SFT transformer plus a scalar head (C -> 1) read at the LAST REAL token of each
sequence: the index comes from the attention mask, and padding gets its own doc id so real tokens never attend
to it, so left and right padding give the same reward. Loss: Bradley-Terry, -logsigmoid(r_chosen - r_rejected -
margin). Saved as a normal checkpoint directory plus reward_head.safetensors (weight (1, C), bias (1)).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .sft import (BadLine, Bar, Dist, Metrics, add_common_args, as_messages, check_common_args, check_step_size,
                  clip_and_step, load_optimizer_tensors, lr_at, make_optimizer, prepare_model, read_jsonl,
                  render_checked, resume_state, resume_step, run_args, save_stage, set_lr, split_eval, step_items)

HEAD_FILE = "reward_head.safetensors"


class RewardModel(nn.Module):
    """GPT trunk + linear head on the final-norm hidden state of the last real token."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.head = nn.Linear(model.config.dim, 1)
        nn.init.normal_(self.head.weight, std=1.0 / math.sqrt(model.config.dim + 1))
        nn.init.zeros_(self.head.bias)
        # the Bradley-Terry loss sees only r_chosen - r_rejected, so the bias gets no gradient but rounding noise,
        # which AdamW turned into steps of ~lr: the offset of every reward wandered, with the rank count too
        self.head.bias.requires_grad_(False)
        lm_head = getattr(model, "lm_head", None)
        if isinstance(lm_head, nn.Module) and lm_head.weight is not getattr(model.embed_tokens, "weight", None):
            lm_head.weight.requires_grad_(False)  # the LM logits feed no reward loss (and DDP wants no idle params)

    def forward(self, idx: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """idx (B, T) int64, attention_mask (B, T) 1 on real tokens (left or right padded) -> rewards (B,)."""
        if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(idx.shape):
            raise ValueError(f"reward model attention_mask: expected shape {tuple(idx.shape)} (as idx), got "
                             f"{tuple(getattr(attention_mask, 'shape', ())) or type(attention_mask).__name__}")
        m = attention_mask.long()
        if bool((m.sum(1) == 0).any()):
            raise ValueError("reward model: a row has no real tokens")
        # padding is its own document (id 0), so real tokens (id 1) never attend to it whichever side it sits
        _, _, h = self.model(idx, doc_ids=m.to(torch.int32), return_hidden=True)  # h (B, T, C)
        T = idx.shape[1]
        last = (torch.arange(T, device=idx.device)[None, :] * m).argmax(1)  # (B,) index of the last real token
        hl = h[torch.arange(idx.shape[0], device=idx.device), last]          # (B, C)
        return self.head(hl.float()).squeeze(-1)

    def head_tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.head.weight.detach().cpu(), "bias": self.head.bias.detach().cpu()}

    def load_head(self, path):
        from .safetensors_io import load_into
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no reward head (is this a `pyllm reward` checkpoint?)")
        load_into(path, self.head)  # names, shapes (the model width) and dtype checked, one line naming the file


def pad_batch(seqs: list[list[int]], pad_id: int, side: str = "right", device=None):
    """seqs -> idx (B, T) int64 and attention_mask (B, T) int64 (1 = real), padded on `side`."""
    T = max(len(s) for s in seqs)
    idx = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
        idx[i, sl] = torch.tensor(s, dtype=torch.long)
        mask[i, sl] = 1
    return idx.to(device), mask.to(device)


def pad_id_of(tok) -> int:
    return getattr(tok, "special_ids", {}).get("<|pad|>", 0)


def load_reward_model(path, device, tokenizer_path=None):
    """A `pyllm reward` output dir -> (RewardModel on device, tokenizer)."""
    from .sft import load_policy
    model, tok = load_policy(path, device, tokenizer_path)
    rm = RewardModel(model).to(device)
    rm.load_head(Path(path) / HEAD_FILE)
    return rm, tok


@torch.no_grad()
def score_ids(rm: RewardModel, seqs: list[list[int]], pad_id: int, device, batch_size: int = 16) -> torch.Tensor:
    rm.eval()
    out = []
    for i in range(0, len(seqs), batch_size):
        idx, m = pad_batch(seqs[i:i + batch_size], pad_id, "right", device)
        out.append(rm(idx, m).float().cpu())
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------------------------
# preference data (shared with DPO)
def parse_preference(obj: dict, where: str):
    """-> (prompt_msgs, chosen_msgs, rejected_msgs, margin) with the bad-input checks."""
    for k in ("prompt", "chosen", "rejected"):
        if k not in obj:
            raise BadLine(f"{where}: missing '{k}' (expected prompt, chosen, rejected)")
    prompt = as_messages(obj["prompt"], where, "prompt", "user")
    chosen = as_messages(obj["chosen"], where, "chosen", "assistant")
    rejected = as_messages(obj["rejected"], where, "rejected", "assistant")
    for k, msgs in (("chosen", chosen), ("rejected", rejected)):  # DPO's loss masks were all zero: it trained on
        if not any(m["role"] == "assistant" for m in msgs):          # nothing and exited 0
            raise BadLine(f"{where}: '{k}' has no assistant turn (it is the reply being compared)")
    if chosen == rejected:
        raise BadLine(f"{where}: chosen and rejected are identical (no preference to learn)")
    margin = obj.get("margin", 0.0)
    if not isinstance(margin, (int, float)) or isinstance(margin, bool) or not math.isfinite(margin):
        raise BadLine(f"{where}: margin must be a finite number, got {margin!r}")
    return prompt, chosen, rejected, float(margin)


def load_preferences(path, tok, max_len: int, skip_bad: bool, with_masks: bool = False):
    """[(chosen_ids, rejected_ids, margin)] (+ loss masks when with_masks) rendered and length-checked."""
    def parse(obj, where):
        p, c, r, margin = parse_preference(obj, where)
        ic, mc = render_checked(p + c, tok, where, max_len)
        ir, mr = render_checked(p + r, tok, where, max_len)
        return (ic, ir, margin, mc, mr) if with_masks else (ic, ir, margin)
    return read_jsonl(path, parse, skip_bad, "preference")[0]


# ---------------------------------------------------------------------------------------------------------------
DEFAULT_LR = (1e-4, 1e-3)  # --lr when not given: (full fine-tuning, LoRA)


def add_arguments(p):
    p.add_argument("--model", required=True, help="SFT checkpoint directory the reward model starts from")
    p.add_argument("--data", required=True, help="preference JSONL {prompt, chosen, rejected[, margin]}")
    p.add_argument("--eval-data", default=None, help="held-out preference JSONL (default: --eval-frac of --data)")
    add_common_args(p, default_lr=DEFAULT_LR)


@torch.no_grad()
def evaluate(rm, pairs, pad_id, device, batch_size) -> dict:
    """Held-out accuracy (r_chosen > r_rejected) and mean margin r_chosen - r_rejected."""
    if not pairs:
        return {}
    rc = score_ids(rm, [p[0] for p in pairs], pad_id, device, batch_size)
    rr = score_ids(rm, [p[1] for p in pairs], pad_id, device, batch_size)
    rm.train()
    return {"eval_accuracy": float((rc > rr).float().mean()), "eval_margin": float((rc - rr).mean())}


def bradley_terry_loss(rc, rr, margin):
    """-log sigmoid(r_chosen - r_rejected - margin), the batch mean (Llama 2's margin: a pair marked more clearly
    preferred must be separated by more)."""
    return -F.logsigmoid(rc - rr - margin).mean()


def pair_training_setup(args, dist, module, st, load_pairs, tok, T: int, default_lr: tuple):
    """What the pairwise stages (reward, dpo) share before their loop -> (train, eval, pairs per step, steps, lr,
    optimizer, start step). default_lr: (full fine-tuning, LoRA) when --lr is not given."""
    pairs = load_pairs(args.data, tok, T, args.skip_bad_lines)
    if args.eval_data:
        train, ev = pairs, load_pairs(args.eval_data, tok, T, args.skip_bad_lines)
    else:
        train, ev = split_eval(pairs, args.eval_frac, args.seed)
    check_step_size(f"--batch-size {args.batch_size}", args.batch_size, 2)
    per_step = args.batch_size * dist.world
    steps = args.steps or max(1, math.ceil(args.epochs * len(train) / per_step))
    lr = args.lr if args.lr is not None else default_lr[args.lora_r != 0]
    opt = make_optimizer(module.parameters(), lr, args.weight_decay, device=dist.device)
    step = 0
    if st:
        load_optimizer_tensors(opt, st[1], st[0]["optimizer"], f"{args.out}/trainer_state.safetensors")
        step = resume_step(st[0], steps, args.out)
    return train, ev, per_step, steps, lr, opt, step


def main(args) -> int:
    check_common_args(args)
    from .lora import parse_targets
    if args.lora_r and "lm_head" in parse_targets(args.lora_targets):  # was a RuntimeError traceback
        raise ValueError("--lora-targets lm_head: a reward model never reads the LM head (its score is a head on the "
                         "final hidden state), so adapters there would not train; leave lm_head out")
    dist = Dist(args.device)
    st = resume_state(args, "reward")
    torch.manual_seed(args.seed)  # after resume_state: a resumed run's own --seed
    model, tok = prepare_model(args, dist, args.out if st else None)
    rm = RewardModel(model).to(dist.device)
    if st:
        rm.load_head(Path(args.out) / HEAD_FILE)
    train, ev, per_step, steps, lr, opt, step = pair_training_setup(args, dist, rm, st, load_preferences, tok,
                                                                    model.config.max_seq_len, DEFAULT_LR)
    pad = pad_id_of(tok)
    if dist.main:
        print(f"reward: {len(train)} train / {len(ev)} eval pairs; {steps} steps of {per_step} pairs"
              + (f"; resuming at step {step}" if st else ""))
    drm = dist.wrap(rm)
    metrics = Metrics(Path(args.out) / "metrics.jsonl", dist.main, resume=bool(st), step=step)
    bar = Bar(steps, "reward", dist.main, initial=step)
    params = [p for p in rm.parameters() if p.requires_grad]
    rm.train()
    while step < steps:
        batch = step_items(train, step, per_step, args.seed, dist)
        B = len(batch)
        idx, m = pad_batch([b[0] for b in batch] + [b[1] for b in batch], pad, "right", dist.device)
        r = drm(idx, m)  # (2B,): chosen then rejected, one forward
        rc, rr = r[:B], r[B:]
        margin = torch.tensor([b[2] for b in batch], device=dist.device)
        loss = bradley_terry_loss(rc, rr, margin)
        set_lr(opt, lr_at(step, steps, lr, args.warmup_steps))
        loss.backward()
        gn = clip_and_step(opt, params, args.grad_clip, step + 1)
        step += 1
        row = {"step": step, "loss": dist.mean(loss.item()), "accuracy": dist.mean(float((rc > rr).float().mean())),
               "margin": dist.mean((rc - rr).mean().item()), "lr": opt.param_groups[0]["lr"], "grad_norm": gn}
        if ev and (step % args.eval_every == 0 or step == steps):
            row.update(evaluate(rm, ev, pad, dist.device, args.batch_size))
        if step % args.log_every == 0 or "eval_accuracy" in row:
            metrics.log(**row)
        bar.update(1, loss=row["loss"], acc=row["accuracy"])
        if dist.main and (step % args.save_every == 0 or step == steps):
            save_stage(args.out, rm.model, tok, step=step, opt=opt, base=str(args.model),
                       extra_tensors={HEAD_FILE: rm.head_tensors()}, state={"stage": "reward", "steps": steps,
                                                                           "args": run_args(args)})
    bar.close()
    if dist.main:
        final = evaluate(rm, ev, pad, dist.device, args.batch_size)
        if final:
            print(f"reward: held-out accuracy {final['eval_accuracy']:.3f}, mean margin {final['eval_margin']:.3f}")
        print(f"reward: saved {args.out} (step {step})")
    dist.close()
    return 0


if __name__ == "__main__":  # python -m pyllm.reward ... == pyllm <command> ...
    from .cli import module_main
    raise SystemExit(module_main(__spec__.name))
