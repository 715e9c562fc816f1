"""A real, throw-away Secret Service for tests, and tiny plaintext keyring backends to refuse.

`KeyringSandbox(tmp_path)` gives a private HOME and XDG_RUNTIME_DIR and runs commands in:
- a session: `dbus-run-session -- python -m tests.integration.keyring_env session -- CMD`,
  where this module starts `gnome-keyring-daemon --unlock --components=secrets` (the keyring
  password goes to its stdin, read from a 0600 file in the sandbox HOME), waits until it owns
  org.freedesktop.secrets, runs CMD with the caller's stdin, then stops the daemon;
- or no session at all (no D-Bus bus reachable), where keyring falls back to `fail`.
The sandbox HOME persists between runs, so an entry stored in one session is read in the
next. Every run is its own process group, killed when the run ends (pass or fail).

`python -m tests.integration.keyring_env store` reads JSON lines (set/get/delete/describe/
check/lock) and answers each with a JSON line, driving `tray_proxy.keyring_store.CredentialStore`
so secrets travel over stdin/stdout, never argv.

Must not import PySide6; imports tray_proxy only inside the `store` driver.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
MODULE = "tests.integration.keyring_env"
PASSWORD_FILE = ".test-keyring-password"
PLAINTEXT_FILE = "test-plaintext-keyring.json"
SECRETS_BUS_NAME = "org.freedesktop.secrets"
REQUIRED = {
    "dbus-run-session": "dbus (or dbus-bin)",
    "gnome-keyring-daemon": "gnome-keyring",
    "secret-tool": "libsecret-tools",
}


# --------------------------------------------------------------------------- plaintext backends

PLAINTEXT_BACKENDS = {
    # Says what it is in its name, with a priority as high as a real keyring's.
    "PlaintextTestKeyring": 5.0,
    # A neutral name, but declared below keyring's recommendation line, like keyrings.alt.
    "DiskNotesKeyring": 0.5,
}


def __getattr__(name: str) -> type:
    """Build a plaintext backend class only when keyring asks for it by name.

    keyring registers every KeyringBackend subclass as a candidate as soon as the class
    exists; defined at import time, they would be chosen over the real Secret Service.
    """
    if name not in PLAINTEXT_BACKENDS:
        raise AttributeError(name)
    from keyring.backend import KeyringBackend

    def path() -> Path:
        return Path(os.environ["HOME"]) / PLAINTEXT_FILE

    def load() -> dict[str, str]:
        try:
            data = json.loads(path().read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        assert isinstance(data, dict)
        return data

    def save(data: dict[str, str]) -> None:
        path().write_text(json.dumps(data), encoding="utf-8")

    def get_password(self: object, service: str, username: str) -> str | None:
        return load().get(f"{service}/{username}")

    def set_password(self: object, service: str, username: str, password: str) -> None:
        save({**load(), f"{service}/{username}": password})

    def delete_password(self: object, service: str, username: str) -> None:
        data = load()
        data.pop(f"{service}/{username}", None)
        save(data)

    cls = type(KeyringBackend)(
        name,
        (KeyringBackend,),
        {
            "__module__": __name__,
            "__qualname__": name,
            "priority": PLAINTEXT_BACKENDS[name],
            "get_password": get_password,
            "set_password": set_password,
            "delete_password": delete_password,
        },
    )
    globals()[name] = cls
    return cls


# --------------------------------------------------------------------------- the sandbox


class KeyringSandbox:
    """Private HOME / XDG dirs for keyring tests; `run(...)` in a fresh D-Bus session."""

    def __init__(self, root: Path) -> None:
        missing = [f"{tool} (apt package {pkg})" for tool, pkg in REQUIRED.items()
                   if shutil.which(tool) is None]  # fmt: skip
        if missing:
            raise RuntimeError("missing for the keyring tests: " + ", ".join(missing))
        self.home = root / "home"
        self.runtime = root / "run"
        self.home.mkdir(mode=0o700)
        self.runtime.mkdir(mode=0o700)
        fd = os.open(self.home / PASSWORD_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(12))

    @property
    def plaintext_file(self) -> Path:
        return self.home / PLAINTEXT_FILE

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.home),
            "XDG_RUNTIME_DIR": str(self.runtime),
            "XDG_CONFIG_HOME": str(self.home / ".config"),
            "XDG_DATA_HOME": str(self.home / ".local" / "share"),
            "LANG": "C.UTF-8",
            "PYTHONPATH": str(REPO),
            "PYTHONUNBUFFERED": "1",
        }
        env.update(extra or {})
        return env

    def run(
        self,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        session: bool = True,
        env: Mapping[str, str] | None = None,
        timeout: float = 60.0,
        prefix: Sequence[str] = (),
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` in a fresh session with the unlocked keyring (or with no bus at all).

        `prefix` goes in front of everything, bus included: `["ip", "netns", "exec", NS]`
        runs the session, the keyring daemon and `argv` in that network namespace."""
        if session:
            argv = ["dbus-run-session", "--", sys.executable, "-m", MODULE, "session", "--",
                    *argv]  # fmt: skip
        argv = [*prefix, *argv]
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env(env),
            cwd=REPO,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(input or b"", timeout=timeout)
        finally:
            # The bus, the daemon and anything D-Bus activated share the group: none survives.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return subprocess.CompletedProcess(
            proc.args, proc.returncode, out.decode("utf-8", "replace"),
            err.decode("utf-8", "replace"),
        )  # fmt: skip

    def store(self, ops: Sequence[Mapping[str, Any]], **kwargs: Any) -> list[dict[str, Any]]:
        """Run the `store` driver with `ops`; one answer per op (asserts the driver ran)."""
        text = "".join(json.dumps(op) + "\n" for op in ops).encode()
        result = self.run([sys.executable, "-m", MODULE, "store"], input=text, **kwargs)
        answers = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
        assert result.returncode == 0 and len(answers) == len(ops), (
            f"store driver exited {result.returncode} with {len(answers)}/{len(ops)} answers; "
            f"stderr:\n{result.stderr[-3000:]}"
        )
        return answers


# --------------------------------------------------------------------------- in the session


def _wait_for_bus_name(name: str, daemon: subprocess.Popen[bytes], timeout: float) -> None:
    from jeepney.bus_messages import message_bus
    from jeepney.io.blocking import open_dbus_connection

    deadline = time.monotonic() + timeout
    with open_dbus_connection(bus="SESSION") as conn:
        while True:
            reply = conn.send_and_get_reply(message_bus.NameHasOwner(name), timeout=5)
            if reply.body[0]:
                return
            if daemon.poll() is not None:
                raise SystemExit(f"gnome-keyring-daemon exited with {daemon.returncode}")
            if time.monotonic() >= deadline:
                raise SystemExit(f"gnome-keyring-daemon did not own {name} within {timeout}s")
            time.sleep(0.05)


def _session(argv: list[str]) -> int:
    password = (Path(os.environ["HOME"]) / PASSWORD_FILE).read_bytes()
    daemon = subprocess.Popen(
        ["gnome-keyring-daemon", "--foreground", "--unlock", "--components=secrets"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert daemon.stdin is not None
        daemon.stdin.write(password)
        daemon.stdin.close()
        _wait_for_bus_name(SECRETS_BUS_NAME, daemon, timeout=15.0)
        return subprocess.run(argv, check=False).returncode
    finally:
        daemon.send_signal(signal.SIGCONT)  # in case a test froze it
        daemon.terminate()
        try:
            daemon.wait(timeout=5)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()


async def _store_ops(lines: list[str]) -> list[dict[str, Any]]:
    from tray_proxy.keyring_store import CredentialStore, CredentialStoreError
    from tray_proxy.relay.secrets import Secret

    store = CredentialStore(timeout=float(os.environ.get("TEST_KEYRING_TIMEOUT", "10")))
    answers: list[dict[str, Any]] = []
    for line in lines:
        op = json.loads(line)
        started = time.monotonic()
        try:
            kind = op["op"]
            result: Any = None
            if kind == "set":
                await store.set(op["name"], op["username"], Secret(op["password"]))
            elif kind == "get":
                found = await store.get(op["name"])
                if found is not None:
                    result = {"username": found.username, "password": found.password.reveal()}
            elif kind == "delete":
                result = await store.delete(op["name"])
            elif kind == "describe":
                result = await store.backend_description()
            elif kind == "check":
                result = (await store.check_backend()).name
            elif kind == "lock":
                result = _lock_default_collection()
            elif kind == "freeze":
                os.kill(_secret_service_pid(), signal.SIGSTOP)  # a daemon that stops answering
            else:
                raise ValueError(f"unknown op {kind!r}")
            answer: dict[str, Any] = {"ok": True, "result": result}
        except CredentialStoreError as exc:
            answer = {"ok": False, "error": type(exc).__name__, "message": str(exc)}
        answer["elapsed"] = round(time.monotonic() - started, 3)
        answers.append(answer)
    return answers


def _secret_service_pid() -> int:
    from jeepney.bus_messages import message_bus
    from jeepney.io.blocking import open_dbus_connection

    with open_dbus_connection(bus="SESSION") as conn:
        msg = message_bus.GetConnectionUnixProcessID(SECRETS_BUS_NAME)
        return int(conn.send_and_get_reply(msg, timeout=5).body[0])


def _lock_default_collection() -> bool:
    import contextlib

    import secretstorage

    with contextlib.closing(secretstorage.dbus_init()) as conn:
        collection = secretstorage.get_default_collection(conn)
        collection.lock()
        return bool(collection.is_locked())


def main(argv: list[str]) -> int:
    if argv[:2] == ["session", "--"] and len(argv) > 2:
        return _session(argv[2:])
    if argv == ["store"]:
        answers = asyncio.run(_store_ops([ln for ln in sys.stdin if ln.strip()]))
        for answer in answers:
            print(json.dumps(answer), flush=True)
        return 0
    print(f"usage: python -m {MODULE} session -- CMD... | store", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
