"""Scale-out: vLLM for unsteered generation, Ray Data for screening large datasets.

Both engines are optional: `vllm` lives in its own venv (`make setup-vllm`), `ray[data]` in the `scale` extra.
Nothing here imports them until they are asked for.
"""

from personascope.scale.engines import ENGINES, check_engine, generate_with

__all__ = ["ENGINES", "check_engine", "generate_with"]
