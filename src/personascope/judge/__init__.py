"""LLM judges: trait, coherence and relevance scores 0-100 for (question, answer) pairs, with a cache."""

from personascope.judge.judges import (
    Judge,
    JudgeResult,
    judge_coherence,
    judge_relevance,
    judge_trait,
    make_judge,
)

__all__ = ["Judge", "JudgeResult", "judge_coherence", "judge_relevance", "judge_trait", "make_judge"]
