"""The Log tab's table: the SQLite history read a page at a time (newest first).

`canFetchMore` / `fetchMore` follow the history's keyset cursor, so a view asks only for
the pages it scrolls to: opening a history of a million rows reads one page of 200, and
memory grows with what the user scrolled through, not with the file. A new filter resets
the model (a different question, a different answer) and reads its first page.

Must not import keyring, socket or subprocess (nor sqlite3: the reader is injected).
"""

from __future__ import annotations

import time

from PySide6.QtCore import QAbstractTableModel, QModelIndex, QObject, Qt, Signal

from tray_proxy.monitor.query import HistoryCursor, HistoryEntry, HistoryFilter, HistoryPage
from tray_proxy.monitor.rows import RowState
from tray_proxy.ui.models.columns import (
    COLUMN_COUNT,
    FAILED_BRUSH,
    HEADERS,
    NUMERIC,
    RIGHT,
    ROW_FLAGS,
    ROW_ROLE,
    Column,
    cell_text,
)
from tray_proxy.ui.models.connections import AnyIndex
from tray_proxy.ui.services import HistoryReader

PAGE_SIZE = 200


class LogModel(QAbstractTableModel):
    # What went wrong reading the history, in words (shown above the table).
    failed = Signal(str)

    def __init__(
        self,
        reader: HistoryReader,
        *,
        page_size: int = PAGE_SIZE,
        parent: QObject | None = None,
    ) -> None:
        super().__init__(parent)
        self._reader = reader
        self._page_size = page_size
        self._filter = HistoryFilter()
        self._entries: list[HistoryEntry] = []
        self._cursor: HistoryCursor | None = None
        self._more = False
        self.pages_read = 0  # tests and benchmarks: how many pages were asked for

    @property
    def filter(self) -> HistoryFilter:
        return self._filter

    def entry_at(self, position: int) -> HistoryEntry:
        return self._entries[position]

    def set_filter(self, history_filter: HistoryFilter) -> None:
        # The first page is read inside the reset, so views (and Qt's model tester) see
        # the new answer in one step, not a reset followed by an insert.
        self.beginResetModel()
        self._filter = history_filter
        self._entries = []
        self._cursor = None
        self._more = False
        page = self._read()
        if page is not None:
            self._entries.extend(page.entries)
        self.endResetModel()
        if page is not None:
            self._more = page.next is not None

    # -- Qt's paging ----------------------------------------------------------------------

    def canFetchMore(self, parent: AnyIndex) -> bool:  # noqa: N802 - Qt's name
        return not parent.isValid() and self._more

    def fetchMore(self, parent: AnyIndex) -> None:  # noqa: N802 - Qt's name
        if parent.isValid() or not self._more:
            return
        # No more pages while this one is being inserted: a view or tester reacting to
        # rowsInserted must not start a second insert inside the first.
        self._more = False
        page = self._read()
        if page is None:
            return
        if page.entries:
            first = len(self._entries)
            self.beginInsertRows(QModelIndex(), first, first + len(page.entries) - 1)
            self._entries.extend(page.entries)
            self.endInsertRows()
        self._more = page.next is not None

    def _read(self) -> HistoryPage | None:
        """The page after the cursor (moving the cursor on), or None after an error."""
        try:
            page = self._reader.page(self._filter, after=self._cursor, limit=self._page_size)
        except Exception as exc:  # shown to the user; the table stays usable
            # The reader's errors are written for the user (HistoryError); anything else
            # still gets a sentence rather than a bare exception name.
            self.failed.emit(str(exc) or f"Cannot read the connection history ({exc!r}).")
            return None
        self.pages_read += 1
        self._cursor = page.next
        return page

    # -- table ----------------------------------------------------------------------------

    def rowCount(self, parent: AnyIndex = QModelIndex()) -> int:  # noqa: B008, N802
        return 0 if parent.isValid() else len(self._entries)

    def columnCount(self, parent: AnyIndex = QModelIndex()) -> int:  # noqa: B008, N802
        return 0 if parent.isValid() else COLUMN_COUNT

    def headerData(  # noqa: N802 - Qt's name
        self,
        section: int,
        orientation: Qt.Orientation,
        role: int = Qt.ItemDataRole.DisplayRole,
    ) -> object:
        if role != Qt.ItemDataRole.DisplayRole or orientation != Qt.Orientation.Horizontal:
            return None
        if 0 <= section < len(Column):
            return HEADERS[Column(section)]
        return None

    def flags(self, index: AnyIndex) -> Qt.ItemFlag:
        return ROW_FLAGS if index.isValid() else Qt.ItemFlag.NoItemFlags

    def data(self, index: AnyIndex, role: int = Qt.ItemDataRole.DisplayRole) -> object:
        if not index.isValid() or index.row() >= len(self._entries):
            return None
        row = self._entries[index.row()].row
        column = index.column()
        if role == Qt.ItemDataRole.DisplayRole:
            if column == Column.TIME:  # the log spans days: the date too
                return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row.started))
            return cell_text(row, column)
        if role == ROW_ROLE:
            return row
        if role == Qt.ItemDataRole.ToolTipRole and column in (
            Column.OUTCOME,
            Column.DESTINATION,
            Column.ROUTE,
        ):
            return cell_text(row, column) or None
        if role == Qt.ItemDataRole.TextAlignmentRole and column in NUMERIC:
            return RIGHT
        if role == Qt.ItemDataRole.ForegroundRole and row.state is RowState.FAILED:
            return FAILED_BRUSH
        return None
