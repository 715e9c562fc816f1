"""The composition root: autostart entry, control commands, single-instance raise, and one
real start/quit of the app on a qasync loop (in a child process, offscreen, with its own
runtime and config directories; it never switches the redirect on).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_instance import ServerThread
from tray_proxy import app as app_module
from tray_proxy.app import Autostart, GuiApp
from tray_proxy.controller import Status
from tray_proxy.instance import SOCKET_NAME, ControlServer, NotRunningError, send_command

START_DEADLINE = 30.0


def test_autostart_writes_and_removes_the_desktop_entry(tmp_path: Path) -> None:
    autostart = Autostart(config_home=tmp_path, command="/opt/tp/bin/tray-proxy")
    assert not autostart.enabled()
    autostart.set_enabled(True)
    entry = tmp_path / "autostart" / "tray-proxy.desktop"
    assert autostart.enabled() and entry.is_file()
    text = entry.read_text()
    assert "[Desktop Entry]" in text
    assert "\nExec=/opt/tp/bin/tray-proxy\n" in text
    assert "Name=tray-proxy" in text
    autostart.set_enabled(False)
    assert not entry.exists() and not autostart.enabled()
    autostart.set_enabled(False)  # already off: no error


class FakeController:
    def status(self) -> Status:
        return Status()

    async def enable(self) -> Status:
        return Status()

    async def disable(self) -> Status:
        return Status()


class FakeWindow:
    def __init__(self) -> None:
        self.raised = 0

    def show_and_raise(self) -> None:
        self.raised += 1


def test_control_commands_reach_the_app(tmp_path: Path) -> None:
    gui = GuiApp(tmp_path / "config.toml", True, ControlServer(lambda c: None, tmp_path))  # type: ignore[arg-type, return-value]
    window = FakeWindow()

    async def scenario() -> dict[str, Any]:
        gui.quit_event = asyncio.Event()
        gui.controller = FakeController()  # type: ignore[assignment]
        gui.window = window
        status = await gui.handle("status")
        await gui.handle("raise")
        await gui.handle("quit")
        assert gui.quit_event.is_set()
        return status

    status = asyncio.run(scenario())
    assert status["status"]["state"] == "off"
    assert status["instance"] == "tray"
    assert window.raised == 1


@pytest.fixture
def private_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "run"
    directory.mkdir(mode=0o700)
    return directory


def test_second_instance_raises_the_first_and_exits(
    private_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    first = ServerThread(private_dir)
    first.start()
    try:
        monkeypatch.setattr(app_module, "runtime_dir", lambda: private_dir)
        assert app_module.run_gui(no_tray=True) == 0
    finally:
        first.stop()
    assert first.commands == ["raise"]
    assert "already running" in capsys.readouterr().err


def test_the_tray_app_does_not_start_beside_a_headless_run(
    private_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    class HeadlessRun(ServerThread):
        async def handle(self, command: str) -> dict[str, Any]:
            self.commands.append(command)
            return {"instance": "run"}

    first = HeadlessRun(private_dir)
    first.start()
    try:
        monkeypatch.setattr(app_module, "runtime_dir", lambda: private_dir)
        assert app_module.run_gui(no_tray=True) == 1
    finally:
        first.stop()
    err = capsys.readouterr().err
    assert "already running headless (`tray-proxy run`)" in err
    assert "tray-proxy quit" in err


@pytest.fixture
def app_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    env = {
        **os.environ,
        "QT_QPA_PLATFORM": "offscreen",
        "XDG_RUNTIME_DIR": str(run_dir),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
    }
    env.pop("DISPLAY", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tray_proxy", "--no-tray", "-v"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + START_DEADLINE
        sock = run_dir / SOCKET_NAME
        while True:
            try:
                send_command("status", sock, timeout=5)
                break
            except NotRunningError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                out = proc.stdout.read().decode() if proc.stdout else ""
                pytest.fail(f"the app did not start (exit {proc.poll()}):\n{out}")
            time.sleep(0.1)
        yield proc, sock
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        if proc.stdout:
            proc.stdout.close()


def _output(proc: subprocess.Popen[bytes]) -> str:
    assert proc.stdout is not None
    return proc.stdout.read().decode()


@pytest.mark.parametrize("how", ["sigterm", "quit-command"])
def test_real_app_starts_answers_and_quits_cleanly(
    app_process: tuple[subprocess.Popen[bytes], Path], how: str
) -> None:
    proc, sock = app_process
    assert send_command("status", sock)["status"]["state"] == "off"
    answer = send_command("enable", sock)  # no upstream configured: an error, no helper
    assert answer["status"]["state"] == "error"
    assert "No upstream proxy is set up" in answer["status"]["message"]
    if how == "sigterm":
        proc.send_signal(signal.SIGTERM)
    else:
        assert send_command("quit", sock) == {"ok": True}
    assert proc.wait(START_DEADLINE) == 0, _output(proc)
    out = _output(proc)
    assert "quitting" in out
    assert "error -> disabling" in out and "disabling -> off" in out
    assert "Traceback" not in out
    assert not sock.exists()


def test_app_services_reach_the_controller_and_the_history(tmp_path: Path) -> None:
    """What the dashboard asks of the app (ui.services.AppServices), on a real controller
    with the in-memory relay and a real history file."""
    from tests.controller.fakes import Rig
    from tray_proxy.app import AppServices
    from tray_proxy.controller.history import HistoryFile
    from tray_proxy.monitor.history import HistoryWriter
    from tray_proxy.monitor.query import HistoryFilter
    from tray_proxy.monitor.rows import ConnectionRow, RowState
    from tray_proxy.relay.records import CloseReason

    path = tmp_path / "history.sqlite3"
    reader = HistoryFile(path)
    rig = Rig()

    async def scenario() -> None:
        services = AppServices(
            rig.controller, Autostart(config_home=tmp_path), asyncio.Event(), history=reader
        )
        assert services.history() is reader
        assert reader.page(HistoryFilter()).entries == ()  # nothing written yet: no file
        assert services.open_rows() == []
        await rig.controller.enable()
        rig.relays.relays[-1].counters = ({7: (0, 0)}, 0, 0)
        services.close_connections([7])
        services.test_upstream("backup")
        await asyncio.sleep(0)  # both were handed to the loop
        for _ in range(200):
            if rig.relays.relays[-1].closed_ids and rig.notices():
                break
            await asyncio.sleep(0.01)
        await rig.controller.shutdown()

    asyncio.run(asyncio.wait_for(scenario(), 10))
    assert rig.relays.relays[-1].closed_ids == [(7,)]
    assert "Proxy backup" in rig.notices()[0].text
    # Rows the writer puts in the file are what the Log tab pages through.
    writer = HistoryWriter(path, flush_interval=0.05)
    row = ConnectionRow(
        conn_id=1,
        started=1.0,
        client=("127.0.0.1", 1),
        original_dst=("192.0.2.1", 443),
        state=RowState.CLOSED,
        ended=2.0,
        close_reason=CloseReason.DONE,
    )
    writer.submit([row])
    writer.close()
    try:
        (entry,) = reader.page(HistoryFilter()).entries
    finally:
        reader.close()
    assert entry.row.conn_id == 1


@pytest.fixture
def broken_app(
    tmp_path: Path, request: pytest.FixtureRequest
) -> tuple[subprocess.Popen[bytes], Path]:
    """The real app started on a settings file that cannot be read (issue 14 bug 5)."""
    config = tmp_path / "config" / "tray-proxy" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text('[relay]\nport = "abc"\n', encoding="utf-8")
    app: tuple[subprocess.Popen[bytes], Path] = request.getfixturevalue("app_process")
    return app


def test_real_app_says_at_start_that_its_settings_file_is_broken(
    broken_app: tuple[subprocess.Popen[bytes], Path],
) -> None:
    proc, sock = broken_app
    status = send_command("status", sock)["status"]
    assert status["state"] == "error"
    assert "relay.port" in status["message"]
    assert [e["text"] for e in status["last_errors"]] == [status["message"]]
    shown = subprocess.run(
        [sys.executable, "-m", "tray_proxy", "status"],
        capture_output=True,
        text=True,
        env={**os.environ, "XDG_RUNTIME_DIR": str(sock.parent)},
        timeout=30,
    )
    assert shown.returncode == 1  # the state is an error
    assert "error: The settings file cannot be used" in shown.stdout
    assert send_command("quit", sock) == {"ok": True}
    assert proc.wait(START_DEADLINE) == 0, _output(proc)
