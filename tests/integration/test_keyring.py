"""CredentialStore and `credentials set|delete` against a real Secret Service (gnome-keyring).

Each run gets its own D-Bus session bus and an unlocked gnome-keyring in a private HOME
(tests/integration/keyring_env.py); entries are checked with libsecret's own `secret-tool`,
so the test does not only trust our reading of our writing. Also: a locked collection, a
frozen daemon (timeout), plaintext backends and no bus at all, each refused with its message.

Must not import PySide6. Needs: dbus (dbus-run-session), gnome-keyring, libsecret-tools.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.keyring_env import REPO, KeyringSandbox

CLI = [sys.executable, "-m", "tray_proxy.cli_credentials"]


@pytest.fixture
def sandbox(tmp_path: Path) -> KeyringSandbox:
    try:
        return KeyringSandbox(tmp_path)
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        '[[upstream]]\nname = "corp"\nurl = "http://proxy.example:8080"\nusername = "alice"\n'
    )
    return path


def _app_stderr(stderr: str) -> list[str]:
    """The command's own stderr lines: dbus-daemon shares the stream and talks about fd limits."""
    return [line for line in stderr.splitlines() if not line.startswith("dbus-daemon[")]


def _one_line(stderr: str, words: str) -> None:
    lines = _app_stderr(stderr)
    assert len(lines) == 1 and words in lines[0] and lines[0].startswith("tray-proxy: "), stderr


def _results(answers: list[dict[str, object]]) -> list[object]:
    return [a.get("result") for a in answers]


def _password() -> str:
    # Characters that JSON, D-Bus and shells treat specially, plus non-ASCII.
    return f'pä:ss "w\\ord" {secrets.token_hex(4)}'


def _lookup(sandbox: KeyringSandbox, name: str) -> dict[str, str] | None:
    """What libsecret itself finds under service=tray-proxy username=NAME."""
    result = sandbox.run(["secret-tool", "lookup", "service", "tray-proxy", "username", name])
    if result.returncode != 0 or not result.stdout:
        return None
    data = json.loads(result.stdout)
    assert isinstance(data, dict)
    return data


def test_round_trip_in_gnome_keyring(sandbox: KeyringSandbox) -> None:
    password = _password()
    answers = sandbox.store(
        [
            {"op": "describe"},
            {"op": "set", "name": "corp", "username": "alice", "password": password},
            {"op": "get", "name": "corp"},
        ]
    )
    assert all(a["ok"] for a in answers), answers
    assert _results(answers) == [
        "Secret Service (GNOME Keyring)",
        None,
        {"username": "alice", "password": password},
    ]

    # Another session, same keyring on disk: libsecret sees the entry, and so do we.
    assert _lookup(sandbox, "corp") == {"version": 1, "username": "alice", "password": password}
    again = sandbox.store(
        [
            {"op": "get", "name": "corp"},
            {"op": "delete", "name": "corp"},
            {"op": "delete", "name": "corp"},
            {"op": "get", "name": "corp"},
        ]
    )
    assert _results(again) == [
        {"username": "alice", "password": password},
        True,
        False,
        None,
    ]
    assert _lookup(sandbox, "corp") is None


def test_cli_set_reads_stdin_and_delete_removes(sandbox: KeyringSandbox, config: Path) -> None:
    password = _password()
    stored = sandbox.run(
        [*CLI, "set", "corp", "--config", str(config)], input=password.encode() + b"\n"
    )
    assert stored.returncode == 0, stored.stderr
    assert _app_stderr(stored.stderr) == []
    assert "alice" in stored.stdout and "GNOME Keyring" in stored.stdout
    assert password not in stored.stdout + stored.stderr
    assert _lookup(sandbox, "corp") == {"version": 1, "username": "alice", "password": password}

    deleted = sandbox.run([*CLI, "delete", "corp", "--config", str(config)])
    assert deleted.returncode == 0, deleted.stderr
    assert _lookup(sandbox, "corp") is None
    again = sandbox.run([*CLI, "delete", "corp", "--config", str(config)])
    assert again.returncode == 1
    _one_line(again.stderr, "no password is stored for corp")


def test_locked_collection_is_reported_not_crashed(sandbox: KeyringSandbox) -> None:
    # No display here, so gnome-keyring cannot show its unlock prompt.
    answers = sandbox.store(
        [
            {"op": "set", "name": "corp", "username": "alice", "password": _password()},
            {"op": "lock"},
            {"op": "get", "name": "corp"},
            {"op": "set", "name": "corp", "username": "alice", "password": "new"},
        ]
    )
    assert answers[1]["result"] is True
    for answer in answers[2:]:
        assert answer["ok"] is False and answer["error"] == "KeyringLockedError", answer
        assert "locked" in answer["message"] and "Unlock it" in answer["message"]
        assert "`tray-proxy unlock`" in answer["message"]


def test_frozen_keyring_daemon_times_out(sandbox: KeyringSandbox) -> None:
    answers = sandbox.store(
        [
            {"op": "set", "name": "corp", "username": "alice", "password": _password()},
            {"op": "freeze"},
            {"op": "get", "name": "corp"},
        ],
        env={"TEST_KEYRING_TIMEOUT": "2"},
    )
    assert answers[1]["ok"] is True
    assert answers[2]["error"] == "KeyringTimeoutError", answers[2]
    assert "did not answer within 2 s" in answers[2]["message"]
    assert answers[2]["elapsed"] < 6


@pytest.mark.parametrize(
    ("backend", "words"),
    [
        ("PlaintextTestKeyring", "stores passwords unencrypted"),
        ("DiskNotesKeyring", "does not recommend it (priority 0.5 < 1)"),
    ],
)
def test_plaintext_backend_is_refused(
    sandbox: KeyringSandbox, config: Path, backend: str, words: str
) -> None:
    env = {"PYTHON_KEYRING_BACKEND": f"tests.integration.keyring_env.{backend}"}
    answers = sandbox.store(
        [{"op": "set", "name": "corp", "username": "alice", "password": "pw"}], env=env
    )
    assert answers[0]["error"] == "PlaintextKeyringError"
    assert words in answers[0]["message"] and "KeePassXC" in answers[0]["message"]
    cli = sandbox.run([*CLI, "set", "corp", "--config", str(config)], input=b"pw\n", env=env)
    assert cli.returncode == 1
    _one_line(cli.stderr, "is refused")
    assert not sandbox.plaintext_file.exists(), "a refused backend was written to"


def test_no_bus_means_no_keyring(sandbox: KeyringSandbox, config: Path) -> None:
    answers = sandbox.store([{"op": "get", "name": "corp"}], session=False)
    assert answers[0]["error"] == "NoKeyringError"
    message = answers[0]["message"]
    assert "`tray-proxy unlock`" in message and "KeePassXC" in message
    assert "no D-Bus session" in message and "dbus-run-session" not in message
    cli = sandbox.run([*CLI, "set", "corp", "--config", str(config)], input=b"pw\n", session=False)
    assert cli.returncode == 1
    _one_line(cli.stderr, "no secure keyring")


def _kill_sandbox_processes(sandbox: KeyringSandbox) -> list[int]:
    """SIGKILL every process running with the sandbox's HOME; their pids."""
    home = str(sandbox.home).encode()
    leftovers = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if b"HOME=" + home + b"\0" in environ and int(entry.name) != os.getpid():
            leftovers.append(int(entry.name))
    for pid in leftovers:  # do not leak them into other tests even when failing
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return leftovers


def test_sandbox_leaves_no_process_behind(sandbox: KeyringSandbox) -> None:
    sandbox.store([{"op": "describe"}])
    assert _kill_sandbox_processes(sandbox) == []


# --------------------------------------------------------------------------- tray-proxy unlock
# Where no desktop session runs (WSL, ssh): no D-Bus session, no keyring. `tray-proxy unlock`
# starts both, creates the "login" keyring or unlocks it with the password from stdin. The bus
# and gnome-keyring it starts outlive the command on purpose; the fixture kills them.

UNLOCK = [sys.executable, "-m", "tray_proxy", "unlock"]


@pytest.fixture
def bare(sandbox: KeyringSandbox) -> Iterator[KeyringSandbox]:
    """The sandbox, run with no session (session=False); what unlock started is killed after."""
    try:
        yield sandbox
    finally:
        _kill_sandbox_processes(sandbox)


def _bus_env(sandbox: KeyringSandbox) -> dict[str, str]:
    return {"DBUS_SESSION_BUS_ADDRESS": f"unix:path={sandbox.runtime / 'bus'}"}


def test_unlock_sets_up_a_keyring_where_no_session_runs(bare: KeyringSandbox, config: Path) -> None:
    keyring_password = _password()
    before = bare.run([*CLI, "set", "corp", "--config", str(config)], input=b"pw\n", session=False)
    assert before.returncode == 1
    _one_line(before.stderr, "run `tray-proxy unlock`")

    first = bare.run(UNLOCK, input=keyring_password.encode() + b"\n", session=False)
    assert first.returncode == 0, first.stderr
    assert f"started a D-Bus session bus at {bare.runtime / 'bus'}" in first.stdout
    assert 'created the keyring "login"' in first.stdout
    assert keyring_password not in first.stdout + first.stderr
    login = bare.home / ".local" / "share" / "keyrings" / "login.keyring"
    assert login.exists() and login.stat().st_mode & 0o777 == 0o600
    assert keyring_password.encode() not in login.read_bytes()

    # A new process with no DBUS_SESSION_BUS_ADDRESS finds that bus and the unlocked keyring.
    password = _password()
    stored = bare.run(
        [*CLI, "set", "corp", "--config", str(config)],
        input=password.encode() + b"\n",
        session=False,
    )
    assert stored.returncode == 0, stored.stderr
    assert "GNOME Keyring" in stored.stdout
    (answer,) = bare.store([{"op": "get", "name": "corp"}], session=False)
    assert answer["result"] == {"username": "alice", "password": password}, answer
    # libsecret's own tool, told the address, sees the same entry.
    looked_up = bare.run(
        ["secret-tool", "lookup", "service", "tray-proxy", "username", "corp"],
        session=False,
        env=_bus_env(bare),
    )
    assert json.loads(looked_up.stdout)["password"] == password

    # Ready already: nothing is asked, nothing changes.
    again = bare.run(UNLOCK, session=False)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == "tray-proxy: the keyring is already unlocked"


def test_unlock_after_lock_needs_the_right_password(bare: KeyringSandbox) -> None:
    keyring_password = _password()
    assert bare.run(UNLOCK, input=keyring_password.encode() + b"\n", session=False).returncode == 0
    answers = bare.store(
        [
            {"op": "set", "name": "corp", "username": "alice", "password": "pw"},
            {"op": "lock"},
            {"op": "get", "name": "corp"},
        ],
        session=False,
        env=_bus_env(bare),
    )
    assert answers[1]["result"] is True
    assert answers[2]["error"] == "KeyringLockedError"
    assert "`tray-proxy unlock`" in answers[2]["message"]

    wrong = bare.run(UNLOCK, input=b"not-the-password\n", session=False)
    assert wrong.returncode == 1
    _one_line(wrong.stderr, "wrong keyring password; the keyring stays locked")
    empty = bare.run(UNLOCK, input=b"\n", session=False)
    assert empty.returncode == 2
    _one_line(empty.stderr, "no keyring password")
    (still,) = bare.store([{"op": "get", "name": "corp"}], session=False)
    assert still["error"] == "KeyringLockedError"

    right = bare.run(UNLOCK, input=keyring_password.encode() + b"\n", session=False)
    assert right.returncode == 0, right.stderr
    assert right.stdout.strip() == "tray-proxy: the keyring is unlocked"
    (found,) = bare.store([{"op": "get", "name": "corp"}], session=False)
    assert found["result"] == {"username": "alice", "password": "pw"}


def test_unlock_never_creates_a_keyring_without_a_password(bare: KeyringSandbox) -> None:
    # An empty password would leave GNOME Keyring's file unencrypted: plaintext stays refused.
    result = bare.run(UNLOCK, input=b"\n", session=False)
    assert result.returncode == 2
    _one_line(result.stderr, "no keyring password")
    assert not (bare.home / ".local" / "share" / "keyrings" / "login.keyring").exists()


def test_unlock_replaces_a_dead_bus_socket(bare: KeyringSandbox) -> None:
    # After a WSL restart /tmp or the runtime dir may still hold the old bus's socket.
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(bare.runtime / "bus"))
    dead.close()
    result = bare.run(UNLOCK, input=b"pw-" + secrets.token_hex(4).encode() + b"\n", session=False)
    assert result.returncode == 0, result.stderr
    assert "started a D-Bus session bus" in result.stdout


def test_first_save_in_a_bare_session_says_unlock_then_works(
    bare: KeyringSandbox, config: Path
) -> None:
    # A D-Bus session without a desktop (what `dbus-run-session` gives): gnome-keyring is
    # activated on first use and wants a prompt to create its first keyring. Issue 14: the
    # first Save failed with "PromptDismissedException". Now it says what to do, and after
    # `tray-proxy unlock` in the same session the same Save works.
    for name, text in (("unlock-input", "kr-" + secrets.token_hex(4)), ("set-input", "pw")):
        fd = os.open(bare.home / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(text + "\n")
    python = sys.executable
    script = (
        f'{python} -m tray_proxy.cli_credentials set corp --config "$1" < "$HOME/set-input"; '
        'echo "first=$?"; '
        f'{python} -m tray_proxy unlock < "$HOME/unlock-input" && '
        f'{python} -m tray_proxy.cli_credentials set corp --config "$1" < "$HOME/set-input"; '
        'echo "second=$?"'
    )
    result = bare.run(
        ["dbus-run-session", "--", "sh", "-c", script, "sh", str(config)], session=False
    )
    lines = _app_stderr(result.stderr)
    assert "first=1" in result.stdout and "second=0" in result.stdout, (result.stdout, lines)
    dismissed = [line for line in lines if "could not be shown" in line]
    assert len(dismissed) == 1 and "`tray-proxy unlock`" in dismissed[0], lines
    assert not any("PromptDismissedException" in line for line in lines), lines
    assert 'created the keyring "login"' in result.stdout


CTRL_D = "<ctrl-d>"


def _converse(argv: list[str], env: dict[str, str], turns: list[tuple[str, str]]) -> str:
    """Run `argv` on a terminal (`script` gives it a pty) and answer each prompt in turn:
    wait for the prompt text, then type the answer. Returns everything it printed."""
    import select
    import time

    proc = subprocess.Popen(
        ["script", "-qec", shlex.join(argv), "/dev/null"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env=env, cwd=REPO, start_new_session=True,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    seen = b""
    try:
        for prompt, answer in [*turns, ("", "")]:
            deadline = time.monotonic() + 30
            while prompt.encode() not in seen or not prompt:
                ready, _, _ = select.select([proc.stdout], [], [], 0.2)
                if ready:
                    chunk = os.read(proc.stdout.fileno(), 4096)
                    if not chunk:
                        break
                    seen += chunk
                elif not prompt and proc.poll() is not None:
                    break
                assert time.monotonic() < deadline, f"no {prompt!r} within 30 s: {seen!r}"
            if not prompt:
                break
            seen = seen.replace(prompt.encode(), b"<" + prompt.encode() + b">", 1)
            proc.stdin.write(b"\x04" if answer == CTRL_D else answer.encode() + b"\n")
            proc.stdin.flush()
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdin.close()
        proc.stdout.close()
    return seen.decode("utf-8", "replace")


def test_unlock_asks_on_the_terminal_twice_for_a_new_keyring(bare: KeyringSandbox) -> None:
    env = bare.env()
    argv = [sys.executable, "-m", "tray_proxy", "unlock"]
    typo = _converse(argv, env, [("Keyring password: ", "first"), ("Repeat it: ", "frist")])
    assert "the two passwords differ; nothing was created" in typo
    cancelled = _converse(argv, env, [("Keyring password: ", CTRL_D)])
    assert "cancelled; the keyring is as it was" in cancelled and "Traceback" not in cancelled
    assert not (bare.home / ".local/share/keyrings/login.keyring").exists()

    password = "kr-" + secrets.token_hex(4)
    created = _converse(argv, env, [("Keyring password: ", password), ("Repeat it: ", password)])
    assert 'created the keyring "login"' in created, created
    assert password not in created  # never echoed
    bare.run(UNLOCK, session=False)  # (already unlocked: asks nothing)
    answers = bare.store([{"op": "lock"}], session=False, env=_bus_env(bare))
    assert answers[0]["result"] is True
    unlocked = _converse(argv, env, [("Keyring password: ", password)])
    assert "the keyring is unlocked" in unlocked and "Repeat" not in unlocked, unlocked
