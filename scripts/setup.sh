#!/usr/bin/env bash
# Create .venv with everything sdkit and its tests need. Idempotent: a second run is quick.
# torch is installed first, pinned to the CPU build that lies on our machines' disk, so the
# loose `torch>=` requirement of the package does not pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.sdkit-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "torch==${SDKIT_TORCH_VERSION:-2.13.0}"
  .venv/bin/python -m pip install -q -e '.[widgets,bridge,cluster,dev]'
  echo "$want" > "$stamp"
fi
