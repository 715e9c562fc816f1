"""`tray-proxy unlock`: make the keyring usable where no desktop does it (WSL, ssh, headless).

The once-per-boot step of docs/headless.md. In order:
1. a D-Bus session bus: the one in DBUS_SESSION_BUS_ADDRESS, else the one at
   `credentials.session_bus_socket()` ($XDG_RUNTIME_DIR/bus), else a new `dbus-daemon
   --session` started there, which outlives this command (until logout or reboot);
2. a Secret Service on it: running, or started through D-Bus activation (gnome-keyring
   installs the activation file; install.sh installs gnome-keyring);
3. its default collection unlocked. With GNOME Keyring the password is read here (from the
   terminal, or the first line of stdin when it is not one; never argv or environment) and
   handed to the daemon over the session bus in an encrypted Secret Service session; when
   there is no default collection yet, "login" is created with that password (asked twice).
   Another provider (KeePassXC, KWallet) shows its own unlock prompt.
An empty password is refused: GNOME Keyring would then keep the passwords unencrypted on disk,
and plaintext stays refused everywhere in tray-proxy. Running it when all is ready changes
nothing and asks nothing.

cli.py wires it in (`add_subcommand`, `run`). Must not import PySide6; jeepney and
secretstorage (keyring's own dependencies on Linux) are imported only when it runs.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tray_proxy.instance import ControlError
from tray_proxy.keyring_store import SESSION_BUS_ENV, adopt_session_bus, session_bus_socket

if TYPE_CHECKING:
    from jeepney.io.blocking import DBusConnection

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

COMMAND = "unlock"
SECRETS_NAME = "org.freedesktop.secrets"
SECRETS_PATH = "/org/freedesktop/secrets"
SERVICE_IFACE = "org.freedesktop.Secret.Service"
COLLECTION_IFACE = "org.freedesktop.Secret.Collection"
# GNOME Keyring's own interface for unlocking and creating a collection with a password given
# by the caller instead of its prompt (which needs a desktop; without one it is dismissed).
GNOME_IFACE = "org.gnome.keyring.InternalUnsupportedGuiltRiddenInterface"
GNOME_KEYRING_COMMS = ("gnome-keyring-d", "gnome-keyring-daemon")
NEW_COLLECTION_LABEL = "login"
BUS_START_TIMEOUT = 10.0
CALL_TIMEOUT = 20.0
_MAX_LINE = 4096


class UnlockError(Exception):
    """What went wrong, in words; `code` is the exit status."""

    def __init__(self, message: str, code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.code = code


def add_subcommand(
    subparsers: argparse._SubParsersAction[Any], common: argparse.ArgumentParser
) -> None:
    """Add `unlock`; `common` carries -v (and --config, which unlock does not need)."""
    subparsers.add_parser(
        COMMAND,
        parents=[common],
        help="unlock the keyring (once per boot where no desktop does it: WSL, ssh, headless)",
        description="Start a D-Bus session and a Secret Service keyring if none runs, and "
        "unlock it. The password is read from the terminal (or the first line of stdin), "
        "never from the command line. With no keyring yet, one is created with it.",
    )


def run(args: argparse.Namespace) -> int:
    del args
    try:
        for line in unlock():
            print(f"tray-proxy: {line}")
    except UnlockError as exc:
        print(f"tray-proxy: {exc}", file=sys.stderr)
        return exc.code
    except (KeyboardInterrupt, EOFError):  # Ctrl+C anywhere, Ctrl+D at the password prompt
        print("\ntray-proxy: cancelled; the keyring is as it was", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


# --------------------------------------------------------------------------- the bus


def unlock() -> Iterator[str]:
    """Do the three steps; yield one line of news per thing done."""
    started = yield from _ensure_bus()
    from jeepney.io.blocking import open_dbus_connection

    try:
        conn = open_dbus_connection(bus="SESSION")
    except (OSError, KeyError, ValueError) as exc:
        raise UnlockError(f"cannot connect to the D-Bus session bus ({exc})") from None
    with conn:
        provider = _ensure_secret_service(conn)
        if provider in GNOME_KEYRING_COMMS:
            yield from _unlock_gnome_keyring(conn)
        else:
            yield from _unlock_other(conn, provider)
    if started:
        address = os.environ[SESSION_BUS_ENV]
        yield (
            f"the keyring runs on the D-Bus session bus {address} until you log out or "
            "restart; tray-proxy finds it by itself, other programs (secret-tool, ...) "
            f"need: export {SESSION_BUS_ENV}={address}"
        )


def _connectable(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2.0)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def _ensure_bus() -> Generator[str, None, bool]:
    """A session bus in $DBUS_SESSION_BUS_ADDRESS; True (as the generator's value) when this
    command had to start it."""
    if os.environ.get(SESSION_BUS_ENV):
        return False
    if adopt_session_bus() is not None:
        return False
    try:
        path = session_bus_socket()
    except ControlError as exc:  # no home directory known
        raise UnlockError(str(exc)) from None
    _private_parent(path.parent)
    daemon = shutil.which("dbus-daemon")
    if daemon is None:
        raise UnlockError(
            "there is no D-Bus session and dbus-daemon is not installed: install the dbus "
            "package (`sudo apt-get install dbus`, or run installer/install.sh again)"
        )
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        # A socket of ours that nobody answers on: left by a bus that ended (e.g. WSL restart).
        if stat.S_ISSOCK(st.st_mode) and st.st_uid == os.getuid() and not _connectable(path):
            path.unlink()
        else:
            raise UnlockError(
                f"{path} exists but is not a D-Bus socket of yours that answers; remove it "
                "and run `tray-proxy unlock` again"
            )
    # --fork: the bus daemonizes (its own session), so it outlives this command and the
    # terminal; its stdio goes to /dev/null. Services it activates inherit our environment.
    done = subprocess.run(
        [daemon, "--session", "--fork", "--nopidfile", f"--address=unix:path={path}"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=BUS_START_TIMEOUT,
        check=False,
        start_new_session=True,
    )
    deadline = time.monotonic() + BUS_START_TIMEOUT
    while not (path.exists() and _connectable(path)):
        if done.returncode != 0 or time.monotonic() >= deadline:
            detail = done.stderr.decode("utf-8", "replace").strip().splitlines()[-1:]
            raise UnlockError(
                f"could not start a D-Bus session bus at {path}"
                + (f" ({detail[0]})" if detail else "")
            )
        time.sleep(0.05)
    os.environ[SESSION_BUS_ENV] = f"unix:path={path}"
    yield f"started a D-Bus session bus at {path}"
    return True


def _private_parent(directory: Path) -> None:
    """The bus socket's directory: made 0700 if missing; refused unless it is ours and
    private (in /tmp another user could have made it first, to listen in)."""
    with contextlib.suppress(FileExistsError):
        directory.mkdir(mode=0o700, parents=True)
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise UnlockError(
            f"{directory} is not a private directory of yours (owned by you, mode 0700, not a "
            "symlink); remove it or set XDG_RUNTIME_DIR, then run `tray-proxy unlock` again"
        )


# --------------------------------------------------------------------------- the service


def _bus_call(conn: DBusConnection, method: str, signature: str = "", *body: Any) -> Any:
    from jeepney import DBusAddress, new_method_call
    from jeepney.wrappers import unwrap_msg

    bus = DBusAddress(
        "/org/freedesktop/DBus", bus_name="org.freedesktop.DBus", interface="org.freedesktop.DBus"
    )
    reply = conn.send_and_get_reply(
        new_method_call(bus, method, signature, body), timeout=CALL_TIMEOUT
    )
    return unwrap_msg(reply)


def _ensure_secret_service(conn: DBusConnection) -> str:
    """The Secret Service's program name (/proc/PID/comm), started by D-Bus activation if
    it is not running."""
    from jeepney.wrappers import DBusErrorResponse

    try:
        if not _bus_call(conn, "NameHasOwner", "s", SECRETS_NAME)[0]:
            if SECRETS_NAME not in _bus_call(conn, "ListActivatableNames")[0]:
                raise UnlockError(
                    "no Secret Service keyring is installed: install gnome-keyring (`sudo "
                    "apt-get install gnome-keyring`, or run installer/install.sh again), or "
                    "start KeePassXC with its Secret Service integration enabled"
                )
            _bus_call(conn, "StartServiceByName", "su", SECRETS_NAME, 0)
        pid = int(_bus_call(conn, "GetConnectionUnixProcessID", "s", SECRETS_NAME)[0])
    except DBusErrorResponse as exc:
        raise UnlockError(f"the keyring could not be started: {exc.name}: {exc.data}") from None
    except TimeoutError:
        raise UnlockError(
            f"the D-Bus session bus did not answer within {CALL_TIMEOUT:g} s"
        ) from None
    try:
        return Path(f"/proc/{pid}/comm").read_text(encoding="utf-8").strip()
    except OSError:
        return "unknown"


def _service(conn: DBusConnection, interface: str, path: str = SECRETS_PATH) -> Any:
    from secretstorage.util import DBusAddressWrapper

    return DBusAddressWrapper(path, interface, conn)


def _unlock_gnome_keyring(conn: DBusConnection) -> Iterator[str]:
    from jeepney.wrappers import DBusErrorResponse
    from secretstorage.util import format_secret, open_session

    service = _service(conn, SERVICE_IFACE)
    gnome = _service(conn, GNOME_IFACE)
    try:
        (default,) = service.call("ReadAlias", "s", "default")
        if default != "/":
            collection = _service(conn, COLLECTION_IFACE, default)
            if not collection.get_property("Locked"):
                yield "the keyring is already unlocked"
                return
            password = _read_password(new=False)
            try:
                gnome.call(
                    "UnlockWithMasterPassword",
                    "o(oayays)",
                    default,
                    format_secret(open_session(conn), password, "text/plain"),
                )
            except DBusErrorResponse as exc:
                if "invalid" in str(exc.data).lower():
                    raise UnlockError(
                        "wrong keyring password; the keyring stays locked. Run `tray-proxy "
                        "unlock` again"
                    ) from None
                raise
            yield "the keyring is unlocked"
            return
        password = _read_password(new=True)
        label = ("s", NEW_COLLECTION_LABEL)
        (created,) = gnome.call(
            "CreateWithMasterPassword",
            "a{sv}(oayays)",
            {f"{COLLECTION_IFACE}.Label": label},
            format_secret(open_session(conn), password, "text/plain"),
        )
        service.call("SetAlias", "so", "default", created)
        yield (
            f'created the keyring "{NEW_COLLECTION_LABEL}" with that password and unlocked it; '
            "after each restart run `tray-proxy unlock` once"
        )
    except DBusErrorResponse as exc:
        raise UnlockError(f"the keyring (GNOME Keyring) refused: {exc.name}: {exc.data}") from None
    except TimeoutError:
        raise UnlockError(f"the keyring did not answer within {CALL_TIMEOUT:g} s") from None


def _unlock_other(conn: DBusConnection, provider: str) -> Iterator[str]:
    """KeePassXC, KWallet, ...: the Secret Service's own Unlock, with its own prompt."""
    import secretstorage
    from jeepney.wrappers import DBusErrorResponse

    try:
        collection = secretstorage.get_default_collection(conn)
        if not collection.is_locked():
            yield f"the keyring ({provider}) is already unlocked"
            return
        yield f"asking {provider} to unlock the keyring (answer its window)"
        with contextlib.suppress(TimeoutError):
            collection.unlock(timeout=120)
        locked = collection.is_locked()
    except (DBusErrorResponse, secretstorage.exceptions.SecretStorageException) as exc:
        raise UnlockError(f"the keyring ({provider}) failed: {exc}") from None
    if locked:
        raise UnlockError(f"the keyring ({provider}) stays locked: its unlock was dismissed")
    yield f"the keyring ({provider}) is unlocked"


# --------------------------------------------------------------------------- the password


def _read_password(*, new: bool) -> bytes:
    if sys.stdin is not None and sys.stdin.isatty():
        if new:
            print(
                "tray-proxy: no keyring yet; choose a password for it (you type it once per "
                "restart with `tray-proxy unlock`)"
            )
        first = getpass.getpass("Keyring password: ")
        _check(first)
        if new and getpass.getpass("Repeat it: ") != first:
            raise UnlockError("the two passwords differ; nothing was created", EXIT_USAGE)
        return first.encode("utf-8")
    stream = sys.stdin.buffer if sys.stdin is not None else None
    raw = stream.readline(_MAX_LINE + 1) if stream is not None else b""
    if len(raw) > _MAX_LINE:
        raise UnlockError(f"the password line on stdin is longer than {_MAX_LINE} bytes", 2)
    try:
        password = raw.decode("utf-8").removesuffix("\n").removesuffix("\r")
    except UnicodeDecodeError:
        raise UnlockError("the password on stdin is not UTF-8 text", EXIT_USAGE) from None
    if not password:
        raise UnlockError(
            "no keyring password: run `tray-proxy unlock` in a terminal to be asked, or pipe "
            "the password as the first line of stdin",
            EXIT_USAGE,
        )
    _check(password)
    return password.encode("utf-8")


def _check(password: str) -> None:
    if not password:
        raise UnlockError(
            "an empty keyring password would keep your passwords unencrypted on disk; choose one",
            EXIT_USAGE,
        )
    if "\0" in password:
        raise UnlockError("the password contains a NUL character", EXIT_USAGE)
