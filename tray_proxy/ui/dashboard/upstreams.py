"""The Upstreams tab: one card per configured proxy with its state, last probe, handshake
latency (p50/p95 over the last minute and hour, and a chart over time), tunnels opened,
failures by class, and "Test now".

Cards are built when the set of proxies changes and updated in place otherwise, so the
10-per-second status updates repaint numbers, not widgets.

Must not import keyring, socket or subprocess.
"""

from __future__ import annotations

import time

from PySide6.QtCore import Qt
from PySide6.QtGui import QColor
from PySide6.QtWidgets import (
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QScrollArea,
    QVBoxLayout,
    QWidget,
)

from tray_proxy.controller import Status, UpstreamInfo
from tray_proxy.monitor.health import ProbeRecord, UpstreamHealth, UpstreamState
from tray_proxy.ui.format import fmt_latency
from tray_proxy.ui.services import AppServices
from tray_proxy.ui.sparkline import LineChart, Series

P50_COLOR = QColor(32, 110, 200)
P95_COLOR = QColor(220, 120, 20)
NO_UPSTREAMS = "No proxy set up yet. See docs/config.md to add one."

STATE_WORDS = {
    UpstreamState.UNKNOWN: ("not used yet", "#666666"),
    UpstreamState.UP: ("working", "#1e7d32"),
    UpstreamState.DOWN: ("not answering", "#b01e1e"),
    UpstreamState.AUTH_FAILED: ("password refused", "#b01e1e"),
}


def _seconds_ms(seconds: float) -> str:
    return fmt_latency(seconds)


def probe_text(probe: ProbeRecord | None) -> str:
    if probe is None:
        return "never (use Test now)"
    stamp = time.strftime("%H:%M:%S", time.localtime(probe.at))
    result = "ok" if probe.ok else "failed"
    return f"{stamp}: {result}, {probe.words}" if probe.words else f"{stamp}: {result}"


def latency_text(p50: float | None, p95: float | None) -> str:
    if p50 is None and p95 is None:
        return "no handshakes"
    return f"p50 {fmt_latency(p50)}, p95 {fmt_latency(p95)}"


def failures_text(health: UpstreamHealth) -> str:
    if not health.failures:
        return "none"
    parts = sorted(health.failures.items(), key=lambda item: (-item[1], item[0]))
    return ", ".join(f"{reason} {count}" for reason, count in parts)


class UpstreamCard(QGroupBox):
    def __init__(self, name: str, services: AppServices, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.name = name
        self.setObjectName(f"upstream-card-{name}")
        self.state_label = QLabel()
        self.state_label.setObjectName("upstream-state")
        self.probe_label = QLabel()
        self.probe_label.setObjectName("upstream-probe")
        self.probe_label.setWordWrap(True)
        self.minute_label = QLabel()
        self.minute_label.setObjectName("upstream-latency-1m")
        self.hour_label = QLabel()
        self.hour_label.setObjectName("upstream-latency-1h")
        self.successes_label = QLabel()
        self.successes_label.setObjectName("upstream-successes")
        self.failures_label = QLabel()
        self.failures_label.setObjectName("upstream-failures")
        self.failures_label.setWordWrap(True)
        self.last_failure_label = QLabel()
        self.last_failure_label.setObjectName("upstream-last-failure")
        self.last_failure_label.setWordWrap(True)
        self.last_failure_label.setTextInteractionFlags(
            Qt.TextInteractionFlag.TextSelectableByMouse
        )
        self.test_button = QPushButton("Test now")
        self.test_button.setObjectName("test-now")
        self.test_button.setToolTip(f"Open a test tunnel through {name} now")
        self.test_button.clicked.connect(lambda: services.test_upstream(name))

        form = QFormLayout()
        form.addRow("State:", self.state_label)
        form.addRow("Last probe:", self.probe_label)
        form.addRow("Latency, 1 min:", self.minute_label)
        form.addRow("Latency, 1 hour:", self.hour_label)
        form.addRow("Tunnels opened:", self.successes_label)
        form.addRow("Failures:", self.failures_label)
        form.addRow("Last failure:", self.last_failure_label)
        left = QVBoxLayout()
        left.addLayout(form)
        left.addWidget(self.test_button, 0, Qt.AlignmentFlag.AlignLeft)
        left.addStretch(1)

        self.chart = LineChart()
        self.chart.setObjectName("latency-chart")
        self.chart.setMinimumHeight(120)
        layout = QHBoxLayout(self)
        layout.addLayout(left, 1)
        layout.addWidget(self.chart, 1)

    def show_health(self, info: UpstreamInfo | None, health: UpstreamHealth) -> None:
        title = self.name
        if info is not None:
            title = f"{self.name}{' (in use)' if info.active else ''}: {info.url}"
        self.setTitle(title)
        state = health.state
        if info is not None and info.failing and state is not UpstreamState.AUTH_FAILED:
            # The relay's health skips it (failures or probes; issue 15 section 2), even
            # when the last tunnel through it worked.
            state = UpstreamState.DOWN
        words, color = STATE_WORDS[state]
        self.state_label.setText(f'<b style="color:{color}">{words}</b>')
        self.probe_label.setText(probe_text(health.last_probe))
        self.minute_label.setText(latency_text(health.p50_1m, health.p95_1m))
        self.hour_label.setText(latency_text(health.p50_1h, health.p95_1h))
        self.successes_label.setText(str(health.successes))
        self.failures_label.setText(failures_text(health))
        if health.last_failure is None:
            self.last_failure_label.setText("-")
        else:
            stamp = time.strftime("%H:%M:%S", time.localtime(health.last_failure))
            self.last_failure_label.setText(f"{stamp}: {health.last_failure_words or '-'}")
        self.chart.set_series(
            [
                Series("p50", P50_COLOR, [(p.at, p.p50) for p in health.series]),
                Series("p95", P95_COLOR, [(p.at, p.p95) for p in health.series]),
            ],
            _seconds_ms,
        )


class UpstreamsTab(QWidget):
    def __init__(self, services: AppServices, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._services = services
        self.setObjectName("upstreams-tab")
        self.cards: dict[str, UpstreamCard] = {}
        self.empty_label = QLabel(NO_UPSTREAMS)
        self.empty_label.setObjectName("no-upstreams")
        self._body = QWidget()
        self._body_layout = QVBoxLayout(self._body)
        self._body_layout.addWidget(self.empty_label)
        self._body_layout.addStretch(1)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(self._body)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(scroll)

    def show_status(self, status: Status) -> None:
        infos = {u.name: u for u in status.upstreams}
        healths = {h.name: h for h in status.health.upstreams}
        names = list(infos) + [n for n in healths if n not in infos]
        if names != list(self.cards):
            self._rebuild(names)
        for name, card in self.cards.items():
            card.show_health(infos.get(name), healths.get(name, UpstreamHealth(name)))

    def _rebuild(self, names: list[str]) -> None:
        for card in self.cards.values():
            self._body_layout.removeWidget(card)
            card.deleteLater()
        self.cards = {}
        for i, name in enumerate(names):
            card = UpstreamCard(name, self._services)
            self._body_layout.insertWidget(1 + i, card)
            self.cards[name] = card
        self.empty_label.setVisible(not names)
