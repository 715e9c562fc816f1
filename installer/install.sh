#!/usr/bin/env bash
# Install tray-proxy for the current user and start it: bash installer/install.sh
#
# - system packages (nftables, python3-venv, ...) through apt-get, with sudo when not root
# - a venv in ~/.local/share/tray-proxy/venv with this checkout installed into it
# - ~/.local/bin/tray-proxy
# - the root helper at /usr/libexec/tray-proxy/tray-proxy-helper (root-owned, 0755), its polkit
#   action and rule, the group tray-proxy (with you in it) and the sudoers drop-in (0440, checked
#   with visudo first)
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
    libxkbcommon-x11-0 libfontconfig1 libdbus-1-3 libglib2.0-0 libxcb-cursor0 libxcb-icccm4 \
    libxcb-keysyms1 libxcb-shape0 libxcb-randr0 libxcb-render-util0 libxcb-image0 \
    libxcb-xinerama0

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
        [ -f "$policy" ] && $SUDO install -o root -g root -m 0644 -D -t /usr/share/polkit-1/actions "$policy"
    done
    # Members of the tray-proxy group start the helper without a password prompt (WSLg has no
    # polkit authentication agent); everyone else gets the policy's admin prompt.
    $SUDO install -o root -g root -m 0644 -D -t /etc/polkit-1/rules.d "$SRC/installer/polkit/50-tray-proxy.rules"
    getent group tray-proxy >/dev/null || $SUDO groupadd --system tray-proxy
    # The person who ran the installer, also when it runs under sudo.
    ME=${SUDO_USER:-$(id -un)}
    if [ "$ME" != root ]; then
        if ! id -nG "$ME" | tr ' ' '\n' | grep -qx tray-proxy; then
            $SUDO usermod -aG tray-proxy "$ME"
            echo "tray-proxy: added $ME to the group tray-proxy (takes effect at the next login)"
        fi
    fi
    # Where polkit is missing, sudo may start exactly the helper. A sudoers file with an error
    # would lock sudo out entirely, so visudo checks it before it goes into place.
    SUDOERS_SRC="$SRC/installer/sudoers/tray-proxy"
    if [ -x /usr/sbin/visudo ] && [ -d /etc/sudoers.d ]; then
        # Check the very bytes that get installed (a copy nobody else can change meanwhile).
        TMP_SUDOERS=$(mktemp)
        cp "$SUDOERS_SRC" "$TMP_SUDOERS"
        if $SUDO /usr/sbin/visudo -cf "$TMP_SUDOERS" >/dev/null; then
            $SUDO install -o root -g root -m 0440 "$TMP_SUDOERS" /etc/sudoers.d/tray-proxy
        else
            echo "tray-proxy: visudo rejected $SUDOERS_SRC; the sudo fallback is not installed" >&2
        fi
        rm -f "$TMP_SUDOERS"
    else
        echo "tray-proxy: sudo is not installed; only polkit can start the redirect helper"
    fi
fi

mkdir -p "$HOME/.local/share/applications"
install -m 0644 "$SRC/resources/tray-proxy.desktop" "$HOME/.local/share/applications/"

if [ -z "${DISPLAY:-}${WAYLAND_DISPLAY:-}" ]; then
    echo "tray-proxy: installed; no display here, so starting the headless relay (Ctrl+C stops it)"
    exec "$PREFIX/venv/bin/tray-proxy" run "$@"
fi
echo "tray-proxy: installed; starting the tray app"
exec "$PREFIX/venv/bin/tray-proxy" "$@"
