#!/usr/bin/env bash
# Set up, then generate one image with the embedded default model and print where it was written.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >&2
exec .venv/bin/sdkit txt2img "${1:-a red circle on a blue background}" --seed "${SEED:-7}" --out "${OUT:-outputs}"
