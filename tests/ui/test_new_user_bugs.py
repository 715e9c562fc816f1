"""Issue 14 bug 5: a settings file that cannot be read is said at start, where the user looks:
the tray icon and its tooltip, the window's Overview (state, message, errors) and the status
the control socket gives (`tray-proxy status`). Real widgets on a real ProxyController with a
real settings file; only the relay is the controller tests' in-memory one (nothing is
switched on here)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from pytestqt.qtbot import QtBot

from tests.controller.fakes import FakeRelayFactory, Log
from tray_proxy.app import AppServices, Autostart
from tray_proxy.controller import ProxyController, State
from tray_proxy.controller.commands import INSTANCE_TRAY, answer_command
from tray_proxy.controller.services import ConfigFile
from tray_proxy.ui.bridge import UiBridge
from tray_proxy.ui.icons import state_icon
from tray_proxy.ui.main_window import MainWindow
from tray_proxy.ui.tray import Tray

BROKEN = '[relay]\nport = "abc"\n[[upstream]]\nname = "corp"\nurl = "http://proxy:8080"\n'


def test_a_broken_settings_file_shows_at_start_in_tray_window_and_status(
    qtbot: QtBot, tmp_path: Path
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(BROKEN, encoding="utf-8")
    controller = ProxyController(ConfigFile(path), FakeRelayFactory(Log()), None)
    services = AppServices(controller, Autostart(config_home=tmp_path), asyncio.Event())
    bridge = UiBridge(interval_ms=10)
    window = MainWindow(services, bridge, tray_available=True)
    qtbot.addWidget(window)
    tray = Tray(
        services,
        bridge,
        show_window=window.show_and_raise,
        open_credentials=window.open_credentials,
        report_error=window.report_error,
    )
    bridge.attach(controller)

    # The tray, from its first paint.
    assert tray.shown_state is State.ERROR
    assert tray.icon.icon().cacheKey() == state_icon(State.ERROR).cacheKey()
    tip = tray.icon.toolTip()
    assert "tray-proxy: Error" in tip and "relay.port" in tip, tip
    # The window's Overview.
    qtbot.waitUntil(lambda: window.state_label.text() == "Error", timeout=2000)
    message = window.message_label.text()
    assert str(path) in message and "relay.port" in message
    assert "Switch on" in message  # what to do, named as the menu and the button name it
    errors = window.overview.errors
    assert any("relay.port" in errors.item(i).text() for i in range(errors.count()))
    # `tray-proxy status` (the control socket's answer).
    answer = asyncio.run(
        answer_command(controller, "status", instance=INSTANCE_TRAY, quit=lambda: None)
    )
    status = answer["status"]
    assert status["state"] == "error"
    assert [e["text"] for e in status["last_errors"]] == [message]
    tray.hide()


def test_switching_on_after_the_file_was_fixed_works(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(BROKEN, encoding="utf-8")
    controller = ProxyController(ConfigFile(path), FakeRelayFactory(Log()), None)
    assert controller.state is State.ERROR
    path.write_text(BROKEN.replace('"abc"', "12080"), encoding="utf-8")

    async def scenario() -> State:
        status = await controller.enable()
        await controller.shutdown()
        return status.state

    assert asyncio.run(scenario()) is State.ON
