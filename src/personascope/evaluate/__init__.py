"""Validation of a persona vector: held-out separation, likelihood margin, layer and coefficient search, report."""

from personascope.evaluate.result import EvalSettings, Evaluation
from personascope.evaluate.search import evaluate_run, evaluate_vector

__all__ = ["EvalSettings", "Evaluation", "evaluate_run", "evaluate_vector"]
