"""Built-in verifiable task family for `pyllm demo`: arithmetic, string reversal, letter counting.

Every problem has a program-checked answer. Problems are split into train and held-out by a hash of the
problem itself, so a held-out problem can never appear in any training set (pretraining, SFT, RM or RL).
"""
from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

KINDS = ("add", "sub", "reverse", "count")
_WORDS = ("apple banana cherry dragon eagle forest garden harbor island jungle kettle lemon mango night ocean "
          "pepper quartz river stone tiger umbrella violet window yellow zebra").split()


@dataclass(frozen=True)
class Problem:
    kind: str
    question: str      # what the user asks
    answer: str        # the one correct reply

    @property
    def key(self) -> str:
        return f"{self.kind}|{self.question}"


def is_heldout(p: Problem, fraction: float = 0.1) -> bool:
    """Deterministic split by content: the same problem is always on the same side."""
    h = int.from_bytes(hashlib.blake2b(p.key.encode(), digest_size=8).digest(), "little")
    return (h % 10_000) < fraction * 10_000


def make_problem(rng: random.Random, kind: str | None = None, digits: int = 2) -> Problem:
    kind = kind or rng.choice(KINDS)
    hi = 10 ** digits - 1
    if kind == "add":
        a, b = rng.randint(0, hi), rng.randint(0, hi)
        return Problem(kind, f"What is {a}+{b}?", str(a + b))
    if kind == "sub":
        a, b = rng.randint(0, hi), rng.randint(0, hi)
        a, b = max(a, b), min(a, b)
        return Problem(kind, f"What is {a}-{b}?", str(a - b))
    if kind == "reverse":
        w = rng.choice(_WORDS)
        return Problem(kind, f"Reverse the word {w}.", w[::-1])
    if kind == "count":
        w = rng.choice(_WORDS)
        ch = rng.choice(sorted(set(w)))
        return Problem(kind, f"How many {ch} in {w}?", str(w.count(ch)))
    raise ValueError(f"unknown task kind {kind!r}; choose from {KINDS}")


def problems(seed: int, n: int, split: str = "train", kinds=KINDS, digits: int = 2) -> list[Problem]:
    """n distinct problems from one side of the split ('train' or 'heldout'), reproducible from seed."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    rng = random.Random(seed)
    out, seen = [], set()
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 200 * n + 10_000:
            raise ValueError(f"cannot draw {n} distinct {split} problems of kinds {kinds}")
        p = make_problem(rng, rng.choice(kinds), digits)
        if p.key in seen or is_heldout(p) != (split == "heldout"):
            continue
        seen.add(p.key)
        out.append(p)
    return out


def extract_answer(response: str) -> str:
    """The model's answer: the first line, stripped (the chat format ends a turn right after the answer)."""
    return response.strip().split("\n", 1)[0].strip()


def check(p: Problem, response: str) -> bool:
    return extract_answer(response) == p.answer


def format_valid(p: Problem, response: str) -> bool:
    """Is the reply of the right shape for its kind (a number, or a lowercase word)?"""
    a = extract_answer(response)
    if p.kind in ("add", "sub", "count"):
        return re.fullmatch(r"-?\d+", a) is not None
    return re.fullmatch(r"[a-z]+", a) is not None


def wrong_answer(p: Problem, rng: random.Random) -> str:
    """A plausible but wrong reply (for reward-model preference pairs)."""
    if p.kind in ("add", "sub", "count"):
        v = int(p.answer)
        for _ in range(100):
            w = v + rng.choice([-10, -2, -1, 1, 2, 10, 11])
            if w >= 0 and w != v:
                return str(w)
        return str(v + 1)
    s = list(p.answer)
    if len(s) >= 2:
        i = rng.randrange(len(s) - 1)
        s[i], s[i + 1] = s[i + 1], s[i]
        if "".join(s) != p.answer:
            return "".join(s)
    return p.answer + "x"


def few_shot_prompt(p: Problem, shots: list[Problem]) -> str:
    """A base-model prompt: worked examples as plain text, then the question."""
    lines = [f"Q: {s.question}\nA: {s.answer}\n" for s in shots]
    return "\n".join(lines) + f"\nQ: {p.question}\nA:"


def pretraining_corpus(seed: int, n_docs: int) -> list[str]:
    """Documents for the base model: worked problems written as plain text (train side only)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        ps = problems(rng.randrange(1 << 30), rng.randint(3, 8), "train")
        docs.append("\n".join(f"Q: {p.question}\nA: {p.answer}\n" for p in ps))
    return docs
