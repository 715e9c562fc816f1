"""The control socket: round trips, 0600 mode, single instance, stale sockets, the CLI side.

No Qt. The server runs on an asyncio loop in a helper thread; the client is the real
blocking `send_command` the CLI uses. Every socket lives in the test's own tmp directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.lab.netns import run_tag
from tests.lab.users import LocalUser, local_users
from tray_proxy import cli
from tray_proxy.instance import (
    ACCEPT_BATCH,
    LISTEN_BACKLOG,
    MAX_LINE,
    SOCKET_NAME,
    ControlError,
    ControlServer,
    NotRunningError,
    _private_dir,
    home_control_dir,
    runtime_dir,
    send_command,
)


@pytest.fixture
def private_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "run"
    directory.mkdir(mode=0o700)
    return directory


class ServerThread:
    """A ControlServer on its own loop in a thread, answering with canned handlers."""

    def __init__(self, directory: Path) -> None:
        self.commands: list[str] = []
        self.fail = False
        self.answer_now = False  # `immediate` answers status (as the app's does)
        self.server = ControlServer(self.handle, directory, immediate=self.immediate)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def handle(self, command: str) -> dict[str, Any]:
        self.commands.append(command)
        if self.fail:
            raise RuntimeError("boom")
        if command == "status":
            return {
                "status": {
                    "state": "on",
                    "message": "Redirecting.",
                    "upstream": "corp",
                    "active_connections": 2,
                    "last_errors": [{"text": "e1"}],
                }
            }
        return {}

    def immediate(self, command: str) -> dict[str, Any] | None:
        if not self.answer_now or command != "status":
            return None
        self.commands.append(f"now {command}")
        if self.fail:
            raise RuntimeError("bang")
        return {"status": {"state": "off"}}

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The server's loop blocked inside the block: what clients send meanwhile is all
        there when it next looks."""
        blocked, release = threading.Event(), threading.Event()

        def block() -> None:
            blocked.set()
            release.wait(10)

        self.loop.call_soon_threadsafe(block)
        assert blocked.wait(5)
        try:
            yield
        finally:
            release.set()

    def start(self) -> None:
        assert self.server.claim()
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(5)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def server(private_dir: Path) -> Iterator[ServerThread]:
    running = ServerThread(private_dir)
    running.start()
    try:
        yield running
    finally:
        running.stop()


def test_round_trip_and_socket_mode(server: ServerThread, private_dir: Path) -> None:
    path = private_dir / SOCKET_NAME
    mode = os.stat(path).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600
    answer = send_command("status", path)
    assert answer["ok"] is True
    assert answer["status"]["state"] == "on"
    assert send_command("raise", path) == {"ok": True}
    assert server.commands == ["status", "raise"]


def test_handler_failure_is_an_answer_not_a_hang(server: ServerThread, private_dir: Path) -> None:
    server.fail = True
    answer = send_command("enable", private_dir / SOCKET_NAME, timeout=5)
    assert answer == {"ok": False, "error": "enable failed: boom"}


@pytest.mark.parametrize(
    ("request_line", "error"),
    [
        (b"not json\n", "bad request"),
        (b'{"v": 99, "cmd": "status"}\n', "protocol version 99 is not supported"),
        (b'{"v": 1, "cmd": "rm -rf"}\n', "unknown command"),
    ],
)
def test_bad_requests_are_refused_with_a_reason(
    server: ServerThread, private_dir: Path, request_line: bytes, error: str
) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(str(private_dir / SOCKET_NAME))
        sock.sendall(request_line)
        answer = json.loads(sock.makefile("rb").readline())
    assert answer["ok"] is False
    assert error in answer["error"]
    assert server.commands == []


def test_a_request_in_pieces_is_answered_and_an_overlong_one_refused(
    server: ServerThread, private_dir: Path
) -> None:
    path = str(private_dir / SOCKET_NAME)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(path)
        for piece in (b'{"v": 1, ', b'"cmd": "sta', b'tus"}\n'):
            sock.sendall(piece)
            time.sleep(0.05)  # each piece arrives on its own; the server waits for the line
        answer = json.loads(sock.makefile("rb").readline())
    assert answer["ok"] is True and answer["status"]["state"] == "on"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(path)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(b"x" * (MAX_LINE + 4096))  # no newline, over the limit
        answer = json.loads(sock.makefile("rb").readline())
    assert answer["ok"] is False and "bad request" in answer["error"]
    assert server.commands == ["status"]


def test_silent_clients_do_not_hold_up_the_others(server: ServerThread, private_dir: Path) -> None:
    # While the app's loop is busy, connections queue up to LISTEN_BACKLOG; one more is
    # refused at once (EAGAIN) to a client with a timeout. The CLI then tries again within
    # its timeout, and is answered once the loop takes the queue, silent clients and all.
    path = private_dir / SOCKET_NAME
    with contextlib.ExitStack() as stack:
        with server.paused():
            queued = 0
            for _ in range(LISTEN_BACKLOG + 8):  # bounded: the queue holds backlog + 1
                sock = stack.enter_context(socket.socket(socket.AF_UNIX))
                sock.setblocking(False)
                try:
                    sock.connect(str(path))
                except BlockingIOError:
                    break
                queued += 1
            assert queued > LISTEN_BACKLOG, queued  # the queue is full now
            with pytest.raises(ControlError, match="did not take the connection within"):
                send_command("status", path, timeout=0.3)
            asked: list[dict[str, Any]] = []
            asking = threading.Thread(
                target=lambda: asked.append(send_command("status", path, timeout=10))
            )
            asking.start()
            time.sleep(0.1)  # it is waiting for room in the queue (the loop is held)
        asking.join(15)
        assert asked and asked[0]["ok"] is True
        answers = [send_command("status", path, timeout=5) for _ in range(ACCEPT_BATCH + 2)]
    assert all(answer["ok"] is True for answer in answers)
    assert server.commands == ["status"] * (ACCEPT_BATCH + 3)


def test_status_is_answered_at_once_and_the_rest_by_the_handler(
    server: ServerThread, private_dir: Path
) -> None:
    # `immediate` answers in the accept's own pass of the loop (the app's busy Qt loop then
    # holds a `tray-proxy status` for one pass, not three); a command it does not answer,
    # and a status whose line was not there yet at the accept, go to the handler.
    path = private_dir / SOCKET_NAME
    server.answer_now = True

    def ask(command: str) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            with server.paused():  # the request is there by the accept, as from the CLI
                sock.connect(str(path))
                sock.sendall(json.dumps({"v": 1, "cmd": command}).encode() + b"\n")
            answer: dict[str, Any] = json.loads(sock.makefile("rb").readline())
            return answer

    assert ask("status")["status"] == {"state": "off"}
    assert ask("enable") == {"ok": True}
    deadline = time.monotonic() + 5
    while server.server._clients:  # the enable's task has gone (its done callback ran)
        assert time.monotonic() < deadline, "the server's tasks did not end"
        time.sleep(0.01)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        while not server.server._clients:  # accepted, waiting for the request in a task
            assert time.monotonic() < deadline, "the server did not accept the connection"
            time.sleep(0.01)
        sock.sendall(b'{"v": 1, "cmd": "status"}\n')
        late = json.loads(sock.makefile("rb").readline())
    assert late["status"]["state"] == "on"
    assert server.commands == ["now status", "enable", "status"]
    server.fail = True
    assert ask("status") == {"ok": False, "error": "status failed: bang"}
    assert server.commands[-1] == "now status"


def test_second_instance_cannot_claim(server: ServerThread, private_dir: Path) -> None:
    second = ControlServer(server.handle, private_dir)
    assert second.claim() is False


def test_nobody_running_and_stale_socket(private_dir: Path) -> None:
    path = private_dir / SOCKET_NAME
    with pytest.raises(NotRunningError):
        send_command("status", path)
    # A socket file left by a crashed instance: connecting is refused, not hanging.
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    with pytest.raises(NotRunningError):
        send_command("status", path)
    # The next instance takes over the path.
    running = ServerThread(private_dir)
    running.start()
    try:
        assert send_command("status", path)["ok"] is True
    finally:
        running.stop()
    assert not path.exists()  # close() removes the socket ...
    again = ControlServer(running.handle, private_dir)
    assert again.claim()  # ... and gives up the lock
    again.release()


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A directory with a short path: pytest's tmp_path is too long for a Unix socket below a
    home directory's .local/state/tray-proxy/control-<host>/."""
    base = Path(tempfile.mkdtemp(prefix="tp-"))
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_runtime_dir_prefers_a_private_xdg_dir(private_dir: Path, short_tmp: Path) -> None:
    tmp_path = short_tmp
    assert runtime_dir({"XDG_RUNTIME_DIR": str(private_dir)}) == private_dir
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    assert not _private_dir(shared, os.getuid())
    link = tmp_path / "link"
    link.symlink_to(private_dir)
    assert not _private_dir(link, os.getuid())
    assert not _private_dir(private_dir, os.getuid() + 1)
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    fallback = runtime_dir({"XDG_RUNTIME_DIR": str(shared), "HOME": str(home)})
    assert fallback == home / ".local/state/tray-proxy" / f"control-{_host()}"
    assert _private_dir(fallback, os.getuid())


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())[:64]


def test_without_xdg_runtime_dir_the_socket_lives_under_home(short_tmp: Path) -> None:
    tmp_path = short_tmp
    # Not in /tmp, where another user can pre-create the directory (issue 16, item 6).
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    directory = runtime_dir({"HOME": str(home)})
    assert directory == home / ".local/state/tray-proxy" / f"control-{_host()}"
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    assert not str(directory).startswith("/tmp/tray-proxy-")
    # XDG_STATE_HOME (absolute) wins over HOME; a relative one is ignored, as the spec says.
    state = tmp_path / "state"
    assert runtime_dir({"HOME": str(home), "XDG_STATE_HOME": str(state)}) == (
        state / "tray-proxy" / f"control-{_host()}"
    )
    assert runtime_dir({"HOME": str(home), "XDG_STATE_HOME": "rel"}) == directory
    # Without HOME, the account's home from the password database.
    assert runtime_dir({}, uid=os.getuid()).parent.parent.parent.parent == Path(
        pwd.getpwuid(os.getuid()).pw_dir
    )


def _unused_uid() -> int:
    for candidate in range(59000, 60000):
        with contextlib.suppress(KeyError):
            pwd.getpwuid(candidate)
            continue
        return candidate
    raise AssertionError("no unused uid in 59000-59999")


def test_unusable_home_locations_are_reported_with_the_fix(short_tmp: Path) -> None:
    tmp_path = short_tmp
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    taken = home / ".local/state/tray-proxy" / f"control-{_host()}"
    taken.mkdir(mode=0o755, parents=True)
    taken.chmod(0o755)
    with pytest.raises(ControlError, match="is not a private directory of yours"):
        runtime_dir({"HOME": str(home)})
    blocked = tmp_path / "file-home"
    blocked.write_text("")
    with pytest.raises(ControlError, match="Cannot create .* Set XDG_RUNTIME_DIR"):
        runtime_dir({"HOME": str(blocked)})
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    with pytest.raises(ControlError, match="too long a path for a Unix socket"):
        runtime_dir({"HOME": str(deep)})
    with pytest.raises(ControlError, match="No home directory is known"):
        runtime_dir({}, uid=_unused_uid())


def test_cli_commands_talk_to_the_running_app(
    server: ServerThread,
    private_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(private_dir))
    assert cli.main(["status"]) == 0
    out = capsys.readouterr().out
    assert "on: Redirecting." in out and "proxy: corp" in out and "error: e1" in out
    assert cli.main(["status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["active_connections"] == 2
    assert cli.main(["quit"]) == 0
    assert server.commands == ["status", "status", "quit"]


def test_cli_says_when_no_app_runs(
    private_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(private_dir))
    for command in ("status", "enable", "disable", "quit"):
        assert cli.main([command]) == cli.EXIT_NOT_RUNNING
        assert "no tray-proxy is running" in capsys.readouterr().err


def test_unknown_command_is_a_programming_error(private_dir: Path) -> None:
    with pytest.raises(ValueError):
        send_command("format-disk", private_dir / SOCKET_NAME)
    assert issubclass(NotRunningError, ControlError)


# --------------------------------------------------------------------------- another user
# Real accounts, "alice" (the owner) and "mallory", made with useradd and removed afterwards
# (tests/lab/users.py), with homes in a directory made for the test and removed afterwards.

REPO = Path(__file__).resolve().parents[1]


class Users:
    def __init__(self, base: Path, alice: LocalUser, mallory: LocalUser) -> None:
        self.base = base
        self.alice, self.mallory = alice.uid, mallory.uid
        self.accounts = {alice.uid: alice, mallory.uid: mallory}
        self.homes: dict[int, Path] = {}
        for uid in (self.alice, self.mallory):
            home = base / f"home-{uid}"
            home.mkdir(mode=0o700)
            os.chown(home, uid, uid)
            self.homes[uid] = home
        # Paths outside `base` that a test made (removed by the fixture).
        self.squatted: list[Path] = []

    def argv(self, uid: int, argv: list[str], **env: str) -> list[str]:
        # env -i: no XDG_RUNTIME_DIR (WSL without systemd), nothing of the test's environment.
        variables = {"HOME": str(self.homes[uid]), "PATH": "/usr/bin:/bin", **env}
        return self.accounts[uid].runuser(
            ["env", "-i", *(f"{k}={v}" for k, v in variables.items()), *argv]
        )

    def run(self, uid: int, argv: list[str], **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(uid, argv, **env), capture_output=True, text=True, timeout=60, check=False
        )


@pytest.fixture
def users() -> Iterator[Users]:
    if os.geteuid() != 0 or shutil.which("runuser") is None or shutil.which("useradd") is None:
        pytest.fail("these tests need root, runuser and useradd (util-linux, passwd)")
    # /tmp itself, not pytest's tmp_path: the other users must be able to reach their homes.
    base = Path(tempfile.mkdtemp(prefix=f"tray-proxy-h4-{os.getpid()}-"))
    base.chmod(0o755)
    made: Users | None = None
    try:
        with local_users(run_tag(), 2) as (accounts, _group):
            made = Users(base, accounts[0], accounts[1])
            yield made
    finally:
        for path in made.squatted if made is not None else []:
            shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)


def _wait_for_line(proc: subprocess.Popen[str], wanted: str, timeout: float) -> list[str]:
    assert proc.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    os.set_blocking(proc.stderr.fileno(), False)
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if line:
            lines.append(line)
            if wanted in line:
                return lines
        elif proc.poll() is not None:
            break
        else:
            time.sleep(0.05)
    raise AssertionError(f"no line with {wanted!r} within {timeout} s: {lines}")


def test_another_user_cannot_block_the_control_socket(users: Users) -> None:
    alice, mallory = users.alice, users.mallory
    # Mallory takes the old place (/tmp/tray-proxy-<alice's uid>) before alice starts ...
    old = Path("/tmp") / f"tray-proxy-{alice}"
    users.squatted.append(old)
    done = users.run(mallory, ["mkdir", "-m", "700", str(old)])
    assert done.returncode == 0, done.stderr
    assert os.stat(old).st_uid == mallory
    # ... and cannot create the new one: it is in alice's home.
    new = home_control_dir({"HOME": str(users.homes[alice])}, alice)
    done = users.run(mallory, ["mkdir", "-p", "-m", "700", str(new)])
    assert done.returncode != 0 and "Permission denied" in done.stderr
    assert not new.exists()

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = users.homes[alice] / "config.toml"
    config.write_text(
        f'[relay]\nport = {port}\nlisten = ["127.0.0.1"]\n'
        '[[upstream]]\nname = "corp"\nurl = "http://127.0.0.1:9"\n'
    )
    os.chown(config, alice, alice)
    run = subprocess.Popen(
        users.argv(alice, [sys.executable, "-m", "tray_proxy", "run", "--config", str(config),
                           "--no-redirect"]),
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )  # fmt: skip
    try:
        lines = _wait_for_line(run, "relay listening on", 30)
        assert not any("control socket" in line for line in lines), lines
        sock = new / SOCKET_NAME
        assert stat.S_ISSOCK(os.stat(sock).st_mode) and os.stat(sock).st_uid == alice
        status = users.run(alice, [sys.executable, "-m", "tray_proxy", "status", "--json"])
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["state"], status.stdout
        # Mallory reaches neither alice's instance nor her socket.
        theirs = users.run(mallory, [sys.executable, "-m", "tray_proxy", "status"])
        assert theirs.returncode == cli.EXIT_NOT_RUNNING, theirs.stderr
        poke = users.run(
            mallory,
            [sys.executable, "-c", "import socket,sys; socket.socket(socket.AF_UNIX)"
             ".connect(sys.argv[1])", str(sock)],
        )  # fmt: skip
        assert poke.returncode != 0 and "Permission denied" in poke.stderr
        quit_ = users.run(alice, [sys.executable, "-m", "tray_proxy", "quit"])
        assert quit_.returncode == 0, quit_.stderr
        assert run.wait(30) == 0
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(10)
        if run.stderr is not None:
            run.stderr.close()


MALLORY_SERVER = r"""
import os, socket, sys
path = sys.argv[1]
with socket.socket(socket.AF_UNIX) as server:
    os.fchmod(server.fileno(), 0o777)
    server.bind(path)
    server.listen(1)
    print("listening", flush=True)
    conn, _ = server.accept()
    conn.settimeout(10)
    data = b""
    while True:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    print("received", len(data), flush=True)
"""


def test_client_talks_only_to_a_server_of_its_own_user(users: Users) -> None:
    # Mallory serves a socket where the client looks (as after a squatted or swapped path):
    # the client must notice before it sends anything.
    mallory = users.mallory
    where = users.base / "shared"
    where.mkdir(mode=0o777)
    where.chmod(0o777)
    path = where / SOCKET_NAME
    server = subprocess.Popen(
        users.argv(mallory, [sys.executable, "-c", MALLORY_SERVER, str(path)]),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "listening"
        with pytest.raises(ControlError) as info:
            send_command("quit", path, timeout=5)
        message = str(info.value)
        assert f"is served by another user (uid {mallory})" in message
        assert "nothing was sent" in message
        assert server.stdout.readline().strip() == "received 0"
        assert server.wait(10) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)
        if server.stdout is not None:
            server.stdout.close()


def test_server_answers_no_other_user(users: Users) -> None:
    directory = users.base / "open"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    running = ServerThread(directory)
    running.start()
    try:
        (directory / SOCKET_NAME).chmod(0o666)  # only SO_PEERCRED stands in the way now
        client = (
            "import socket,sys\ns = socket.socket(socket.AF_UNIX)\ns.settimeout(10)\n"
            "s.connect(sys.argv[1])\n"
            "try:\n"
            '    s.sendall(b\'{"v": 1, "cmd": "quit"}\\n\')\n'
            "    print(repr(s.recv(4096)))\n"
            "except (ConnectionResetError, BrokenPipeError):\n"
            "    print('reset')\n"
        )
        done = users.run(
            users.mallory, [sys.executable, "-c", client, str(directory / SOCKET_NAME)]
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() in ("b''", "reset")  # closed, no answer
        assert running.commands == []
        assert send_command("status", directory / SOCKET_NAME)["ok"] is True
    finally:
        running.stop()
