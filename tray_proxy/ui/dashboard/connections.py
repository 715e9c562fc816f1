"""The Connections tab: the live tables (Active and Closed), their filters, the details of
the selected connection, and closing connections by hand.

Rows arrive from the bridge's `connectionsChanged`, one merged RowChanges per flush, and go
into two `ConnectionTableModel`s: a row that closes leaves Active and joins Closed (capped;
the full history stays in SQLite, see the Log tab). Both tables sit behind their own
`ConnectionFilter`; the filter controls drive both. Under load the batches are applied
less often and in steps that yield to the UI loop (see pace.py).

Must not import keyring, socket or subprocess.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Sequence

from PySide6.QtCore import QItemSelection, QModelIndex, Qt, QTimer
from PySide6.QtGui import QGuiApplication, QShowEvent
from PySide6.QtWidgets import (
    QAbstractItemView,
    QButtonGroup,
    QCheckBox,
    QComboBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QStackedWidget,
    QTableView,
    QVBoxLayout,
    QWidget,
)

from tray_proxy.controller import Status
from tray_proxy.monitor.rows import ConnectionRow, RowChanges, RowState
from tray_proxy.ui.bridge import RowMerger
from tray_proxy.ui.dashboard.pace import FlushPace, chunks
from tray_proxy.ui.dashboard.tables import details_pane, make_table, table_over_details
from tray_proxy.ui.models.columns import HEADERS, Column, details_text, row_text
from tray_proxy.ui.models.connections import (
    DEFAULT_CLOSED_CAP,
    ConnectionFilter,
    ConnectionTableModel,
)
from tray_proxy.ui.services import AppServices

ANY_STATE = "Any state"
ANY_PROXY = "Any proxy"
NO_SELECTION = "Select a connection to see everything about it."


def _live_table(
    proxy: ConnectionFilter,
    name: str,
    hidden: tuple[Column, ...],
    stretch: Column,
    on_paint: Callable[[float], None],
) -> QTableView:
    view = make_table(proxy, name, hidden=hidden, stretch=stretch, on_paint=on_paint)
    view.setSortingEnabled(True)
    view.sortByColumn(Column.TIME, Qt.SortOrder.DescendingOrder)  # newest first
    view.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
    return view


class ConnectionsTab(QWidget):
    def __init__(
        self,
        services: AppServices,
        *,
        closed_cap: int = DEFAULT_CLOSED_CAP,
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self._services = services
        self.setObjectName("connections-tab")
        self.active = ConnectionTableModel(parent=self)
        self.closed = ConnectionTableModel(cap=closed_cap, parent=self)
        self.active_proxy = ConnectionFilter(self.active, self)
        self.closed_proxy = ConnectionFilter(self.closed, self)
        self._detail_id: int | None = None
        self._closed_cap = closed_cap
        self._pending = RowMerger()  # batches that arrived while the tab was hidden
        self._pending_gone: set[int] = set()  # open rows whose closed row was dropped
        self._upstream_names: tuple[str, ...] = ()
        # Applying under load: spaced by what applications cost, in steps of few rows.
        self.pace = FlushPace()
        self._steps: collections.deque[RowChanges] = collections.deque()
        self._series_began = 0.0
        self._series_cost = 0.0
        self._frozen: list[QTableView] = []  # views not repainted until the last step
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.timeout.connect(self._on_timer)

        # -- which table, and the filters ---------------------------------------------------
        self.show_active = QPushButton("Active")
        self.show_active.setObjectName("view-active")
        self.show_closed = QPushButton("Closed")
        self.show_closed.setObjectName("view-closed")
        self._views = QButtonGroup(self)
        for i, button in enumerate((self.show_active, self.show_closed)):
            button.setCheckable(True)
            self._views.addButton(button, i)
        self.show_active.setChecked(True)
        self._views.idClicked.connect(self._show_view)

        self.filter_edit = QLineEdit()
        self.filter_edit.setObjectName("connections-filter")
        self.filter_edit.setPlaceholderText("Filter: host, IP, process, proxy, outcome")
        self.filter_edit.setClearButtonEnabled(True)
        self.filter_edit.textChanged.connect(self._text_changed)
        self.regex_box = QCheckBox("Regex")
        self.regex_box.setObjectName("filter-regex")
        self.regex_box.toggled.connect(self._text_changed)
        self.state_combo = QComboBox()
        self.state_combo.setObjectName("filter-state")
        self.state_combo.addItem(ANY_STATE, None)
        for state in RowState:
            self.state_combo.addItem(state.value, state)
        self.state_combo.currentIndexChanged.connect(self._state_changed)
        self.upstream_combo = QComboBox()
        self.upstream_combo.setObjectName("filter-upstream")
        self.upstream_combo.addItem(ANY_PROXY, None)
        self.upstream_combo.currentIndexChanged.connect(self._upstream_changed)
        self.process_edit = QLineEdit()
        self.process_edit.setObjectName("filter-process")
        self.process_edit.setPlaceholderText("Process")
        self.process_edit.setClearButtonEnabled(True)
        self.process_edit.setMaximumWidth(140)
        self.process_edit.textChanged.connect(self._process_changed)
        self.failed_box = QCheckBox("Failures only")
        self.failed_box.setObjectName("filter-failed")
        self.failed_box.toggled.connect(self._failed_changed)

        filters = QHBoxLayout()
        filters.addWidget(self.show_active)
        filters.addWidget(self.show_closed)
        filters.addSpacing(8)
        filters.addWidget(self.filter_edit, 1)
        filters.addWidget(self.regex_box)
        filters.addWidget(self.state_combo)
        filters.addWidget(self.upstream_combo)
        filters.addWidget(self.process_edit)
        filters.addWidget(self.failed_box)

        self.filter_error = QLabel()
        self.filter_error.setObjectName("filter-error")
        self.filter_error.setStyleSheet("color: #b01e1e")
        self.filter_error.hide()

        # -- the tables and the details ----------------------------------------------------
        # Open connections have no duration or outcome yet: those columns start hidden
        # there (the header's menu shows them). Route starts hidden in both (see Column).
        self.active_view = _live_table(
            self.active_proxy,
            "active-table",
            (Column.DURATION, Column.OUTCOME, Column.ROUTE),
            Column.DESTINATION,
            self._painted,
        )
        self.closed_view = _live_table(
            self.closed_proxy, "closed-table", (Column.ROUTE,), Column.OUTCOME, self._painted
        )
        self.stack = QStackedWidget()
        self.stack.addWidget(self.active_view)
        self.stack.addWidget(self.closed_view)
        for view in (self.active_view, self.closed_view):
            view.selectionModel().selectionChanged.connect(self._selection_changed)

        self.details = details_pane("connection-details", NO_SELECTION)
        splitter = table_over_details(self.stack, self.details)

        # -- actions -------------------------------------------------------------------------
        self.close_selected_button = QPushButton("Close selected")
        self.close_selected_button.setObjectName("close-selected")
        self.close_selected_button.setToolTip("End the selected open connections now")
        self.close_selected_button.clicked.connect(self.close_selected)
        self.close_filtered_button = QPushButton("Close all filtered")
        self.close_filtered_button.setObjectName("close-filtered")
        self.close_filtered_button.setToolTip("End every open connection the filter shows")
        self.close_filtered_button.clicked.connect(self.close_filtered)
        self.copy_button = QPushButton("Copy rows")
        self.copy_button.setObjectName("copy-rows")
        self.copy_button.setToolTip("Copy the selected rows as text (tab-separated)")
        self.copy_button.clicked.connect(self.copy_rows)
        self.copy_details_button = QPushButton("Copy details")
        self.copy_details_button.setObjectName("copy-details")
        self.copy_details_button.clicked.connect(self.copy_details)
        self.count_label = QLabel()
        self.count_label.setObjectName("connections-count")
        actions = QHBoxLayout()
        actions.addWidget(self.close_selected_button)
        actions.addWidget(self.close_filtered_button)
        actions.addSpacing(12)
        actions.addWidget(self.copy_button)
        actions.addWidget(self.copy_details_button)
        actions.addStretch(1)
        actions.addWidget(self.count_label)

        layout = QVBoxLayout(self)
        layout.addLayout(filters)
        layout.addWidget(self.filter_error)
        layout.addWidget(splitter, 1)
        layout.addLayout(actions)

        # Counts and buttons follow once per batch (apply) and per filter change, not per
        # row signal: a batch may remove rows in many runs.
        self.active.upsert(list(services.open_rows()))
        self._update_controls()

    # -- what is shown ----------------------------------------------------------------------

    @property
    def showing_active(self) -> bool:
        return self.stack.currentIndex() == 0

    @property
    def current_view(self) -> QTableView:
        return self.active_view if self.showing_active else self.closed_view

    @property
    def current_proxy(self) -> ConnectionFilter:
        return self.active_proxy if self.showing_active else self.closed_proxy

    def apply(self, changes: RowChanges) -> None:
        """One merged batch from the bridge. While the tab is not on screen (another tab,
        or the window hidden in the tray) batches are only merged, and applied (in steps)
        when it shows: hidden tables cost the UI thread, and so the relay's thread that
        shares the GIL with it, nothing per connection."""
        self._pending.add(changes)
        if not self.isVisible():
            for conn_id in self._pending.keep_closed(self._closed_cap):
                if conn_id in self.active:  # closed, but too old to show in Closed
                    self._pending_gone.add(conn_id)
            return
        if self._steps or self._timer.isActive():
            return  # an application is under way or due: it takes these rows too
        wait = self.pace.wait(time.monotonic())
        if wait > 0:
            self._timer.start(max(1, round(wait * 1000)))
        else:
            self._start_application()

    @property
    def applying(self) -> bool:
        """An application is under way in steps (the loop runs between them)."""
        return bool(self._steps)

    def flush_pending(self) -> None:
        """Apply everything received so far, now and in one go."""
        self._timer.stop()
        while self._steps:
            self._apply_rows(self._steps.popleft())
        self._end_series()
        if self._pending_gone:
            gone, self._pending_gone = self._pending_gone, set()
            self.active.remove(gone)
        if self._pending:
            pending, self._pending = self._pending, RowMerger()
            self._apply_rows(pending.merged())
        self._after_rows()

    def _start_application(self) -> None:
        """Take what is pending and apply it: the first step now, the others each in its
        own pass of the UI loop, with the tables repainted once, after the last step."""
        if self._pending_gone:
            gone, self._pending_gone = self._pending_gone, set()
            self.active.remove(gone)
            if not self._pending:
                self._after_rows()
        if not self._pending:
            return
        pending, self._pending = self._pending, RowMerger()
        self._steps.extend(chunks(pending.merged()))
        self._series_began = time.monotonic()
        self._series_cost = 0.0
        if len(self._steps) > 1:
            self._frozen = [v for v in (self.active_view, self.closed_view) if v.updatesEnabled()]
            for view in self._frozen:
                view.setUpdatesEnabled(False)
        self._next_step()

    def _on_timer(self) -> None:
        if self._steps:
            self._next_step()
        else:
            self._start_application()

    def _next_step(self) -> None:
        began = time.perf_counter()
        self._apply_rows(self._steps.popleft())
        self._series_cost += time.perf_counter() - began
        if self._steps:
            self._timer.start(0)  # let the loop run (timers, input, the control socket)
            return
        self.pace.applied(self._series_began, self._series_cost)
        self._end_series()
        self._after_rows()
        if self._pending:  # rows that came during the steps: at the pace's next turn
            self._timer.start(max(1, round(self.pace.wait(time.monotonic()) * 1000)))

    def _painted(self, cost: float) -> None:
        self.pace.painted(cost)

    def _end_series(self) -> None:
        frozen, self._frozen = self._frozen, []
        for view in frozen:
            view.setUpdatesEnabled(True)

    def showEvent(self, event: QShowEvent) -> None:  # noqa: N802 - Qt's name
        # What came while hidden (up to a full Closed table): in steps too, so that showing
        # the window does not hold the UI loop for the whole of it.
        if not self._steps and not self._timer.isActive():
            self._start_application()
        super().showEvent(event)

    def _apply_rows(self, changes: RowChanges) -> None:
        if changes.closed:
            self.active.remove(row.conn_id for row in changes.closed)
            self.closed.upsert(changes.closed)
        if changes.opened or changes.updated:
            self.active.upsert(changes.opened + changes.updated)

    def _after_rows(self) -> None:
        """What follows the tables once per application: the details pane, counts, buttons."""
        if self._detail_id is not None:
            row = self._find(self._detail_id)
            if row is not None:
                self._show_details(row)
        self._update_controls()

    def show_status(self, status: Status) -> None:
        names = tuple(u.name for u in status.upstreams)
        if names == self._upstream_names:
            return
        self._upstream_names = names
        current = self.upstream_combo.currentData()
        combo = self.upstream_combo
        combo.blockSignals(True)
        combo.clear()
        combo.addItem(ANY_PROXY, None)
        for name in names:
            combo.addItem(name, name)
        index = combo.findData(current) if current is not None else 0
        combo.setCurrentIndex(max(0, index))
        combo.blockSignals(False)
        if current is not None and index < 0:
            self._upstream_changed()

    def _show_view(self, index: int) -> None:
        self.stack.setCurrentIndex(index)
        self._selection_changed()

    def _update_controls(self) -> None:
        open_n, closed_n = self.active.rowCount(), self.closed.rowCount()
        self.show_active.setText(f"Active ({open_n})")
        self.show_closed.setText(f"Closed ({closed_n})")
        shown = self.current_proxy.rowCount()
        total = open_n if self.showing_active else closed_n
        self.count_label.setText(
            f"{shown} shown" if shown == total else f"{shown} of {total} shown"
        )
        filtered = self.active_proxy.rowCount()
        self.close_filtered_button.setText(f"Close all filtered ({filtered})")
        self.close_filtered_button.setEnabled(self.showing_active and filtered > 0)
        selected = bool(self.current_view.selectionModel().selectedRows())
        self.close_selected_button.setEnabled(self.showing_active and selected)
        self.copy_button.setEnabled(selected)
        self.copy_details_button.setEnabled(self._detail_id is not None)

    # -- filters ----------------------------------------------------------------------------

    def _text_changed(self) -> None:
        text, regex = self.filter_edit.text(), self.regex_box.isChecked()
        error = ""
        for proxy in (self.active_proxy, self.closed_proxy):
            error = proxy.set_text(text, regex=regex)
        self.filter_error.setText(error)
        self.filter_error.setVisible(bool(error))
        self._update_controls()

    def _state_changed(self) -> None:
        state = self.state_combo.currentData()
        for proxy in (self.active_proxy, self.closed_proxy):
            proxy.set_state(state if isinstance(state, RowState) else None)
        self._update_controls()

    def _upstream_changed(self) -> None:
        name = self.upstream_combo.currentData()
        for proxy in (self.active_proxy, self.closed_proxy):
            proxy.set_upstream(name if isinstance(name, str) else None)
        self._update_controls()

    def _process_changed(self) -> None:
        for proxy in (self.active_proxy, self.closed_proxy):
            proxy.set_process(self.process_edit.text())
        self._update_controls()

    def _failed_changed(self, failed_only: bool) -> None:
        for proxy in (self.active_proxy, self.closed_proxy):
            proxy.set_failed_only(failed_only)
        self._update_controls()

    # -- selection and details --------------------------------------------------------------

    def selected_rows(self) -> list[ConnectionRow]:
        proxy = self.current_proxy
        indexes = sorted(i.row() for i in self.current_view.selectionModel().selectedRows())
        return [proxy.row_at(i) for i in indexes]

    def _selection_changed(
        self, _selected: QItemSelection | None = None, _deselected: QItemSelection | None = None
    ) -> None:
        current = self.current_view.selectionModel().currentIndex()
        rows = self.selected_rows()
        row: ConnectionRow | None = None
        if current.isValid() and self.current_view.selectionModel().isRowSelected(
            current.row(), QModelIndex()
        ):
            row = self.current_proxy.row_at(current.row())
        elif rows:
            row = rows[0]
        # Nothing selected (or the selected row closed and left Active): the pane keeps the
        # last connection chosen, still following it, so its end can be read.
        if row is not None:
            self._show_details(row)
        self._update_controls()

    def _show_details(self, row: ConnectionRow) -> None:
        self._detail_id = row.conn_id
        text = details_text(row)
        if text != self.details.toPlainText():
            self.details.setPlainText(text)

    def _find(self, conn_id: int) -> ConnectionRow | None:
        for model in (self.active, self.closed):
            pos = model.position_of(conn_id)
            if pos is not None:
                return model.row_at(pos)
        return None

    # -- actions ------------------------------------------------------------------------------

    def close_selected(self) -> None:
        if not self.showing_active:
            return
        ids = [row.conn_id for row in self.selected_rows()]
        if ids:
            self._services.close_connections(ids)

    def close_filtered(self) -> None:
        ids = [row.conn_id for row in self.active_proxy.visible_rows()]
        if ids:
            self._services.close_connections(ids)

    def copy_rows(self) -> None:
        rows = self.selected_rows()
        if rows:
            QGuiApplication.clipboard().setText(rows_as_text(rows))

    def copy_details(self) -> None:
        if self._detail_id is not None:
            QGuiApplication.clipboard().setText(self.details.toPlainText())


def rows_as_text(rows: Sequence[ConnectionRow]) -> str:
    header = "\t".join(HEADERS[c] for c in Column)
    return "\n".join([header, *(row_text(r) for r in rows)]) + "\n"
