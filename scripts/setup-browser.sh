#!/usr/bin/env bash
# Install Debian's Chromium for the browser tests (tests/test_widget_browser.py).
# Idempotent and quiet: does nothing when /usr/bin/chromium already exists.
# Never runs `playwright install`: Playwright drives this system Chromium.
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null

if [ ! -x /usr/bin/chromium ]; then
  echo "setup-browser.sh: chromium did not install to /usr/bin/chromium" >&2
  exit 1
fi
