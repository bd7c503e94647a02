"""Extraction: from a trait to a persona vector over a resumable run directory (responses, judging, vectors)."""

from personascope.extract.pipeline import ExtractConfig, ExtractResult, extract
from personascope.extract.selection import PairSelection, select_pairs

__all__ = ["ExtractConfig", "ExtractResult", "PairSelection", "extract", "select_pairs"]
