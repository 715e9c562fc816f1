"""The tray: icon, tooltip and menu per state; menu actions call the injected services."""

from __future__ import annotations

import pytest
from PySide6.QtGui import QGuiApplication
from PySide6.QtWidgets import QSystemTrayIcon
from pytestqt.qtbot import QtBot

from tray_proxy.controller import State, StatusUpdated
from tray_proxy.ui.bridge import UiBridge
from tray_proxy.ui.icons import state_icon
from tray_proxy.ui.menu import find_action
from tray_proxy.ui.tray import Tray, tooltip_text

from .conftest import FakeServices, make_status


class Opened:
    def __init__(self) -> None:
        self.window = 0
        self.credentials = 0
        self.errors: list[tuple[str, str]] = []


@pytest.fixture
def tray(qtbot: QtBot, services: FakeServices) -> tuple[Tray, UiBridge, Opened]:
    bridge = UiBridge(interval_ms=10)
    opened = Opened()

    def show_window() -> None:
        opened.window += 1

    def open_credentials() -> None:
        opened.credentials += 1

    tray = Tray(
        services,
        bridge,
        show_window=show_window,
        open_credentials=open_credentials,
        report_error=lambda title, text: opened.errors.append((title, text)),
    )
    return tray, bridge, opened


def _labels(tray: Tray) -> list[str]:
    return [a.text() for a in tray.menu.actions() if not a.isSeparator()]


@pytest.mark.parametrize("state", list(State))
def test_icon_tooltip_and_menu_follow_the_state(
    qtbot: QtBot, tray: tuple[Tray, UiBridge, Opened], services: FakeServices, state: State
) -> None:
    icon, bridge, _ = tray
    services.current = make_status(state)
    bridge.post(StatusUpdated(services.current))
    qtbot.waitUntil(lambda: icon.shown_state is state, timeout=2000)
    assert icon.icon.icon().cacheKey() == state_icon(state).cacheKey()
    tip = icon.icon.toolTip()
    assert tip.startswith(f"tray-proxy: {state.label}")
    assert "Proxy: corp" in tip
    assert "Last error: corp: connection refused" in tip
    assert ("3 open connections" in tip) == state.redirecting

    icon.rebuild_menu()  # what aboutToShow does
    toggle = find_action(icon.menu, "toggle")
    assert toggle is not None
    expected = {
        State.OFF: "Switch on",
        State.ERROR: "Switch on",
        State.ENABLING: "Cancel switching on",
    }.get(state, "Switch off")
    assert toggle.text() == expected
    assert toggle.isEnabled() == (state is not State.DISABLING)
    summary = find_action(icon.menu, "summary")
    assert summary is not None and summary.text().startswith(f"tray-proxy: {state.label}")


def test_menu_lists_upstreams_with_latency_and_checks_the_active_one(
    tray: tuple[Tray, UiBridge, Opened], services: FakeServices
) -> None:
    icon = tray[0]
    icon.rebuild_menu()
    corp = find_action(icon.menu, "upstream:corp")
    backup = find_action(icon.menu, "upstream:backup")
    assert corp is not None and backup is not None
    assert corp.text() == "corp (12 ms)" and corp.isChecked()
    assert backup.text() == "backup (no handshake yet, failing)" and not backup.isChecked()
    backup.trigger()
    assert services.calls == [("select_upstream", "backup")]


def test_menu_without_upstreams_says_so(
    tray: tuple[Tray, UiBridge, Opened], services: FakeServices
) -> None:
    services.current = make_status(State.OFF, upstreams=(), upstream=None)
    tray[0].rebuild_menu()
    upstreams = find_action(tray[0].menu, "upstreams")
    assert upstreams is not None and upstreams.menu() is not None
    assert [a.text() for a in upstreams.menu().actions()] == ["No proxy set up"]
    assert "Proxy: none set up" in tooltip_text(services.current)


def test_menu_actions_call_the_services(
    tray: tuple[Tray, UiBridge, Opened], services: FakeServices
) -> None:
    icon, _, opened = tray
    services.current = make_status(State.OFF)
    icon.rebuild_menu()
    by_text = {a.text(): a for a in icon.menu.actions()}
    assert list(by_text)[1:] == [
        "Switch on",
        "Proxy",
        "",
        "Open window",
        "Credentials…",
        "Test connection",
        "Copy diagnostics",
        "Start at login",
        "Quit",
    ]
    by_text["Switch on"].trigger()
    by_text["Open window"].trigger()
    by_text["Credentials…"].trigger()
    by_text["Test connection"].trigger()
    by_text["Copy diagnostics"].trigger()
    by_text["Start at login"].trigger()
    by_text["Quit"].trigger()
    assert services.calls == [
        ("enable", None),
        ("test_connection", None),
        ("diagnostics", None),
        ("set_autostart", True),
        ("quit", None),
    ]
    assert (opened.window, opened.credentials) == (1, 1)
    assert QGuiApplication.clipboard().text() == "tray-proxy diagnostics\nstate: on\n"
    # Rebuilt on the next opening: now it offers "Switch off" and shows autostart checked.
    services.current = make_status(State.ON)
    icon.rebuild_menu()
    toggle = find_action(icon.menu, "toggle")
    autostart = find_action(icon.menu, "autostart")
    assert toggle is not None and autostart is not None
    assert autostart.isChecked()
    toggle.trigger()
    assert services.calls[-1] == ("disable", None)


def test_rebuilding_does_not_pile_up_submenus(
    qtbot: QtBot, tray: tuple[Tray, UiBridge, Opened]
) -> None:
    icon = tray[0]
    from PySide6.QtWidgets import QMenu

    for _ in range(20):
        icon.rebuild_menu()
    qtbot.wait(20)  # deleteLater runs in the event loop
    assert len(icon.menu.findChildren(QMenu)) <= 2


def test_autostart_failure_is_reported(
    tray: tuple[Tray, UiBridge, Opened], services: FakeServices
) -> None:
    icon, _, opened = tray
    services.autostart_error = PermissionError(13, "Permission denied", "/x/autostart")
    icon.rebuild_menu()
    autostart = find_action(icon.menu, "autostart")
    assert autostart is not None
    autostart.trigger()
    ((title, text),) = opened.errors
    assert title == "Start at login" and "Permission denied" in text and "/x/autostart" in text


def test_left_click_toggles_other_clicks_do_not(
    tray: tuple[Tray, UiBridge, Opened], services: FakeServices
) -> None:
    icon = tray[0]
    icon.icon.activated.emit(QSystemTrayIcon.ActivationReason.Trigger)
    icon.icon.activated.emit(QSystemTrayIcon.ActivationReason.Context)
    assert services.calls == [("toggle", None)]


def test_a_sub_millisecond_handshake_is_not_zero() -> None:
    """Through a spare connection a handshake takes well under a millisecond."""
    from tray_proxy.controller import UpstreamInfo
    from tray_proxy.ui.menu import upstream_text

    assert upstream_text(UpstreamInfo("corp", "http://p:1", True, 0.00042, False)) == (
        "corp (0.4 ms)"
    )


def test_tooltip_says_direct_while_no_proxy_is_reachable() -> None:
    tip = tooltip_text(make_status(State.ON, routing="direct: proxy unreachable"))
    assert "Routing: direct: proxy unreachable" in tip.splitlines()
    assert "Routing" not in tooltip_text(make_status(State.ON))
