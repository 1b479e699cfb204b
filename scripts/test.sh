#!/usr/bin/env bash
# Set up everything the whole suite needs (Python packages, Chromium, Krita, a GIMP 3 chroot),
# then run every test. Extra arguments go to pytest (e.g. -m "not slow" for the fast ones).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
for extra in scripts/setup-browser.sh scripts/setup-editors.sh; do
  [ -f "$extra" ] && bash "$extra"
done
exec .venv/bin/python -m pytest -ra "$@"
