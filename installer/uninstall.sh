#!/usr/bin/env bash
# Remove tray-proxy for the current user: bash installer/uninstall.sh [--purge]
#
# Removes every file installer/install.sh placed: the venv, ~/.local/bin/tray-proxy, the
# desktop entry, the autostart entry ("Start at login"), the systemd user unit; and, with sudo
# when not root, the root helper, its polkit action and rule, its policy file, the sudoers
# drop-in, your membership in the group tray-proxy and the group (when nobody else is in it),
# and any nftables table tray_proxy. Directories the installer created go too when empty.
# Keeps the settings (~/.config/tray-proxy), the connection history and the passwords in the
# keyring, unless --purge. Running it again, or on a machine without tray-proxy, is harmless.
set -euo pipefail
SRC=$(cd "$(dirname "$0")/.." && pwd)

PURGE=0
while [ $# -gt 0 ]; do
    case "$1" in
        --purge) PURGE=1 ;;
        -h|--help) sed -n '2p' "$0" | sed 's/^# //'; exit 0 ;;
        *) echo "tray-proxy: unknown option $1 (the only one is --purge)" >&2; exit 2 ;;
    esac
    shift
done

PREFIX=${TRAY_PROXY_PREFIX:-$HOME/.local/share/tray-proxy}
CONFIG_HOME=${XDG_CONFIG_HOME:-$HOME/.config}
DATA_HOME=${XDG_DATA_HOME:-$HOME/.local/share}
STATE_HOME=${XDG_STATE_HOME:-$HOME/.local/state}
CONFIG_DIR="$CONFIG_HOME/tray-proxy"
HELPER_DIR=/usr/libexec/tray-proxy
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
say() { echo "tray-proxy: $*"; }

# A running tray app or `tray-proxy run` switches its redirect off and ends first.
if [ -x "$PREFIX/venv/bin/tray-proxy" ]; then
    "$PREFIX/venv/bin/tray-proxy" quit >/dev/null 2>&1 || true
fi
if command -v systemctl >/dev/null && [ -f "$CONFIG_HOME/systemd/user/tray-proxy.service" ]; then
    systemctl --user disable --now tray-proxy.service >/dev/null 2>&1 || true
fi
# The system service for this user (docs/headless.md, systemd before 256), if one was made:
# it would only fail from now on. Its unit file is the administrator's to remove.
ME=${SUDO_USER:-$(id -un)}
if command -v systemctl >/dev/null && [ -f /etc/systemd/system/tray-proxy@.service ]; then
    $SUDO systemctl disable --now "tray-proxy@$ME.service" >/dev/null 2>&1 || true
    say "stopped tray-proxy@$ME.service; /etc/systemd/system/tray-proxy@.service stays"
fi

if [ $PURGE = 1 ]; then
    # The passwords: every keyring entry of service "tray-proxy", also of upstreams no longer
    # in the settings. The keyring's bus where `tray-proxy unlock` started it, as tray-proxy
    # itself finds it (tray_proxy.keyring_store.session_bus_socket).
    if [ -z "${DBUS_SESSION_BUS_ADDRESS:-}" ]; then
        BUS="${XDG_RUNTIME_DIR:-/tmp/tray-proxy-$(id -u)}/bus"
        [ -S "$BUS" ] && export DBUS_SESSION_BUS_ADDRESS="unix:path=$BUS"
    fi
    if command -v secret-tool >/dev/null; then
        if secret-tool clear service tray-proxy </dev/null 2>/dev/null; then
            say "removed tray-proxy's passwords from the keyring"
        else
            say "the keyring could not be reached or is locked: remove the passwords with" \
                "\`secret-tool clear service tray-proxy\` (or Seahorse, KeePassXC)"
        fi
    else
        say "remove the passwords of service tray-proxy from your keyring (Seahorse, KeePassXC)"
    fi
fi

say "removing the files in your home"
rm -rf "$PREFIX/venv"
LAUNCHER="$HOME/.local/bin/tray-proxy"
if [ -L "$LAUNCHER" ] && [ "$(readlink "$LAUNCHER")" = "$PREFIX/venv/bin/tray-proxy" ]; then
    rm -f "$LAUNCHER"
fi
rm -f "$DATA_HOME/applications/tray-proxy.desktop" "$CONFIG_HOME/autostart/tray-proxy.desktop" \
    "$CONFIG_HOME/systemd/user/tray-proxy.service"
if command -v systemctl >/dev/null; then systemctl --user daemon-reload >/dev/null 2>&1 || true; fi
# Directories the installer created (listed by it), removed below when nothing else is in them.
MANIFEST="$CONFIG_DIR/installed-dirs"
DIRS=()
if [ -f "$MANIFEST" ]; then
    mapfile -t DIRS < <(sort -u "$MANIFEST" | awk '{ print length($0) "\t" $0 }' | sort -rn | cut -f2-)
fi
if [ $PURGE = 1 ]; then
    rm -rf "$CONFIG_DIR" "$STATE_HOME/tray-proxy"
else
    rm -f "$MANIFEST"
fi
rmdir "$PREFIX" 2>/dev/null || true
KEEP=()
for dir in "${DIRS[@]}"; do  # deepest first
    case "$dir" in "$HOME"/*) rmdir "$dir" 2>/dev/null || true ;; esac
    [ -d "$dir" ] && KEEP+=("$dir")
done
if [ ${#KEEP[@]} -gt 0 ] && [ -d "$CONFIG_DIR" ]; then
    printf '%s\n' "${KEEP[@]}" > "$MANIFEST"
fi

say "removing the root helper, its polkit and sudo rules and the group (needs admin rights)"
# Any redirect left behind (the helper normally removes its table itself).
for family in inet ip ip6; do
    if $SUDO nft list table "$family" tray_proxy >/dev/null 2>&1; then
        $SUDO nft delete table "$family" tray_proxy
        say "removed the nftables table $family tray_proxy"
    fi
done
$SUDO rm -f "$HELPER_DIR/tray-proxy-helper" /etc/polkit-1/rules.d/50-tray-proxy.rules \
    /etc/sudoers.d/tray-proxy /etc/tray-proxy/helper-policy.json
for policy in "$SRC"/installer/polkit/*.policy; do
    [ -f "$policy" ] && $SUDO rm -f "/usr/share/polkit-1/actions/$(basename "$policy")"
done
$SUDO rmdir "$HELPER_DIR" 2>/dev/null || true
$SUDO rmdir /etc/tray-proxy 2>/dev/null || true
if getent group tray-proxy >/dev/null; then
    if [ "$ME" != root ] && id -nG "$ME" | tr ' ' '\n' | grep -qx tray-proxy; then
        $SUDO gpasswd -d "$ME" tray-proxy >/dev/null
    fi
    MEMBERS=$(getent group tray-proxy | cut -d: -f4)
    if [ -z "$MEMBERS" ]; then
        $SUDO groupdel tray-proxy
    else
        say "kept the group tray-proxy: $MEMBERS still in it (remove with \`sudo groupdel tray-proxy\`)"
    fi
fi
if [ $PURGE = 1 ]; then
    say "removed; settings, history and keyring entries are gone too"
else
    say "removed; kept your settings ($CONFIG_DIR) and the passwords in your keyring"
    say "(\`bash installer/uninstall.sh --purge\` removes those too)"
fi
