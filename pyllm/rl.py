"""Stage 4, RL: `pyllm rl --policy sft/ --reward-model rm/ --prompts prompts.jsonl --out rl/` (tests/test_rl.py).

Each step: sample --batch-size prompts, generate --num-samples responses per prompt through model.generate (the KV
cache and pyllm's sampling op), score them, then update the policy:
  --algo ppo  (InstructGPT / TRL PPO): per-token reward -kl_coef * (log pi - log ref) plus the (clipped) score on
              the last token; a value head on the policy's final hidden state; GAE(gamma, lambda); whitened
              advantages; clipped policy loss and clipped value loss, --ppo-epochs passes over minibatches.
  --algo grpo (DeepSeekMath): k samples per prompt, advantage = (score - group mean) / group std, no critic; KL to
              the reference as a loss term (k3 estimator, --kl-coef) instead of in the reward.
  --algo rft  (rejection-sampling fine-tuning / expert iteration: STaR, RAFT, ReST): k samples per prompt, keep the
              ones the --reward-fn verifies (score reaches the prompt's `weight`, default 1), one supervised step
              (cross-entropy) on them, each distinct kept reply once, every prompt with a kept reply given the same
              weight per token (a token mean over the kept replies, as SFT's). A mean-probability shift (GRPO)
              rarely flips an argmax between near-tied answers; a cross-entropy step on the verified answer does.
              The reward model, if given, is only scored (logged, on the first of each group's k samples).
The score is the reward model's output and/or a Python function (--reward-fn module:function or file.py:function)
called as fn(prompt=..., response=..., **other JSONL fields) -> float; with both, they add (the RM's share scaled by
--reward-model-weight). GRPO options after TRL / DAPO: --scale-rewards group|batch|none (divide advantages by the
group's std, the batch's, or not at all: a group std blows tiny score differences up to unit size), --filter-groups
(drop groups whose samples all got the same --reward-fn score, e.g. all right or all wrong: they carry no verifier
signal, only RM noise, and dilute the update; DAPO's dynamic sampling without the re-sampling), --prefilter-samples N
(before training, keep only the prompts on which N samples of the starting policy got differing --reward-fn scores:
the same criterion once up front, so no step is spent on prompts it already always or never solves).
--hard-prompts a (any algo with --reward-fn): instead of uniform epochs, each step draws its prompts with probability
~ (1.05 - p)^a, p = the prompt's running pass rate in the policy's own rollouts (the prefilter's estimate at first):
rollouts go where the policy still fails, prompts it has learned are revisited rarely. --rft-hard-weight and
--rft-neg-mode reweight rft's update toward such prompts (see rft_select).
Prompts JSONL: {"prompt": str|messages, ...extra fields} or {"messages": [...]} (the conversation so far).
Logs reward, KL, clip fraction, entropy, response length (metrics.jsonl) and plots them when pyllm.plot exists.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from .reward import pad_batch, pad_id_of
from .sft import (BadLine, Bar, Dist, Metrics, add_common_args, as_messages, check_common_args, check_messages,
                  check_context, check_same_tokenizer, check_step_size, clip_and_step, load_optimizer_tensors,
                  load_policy, make_optimizer,
                  prepare_model, read_jsonl, render_checked, resume_state, resume_step, save_stage, set_lr, lr_at,
                  run_args, step_items)

VALUE_FILE = "value_head.safetensors"
PASS_RATE_KEY = "hard_prompts.pass_rate"   # in trainer_state.safetensors: (n_prompts) fp32


def derived_seed(v: int) -> int:
    """A seed computed from --seed (seed * 1000003 + step, ...) brought into [0, 2^63): a --seed near 2^63, which
    --seed accepts, overflowed torch's generator ("Overflow when unpacking long long") or generate's seed range
    after the models had loaded. The same value as before wherever it did not overflow."""
    return v % 2 ** 63


def load_reward_fn(spec: str):
    """'pkg.module:function' or 'path/to/file.py:function' -> the callable."""
    if ":" not in spec:
        raise ValueError(f"--reward-fn {spec!r}: expected module:function or file.py:function")
    mod_name, fn_name = spec.rsplit(":", 1)
    if mod_name.endswith(".py") or "/" in mod_name:
        path = Path(mod_name)
        if not path.exists():
            raise FileNotFoundError(f"--reward-fn: {path} not found")
        s = importlib.util.spec_from_file_location(path.stem, path)
        if s is None:
            raise ValueError(f"--reward-fn: {path} is not a Python file")
        mod = importlib.util.module_from_spec(s)
        try:
            s.loader.exec_module(mod)
        except Exception as e:  # the user's file: a syntax error or a failing import is theirs to fix, in one line
            raise ValueError(f"--reward-fn: cannot load {path} ({type(e).__name__}: {e})") from None
    else:
        try:
            try:
                mod = importlib.import_module(mod_name)
            except ModuleNotFoundError as e:
                # the `pyllm` console script, unlike `python -m pyllm`, has no current directory on sys.path:
                # my_rewards.py beside the user was "no module named" there. Appended (last: it shadows nothing)
                # and left there, so the module's own later imports of its neighbours work too
                cwd = os.getcwd()
                if e.name != mod_name.split(".")[0] or cwd in sys.path or "" in sys.path:
                    raise
                sys.path.append(cwd)
                mod = importlib.import_module(mod_name)
        except ImportError as e:
            raise ValueError(f"--reward-fn: cannot import {mod_name!r} ({e})") from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise ValueError(f"--reward-fn: {mod_name} has no function {fn_name!r}")
    return fn


class PolicyWithValue(nn.Module):
    """The policy GPT plus a scalar value head on its final hidden state (one forward gives both)."""

    def __init__(self, model: nn.Module, value_head: bool = True):
        super().__init__()
        self.model = model
        self.v_head = nn.Linear(model.config.dim, 1) if value_head else None
        if self.v_head is not None:
            nn.init.zeros_(self.v_head.weight)
            nn.init.zeros_(self.v_head.bias)

    def forward(self, idx):
        logits, _, h = self.model(idx, return_hidden=True)                 # (N, L, V), (N, L, C)
        v = self.v_head(h.float()).squeeze(-1) if self.v_head is not None else None  # (N, L)
        return logits, v


def token_logps(logits: torch.Tensor, idx: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """logits (N, L, V), idx (N, L) -> (N, L-1): log p(idx[:, t+1] | idx[:, :t+1]) under softmax(logits / T), the
    distribution the rollouts were sampled from (as TRL does)."""
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, idx[:, 1:, None])[..., 0]


def response_batch(samples: list, pad: int, device=None):
    """samples [(prompt_index, prompt_ids, response_ids)] -> idx (N, L) prompt + response, right-padded; m (N, L-1)
    1 exactly where position t predicts a response token (the shifted layout of token_logps: the prompt and the
    padding count for nothing); last (N,) the position predicting the final response token (PPO's score)."""
    idx, _ = pad_batch([p + r for _, p, r in samples], pad, "right", device)
    m = torch.zeros(len(samples), idx.shape[1] - 1, device=device)
    last = torch.zeros(len(samples), dtype=torch.long, device=device)
    for i, (_, p, r) in enumerate(samples):
        m[i, len(p) - 1:len(p) - 1 + len(r)] = 1
        last[i] = len(p) - 2 + len(r)
    return idx, m, last


def masked_mean(x, m):
    return (x * m).sum() / m.sum().clamp(min=1)


def ppo_token_rewards(kl_tok, score, last, kl_coef: float):
    """PPO's per-token reward (N, S): -kl_coef * (log pi - log ref) at every position, plus each row's score at the
    position `last` predicting its final response token."""
    rewards = -kl_coef * kl_tok
    rewards[torch.arange(len(score)), last] += score
    return rewards


def k3_kl(lp, ref_lp, m):
    """GRPO's KL(pi || ref) term: Schulman's k3 estimator r - log r - 1, r = ref / pi per sampled token (>= 0,
    unbiased), averaged over the mask."""
    d = ref_lp - lp
    return masked_mean(torch.exp(d) - d - 1, m)


def policy_loss(lp, old_lp, adv, m, clip_range: float, ref_lp=None, kl_coef: float = 0.0):
    """The clipped surrogate masked_mean(max(-A r, -A clip(r, 1 - eps, 1 + eps))), r = exp(lp - old_lp), plus
    kl_coef * k3_kl to ref_lp when given (GRPO / rft; PPO puts the KL in the reward). -> (loss, surrogate, ratio)."""
    ratio = torch.exp(lp - old_lp)
    pg = masked_mean(torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip_range, 1 + clip_range)), m)
    loss = pg if ref_lp is None else pg + kl_coef * k3_kl(lp, ref_lp, m)
    return loss, pg, ratio


def _sum_ranks(t, distributed: bool):
    if distributed:
        torch.distributed.all_reduce(t)
    return t


def whiten(x, m, eps=1e-8, distributed: bool = False):
    """(x - mean) / std over the masked positions; with `distributed` (torchrun, world > 1) the mean and variance
    are those of every rank's batch together, so each rank's few rows do not set their own scale (two all-reduces)."""
    n, s = _sum_ranks(torch.stack([m.sum(), (x * m).sum()]).double(), distributed)
    n = n.clamp(min=1)
    mu = s / n
    var = _sum_ranks((((x.double() - mu) ** 2) * m).sum(), distributed) / n
    return ((x - mu.to(x.dtype)) * torch.rsqrt(var + eps).to(x.dtype)) * m


def gae(rewards, values, m, gamma: float, lam: float):
    """rewards/values/m (N, S) over the shifted layout; m marks response positions (contiguous per row).
    -> advantages, returns (N, S)."""
    N, S = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(N, device=rewards.device)
    for t in reversed(range(S)):
        nv = values[:, t + 1] * m[:, t + 1] if t + 1 < S else torch.zeros(N, device=rewards.device)
        nm = m[:, t + 1] if t + 1 < S else torch.zeros(N, device=rewards.device)
        delta = rewards[:, t] + gamma * nv - values[:, t]
        last = (delta + gamma * lam * last * nm) * m[:, t]
        adv[:, t] = last
    return adv, adv + values


def grpo_advantages(score: torch.Tensor, k: int, scale: str = "group", distributed: bool = False) -> torch.Tensor:
    """score (N,) laid out as N/k groups of k samples of one prompt -> advantages (N,): the score minus its group's
    mean, divided by the group's std ("group", DeepSeekMath), the whole batch's std ("batch"; with `distributed`,
    that of every rank's scores, as whiten: each rank's own std trained the ranks apart), or nothing ("none")."""
    grp = score.view(-1, k)
    a = grp - grp.mean(1, keepdim=True)
    if scale == "group":
        a = a / (grp.std(1, keepdim=True) + 1e-4)
    elif scale == "batch" and distributed:
        x = score.double()
        n, s = _sum_ranks(torch.stack([x.new_tensor(float(x.numel())), x.sum()]), True)
        var = _sum_ranks(((x - s / n) ** 2).sum(), True) / (n - 1).clamp(min=1)  # unbiased, as Tensor.std
        a = a / (var.sqrt().to(a.dtype) + 1e-4)
    elif scale == "batch" and score.numel() > 1:
        a = a / (score.std() + 1e-4)
    elif scale not in ("group", "batch", "none"):
        raise ValueError(f"scale_rewards must be group, batch or none, got {scale!r}")
    return a.reshape(-1)


def rft_select(responses: list, correct: torch.Tensor, k: int, drop_solved: bool = False,
               mode_wrong_only: bool = False, hard_weight: float = 0.0, neg_mode: float = 0.0,
               sum_ranks=None):
    """Rejection sampling: responses (N lists of ids) in N/k groups of k, correct (N,) bool -> (kept indices, their
    weights, fraction of groups with a kept reply). Each distinct correct reply of a group is kept once (the first
    sample of it) with weight 1 / (distinct correct replies of its group), so every prompt the policy solved at least
    once has the same weight however often it solved it (a per-token weight: the step is a token mean over the kept
    replies, so a prompt's share of it also grows with its replies' length, as in SFT); drop_solved also drops
    groups solved by all k samples;
    mode_wrong_only keeps only groups whose most frequent reply (the k samples' estimate of the greedy answer; a tie
    counts as wrong) is not verified: the prompts where a right answer exists but is not yet the policy's choice.
    hard_weight a > 0 scales each kept group by (1 - its pass rate over the k samples) ** a, renormalised so the kept
    groups' mean scale stays 1 (sum_ranks, a float -> float sum over torchrun's ranks such as Dist.sum: the mean over
    every rank's kept groups, as one process with the whole batch; every rank calls it, kept groups or not):
    prompts the policy still mostly fails (where greedy decoding is likely wrong) count more, nearly solved ones less
    but not zero (they keep anchoring the answers already right).
    neg_mode b > 0: in a kept group whose most frequent reply (a unique plurality) is wrong, that reply is also
    selected, once, with weight -b x the group's total positive weight: the step pushes the policy's wrong choice
    down beside pulling the verified replies up (a wrong reply that is not the plurality is left alone)."""
    ok = correct.view(-1, k).clone()                                        # (groups, k), the caller's kept

    def plurality(g):  # -> index of the first sample of the group's unique most frequent reply, or None on a tie
        count: dict = {}
        for j in range(k):
            r = tuple(responses[g * k + j])
            count[r] = count.get(r, 0) + 1
        top = max(count.values())
        modes = [r for r, c in count.items() if c == top]
        return None if len(modes) > 1 else g * k + [tuple(x) for x in responses[g * k:(g + 1) * k]].index(modes[0])
    if drop_solved:
        ok = ok & ~ok.all(1, keepdim=True)
    if mode_wrong_only:
        for g in range(ok.shape[0]):
            i = plurality(g)
            if i is not None and bool(correct[i]):
                ok[g] = False
    rate = correct.view(-1, k).float().mean(1)                              # (groups,) pass rate over k samples
    sel, w, gw = [], [], []
    for g in range(ok.shape[0]):
        uniq: dict = {}
        for j in range(k):
            if ok[g, j]:
                uniq.setdefault(tuple(responses[g * k + j]), g * k + j)
        if not uniq:
            continue
        sel += list(uniq.values())
        w += [1.0 / len(uniq)] * len(uniq)  # (nothing when the group has no verified reply)
        gw += [float(1.0 - rate[g]) ** hard_weight if hard_weight > 0 else 1.0] * len(uniq)
    if hard_weight > 0:  # each kept group's w sums to 1: sum(w) counts the kept groups
        n, s = sum(w), sum(a * b for a, b in zip(w, gw))
        if sum_ranks is not None:
            n, s = sum_ranks(n), sum_ranks(s)
        w = [a * b * (n / max(s, 1e-12)) for a, b in zip(w, gw)]
    if neg_mode > 0:
        for g in sorted({i // k for i in sel}):
            i = plurality(g)
            if i is not None and not bool(correct[i]):
                sel.append(i)
                w.append(-neg_mode * sum(wi for si, wi in zip(sel, w) if si // k == g))
    return sel, w, ok.any(1).float().mean().item()


def parse_prompt(obj: dict, where: str):
    """-> (messages so far, the raw prompt for the reward fn, extra fields)."""
    if "prompt" in obj:
        msgs = as_messages(obj["prompt"], where, "prompt", "user")
        raw = obj["prompt"]
        extra = {k: v for k, v in obj.items() if k != "prompt"}
    elif "messages" in obj:
        msgs = check_messages(obj["messages"], where)
        raw = obj["messages"]
        extra = {k: v for k, v in obj.items() if k != "messages"}
    else:
        raise BadLine(f"{where}: expected a 'prompt' or 'messages' key, got {sorted(obj)}")
    if msgs[-1]["role"] == "assistant":
        raise BadLine(f"{where}: the prompt ends with an assistant turn; nothing left to generate")
    w = extra.get("weight", 1.0)  # the verifier's full credit (see _passfail): a null or a string failed mid-run
    if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w):
        raise BadLine(f"{where}: weight must be a finite number (the --reward-fn score of a fully right reply), "
                      f"got {w!r}")
    return msgs, raw, extra


DEFAULT_LR = (1e-5, 1e-4)  # --lr when not given: (full fine-tuning, LoRA)


def add_arguments(p):
    p.add_argument("--policy", required=True, help="SFT checkpoint directory (policy start and frozen reference)")
    p.add_argument("--reward-model", default=None, help="`pyllm reward` checkpoint directory")
    p.add_argument("--reward-fn", default=None, help="Python reward: module:function or file.py:function, called "
                                                     "as fn(prompt=, response=, **extra JSONL fields) -> float")
    p.add_argument("--prompts", required=True, help="JSONL of {'prompt': ..., extra fields} or {'messages': ...}; a "
                   "'weight' field is the --reward-fn score of a fully right reply (default 1): rft keeps, and "
                   "--hard-prompts / --filter-groups count as solved, replies scoring at least it")
    p.add_argument("--algo", default="ppo", choices=["ppo", "grpo", "rft"],
                   help="PPO with a value head, GRPO, or rejection-sampling fine-tuning on verified samples (rft)")
    p.add_argument("--num-samples", type=int, default=0, help="responses per prompt (default 1 PPO, 4 GRPO / rft)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="response length cap")
    p.add_argument("--temperature", type=float, default=1.0, help="rollout sampling temperature")
    p.add_argument("--top-k", type=int, default=0, help="rollout top-k (0 = off)")
    p.add_argument("--kl-coef", type=float, default=0.05, help="KL weight (PPO: per-token penalty; GRPO: beta)")
    p.add_argument("--ppo-epochs", type=int, default=None,
                   help="optimization passes over each rollout batch (default: 2; rft: 1, its one supervised step)")
    p.add_argument("--minibatches", type=int, default=1, help="minibatches per pass")
    p.add_argument("--clip-range", type=float, default=0.2, help="policy ratio clip epsilon")
    p.add_argument("--clip-range-value", type=float, default=0.2, help="value clip around the rollout values")
    p.add_argument("--vf-coef", type=float, default=0.5, help="value loss weight (PPO)")
    p.add_argument("--gamma", type=float, default=1.0, help="discount")
    p.add_argument("--lam", type=float, default=0.95, help="GAE lambda")
    p.add_argument("--reward-clip", type=float, default=10.0, help="clip scores to [-c, c] (0 = off)")
    p.add_argument("--reward-model-weight", type=float, default=1.0,
                   help="score = weight * reward-model score + reward-fn score (1.0)")
    p.add_argument("--scale-rewards", default="group", choices=["group", "batch", "none"],
                   help="GRPO: divide advantages by the group's score std (DeepSeekMath), the batch's, or not")
    p.add_argument("--filter-groups", action="store_true",
                   help="GRPO: drop groups whose --reward-fn scores are all equal (no verifier signal); rft: drop "
                        "groups every sample of which is verified (already solved)")
    p.add_argument("--prefilter-samples", type=int, default=0,
                   help="before training, sample this many responses per prompt from the starting policy and keep "
                        "only prompts whose --reward-fn scores differ (sometimes right, sometimes wrong): the others "
                        "give GRPO no signal (0 = keep all prompts)")
    p.add_argument("--rft-mode-wrong", action="store_true",
                   help="rft: learn only from prompts whose most frequent sampled reply is wrong (where a verified "
                        "reply exists but is not yet the policy's choice: what flips greedy answers)")
    p.add_argument("--rft-hard-weight", type=float, default=0.0,
                   help="rft: scale each kept group by (1 - its pass rate over the k samples) ** this (renormalised "
                        "to mean 1): prompts the policy still mostly fails count more (0 = every prompt equal)")
    p.add_argument("--rft-neg-mode", type=float, default=0.0,
                   help="rft: where a prompt has a verified reply but its most frequent sampled reply is wrong, also "
                        "push that wrong reply down with this weight relative to the verified ones (0 = off)")
    p.add_argument("--hard-prompts", type=float, default=0.0,
                   help="draw each step's prompts with probability proportional to (1.05 - p) ** this, p = the "
                        "prompt's running pass rate in the policy's own rollouts (starts at its --prefilter-samples "
                        "rate, else 0.5; each visit moves it halfway to that group's rate), instead of uniform "
                        "epochs: rollouts go to the prompts not yet solved (0 = off)")
    p.add_argument("--no-whiten", action="store_true", help="do not whiten PPO advantages")
    add_common_args(p, default_lr=DEFAULT_LR, evals=False)  # held-out scoring: `pyllm score`, or the demo's report


@torch.no_grad()
def rollout(policy, tok, prompts, k, args, seed, device):
    """-> list of (prompt_index, prompt_ids, response_ids): k samples per prompt via model.generate, the k samples
    of one prompt consecutive (GRPO's groups). Prompts of equal length share one generate call (one (n*k, T)
    batch): a call per prompt made short rollouts cost mostly Python overhead (~4x slower at 6 new tokens). Each
    prompt is prefilled once for its k samples (generate's num_samples): the prompt is most of a short rollout's
    tokens."""
    end_id = tok.special_ids.get("<|end|>") if hasattr(tok, "special_ids") else None
    stops = (end_id,) if end_id is not None else ()
    was_training = policy.training
    policy.eval()
    rows: list = [None] * len(prompts)
    by_len: dict = {}
    for i, (_, ids) in enumerate(prompts):
        by_len.setdefault(len(ids), []).append(i)
    with parametrize.cached():  # LoRA: fold B @ A once per rollout, not once per decoded token
        for members in by_len.values():
            idx = torch.tensor([prompts[i][1] for i in members], dtype=torch.long, device=device)
            gen = policy.generate(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                  seed=derived_seed(seed * 100003 + members[0]), stop_tokens=stops, num_samples=k)
            new = gen[:, idx.shape[1]:].tolist()
            for j, i in enumerate(members):
                rows[i] = new[j * k:(j + 1) * k]
    out = []
    for (pi, ids), group in zip(prompts, rows):
        for row in group:
            if end_id is not None and end_id in row:
                row = row[:row.index(end_id) + 1]
            out.append((pi, ids, row[:args.max_new_tokens]))
    policy.train(was_training)  # the mode it came in with (the prefilter samples from the frozen reference)
    return out


def fn_scores(fn, tok, prompts, samples, end_id) -> torch.Tensor:
    """--reward-fn score of each (prompt_index, prompt_ids, response_ids) sample -> (N,)."""
    out = []
    for pi, _, r in samples:
        try:
            s = fn(prompt=prompts[pi][1], response=tok.decode([t for t in r if t != end_id]), **prompts[pi][2])
        except Exception as e:  # the user's code: a one-line error naming it, not a traceback through the trainer
            raise ValueError(f"--reward-fn {getattr(fn, '__name__', fn)} raised {type(e).__name__}: {e} (prompt "
                             f"{prompts[pi][1][:60]!r})") from None
        try:  # a bool, a 0-d tensor or a numpy scalar is fine; text is not ("1" passed as 1.0, "0.9 " too: a fn
            v = math.nan if isinstance(s, (str, bytes)) else float(s)  # returning its parse of the reply, unconverted)
        except (TypeError, ValueError):
            v = math.nan
        if not math.isfinite(v):  # NaN would poison every advantage of the batch without an error
            raise ValueError(f"--reward-fn {getattr(fn, '__name__', fn)} returned {s!r}, expected a finite number")
        out.append(v)
    return torch.tensor(out)


def _passfail(prompt, row) -> bool:
    """Did some sample of this prompt get its full verifier credit (the `weight` field, default 1)?"""
    return float(row.max()) >= float(prompt[2].get("weight", 1.0)) - 1e-6


def prefilter(model, tok, prompts, fn, args, dist, chunk: int = 256):
    """Keep the prompts on which the starting policy's --prefilter-samples samples get differing --reward-fn
    scores (the pass rate is strictly between 0 and 1), estimated with the rollout settings; every rank keeps
    the same list (same seed, same samples). -> (kept prompts, their pass rates: the share of samples that got the
    prompt's full `weight`, 0.5 where no sample did, e.g. a graded score's near misses only)."""
    if fn is None:
        raise ValueError("rl: --prefilter-samples needs --reward-fn (it keeps prompts by the verifier's spread)")
    k = args.prefilter_samples
    if k < 2:
        raise ValueError(f"rl: --prefilter-samples {k}: need at least 2 samples to see a spread")
    end_id = tok.special_ids.get("<|end|>")
    keep, rates = [], []
    bar = Bar(len(prompts), "prefilter", dist.main)
    for s0 in range(0, len(prompts), chunk):
        part = [(i, prompts[i][0]) for i in range(s0, min(len(prompts), s0 + chunk))]
        samples = rollout(model, tok, part, k, args, derived_seed(args.seed * 31 + 7 + s0), dist.device)
        sc = fn_scores(fn, tok, prompts, samples, end_id).view(-1, k)
        for (i, _), row in zip(part, sc):
            if float(row.max() - row.min()) > 1e-6:
                keep.append(i)
                rates.append(float((row >= row.max() - 1e-6).float().mean()) if _passfail(prompts[i], row) else 0.5)
        bar.update(len(part))
    bar.close()
    if dist.main:
        print(f"rl: prefilter kept {len(keep)} of {len(prompts)} prompts (differing --reward-fn scores over {k} "
              f"samples: for a pass/fail verifier, a pass rate strictly between 0 and 1)")
    if not keep:
        raise ValueError(f"rl: --prefilter-samples {k}: no prompt has a spread of --reward-fn scores under the "
                         "starting policy (all right or all wrong); nothing to learn from")
    return [prompts[i] for i in keep], rates


def main(args) -> int:
    check_common_args(args)
    dist = Dist(args.device)
    args.model = args.policy
    st = resume_state(args, "rl")  # a resumed run's own --reward-fn/--reward-model are restored here
    if args.ppo_epochs is None:  # rft's one supervised step: a 2nd pass (the PPO default) was a clipped-surrogate
        args.ppo_epochs = 1 if args.algo == "rft" else 2  # step on the first one's samples (after the resume: a
        # run's own value is restored first; a saved null, hand-made, was a TypeError traceback at range())
    if args.reward_model is None and args.reward_fn is None:
        raise ValueError("rl: give --reward-model and/or --reward-fn")
    torch.manual_seed(args.seed)  # after resume_state: a resumed run's own --seed
    model, tok = prepare_model(args, dist, args.out if st else None)
    ref, _ = load_policy(args.policy, dist.device, args.tokenizer)
    ref.eval().requires_grad_(False)
    ac = PolicyWithValue(model, value_head=args.algo == "ppo").to(dist.device)
    if st and ac.v_head is not None:  # a foreign file: one line naming it (was load_state_dict's RuntimeError)
        from .safetensors_io import load_into
        load_into(Path(args.out) / VALUE_FILE, ac.v_head)
    rm = None
    if args.reward_model:
        from .reward import load_reward_model
        rm, rm_tok = load_reward_model(args.reward_model, dist.device, args.tokenizer)
        check_same_tokenizer(tok, rm_tok, args.reward_model, "reward model")
        check_context(model.config.max_seq_len, rm.model.config.max_seq_len, args.reward_model, "reward model")
        rm.eval().requires_grad_(False)
    fn = load_reward_fn(args.reward_fn) if args.reward_fn else None
    k = args.num_samples or (1 if args.algo == "ppo" else 4)
    if args.algo == "grpo" and k < 2:
        raise ValueError("rl: GRPO needs --num-samples >= 2 (advantages are relative within a group)")
    if args.algo == "rft" and fn is None:
        raise ValueError("rl: --algo rft needs --reward-fn (it keeps the samples the verifier accepts)")
    T = model.config.max_seq_len
    if args.max_new_tokens >= T - 1:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in context {T}")

    def parse(obj, where):
        msgs, raw, extra = parse_prompt(obj, where)
        clash = sorted({"prompt", "response"} & set(extra)) if fn is not None else []
        if clash:  # else fn(prompt=, response=, **extra) is a TypeError after the first rollout
            raise BadLine(f"{where}: field(s) {clash} clash with --reward-fn's prompt=/response= arguments; "
                          f"rename them")
        # room for the response and the end-of-turn the reward model reads
        ids, _ = render_checked(msgs, tok, where, T - args.max_new_tokens - 1, add_generation_prompt=True)
        return ids, raw, extra
    prompts, _ = read_jsonl(args.prompts, parse, args.skip_bad_lines, "prompt")
    n_step = min(args.batch_size, len(prompts)) if args.hard_prompts > 0 else args.batch_size  # prompts per step
    check_step_size(f"--batch-size {args.batch_size} x --num-samples {k}", n_step * k, args.max_new_tokens + 1)
    if args.prefilter_samples:
        check_step_size(f"--prefilter-samples {args.prefilter_samples}", args.prefilter_samples,
                        args.max_new_tokens + 1)
        prompts, rates = prefilter(ref, tok, prompts, fn, args, dist)  # the starting policy, also when resuming
    else:
        rates = [0.5] * len(prompts)
    # --hard-prompts: each prompt's running pass rate in the policy's own rollouts (every rank's, so the ranks hold
    # the same estimates; saved in every checkpoint, so a resumed run draws what the uninterrupted one would)
    pass_rate = torch.tensor(rates, dtype=torch.float)
    if args.hard_prompts > 0 and fn is None:
        raise ValueError("rl: --hard-prompts needs --reward-fn (it tracks each prompt's verified pass rate)")
    if st and args.hard_prompts > 0:
        saved = st[1].get(PASS_RATE_KEY)
        if saved is not None and saved.shape == pass_rate.shape:
            pass_rate = saved.float().clone()
        elif dist.main:
            print(f"{args.out}: no saved --hard-prompts pass rates for these {len(prompts)} prompts "
                  "(another prompt set, or saved without --hard-prompts): starting them afresh", file=sys.stderr)
    pad = pad_id_of(tok)
    end_id = tok.special_ids.get("<|end|>")
    steps = args.steps or max(1, math.ceil(args.epochs * len(prompts) / (args.batch_size * dist.world)))
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.lora_r != 0]
    opt = make_optimizer(ac.parameters(), lr, args.weight_decay, device=dist.device)
    step = 0
    if st:
        load_optimizer_tensors(opt, st[1], st[0]["optimizer"], f"{args.out}/trainer_state.safetensors")
        step = resume_step(st[0], steps, args.out)
    if dist.main:
        print(f"rl: {args.algo}, {len(prompts)} prompts, {args.batch_size} prompts x {k} samples per step, "
              f"{steps} steps" + (f"; resuming at step {step}" if st else ""))
    dac = dist.wrap(ac)
    metrics = Metrics(Path(args.out) / "metrics.jsonl", dist.main, resume=bool(st), step=step)
    bar = Bar(steps, args.algo, dist.main, initial=step)
    params = [p for p in ac.parameters() if p.requires_grad]
    tau = args.temperature if args.temperature > 0 else 1.0   # the sampling distribution's temperature
    per_step = args.batch_size * dist.world
    ac.train()
    while step < steps:
        if args.hard_prompts > 0:  # prompts the policy still fails are drawn more often
            g = torch.Generator()
            g.manual_seed(derived_seed(args.seed * 1000003 + step * dist.world + dist.rank))
            chosen = torch.multinomial((1.05 - pass_rate) ** args.hard_prompts, min(args.batch_size, len(prompts)),
                                       replacement=False, generator=g).tolist()
        else:
            chosen = step_items(list(range(len(prompts))), step, per_step, args.seed, dist)
        samples = rollout(model, tok, [(i, prompts[i][0]) for i in chosen], k, args, args.seed + step * 7919 +
                          dist.rank, dist.device)
        # ---- scores --------------------------------------------------------------------------------------
        N = len(samples)
        score = torch.zeros(N)
        info = {}
        if rm is not None:
            # rft only logs the RM (it is not optimised): the first sample of each group estimates its mean at 1/k
            # of the cost (scoring all k samples was a third of an RFT step)
            scored = samples[::k] if args.algo == "rft" else samples
            seqs = [p + (r if r and r[-1] == end_id else r + [end_id]) for _, p, r in scored]
            idx, am = pad_batch(seqs, pad, "right", dist.device)
            with torch.no_grad():
                s_rm = rm(idx, am).float().cpu()
            score += args.reward_model_weight * (s_rm.mean() if args.algo == "rft" else s_rm)
            info["rm_score"] = s_rm.mean().item()
        if fn is not None:
            s_fn = fn_scores(fn, tok, prompts, samples, end_id)
            score += s_fn
            info["fn_score"] = s_fn.mean().item()
            # full-credit rate: the score reached the prompt's `weight` field (default 1), i.e. exact-match success
            # when the reward fn is graded (partial credit for near misses stays below it)
            full = torch.tensor([float(prompts[pi][2].get("weight", 1.0)) for pi, _, _ in samples])
            correct = s_fn >= full - 1e-6                                   # (N,) verified (full credit)
            info["fn_full"] = correct.float().mean().item()
            if args.hard_prompts > 0:  # each visit moves the prompt's estimate halfway to this group's pass rate
                # every rank's visits, in rank order, so that all ranks hold the estimates rank 0 saves (each rank
                # kept its own, so a resumed multi-rank run drew other prompts than the uninterrupted one)
                visits = torch.stack([torch.tensor(chosen, dtype=torch.float64),
                                      correct.view(-1, k).float().mean(1).double()])
                for ch, rate in dist.all_gather(visits):
                    ch = ch.long()
                    pass_rate[ch] = 0.5 * pass_rate[ch] + 0.5 * rate.float()
        raw_score = score.clone()
        no_signal = False
        if args.reward_clip > 0:
            score = score.clamp(-args.reward_clip, args.reward_clip)
        if args.algo == "rft":
            sel, rft_w, info["kept_groups"] = rft_select([r for _, _, r in samples], correct, k, args.filter_groups,
                                                         args.rft_mode_wrong, args.rft_hard_weight,
                                                         args.rft_neg_mode, sum_ranks=dist.sum)
            no_signal = not sel
            if no_signal:  # nothing verified: a zero-weight step keeps every rank in step
                sel, rft_w = [0], [0.0]
            samples = [samples[i] for i in sel]
            score = score[sel]
            rft_w = torch.tensor(rft_w)
            N = len(samples)
        elif args.algo == "grpo" and args.filter_groups:
            sig = (s_fn if fn is not None else score).view(-1, k)
            keep = (sig.max(1).values - sig.min(1).values) > 1e-6           # (groups,) any spread in the group
            info["kept_groups"] = keep.float().mean().item()
            no_signal = not keep.any()  # keep the batch (zero advantages, KL term only): ranks stay in step
            if no_signal:
                keep[:] = True
            ki = keep.repeat_interleave(k)
            samples = [s_ for s_, kk in zip(samples, ki.tolist()) if kk]
            score = score[ki]
            N = len(samples)
        score = score.to(dist.device)
        # ---- the batch in the shifted layout: position t predicts token t+1 ----------------------------------
        idx, m, last = response_batch(samples, pad, dist.device)
        # GRPO with one pass over one minibatch is on-policy: the rollout policy's log-probs are the training
        # forward's own (ratio exactly 1), so the extra no-grad forward is skipped (~20% of a step)
        one_pass = args.algo in ("grpo", "rft") and args.ppo_epochs == 1 and args.minibatches <= 1
        with torch.no_grad():
            ref_lp = token_logps(ref(idx)[0], idx, tau)
            if not one_pass:
                logits, values = ac(idx)
                old_lp = token_logps(logits, idx, tau)
                kl_tok = (old_lp - ref_lp) * m                              # (N, S) sampled-token KL estimate
            if args.algo == "ppo":
                values = values[:, :-1] * m
                rewards = ppo_token_rewards(kl_tok, score, last, args.kl_coef)
                adv, returns = gae(rewards, values, m, args.gamma, args.lam)
                if not args.no_whiten:
                    adv = whiten(adv, m, distributed=dist.world > 1)
            elif args.algo == "rft":  # weighted cross-entropy on the kept samples (the ratio is 1 on-policy)
                adv = rft_w.to(dist.device)[:, None] * m
            else:
                a = grpo_advantages(score, k, args.scale_rewards, distributed=dist.world > 1)
                if no_signal:
                    a = torch.zeros_like(a)
                adv = a[:, None] * m
        # ---- optimization ------------------------------------------------------------------------------------
        set_lr(opt, lr_at(step, steps, lr, args.warmup_steps))
        stats = {"clip_frac": [], "entropy": [], "pg_loss": [], "vf_loss": [], "approx_kl": [], "grad_norm": []}
        # exactly --minibatches per pass (N // minibatches rows each made 3 of 7 rows at 2), the same number on every
        # rank: rft and --filter-groups leave each rank its own N, and unequal counts mispair DDP's all-reduces
        n_mb = dist.min(min(max(1, args.minibatches), N))
        # the minibatch order is a function of (seed, step), not of the global RNG's history: --resume continues it
        g_mb = torch.Generator().manual_seed(derived_seed(args.seed * 1000003 + step))
        for _ in range(args.ppo_epochs):
            order = torch.randperm(N, generator=g_mb) if not one_pass else torch.arange(N)
            for b in torch.tensor_split(order, n_mb):
                b = b.to(dist.device)
                mm = m[b]
                logits_b, v_b = dac(idx[b])
                lp = token_logps(logits_b, idx[b], tau)
                if one_pass:
                    old_lp = lp.detach()
                    kl_tok = (old_lp - ref_lp) * m
                loss, pg, ratio = policy_loss(lp, old_lp[b], adv[b], mm, args.clip_range,
                                              None if args.algo == "ppo" else ref_lp[b], args.kl_coef)
                if args.algo == "ppo":
                    v = v_b[:, :-1]
                    v_clip = values[b] + (v - values[b]).clamp(-args.clip_range_value, args.clip_range_value)
                    vf = 0.5 * masked_mean(torch.max((v - returns[b]) ** 2, (v_clip - returns[b]) ** 2), mm)
                    loss = loss + args.vf_coef * vf
                    stats["vf_loss"].append(vf.item())
                if dist.world > 1:  # the losses are token means over this rank's tokens and DDP averages the ranks:
                    n_tok = float(mm.sum())  # weighting each by its share of all ranks' tokens makes the update
                    loss = loss * (dist.world * n_tok / max(dist.sum(n_tok), 1.0))  # the mean over all of them
                loss.backward()
                stats["grad_norm"].append(clip_and_step(opt, params, args.grad_clip, step + 1))
                with torch.no_grad():
                    lpa = torch.log_softmax(logits_b[:, :-1].float(), -1)
                    stats["entropy"].append(masked_mean(-(lpa.exp() * lpa).sum(-1), mm).item())
                    stats["clip_frac"].append(masked_mean(((ratio - 1).abs() > args.clip_range).float(), mm).item())
                    stats["approx_kl"].append(masked_mean(0.5 * (lp - old_lp[b]) ** 2, mm).item())
                    stats["pg_loss"].append(pg.item())
        step += 1
        n_rows = dist.sum(m.shape[0])  # per row over every rank's rows (rft and --filter-groups: unequal N)
        row = {"step": step, "reward": dist.mean(raw_score.mean().item()),
               "kl": dist.sum(float(kl_tok.sum())) / max(n_rows, 1),
               "response_length": dist.sum(float(m.sum())) / max(n_rows, 1), "lr": opt.param_groups[0]["lr"],
               **{k_: dist.mean(sum(v) / len(v)) for k_, v in stats.items() if v},
               **{k_: dist.mean(v) for k_, v in info.items()}}
        if step % args.log_every == 0:
            metrics.log(**row)
        bar.update(1, reward=row["reward"], kl=row["kl"])
        if dist.main and (step % args.save_every == 0 or step == steps):
            extra = {VALUE_FILE: {k_: v.detach().cpu() for k_, v in ac.v_head.state_dict().items()}} \
                if ac.v_head is not None else None
            save_stage(args.out, model, tok, step=step, opt=opt, base=str(args.policy), extra_tensors=extra,
                       state={"stage": "rl", "algo": args.algo, "steps": steps, "args": run_args(args)},
                       trainer_tensors={PASS_RATE_KEY: pass_rate} if args.hard_prompts > 0 else None)
    bar.close()
    if dist.main:
        plot_metrics(Path(args.out))
        print(f"rl: saved {args.out} (step {step})")
    dist.close()
    return 0


def plot_metrics(out: Path):
    """rl.png with reward, KL, entropy, response length per step, when pyllm.plot is available."""
    try:
        from . import plot
    except ImportError:
        return
    from .sft import read_metrics
    rows = read_metrics(out / "metrics.jsonl")
    if not rows:
        return
    try:
        for name, keys in (("rl_reward.png", ("reward", "kl")), ("rl_policy.png", ("entropy", "response_length",
                                                                                   "clip_frac"))):
            series = {k: ([r["step"] for r in rows if k in r], [r[k] for r in rows if k in r]) for k in keys}
            plot.line_plot(str(out / name), {k: v for k, v in series.items() if v[0]})
    except Exception as e:  # a plot is a convenience; never lose a finished run over it
        print(f"rl: plot skipped ({e})")


if __name__ == "__main__":  # python -m pyllm.rl ... == pyllm <command> ...
    from .cli import module_main
    raise SystemExit(module_main(__spec__.name))
