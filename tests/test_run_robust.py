"""The C runtime's loader on hostile input: thousands of mutated headers, truncations, bit flips and foreign files
must each give one clean error (or load and run, when the mutation left a valid file), never a crash. Every batch
runs in a subprocess, so a segfault fails the test instead of killing pytest. Also an ASan/UBSan build.

Run: OMP_NUM_THREADS=1 PYTHONPATH=$PWD python -m pytest -q tests/test_run_robust.py
"""
from __future__ import annotations

import os
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyllm import runtime
from pyllm.export import write_llama2c, write_model_bin
from test_run import random_state_dict, tiny_config

pytestmark = pytest.mark.skipif(not runtime.LIB_PATH.exists(), reason="libpyllm_run.so not built")
ROOT = Path(__file__).resolve().parents[1]

INTERESTING_I32 = [0, 1, -1, 2, 3, 7, 64, 255, 256, 65535, 65536, 1 << 20, (1 << 24) + 1, 2**31 - 1, -2**31,
                   -65536, 12345678]
INTERESTING_F32 = [0.0, -1.0, float("nan"), float("inf"), -float("inf"), 1e-45, 1e30, 0.5, 2.0]


def base_files(d: Path, rng: torch.Generator) -> list[Path]:
    """Small valid files of every format (a few KB each)."""
    d.mkdir(parents=True, exist_ok=True)
    c = tiny_config(vocab_size=40, dim=16, n_heads=2, n_kv_heads=1, hidden_dim=32, n_layers=2, max_seq_len=8,
                    norm_eps=1e-5, rope_theta=10000.0)
    sd = random_state_dict(c, rng)
    tied = random_state_dict(c, rng, tied=True)
    out = [write_model_bin(d / "pyllm.bin", sd, c), write_model_bin(d / "pyllm_tied.bin", tied, c),
           write_model_bin(d / "pyllm_q8.bin", sd, c, quantize="q8_0", group_size=8),
           write_llama2c(d / "v0.bin", sd, c, 0), write_llama2c(d / "v0_tied.bin", tied, c, 0),
           write_llama2c(d / "v1.bin", sd, c, 1), write_llama2c(d / "v2.bin", sd, c, 2, group_size=8)]
    return out


def mutate(data: bytes, r: random.Random) -> bytes:
    """One random mutation: a header field set to an edge value, a truncation, bit flips, or appended bytes."""
    b = bytearray(data)
    if len(b) < 64:  # an earlier truncation left (almost) nothing: start from foreign bytes
        return r.randbytes(r.choice([0, 5, 28, 300]))
    kind = r.randrange(6)
    if kind == 0:  # an int32 header slot (pyllm/llama2.c headers keep all fields in the first 52 bytes)
        off = 4 * r.randrange(13)
        b[off:off + 4] = struct.pack("<i", r.choice(INTERESTING_I32) if r.random() < 0.8 else r.getrandbits(31))
    elif kind == 1:  # a float / byte slot, or the unaligned v2 group size
        off = r.choice([36, 40, 37, 44, 45, 48])
        if r.random() < 0.5:
            b[off:off + 4] = struct.pack("<f", r.choice(INTERESTING_F32))
        else:
            b[off] = r.randrange(256)
    elif kind == 2:  # truncation
        n = r.choice([0, 1, 4, 27, 28, 36, 255, 256, len(b) - 1, len(b) - 4, r.randrange(len(b))])
        del b[max(0, n):]
    elif kind == 3:  # bit flips in the header
        for _ in range(r.randint(1, 8)):
            i = r.randrange(min(64, len(b)))
            b[i] ^= 1 << r.randrange(8)
    elif kind == 4:  # bit flips anywhere
        for _ in range(r.randint(1, 16)):
            i = r.randrange(len(b))
            b[i] ^= 1 << r.randrange(8)
    else:  # trailing garbage, or a foreign file
        if r.random() < 0.5:
            b += bytes(r.randrange(256) for _ in range(r.choice([1, 3, 64, 300])))
        else:
            b = bytearray(r.randbytes(r.choice([0, 10, 28, 256, 4096])))
    return bytes(b)


def make_corpus(d: Path, n: int, seed: int) -> list[Path]:
    bases = base_files(d / "base", torch.Generator().manual_seed(seed))
    r = random.Random(seed)
    files = []
    for i in range(n):
        src = bases[i % len(bases)]
        p = d / f"m{i:05d}_{src.stem}.bin"
        data = src.read_bytes()
        for _ in range(1 + (r.random() < 0.3)):  # sometimes two mutations
            data = mutate(data, r)
        p.write_bytes(data)
        files.append(p)
    return bases + files


CHILD = r"""
import sys
from pyllm import runtime
ok = err = 0
for path in sys.argv[1:]:
    print("FILE", path, flush=True)
    try:
        m = runtime.Model(path)
    except ValueError as e:
        msg = str(e)
        assert "\n" not in msg and path in msg, msg
        err += 1
        continue
    for pos in range(min(3, m.seq_len)):
        m.forward(pos % m.vocab_size, pos)   # a file that loads must also run (NaN is fine, a crash is not)
    m.close()
    ok += 1
print("DONE", ok, err, flush=True)
"""


def run_child(files, timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", CHILD, *map(str, files)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_loader_survives_thousands_of_mutations(tmp_path):
    seed = int.from_bytes(os.urandom(4), "little")
    print("mutation seed", seed)
    files = make_corpus(tmp_path, 3000, seed)
    for i in range(0, len(files), 1000):  # batches: a crash names the file that caused it
        batch = files[i:i + 1000]
        r = run_child(batch)
        last = [ln for ln in r.stdout.splitlines() if ln.startswith("FILE")][-1:]
        assert r.returncode == 0, f"crash (rc {r.returncode}) on {last}: {r.stderr[-2000:]}"
        done = r.stdout.splitlines()[-1].split()
        assert done[0] == "DONE"
    # the valid base files all load; most mutations are rejected
    r = run_child(files[:7])
    assert r.stdout.splitlines()[-1] == "DONE 7 0", r.stdout + r.stderr


def test_specific_hostile_headers_give_clear_errors(tmp_path):
    files = base_files(tmp_path, torch.Generator().manual_seed(0))
    good = files[0].read_bytes()

    def load_err(data: bytes) -> str:
        p = tmp_path / "bad.bin"
        p.write_bytes(data)
        with pytest.raises(ValueError) as e:
            runtime.Model(p)
        return str(e.value)

    assert "too small" in load_err(b"")
    assert "truncated" in load_err(good[:-1])
    assert "trailing data" in load_err(good + b"\0")
    assert "version 2 is not supported" in load_err(good[:4] + struct.pack("<i", 2) + good[8:])
    assert "dim" in load_err(good[:8] + struct.pack("<i", 2**31 - 1) + good[12:])
    assert "vocab_size" in load_err(good[:28] + struct.pack("<i", -5) + good[32:])
    assert "norm_eps" in load_err(good[:36] + struct.pack("<f", float("nan")) + good[40:])
    assert "n_kv_heads" in load_err(good[:24] + struct.pack("<i", 3) + good[28:])
    assert "not a model file" in load_err(b"hello world, this is not a model at all" * 10)
    assert "llama2.c checkpoint version 7" in load_err(struct.pack("<Ii", 0x616B3432, 7) + b"\0" * 300)
    big = bytearray(files[3].read_bytes())  # v0: n_layers huge -> sizes vs file size, no allocation attempted
    big[8:12] = struct.pack("<i", 1000)
    assert "header implies" in load_err(bytes(big))


def test_binary_on_mutated_files(tmp_path):
    if not runtime.BIN_PATH.exists():
        pytest.skip("pyllm-run not built")
    files = make_corpus(tmp_path, 40, 7)
    tok = tmp_path / "tokenizer.bin"
    from pyllm.tokenizer import Tokenizer
    t = Tokenizer.byte_level()
    t.save_bin(tok)
    for f in files:
        r = subprocess.run([str(runtime.BIN_PATH), str(f), "-z", str(tok), "-n", "4", "-t", "0"], capture_output=True,
                           text=True, timeout=30, env={"OMP_NUM_THREADS": "1"})
        assert r.returncode in (0, 1), (f, r.returncode, r.stderr)
        if r.returncode == 1:
            assert r.stderr.count("\n") == 1 and r.stderr.startswith("pyllm-run: error: "), r.stderr


DRIVER = r"""
#include <stdio.h>
#include "run.h"
int main(int argc, char** argv) {
    int ok = 0, bad = 0;
    for (int i = 1; i < argc; i++) {
        char err[512];
        run_model* m = run_model_build(argv[i], err, sizeof err);
        if (!m) { bad++; continue; }
        int cfg[11];
        run_model_config(m, cfg, 11);
        for (int pos = 0; pos < 3 && pos < cfg[6]; pos++) {
            float* l = run_forward(m, pos % cfg[5], pos);
            if (l) run_sample(l, cfg[5], 0.8f, 0.9f, 5, 0.f, 42, pos);
        }
        run_model_free(m);
        ok++;
    }
    printf("ok %d bad %d\n", ok, bad);
    return 0;
}
"""


def test_asan_ubsan_build_on_mutated_files(tmp_path, asan_cc):
    cc = asan_cc
    drv = tmp_path / "driver.c"
    drv.write_text(DRIVER)
    csrc = ROOT / "csrc"
    srcs = [drv, csrc / "run.c", csrc / "model_file.c", csrc / "tokenizer.c", *sorted((csrc / "cpu").glob("*.c"))]
    exe = tmp_path / "driver"
    r = subprocess.run([cc, "-std=c11", "-O1", "-g", "-fopenmp", "-fsanitize=address,undefined",
                        "-fno-sanitize-recover=undefined", "-DPYLLM_RUN_LIBRARY", "-I", str(csrc),
                        *map(str, srcs), "-o", str(exe), "-lm"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    files = make_corpus(tmp_path / "corpus", 400, int.from_bytes(os.urandom(4), "little"))
    env = dict(os.environ, OMP_NUM_THREADS="1", ASAN_OPTIONS="detect_leaks=1:abort_on_error=0",
               UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1")
    r = subprocess.run([str(exe), *map(str, files)], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0 and "runtime error" not in r.stderr and "ERROR: AddressSanitizer" not in r.stderr, \
        r.stderr[-3000:]
    ok, bad = int(r.stdout.split()[1]), int(r.stdout.split()[3])
    assert ok >= 7 and bad > 100
