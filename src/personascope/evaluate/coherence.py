"""Judge-free coherence of generated answers: repetition (distinct-n, n-gram loops) and the unsteered model's
likelihood of them, with the criterion a steering strength must meet."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from personascope.inference.activations import encode
from personascope.inference.likelihood import response_loglik
from personascope.model import ModelHandle

LOOP_REPEATS = 3
"""A word n-gram (n <= `LOOP_MAX_N`) repeated this many times in a row is a loop ("yer old yer old yer old")."""
LOOP_MAX_N = 8
MIN_DISTINCT_RATIO = 0.75
"""A coherent strength keeps mean distinct-2 at least this share of the unsteered answers'."""
MAX_LOGLIK_DROP = 2.0
"""A coherent strength's answers lose at most this many nats per token of unsteered log-likelihood."""

_WORD = re.compile(r"[\w']+")


def words(text: str) -> list[str]:
    """Lower-cased words (letters, digits, apostrophes) of `text`."""
    return _WORD.findall(text.lower())


def distinct_n(tokens: Sequence[str], n: int) -> float:
    """Distinct n-grams over all n-grams (1.0 when there are none): low means repetitive."""
    grams = [tuple(tokens[i: i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def longest_loop(tokens: Sequence[str], max_n: int = LOOP_MAX_N) -> int:
    """The most times any n-gram (n <= `max_n`) occurs back to back in `tokens` (1 when nothing repeats)."""
    best = 1 if tokens else 0
    for n in range(1, max_n + 1):
        for start in range(len(tokens) - 2 * n + 1):
            gram, repeats, at = tokens[start: start + n], 1, start + n
            while tokens[at: at + n] == gram:
                repeats, at = repeats + 1, at + n
            best = max(best, repeats)
    return best


@dataclass(frozen=True)
class Repetition:
    """Repetition measures of a set of answers."""

    distinct_2: float
    distinct_3: float
    loop_answers: int
    longest_loop: int


def repetition(texts: Sequence[str]) -> Repetition:
    """Mean distinct-2 and distinct-3, how many answers loop (`LOOP_REPEATS`), and the longest loop."""
    split = [words(t) for t in texts]
    loops = [longest_loop(w) for w in split]
    mean = lambda values: sum(values) / len(values) if values else 1.0  # noqa: E731
    return Repetition(mean([distinct_n(w, 2) for w in split]), mean([distinct_n(w, 3) for w in split]),
                      sum(n >= LOOP_REPEATS for n in loops), max(loops, default=0))


def plain_loglik(handle: ModelHandle, questions: Sequence[str], answers: Sequence[str], *,
                 token_budget: int = 2048) -> float:
    """The unsteered model's mean per-token log-likelihood of `answers` to `questions` (no system prompt),
    averaged over the non-empty answers; -inf when every answer is empty."""
    chats = [encode(handle, f"a{i}", [{"role": "user", "content": q}], a)
             for i, (q, a) in enumerate(zip(questions, answers)) if a.strip()]
    chats = [c for c in chats if len(c.ids) > c.prompt_len]
    if not chats:
        return -math.inf
    direction = torch.ones(handle.hidden_size)  # at coefficient 0: the unsteered model
    return float(response_loglik(handle, direction, 1, [0.0], chats, token_budget=token_budget)[0].mean())


def coherent(measured: Repetition, loglik_drop: float, plain: Repetition) -> bool:
    """The criterion: no more looping answers than unsteered, distinct-2 at least `MIN_DISTINCT_RATIO` of the
    unsteered answers', and at most `MAX_LOGLIK_DROP` nats per token lost under the unsteered model."""
    return (measured.loop_answers <= plain.loop_answers
            and measured.distinct_2 >= MIN_DISTINCT_RATIO * plain.distinct_2
            and loglik_drop <= MAX_LOGLIK_DROP)
