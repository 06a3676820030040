"""Turning a generator's raw text into a rationale, and labelling bad outputs.

Reasoning models wrap their chain of thought in tags (`<think>...</think>`).
Which part is "the rationale" is a job choice (thinking, answer or both), so the
split is done here, once, for every backend.
"""
from __future__ import annotations

import re
from difflib import SequenceMatcher

DEFAULT_TAGS = (("<think>", "</think>"),)
USES = ("thinking", "answer", "both")


def split_thinking(text: str, tags=DEFAULT_TAGS) -> tuple[str | None, str]:
    """(thinking, answer), both stripped; thinking is None when the text has no
    thinking block. The first tag pair found in the text decides.

    - `<think>a</think>b`  -> ("a", "b")
    - `<think>a` (cut off before closing) -> ("a", "")
    - `a</think>b` (the chat template opened the tag, Qwen3 style) -> ("a", "b")
    """
    for open_tag, close_tag in tags:
        start = text.find(open_tag)
        if start >= 0:
            body_start = start + len(open_tag)
            end = text.find(close_tag, body_start)
            if end < 0:
                return text[body_start:].strip(), text[:start].strip()
            return text[body_start:end].strip(), (text[:start] + text[end + len(close_tag):]).strip()
        end = text.find(close_tag)
        if end >= 0:
            return text[:end].strip(), text[end + len(close_tag):].strip()
    return None, text.strip()


def select_rationale(text: str, use: str, tags=DEFAULT_TAGS) -> str:
    """The part of `text` used as the rationale; tags are never part of it.

    use="thinking" falls back to the answer when the text has no (or an empty)
    thinking block: a model that does not think writes its reasoning as its answer.
    """
    if use not in USES:
        raise ValueError(f"use must be one of {', '.join(USES)}; got {use!r}")
    thinking, answer = split_thinking(text, tags)
    if use == "answer":
        return answer
    if use == "thinking":
        return thinking or answer
    return "\n\n".join(part for part in (thinking, answer) if part)


_WORD = re.compile(r"[^\W_]+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def is_echo(text: str, prompt: str, min_share: float = 0.9, min_words: int = 3) -> bool:
    """True when at least `min_share` of the text's words are one contiguous run
    of the prompt's words (case, punctuation and spacing ignored). Texts shorter
    than `min_words` words are never called echoes: too little to tell."""
    words = _words(text)
    if len(words) < min_words:
        return False
    prompt_words = _words(prompt)
    # Word-level matching keeps this fast on long prompts (few repeats per word).
    match = SequenceMatcher(None, words, prompt_words, autojunk=False).find_longest_match(
        0, len(words), 0, len(prompt_words)
    )
    return match.size >= min_share * len(words)


def classify(text: str, finish_reason: str, prompt: str) -> str:
    """The candidate's finish_reason as stored: error | length | empty | echo | the
    backend's reason (normally stop)."""
    if finish_reason in ("error", "length"):
        return finish_reason
    if not text.strip():
        return "empty"
    if is_echo(text, prompt):
        return "echo"
    return finish_reason
