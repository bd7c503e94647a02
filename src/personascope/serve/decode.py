"""Per-row decoding pieces: sampling settings, next-token choice for a batch, and incremental text with stops."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class RowSampling:
    """One request's decoding: `temperature == 0` is greedy; `seed` None draws a fresh one."""

    max_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0

    def generator(self) -> torch.Generator | None:
        if self.temperature <= 0:
            return None
        return torch.Generator().manual_seed(self.seed if self.seed is not None else random.getrandbits(63))


def penalize_repeats(logits: Tensor, settings: list[RowSampling], history: list[list[int]]) -> Tensor:
    """`logits [B, V]` with each row's already-seen tokens penalised as transformers' repetition penalty does
    (positive logits divided by the penalty, negative ones multiplied)."""
    rows = [i for i, config in enumerate(settings) if config.repetition_penalty != 1.0 and history[i]]
    if not rows:
        return logits
    logits = logits.clone()
    for i in rows:
        seen = torch.tensor(sorted(set(history[i])), device=logits.device)
        values, penalty = logits[i, seen], settings[i].repetition_penalty
        logits[i, seen] = torch.where(values > 0, values / penalty, values * penalty)
    return logits


def penalize_counts(logits: Tensor, settings: list[RowSampling], answers: list[list[int]]) -> Tensor:
    """`logits [B, V]` less OpenAI's frequency and presence penalties over each row's answer so far
    (`frequency_penalty` × the token's count, plus `presence_penalty` once it has appeared)."""
    rows = [i for i, c in enumerate(settings) if (c.frequency_penalty or c.presence_penalty) and answers[i]]
    if not rows:
        return logits
    logits = logits.clone()
    for i in rows:
        ids, counts = torch.tensor(answers[i], device=logits.device).unique(return_counts=True)
        config = settings[i]
        logits[i, ids] -= counts.to(logits.dtype) * config.frequency_penalty + config.presence_penalty
    return logits


def next_tokens(logits: Tensor, settings: list[RowSampling], generators: list[torch.Generator | None],
                history: list[list[int]], answers: list[list[int]] | None = None) -> list[int | None]:
    """The next token of each row of `logits [B, V]` (after its repetition penalty over `history`, the row's
    prompt and answer so far, and its frequency and presence penalties over `answers`): argmax for greedy rows,
    temperature/top-p sampling else. None for a row whose distribution is unusable (NaN or +inf logits, or
    probabilities that do not sum to a positive number): that row fails, the others go on."""
    logits = penalize_repeats(logits, settings, history)
    if answers is not None:
        logits = penalize_counts(logits, settings, answers)
    broken = (torch.isnan(logits) | torch.isposinf(logits)).any(-1).tolist()
    greedy = logits.argmax(-1).tolist()
    chosen: list[int | None] = []
    for row, (config, generator) in enumerate(zip(settings, generators)):
        if broken[row]:
            chosen.append(None)
        elif generator is None:
            chosen.append(greedy[row])
        else:
            chosen.append(_sample(logits[row], config, generator))
    return chosen


def _sample(logits: Tensor, config: RowSampling, generator: torch.Generator) -> int | None:
    probs = torch.softmax(logits.float() / config.temperature, -1)
    if config.top_p < 1.0:
        ordered, order = probs.sort(descending=True)
        keep = ordered.cumsum(-1) - ordered < config.top_p  # the smallest prefix reaching top_p
        keep[0] = True  # the most likely token, however small top_p (below float32's least, it reads as 0)
        probs = torch.zeros_like(probs).scatter(0, order[keep], ordered[keep])
    total = float(probs.sum())
    if not torch.isfinite(probs).all() or not total > 0:
        return None
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


@dataclass
class TextStream:
    """Turns a growing token list into text deltas: holds back an incomplete character and any tail that may be
    the start of a stop string; `stopped` once a stop string appears (the text is cut before it)."""

    tokenizer: Any
    stops: tuple[str, ...] = ()
    tokens: list[int] = field(default_factory=list)
    sent: str = ""
    stopped: bool = False

    def push(self, token: int) -> str:
        """Add a token; the new text that is safe to send (may be empty)."""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        found = [at for at in (text.find(stop) for stop in self.stops) if at >= 0]
        if found:  # several stops: the earliest in the text wins, whatever their order in the list
            self.stopped = True
            return self._advance(text[:min(found)])
        hold = max((n for stop in self.stops for n in range(len(stop) - 1, 0, -1) if text.endswith(stop[:n])),
                   default=0)
        return self._advance(text[: len(text) - hold])

    def flush(self) -> str:
        """At the end: whatever was held back (a stop string's possible start that never completed)."""
        if self.stopped:
            return ""
        return self._advance(self.tokenizer.decode(self.tokens, skip_special_tokens=True))

    def _advance(self, text: str) -> str:
        if not text.startswith(self.sent) or len(text) <= len(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta
