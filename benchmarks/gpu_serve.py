"""The serving-engines benchmark on a CUDA GPU, in vLLM's default compiled mode (CUDA graphs): `serve --engine
hf`, `serve --engine vllm` with steering + monitoring on every request, and plain vLLM without the plugin, under
the same load. Target: steering + monitoring cost ≤ 5% of plain vLLM's tokens/s.

Prepared for a lent GPU machine with vLLM (CUDA build) and personascope installed (`make setup-vllm` there) and a
local model directory (no hub access needed):

    .venv-vllm/bin/python benchmarks/gpu_serve.py --model /models/Qwen2.5-7B-Instruct --json results/gpu_serve.json
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from serve_engines import parser, run


def main(argv: list[str] | None = None) -> dict[str, Any]:
    if not torch.cuda.is_available():
        sys.exit("gpu_serve.py needs a CUDA GPU (benchmarks/serve_engines.py runs on a CPU)")
    p = parser()
    p.set_defaults(clients=[64, 256], new_tokens=128, max_model_len=4096)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    main()
