"""The main window (also the no-tray fallback): what it shows, what its controls call, closing."""

from __future__ import annotations

import pytest
from PySide6.QtWidgets import QMessageBox, QWidget
from pytestqt.qtbot import QtBot

from tray_proxy.controller import Notice, NoticeKind, State, StatusUpdated
from tray_proxy.ui.bridge import UiBridge
from tray_proxy.ui.main_window import CREDENTIALS_PLACEHOLDER, CloseChoice, MainWindow

from .conftest import FakeServices, make_status


def _window(
    qtbot: QtBot,
    services: FakeServices,
    *,
    tray: bool = False,
    choice: CloseChoice = CloseChoice.CANCEL,
) -> tuple[MainWindow, UiBridge, list[int]]:
    bridge = UiBridge(interval_ms=10)
    asked: list[int] = []

    def ask(_parent: QWidget) -> CloseChoice:
        asked.append(1)
        return choice

    window = MainWindow(services, bridge, tray_available=tray, ask_close=ask)
    qtbot.addWidget(window)
    return window, bridge, asked


def test_shows_state_proxy_connections_and_errors(qtbot: QtBot, services: FakeServices) -> None:
    window, bridge, _ = _window(qtbot, services)
    bridge.post(StatusUpdated(make_status(State.DEGRADED, active_connections=42)))
    qtbot.waitUntil(lambda: window.state_label.text() == "Degraded", timeout=2000)
    assert window.connections_label.text() == "42"
    assert window.toggle_button.text() == "Switch off"
    assert window.upstream_combo.currentText() == "corp (12 ms)"
    assert window.upstream_combo.count() == 2
    assert "corp: connection refused" in window.errors.item(0).text()
    bridge.post(StatusUpdated(make_status(State.OFF, last_errors=())))
    qtbot.waitUntil(lambda: window.state_label.text() == "Off", timeout=2000)
    assert window.toggle_button.text() == "Switch on"
    assert window.errors.item(0).text() == "No errors."


def test_controls_call_the_services(qtbot: QtBot, services: FakeServices) -> None:
    window, _, _ = _window(qtbot, services)
    window.toggle_button.click()
    window.test_button.click()
    window.copy_button.click()
    window.upstream_combo.activated.emit(1)
    window.autostart_box.setChecked(True)
    window.quit_button.click()
    assert services.calls == [
        ("toggle", None),
        ("test_connection", None),
        ("diagnostics", None),
        ("select_upstream", "backup"),
        ("set_autostart", True),
        ("quit", None),
    ]
    assert window.autostart_box.isChecked()


def test_redrawing_the_combo_does_not_select_an_upstream(
    qtbot: QtBot, services: FakeServices
) -> None:
    window, _, _ = _window(qtbot, services)
    for _ in range(3):
        window.show_status(make_status(State.ON))
    assert services.calls == []


def test_credentials_opens_the_placeholder(
    qtbot: QtBot, services: FakeServices, monkeypatch: pytest.MonkeyPatch
) -> None:
    shown: list[str] = []
    monkeypatch.setattr(QMessageBox, "information", lambda _p, _t, text: shown.append(text))
    window, _, _ = _window(qtbot, services)
    window.credentials_button.click()
    assert shown == [CREDENTIALS_PLACEHOLDER]
    assert "later version" in shown[0]


@pytest.mark.parametrize(
    ("choice", "visible", "quit_called"),
    [
        (CloseChoice.QUIT, False, True),
        (CloseChoice.BACKGROUND, False, False),
        (CloseChoice.CANCEL, True, False),
    ],
)
def test_closing_without_a_tray_asks(
    qtbot: QtBot, services: FakeServices, choice: CloseChoice, visible: bool, quit_called: bool
) -> None:
    window, _, asked = _window(qtbot, services, choice=choice)
    window.show()
    qtbot.waitExposed(window)
    window.close()
    assert asked == [1]
    assert window.isVisible() is visible
    assert (("quit", None) in services.calls) is quit_called


def test_closing_with_a_tray_only_hides(qtbot: QtBot, services: FakeServices) -> None:
    window, _, asked = _window(qtbot, services, tray=True)
    window.show()
    qtbot.waitExposed(window)
    window.close()
    assert asked == [] and not window.isVisible() and services.calls == []
    window.show_and_raise()
    assert window.isVisible()


def test_notices_show_in_the_window_only_without_a_tray(
    qtbot: QtBot, services: FakeServices
) -> None:
    window, bridge, _ = _window(qtbot, services)
    window.show()
    bridge.post(Notice(NoticeKind.UPSTREAM_DOWN, "Proxy down", "corp is not answering"))
    qtbot.waitUntil(lambda: window.notice_label.isVisible(), timeout=2000)
    assert window.notice_label.text() == "Proxy down: corp is not answering"
