"""Validation of a persona vector: held-out separation, likelihood margin, layer and coefficient search, report."""

from personascope.evaluate.search import EvalSettings, evaluate_run, evaluate_vector

__all__ = ["EvalSettings", "evaluate_run", "evaluate_vector"]
