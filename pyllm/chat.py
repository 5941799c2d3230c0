"""pyllm.chat — the chat template: messages -> (token ids, loss mask). Tests: tests/test_chat.py.

Template (csrc/run.c reproduces it with ids):  <|bos|> then per message  <|role|> content <|end|> ; with
add_generation_prompt a final <|assistant|>. The loss mask is 1 exactly on assistant content tokens and their
<|end|> (an assistant message with "weight": 0, OpenAI's format, excepted), 0 on everything else (bos, role tokens,
system and user turns). Content is encoded as plain text:
special-token text typed by a user ("<|end|>") never becomes a control token.
"""
from __future__ import annotations

from typing import Sequence

ROLES = ("system", "user", "assistant")


def _check(messages: Sequence[dict]) -> None:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError("messages must be a list of {'role', 'content'} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i}: expected a dict with 'role' and 'content', got {m!r:.80}")
        if m["role"] not in ROLES:
            raise ValueError(f"message {i}: unknown role {m['role']!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(m["content"], str):
            raise ValueError(f"message {i}: content must be a string, got {type(m['content']).__name__}")
        if m["role"] == "assistant" and not m["content"].strip():
            raise ValueError(f"message {i}: empty assistant content")


def render(messages: Sequence[dict], tokenizer, add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) of a conversation; see the module docstring for the template."""
    _check(messages)
    if not all(hasattr(tokenizer, a) for a in ("end_id", "bos_id", "role_id", "encode_batch")):
        raise TypeError(f"render: expected a chat tokenizer (pyllm.tokenizer.Tokenizer), got {type(tokenizer).__name__}")
    end = tokenizer.end_id
    ids, mask = [tokenizer.bos_id], [0]
    contents = tokenizer.encode_batch([m["content"] for m in messages]) if messages else []
    for m, body in zip(messages, contents):
        train = 1 if m["role"] == "assistant" and m.get("weight", 1) else 0   # (OpenAI's per-turn weight 0)
        ids.append(tokenizer.role_id(m["role"]))
        mask.append(0)
        ids.extend(body)
        ids.append(end)
        mask.extend([train] * (len(body) + 1))
    if add_generation_prompt:
        ids.append(tokenizer.role_id("assistant"))
        mask.append(0)
    return ids, mask


def render_prompt_completion(prompt: str | Sequence[dict], completion: str, tokenizer) -> tuple[list[int], list[int]]:
    """{"prompt", "completion"} as a conversation: a string prompt is one user turn (a message list is used as
    is); the completion is the assistant's reply."""
    if not isinstance(prompt, (str, Sequence)) or isinstance(prompt, bytes):  # None / 5: "not iterable"
        raise ValueError(f"prompt must be a string or a list of messages, got {type(prompt).__name__}")
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return render([*msgs, {"role": "assistant", "content": completion}], tokenizer)
