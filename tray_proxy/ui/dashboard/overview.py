"""The Overview tab: state and on/off, the proxy in use, open connections, traffic now with
a graph of the last minutes, the errors of the last hour in words, and the everyday actions
(Test connection, Copy diagnostics, Credentials…).

Must not import keyring, socket or subprocess.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from PySide6.QtCore import Qt
from PySide6.QtGui import QColor
from PySide6.QtWidgets import (
    QComboBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from tray_proxy.controller import State, Status
from tray_proxy.ui.format import fmt_rate
from tray_proxy.ui.icons import state_icon
from tray_proxy.ui.menu import toggle_text, upstream_text
from tray_proxy.ui.services import AppServices
from tray_proxy.ui.sparkline import LineChart, Series

UP_COLOR = QColor(32, 110, 200)
DOWN_COLOR = QColor(40, 150, 70)


class OverviewTab(QWidget):
    def __init__(
        self,
        services: AppServices,
        *,
        copy_diagnostics: Callable[[], None],
        open_credentials: Callable[[], None],
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self._services = services
        self.setObjectName("overview-tab")

        self.state_icon = QLabel()
        self.state_label = QLabel()
        self.state_label.setObjectName("state")
        font = self.state_label.font()
        font.setPointSizeF(font.pointSizeF() * 1.4)
        font.setBold(True)
        self.state_label.setFont(font)
        self.message_label = QLabel()
        self.message_label.setObjectName("message")
        self.message_label.setWordWrap(True)
        self.message_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.toggle_button = QPushButton()
        self.toggle_button.setObjectName("toggle")
        self.toggle_button.setMinimumWidth(140)
        self.toggle_button.clicked.connect(self._toggle)

        head_text = QVBoxLayout()
        head_text.addWidget(self.state_label)
        head_text.addWidget(self.message_label)
        head = QHBoxLayout()
        head.addWidget(self.state_icon, 0, Qt.AlignmentFlag.AlignTop)
        head.addLayout(head_text, 1)
        head.addWidget(self.toggle_button, 0, Qt.AlignmentFlag.AlignTop)

        self.upstream_combo = QComboBox()
        self.upstream_combo.setObjectName("upstream")
        self.upstream_combo.setMinimumWidth(220)
        self.upstream_combo.activated.connect(self._upstream_chosen)
        self.address_label = QLabel()
        self.address_label.setObjectName("address")
        self.address_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.connections_label = QLabel("0")
        self.connections_label.setObjectName("connections")
        self.total_label = QLabel("0")
        self.total_label.setObjectName("total-connections")
        self.rate_label = QLabel("-")
        self.rate_label.setObjectName("rate")
        self.new_rate_label = QLabel("-")
        self.new_rate_label.setObjectName("new-connections-rate")
        form = QFormLayout()
        form.addRow("Proxy:", self.upstream_combo)
        form.addRow("Proxy address:", self.address_label)
        form.addRow("Open connections:", self.connections_label)
        form.addRow("Connections since start:", self.total_label)
        form.addRow("Traffic now:", self.rate_label)
        form.addRow("New connections:", self.new_rate_label)

        self.traffic_chart = LineChart()
        self.traffic_chart.setObjectName("traffic-chart")
        self.traffic_chart.setMinimumHeight(110)
        chart_box = QGroupBox("Traffic, last 5 minutes")
        chart_layout = QVBoxLayout(chart_box)
        chart_layout.addWidget(self.traffic_chart)

        middle = QHBoxLayout()
        middle.addLayout(form, 0)
        middle.addWidget(chart_box, 1)

        self.errors = QListWidget()
        self.errors.setObjectName("errors")
        self.errors.setWordWrap(True)
        self.errors.setMinimumHeight(70)
        self.errors.setAlternatingRowColors(True)
        self._error_lines: list[str] = []
        errors_box = QGroupBox("Errors in the last hour")
        errors_layout = QVBoxLayout(errors_box)
        errors_layout.addWidget(self.errors)

        self.test_button = QPushButton("Test connection")
        self.test_button.setObjectName("test-connection")
        self.test_button.clicked.connect(services.test_connection)
        self.copy_button = QPushButton("Copy diagnostics")
        self.copy_button.setObjectName("copy-diagnostics")
        self.copy_button.clicked.connect(copy_diagnostics)
        self.credentials_button = QPushButton("Credentials…")
        self.credentials_button.setObjectName("credentials")
        self.credentials_button.clicked.connect(open_credentials)
        actions = QHBoxLayout()
        actions.addWidget(self.test_button)
        actions.addWidget(self.copy_button)
        actions.addWidget(self.credentials_button)
        actions.addStretch(1)

        layout = QVBoxLayout(self)
        layout.addLayout(head)
        layout.addLayout(middle)
        layout.addWidget(errors_box, 1)
        layout.addLayout(actions)

    def show_status(self, status: Status) -> None:
        self.state_icon.setPixmap(state_icon(status.state).pixmap(48, 48))
        self.state_label.setText(status.state.label)
        message = status.message
        if status.routing:
            # Off the corporate network: the message was about the proxy (issue 15 section 5).
            message = f"{message}\nNow {status.routing}: new connections go direct."
        self.message_label.setText(message)
        self.toggle_button.setText(toggle_text(status.state))
        self.toggle_button.setEnabled(status.state is not State.DISABLING)
        self.connections_label.setText(str(status.active_connections))
        self.total_label.setText(str(status.total_connections))
        self._show_upstreams(status)
        self._show_traffic(status)
        self._show_errors(status)

    def _show_upstreams(self, status: Status) -> None:
        combo = self.upstream_combo
        combo.blockSignals(True)
        combo.clear()
        for u in status.upstreams:
            combo.addItem(upstream_text(u), u.name)
            combo.setItemData(combo.count() - 1, u.url, Qt.ItemDataRole.ToolTipRole)
            if u.active:
                combo.setCurrentIndex(combo.count() - 1)
        active = next((u for u in status.upstreams if u.active), None)
        self.address_label.setText(active.url if active is not None else "-")
        if not status.upstreams:
            combo.addItem("No proxy set up (see docs/config.md)")
        combo.setEnabled(bool(status.upstreams) and status.state is not State.DISABLING)
        combo.blockSignals(False)

    def _show_traffic(self, status: Status) -> None:
        traffic = status.health.traffic
        now = status.health.rate_now
        if now is None:
            self.rate_label.setText("-")
            self.new_rate_label.setText("-")
        else:
            self.rate_label.setText(f"↑ {fmt_rate(now.up)}   ↓ {fmt_rate(now.down)}")
            self.new_rate_label.setText(f"{now.new_connections:.0f}/s")
        self.traffic_chart.set_series(
            [
                Series("sent", UP_COLOR, [(p.at, p.up) for p in traffic]),
                Series("received", DOWN_COLOR, [(p.at, p.down) for p in traffic]),
            ],
            fmt_rate,
        )

    def _show_errors(self, status: Status) -> None:
        # The health snapshot's failures (in words, last hour); before the first snapshot
        # (or from a controller without one) the older list of errors.
        entries: list[tuple[float, str]] = [(f.at, f.display) for f in status.health.failures]
        if not entries:
            entries = [(e.at, e.display) for e in status.last_errors]
        lines = [
            f"{time.strftime('%H:%M:%S', time.localtime(at))}  {text}"
            for at, text in reversed(entries)
        ] or ["No errors."]
        if lines == self._error_lines:
            return  # unchanged: keep the user's selection and scroll position
        self._error_lines = lines
        self.errors.clear()
        self.errors.addItems(lines)

    def _toggle(self) -> None:
        self._services.toggle()

    def _upstream_chosen(self, index: int) -> None:
        name = self.upstream_combo.itemData(index)
        if isinstance(name, str):
            self._services.select_upstream(name)
