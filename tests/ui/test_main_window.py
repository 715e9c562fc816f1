"""The main window (also the no-tray fallback): what it shows, what its controls call, closing."""

from __future__ import annotations

import pytest
from PySide6.QtWidgets import QTabWidget, QWidget
from pytestqt.qtbot import QtBot

from tray_proxy.controller import Notice, NoticeKind, State, StatusUpdated
from tray_proxy.monitor.health import (
    FailureEntry,
    HealthSnapshot,
    LatencyPoint,
    ProbeRecord,
    TrafficPoint,
    UpstreamHealth,
    UpstreamState,
)
from tray_proxy.ui.bridge import UiBridge
from tray_proxy.ui.dashboard.log import HISTORY_OFF
from tray_proxy.ui.main_window import CloseChoice, MainWindow

from .conftest import FakeServices, make_status
from .fakes import fake_credentials


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

    window = MainWindow(
        services, bridge, tray_available=tray, ask_close=ask, credentials=fake_credentials()
    )
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


def _health() -> HealthSnapshot:
    t = 1_700_000_000.0
    return HealthSnapshot(
        upstreams=(
            UpstreamHealth(
                "corp",
                state=UpstreamState.AUTH_FAILED,
                last_failure=t + 50,
                last_failure_words="proxy.corp:8080 refused the password for alice (407).",
                last_probe=ProbeRecord("corp", t + 40, True, 0.02, "tunnel opened in 20 ms"),
                p50_1m=0.012,
                p95_1m=0.030,
                p50_1h=0.011,
                p95_1h=0.045,
                successes=120,
                failures={"upstream-auth-failed": 3, "upstream-timeout": 1},
                series=tuple(LatencyPoint(t + i * 60, 0.01 + i / 1000, 0.03, 5) for i in range(10)),
            ),
        ),
        traffic=tuple(TrafficPoint(t + i, 1500.0 * i, 2_000_000.0, 12.0) for i in range(60)),
        failures=(
            FailureEntry(t + 10, "No answer from proxy.corp:8080 within 10 s.", 2),
            FailureEntry(t + 50, "proxy.corp:8080 refused the password for alice (407).", 1),
        ),
    )


def test_the_dashboard_has_its_four_tabs(qtbot: QtBot, services: FakeServices) -> None:
    window, _, _ = _window(qtbot, services)
    tabs = window.findChild(QTabWidget, "tabs")
    assert tabs is not None
    assert [tabs.tabText(i) for i in range(tabs.count())] == [
        "Overview",
        "Connections",
        "Upstreams",
        "Log",
    ]
    for name in ("toggle", "state", "upstream", "connections", "errors", "quit", "autostart"):
        assert window.findChild(QWidget, name) is not None, name


def test_overview_shows_traffic_and_the_failures_in_words(
    qtbot: QtBot, services: FakeServices
) -> None:
    window, bridge, _ = _window(qtbot, services)
    bridge.post(StatusUpdated(make_status(health=_health())))
    qtbot.waitUntil(lambda: "2.0 MB/s" in window.overview.rate_label.text(), timeout=2000)
    assert window.overview.rate_label.text() == "↑ 88.5 KB/s   ↓ 2.0 MB/s"
    assert window.overview.new_rate_label.text() == "12/s"
    assert len(window.overview.traffic_chart.series[0].points) == 60
    texts = [window.errors.item(i).text() for i in range(window.errors.count())]
    assert texts[0].endswith("proxy.corp:8080 refused the password for alice (407).")  # newest
    assert texts[1].endswith("No answer from proxy.corp:8080 within 10 s. (2 times)")


def test_upstreams_tab_shows_health_and_tests_now(qtbot: QtBot, services: FakeServices) -> None:
    window, _, _ = _window(qtbot, services)
    window.show_status(make_status(health=_health()))
    cards = window.upstreams.cards
    assert list(cards) == ["corp", "backup"]  # every configured proxy, health or not
    corp = cards["corp"]
    assert corp.title() == "corp (in use): http://proxy.corp.example:8080"
    assert "password refused" in corp.state_label.text()
    assert corp.minute_label.text() == "p50 12 ms, p95 30 ms"
    assert corp.hour_label.text() == "p50 11 ms, p95 45 ms"
    assert corp.successes_label.text() == "120"
    assert corp.failures_label.text() == "upstream-auth-failed 3, upstream-timeout 1"
    assert "tunnel opened in 20 ms" in corp.probe_label.text()
    assert "refused the password" in corp.last_failure_label.text()
    assert len(corp.chart.series[0].points) == 10
    assert cards["backup"].minute_label.text() == "no handshakes"
    assert cards["backup"].probe_label.text() == "never (use Test now)"
    cards["backup"].test_button.click()
    assert services.calls == [("test_upstream", "backup")]
    # Updates keep the cards (no rebuild at every status).
    window.show_status(make_status(health=_health()))
    assert window.upstreams.cards["corp"] is corp


def test_the_log_tab_says_the_history_is_off(qtbot: QtBot, services: FakeServices) -> None:
    window, _, _ = _window(qtbot, services)
    assert window.log.off_label.text() == HISTORY_OFF


def test_an_upstream_the_relay_skips_is_not_answering_on_its_card(
    qtbot: QtBot, services: FakeServices
) -> None:
    """The relay's health (probes, failover) says backup is down: its card says so, though
    the dashboard's own statistics have nothing on it yet (issue 15 section 2)."""
    window, _, _ = _window(qtbot, services)
    window.show_status(make_status(health=_health()))  # backup: failing=True in make_status
    assert "not answering" in window.upstreams.cards["backup"].state_label.text()
    assert "password refused" in window.upstreams.cards["corp"].state_label.text()


def test_the_overview_says_direct_while_no_proxy_is_reachable(
    qtbot: QtBot, services: FakeServices
) -> None:
    window, _, _ = _window(qtbot, services)
    window.show_status(make_status(routing="direct: proxy unreachable"))
    assert window.overview.message_label.text().endswith(
        "\nNow direct: proxy unreachable: new connections go direct."
    )
    window.show_status(make_status())
    assert "direct" not in window.overview.message_label.text()
