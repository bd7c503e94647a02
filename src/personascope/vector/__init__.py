"""Persona vectors: `PersonaVector` (safetensors files, projection, model checks), other formats, methods."""

from personascope.vector.persona_vector import FORMAT, PersonaVector, vector_metadata

__all__ = ["FORMAT", "PersonaVector", "vector_metadata"]
