"""Repetition in generated answers: distinct-n and n-gram loops."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

LOOP_REPEATS = 3
"""A word n-gram (n <= `LOOP_MAX_N`) repeated this many times in a row, over at least `LOOP_MIN_WORDS` words, is a
loop ("yer old yer old yer old"); "aye, aye, aye" or "ha ha ha" is speech, not a loop."""
LOOP_MAX_N = 8
LOOP_MIN_WORDS = 6

_WORD = re.compile(r"[\w']+")


def words(text: str) -> list[str]:
    """Lower-cased words (letters, digits, apostrophes) of `text`."""
    return _WORD.findall(text.lower())


def distinct_n(tokens: Sequence[str], n: int) -> float:
    """Distinct n-grams over all n-grams (1.0 when there are none): low means repetitive."""
    grams = [tuple(tokens[i: i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def longest_loop(tokens: Sequence[str], max_n: int = LOOP_MAX_N) -> int:
    """The most times any n-gram (n <= `max_n`) occurs back to back in `tokens`, counting runs of at least
    `LOOP_MIN_WORDS` words (1 when nothing loops, 0 for no tokens)."""
    best = 1 if tokens else 0
    for n in range(1, max_n + 1):
        for start in range(len(tokens) - 2 * n + 1):
            gram, repeats, at = tokens[start: start + n], 1, start + n
            while tokens[at: at + n] == gram:
                repeats, at = repeats + 1, at + n
            if repeats * n >= LOOP_MIN_WORDS:
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
