#!/usr/bin/env bash
# Install what the editor tests (tests/test_krita.py, tests/test_gimp.py) need on a
# fresh Debian 12 machine, idempotently:
#   - Krita 5.1.5 + PyQt5 from Debian 12 (kritarunner runs the plug-in headless; Xvfb
#     gives the full Krita a window for the undo test);
#   - a Debian 13 (trixie) chroot with GIMP 3 (Debian 12 only has GIMP 2.10).
# The chroot is cached under .cache/gimp3-chroot (gitignored), so local re-runs are
# quick; CI starts without it and builds it fresh.
#
# Usage: sudo scripts/setup-editors.sh [--krita-only|--gimp-only]
# Env:   SDKIT_GIMP_CHROOT  where the chroot lives (default: <repo>/.cache/gimp3-chroot)
#        DEBIAN_MIRROR      mirror for debootstrap (default: the one apt uses here)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CHROOT="${SDKIT_GIMP_CHROOT:-$REPO/.cache/gimp3-chroot}"
WANT_KRITA=1
WANT_GIMP=1
case "${1:-}" in
  --krita-only) WANT_GIMP=0 ;;
  --gimp-only) WANT_KRITA=0 ;;
  "") ;;
  *) echo "usage: $0 [--krita-only|--gimp-only]" >&2; exit 2 ;;
esac

if [ "$(id -u)" != 0 ]; then
  echo "setup-editors.sh: needs root (apt-get, debootstrap, chroot)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive

log() { echo "[setup-editors] $*"; }

# The Debian mirror this machine's apt already uses (deb822 .sources or one-line .list).
detect_mirror() {
  local uri=""
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -e "$f" ] || continue
    uri="$(awk '/^URIs:/ {for (i = 2; i <= NF; i++) if ($i ~ /\/debian\/?$/) {print $i; exit}}' "$f")"
    [ -n "$uri" ] && break
  done
  if [ -z "$uri" ]; then
    uri="$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
      | awk '$1 == "deb" {for (i = 2; i <= NF; i++) if ($i ~ /^https?:\/\/.*\/debian\/?$/) {print $i; exit}}' \
      | head -n1)"
  fi
  echo "${uri:-http://deb.debian.org/debian}"
}

apt_install() {
  # apt-get update only when the package lists are missing or a package is unknown.
  if ! apt-cache show "$@" >/dev/null 2>&1; then
    apt-get update
  fi
  apt-get install -y --no-install-recommends "$@"
}

need_host=()
if [ "$WANT_KRITA" = 1 ]; then
  command -v kritarunner >/dev/null || need_host+=(krita)
  dpkg -s python3-pyqt5 >/dev/null 2>&1 || need_host+=(python3-pyqt5)
  # Krita's Undo needs a window (tests/test_krita.py -k undo): a virtual X display.
  command -v xvfb-run >/dev/null || need_host+=(xvfb xauth)
fi
if [ "$WANT_GIMP" = 1 ]; then
  command -v debootstrap >/dev/null || need_host+=(debootstrap)
fi
if [ "${#need_host[@]}" -gt 0 ]; then
  log "installing on the host: ${need_host[*]}"
  # krita's Python plug-in support lives in the krita package and needs PyQt5;
  # recommends are left out on purpose (they pull in a desktop's worth of packages).
  apt_install "${need_host[@]}"
else
  [ "$WANT_KRITA" = 1 ] && log "krita already installed: $(dpkg-query -W -f='${Version}' krita)"
fi

[ "$WANT_GIMP" = 1 ] || exit 0

READY="$CHROOT/.sdkit-ready"
if [ -e "$READY" ] && [ -x "$CHROOT/usr/bin/gimp-console-3.0" ]; then
  log "GIMP 3 chroot already built at $CHROOT ($(cat "$READY"))"
  exit 0
fi

MIRROR="${DEBIAN_MIRROR:-$(detect_mirror)}"
mounted=()
cleanup() {
  local i
  for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do
    umount -l "${mounted[$i]}" 2>/dev/null || true
  done
}
trap cleanup EXIT

if [ ! -x "$CHROOT/usr/bin/apt-get" ] || [ ! -e "$CHROOT/.sdkit-debootstrap-done" ]; then
  log "debootstrap --variant=minbase trixie $CHROOT $MIRROR"
  rm -rf "$CHROOT"
  mkdir -p "$CHROOT"
  script=""
  # debootstrap releases that predate trixie know it only as "sid".
  [ -e /usr/share/debootstrap/scripts/trixie ] || script=/usr/share/debootstrap/scripts/sid
  debootstrap --variant=minbase trixie "$CHROOT" "$MIRROR" $script
  touch "$CHROOT/.sdkit-debootstrap-done"
fi

for d in proc dev; do
  mkdir -p "$CHROOT/$d"
  if ! mountpoint -q "$CHROOT/$d"; then
    if [ "$d" = proc ]; then mount -t proc proc "$CHROOT/proc"; else mount --bind /dev "$CHROOT/dev"; fi
    mounted+=("$CHROOT/$d")
  fi
done

log "installing gimp python3-gi gir1.2-gimp-3.0 in the chroot"
cp /etc/resolv.conf "$CHROOT/etc/resolv.conf" 2>/dev/null || true
chroot "$CHROOT" env DEBIAN_FRONTEND=noninteractive apt-get update
chroot "$CHROOT" env DEBIAN_FRONTEND=noninteractive \
  apt-get install -y --no-install-recommends gimp python3-gi gir1.2-gimp-3.0 gir1.2-gegl-0.4 \
  gir1.2-babl-0.1 gir1.2-gtk-3.0
chroot "$CHROOT" apt-get clean
version="$(chroot "$CHROOT" gimp-console-3.0 --version)"
echo "$version" >"$READY"
log "ready: $version"
