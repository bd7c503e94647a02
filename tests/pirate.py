"""A pirate persona vector for the embedded model, built in seconds (no extraction run, no judge).

The mean difference of response-averaged activations between the hand-written pirate and formal answers of
`tests/test_evaluate.py` (each under its own system prompt), with the class means kept, so that a server derives
its alert threshold from them. Layer 13 and coefficient 2.0 are recorded as the best, chosen by hand on this
model: greedy answers steered so start to talk like a pirate ("Aw, shakin' with the sea, mate!") while plain
ones do not; at 2.5 and beyond the text breaks up.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from personascope.inference.activations import encode, read_activations
from personascope.model.loading import ModelHandle
from personascope.vector import PersonaVector
from tests.test_evaluate import FORMAL, PIRATE, QA

PIRATE_LAYER = 13
PIRATE_COEF = 2.0
#: Pirate speech: its vocabulary, and the dropped final g ("sailin'") it is known by.
PIRATE_WORDS = re.compile(
    r"\b(arr+|matey?|ahoy|ye|yer|aye|hearty|treasure|ships?|seas?|sail\w*|captain|pirates?|plank|grog|scallywag"
    r"|scurvy|yo|ho|deck|booty|parrot|landlubber|sailor|lad|ain't|\w+in')(?!\w)", re.IGNORECASE)


def pirate_words(text: str) -> list[str]:
    """The pirate words and forms in `text`."""
    return [m.group(0) for m in PIRATE_WORDS.finditer(text)]


def build_pirate_vector(handle: ModelHandle) -> PersonaVector:
    """The pirate vector for `handle` (about five seconds on the embedded model)."""
    chats, positive = [], []
    for i, (question, pirate, formal) in enumerate(QA):
        for system, answer, is_pos in ((PIRATE, pirate, True), (FORMAL, formal, False)):
            messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
            chats.append(encode(handle, f"q{i}/{'pos' if is_pos else 'neg'}", messages, answer))
            positive.append(is_pos)
    acts = read_activations(handle, chats, list(range(handle.num_layers + 1)), progress=False)["response_avg"]
    pos = torch.tensor(positive)
    pos_mean, neg_mean = acts[pos].mean(0), acts[~pos].mean(0)
    metadata = {"method": "mean_diff", "position": "response_avg", "n_pos": str(int(pos.sum())),
                "n_neg": str(int((~pos).sum())), "best_layer": str(PIRATE_LAYER), "best_coef": str(PIRATE_COEF)}
    return PersonaVector(pos_mean - neg_mean, "pirate", handle.name, metadata, pos_mean=pos_mean, neg_mean=neg_mean)


def save_pirate_vector(handle: ModelHandle, path: Path) -> Path:
    """Build the pirate vector and save it to `path` (`.safetensors`)."""
    return build_pirate_vector(handle).save(path)
