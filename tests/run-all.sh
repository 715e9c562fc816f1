#!/usr/bin/env bash
# The one test command (README, "Run the tests"): on a fresh Debian 12 machine as root it
# installs the system packages the tests need, makes the venv, runs every gate and exits
# non-zero if any of them fails. Usage: bash tests/run-all.sh [extra pytest args]
set -uo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
    python3 python3-venv python3-dev gcc
    nftables iproute2 procps psmisc kmod sudo
    squid dante-server apache2-utils redsocks
    curl openssl ca-certificates
    xvfb xauth libgl1 libegl1 libxkbcommon0 libxkbcommon-x11-0 libfontconfig1 libdbus-1-3
    libglib2.0-0 libxcb-cursor0 libxcb-icccm4 libxcb-keysyms1 libxcb-shape0 libxcb-randr0
    libxcb-render-util0 libxcb-image0 libxcb-xinerama0
    trayer xdotool x11-utils imagemagick
    dbus gnome-keyring libsecret-tools pkexec polkitd systemd passwd util-linux
    libkrb5-dev krb5-kdc krb5-admin-server krb5-user
)

step() { printf '\n==== %s\n' "$*"; }

if [ "$(id -u)" = 0 ]; then
    step "system packages"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q || exit 1
    apt-get install -y -q --no-install-recommends "${APT_PACKAGES[@]}" >/tmp/tray-proxy-apt.log 2>&1 \
        || { tail -n 30 /tmp/tray-proxy-apt.log; echo "apt-get install failed"; exit 1; }
else
    echo "not root: skipping apt-get; the lab tests need root and will say what is missing"
fi

PY=/usr/bin/python3
[ -x "$PY" ] || PY=$(command -v python3)
step "venv (.venv, $($PY --version))"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv || exit 1
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -e ".[test]" || { echo "pip install failed"; exit 1; }

failed=()
gate() {
    local name=$1; shift
    step "$name"
    if "$@"; then echo "ok: $name"; else echo "FAILED: $name"; failed+=("$name"); fi
}

gate "ruff check" .venv/bin/ruff check .
gate "ruff format --check" .venv/bin/ruff format --check .
gate "mypy" .venv/bin/mypy
gate "import-linter" .venv/bin/lint-imports
gate "protocol coverage (100% branches)" .venv/bin/python -m pytest -q -p no:cacheprovider \
    tests/relay/protocol --cov=tray_proxy.relay.protocol --cov-branch --cov-fail-under=100 \
    --cov-report=term-missing:skip-covered
gate "routing coverage (100% branches)" .venv/bin/python -m pytest -q -p no:cacheprovider \
    tests/routing --cov=tray_proxy.routing --cov-branch --cov-fail-under=100 \
    --cov-report=term-missing:skip-covered
gate "pytest" env QT_QPA_PLATFORM=offscreen .venv/bin/python -m pytest -p no:cacheprovider \
    --durations=15 "$@"

echo
if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED gates: ${failed[*]}"
    exit 1
fi
echo "all gates passed"
