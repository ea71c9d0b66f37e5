"""Conversations as prompts: chat messages formatted with the target's chat template, and question
files in MT-Bench's layout.

A conversation is a list of `{"role", "content"}` messages (roles "system", "user", "assistant").
`encode` renders it with the tokenizer's chat template, ending with the assistant's turn opened
(`add_generation_prompt`), so the target continues as the assistant. MT-Bench questions are
`{"question_id", "category", "turns": [...]}` lines: each turn is a user message, answered in order,
every answer appended to the conversation before the next turn.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

ROLES = ("system", "user", "assistant")


def is_conversation(prompt: Any) -> bool:
    """True for a non-empty list of messages (mappings), the only prompt kind that is neither a
    string nor a token-id list."""
    return (isinstance(prompt, Sequence) and not isinstance(prompt, str) and len(prompt) > 0
            and all(isinstance(m, Mapping) for m in prompt))


def check_conversation(messages: Sequence[Mapping[str, Any]], where: str = "conversation") -> list[dict[str, str]]:
    """The messages as plain dicts; a message without a known role or a string content is a ValueError."""
    if not is_conversation(messages):
        raise ValueError(f"{where}: a conversation is a non-empty list of {{'role', 'content'}} messages")
    out = []
    for i, m in enumerate(messages):
        if m.get("role") not in ROLES or not isinstance(m.get("content"), str) or set(m) - {"role", "content"}:
            raise ValueError(f"{where}: message {i} must be {{'role': one of {', '.join(ROLES)}, "
                             f"'content': a string}}, got {dict(m)!r:.120}")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] == "assistant":
        raise ValueError(f"{where}: the last message is the assistant's; end with a user (or system) message "
                         "for the target to answer")
    return out


def encode(tokenizer: Any, messages: Sequence[Mapping[str, Any]], where: str = "conversation") -> list[int]:
    """The conversation's token ids, formatted by the tokenizer's chat template with the assistant's
    answer opened. A tokenizer without a chat template is a ValueError."""
    messages = check_conversation(messages, where)
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{where}: the target's tokenizer has no chat template, so it cannot format a "
                         "conversation; give the prompt as a string or token ids")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)  # the template writes every special token


def read_questions(path: str | os.PathLike) -> list[dict[str, Any]]:
    """MT-Bench-layout questions: `question_id`, `category` (default "general") and a non-empty list
    of string `turns` per line; blank lines are skipped, any other bad line is a ValueError naming it."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"question file {str(path)!r} does not exist")
    questions = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from e
        turns = row.get("turns") if isinstance(row, dict) else None
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t for t in turns):
            raise ValueError(f"{path}:{lineno}: a question needs 'turns', a non-empty list of non-empty strings")
        questions.append({"question_id": row.get("question_id", lineno), "category": str(row.get("category", "general")),
                          "turns": turns})
    if not questions:
        raise ValueError(f"question file {str(path)!r} holds no questions")
    return questions


def is_question_file(path: str | os.PathLike) -> bool:
    """True when the file's first non-blank line is an object with `turns` (MT-Bench's layout)."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(row, dict) and "turns" in row
    return False
