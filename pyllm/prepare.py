"""`pyllm prepare`: text files -> tokenizer + token shards (train/val) in a data directory, in parallel, resumable.

    pyllm prepare --input corpus/ more/*.jsonl --out data/ --vocab-size 8192
    pyllm prepare --input tinyshakespeare.txt --byte-level --out data/ --doc-sep $'\\n\\n'
Resuming: rerun the same command; shards listed in data/manifest.json are kept, the rest is redone. A shard is
written to `<name>.tmp` and renamed, and only then recorded in the manifest (written atomically), so an interrupted
run never leaves a shard that looks complete but is not. Also holds `pyllm tokenizer-train` (pyllm/tokenizer_train.py).
"""
from __future__ import annotations

import codecs
import json
import os
import sys
from pathlib import Path

import numpy as np

from . import data
from .progress import Progress

_TOK = None  # the tokenizer inside a worker process


def _load_tokenizer(path):
    from .tokenizer import Tokenizer
    return Tokenizer.load(str(path))


def _worker_init(tok_path):
    global _TOK
    _TOK = _load_tokenizer(tok_path)


def _pool_init(tok_path):
    # Ctrl-C reaches the whole process group: a worker interrupted inside the result pipe printed its traceback and
    # could leave the pool's shutdown hanging on the pipe's lock; the main process alone handles it
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the same for a SIGTERM to the group: the main shuts them down
    _worker_init(tok_path)


def _encode_chunk(texts):
    """Each document -> int32 array [bos, tokens...]."""
    ids = _TOK.encode_batch(texts) if hasattr(_TOK, "encode_batch") else [_TOK.encode(t) for t in texts]
    bos = _TOK.bos_id
    return [np.asarray([bos] + list(x), np.int32) for x in ids]


def _chunks(items, max_chars: int = 1 << 18, max_docs: int = 256):
    """Group (index, split, text) into lists of about max_chars characters (the unit of parallel work)."""
    buf, n = [], 0
    for it in items:
        buf.append(it)
        n += len(it[2])
        if n >= max_chars or len(buf) >= max_docs:
            yield buf
            buf, n = [], 0
    if buf:
        yield buf


def get_tokenizer(out: Path, files, tokenizer=None, byte_level=False, vocab_size=4096, skip_bad_lines=False,
                  doc_sep="", resume=False):
    """The run's tokenizer: out/tokenizer.json on resume, else loaded, byte-level, or trained (the caller saves it,
    after the manifest)."""
    from .tokenizer import Tokenizer
    tj = out / "tokenizer.json"
    if resume and tj.is_file():
        return Tokenizer.load(str(tj))
    if tokenizer:
        tok = Tokenizer.load(str(tokenizer))
    elif byte_level:
        tok = Tokenizer.byte_level()
    else:
        tok = train_tokenizer(files, vocab_size, skip_bad_lines=skip_bad_lines, doc_sep=doc_sep)
    return tok


def _n_bytes(text: str) -> int:
    """The bar counts bytes, as its total (the files' sizes) does: counting characters, 4.5 MB of CJK text showed
    27% at the end of reading and an ETA 3x too long. isascii() is O(1) in CPython: the common case costs nothing."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "replace"))


def train_tokenizer(files, vocab_size: int, skip_bad_lines=False, doc_sep=""):
    from .tokenizer import Tokenizer
    st = data.InputStats()
    docs = data.iter_documents(files, st, skip_bad_lines=skip_bad_lines, doc_sep=doc_sep)
    total = sum(os.path.getsize(f) for f in files)
    bar = Progress(total=total, desc="tokenizer: reading", unit="B")

    def it():
        for d in docs:
            bar.update(_n_bytes(d))
            yield d
    tok = Tokenizer.train(iterator=it(), vocab_size=vocab_size)
    bar.close()
    if not st.chars:  # else a bytes-only tokenizer, written as if trained
        raise ValueError(f"{', '.join(map(str, files[:3]))}{' ...' if len(files) > 3 else ''}: no text to train a "
                         f"tokenizer on")
    return tok


def _verify_shards(out: Path, man: dict, mpath: Path) -> None:
    """Before resuming (or saying "nothing to do"): each listed shard must be there, whole, and from the manifest's
    tokenizer. From a split's first one that is not, that split's shards are deleted and dropped from the manifest,
    which is marked incomplete, so the run rebuilds them (a truncated or deleted shard was reported as "already
    prepared" and failed only in pretrain)."""
    broken, keep = {}, []
    for s in man["shards"]:
        sp = s["split"]
        if sp not in broken:
            try:
                h = data.read_header(out / s["file"])
                why = ("does not match the manifest" if (h["n_tokens"], h["tokenizer_hash"]) !=
                       (s["n_tokens"], man["tokenizer_hash"]) else "")
            except (OSError, ValueError) as e:
                why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                why = why.removeprefix(f"{out / s['file']}: ")
            if why:
                broken[sp] = why
                print(f"{out / s['file']}: {why}; rebuilding the {sp} split from this shard on", file=sys.stderr)
        if sp in broken:
            (out / s["file"]).unlink(missing_ok=True)
        else:
            keep.append(s)
    if broken:
        man["shards"], man["complete"] = keep, False
        data.atomic_write_text(mpath, json.dumps(man, indent=1))


def prepare(inputs, out, tokenizer=None, byte_level=False, vocab_size=4096, val_fraction=0.01, val_inputs=None,
            shard_tokens=1 << 24, workers=None, skip_bad_lines=False, doc_sep="", overwrite=False) -> dict:
    """Run (or resume) the preparation; returns the final manifest."""
    files = data.expand_inputs(inputs)
    val_files = data.expand_inputs(val_inputs) if val_inputs else []
    both = {os.path.realpath(f) for f in files} & {os.path.realpath(f) for f in val_files}
    if both:  # the validation loss would be measured on training documents
        raise ValueError(f"{sorted(both)[0]}: given in both --input and --val-input")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise ValueError(f"--shard-tokens must be positive, got {shard_tokens}")
    if workers is not None and workers < 0:
        raise ValueError(f"--workers must be >= 0 (0 = number of CPUs), got {workers}")
    if workers is not None and workers > max(8, os.cpu_count() or 1):
        # the pool forks them all at once: --workers 100000 forked processes until the machine ran out (and
        # 2^31 was an OverflowError traceback that left a half-made --out)
        raise ValueError(f"--workers must be <= {max(8, os.cpu_count() or 1)} (this machine's CPUs, or 8; more "
                         f"processes only wait for them), got {workers}")
    out = Path(out)
    given = Path(tokenizer) / "tokenizer.json" if tokenizer and Path(tokenizer).is_dir() else tokenizer
    given_is_out = bool(given) and os.path.realpath(given) == os.path.realpath(out / "tokenizer.json")
    refuse_foreign_out(out, "prepare", keep_tokenizer=given_is_out or overwrite)
    made_out = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    settings = dict(inputs=[_input_stamp(f) for f in files], val_inputs=[_input_stamp(f) for f in val_files],
                    tokenizer=str(tokenizer) if tokenizer else None, byte_level=byte_level,
                    vocab_size=vocab_size, val_fraction=val_fraction, shard_tokens=shard_tokens,
                    skip_bad_lines=skip_bad_lines, doc_sep=doc_sep,
                    tokenizer_hash=_tokenizer_hash(given))
    mpath = out / data.MANIFEST
    if overwrite and mpath.exists():  # leniently: a foreign or corrupt manifest is what --overwrite is for
        _remove_partial(out, False, keep_tokenizer=given_is_out)
    old = data.read_manifest(out) if mpath.is_file() else None
    if old is not None:
        changed = _changed_setting(old.get("settings"), settings)
        if changed:
            raise ValueError(f"{out}: holds data prepared with other settings or inputs ({changed}); use "
                             "--overwrite to replace it, or another --out")
    if old is not None:
        _verify_shards(out, old, mpath)
    if old is not None and old.get("complete"):
        _check_tokenizer_file(out, old)
        print(f"{out}: already prepared ({len(old['shards'])} shards); nothing to do")
        return old
    resume = old is not None
    try:
        return _prepare(out, mpath, old, settings, files, val_files, tokenizer, byte_level, vocab_size, val_fraction,
                        shard_tokens, workers, skip_bad_lines, doc_sep)
    except ValueError:  # bad input in a fresh run: nothing it made can be reused (the fixed input is another run)
        if not resume:  # (the user's --tokenizer may sit in --out: kept)
            _remove_partial(out, made_out, keep_tokenizer=given_is_out)
        raise


def _check_tokenizer_file(out: Path, man: dict) -> None:
    """A complete run's tokenizer.json against its manifest: missing, garbage or swapped for another tokenizer, the
    run was "already prepared" (exit 0) and only pretrain refused it."""
    from .tokenizer import Tokenizer
    tj = out / "tokenizer.json"
    if not tj.is_file():
        raise ValueError(f"{tj}: missing (the prepared shards' tokenizer); use --overwrite to prepare again")
    tok = Tokenizer.load(str(tj))  # its own one-line error for a file that is not a tokenizer
    if data.tokenizer_hash(tok) != man["tokenizer_hash"] or tok.vocab_size != man["vocab_size"]:
        raise ValueError(f"{tj}: does not match the manifest's tokenizer (edited or replaced since); use --overwrite")


def _input_stamp(f: str) -> list:
    """[path, size, mtime_ns] of an input: an edit that kept the size (apple -> mango) was not noticed, and a
    resumed run mixed the old text's shards with the new text's."""
    st = os.stat(f)
    return [f, st.st_size, st.st_mtime_ns]


def _tokenizer_hash(path) -> str | None:
    """The --tokenizer's hash (data.tokenizer_hash): the file edited since was not noticed (its path was all that
    was recorded). None when there is none or it does not load (get_tokenizer then says why)."""
    if not path:
        return None
    from .tokenizer import Tokenizer
    try:
        return data.tokenizer_hash(Tokenizer.load(str(path)))
    except (OSError, ValueError):
        return None


def _changed_setting(old, new: dict) -> str:
    """'' when a manifest's recorded settings match this run's, else what differs. Inputs compare by real path
    (in.txt and $PWD/in.txt are one file: an interrupted run's shards were thrown away); settings a manifest
    predates (an input's mtime, the --tokenizer's hash) are not compared."""
    if not isinstance(old, dict):
        return "no recorded settings"
    for k, v in new.items():
        if k not in old:
            continue
        o = old[k]
        if k in ("inputs", "val_inputs"):
            flag = "--input" if k == "inputs" else "--val-input"
            if not isinstance(o, list) or len(o) != len(v):
                return f"the {flag} files"
            for a, b in zip(o, v):
                if not isinstance(a, list) or len(a) < 2 or os.path.realpath(str(a[0])) != os.path.realpath(b[0]):
                    return f"the {flag} files"
                if a[1:] != b[1:len(a)]:
                    return f"{b[0]} changed since"
        elif k == "tokenizer":
            if (o is None) != (v is None) or (o and os.path.realpath(o) != os.path.realpath(v)):
                return "--tokenizer"
        elif o != v:
            return f"{'the --tokenizer file' if k == 'tokenizer_hash' else '--' + k.replace('_', '-')}"
    return ""


def refuse_foreign_out(out: Path, stage: str, keep_tokenizer: bool = False) -> None:
    """Before any work: an --out that holds a model checkpoint or a tokenizer.json that no data run there wrote
    (no manifest.json) would have its tokenizer replaced, or deleted by a failed run's clean-up (a checkpoint given
    as --out lost its tokenizer.json, or got one whose vocabulary no longer matched its config.json).
    keep_tokenizer: the run reads that tokenizer.json itself (--tokenizer) or was told to replace it (--overwrite)."""
    if not out.is_dir():
        return
    for f in ("config.json", "model.safetensors"):
        if (out / f).exists():
            raise ValueError(f"--out {out}: holds a model checkpoint ({f}); `pyllm {stage}` would replace its "
                             f"tokenizer.json: name another directory")
    if stage == "prepare" and not keep_tokenizer and (out / "tokenizer.json").exists() \
            and not (out / data.MANIFEST).exists():
        raise ValueError(f"--out {out}: holds a tokenizer.json that no `pyllm prepare` run there wrote; pass "
                         f"--tokenizer {out} to encode with it, --overwrite to replace it, or name another --out")
    if stage == "tokenizer-train" and (out / data.MANIFEST).exists():
        raise ValueError(f"--out {out}: holds prepared token shards (manifest.json) encoded with its tokenizer.json; "
                         f"name another directory")


def _remove_partial(out: Path, made_out: bool, keep_tokenizer: bool = False) -> None:
    """What a failed fresh run wrote: its shards, manifest and tokenizer files (and --out itself if it made it), so
    a rerun on the fixed input starts clean instead of refusing a half-made directory."""
    mpath = out / data.MANIFEST
    try:
        man = json.loads(mpath.read_text())
        shards = [s["file"] for s in man.get("shards", [])]
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        shards = []
    # this manifest is not checked (--overwrite past a corrupt one): a "file" that names a path outside --out
    # ("../other/train_00000.bin") had that file deleted, a "file" of 5 was a TypeError traceback
    shards = [f for f in shards if data.is_shard_name(f)]
    for name in [*shards, data.MANIFEST] + ([] if keep_tokenizer else ["tokenizer.json", "tokenizer_config.json"]):
        (out / name).unlink(missing_ok=True)
    if made_out:
        try:
            out.rmdir()
        except OSError:  # something else was put there meanwhile: leave it
            pass


def _prepare(out, mpath, old, settings, files, val_files, tokenizer, byte_level, vocab_size, val_fraction,
             shard_tokens, workers, skip_bad_lines, doc_sep) -> dict:
    resume = old is not None
    tok = get_tokenizer(out, files + val_files, tokenizer, byte_level, vocab_size, skip_bad_lines, doc_sep, resume)
    thash = data.tokenizer_hash(tok)
    man = old or dict(format="pyllm-tokens", version=data.VERSION, tokenizer_hash=thash, vocab_size=tok.vocab_size,
                      bos_id=tok.bos_id, dtype=np.dtype(data.token_dtype(tok.vocab_size)).name, settings=settings,
                      shards=[], complete=False)
    if man["tokenizer_hash"] != thash:
        raise ValueError(f"{out}/tokenizer.json does not match the manifest's tokenizer; use --overwrite")
    data.atomic_write_text(mpath, json.dumps(man, indent=1))
    # the manifest first: a run killed between the two left a tokenizer.json without one, which every rerun refused
    # ("holds a tokenizer.json that no `pyllm prepare` run there wrote"); a manifest without it resumes (the
    # tokenizer is made again: trained deterministically, or the same --tokenizer, checked against the hash above)
    if not (resume and (out / "tokenizer.json").is_file()):
        tok.save(str(out))
    done = {sp: max([s["doc_end"] for s in man["shards"] if s["split"] == sp], default=0) for sp in ("train", "val")}
    count = {sp: sum(s["split"] == sp for s in man["shards"]) for sp in ("train", "val")}
    if resume:
        print(f"{out}: resuming after {len(man['shards'])} complete shards")
    stats = data.InputStats()
    val_every = round(1 / val_fraction) if val_fraction > 0 else 0

    n_items = 0  # documents in the inputs, counted as they are read

    def items():
        nonlocal n_items
        for text in data.iter_documents(files, stats, skip_bad_lines, doc_sep):
            n = n_items
            yield n, ("val" if (not val_files and val_every and n % val_every == val_every - 1) else "train"), text
            n_items += 1
        for text in data.iter_documents(val_files, stats, skip_bad_lines, doc_sep):
            yield n_items, "val", text
            n_items += 1

    def needed():
        for i, sp, text in items():
            bar.update(_n_bytes(text))
            if i >= done[sp]:
                yield i, sp, text

    bufs = {sp: [] for sp in ("train", "val")}
    ntok = {sp: 0 for sp in ("train", "val")}
    last = {sp: done[sp] for sp in ("train", "val")}

    def flush(sp):
        if not bufs[sp]:
            return
        name = f"{sp}_{count[sp]:05d}.bin"
        toks = np.concatenate(bufs[sp])
        data.write_shard(out / name, toks, tok.vocab_size, thash, len(bufs[sp]))
        man["shards"].append(dict(file=name, split=sp, n_tokens=int(toks.size), n_docs=len(bufs[sp]),
                                  doc_end=last[sp]))
        data.atomic_write_text(mpath, json.dumps(man, indent=1))
        count[sp] += 1
        bufs[sp], ntok[sp] = [], 0
        bar.set_postfix(shards=len(man["shards"]))

    total = sum(os.path.getsize(f) for f in files + val_files)
    workers = workers or min(8, os.cpu_count() or 1)
    bar = Progress(total=total, desc="prepare", unit="B")
    tok_path = str(out / "tokenizer.json")
    pool = None
    if workers > 1:
        # concurrent.futures, not multiprocessing.Pool: a worker that dies (the OOM killer, kill -9) breaks the
        # executor, and the waiting result raises BrokenProcessPool; Pool silently replaced the worker and waited
        # for the lost chunk forever (prepare hung at 0% CPU)
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor
        pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn" if os.name == "nt" else "fork"),
                                   initializer=_pool_init, initargs=(tok_path,))
        results = _bounded_imap(pool, _run_chunk, _chunks(needed()), 4 * workers, out)
    else:
        _worker_init(tok_path)
        results = map(_run_chunk, _chunks(needed()))
    n_tokens = 0
    try:
        for chunk in results:
            for i, sp, arr in chunk:
                bufs[sp].append(arr)
                ntok[sp] += arr.size
                n_tokens += arr.size
                last[sp] = i + 1
                if ntok[sp] >= shard_tokens:
                    flush(sp)
            bar.set_postfix(tokens=n_tokens)
        for sp in ("train", "val"):
            flush(sp)
        bar.n = total  # all input read (the count above leaves out document separators and JSONL syntax)
    finally:
        if pool is not None:
            # waits only for the chunks already running (<= 256 KB of text each; the rest are cancelled). Killing
            # the workers instead (as Pool.terminate) hung the exit now and then: the executor's thread blocked
            # sending to a dead worker, and interpreter exit joins that thread.
            pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    if max(done.values()) > n_items:  # a resumed manifest past the inputs' end: the documents in between were
        raise ValueError(f"{mpath}: its shards end at document {max(done.values())} but the inputs hold "  # skipped
                         f"{n_items} (inputs changed since, or a corrupt manifest); rerun with --overwrite")
    if not any(s["split"] == "train" for s in man["shards"]):  # a run would fail later on an empty stream
        raise ValueError(f"{', '.join(map(str, files[:3]))}{' ...' if len(files) > 3 else ''}: no training text "
                         f"(no documents left after the validation split)")
    man["complete"] = True
    man["stats"] = stats.to_dict()
    data.atomic_write_text(mpath, json.dumps(man, indent=1))
    n = {sp: sum(s["n_tokens"] for s in man["shards"] if s["split"] == sp) for sp in ("train", "val")}
    print(f"{out}: {n['train']} train + {n['val']} val tokens in {len(man['shards'])} shards; {stats.docs} documents, "
          f"{stats.empty_files} empty files, {stats.empty_docs} empty documents, {stats.bad_utf8_docs} with invalid "
          f"UTF-8 (replaced), {stats.bad_lines} bad JSONL lines skipped; vocab {tok.vocab_size}")
    if n["val"] == 0 and (val_fraction > 0 or val_files):  # (--val-fraction 0 asked for none: no note)
        print(f"{out}: note: no validation documents (few documents; use --doc-sep, --val-input or --val-fraction)")
    return man


def _bounded_imap(pool, fn, items, depth: int, out):
    """Ordered map over a ProcessPoolExecutor that keeps at most `depth` chunks in flight (Executor.map would read
    the whole corpus ahead); a dead worker is a one-line error."""
    from collections import deque
    from concurrent.futures.process import BrokenProcessPool

    def get(fut):
        try:
            return fut.result()
        except BrokenProcessPool:
            from .cli import CLIError
            raise CLIError(f"{out}: a tokenizer worker process died (killed: out of memory? try fewer --workers); "
                           f"rerun the same command") from None
    pending = deque()
    for it in items:
        pending.append(pool.submit(fn, it))
        if len(pending) >= depth:
            yield get(pending.popleft())
    while pending:
        yield get(pending.popleft())


def _run_chunk(chunk):
    arrs = _encode_chunk([t for _, _, t in chunk])
    return [(i, sp, a) for (i, sp, _), a in zip(chunk, arrs)]


def _unescape(s: str) -> str:
    """--doc-sep's escapes ('\\n\\n') -> characters; other characters, non-ASCII ones included, stay as typed (a plain
    unicode_escape decode turned '東' into mojibake that never matched)."""
    if not s:
        return s
    try:
        return codecs.decode(s.encode("latin-1", "backslashreplace"), "unicode_escape")
    except UnicodeDecodeError as e:
        raise ValueError(f"--doc-sep {s!r}: bad escape ({e.reason})") from None


def add_input_arguments(p):
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help=".txt / .jsonl files (a \"text\" field per line), directories (searched recursively) or globs")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip (and count) JSONL lines that are not JSON or have no \"text\" instead of stopping")
    p.add_argument("--doc-sep", default="", metavar="STR",
                   help="split .txt files into documents on this string (escapes allowed, e.g. '\\n\\n'); "
                        "default: one document per file")


def add_arguments(p):
    add_input_arguments(p)
    p.add_argument("--out", default="data", help="output data directory (default: data)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--tokenizer", metavar="PATH", help="use this tokenizer.json instead of training one")
    g.add_argument("--byte-level", action="store_true", help="use the byte-level tokenizer (256 bytes + specials)")
    p.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size when training a tokenizer (4096)")
    p.add_argument("--val-fraction", type=float, default=0.01,
                   help="fraction of documents held out for validation, every round(1/f)-th document (0.01)")
    p.add_argument("--val-input", nargs="+", metavar="PATH", help="use these files as the validation split instead")
    p.add_argument("--shard-tokens", type=int, default=1 << 24, help="tokens per shard, about (16777216)")
    p.add_argument("--workers", type=int, default=0, help="encoding processes (0 = number of CPUs, max 8)")
    p.add_argument("--overwrite", action="store_true", help="replace data prepared with other settings in --out")


def check_vocab_size(v: int) -> None:
    """--vocab-size of a tokenizer to train (prepare, tokenizer-train)."""
    if v < 262:  # (was Tokenizer.train's message)
        raise ValueError(f"--vocab-size must be at least 262 (256 bytes + specials), got {v}")
    from .config import MAX_SIZES
    if v > MAX_SIZES["vocab_size"]:  # 2^31 aborted the process in the tokenizers library (a Rust panic, SIGABRT)
        raise ValueError(f"--vocab-size must be at most {MAX_SIZES['vocab_size']} (the model's and pyllm-run's "
                         f"limit), got {v}")


def main(args) -> int:
    if not args.tokenizer and not args.byte_level:
        check_vocab_size(args.vocab_size)
    prepare(args.input, args.out, tokenizer=args.tokenizer, byte_level=args.byte_level, vocab_size=args.vocab_size,
            val_fraction=args.val_fraction, val_inputs=args.val_input, shard_tokens=args.shard_tokens,
            workers=args.workers or None, skip_bad_lines=args.skip_bad_lines, doc_sep=_unescape(args.doc_sep),
            overwrite=args.overwrite)
    return 0


if __name__ == "__main__":  # python -m pyllm.prepare ... == pyllm <command> ...
    from .cli import module_main
    raise SystemExit(module_main(__spec__.name))
