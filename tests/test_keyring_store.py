"""CredentialStore, backend classification, KeyringCredentialSource, default order, CLI checks.

In-memory fake backends only; the real Secret Service is in tests/integration/test_keyring.py.
Must not import PySide6.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from keyring.backends import fail, null
from keyring.errors import KeyringLocked

from tray_proxy import cli_credentials
from tray_proxy.config import parse_config
from tray_proxy.instance import home_control_dir
from tray_proxy.keyring_store import (
    SERVICE,
    SESSION_BUS_ENV,
    CredentialStore,
    CredentialStoreError,
    KeyringAccessError,
    KeyringCredentialSource,
    KeyringLockedError,
    KeyringTimeoutError,
    NoKeyringError,
    PlaintextKeyringError,
    StoredEntryError,
    adopt_session_bus,
    classify_backend,
    default_credential_source,
    effective_backend,
    running_under_systemd,
    session_bus_socket,
)
from tray_proxy.relay.secrets import Credentials, Secret

PASSWORD = "c0rrect-Horse:battery staple"


class MemoryKeyring:
    """A secure-looking backend kept in a dict; records the thread of every call."""

    priority = 5

    def __init__(self) -> None:
        self.entries: dict[tuple[str, str], str] = {}
        self.threads: list[threading.Thread] = []

    def get_password(self, service: str, username: str) -> str | None:
        self.threads.append(threading.current_thread())
        return self.entries.get((service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        self.threads.append(threading.current_thread())
        self.entries[(service, username)] = password

    def delete_password(self, service: str, username: str) -> None:
        del self.entries[(service, username)]


class HangingKeyring(MemoryKeyring):
    """Blocks every call until `release` is set (a D-Bus service that stopped answering)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def get_password(self, service: str, username: str) -> str | None:
        self.release.wait(60)
        return super().get_password(service, username)


class PlaintextFileKeyring(MemoryKeyring):
    pass


class NoEncryptionKeyring(MemoryKeyring):
    scheme = "no encyption"  # keyrings.alt's own spelling


class LowPriorityKeyring(MemoryKeyring):
    priority = 0.5  # type: ignore[assignment]


class BrokenPriorityKeyring(MemoryKeyring):
    @property
    def priority(self) -> float:  # type: ignore[override]
        raise RuntimeError("service not reachable")


class FakeChainerBackend:
    def __init__(self, *members: object) -> None:
        self.backends = list(members)


def store_with(backend: object, **kwargs: float) -> CredentialStore:
    return CredentialStore(backend_factory=lambda _redetect: backend, **kwargs)


@pytest.fixture
def memory() -> MemoryKeyring:
    return MemoryKeyring()


@pytest.fixture
def hanging() -> Iterator[HangingKeyring]:
    backend = HangingKeyring()
    try:
        yield backend
    finally:
        backend.release.set()  # frees the store's worker thread


# --------------------------------------------------------------------------- classification


@pytest.mark.parametrize(
    ("backend", "verdict"),
    [
        (fail.Keyring(), "none"),
        (null.Keyring(), "none"),
        (MemoryKeyring(), "secure"),
        (PlaintextFileKeyring(), "plaintext"),
        (NoEncryptionKeyring(), "plaintext"),
        (LowPriorityKeyring(), "plaintext"),
        (BrokenPriorityKeyring(), "none"),
        (FakeChainerBackend(), "none"),
        (FakeChainerBackend(PlaintextFileKeyring(), MemoryKeyring()), "plaintext"),
        (FakeChainerBackend(MemoryKeyring(), PlaintextFileKeyring()), "secure"),
    ],
    ids=lambda v: v if isinstance(v, str) else type(v).__name__,
)
def test_classify_backend(backend: object, verdict: str) -> None:
    assert classify_backend(effective_backend(backend)).verdict == verdict


def test_keyring_own_secure_backends_are_known_without_probing_them() -> None:
    from keyring.backends import SecretService

    # No D-Bus here: probing its priority would fail, so the name alone must decide.
    info = classify_backend(SecretService.Keyring())
    assert (info.verdict, info.description) == ("secure", "Secret Service")


def test_chainer_uses_its_first_member_only(memory: MemoryKeyring) -> None:
    plain = PlaintextFileKeyring()
    plain.entries[(SERVICE, "corp")] = "stale plaintext"
    store = store_with(FakeChainerBackend(memory, plain))
    assert asyncio.run(store.get("corp")) is None  # not the plaintext member's answer


# --------------------------------------------------------------------------- the store


def test_round_trip_keeps_user_and_password_together(memory: MemoryKeyring) -> None:
    store = store_with(memory)

    async def scenario() -> None:
        await store.set("corp", "alice", Secret(PASSWORD))
        assert await store.get("corp") == Credentials("alice", Secret(PASSWORD))
        assert await store.get("other") is None
        assert await store.delete("corp") is True
        assert await store.delete("corp") is False
        assert await store.get("corp") is None

    asyncio.run(scenario())
    assert all(t is not threading.main_thread() for t in memory.threads)


def test_entry_format_is_versioned_json(memory: MemoryKeyring) -> None:
    asyncio.run(store_with(memory).set("corp", "alice", Secret(PASSWORD)))
    raw = memory.entries[(SERVICE, "corp")]
    assert json.loads(raw) == {"version": 1, "username": "alice", "password": PASSWORD}


@pytest.mark.parametrize("raw", [PASSWORD, '"x"', '{"version": 2}', '{"version":1,"username":""}'])
def test_foreign_entry_is_an_error_that_hides_it(memory: MemoryKeyring, raw: str) -> None:
    memory.entries[(SERVICE, "corp")] = raw
    with pytest.raises(StoredEntryError) as info:
        asyncio.run(store_with(memory).get("corp"))
    assert raw not in str(info.value)
    assert "credentials set corp" in str(info.value)
    assert info.value.__cause__ is None and info.value.__context__ is None


def test_hung_backend_times_out_and_loop_stays_free(hanging: HangingKeyring) -> None:
    store = store_with(hanging, timeout=0.5)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    async def scenario() -> float:
        task = asyncio.create_task(ticker())
        started = time.monotonic()
        try:
            with pytest.raises(KeyringTimeoutError, match="did not answer within 0.5 s"):
                await store.get("corp")
        finally:
            task.cancel()
        return time.monotonic() - started

    took = asyncio.run(scenario())
    assert 0.4 < took < 2.0
    assert ticks >= 10, "the event loop was blocked while the keyring hung"


def test_store_recovers_when_the_hung_keyring_answers(hanging: HangingKeyring) -> None:
    store = store_with(hanging, timeout=0.3)
    with pytest.raises(KeyringTimeoutError):
        asyncio.run(store.get("corp"))
    hanging.release.set()
    hanging.entries[(SERVICE, "corp")] = json.dumps(
        {"version": 1, "username": "alice", "password": PASSWORD}
    )
    assert asyncio.run(store.get("corp")) == Credentials("alice", Secret(PASSWORD))


def test_hanging_import_times_out() -> None:
    gate = threading.Event()

    def factory(_redetect: bool) -> object:
        gate.wait(60)  # `import keyring` stuck on a dead DISPLAY
        return MemoryKeyring()

    try:
        with pytest.raises(KeyringTimeoutError):
            asyncio.run(CredentialStore(backend_factory=factory, timeout=0.3).get("corp"))
    finally:
        gate.set()


def test_module_does_not_import_keyring_eagerly() -> None:
    code = (
        "import sys, tray_proxy.keyring_store, tray_proxy.cli_credentials;"
        " print(sorted(sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "'keyring'" not in out.stdout and "'secretstorage'" not in out.stdout


@pytest.mark.parametrize(
    ("backend", "error", "words"),
    [
        (fail.Keyring(), NoKeyringError, "`tray-proxy unlock`"),
        (null.Keyring(), NoKeyringError, "KeePassXC"),
        (PlaintextFileKeyring(), PlaintextKeyringError, "unencrypted"),
        (LowPriorityKeyring(), PlaintextKeyringError, "priority 0.5 < 1"),
    ],
    ids=["fail", "null", "plaintext-name", "not-recommended"],
)
def test_refused_backends_are_never_written(
    backend: object, error: type[CredentialStoreError], words: str
) -> None:
    store = store_with(backend)
    with pytest.raises(error, match=words):
        asyncio.run(store.set("corp", "alice", Secret(PASSWORD)))
    if isinstance(backend, MemoryKeyring):
        assert backend.entries == {}
    assert asyncio.run(store.backend_description())  # describes even a refused backend


def test_refusal_is_retried_with_a_fresh_detection(memory: MemoryKeyring) -> None:
    calls: list[bool] = []

    def factory(redetect: bool) -> object:
        calls.append(redetect)
        return fail.Keyring() if len(calls) == 1 else memory

    store = CredentialStore(backend_factory=factory)
    with pytest.raises(NoKeyringError):
        asyncio.run(store.get("corp"))
    assert asyncio.run(store.get("corp")) is None  # the user started gnome-keyring meanwhile
    assert calls == [False, True]


def test_backend_that_cannot_load_is_no_keyring() -> None:
    def factory(_redetect: bool) -> object:
        raise RuntimeError("The Secret Service daemon is neither running nor activatable")

    with pytest.raises(NoKeyringError, match="neither running"):
        asyncio.run(CredentialStore(backend_factory=factory).get("corp"))


def test_locked_keyring_becomes_a_clear_error(memory: MemoryKeyring) -> None:
    def locked(service: str, username: str) -> str | None:
        raise KeyringLocked("Failed to unlock the collection!")

    memory.get_password = locked  # type: ignore[method-assign]
    with pytest.raises(KeyringLockedError, match="Unlock it"):
        asyncio.run(store_with(memory).get("corp"))


def test_dismissed_prompt_is_a_locked_keyring_with_the_fix(memory: MemoryKeyring) -> None:
    from secretstorage.exceptions import PromptDismissedException

    def prompt(service: str, username: str, password: str) -> None:
        raise PromptDismissedException("Prompt dismissed.")

    memory.set_password = prompt  # type: ignore[method-assign]
    with pytest.raises(KeyringLockedError, match="could not be shown") as caught:
        asyncio.run(store_with(memory).set("corp", "alice", Secret(PASSWORD)))
    assert "`tray-proxy unlock`" in str(caught.value)
    assert "PromptDismissedException" not in str(caught.value)


def test_backend_errors_never_carry_the_password(memory: MemoryKeyring) -> None:
    def leaky(service: str, username: str, password: str) -> None:
        raise ValueError(f"cannot store {password!s} ({json.loads(password)['password']})")

    memory.set_password = leaky  # type: ignore[method-assign]
    with pytest.raises(KeyringAccessError) as info:
        asyncio.run(store_with(memory).set("corp", "alice", Secret(PASSWORD)))
    assert PASSWORD not in str(info.value) and "***" in str(info.value)
    assert info.value.__cause__ is None and info.value.__context__ is None


# --------------------------------------------------------------------------- sources


def test_keyring_source_serves_from_memory(
    memory: MemoryKeyring, caplog: pytest.LogCaptureFixture
) -> None:
    store = store_with(memory)
    source = KeyringCredentialSource(store)
    asyncio.run(store.set("corp", "alice", Secret(PASSWORD)))
    assert source.get("corp", "alice") is None  # nothing until refreshed
    asyncio.run(source.refresh(["corp", "gone"]))
    memory.entries.clear()  # get never touches the keyring
    assert source.get("corp", "alice") == Credentials("alice", Secret(PASSWORD))
    assert source.get("corp", None) == Credentials("alice", Secret(PASSWORD))
    with caplog.at_level(logging.WARNING):
        assert source.get("corp", "bob") is None
        assert source.get("corp", "bob") is None
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "credentials set corp" in warnings[0]
    assert PASSWORD not in caplog.text
    source.put("corp", None)
    assert source.get("corp", "alice") is None


def test_failed_refresh_keeps_the_cache(memory: MemoryKeyring) -> None:
    backend: list[object] = [memory]
    store = CredentialStore(backend_factory=lambda _r: backend[0])
    source = KeyringCredentialSource(store)
    asyncio.run(store.set("corp", "alice", Secret(PASSWORD)))
    asyncio.run(source.refresh(["corp"]))

    def broken(service: str, username: str) -> str | None:
        raise KeyringLocked("locked")

    memory.get_password = broken  # type: ignore[method-assign]
    with pytest.raises(KeyringLockedError):
        asyncio.run(source.refresh(["corp"]))
    assert source.get("corp", "alice") is not None


CONFIG = """
[[upstream]]
name = "corp"
url = "http://proxy.example:8080"
username = "alice"
"""


def _sources(tmp_path: Path, memory: MemoryKeyring, environ: dict[str, str]) -> Any:
    (tmp_path / "corp").write_text("from-systemd\n")
    store = store_with(memory)
    asyncio.run(store.set("corp", "alice", Secret("from-keyring")))
    source = default_credential_source(parse_config(CONFIG), store=store, environ=environ)
    asyncio.run(source.refresh())
    return source


def test_desktop_order_is_keyring_first(tmp_path: Path, memory: MemoryKeyring) -> None:
    source = _sources(tmp_path, memory, {})
    assert not source.systemd_first
    assert source.get("corp", "alice") == Credentials("alice", Secret("from-keyring"))


@pytest.mark.parametrize("invocation", [{"INVOCATION_ID": "1f2e"}, {}], ids=["unit", "dir-only"])
def test_systemd_order_is_credentials_directory_first(
    tmp_path: Path, memory: MemoryKeyring, invocation: dict[str, str]
) -> None:
    env = {**invocation, "CREDENTIALS_DIRECTORY": str(tmp_path)}
    source = _sources(tmp_path, memory, env)
    assert source.systemd_first
    assert source.get("corp", "alice") == Credentials("alice", Secret("from-systemd"))
    (tmp_path / "corp").unlink()  # then the keyring still answers
    assert source.get("corp", "alice") == Credentials("alice", Secret("from-keyring"))


def test_running_under_systemd() -> None:
    assert running_under_systemd({"INVOCATION_ID": "abc"})
    assert running_under_systemd({"CREDENTIALS_DIRECTORY": "/run/credentials/x"})
    assert not running_under_systemd({"INVOCATION_ID": "", "HOME": "/root"})


# --------------------------------------------------------------------------- CLI (no keyring)


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        CONFIG + '\n[[upstream]]\nname = "nouser"\nurl = "socks5://proxy.example:1080"\n'
    )
    return path


def _stdin(monkeypatch: pytest.MonkeyPatch, data: bytes) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))


def _no_keyring(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, str]]:
    """Replace the store by a recorder: these tests are about what happens before it."""
    calls: list[tuple[str, str, str]] = []

    class Recorder:
        async def set(self, name: str, username: str, password: Secret) -> None:
            calls.append((name, username, password.reveal()))

        async def backend_description(self) -> str:
            return "Memory"

    monkeypatch.setattr("tray_proxy.keyring_store.CredentialStore", Recorder)
    return calls


CliRun = Callable[..., tuple[int, str, str]]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> CliRun:
    def run(*argv: str) -> tuple[int, str, str]:
        try:
            code = cli_credentials.main(list(argv))
        except SystemExit as exc:
            code = int(exc.code or 0)
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_set_reads_the_first_stdin_line(
    cli: CliRun, config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _no_keyring(monkeypatch)
    _stdin(monkeypatch, PASSWORD.encode() + b"\r\nsecond line\n")
    code, out, err = cli("set", "corp", "--config", str(config_file))
    assert (code, err) == (0, "")
    assert calls == [("corp", "alice", PASSWORD)]
    assert "alice" in out and PASSWORD not in out


@pytest.mark.parametrize(
    ("argv", "stdin", "code", "words"),
    [
        (["set", "nope"], b"pw\n", 2, "'nope' is not an upstream"),
        (["set", "corp", "--username", "bob"], b"pw\n", 2, 'username = "alice"'),
        (["set", "nouser"], b"pw\n", 2, "pass --username"),
        (["set", "corp"], b"", 2, "no password on stdin"),
        (["set", "corp"], b"\n", 2, "no password on stdin"),
        (["set", "corp"], b"\xff\xfe\n", 2, "not UTF-8"),
        (["set", "nouser", "-u", "x"], b"p" * 300 + b"\n", 2, "255 bytes"),
        (["delete", "../etc"], b"", 2, "NAME must be"),
        (["test", "corp", "--target", "no-port"], b"", 2, "HOST:PORT"),
    ],
)
def test_cli_usage_errors_are_one_line(
    cli: CliRun,
    config_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    stdin: bytes,
    code: int,
    words: str,
) -> None:
    calls = _no_keyring(monkeypatch)
    _stdin(monkeypatch, stdin)
    got, out, err = cli(*argv, "--config", str(config_file))
    assert got == code
    assert words in err and err.count("\n") == 1 and "Traceback" not in err
    assert calls == []


def test_cli_missing_config_is_a_usage_error(cli: CliRun, tmp_path: Path) -> None:
    code, _out, err = cli("set", "corp", "--config", str(tmp_path / "missing.toml"))
    # Issue 14: a new user's first command points at the setup, not at a missing file.
    assert code == 2 and err.count("\n") == 1
    assert "file not found" not in err and "tray-proxy setup" in err


def test_password_never_comes_from_argv() -> None:
    parser = argparse.ArgumentParser()
    common = argparse.ArgumentParser(add_help=False)
    cli_credentials.add_subcommands(parser.add_subparsers(dest="command"), common)
    help_text = subprocess.run(
        [sys.executable, "-m", "tray_proxy.cli_credentials", "set", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--password" not in help_text
    with pytest.raises(SystemExit):
        parser.parse_args(["credentials", "set", "corp", "--password", "x"])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("pypi.org:443", ("pypi.org", 443)),
        ("10.200.3.2:8443", ("10.200.3.2", 8443)),
        ("[fd00:200:3::2]:443", ("fd00:200:3::2", 443)),
    ],
)
def test_parse_target(text: str, expected: tuple[str, int]) -> None:
    assert cli_credentials.parse_target(text) == expected


@pytest.mark.parametrize("text", ["host", ":443", "h:0", "h:70000", "[::1]", "[nope]:1", "a b:1"])
def test_parse_target_refuses(text: str) -> None:
    with pytest.raises(cli_credentials.UsageError):
        cli_credentials.parse_target(text)


def test_cli_hook_is_wired_into_tray_proxy() -> None:
    from tray_proxy.cli import build_parser

    try:
        args = build_parser().parse_args(["credentials", "delete", "corp"])
    except SystemExit:
        pytest.fail(
            "tray_proxy/cli.py does not wire `credentials`: call "
            "cli_credentials.add_subcommands(sub, common) in build_parser and dispatch "
            '`args.command == "credentials"` to cli_credentials.run(args) in main',
            pytrace=False,
        )
    assert args.command == "credentials" and args.credentials_command == "delete"


def test_ctrl_d_at_the_password_prompt_is_a_clean_cancel(
    cli: CliRun, config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _no_keyring(monkeypatch)

    class Tty:
        def isatty(self) -> bool:
            return True

    def eof(prompt: str = "") -> str:
        raise EOFError

    monkeypatch.setattr(sys, "stdin", Tty())
    monkeypatch.setattr(cli_credentials.getpass, "getpass", eof)
    code, _out, err = cli("set", "corp", "--config", str(config_file))
    assert code == 1
    assert "cancelled; nothing was changed" in err and "Traceback" not in err
    assert calls == []


# --------------------------------------------------------------------------- the session bus


def test_session_bus_socket_is_the_standard_place(tmp_path: Path) -> None:
    assert session_bus_socket({"XDG_RUNTIME_DIR": str(tmp_path)}) == tmp_path / "bus"
    # Without XDG_RUNTIME_DIR: beside the control socket under the home, never in /tmp
    # (another user could make /tmp/tray-proxy-UID first).
    home = {"HOME": str(tmp_path / "home")}
    assert session_bus_socket(home, uid=1234) == home_control_dir(home, 1234) / "bus"
    assert str(tmp_path / "home") in str(session_bus_socket(home, uid=1234))


def test_adopt_session_bus_only_takes_a_live_socket_of_ours(tmp_path: Path) -> None:
    env: dict[str, str] = {"XDG_RUNTIME_DIR": str(tmp_path)}
    assert adopt_session_bus(env) is None and SESSION_BUS_ENV not in env  # nothing there
    (tmp_path / "bus").write_text("not a socket")
    assert adopt_session_bus(env) is None and SESSION_BUS_ENV not in env
    (tmp_path / "bus").unlink()
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(tmp_path / "bus"))
    dead.close()  # left by a bus that ended
    assert adopt_session_bus(env) is None and SESSION_BUS_ENV not in env
    (tmp_path / "bus").unlink()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(str(tmp_path / "bus"))
        live.listen(1)
        address = f"unix:path={tmp_path / 'bus'}"
        assert adopt_session_bus(env) == address and env[SESSION_BUS_ENV] == address
        # One already set is never replaced.
        other = {"XDG_RUNTIME_DIR": str(tmp_path), SESSION_BUS_ENV: "unix:path=/elsewhere"}
        assert adopt_session_bus(other) is None
        assert other[SESSION_BUS_ENV] == "unix:path=/elsewhere"


def test_unlock_is_a_tray_proxy_command() -> None:
    from tray_proxy.cli import build_parser

    args = build_parser().parse_args(["unlock"])
    assert args.command == "unlock"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["unlock", "--password", "x"])  # never from argv


def test_unlock_makes_the_bus_directory_private_or_refuses_it(tmp_path: Path) -> None:
    from tray_proxy.cli_unlock import UnlockError, _private_parent

    made = tmp_path / "tray-proxy-1000"
    _private_parent(made)
    assert made.stat().st_mode & 0o777 == 0o700
    _private_parent(made)  # ours and private: fine again
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    with pytest.raises(UnlockError, match="not a private directory of yours"):
        _private_parent(shared)
    link = tmp_path / "link"
    link.symlink_to(made)
    with pytest.raises(UnlockError, match="not a private directory of yours"):
        _private_parent(link)
