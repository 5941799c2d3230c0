"""`pyllm score --reward-model rm/ --data pairs.jsonl [--out scored.jsonl]`: add "reward" to each JSONL line.

Lines: {"prompt": str|messages, "response": str|messages} (also "completion" or "chosen" for the response) or
{"messages": [...]}; the other fields pass through. Output goes to --out (written atomically) or stdout.
"""
from __future__ import annotations

import json
import sys

from .sft import BadLine, Dist, as_messages, check_messages, read_jsonl, render_checked


def add_arguments(p):
    p.add_argument("--reward-model", required=True, help="`pyllm reward` output directory")
    p.add_argument("--data", required=True, help="JSONL of {prompt, response} or {messages}")
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
        if "messages" in obj:
            msgs = check_messages(obj["messages"], where)
        else:
            key = next((k for k in ("response", "completion", "chosen") if k in obj), None)
            if "prompt" not in obj or key is None:
                raise BadLine(f"{where}: expected 'messages' or 'prompt' + 'response'")
            msgs = as_messages(obj["prompt"], where, "prompt", "user") + as_messages(obj[key], where, key,
                                                                                       "assistant")
        return obj, render_checked(msgs, tok, where, T, hint="the reward model cannot score it (--skip-bad-lines "
                                                             "skips such lines)")[0]
    rows, _ = read_jsonl(args.data, parse, args.skip_bad_lines, "scoring")
    rewards = score_ids(rm, [r[1] for r in rows], pad_id_of(tok), dist.device, args.batch_size)
    text = "".join(json.dumps({**obj, "reward": float(r)}) + "\n" for (obj, _), r in zip(rows, rewards))
    if args.out:  # no half-written output left behind (a full disk, --out a directory)
        from .data import atomic_write_text
        atomic_write_text(args.out, text)
        print(f"score: {len(rows)} lines, mean reward {float(rewards.mean()):.4f} -> {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":  # python -m pyllm.score ... == pyllm <command> ...
    from .cli import module_main
    raise SystemExit(module_main(__spec__.name))
