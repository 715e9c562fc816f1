"""The setup window with the real steps (setup_flow.SetupService over a SetupFlow on a temp
settings file), real probes through real proxies on loopback (tests/relay/stubs.py:
asyncio servers speaking CONNECT with Basic auth, or never answering), and the real
discovery of an environment the test gives. The keyring is an in-memory stand-in here
(tests/ui must not import keyring); the real keyring is covered by tests/test_cli_setup.py
in the lab.

Each test runs as a coroutine on a qasync loop, as in the app, driving widgets with QTest.
With TRAY_PROXY_SCREENSHOTS=1 the filled-in window after a working test is saved to
docs/setup-window.png (run under Xvfb with QT_QPA_PLATFORM=xcb for a real rendering).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import pytest
import qasync
from PySide6.QtCore import Qt
from PySide6.QtTest import QTest
from PySide6.QtWidgets import QApplication, QLineEdit
from pytestqt.qtbot import QtBot

from tests.relay.stubs import ConnectProxy, Mode, Origin, echo
from tray_proxy.config import load_config
from tray_proxy.discovery import Discovery, from_environment
from tray_proxy.relay.secrets import Secret
from tray_proxy.relay.settings import UpstreamProxy
from tray_proxy.setup_flow import SetupFlow, SetupService
from tray_proxy.ui.setup_window import SetupWindow

PASSWORD = "correct horse battery staple"
DEADLINE = 10.0
DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "setup-window.png"

Scenario = Callable[[], Awaitable[None]]


class MemoryKeyring:
    """Stands in for the keyring in UI tests (no keyring import in tests/ui)."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[str, str]] = {}

    async def set(self, name: str, username: str, password: Secret) -> None:
        await asyncio.sleep(0)
        self.entries[name] = (username, password.reveal())

    async def backend_description(self) -> str:
        return "the test's keyring"


@pytest.fixture
def run(qapp: QApplication) -> Callable[[Scenario], None]:
    qapp.setQuitOnLastWindowClosed(False)

    def runner(scenario: Scenario) -> None:
        async def bounded() -> None:
            await asyncio.wait_for(scenario(), 60.0)

        with asyncio.Runner(loop_factory=lambda: qasync.QEventLoop(qapp)) as r:
            r.run(bounded())

    return runner


async def until(predicate: Callable[[], bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def type_into(edit: QLineEdit, text: str) -> None:
    edit.setFocus()
    edit.selectAll()
    QTest.keyClick(edit, Qt.Key.Key_Delete)
    if text:
        QTest.keyClicks(edit, text)


def discovery_of(env: Mapping[str, str]) -> Callable[[], Discovery]:
    def run() -> Discovery:
        found, notes = from_environment(env)
        return Discovery(tuple(found), tuple(notes))

    return run


class Rig:
    def __init__(self, tmp_path: Path, env: Mapping[str, str]) -> None:
        self.config = tmp_path / "config.toml"
        self.keyring = MemoryKeyring()
        self.after: list[UpstreamProxy] = []
        self.service = SetupService(
            SetupFlow(self.config, store=self.keyring, timeout=2.0),
            after_save=self.after_save,
            discover_fn=discovery_of(env),
        )

    async def after_save(self, upstream: UpstreamProxy) -> str | None:
        self.after.append(upstream)
        return None

    async def open(self, qtbot: QtBot) -> SetupWindow:
        window = SetupWindow(self.service)
        qtbot.addWidget(window)
        window.show()
        await until(lambda: not window.busy, "the window's first look")
        return window


def test_found_settings_are_shown_and_prefilled(
    qtbot: QtBot, run: Callable[[Scenario], None], tmp_path: Path
) -> None:
    async def scenario() -> None:
        env = {
            "https_proxy": "http://alice:secret@proxy.corp.example:3128",
            "no_proxy": "localhost,.corp.example",
        }
        window = await Rig(tmp_path, env).open(qtbot)
        found = window.found_label.text()
        assert "environment: https_proxy: http://proxy.corp.example:3128 (user alice)" in found
        assert "direct: localhost, .corp.example" in found
        assert "carries a password; it is not used" in found
        assert "secret" not in found
        assert window.proxy_edit.text() == "http://proxy.corp.example:3128"
        assert window.name_edit.text() == "corp"  # never "proxy"
        assert window.user_edit.text() == "alice"
        assert window.target_edit.text() == "www.microsoft.com:443"
        assert window.password_edit.echoMode() is QLineEdit.EchoMode.Password
        assert window.pac_label.isHidden()
        # A typed proxy URL gets its own name, until the user names it.
        type_into(window.proxy_edit, "webproxy.acme.com:8080")
        assert window.name_edit.text() == "acme"
        type_into(window.name_edit, "work")
        type_into(window.proxy_edit, "proxy.other.example:8080")
        assert window.name_edit.text() == "work"

    run(scenario)


def test_wrong_password_then_save_with_the_right_one(
    qtbot: QtBot, run: Callable[[Scenario], None], tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with contextlib.AsyncExitStack() as stack:
            origin = await stack.enter_async_context(Origin(echo))
            proxy = await stack.enter_async_context(ConnectProxy(credentials=("alice", PASSWORD)))
            host, port = proxy.address
            rig = Rig(tmp_path, {"http_proxy": f"http://{host}:{port}"})
            window = await rig.open(qtbot)
            saved: list[str] = []
            window.saved.connect(saved.append)
            target = f"{origin.address[0]}:{origin.address[1]}"
            type_into(window.target_edit, target)
            type_into(window.user_edit, "alice")
            type_into(window.password_edit, "wrong")
            QTest.mouseClick(window.test_button, Qt.MouseButton.LeftButton)
            assert not window.test_button.isEnabled()  # cannot start it twice
            await until(lambda: not window.busy, "the test")
            text = window.result_label.text()
            assert text.startswith("The proxy answered (407) in "), text
            assert text.endswith("Check the user name and password."), text

            type_into(window.password_edit, PASSWORD)
            QTest.mouseClick(window.save_button, Qt.MouseButton.LeftButton)
            await until(lambda: not window.busy, "the save")
            text = window.result_label.text()
            assert text.startswith(f"OK: {host}:{port} opened a tunnel to {target} in "), text
            assert "Choose Switch on" in text
            assert saved == ["corp"]
            assert rig.keyring.entries == {"corp": ("alice", PASSWORD)}
            config = load_config(rig.config)
            assert [(u.name, u.url, u.username) for u in config.upstreams] == [
                ("corp", f"http://{host}:{port}", "alice")
            ]
            assert config.relay.upstream == "corp"
            assert config.probe.target == origin.address
            assert [u.name for u in rig.after] == ["corp"]
            assert PASSWORD not in rig.config.read_text()
            assert window.password_edit.text() == ""
            if os.environ.get("TRAY_PROXY_SCREENSHOTS") == "1":
                window.password_edit.setText(PASSWORD)  # dots in the picture, as after typing
                window.grab().save(str(DOCS_SCREENSHOT))

    run(scenario)


def test_save_does_not_save_when_the_test_fails(
    qtbot: QtBot, run: Callable[[Scenario], None], tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with ConnectProxy(Mode.SILENT) as silent:
            host, port = silent.address
            rig = Rig(tmp_path, {})
            window = await rig.open(qtbot)
            assert window.found_label.text() == "nothing found"
            assert window.proxy_edit.text() == "" and window.name_edit.text() == "corp"
            type_into(window.proxy_edit, f"{host}:{port}")
            type_into(window.target_edit, "pypi.org:443")
            QTest.mouseClick(window.save_button, Qt.MouseButton.LeftButton)
            await until(lambda: not window.busy, "the test before saving")
            text = window.result_label.text()
            assert text.startswith(f"No answer from pypi.org:443: {host}:{port} took the "
                                   "connection but did not answer"), text  # fmt: skip
            assert text.endswith("Try Test target with a site the proxy can reach."), text
            assert not rig.config.exists() and rig.after == []

    run(scenario)


def test_bad_input_is_said_and_nothing_runs(
    qtbot: QtBot, run: Callable[[Scenario], None], tmp_path: Path
) -> None:
    async def scenario() -> None:
        rig = Rig(tmp_path, {})
        window = await rig.open(qtbot)
        QTest.mouseClick(window.test_button, Qt.MouseButton.LeftButton)
        assert not window.busy
        assert window.result_label.text() == (
            "No proxy URL given; it looks like http://proxy.corp.example:8080."
        )
        type_into(window.proxy_edit, "proxy.corp.example:8080")
        type_into(window.user_edit, "alice")
        QTest.mouseClick(window.save_button, Qt.MouseButton.LeftButton)
        assert window.result_label.text() == "No password given for alice."
        assert not rig.config.exists()

    run(scenario)


def test_a_broken_settings_file_is_shown_not_overwritten(
    qtbot: QtBot, run: Callable[[Scenario], None], tmp_path: Path
) -> None:
    async def scenario() -> None:
        rig = Rig(tmp_path, {})
        rig.config.write_text("[relay]\nport = 'x'\n")
        window = await rig.open(qtbot)
        assert "relay.port" in window.result_label.text()
        assert "it was not changed" in window.result_label.text()
        assert not window.save_button.isEnabled() and window.test_button.isEnabled()
        assert rig.config.read_text() == "[relay]\nport = 'x'\n"

    run(scenario)


# --------------------------------------------------------------------------- the app's first start


def _start_app(tmp_path: Path, config_text: str | None) -> tuple[str, int]:
    """The real app (`tray-proxy --no-tray -v`, offscreen, its own runtime and config
    directories); quit over its control socket once it answers. Returns its log and exit."""
    import subprocess
    import sys
    import time

    from tray_proxy.instance import SOCKET_NAME, NotRunningError, send_command

    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    config_home = tmp_path / "config"
    if config_text is not None:
        (config_home / "tray-proxy").mkdir(parents=True)
        (config_home / "tray-proxy" / "config.toml").write_text(config_text)
    env = {
        **os.environ,
        "QT_QPA_PLATFORM": "offscreen",
        "XDG_RUNTIME_DIR": str(run_dir),
        "XDG_CONFIG_HOME": str(config_home),
    }
    for var in ("DISPLAY", "http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        env.pop(var, None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tray_proxy", "--no-tray", "-v"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30.0
        sock = run_dir / SOCKET_NAME
        while True:
            try:
                send_command("status", sock, timeout=5)
                break
            except NotRunningError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
        if proc.poll() is None:
            send_command("quit", sock, timeout=5)
        code = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.stdout is not None
    out = proc.stdout.read().decode()
    proc.stdout.close()
    return out, code


def test_the_app_opens_the_setup_window_at_first_start(tmp_path: Path) -> None:
    out, code = _start_app(tmp_path, None)
    assert code == 0, out
    assert "opening the setup window" in out, out
    assert "Traceback" not in out and "file not found" not in out


def test_the_app_with_a_proxy_set_up_opens_no_setup_window(tmp_path: Path) -> None:
    config = '[[upstream]]\nname = "corp"\nurl = "http://proxy.corp.example:8080"\n'
    out, code = _start_app(tmp_path, config)
    assert code == 0, out
    assert "opening the setup window" not in out
