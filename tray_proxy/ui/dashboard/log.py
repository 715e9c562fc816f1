"""The Log tab: the connection history (SQLite) with a time range, failures-only, text
search and host / process / proxy filters, read a page at a time, and exported to CSV or
JSON.

The table reads lazily (models/log.py). An export writes the whole filtered history, which
may be large, so it runs in a QThreadPool worker and reports back with a queued signal;
the UI thread never writes the file.

Must not import keyring, socket or subprocess.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from PySide6.QtCore import QDateTime, QObject, QRunnable, Qt, QThreadPool, QTimer, Signal
from PySide6.QtGui import QShowEvent
from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QDateTimeEdit,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from tray_proxy.controller import Status
from tray_proxy.monitor.query import HistoryFilter
from tray_proxy.ui.dashboard.tables import details_pane, make_table, table_over_details
from tray_proxy.ui.models.columns import Column, details_text
from tray_proxy.ui.models.log import LogModel
from tray_proxy.ui.services import AppServices, HistoryReader

HISTORY_OFF = (
    "The connection history is switched off ([log] enabled = false in the settings file). "
    "Set enabled = true under [log] and restart tray-proxy to keep a log of connections."
)
ANY_PROXY = "Any proxy"

# (label, seconds back; None: everything; -1: the from-to fields)
RANGES: tuple[tuple[str, float | None], ...] = (
    ("Last hour", 3600.0),
    ("Last 24 hours", 86_400.0),
    ("Last 7 days", 7 * 86_400.0),
    ("All", None),
    ("From … to …", -1.0),
)
CUSTOM_RANGE = len(RANGES) - 1
REFRESH_AFTER = 5.0  # seconds: showing the tab again reads the newest rows after this
FORMATS = {"CSV (*.csv)": "csv", "JSON lines (*.json)": "json"}

# Asks where to export: returns (path, "csv" | "json") or None (cancelled).
ChooseExportPath = Callable[[QWidget], "tuple[Path, str] | None"]


def ask_export_path(parent: QWidget) -> tuple[Path, str] | None:
    default = Path.home() / f"tray-proxy-log-{time.strftime('%Y%m%d-%H%M')}.csv"
    name, chosen = QFileDialog.getSaveFileName(
        parent, "Export the connection log", str(default), ";;".join(FORMATS)
    )
    if not name:
        return None
    path = Path(name)
    suffix = path.suffix.lower().lstrip(".")
    fmt = suffix if suffix in ("csv", "json") else FORMATS.get(chosen, "csv")
    if suffix != fmt:
        path = path.with_name(path.name + "." + fmt)
    return path, fmt


class _ExportSignals(QObject):
    done = Signal(int, str)  # rows written, path
    failed = Signal(str)


class _ExportJob(QRunnable):
    def __init__(
        self, reader: HistoryReader, history_filter: HistoryFilter, path: Path, fmt: str
    ) -> None:
        super().__init__()
        self.signals = _ExportSignals()
        self._reader = reader
        self._filter = history_filter
        self._path = path
        self._fmt = fmt
        self.setAutoDelete(False)  # the tab holds it until its signal has arrived

    def run(self) -> None:
        try:
            count = self._reader.export(self._filter, self._path, self._fmt)
        except Exception as exc:  # shown to the user in words
            self.signals.failed.emit(str(exc) or f"Cannot export to {self._path} ({exc!r}).")
            return
        self.signals.done.emit(count, str(self._path))


class LogTab(QWidget):
    def __init__(
        self,
        services: AppServices,
        *,
        choose_export_path: ChooseExportPath = ask_export_path,
        clock: Callable[[], float] = time.time,
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self.setObjectName("log-tab")
        self._choose_export_path = choose_export_path
        self._clock = clock
        self._upstream_names: tuple[str, ...] = ()
        self._export_job: _ExportJob | None = None
        self._queried_at = float("-inf")
        self.reader = services.history()
        self.model: LogModel | None = None

        layout = QVBoxLayout(self)
        self.off_label = QLabel(HISTORY_OFF)
        self.off_label.setObjectName("history-off")
        self.off_label.setWordWrap(True)
        layout.addWidget(self.off_label)

        # -- filters -------------------------------------------------------------------------
        self.range_combo = QComboBox()
        self.range_combo.setObjectName("log-range")
        for label, _seconds in RANGES:
            self.range_combo.addItem(label)
        self.range_combo.setCurrentIndex(1)
        self.from_edit = QDateTimeEdit()
        self.from_edit.setObjectName("log-from")
        self.to_edit = QDateTimeEdit()
        self.to_edit.setObjectName("log-to")
        now = QDateTime.currentDateTime()
        self.from_edit.setDateTime(now.addDays(-1))
        self.to_edit.setDateTime(now.addSecs(60))
        for stamp_edit in (self.from_edit, self.to_edit):
            stamp_edit.setDisplayFormat("yyyy-MM-dd HH:mm")
            stamp_edit.setCalendarPopup(True)
            stamp_edit.hide()
        self.to_label = QLabel("to")
        self.to_label.hide()
        self.level_combo = QComboBox()
        self.level_combo.setObjectName("log-level")
        self.level_combo.addItems(["All connections", "Failures only"])
        self.search_edit = QLineEdit()
        self.search_edit.setObjectName("log-search")
        self.search_edit.setPlaceholderText("Search host, process, proxy, outcome")
        self.search_edit.setClearButtonEnabled(True)
        self.host_edit = QLineEdit()
        self.host_edit.setObjectName("log-host")
        self.host_edit.setPlaceholderText("Host: example.com, *.example.com, %corp%")
        self.host_edit.setClearButtonEnabled(True)
        self.process_edit = QLineEdit()
        self.process_edit.setObjectName("log-process")
        self.process_edit.setPlaceholderText("Process name (exact)")
        self.process_edit.setClearButtonEnabled(True)
        self.upstream_combo = QComboBox()
        self.upstream_combo.setObjectName("log-upstream")
        self.upstream_combo.addItem(ANY_PROXY, None)
        self.refresh_button = QPushButton("Refresh")
        self.refresh_button.setObjectName("log-refresh")
        self.refresh_button.setToolTip("Read the newest rows again")
        self.export_button = QPushButton("Export…")
        self.export_button.setObjectName("log-export")
        self.export_button.setToolTip("Write every row the filter matches to a CSV or JSON file")

        first = QHBoxLayout()
        first.addWidget(self.range_combo)
        first.addWidget(self.from_edit)
        first.addWidget(self.to_label)
        first.addWidget(self.to_edit)
        first.addWidget(self.level_combo)
        first.addWidget(self.upstream_combo)
        first.addStretch(1)
        first.addWidget(self.refresh_button)
        first.addWidget(self.export_button)
        second = QHBoxLayout()
        second.addWidget(self.search_edit, 2)
        second.addWidget(self.host_edit, 1)
        second.addWidget(self.process_edit, 1)
        self.controls = QWidget()
        filters = QVBoxLayout(self.controls)
        filters.setContentsMargins(0, 0, 0, 0)
        filters.addLayout(first)
        filters.addLayout(second)
        layout.addWidget(self.controls)

        self.status_label = QLabel()
        self.status_label.setObjectName("log-status")
        self.status_label.setWordWrap(True)
        self.status_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        layout.addWidget(self.status_label)

        if self.reader is not None:
            self.model = LogModel(self.reader, parent=self)
        # The date makes Time wide: IP starts hidden to leave Outcome room (it is in the
        # details, and the header's menu shows it); Route too (see Column).
        self.view = make_table(
            self.model, "log-table", hidden=(Column.IP, Column.ROUTE), time_width=140
        )
        self.view.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.details = details_pane("log-details", "Select a row to see everything about it.")
        splitter = table_over_details(self.view, self.details)
        layout.addWidget(splitter, 1)

        # Typing waits for a pause before asking the database again.
        self._debounce = QTimer(self)
        self._debounce.setSingleShot(True)
        self._debounce.setInterval(300)
        self._debounce.timeout.connect(self.apply_filter)
        for edit in (self.search_edit, self.host_edit, self.process_edit):
            edit.textChanged.connect(self._debounce.start)
            edit.returnPressed.connect(self.apply_filter)
        self.from_edit.dateTimeChanged.connect(self._debounce.start)
        self.to_edit.dateTimeChanged.connect(self._debounce.start)
        self.range_combo.currentIndexChanged.connect(self._range_changed)
        self.level_combo.currentIndexChanged.connect(self.apply_filter)
        self.upstream_combo.currentIndexChanged.connect(self.apply_filter)
        self.refresh_button.clicked.connect(self.apply_filter)
        self.export_button.clicked.connect(self.export)

        if self.model is None:  # no reader: the history is off
            self.controls.hide()
            self.view.hide()
            self.details.hide()
            return
        self.off_label.hide()
        self.model.failed.connect(self._show_error)
        self.view.selectionModel().currentRowChanged.connect(self._row_chosen)
        self.apply_filter()

    # -- the filter ---------------------------------------------------------------------------

    def build_filter(self) -> HistoryFilter:
        since: float | None = None
        until: float | None = None
        index = self.range_combo.currentIndex()
        if index == CUSTOM_RANGE:
            since = float(self.from_edit.dateTime().toSecsSinceEpoch())
            until = float(self.to_edit.dateTime().toSecsSinceEpoch())
        else:
            back = RANGES[index][1]
            if back is not None:
                since = self._clock() - back
        upstream = self.upstream_combo.currentData()
        return HistoryFilter(
            since=since,
            until=until,
            text=self.search_edit.text().strip() or None,
            host=self.host_edit.text().strip() or None,
            process=self.process_edit.text().strip() or None,
            upstream=upstream if isinstance(upstream, str) else None,
            failed_only=self.level_combo.currentIndex() == 1,
        )

    def showEvent(self, event: QShowEvent) -> None:  # noqa: N802 - Qt's name
        # Coming back to the tab: the newest rows again (and "last hour" from now), unless
        # it was just read.
        if self.model is not None and time.monotonic() - self._queried_at > REFRESH_AFTER:
            self.apply_filter()
        super().showEvent(event)

    def apply_filter(self) -> None:
        self._debounce.stop()
        if self.model is None:
            return
        self._queried_at = time.monotonic()
        self.status_label.clear()
        self.details.clear()
        started = time.monotonic()
        self.model.set_filter(self.build_filter())
        took = time.monotonic() - started
        if not self.status_label.text():
            n = self.model.rowCount()
            more = (
                ", scroll for older ones" if self.model.canFetchMore(self.view.rootIndex()) else ""
            )
            found = "No connections match." if n == 0 else f"Newest {n} shown{more}."
            self.status_label.setText(f"{found} ({took * 1000:.0f} ms)")

    def _range_changed(self, index: int) -> None:
        custom = index == CUSTOM_RANGE
        for widget in (self.from_edit, self.to_label, self.to_edit):
            widget.setVisible(custom)
        self.apply_filter()

    def show_status(self, status: Status) -> None:
        names = tuple(u.name for u in status.upstreams)
        if names == self._upstream_names:
            return
        self._upstream_names = names
        combo = self.upstream_combo
        current = combo.currentData()
        combo.blockSignals(True)
        combo.clear()
        combo.addItem(ANY_PROXY, None)
        for name in names:
            combo.addItem(name, name)
        combo.setCurrentIndex(max(0, combo.findData(current)) if current is not None else 0)
        combo.blockSignals(False)

    def log_status_text(self) -> str:
        """What the line above the table says (counts, errors, export results)."""
        return self.status_label.text()

    def _row_chosen(self) -> None:
        index = self.view.selectionModel().currentIndex()
        if self.model is None or not index.isValid():
            self.details.clear()
            return
        self.details.setPlainText(details_text(self.model.entry_at(index.row()).row))

    def _show_error(self, text: str) -> None:
        self.status_label.setText(text)

    # -- export -------------------------------------------------------------------------------

    @property
    def exporting(self) -> bool:
        return self._export_job is not None

    def export(self) -> None:
        if self.reader is None or self._export_job is not None:
            return
        chosen = self._choose_export_path(self)
        if chosen is None:
            return
        path, fmt = chosen
        job = _ExportJob(self.reader, self.build_filter(), path, fmt)
        job.signals.done.connect(self._exported)
        job.signals.failed.connect(self._export_failed)
        self._export_job = job
        self.export_button.setEnabled(False)
        self.status_label.setText(f"Exporting to {path}…")
        QThreadPool.globalInstance().start(job)

    def _exported(self, count: int, path: str) -> None:
        self._export_finished()
        self.status_label.setText(
            f"Exported {count:,} connection{'s' if count != 1 else ''} to {path}."
        )

    def _export_failed(self, text: str) -> None:
        self._export_finished()
        self.status_label.setText(text)

    def _export_finished(self) -> None:
        self._export_job = None
        self.export_button.setEnabled(True)
