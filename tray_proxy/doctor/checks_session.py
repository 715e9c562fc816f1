"""Doctor checks of the user's session: the D-Bus session bus, and the keyring that holds
the upstream passwords (usable, not plaintext, unlocked).

The keyring is asked in a daemon thread with a timeout (`import keyring` alone has hung for
minutes on WSL); it is never asked to unlock, so the doctor shows no prompt. keyring and
D-Bus read this process's environment (PYTHON_KEYRING_BACKEND, DBUS_SESSION_BUS_ADDRESS).

Must not import PySide6 or the relay engine; keyring only inside the worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from tray_proxy.config import ConfigError
from tray_proxy.doctor.context import DoctorEnv, in_thread
from tray_proxy.doctor.model import CheckResult, CheckStatus
from tray_proxy.keyring_store import BackendInfo, classify_backend, effective_backend
from tray_proxy.relay.secrets import SystemdCredentialSource

__all__ = [
    "KeyringState",
    "check_dbus",
    "check_keyring",
    "keyring_needed",
    "keyring_state",
    "session_bus_names",
]

SECRET_SERVICE = "keyring.backends.SecretService.Keyring"
SECRETS_BUS_NAME = "org.freedesktop.secrets"
TRAY_WATCHER = "org.kde.StatusNotifierWatcher"
DBUS_TIMEOUT = 5.0
KEYRING_TIMEOUT = 15.0
_START_KEYRING = (
    "start a Secret Service in your session: `gnome-keyring-daemon --replace --unlock "
    "--components=secrets` (type a keyring password, then Ctrl+D; package gnome-keyring), or "
    "enable KeePassXC's Secret Service integration (Settings > Secret Service Integration)"
)
_START_BUS = (
    "run `tray-proxy unlock`: it starts a session bus and the keyring where no desktop session"
    " runs (WSL, ssh), and tray-proxy finds that bus by itself; or log in to a desktop session"
)


@dataclass(frozen=True)
class KeyringState:
    """What the keyring is. `locked` None: not known (not a Secret Service, or not asked);
    `missing_collection`: a Secret Service without a default keyring yet; `error`: keyring
    could not be loaded or asked (words for the user)."""

    info: BackendInfo | None
    locked: bool | None = None
    missing_collection: bool = False
    error: str | None = None


def _read_keyring_state() -> KeyringState:
    try:
        import keyring

        backend = effective_backend(keyring.get_keyring())
    except Exception as exc:  # keyring raises anything for a backend it cannot load
        return KeyringState(None, error=f"keyring could not be loaded ({type(exc).__name__})")
    info = classify_backend(backend)
    if info.verdict != "secure" or info.name != SECRET_SERVICE:
        return KeyringState(info)
    try:
        import secretstorage
        from secretstorage.exceptions import ItemNotFoundException

        with contextlib.closing(secretstorage.dbus_init()) as conn:
            path = getattr(backend, "preferred_collection", None)
            try:
                collection = (
                    secretstorage.Collection(conn, path) if path else secretstorage.Collection(conn)
                )
            except ItemNotFoundException:
                # get_default_collection would create it, with a prompt: not from a doctor.
                return KeyringState(info, missing_collection=True)
            return KeyringState(info, locked=bool(collection.is_locked()))
    except Exception as exc:  # any D-Bus or Secret Service failure is the answer itself
        return KeyringState(info, error=f"the Secret Service failed ({type(exc).__name__})")


async def keyring_state(env: DoctorEnv) -> KeyringState:
    """The keyring as this run sees it, asked once and shared by the checks; raises
    asyncio.TimeoutError when it does not answer."""

    def ask() -> KeyringState:
        return env.memo("keyring", _read_keyring_state)

    return await in_thread(ask, KEYRING_TIMEOUT)


def keyring_needed(env: DoctorEnv) -> bool:
    """Does some upstream need a password that $CREDENTIALS_DIRECTORY does not hold?"""
    try:
        config = env.config()
    except ConfigError:
        return True
    systemd = SystemdCredentialSource(env.environ.get("CREDENTIALS_DIRECTORY") or None)
    return any(u.username and systemd.get(u.name, u.username) is None for u in config.upstreams)


def _bus_names(address: str, names: tuple[str, ...]) -> dict[str, bool]:
    from jeepney.bus_messages import message_bus
    from jeepney.io.blocking import open_dbus_connection

    with open_dbus_connection(bus=address, auth_timeout=DBUS_TIMEOUT) as conn:
        return {
            name: bool(
                conn.send_and_get_reply(message_bus.NameHasOwner(name), timeout=DBUS_TIMEOUT).body[
                    0
                ]
            )
            for name in names
        }


async def session_bus_names(env: DoctorEnv) -> dict[str, bool] | str:
    """Which of the Secret Service and the tray watcher own a name on the session bus, or
    why the bus cannot be reached (words). Asked once per run."""
    address = env.environ.get("DBUS_SESSION_BUS_ADDRESS", "")
    if not address:
        return "DBUS_SESSION_BUS_ADDRESS is not set"

    def ask() -> dict[str, bool] | str:
        def query() -> dict[str, bool] | str:
            try:
                return _bus_names(address, (SECRETS_BUS_NAME, TRAY_WATCHER))
            except Exception as exc:  # any connect/auth failure means "no usable bus"
                return f"the session bus at {address} does not answer ({type(exc).__name__})"

        return env.memo("bus", query)

    try:
        return await in_thread(ask, DBUS_TIMEOUT * 3)
    except asyncio.TimeoutError:
        return f"the session bus at {address} did not answer within {DBUS_TIMEOUT * 3:g} s"


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:  # missing, or a directory we may not look into
        return False


async def check_dbus(env: DoctorEnv) -> CheckResult:
    names = await session_bus_names(env)
    if isinstance(names, str):
        needed = keyring_needed(env)
        fix = _START_BUS
        # A systemd user session has a bus at $XDG_RUNTIME_DIR/bus even where the shell
        # (su, some WSL and ssh setups) did not export its address.
        runtime = env.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{env.uid}"
        bus = Path(runtime) / "bus"
        if not env.environ.get("DBUS_SESSION_BUS_ADDRESS") and _is_socket(bus):
            fix = (
                f"your session has a bus at {bus}: `export DBUS_SESSION_BUS_ADDRESS="
                f"unix:path={bus}` in the shell that starts tray-proxy (add it to ~/.profile)"
            )
        return CheckResult(
            "dbus",
            CheckStatus.FAIL if needed else CheckStatus.WARN,
            f"no D-Bus session: {names}; the keyring (Secret Service) cannot be reached"
            + ("" if needed else " (not needed now: no upstream password is read from it)"),
            fix=fix,
        )
    owner = "a Secret Service is on it" if names[SECRETS_BUS_NAME] else "no Secret Service on it"
    return CheckResult("dbus", CheckStatus.OK, f"D-Bus session bus reachable ({owner})")


async def check_keyring(env: DoctorEnv) -> CheckResult:
    needed = keyring_needed(env)
    bad = CheckStatus.FAIL if needed else CheckStatus.WARN
    tail = "" if needed else " (not needed now: no upstream password is read from it)"
    try:
        state = await keyring_state(env)
    except asyncio.TimeoutError:
        return CheckResult(
            "keyring",
            bad,
            f"the keyring did not answer within {KEYRING_TIMEOUT:g} s (a hung D-Bus service "
            "or an unanswered prompt)" + tail,
            fix="restart the keyring (log out and in again, or "
            "`gnome-keyring-daemon --replace --unlock --components=secrets`)",
        )
    info = state.info
    if info is None:
        return CheckResult("keyring", bad, f"{state.error}{tail}", fix=_START_KEYRING)
    if info.verdict == "plaintext":
        return CheckResult(
            "keyring",
            bad,
            f"the keyring backend {info.name} keeps passwords unencrypted ({info.reason}); "
            "tray-proxy refuses it" + tail,
            fix="use a secure keyring: unset PYTHON_KEYRING_BACKEND (and remove "
            "default-keyring from ~/.config/python_keyring/keyringrc.cfg, or uninstall "
            f"keyrings.alt), then {_START_KEYRING}",
        )
    if info.verdict == "none":
        return CheckResult(
            "keyring",
            bad,
            f"no secure keyring is available ({info.description}){tail}",
            fix=_START_KEYRING,
        )
    if state.error is not None:
        return CheckResult("keyring", bad, f"{state.error}{tail}", fix=_START_KEYRING)
    if state.missing_collection:
        return CheckResult(
            "keyring",
            CheckStatus.WARN,
            f"{info.description} has no default keyring yet: the first Save creates it and "
            "asks for a new keyring password in a window",
            fix="create it now: `gnome-keyring-daemon --replace --unlock --components=secrets` "
            "(type the new keyring password, then Ctrl+D), or Seahorse > Passwords and Keys",
        )
    if state.locked:
        return CheckResult(
            "keyring",
            bad,
            f"the keyring ({info.description}) is locked: tray-proxy cannot read the "
            f"passwords{tail}",
            fix='unlock it: Seahorse "Passwords and Keys", KeePassXC: open the database; '
            "without a desktop: `gnome-keyring-daemon --replace --unlock --components=secrets` "
            "(type the keyring password, then Ctrl+D)",
        )
    state_words = ", unlocked" if state.locked is False else ""
    return CheckResult("keyring", CheckStatus.OK, f"keyring: {info.description}{state_words}")
