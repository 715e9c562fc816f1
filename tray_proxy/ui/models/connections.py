"""The live connection tables: `ConnectionTableModel` (one instance for Active, one for
Closed) and `ConnectionFilter`, the sort and filter proxy in front of either.

Updates are incremental and batched: one `insertRows` per batch of new rows, `dataChanged`
per run of changed rows found through an id -> row map, removals per run of adjacent rows,
and the Closed table's cap drops its oldest rows in one `removeRows`.
No batch resets the model, so a view keeps its selection and scroll position and repaints
only what changed (1,000 new connections a second are ten batches, not 1,000 repaints).

The relay runs on its own thread in the same process, so every call Qt makes into Python
here waits for the GIL that thread may hold (up to `sys.getswitchinterval()` per call under
load): the models keep those calls few. The table model keeps its shape in C++ (row and
column counts, `index()`, `flags()`, headers: see ConnectionTableModel), and a painted cell
is one `multiData` call (not one `data()` per role, each mapped through the proxy),
answered from what is painted, cached per row. What is left per new row is the proxy's
`filterAcceptsRow` and a few `lessThan`.

Must not import keyring, socket or subprocess.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import cast

from PySide6.QtCore import (
    QModelIndex,
    QModelRoleData,
    QModelRoleDataSpan,
    QObject,
    QPersistentModelIndex,
    QSortFilterProxyModel,
)
from PySide6.QtGui import QStandardItemModel

from tray_proxy.monitor.rows import ConnectionRow, RowState
from tray_proxy.ui.models.columns import (
    ALIGNMENT,
    COLUMN_COUNT,
    DISPLAY,
    FAILED_BRUSH,
    FOREGROUND,
    HANDLED_ROLES,
    HEADERS,
    NUMERIC,
    RIGHT,
    ROW_ROLE,
    SORT_ROLE,
    TOOLTIP,
    TOOLTIP_COLUMNS,
    Column,
    cell_text,
    row_cells,
    sort_key,
)

DEFAULT_CLOSED_CAP = 10_000
# More separate runs of changed rows than this in one batch: one dataChanged over their span
# (cheaper for the proxy and the view than hundreds of small signals).
_MAX_RUNS = 32

AnyIndex = QModelIndex | QPersistentModelIndex
Roles = QModelRoleDataSpan | QModelRoleData  # (PySide's signature: a span, or one role)
_RoleItems = Iterable[QModelRoleData]


PAINTED_ROLES = frozenset({DISPLAY, ALIGNMENT, FOREGROUND})  # (and the delegate's others: None)


def _painted(row: ConnectionRow) -> tuple[dict[int, object], ...]:
    failed = row.state is RowState.FAILED
    painted: list[dict[int, object]] = []
    for column, text in enumerate(row_cells(row)):
        cell: dict[int, object] = {DISPLAY: text}
        if column in NUMERIC:
            cell[ALIGNMENT] = RIGHT
        if failed:
            cell[FOREGROUND] = FAILED_BRUSH
        painted.append(cell)
    return tuple(painted)


def _runs(positions: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted positions as (first, last) runs of adjacent rows."""
    runs: list[tuple[int, int]] = []
    for pos in sorted(positions):
        if runs and pos == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], pos)
        else:
            runs.append((pos, pos))
    return runs


class ConnectionTableModel(QStandardItemModel):
    """Connection rows in arrival order. `cap`: keep at most that many (oldest dropped).

    A QStandardItemModel without items: Qt keeps the shape (row and column counts,
    `index()`, `flags()`, the headers) in C++, so the proxy's sorting and the views ask
    Python only for what is in the rows (`data`, `multiData`). The rows stay here."""

    def __init__(self, *, cap: int | None = None, parent: QObject | None = None) -> None:
        super().__init__(0, COLUMN_COUNT, parent)
        self.setHorizontalHeaderLabels([HEADERS[c] for c in Column])
        self._cap = cap
        self._rows: list[ConnectionRow] = []
        # Rows leave the list when Qt says they are gone (first of the slots), so that
        # whoever looks before sees them and whoever looks after does not.
        self.rowsRemoved.connect(self._rows_removed)
        # conn id -> position + _offset; dropping the oldest rows only moves _offset.
        self._pos: dict[int, int] = {}
        self._offset = 0
        # conn id -> the row's cell texts, made when a cell of it is first painted and
        # dropped when the row changes or leaves.
        self._cells: dict[int, tuple[dict[int, object], ...]] = {}

    # -- reading --------------------------------------------------------------------------

    def row_at(self, position: int) -> ConnectionRow:
        return self._rows[position]

    def position_of(self, conn_id: int) -> int | None:
        pos = self._pos.get(conn_id)
        return None if pos is None else pos - self._offset

    def __contains__(self, conn_id: object) -> bool:
        return conn_id in self._pos

    def rows(self) -> Sequence[ConnectionRow]:
        return self._rows

    def painted(self, position: int) -> tuple[dict[int, object], ...]:
        """What a view paints for each cell of the row at `position`, by role: its text,
        and its alignment and colour where they are not the default (cached)."""
        row = self._rows[position]
        painted = self._cells.get(row.conn_id)
        if painted is None:
            painted = self._cells[row.conn_id] = _painted(row)
        return painted

    def cells(self, position: int) -> tuple[str, ...]:
        """The texts of the row at `position`, one per column."""
        return tuple(cast(str, cell[DISPLAY]) for cell in self.painted(position))

    def multiData(self, index: AnyIndex, roles: Roles) -> None:  # noqa: N802
        # What a view's delegate asks for each cell it paints, all roles in one call.
        if index.isValid() and 0 <= index.row() < len(self._rows):
            self.fill_roles(index.row(), index.column(), roles)

    def fill_roles(self, position: int, column: int, roles: Roles) -> None:
        """Answer every role in `roles` for the cell at (`position`, `column`)."""
        painted = self.painted(position)[column]
        # (A span iterates at run time; PySide's stubs do not say so.)
        items = (roles,) if isinstance(roles, QModelRoleData) else cast(_RoleItems, roles)
        for item in items:
            role = item.role()
            if role in PAINTED_ROLES:
                value = painted.get(role)
            elif role in HANDLED_ROLES:
                value = self._answer(self._rows[position], position, column, role)
            else:
                value = None
            if value is None:
                item.clearData()
            else:
                item.setData(value)

    def data(self, index: AnyIndex, role: int = DISPLAY) -> object:
        if role not in HANDLED_ROLES:
            return None  # most roles a delegate asks for: answered before any lookup
        position = index.row()
        if position < 0 or position >= len(self._rows) or not index.isValid():
            return None
        return self._answer(self._rows[position], position, index.column(), role)

    def _answer(self, row: ConnectionRow, position: int, column: int, role: int) -> object:
        if role in PAINTED_ROLES:
            return self.painted(position)[column].get(role)
        if role == SORT_ROLE:
            return sort_key(row, column)
        if role == ROW_ROLE:
            return row
        if role == TOOLTIP:
            return (cell_text(row, column) or None) if column in TOOLTIP_COLUMNS else None
        return None

    # -- changing -------------------------------------------------------------------------

    def upsert(self, rows: Sequence[ConnectionRow]) -> None:
        """Replace the rows already here (by id) and append the others, in one batch."""
        changed: list[int] = []
        new: list[ConnectionRow] = []
        seen_new: dict[int, int] = {}
        for row in rows:
            pos = self._pos.get(row.conn_id)
            if pos is not None:
                self._rows[pos - self._offset] = row
                self._cells.pop(row.conn_id, None)
                changed.append(pos - self._offset)
            elif row.conn_id in seen_new:
                new[seen_new[row.conn_id]] = row
            else:
                seen_new[row.conn_id] = len(new)
                new.append(row)
        if changed:
            self._emit_changed(changed)
        if new:
            first = len(self._rows)
            for i, row in enumerate(new):
                self._pos[row.conn_id] = self._offset + first + i
            # (Appended: the rows before them read the same whether Qt has counted the new
            # ones yet or not.)
            self._rows.extend(new)
            self.insertRows(first, len(new))
        self._trim()

    def remove(self, conn_ids: Iterable[int]) -> None:
        positions = [p for cid in conn_ids if (p := self.position_of(cid)) is not None]
        if not positions:
            return
        for first, last in reversed(_runs(positions)):
            for row in self._rows[first : last + 1]:
                del self._pos[row.conn_id]
                self._cells.pop(row.conn_id, None)
            self.removeRows(first, last - first + 1)
        self._offset = 0
        self._pos = {row.conn_id: i for i, row in enumerate(self._rows)}

    def _trim(self) -> None:
        if self._cap is None or len(self._rows) <= self._cap:
            return
        excess = len(self._rows) - self._cap
        for row in self._rows[:excess]:
            del self._pos[row.conn_id]
            self._cells.pop(row.conn_id, None)
        self._offset += excess
        self.removeRows(0, excess)

    def _rows_removed(self, parent: AnyIndex, first: int, last: int) -> None:
        del self._rows[first : last + 1]

    def _emit_changed(self, positions: list[int]) -> None:
        last_column = COLUMN_COUNT - 1
        runs = _runs(positions)
        if len(runs) > _MAX_RUNS:
            runs = [(runs[0][0], runs[-1][1])]
        for first, last in runs:
            self.dataChanged.emit(self.index(first, 0), self.index(last, last_column))


class ConnectionFilter(QSortFilterProxyModel):
    """Sorts by each column's value (not its text) and filters by text or regular
    expression, state, proxy, process and failures."""

    def __init__(self, source: ConnectionTableModel, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._source = source
        self.setSourceModel(source)
        self.setSortRole(SORT_ROLE)
        self.setDynamicSortFilter(True)
        self._text: str = ""
        self._pattern: re.Pattern[str] | None = None
        self._state: RowState | None = None
        self._upstream: str | None = None
        self._process: str = ""
        self._failed_only = False

    @property
    def source(self) -> ConnectionTableModel:
        return self._source

    def set_text(self, text: str, *, regex: bool = False) -> str:
        """Filter by a substring (case-insensitive) or a regular expression over the
        destination, IP, process, proxy, route, state and outcome. Returns "" or, for a regular
        expression that does not compile, what is wrong with it (the filter is then off)."""
        error = ""
        pattern: re.Pattern[str] | None = None
        if regex and text:
            try:
                pattern = re.compile(text, re.IGNORECASE)
            except re.error as exc:
                error = f"Not a regular expression: {exc}"
        self._change(
            _text="" if regex else text.lower(),
            _pattern=pattern,
        )
        return error

    def set_state(self, state: RowState | None) -> None:
        self._change(_state=state)

    def set_upstream(self, name: str | None) -> None:
        self._change(_upstream=name or None)

    def set_process(self, name: str) -> None:
        self._change(_process=name.strip().lower())

    def set_failed_only(self, failed_only: bool) -> None:
        self._change(_failed_only=failed_only)

    def _change(self, **values: object) -> None:
        self.beginFilterChange()
        for name, value in values.items():
            setattr(self, name, value)
        self.endFilterChange(QSortFilterProxyModel.Direction.Rows)

    def accepts(self, row: ConnectionRow) -> bool:
        if self._failed_only and row.state is not RowState.FAILED:
            return False
        if self._state is not None and row.state is not self._state:
            return False
        if self._upstream is not None and row.upstream != self._upstream:
            return False
        if self._process:
            name = "" if row.process is None else row.process.name.lower()
            if self._process not in name:
                return False
        if self._text or self._pattern is not None:
            haystack = _searchable(row)
            if self._pattern is not None:
                return self._pattern.search(haystack) is not None
            return self._text in haystack.lower()
        return True

    def multiData(self, index: AnyIndex, roles: Roles) -> None:  # noqa: N802
        # Qt's proxy would call the source's data() once per role, each through
        # mapToSource: one call into Python per painted cell instead of about twenty.
        source = self.mapToSource(index)
        if source.isValid():
            self._source.fill_roles(source.row(), source.column(), roles)

    def filterAcceptsRow(self, source_row: int, source_parent: AnyIndex) -> bool:  # noqa: N802
        return self.accepts(self._source.row_at(source_row))

    def lessThan(self, left: AnyIndex, right: AnyIndex) -> bool:  # noqa: N802 - Qt's name
        # The rows themselves, not data(SORT_ROLE): a sorted insert of a batch compares
        # thousands of times, and each data() call costs index checks on both sides.
        column = left.column()
        rows = self._source.rows()
        a = sort_key(rows[left.row()], column)
        b = sort_key(rows[right.row()], column)
        if type(a) is not type(b):
            return str(a) < str(b)
        return a < b  # type: ignore[operator]

    def row_at(self, proxy_row: int) -> ConnectionRow:
        source = self.mapToSource(self.index(proxy_row, 0))
        return self._source.row_at(source.row())

    def visible_rows(self) -> list[ConnectionRow]:
        return [self.row_at(i) for i in range(self.rowCount())]


def _searchable(row: ConnectionRow) -> str:
    parts = [row.destination, row.state.value, row.upstream or "", row.words, row.route]
    if row.original_dst is not None:
        parts.append(f"{row.original_dst[0]}:{row.original_dst[1]}")
    if row.process is not None:
        parts += [row.process.label, row.process.exe or "", row.process.user or ""]
    if row.close_reason is not None:
        parts.append(row.close_reason.value)
    return "\n".join(parts)
