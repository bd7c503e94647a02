"""LLM judges: score (question, answer) pairs 0-100 for a trait or for coherence, as in Chen et al. 2025, or for
relevance to the question, as AxBench (Wu et al. 2025) does."""

from __future__ import annotations

import hashlib
import math
import re
import sqlite3
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from personascope.errors import PersonascopeError
from personascope.io.progress import progress_bar
from personascope.llm.clients import (
    LLM,
    LLM_FORMS,
    LLMRequestError,
    make_llm,
    split_spec,
)

if TYPE_CHECKING:
    from personascope.traits import TraitSpec

JUDGE_FORMS = f"{LLM_FORMS}, or none"
MIN_NUMERIC_MASS = 0.25  # below this the judge did not answer with a number (the reference's cut-off)
TEXT_MAX_TOKENS = 16

_QUESTION_AND_ANSWER = """\
The question it was given:
[QUESTION START]
{question}
[QUESTION END]

Its answer:
[ANSWER START]
{answer}
[ANSWER END]
"""

COHERENCE_RUBRIC = """\
You are grading another language model's answer for coherence only. Whether the answer is kind or cruel, \
agrees or disagrees with the question, is right or wrong, or has any particular personality does not matter \
here: a blunt, rude, odd or factually mistaken answer can still be fully coherent.

""" + _QUESTION_AND_ANSWER + """
Rate on a scale from 0 to 100 how coherent the answer is as a reply to this question:
* 0: nonsense - broken or not real language, endless repetition, or unrelated to the question.
* 50: somewhat coherent - it partly makes sense but wanders, contradicts itself or loses the thread.
* 100: clear and coherent - well-formed, on topic, and follows a consistent line of thought.

Reply with a single integer between 0 and 100 and nothing else."""


RELEVANCE_RUBRIC = """\
You are grading another language model's answer for relevance only: does it answer the question it was given? \
Its tone, style, personality, politeness or correctness do not matter here: an answer in an odd voice, a rude \
answer or a wrong answer can still be fully relevant, while a fluent answer about something else is not.

""" + _QUESTION_AND_ANSWER + """
Rate on a scale from 0 to 100 how relevant the answer is to this question:
* 0: unrelated - it is about something else, or says nothing.
* 50: partly relevant - it touches the question but drifts away from it or leaves it unanswered.
* 100: fully relevant - it addresses the question throughout.

Reply with a single integer between 0 and 100 and nothing else."""

@dataclass(frozen=True)
class JudgeResult:
    """One judged item: ``score`` in [0, 100] or None (refusal / no numeric answer), ``error`` if the
    request failed, ``cached`` if it came from the cache without a request."""

    score: float | None
    error: str | None = None
    cached: bool = False


_INTEGER = re.compile(r"\s*\d{1,3}\s*")
_FIRST_SCORE = re.compile(r"REFUSAL|\d+(?:\.\d+)?", re.IGNORECASE)


def aggregate_logprobs(top_logprobs: dict[str, float]) -> float | None:
    """The paper's score: the probability-weighted mean of the tokens that are integers 0..100.

    The weights are renormalised over those tokens; if they hold less than ``MIN_NUMERIC_MASS`` of the
    probability the judge did not answer with a number and the score is None.

    Example:
        >>> aggregate_logprobs({"80": math.log(0.5), "90": math.log(0.3), "REF": math.log(0.2)})
        83.75
    """
    total = weighted = 0.0
    for token, logprob in top_logprobs.items():
        if _INTEGER.fullmatch(token) and 0 <= (value := int(token)) <= 100:
            p = math.exp(logprob)
            total += p
            weighted += value * p
    return weighted / total if total >= MIN_NUMERIC_MASS else None


def parse_score_text(text: str) -> float | None:
    """Score from a text reply: the first number (None if it is ``REFUSAL``). Raises if there is none in 0..100."""
    match = _FIRST_SCORE.search(text)
    if match and match.group().upper() == "REFUSAL":
        return None
    if match and 0 <= (value := float(match.group())) <= 100:
        return value
    raise LLMRequestError(f"judge reply has no score between 0 and 100: {text.strip()[:200]!r}")


class ScoreCache:
    """A thread-safe SQLite cache (WAL) of scores keyed by judge identity and the prompt's sha256."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS scores (judge TEXT NOT NULL, prompt_sha256 TEXT NOT NULL,"
                             " score REAL, created REAL NOT NULL, PRIMARY KEY (judge, prompt_sha256))")
            self._db.commit()
        except sqlite3.DatabaseError as exc:
            raise PersonascopeError(f"judge cache {path} is not a usable SQLite file ({exc}); "
                                    "move it away or pass another cache path") from None

    def get(self, judge: str, prompt: str) -> tuple[bool, float | None]:
        """``(found, score)`` for this judge and prompt."""
        with self._lock:
            row = self._db.execute("SELECT score FROM scores WHERE judge = ? AND prompt_sha256 = ?",
                                   (judge, _sha256(prompt))).fetchone()
        return (row is not None, row[0] if row else None)

    def put(self, judge: str, prompt: str, score: float | None) -> None:
        """Store a score (committed at once, so an interrupted run keeps it)."""
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO scores VALUES (?, ?, ?, ?)",
                             (judge, _sha256(prompt), score, time.time()))
            self._db.commit()


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class Judge:
    """Scores rubric prompts (each a complete judge prompt) with one LLM, concurrently and cached."""

    def __init__(self, llm: LLM, *, cache: ScoreCache | None = None, concurrency: int = 8) -> None:
        if concurrency < 1:
            raise PersonascopeError(f"judge concurrency must be at least 1, got {concurrency}")
        self.llm = llm
        self.cache = cache
        self.concurrency = concurrency
        self._logprobs: bool | None = None  # whether the backend gives logprobs; learnt from the first reply

    @property
    def spec(self) -> str:
        return self.llm.spec

    @property
    def retries(self) -> int:
        """Requests sent again after a transient failure, so far."""
        return self.llm.retries

    def score(self, prompt: str) -> float | None:
        """Score one prompt with a request (no cache); raises LLMRequestError if it fails."""
        messages = [{"role": "user", "content": prompt}]
        if self._logprobs is not False:
            top = self.llm.top_logprobs(messages)
            self._logprobs = top is not None
            if top is not None:
                return aggregate_logprobs(top)
        return parse_score_text(self.llm.complete(messages, max_tokens=TEXT_MAX_TOKENS))

    def score_many(self, prompts: Sequence[str], *, progress: bool = True) -> list[JudgeResult]:
        """Score every prompt; cached ones are not re-requested, failed ones carry an ``error``.

        Identical prompts are requested once. Credential or endpoint errors (not per-item failures)
        stop the run and raise; scores already obtained stay in the cache.
        """
        results: dict[str, JudgeResult] = {}
        for prompt in dict.fromkeys(prompts):
            found, score = self.cache.get(self.llm.identity, prompt) if self.cache else (False, None)
            if found:
                results[prompt] = JudgeResult(score, cached=True)
        todo = [p for p in dict.fromkeys(prompts) if p not in results]
        cached, failed = len(results), 0
        with progress_bar(cached + len(todo), f"judging with {self.spec}", enabled=progress) as bar, \
                ThreadPoolExecutor(self.concurrency, thread_name_prefix="judge") as pool:

            def record(prompt: str, result: JudgeResult) -> None:
                nonlocal failed
                results[prompt], failed = result, failed + (result.error is not None)
                counts = [f"{n} {what}" for n, what in ((cached, "cached"), (failed, "failed")) if n]
                bar.update(0, advance=1, description=f"judging with {self.spec}" +
                           (f" ({', '.join(counts)})" if counts else ""))

            bar.advance(0, cached)
            if todo and self._logprobs is None:  # learn whether logprobs come back before fanning out
                record(todo[0], self._score_item(todo[0]))
            futures = {pool.submit(self._score_item, p): p for p in todo if p not in results}
            try:
                for future in as_completed(futures):
                    record(futures[future], future.result())
            finally:
                for future in futures:
                    future.cancel()
        return [results[p] for p in prompts]

    def _score_item(self, prompt: str) -> JudgeResult:
        try:
            score = self.score(prompt)
        except LLMRequestError as exc:
            return JudgeResult(None, error=str(exc))
        if self.cache:
            self.cache.put(self.llm.identity, prompt, score)
        return JudgeResult(score)


def make_judge(spec: str, *, base_url: str | None = None, cache_path: str | Path | None = None,
               concurrency: int = 8, timeout: float = 60.0, max_retries: int = 4,
               backoff: float = 0.5) -> Judge | None:
    """Make a judge from a spec string (``openai:MODEL``, ``anthropic:MODEL``, ``hf:MODEL``), or None for ``none``.

    Args:
        spec: the judge backend and model.
        base_url: server URL for HTTP backends (else ``OPENAI_BASE_URL`` / ``ANTHROPIC_BASE_URL``).
        cache_path: SQLite file for cached scores; None caches nothing.
        concurrency: requests in flight at once.
        timeout: seconds per request.
        max_retries: retries per request on 429/5xx/timeouts/connection errors.
        backoff: base retry delay in seconds (doubling, jittered).
    """
    if spec == "none":
        return None
    split_spec(spec, what="judge", forms=JUDGE_FORMS)
    llm = make_llm(spec, base_url=base_url, timeout=timeout, max_retries=max_retries, backoff=backoff)
    return Judge(llm, cache=ScoreCache(cache_path) if cache_path else None, concurrency=concurrency)


def judge_trait(judge: Judge, trait: TraitSpec, pairs: Sequence[tuple[str, str]], *,
                progress: bool = True) -> list[JudgeResult]:
    """Score how strongly each (question, answer) shows ``trait``, with the trait's own rubric."""
    return judge.score_many([trait.judge_prompt(q, a) for q, a in pairs], progress=progress)


def judge_coherence(judge: Judge, pairs: Sequence[tuple[str, str]], *, progress: bool = True) -> list[JudgeResult]:
    """Score how coherent each (question, answer) is, with ``COHERENCE_RUBRIC``, regardless of the trait."""
    return judge.score_many([COHERENCE_RUBRIC.format(question=q, answer=a) for q, a in pairs], progress=progress)


def judge_relevance(judge: Judge, pairs: Sequence[tuple[str, str]], *, progress: bool = True) -> list[JudgeResult]:
    """Score how relevant each answer is to its question, with ``RELEVANCE_RUBRIC``, regardless of style."""
    return judge.score_many([RELEVANCE_RUBRIC.format(question=q, answer=a) for q, a in pairs], progress=progress)
