"""`pyllm score --reward-model rm/ --data lines.jsonl [--out scored.jsonl]`: add "reward" to each JSONL line.

Lines: {"prompt": str|messages, "response": str|messages} (also "completion" for the response) or {"messages": [...]}
get "reward"; preference lines {"prompt", "chosen", "rejected"} get "reward_chosen" and "reward_rejected" (and the
summary the pairs' accuracy). The other fields pass through. Output goes to --out (written atomically) or stdout.
"""
from __future__ import annotations

import json
import sys

from .sft import BadLine, Dist, as_messages, check_messages, read_jsonl, render_checked


def add_arguments(p):
    p.add_argument("--reward-model", required=True, help="`pyllm reward` output directory")
    p.add_argument("--data", required=True, help="JSONL of {prompt, response}, {messages} or preference pairs "
                                                 "{prompt, chosen, rejected} (each reply scored)")
    p.add_argument("--out", default=None, help="output JSONL (default: stdout)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="device (default: cuda if available)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json to use instead of the checkpoint's")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip (and count) bad lines")


def main(args) -> int:
    from .reward import load_reward_model, pad_id_of, score_ids
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    dist = Dist(args.device)
    rm, tok = load_reward_model(args.reward_model, dist.device, args.tokenizer)
    T = rm.model.config.max_seq_len

    def parse(obj, where):
        """-> (obj, keys the rewards go under, token ids of each scored conversation)."""
        hint = "the reward model cannot score it (--skip-bad-lines skips such lines)"
        if "messages" in obj:
            return obj, ["reward"], [render_checked(check_messages(obj["messages"], where), tok, where, T,
                                                    hint=hint)[0]]
        key = next((k for k in ("response", "completion") if k in obj), None)
        # a preference line: both replies scored (only "chosen" was, under "reward": "rejected" dropped silently)
        replies = [key] if key else ["chosen", "rejected"] if "chosen" in obj and "rejected" in obj else \
            ["chosen"] if "chosen" in obj else []
        if "prompt" not in obj or not replies:
            raise BadLine(f"{where}: expected 'messages', 'prompt' + 'response', or 'prompt' + 'chosen' + 'rejected'")
        prompt = as_messages(obj["prompt"], where, "prompt", "user")
        ids = [render_checked(prompt + as_messages(obj[k], where, k, "assistant"), tok, where, T, hint=hint)[0]
               for k in replies]
        return obj, ["reward"] if len(replies) == 1 else ["reward_chosen", "reward_rejected"], ids
    rows, _ = read_jsonl(args.data, parse, args.skip_bad_lines, "scoring")
    rewards = score_ids(rm, [i for r in rows for i in r[2]], pad_id_of(tok), dist.device, args.batch_size).tolist()
    out, at, pairs, right = [], 0, 0, 0
    for obj, keys, _ in rows:
        got = dict(zip(keys, map(float, rewards[at:at + len(keys)])))
        at += len(keys)
        if len(keys) == 2:
            pairs, right = pairs + 1, right + (got["reward_chosen"] > got["reward_rejected"])
        out.append(json.dumps({**obj, **got}) + "\n")
    text = "".join(out)
    mean = sum(rewards) / len(rewards) if rewards else float("nan")
    summary = f"score: {len(rows)} lines, mean reward {mean:.4f}" + (
        f", chosen > rejected in {right} of {pairs} pairs ({right / pairs:.1%})" if pairs else "")
    if args.out:  # no half-written output left behind (a full disk, --out a directory)
        from .data import atomic_write_text
        atomic_write_text(args.out, text)
        print(f"{summary} -> {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":  # python -m pyllm.score ... == pyllm <command> ...
    from .cli import module_main
    raise SystemExit(module_main(__spec__.name))
