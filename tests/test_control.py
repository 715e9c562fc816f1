"""The control socket: round trips, 0600 mode, single instance, stale sockets, the CLI side.

No Qt. The server runs on an asyncio loop in a helper thread; the client is the real
blocking `send_command` the CLI uses. Every socket lives in the test's own tmp directory.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tray_proxy import cli
from tray_proxy.control import (
    SOCKET_NAME,
    ControlError,
    ControlServer,
    NotRunningError,
    _private_dir,
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
        self.server = ControlServer(self.handle, directory)
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


def test_runtime_dir_prefers_a_private_xdg_dir(private_dir: Path, tmp_path: Path) -> None:
    assert runtime_dir({"XDG_RUNTIME_DIR": str(private_dir)}) == private_dir
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    assert not _private_dir(shared, os.getuid())
    link = tmp_path / "link"
    link.symlink_to(private_dir)
    assert not _private_dir(link, os.getuid())
    assert not _private_dir(private_dir, os.getuid() + 1)
    fallback = runtime_dir({"XDG_RUNTIME_DIR": str(shared)})
    assert fallback == Path("/tmp") / f"tray-proxy-{os.getuid()}"
    assert _private_dir(fallback, os.getuid())


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
