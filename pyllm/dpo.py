"""Direct preference optimization: `pyllm dpo --model sft/ --data prefs.jsonl --out dpo/` (tests/test_dpo.py).

Same preference JSONL as `pyllm reward`. Loss (Rafailov et al., TRL's loss_type="sigmoid"):
  -logsigmoid(beta * ((log pi(c) - log ref(c)) - (log pi(r) - log ref(r))))
with log-probs summed over the completion's assistant tokens only (not the prompt, not padding), and a frozen
reference = the starting checkpoint (--ref-model to pick another). Logs TRL's rewards/chosen, rewards/rejected,
rewards/accuracies and rewards/margins.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .reward import pad_batch, pad_id_of, pair_training_setup, parse_preference
from .sft import (Bar, Dist, Metrics, add_common_args, check_common_args, check_context, check_same_tokenizer,
                  clip_and_step, load_policy, lr_at, prepare_model, read_jsonl, render_checked, resume_state, save_stage, set_lr,
                  run_args, step_items)


def load_dpo_pairs(path, tok, max_len: int, skip_bad: bool):
    """[(chosen_ids, chosen_mask, rejected_ids, rejected_mask)]; masks are 1 on the completion's assistant tokens."""
    def parse(obj, where):
        p, c, r, _ = parse_preference(obj, where)
        n_prompt = len(render_checked(p, tok, where, max_len)[0])  # the template renders the prompt as a prefix
        out = []
        for ans in (c, r):
            ids, mask = render_checked(p + ans, tok, where, max_len)
            out += [ids, [m if i >= n_prompt else 0 for i, m in enumerate(mask)]]
        return tuple(out)
    return read_jsonl(path, parse, skip_bad, "preference")[0]


def sequence_logps(model, seqs, masks, pad_id, device) -> torch.Tensor:
    """Sum of log p(token) over positions whose mask is 1 -> (B,). Right padding; mask[0] is never used."""
    idx, _ = pad_batch(seqs, pad_id, "right", device)
    m, _ = pad_batch(masks, 0, "right", device)
    logits = model(idx)[0]                                               # (B, T, V)
    lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, idx[:, 1:, None])[..., 0]  # (B, T-1)
    return (lp * m[:, 1:]).sum(1)


DEFAULT_LR = (5e-6, 5e-4)  # --lr when not given: (full fine-tuning, LoRA)


def add_arguments(p):
    p.add_argument("--model", required=True, help="SFT checkpoint directory (the policy starts here)")
    p.add_argument("--ref-model", default=None, help="frozen reference checkpoint (default: --model)")
    p.add_argument("--data", required=True, help="preference JSONL {prompt, chosen, rejected}")
    p.add_argument("--eval-data", default=None, help="held-out preference JSONL (default: --eval-frac of --data)")
    p.add_argument("--beta", type=float, default=0.1, help="DPO temperature: strength of the KL anchor")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="conservative DPO: assumed label noise")
    add_common_args(p, default_lr=DEFAULT_LR)


def dpo_batch(policy, ref, batch, pad, device, beta, label_smoothing=0.0):
    B = len(batch)
    seqs = [b[0] for b in batch] + [b[2] for b in batch]
    masks = [b[1] for b in batch] + [b[3] for b in batch]
    lp = sequence_logps(policy, seqs, masks, pad, device)
    with torch.no_grad():
        lr_ = sequence_logps(ref, seqs, masks, pad, device)
    rc, rr = beta * (lp[:B] - lr_[:B]), beta * (lp[B:] - lr_[B:])  # implicit rewards
    logits = rc - rr
    loss = (-F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing).mean()
    return loss, rc.detach(), rr.detach()


@torch.no_grad()
def evaluate(policy, ref, pairs, pad, device, beta, batch_size) -> dict:
    if not pairs:
        return {}
    policy.eval()
    rcs, rrs = [], []
    for i in range(0, len(pairs), batch_size):
        _, rc, rr = dpo_batch(policy, ref, pairs[i:i + batch_size], pad, device, beta)
        rcs.append(rc)
        rrs.append(rr)
    policy.train()
    rc, rr = torch.cat(rcs), torch.cat(rrs)
    return {"eval_accuracy": float((rc > rr).float().mean()), "eval_margin": float((rc - rr).mean())}


def main(args) -> int:
    check_common_args(args)  # --beta > 0 among the float ranges
    if not 0 <= args.label_smoothing < 0.5:
        raise ValueError(f"--label-smoothing must be in [0, 0.5), got {args.label_smoothing}")
    dist = Dist(args.device)
    st = resume_state(args, "dpo")
    torch.manual_seed(args.seed)  # after resume_state: a resumed run's own --seed
    policy, tok = prepare_model(args, dist, args.out if st else None)
    ref, ref_tok = load_policy(args.ref_model or args.model, dist.device, args.tokenizer)
    check_same_tokenizer(tok, ref_tok, args.ref_model or args.model, "reference model")
    check_context(policy.config.max_seq_len, ref.config.max_seq_len, args.ref_model or args.model, "reference model")
    ref.eval().requires_grad_(False)
    train, ev, per_step, steps, lr, opt, step = pair_training_setup(args, dist, policy, st, load_dpo_pairs, tok,
                                                                    policy.config.max_seq_len, DEFAULT_LR)
    pad = pad_id_of(tok)
    if dist.main:
        print(f"dpo: {len(train)} train / {len(ev)} eval pairs; beta {args.beta}; {steps} steps of {per_step}"
              + (f"; resuming at step {step}" if st else ""))
    dpol = dist.wrap(policy)
    metrics = Metrics(Path(args.out) / "metrics.jsonl", dist.main, resume=bool(st), step=step)
    bar = Bar(steps, "dpo", dist.main, initial=step)
    params = [p for p in policy.parameters() if p.requires_grad]
    policy.train()
    while step < steps:
        batch = step_items(train, step, per_step, args.seed, dist)
        loss, rc, rr = dpo_batch(dpol, ref, batch, pad, dist.device, args.beta, args.label_smoothing)
        set_lr(opt, lr_at(step, steps, lr, args.warmup_steps))
        loss.backward()
        gn = clip_and_step(opt, params, args.grad_clip, step + 1, lower="--lr or --beta")
        step += 1
        row = {"step": step, "loss": dist.mean(loss.item()), "rewards/chosen": dist.mean(rc.mean().item()),
               "rewards/rejected": dist.mean(rr.mean().item()),
               "rewards/accuracies": dist.mean((rc > rr).float().mean().item()),
               "rewards/margins": dist.mean((rc - rr).mean().item()), "lr": opt.param_groups[0]["lr"],
               "grad_norm": gn}
        if ev and (step % args.eval_every == 0 or step == steps):
            row.update(evaluate(policy, ref, ev, pad, dist.device, args.beta, args.batch_size))
        if step % args.log_every == 0 or "eval_accuracy" in row:
            metrics.log(**row)
        bar.update(1, loss=row["loss"], margin=row["rewards/margins"])
        if dist.main and (step % args.save_every == 0 or step == steps):
            save_stage(args.out, policy, tok, step=step, opt=opt, base=str(args.model),
                       state={"stage": "dpo", "steps": steps, "beta": args.beta, "args": run_args(args)})
    bar.close()
    if dist.main:
        print(f"dpo: saved {args.out} (step {step})")
    dist.close()
    return 0


if __name__ == "__main__":  # python -m pyllm.dpo ... == pyllm <command> ...
    from .cli import module_main
    raise SystemExit(module_main(__spec__.name))
