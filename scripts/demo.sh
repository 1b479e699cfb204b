#!/usr/bin/env bash
# Set up, then generate one image with the embedded default model: prints the image's path
# (stdout), the generation's progress bar and a one-line summary (stderr). The setup's own
# output is shown only if it fails.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! setup_log=$(bash scripts/setup.sh 2>&1); then
  printf '%s\n' "$setup_log" >&2
  echo "demo: scripts/setup.sh failed (output above)" >&2
  exit 1
fi
exec .venv/bin/sdkit txt2img "${1:-a red circle on a blue background}" --seed "${SEED:-7}" --out "${OUT:-outputs}"
