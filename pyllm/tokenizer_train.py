"""`pyllm tokenizer-train`: train a BPE tokenizer on .txt/.jsonl inputs and save tokenizer.json (+ tokenizer.bin).

    pyllm tokenizer-train --input corpus/ --vocab-size 8192 --out tok/
"""
from __future__ import annotations

from pathlib import Path

from . import data
from .prepare import _unescape, add_input_arguments, check_vocab_size, refuse_foreign_out, train_tokenizer


def add_arguments(p):
    add_input_arguments(p)
    p.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size, special tokens included (4096)")
    p.add_argument("--out", default="tokenizer", help="output directory for tokenizer.json (default: tokenizer)")


def main(args) -> int:
    check_vocab_size(args.vocab_size)
    out = Path(args.out)
    refuse_foreign_out(out, "tokenizer-train")
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)  # before training: an --out that is a file fails at once, not after it
    try:
        files = data.expand_inputs(args.input)
        tok = train_tokenizer(files, args.vocab_size, skip_bad_lines=args.skip_bad_lines,
                              doc_sep=_unescape(args.doc_sep))
        # an earlier run's tokenizer.bin goes first: a kill between the two writes left it beside the new
        # tokenizer.json (another vocabulary under the same name); now it leaves no tokenizer.bin
        (out / "tokenizer.bin").unlink(missing_ok=True)
        tok.save(str(out))
        if hasattr(tok, "save_bin"):
            tok.save_bin(str(out / "tokenizer.bin"))
    except BaseException:
        if made and out.is_dir() and not any(out.iterdir()):  # a failed run left an empty --out behind
            out.rmdir()
        raise
    print(f"{out}: tokenizer with {tok.vocab_size} tokens, hash {data.tokenizer_hash(tok)}")
    return 0


if __name__ == "__main__":  # python -m pyllm.tokenizer_train ... == pyllm <command> ...
    from .cli import module_main
    raise SystemExit(module_main(__spec__.name))
