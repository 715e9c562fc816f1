"""How the dashboard's connection tables look: column widths sized for a 1000-pixel window,
compact rows, and a header menu to hide or show columns.

Must not import keyring, socket or subprocess.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from PySide6.QtCore import QAbstractItemModel, QPoint, Qt
from PySide6.QtGui import QFont, QPaintEvent
from PySide6.QtWidgets import (
    QAbstractItemView,
    QHeaderView,
    QMenu,
    QPlainTextEdit,
    QSplitter,
    QTableView,
    QWidget,
)

from tray_proxy.ui.models.columns import HEADERS, Column

WIDTHS = {
    Column.TIME: 66,
    Column.PROCESS: 115,
    Column.DESTINATION: 185,
    Column.IP: 105,
    Column.UPSTREAM: 62,
    Column.STATE: 52,
    Column.UP: 66,
    Column.DOWN: 66,
    Column.LATENCY: 56,
    Column.DURATION: 64,
}


class TimedTable(QTableView):
    """A table that tells `on_paint` how long each repaint took (seconds)."""

    def __init__(self, on_paint: Callable[[float], None]) -> None:
        super().__init__()
        self._on_paint = on_paint

    def paintEvent(self, event: QPaintEvent) -> None:  # noqa: N802 - Qt's name
        began = time.perf_counter()
        super().paintEvent(event)
        self._on_paint(time.perf_counter() - began)


def make_table(
    model: QAbstractItemModel | None,
    name: str,
    *,
    hidden: tuple[Column, ...] = (),
    stretch: Column = Column.OUTCOME,
    time_width: int = WIDTHS[Column.TIME],
    on_paint: Callable[[float], None] | None = None,
) -> QTableView:
    """A table over `model`; `stretch` takes the width left over (Outcome, the longest).
    `on_paint`: told how long each repaint took."""
    view = QTableView() if on_paint is None else TimedTable(on_paint)
    view.setObjectName(name)
    if model is not None:  # (column widths are set after the model: it makes the header)
        view.setModel(model)
    view.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
    view.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)  # read-only tables
    view.setWordWrap(False)
    view.setAlternatingRowColors(True)
    rows = view.verticalHeader()
    rows.hide()
    # One fixed height for every row: the header then keeps one span for all rows instead
    # of working per row when thousands are inserted or dropped.
    rows.setSectionResizeMode(QHeaderView.ResizeMode.Fixed)
    rows.setDefaultSectionSize(view.fontMetrics().height() + 6)
    header = view.horizontalHeader()
    header.setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
    if stretch == Column.OUTCOME:
        header.setStretchLastSection(True)  # still resizable by hand, unlike Stretch mode
    else:
        header.setSectionResizeMode(stretch, QHeaderView.ResizeMode.Stretch)
    header.setHighlightSections(False)
    for column, width in WIDTHS.items():
        view.setColumnWidth(column, width)
    view.setColumnWidth(Column.TIME, time_width)
    for column in hidden:
        view.setColumnHidden(column, True)
    header.setContextMenuPolicy(header.contextMenuPolicy().CustomContextMenu)
    header.customContextMenuRequested.connect(lambda pos: _column_menu(view, pos))
    header.setToolTip("Right-click to hide or show columns")
    return view


def details_pane(name: str, placeholder: str) -> QPlainTextEdit:
    """The read-only, fixed-width text under a table that shows every field of its row."""
    details = QPlainTextEdit()
    details.setObjectName(name)
    details.setReadOnly(True)
    details.setPlaceholderText(placeholder)
    fixed = QFont("monospace")
    fixed.setStyleHint(QFont.StyleHint.TypeWriter)
    details.setFont(fixed)
    return details


def table_over_details(table: QWidget, details: QPlainTextEdit) -> QSplitter:
    """The table above its details pane, three to one, neither collapsible."""
    splitter = QSplitter(Qt.Orientation.Vertical)
    splitter.addWidget(table)
    splitter.addWidget(details)
    splitter.setStretchFactor(0, 3)
    splitter.setStretchFactor(1, 1)
    splitter.setChildrenCollapsible(False)
    return splitter


def _column_menu(view: QTableView, pos: QPoint) -> None:
    menu = QMenu(view)
    for column in Column:
        action = menu.addAction(HEADERS[column])
        action.setCheckable(True)
        action.setChecked(not view.isColumnHidden(column))
        action.toggled.connect(lambda shown, c=column: view.setColumnHidden(c, not shown))
    menu.exec(view.horizontalHeader().mapToGlobal(pos))
