"""The keyring service: where upstream passwords live between runs, and how the relay gets them.

`CredentialStore` keeps one entry per upstream in the user's keyring through Python `keyring`:
service "tray-proxy", keyring user name = the upstream's name, secret = the JSON object
`{"version": 1, "username": ..., "password": ...}`. The proxy user name is stored with its
password because the two were entered (and tested) together: if the config's `username` is
later changed, sending the old password with the new name would only earn 407s and, on a
directory account, a lock-out. The config's `username`, when set, must therefore match the
stored one (`KeyringCredentialSource` returns nothing otherwise); when it is not set, the
stored user name is used. The upstream name is the lookup key because it is known before
anything is read, unique in the config and already restricted to a safe character set.

Every keyring call, `import keyring` included, runs in one worker thread owned by the store,
with a timeout: keyring over D-Bus can hang, and the import has hung for minutes on WSL with a
dead DISPLAY. A plaintext, failing or disabled backend is refused with a message that says how
to fix it; a locked Secret Service collection is unlocked through its own prompt if possible.

`KeyringCredentialSource` serves the relay's synchronous `CredentialSource.get` from memory;
`default_credential_source` puts it in the documented order with $CREDENTIALS_DIRECTORY.

Must not import PySide6, and must not import keyring at module level (only in the worker).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import queue
import socket
import stat
import threading
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar, cast

from tray_proxy.errors import UserError
from tray_proxy.relay.secrets import (
    ChainedCredentialSource,
    Credentials,
    CredentialSource,
    Secret,
    SystemdCredentialSource,
)

if TYPE_CHECKING:
    from tray_proxy.config import Config

__all__ = [
    "SERVICE",
    "AppCredentialSource",
    "BackendInfo",
    "CredentialStore",
    "CredentialStoreError",
    "KeyringAccessError",
    "KeyringCredentialSource",
    "KeyringLockedError",
    "KeyringTimeoutError",
    "NoKeyringError",
    "PlaintextKeyringError",
    "SESSION_BUS_ENV",
    "StoredEntryError",
    "adopt_session_bus",
    "classify_backend",
    "default_credential_source",
    "running_under_systemd",
    "session_bus_socket",
]

log = logging.getLogger(__name__)

SERVICE = "tray-proxy"
ENTRY_VERSION = 1
DEFAULT_TIMEOUT = 10.0
# A person may need a while to find and type the keyring password into the unlock prompt.
DEFAULT_UNLOCK_TIMEOUT = 120.0

_FIX_NO_KEYRING = (
    "run `tray-proxy unlock` (it starts GNOME Keyring, and a D-Bus session where there is "
    "none, and unlocks it; installer/install.sh installs gnome-keyring), or enable "
    "KeePassXC's Secret Service integration (Settings > Secret Service Integration), or "
    "KWallet; or run headless under systemd with the password as an encrypted credential "
    "(LoadCredentialEncrypted=NAME:..., read from $CREDENTIALS_DIRECTORY/NAME; "
    "docs/headless.md)"
)
_FIX_LOCKED = (
    "Unlock it: `tray-proxy unlock` in a terminal (where no desktop unlocks it at login: WSL, "
    'ssh), or Seahorse "Passwords and Keys", or KeePassXC: open the database; then try again'
)
SESSION_BUS_ENV = "DBUS_SESSION_BUS_ADDRESS"


# --------------------------------------------------------------------------- errors


class CredentialStoreError(UserError):
    """The keyring cannot be used right now. `str()` says what happened and what to do."""


class NoKeyringError(CredentialStoreError):
    """No usable keyring backend: keyring fell back to its `fail` or `null` backend."""


class PlaintextKeyringError(CredentialStoreError):
    """The backend keeps passwords unencrypted (or keyring itself does not recommend it)."""


class KeyringLockedError(CredentialStoreError):
    """The keyring is locked and was not unlocked (prompt dismissed or impossible)."""


class KeyringTimeoutError(CredentialStoreError):
    """The keyring did not answer in time (a hung D-Bus service, an unanswered prompt)."""


class KeyringAccessError(CredentialStoreError):
    """The backend failed in another way (its own message, with the secret scrubbed)."""


class StoredEntryError(CredentialStoreError):
    """An entry under service "tray-proxy" that tray-proxy did not write (or cannot read)."""


# --------------------------------------------------------------------------- backends


class _Backend(Protocol):
    """The part of `keyring.backend.KeyringBackend` the store uses."""

    def get_password(self, service: str, username: str) -> str | None: ...

    def set_password(self, service: str, username: str, password: str) -> None: ...

    def delete_password(self, service: str, username: str) -> None: ...


Verdict = Literal["secure", "plaintext", "none"]

# Backends shipped with keyring itself, by "module.Class".
_KNOWN_SECURE = {
    "keyring.backends.SecretService.Keyring": "Secret Service",
    "keyring.backends.libsecret.Keyring": "Secret Service (libsecret)",
    "keyring.backends.kwallet.DBusKeyring": "KWallet",
    "keyring.backends.kwallet.DBusKeyringKWallet4": "KWallet 4",
    "keyring.backends.macOS.Keyring": "macOS Keychain",
    "keyring.backends.Windows.WinVaultKeyring": "Windows Credential Manager",
}
_KNOWN_NONE = {
    "keyring.backends.fail.Keyring": "keyring found no backend at all",
    "keyring.backends.null.Keyring": "keyring is disabled (its null backend)",
}
_PLAINTEXT_WORDS = ("plaintext", "plain_text", "unencrypted", "insecure", "cleartext")
_SECRET_SERVICE_PROVIDERS = {
    "gnome-keyring-d": "GNOME Keyring",
    "gnome-keyring-daemon": "GNOME Keyring",
    "keepassxc": "KeePassXC",
    "kwalletd5": "KWallet",
    "kwalletd6": "KWallet",
    "ksecretd": "KWallet",
}


@dataclass(frozen=True)
class BackendInfo:
    """What a keyring backend is: its class path, words for the user, and the verdict."""

    name: str
    description: str
    verdict: Verdict
    reason: str = ""


def _class_path(backend: object) -> str:
    cls = type(backend)
    return f"{cls.__module__}.{cls.__qualname__}"


def _priority(backend: object) -> float | None:
    try:
        value = backend.priority  # type: ignore[attr-defined]
    except Exception:  # a backend's priority probes its service and may raise anything
        return None
    return float(value) if isinstance(value, (int, float)) else None


def effective_backend(backend: object) -> object:
    """The backend that would really hold the password.

    keyring's ChainerBackend writes to its first member that accepts the write and reads
    from all of them; the store uses that first member directly, so a plaintext member
    further down the chain can never answer a lookup.
    """
    if "Chainer" in type(backend).__name__:
        members = list(getattr(backend, "backends", ()) or ())
        if members:
            return members[0]
    return backend


def classify_backend(backend: object) -> BackendInfo:
    """Decide whether tray-proxy may keep corporate passwords in `backend`.

    In order: keyring's own fail/null backends (none); the backends shipped with keyring
    (secure); a class or module name saying it is plaintext, or a declared `scheme` saying
    "no encryption" (keyrings.alt's PlaintextKeyring declares both); then keyring's own
    recommendation line, `priority >= 1`, below which keyrings.alt puts all its file backends
    on purpose. A third-party backend above that line with no plaintext marker is accepted.
    """
    name = _class_path(backend)
    if "Chainer" in type(backend).__name__ and backend is effective_backend(backend):
        return BackendInfo(name, "no keyring (keyring found no usable backend)", "none")
    if name in _KNOWN_NONE:
        return BackendInfo(name, _KNOWN_NONE[name], "none")
    if name in _KNOWN_SECURE:
        return BackendInfo(name, _KNOWN_SECURE[name], "secure")
    lowered = name.lower()
    scheme = getattr(type(backend), "scheme", None)
    scheme_text = scheme.lower() if isinstance(scheme, str) else ""
    # "no enc": keyrings.alt's PlaintextKeyring declares scheme = "no encyption" (sic).
    if any(word in lowered for word in _PLAINTEXT_WORDS) or "no enc" in scheme_text:
        return BackendInfo(
            name, f"{name} (plaintext file)", "plaintext", "it stores passwords unencrypted"
        )
    priority = _priority(backend)
    if priority is None:
        return BackendInfo(name, f"{name} (not working)", "none")
    if priority < 1:
        return BackendInfo(
            name,
            f"{name} (not recommended by keyring)",
            "plaintext",
            f"keyring itself does not recommend it (priority {priority:g} < 1), as with the "
            "keyrings.alt file backends that keep passwords readable on disk",
        )
    return BackendInfo(name, name, "secure")


def _refusal(info: BackendInfo) -> CredentialStoreError | None:
    if info.verdict == "none":
        hint = ""
        if not os.environ.get(SESSION_BUS_ENV):
            hint = (
                " There is no D-Bus session (DBUS_SESSION_BUS_ADDRESS is not set, as on WSL "
                "or over ssh): `tray-proxy unlock` starts one that lasts until you log out."
            )
        return NoKeyringError(
            f"no secure keyring is available ({info.description}): {_FIX_NO_KEYRING}.{hint}"
        )
    if info.verdict == "plaintext":
        return PlaintextKeyringError(
            f"the keyring backend {info.name} is refused: {info.reason}. Corporate passwords "
            "must not sit readable on disk. Select a secure backend instead: uninstall "
            "keyrings.alt, or remove PYTHON_KEYRING_BACKEND / default-keyring in "
            f"keyringrc.cfg, and {_FIX_NO_KEYRING}"
        )
    return None


# --------------------------------------------------------------------------- the worker


T = TypeVar("T")


class _Worker:
    """One daemon thread that runs keyring calls in order.

    One thread, not a pool: a hung keyring then costs one thread, later calls time out
    behind it instead of piling up more hung threads, and calls never race inside a
    backend. Requests whose caller gave up before they started are skipped.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._queue: queue.SimpleQueue[tuple[concurrent.futures.Future[Any], Callable[[], Any]]]
        self._queue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, func: Callable[[], T]) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._lock:
            if self._thread is None:
                # daemon: a keyring call that never returns must not keep the process alive.
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
        self._queue.put((future, func))
        return future

    def _run(self) -> None:
        while True:
            future, func = self._queue.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = func()
            except BaseException as exc:  # handed to the caller, who decides
                future.set_exception(exc)
            else:
                future.set_result(result)
            del future, func


def session_bus_socket(environ: Mapping[str, str] | None = None, uid: int | None = None) -> Path:
    """Where `tray-proxy unlock` starts a D-Bus session bus when none runs, and where the store
    looks for one when DBUS_SESSION_BUS_ADDRESS is not set: $XDG_RUNTIME_DIR/bus (systemd's
    user session puts its bus there too), else `bus` in the 0700 directory under the user's
    home that holds the control socket (`control.home_control_dir`). Not /tmp: another user
    could make /tmp/tray-proxy-UID first and so block `tray-proxy unlock` for good.
    Raises ControlError when no home directory is known."""
    from tray_proxy.instance import home_control_dir

    env = os.environ if environ is None else environ
    runtime = env.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "bus"
    return home_control_dir(env, os.getuid() if uid is None else uid) / "bus"


def adopt_session_bus(environ: MutableMapping[str, str] | None = None) -> str | None:
    """Point DBUS_SESSION_BUS_ADDRESS at `session_bus_socket()` when it is unset and a socket
    of this user answers there (started by `tray-proxy unlock` in another terminal, or by
    systemd), so the keyring is found without the user exporting anything. Returns the
    address it set, or None."""
    env = os.environ if environ is None else environ
    if env.get(SESSION_BUS_ENV):
        return None
    from tray_proxy.instance import ControlError

    try:
        path = session_bus_socket(env)
    except ControlError:  # no home directory known: nothing of ours to adopt
        return None
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.getuid():
        return None
    # A socket left by a bus that ended (WSL restarted, the user logged out) answers nothing.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return None
    address = f"unix:path={path}"
    env[SESSION_BUS_ENV] = address
    return address


def _default_backend(redetect: bool) -> _Backend:
    adopt_session_bus()
    import keyring
    import keyring.backend
    import keyring.core

    if redetect:
        # keyring caches the viable backends for the life of the process; the user may
        # have started gnome-keyring since the last attempt.
        cached = getattr(keyring.backend.get_all_keyring, "cache_clear", None)
        if cached is not None:
            cached()
        keyring.core.init_backend()
    backend: _Backend = keyring.get_keyring()
    return backend


def _secret_service_provider() -> str | None:
    """Which program owns org.freedesktop.secrets on the session bus (best effort)."""
    try:
        from jeepney.bus_messages import message_bus
        from jeepney.io.blocking import open_dbus_connection

        with open_dbus_connection(bus="SESSION") as conn:
            msg = message_bus.GetConnectionUnixProcessID("org.freedesktop.secrets")
            pid = conn.send_and_get_reply(msg, timeout=2.0).body[0]
        comm = Path(f"/proc/{int(pid)}/comm").read_text(encoding="utf-8").strip()
    except Exception:  # only decorates a description; any failure means "unknown"
        return None
    return _SECRET_SERVICE_PROVIDERS.get(comm, comm or None)


# --------------------------------------------------------------------------- the store


class CredentialStore:
    """Upstream credentials in the user's keyring. All methods are coroutines; none blocks.

    `backend_factory(redetect)` returns the keyring backend; it runs in the worker thread
    (tests pass in-memory fakes). The default imports keyring there, lazily.
    """

    def __init__(
        self,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        unlock_timeout: float = DEFAULT_UNLOCK_TIMEOUT,
        backend_factory: Callable[[bool], object] | None = None,
        service: str = SERVICE,
    ) -> None:
        self.timeout = timeout
        self.unlock_timeout = unlock_timeout
        self.service = service
        self._factory = backend_factory or _default_backend
        self._worker = _Worker("tray-proxy-keyring")
        # Touched only in the worker thread.
        self._backend: _Backend | None = None
        self._info: BackendInfo | None = None

    def __repr__(self) -> str:
        return f"<CredentialStore service={self.service!r}>"

    # -- running things in the worker

    async def _call(self, func: Callable[[], T], timeout: float, what: str) -> T:
        future = self._worker.submit(func)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout)
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            raise KeyringTimeoutError(
                f"the keyring did not answer within {timeout:g} s while {what}; it may be "
                "waiting for an unlock prompt, or its D-Bus service hangs. Check that the "
                "keyring (GNOME Keyring, KeePassXC, KWallet) is running and unlocked, then "
                "try again"
            ) from None

    def _resolve(self) -> tuple[_Backend, BackendInfo]:
        """In the worker: the usable backend, or the refusal as an exception."""
        if self._backend is not None and self._info is not None:
            return self._backend, self._info
        error: NoKeyringError | None = None
        try:
            raw = self._factory(self._info is not None)
        except Exception as exc:  # keyring raises RuntimeError & co. for a backend it cannot load
            error = NoKeyringError(
                f"the keyring backend could not be loaded ({type(exc).__name__}: {exc}): "
                f"{_FIX_NO_KEYRING}"
            )
        if error is not None:
            raise error
        backend = effective_backend(raw)
        info = classify_backend(backend)
        if info.name == "keyring.backends.SecretService.Keyring":
            provider = _secret_service_provider()
            if provider:
                info = BackendInfo(info.name, f"Secret Service ({provider})", info.verdict)
        self._info = info
        refusal = _refusal(info)
        if refusal is not None:
            raise refusal
        usable = cast(_Backend, backend)
        self._backend = usable
        return usable, info

    def _collection(self, conn: Any, backend: _Backend) -> Any:
        import secretstorage

        path = getattr(backend, "preferred_collection", None)
        if path:
            return secretstorage.Collection(conn, path)
        return secretstorage.get_default_collection(conn)

    def _is_locked(self) -> bool:
        """In the worker: True when the Secret Service collection we would use is locked."""
        backend, info = self._resolve()
        if info.name != "keyring.backends.SecretService.Keyring":
            return False  # other backends report a lock as KeyringLocked, translated later

        def check() -> bool:
            import secretstorage

            with contextlib.closing(secretstorage.dbus_init()) as conn:
                return bool(self._collection(conn, backend).is_locked())

        return _guarded(check, info)

    def _unlock(self) -> None:
        """In the worker: ask the Secret Service to unlock (it shows its own prompt)."""
        backend, info = self._resolve()

        def unlock() -> bool:
            import secretstorage

            with contextlib.closing(secretstorage.dbus_init()) as conn:
                collection = self._collection(conn, backend)
                # Nobody answering the prompt in time leaves it locked: reported below.
                with contextlib.suppress(TimeoutError):
                    collection.unlock(timeout=self.unlock_timeout)
                return bool(collection.is_locked())

        if _guarded(unlock, info):
            raise KeyringLockedError(
                f"the keyring ({info.description}) is locked and was not unlocked: the "
                f"unlock prompt was dismissed or could not be shown. {_FIX_LOCKED}"
            )

    async def _run(self, func: Callable[[_Backend], T], what: str) -> T:
        if await self._call(self._is_locked, self.timeout, what):
            # The prompt waits for a person, so this one step gets the long timeout.
            await self._call(self._unlock, self.timeout + self.unlock_timeout, what)

        def call() -> T:
            backend, info = self._resolve()
            return _guarded(lambda: func(backend), info)

        return await self._call(call, self.timeout, what)

    # -- the API

    async def check_backend(self) -> BackendInfo:
        """The backend the store will use; raises the CredentialStoreError that refuses it."""
        return await self._call(lambda: self._resolve()[1], self.timeout, "looking for a keyring")

    async def backend_description(self) -> str:
        """Words for the user: "Secret Service (GNOME Keyring)", also for a refused backend."""
        try:
            return (await self.check_backend()).description
        except KeyringTimeoutError:
            return "keyring not answering"
        except CredentialStoreError:
            info = self._info
            return info.description if info is not None else "no keyring"

    async def get(self, name: str) -> Credentials | None:
        """The credentials stored for upstream `name`, or None when there are none."""

        def get(backend: _Backend) -> str | None:
            return backend.get_password(self.service, name)

        raw = await self._run(get, f"reading the password of {name}")
        if raw is None:
            return None
        return _decode(name, raw)

    async def set(self, name: str, username: str, password: Secret) -> None:
        """Store (or replace) the user name and password of upstream `name`."""
        payload = json.dumps(
            {"version": ENTRY_VERSION, "username": username, "password": password.reveal()}
        )

        def store(backend: _Backend) -> None:
            _guarded(
                lambda: backend.set_password(self.service, name, payload),
                self._info,
                payload,
                password.reveal(),
            )

        await self._run(store, f"storing the password of {name}")

    async def delete(self, name: str) -> bool:
        """Remove the entry of upstream `name`. False when there was none."""

        def delete(backend: _Backend) -> bool:
            if backend.get_password(self.service, name) is None:
                return False
            backend.delete_password(self.service, name)
            return True

        return await self._run(delete, f"deleting the password of {name}")


def _decode(name: str, raw: str) -> Credentials:
    fix = f"run `tray-proxy credentials set {name}` to store it again"
    try:
        data = json.loads(raw)
    except ValueError:  # the exception carries the secret as .doc: never chain it
        data = None
    if (
        not isinstance(data, dict)
        or data.get("version") != ENTRY_VERSION
        or not isinstance(data.get("username"), str)
        or not isinstance(data.get("password"), str)
        or not data["username"]
    ):
        raise StoredEntryError(
            f'the keyring entry "{SERVICE}" / "{name}" was not written by this version of '
            f"tray-proxy (or is damaged); {fix}"
        )
    return Credentials(data["username"], Secret(data["password"]))


def _guarded(func: Callable[[], T], info: BackendInfo | None, *secrets: str) -> T:
    """Run a backend call; its exceptions become CredentialStoreErrors with no secret in
    them, raised outside the handler so not even `__context__` keeps the original."""
    error: CredentialStoreError | None = None
    try:
        return func()
    except CredentialStoreError:
        raise
    except Exception as exc:
        error = _translate(exc, info, *secrets)
    raise error


def _translate(exc: Exception, info: BackendInfo | None, *secrets: str) -> CredentialStoreError:
    """A backend exception as a CredentialStoreError, with any secret scrubbed from it."""
    what = info.description if info is not None else "the keyring"
    if type(exc).__name__ == "KeyringLocked":
        return KeyringLockedError(
            f"the keyring ({what}) is locked and was not unlocked. {_FIX_LOCKED}"
        )
    if type(exc).__name__ == "PromptDismissedException":
        # secretstorage: the keyring wanted to show a prompt (unlock, or create the first
        # keyring) and nobody could answer it: no desktop, as on WSL or over ssh (issue 14).
        return KeyringLockedError(
            f"the keyring ({what}) needs a password prompt that could not be shown here (no "
            f"desktop session answered it). {_FIX_LOCKED}"
        )
    if type(exc).__name__ == "NoKeyringError":
        return NoKeyringError(f"no secure keyring is available: {_FIX_NO_KEYRING}")
    text = str(exc)
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return KeyringAccessError(
        f"the keyring ({what}) failed: {type(exc).__name__}: {text}. Check that it is "
        "running and unlocked, then try again"
    )


# --------------------------------------------------------------------------- for the relay


class KeyringCredentialSource:
    """A CredentialSource answering from memory; `refresh` fills it from the keyring.

    `get` runs on the relay's loop thread and must not block: it reads a dict under a lock.
    A stored user name that differs from the config's `username` is not used (see the
    module docstring); the mismatch is logged once, without any secret.
    """

    def __init__(self, store: CredentialStore) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._entries: dict[str, Credentials] = {}
        self._warned: set[tuple[str, str, str]] = set()

    def get(self, upstream: str, username: str | None) -> Credentials | None:
        with self._lock:
            found = self._entries.get(upstream)
        if found is None:
            return None
        if username is not None and found.username != username:
            key = (upstream, found.username, username)
            if key not in self._warned:
                self._warned.add(key)
                log.warning(
                    "the keyring holds the password of %s for upstream %s, but the config "
                    "says username = %s; run `tray-proxy credentials set %s` to store the "
                    "password of %s",
                    found.username,
                    upstream,
                    username,
                    upstream,
                    username,
                )
            return None
        return found

    def put(self, upstream: str, credentials: Credentials | None) -> None:
        """Update the cache after the app stored (or deleted: None) credentials itself."""
        with self._lock:
            if credentials is None:
                self._entries.pop(upstream, None)
            else:
                self._entries[upstream] = credentials

    async def refresh(self, names: Iterable[str]) -> None:
        """Re-read the entries of `names` (the config's upstreams) and replace the cache.

        Raises CredentialStoreError when the keyring itself is unusable, leaving the cache as
        it was. An unreadable single entry is logged and left out.
        """
        fresh: dict[str, Credentials] = {}
        for name in names:
            try:
                found = await self.store.get(name)
            except StoredEntryError as exc:
                log.warning("%s", exc)
                continue
            if found is not None:
                fresh[name] = found
        with self._lock:
            self._entries = fresh


def running_under_systemd(environ: Mapping[str, str] | None = None) -> bool:
    """True in a systemd service: systemd sets INVOCATION_ID, and CREDENTIALS_DIRECTORY
    when the unit passes credentials."""
    env = os.environ if environ is None else environ
    return bool(env.get("INVOCATION_ID") or env.get("CREDENTIALS_DIRECTORY"))


class AppCredentialSource:
    """The relay's CredentialSource in the documented order (`default_credential_source`).

    `get` is the fast synchronous lookup; `refresh()` re-reads the keyring part.
    """

    def __init__(
        self,
        names: Iterable[str],
        keyring_source: KeyringCredentialSource,
        systemd_source: SystemdCredentialSource,
        systemd_first: bool,
    ) -> None:
        self.names = tuple(names)
        self.keyring = keyring_source
        self.systemd = systemd_source
        self.systemd_first = systemd_first
        order: tuple[CredentialSource, CredentialSource] = (
            (systemd_source, keyring_source) if systemd_first else (keyring_source, systemd_source)
        )
        self._chain = ChainedCredentialSource(*order)

    def get(self, upstream: str, username: str | None) -> Credentials | None:
        return self._chain.get(upstream, username)

    async def refresh(self) -> None:
        """Fill the keyring cache; raises CredentialStoreError if the keyring is unusable
        (the $CREDENTIALS_DIRECTORY part keeps working regardless)."""
        await self.keyring.refresh(self.names)


def default_credential_source(
    config: Config,
    *,
    store: CredentialStore | None = None,
    environ: Mapping[str, str] | None = None,
) -> AppCredentialSource:
    """Where the relay looks for the password of an upstream, in order.

    In the app (a desktop session): the keyring first, then $CREDENTIALS_DIRECTORY/NAME.
    Under systemd (INVOCATION_ID or CREDENTIALS_DIRECTORY set): $CREDENTIALS_DIRECTORY
    first, because the unit file's LoadCredential= is the operator's explicit choice for
    that service, and a headless service usually has no unlocked keyring at all.
    Call `await source.refresh()` before starting the relay, and after credentials change.
    """
    env = os.environ if environ is None else environ
    directory = env.get("CREDENTIALS_DIRECTORY") or None
    return AppCredentialSource(
        [u.name for u in config.upstreams],
        KeyringCredentialSource(store or CredentialStore()),
        SystemdCredentialSource(directory),
        systemd_first=running_under_systemd(env),
    )
