"""personascope inside vLLM: per-request steering and monitoring as a plugin on the released package."""

from personascope.vllm_plugin.spec import EXTRA_KEY, PersonaSpec, Readings, SteerItem, parse_spec

__all__ = ["EXTRA_KEY", "PersonaSpec", "Readings", "SteerItem", "parse_spec"]
