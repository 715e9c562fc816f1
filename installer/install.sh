#!/usr/bin/env bash
# Install tray-proxy for the current user and start it: bash installer/install.sh
#
# - system packages (nftables, python3-venv, ...) through apt-get, with sudo when not root
# - a venv in ~/.local/share/tray-proxy/venv with this checkout installed into it
# - ~/.local/bin/tray-proxy
# - the root helper at /usr/libexec/tray-proxy/tray-proxy-helper (root-owned, 0755) and its
#   polkit action, when the source tree has them
# Then it runs `tray-proxy run` (the headless relay) with the per-user config.
set -euo pipefail
SRC=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=${TRAY_PROXY_PREFIX:-$HOME/.local/share/tray-proxy}
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"

echo "tray-proxy: installing system packages (needs admin rights)"
$SUDO apt-get update -q
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    python3 python3-venv nftables iproute2 policykit-1 libgl1 libegl1 libxkbcommon0 \
    libxkbcommon-x11-0 libfontconfig1 libdbus-1-3 libglib2.0-0

echo "tray-proxy: creating $PREFIX/venv"
mkdir -p "$PREFIX" "$HOME/.local/bin"
/usr/bin/python3 -m venv "$PREFIX/venv"
"$PREFIX/venv/bin/python" -m pip install -q --upgrade pip
"$PREFIX/venv/bin/python" -m pip install -q "$SRC[fast]"
ln -sf "$PREFIX/venv/bin/tray-proxy" "$HOME/.local/bin/tray-proxy"

HELPER_SRC="$SRC/tray_proxy/firewall/helper.py"
if [ -f "$HELPER_SRC" ]; then
    echo "tray-proxy: installing the root helper"
    $SUDO install -o root -g root -m 0755 -D "$HELPER_SRC" /usr/libexec/tray-proxy/tray-proxy-helper
    for policy in "$SRC"/installer/polkit/*.policy; do
        [ -f "$policy" ] && $SUDO install -o root -g root -m 0644 "$policy" /usr/share/polkit-1/actions/
    done
fi

echo "tray-proxy: installed; starting it (Ctrl+C stops it)"
exec "$PREFIX/venv/bin/tray-proxy" run "$@"
