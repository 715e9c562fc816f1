#!/usr/bin/env bash
# Install tray-proxy for the current user: bash installer/install.sh [--no-start] [--wheels DIR]
#                                   remove it: bash installer/install.sh --uninstall [--purge]
#
# - system packages (nftables, python3-venv, polkit, and gnome-keyring where no other Secret
#   Service keyring is installed) through apt-get, with sudo when not root; skipped when all
#   are present, so a second run needs no network
# - a venv in ~/.local/share/tray-proxy/venv with this checkout installed into it (reinstalled
#   only when the checkout changed). --wheels DIR installs from the wheel files in DIR only, no
#   network (a machine that cannot reach PyPI yet): tray-proxy's own wheel when DIR has one,
#   else this checkout is built (then DIR needs setuptools>=77 and wheel too)
# - ~/.local/bin/tray-proxy, the desktop entry, and the systemd user unit (not enabled; see
#   docs/headless.md)
# - the root helper at /usr/libexec/tray-proxy/tray-proxy-helper (root-owned, 0755), its polkit
#   action and rule, its policy file /etc/tray-proxy/helper-policy.json, the group tray-proxy
#   (with you in it) and the sudoers drop-in (0440, checked with visudo first)
# Then, unless --no-start: with no settings yet, the keyring is made ready (`tray-proxy unlock`,
# which asks nothing when it is) and `tray-proxy setup` asks for the proxy; then the tray app
# starts (or the headless relay, `tray-proxy run`, where there is no display).
#
# Every step leaves a file alone when it already has the right content, owner and mode: a
# second run changes nothing. installer/uninstall.sh removes exactly what this placed.
set -euo pipefail
SRC=$(cd "$(dirname "$0")/.." && pwd)

usage() {
    sed -n '2,3p' "$0" | sed 's/^# \{0,1\}//'
}

START=1
WHEELS=""
while [ $# -gt 0 ]; do
    case "$1" in
        --uninstall) shift; exec bash "$SRC/installer/uninstall.sh" "$@" ;;
        --no-start) START=0 ;;
        --wheels) [ $# -ge 2 ] || { echo "tray-proxy: --wheels needs a directory" >&2; exit 2; }
                  WHEELS=$(cd "$2" && pwd); shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "tray-proxy: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

PREFIX=${TRAY_PROXY_PREFIX:-$HOME/.local/share/tray-proxy}
BIN_DIR="$HOME/.local/bin"
APPS_DIR="${XDG_DATA_HOME:-$HOME/.local/share}/applications"
UNIT_DIR="${XDG_CONFIG_HOME:-$HOME/.config}/systemd/user"
CONFIG_FILE="${XDG_CONFIG_HOME:-$HOME/.config}/tray-proxy/config.toml"
CONFIG_DIR=$(dirname "$CONFIG_FILE")
# Kept with the settings: an uninstall without --purge keeps the settings, and this tells the
# later --purge which of their parent directories the installer made.
MANIFEST="$CONFIG_DIR/installed-dirs"
HELPER=/usr/libexec/tray-proxy/tray-proxy-helper
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
say() { echo "tray-proxy: $*"; }

# Directories this installer creates are listed in $MANIFEST, so uninstall.sh removes them (when
# empty) and leaves the ones that were there before.
CREATED_DIRS=()
user_dir() {
    local dir=$1 up=$1 missing=()
    while [ ! -d "$up" ]; do missing+=("$up"); up=$(dirname "$up"); done
    [ ${#missing[@]} -eq 0 ] && return 0
    mkdir -p "$dir"
    CREATED_DIRS+=("${missing[@]}")
}

# place SRC DEST MODE: copy a file of the user's when DEST differs in content or mode.
place() {
    if cmp -s "$1" "$2" && [ "$(stat -c %a "$2")" = "${3#0}" ]; then return 0; fi
    install -m "$3" "$1" "$2"
}

# place_root SRC DEST MODE: the same for a root-owned system file.
place_root() {
    # As root: /etc/polkit-1/rules.d is readable by polkitd and root only.
    if $SUDO cmp -s "$1" "$2" 2>/dev/null \
            && [ "$($SUDO stat -c %a:%U:%G "$2")" = "${3#0}:root:root" ]; then
        return 0
    fi
    $SUDO install -o root -g root -m "$3" -D "$1" "$2"
}

# ---------------------------------------------------------------- system packages
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q '^install ok installed$'; }
PACKAGES=(python3 python3-venv nftables iproute2 libgl1 libegl1 libxkbcommon0 libxkbcommon-x11-0
    libfontconfig1 libdbus-1-3 libglib2.0-0 libxcb-cursor0 libxcb-icccm4 libxcb-keysyms1
    libxcb-shape0 libxcb-randr0 libxcb-render-util0 libxcb-image0 libxcb-xinerama0)
# A Secret Service for the passwords: KeePassXC or KWallet when the user has one, else
# gnome-keyring's secrets component, started on demand by `tray-proxy unlock` (docs/headless.md).
if command -v keepassxc >/dev/null || command -v kwalletd5 >/dev/null \
        || command -v kwalletd6 >/dev/null; then
    KEYRING_PROVIDER=other
    if command -v keepassxc >/dev/null; then
        say "keyring: KeePassXC is installed; enable its Secret Service integration (Settings >" \
            "Secret Service Integration) and keep a database open while tray-proxy runs"
    fi
else
    KEYRING_PROVIDER=gnome-keyring
    PACKAGES+=(dbus gnome-keyring libsecret-tools)
fi
MISSING=()
for pkg in "${PACKAGES[@]}"; do have_pkg "$pkg" || MISSING+=("$pkg"); done
# polkit is pkexec + polkitd (Debian 12, Ubuntu 23.04 on) or policykit-1 (older releases).
NEED_POLKIT=0
{ command -v pkexec >/dev/null && [ -x /usr/lib/polkit-1/polkitd ]; } || NEED_POLKIT=1
if [ ${#MISSING[@]} -gt 0 ] || [ $NEED_POLKIT = 1 ]; then
    say "installing system packages (needs admin rights)"
    $SUDO apt-get update -q
    if [ $NEED_POLKIT = 1 ]; then
        if apt-cache show polkitd >/dev/null 2>&1; then MISSING+=(pkexec polkitd)
        else MISSING+=(policykit-1); fi
    fi
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        "${MISSING[@]}"
else
    say "system packages: all present"
fi

# ---------------------------------------------------------------- the venv and the command
user_dir "$PREFIX"
user_dir "$BIN_DIR"
user_dir "$CONFIG_DIR"
# What is installed is this checkout's content: reinstall only when it changed.
STAMP=$(cd "$SRC" && find pyproject.toml tray_proxy resources -type f \
            ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 \
        | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)
if [ ! -x "$PREFIX/venv/bin/python" ]; then
    say "creating $PREFIX/venv"
    /usr/bin/python3 -m venv "$PREFIX/venv"
fi
if [ "$(cat "$PREFIX/venv/.tray-proxy-source" 2>/dev/null)" != "$STAMP" ]; then
    say "installing tray-proxy into $PREFIX/venv"
    PIP=("$PREFIX/venv/bin/python" -m pip install -q --disable-pip-version-check)
    if [ -n "$WHEELS" ]; then PIP+=(--no-index --find-links "$WHEELS"); fi
    # The version number does not change with the checkout: pip would call the old install
    # "already satisfied". Dependencies stay, so this costs only tray-proxy's own files.
    "$PREFIX/venv/bin/python" -m pip uninstall -q -y --disable-pip-version-check tray-proxy \
        >/dev/null 2>&1 || true
    if [ -n "$WHEELS" ] && compgen -G "$WHEELS/tray_proxy-*.whl" >/dev/null; then
        # An offline wheelhouse with tray-proxy's own wheel (built from this checkout).
        "${PIP[@]}" "tray-proxy[fast]"
    else
        # A copy of the checkout: pip's in-tree build writes build/ and *.egg-info next to
        # the source, which must stay as it is (and may not be writable).
        BUILD=$(mktemp -d)
        trap 'rm -rf "$BUILD"' EXIT
        (cd "$SRC" && tar -cf - --exclude=__pycache__ pyproject.toml README.md tray_proxy \
            resources) | tar -xf - -C "$BUILD"
        "${PIP[@]}" "$BUILD[fast]"
        rm -rf "$BUILD"
    fi
    echo "$STAMP" > "$PREFIX/venv/.tray-proxy-source"
else
    say "$PREFIX/venv is up to date"
fi
if [ "$(readlink "$BIN_DIR/tray-proxy" 2>/dev/null)" != "$PREFIX/venv/bin/tray-proxy" ]; then
    ln -sfn "$PREFIX/venv/bin/tray-proxy" "$BIN_DIR/tray-proxy"
fi

user_dir "$APPS_DIR"
place "$SRC/resources/tray-proxy.desktop" "$APPS_DIR/tray-proxy.desktop" 0644
# The headless service (docs/headless.md): placed, never enabled by the installer.
user_dir "$UNIT_DIR"
place "$SRC/installer/systemd/tray-proxy.service" "$UNIT_DIR/tray-proxy.service" 0644

# ---------------------------------------------------------------- the root parts
say "installing the root helper, its polkit and sudo rules (needs admin rights)"
place_root "$SRC/tray_proxy/firewall/helper.py" "$HELPER" 0755
for policy in "$SRC"/installer/polkit/*.policy; do
    [ -f "$policy" ] && place_root "$policy" "/usr/share/polkit-1/actions/$(basename "$policy")" 0644
done
# Members of the tray-proxy group start the helper without a password prompt (WSLg has no
# polkit authentication agent); everyone else gets the policy's admin prompt.
place_root "$SRC/installer/polkit/50-tray-proxy.rules" /etc/polkit-1/rules.d/50-tray-proxy.rules 0644
# What the helper may be asked to do, read by the helper only from this root-owned file.
if [ -f "$SRC/installer/helper-policy.json" ]; then
    place_root "$SRC/installer/helper-policy.json" /etc/tray-proxy/helper-policy.json 0644
fi
getent group tray-proxy >/dev/null || $SUDO groupadd --system tray-proxy
# The person who ran the installer, also when it runs under sudo.
ME=${SUDO_USER:-$(id -un)}
if [ "$ME" != root ]; then
    if ! id -nG "$ME" | tr ' ' '\n' | grep -qx tray-proxy; then
        $SUDO usermod -aG tray-proxy "$ME"
        say "added $ME to the group tray-proxy (takes effect at the next login)"
    fi
fi
# Where polkit is missing, sudo may start exactly the helper. A sudoers file with an error
# would lock sudo out entirely, so visudo checks it before it goes into place.
SUDOERS_SRC="$SRC/installer/sudoers/tray-proxy"
if [ -x /usr/sbin/visudo ] && [ -d /etc/sudoers.d ]; then
    if ! $SUDO cmp -s "$SUDOERS_SRC" /etc/sudoers.d/tray-proxy \
            || [ "$($SUDO stat -c %a:%U:%G /etc/sudoers.d/tray-proxy 2>/dev/null)" != 440:root:root ]; then
        # Check the very bytes that get installed (a copy nobody else can change meanwhile).
        TMP_SUDOERS=$(mktemp)
        cp "$SUDOERS_SRC" "$TMP_SUDOERS"
        if $SUDO /usr/sbin/visudo -cf "$TMP_SUDOERS" >/dev/null; then
            $SUDO install -o root -g root -m 0440 "$TMP_SUDOERS" /etc/sudoers.d/tray-proxy
        else
            echo "tray-proxy: visudo rejected $SUDOERS_SRC; the sudo fallback is not installed" >&2
        fi
        rm -f "$TMP_SUDOERS"
    fi
else
    say "sudo is not installed; only polkit can start the redirect helper"
fi

# The manifest last, so that it lists every directory created above.
if [ ${#CREATED_DIRS[@]} -gt 0 ]; then
    printf '%s\n' "${CREATED_DIRS[@]}" >> "$MANIFEST"
fi

# ---------------------------------------------------------------- first run, then start
TRAY_PROXY="$PREFIX/venv/bin/tray-proxy"
if [ $START = 0 ]; then
    say "installed. Start it with \`tray-proxy\` (tray app) or \`tray-proxy run\` (headless);"
    [ -f "$CONFIG_FILE" ] || say "first set up the proxy with \`tray-proxy setup\`"
    case ":$PATH:" in *":$BIN_DIR:"*) ;; *) say "add $BIN_DIR to your PATH" ;; esac
    exit 0
fi
if [ ! -f "$CONFIG_FILE" ]; then
    if [ ! -t 0 ]; then
        say "installed. No settings yet: run \`tray-proxy setup\` in a terminal (or \`tray-proxy"
        say "setup --proxy URL --user NAME --password-stdin --yes\`), then \`tray-proxy\`"
        exit 0
    fi
    if [ "$KEYRING_PROVIDER" = gnome-keyring ]; then
        # The password goes to the keyring: make sure one runs and is unlocked first.
        "$TRAY_PROXY" unlock
    fi
    say "no settings yet: setting up the proxy"
    "$TRAY_PROXY" setup
fi
if [ -z "${DISPLAY:-}${WAYLAND_DISPLAY:-}" ]; then
    say "installed; no display here, so starting the headless relay (Ctrl+C stops it)"
    exec "$TRAY_PROXY" run
fi
say "installed; starting the tray app"
exec "$TRAY_PROXY"
