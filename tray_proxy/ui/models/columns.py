"""The columns a connection row shows in, shared by the live tables and the log.

`cell_text` is what a cell displays; `sort_key` what it sorts by (numbers sort as numbers);
`details_text` the details pane's text.
Must not import keyring, socket or subprocess.
"""

from __future__ import annotations

import enum

from PySide6.QtCore import Qt
from PySide6.QtGui import QBrush, QColor

from tray_proxy.monitor.rows import ConnectionRow
from tray_proxy.ui.format import (
    fmt_bytes,
    fmt_clock,
    fmt_duration,
    fmt_latency,
    outcome_text,
    row_details,
)

# The row itself, for views and proxies that need more than a cell's text.
ROW_ROLE = Qt.ItemDataRole.UserRole + 1
# What a column sorts by (QSortFilterProxyModel.setSortRole).
SORT_ROLE = Qt.ItemDataRole.UserRole + 2

# Roles as plain ints: data() is called for every role of every visible cell at each
# repaint, and comparing an int with an enum member is a Python call each time.
DISPLAY = int(Qt.ItemDataRole.DisplayRole)
TOOLTIP = int(Qt.ItemDataRole.ToolTipRole)
ALIGNMENT = int(Qt.ItemDataRole.TextAlignmentRole)
FOREGROUND = int(Qt.ItemDataRole.ForegroundRole)
HANDLED_ROLES = frozenset({DISPLAY, TOOLTIP, ALIGNMENT, FOREGROUND, ROW_ROLE, SORT_ROLE})
ROW_FLAGS = (
    Qt.ItemFlag.ItemIsEnabled | Qt.ItemFlag.ItemIsSelectable | Qt.ItemFlag.ItemNeverHasChildren
)


class Column(enum.IntEnum):
    TIME = 0
    PROCESS = 1
    DESTINATION = 2
    IP = 3
    UPSTREAM = 4
    STATE = 5
    UP = 6
    DOWN = 7
    LATENCY = 8
    DURATION = 9
    OUTCOME = 10
    # The routing decision and what made it (issue 15). Last, and hidden by default: the
    # tables are full at 1000 pixels, Proxy already says "direct" or "block", and the
    # details pane shows the whole decision.
    ROUTE = 11


COLUMN_COUNT = len(Column)  # (len() of an enum is a Python call; Qt asks very often)

HEADERS = {
    Column.TIME: "Time",
    Column.PROCESS: "Process",
    Column.DESTINATION: "Destination",
    Column.IP: "IP",
    Column.UPSTREAM: "Proxy",
    Column.STATE: "State",
    Column.UP: "Sent",
    Column.DOWN: "Received",
    Column.LATENCY: "Latency",
    Column.DURATION: "Duration",
    Column.OUTCOME: "Outcome",
    Column.ROUTE: "Route",
}

FAILED_BRUSH = QBrush(QColor(190, 30, 30))  # a failed connection's text
RIGHT = Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter  # numbers

# Columns whose text is often cut off: their tooltip shows it whole.
TOOLTIP_COLUMNS = frozenset({Column.PROCESS, Column.DESTINATION, Column.OUTCOME, Column.ROUTE})
NUMERIC = frozenset({Column.UP, Column.DOWN, Column.LATENCY, Column.DURATION})


def cell_text(row: ConnectionRow, column: int) -> str:
    if column == Column.TIME:
        return fmt_clock(row.started)
    if column == Column.PROCESS:
        return "-" if row.process is None else row.process.label
    if column == Column.DESTINATION:
        return row.destination
    if column == Column.IP:
        return "-" if row.original_dst is None else row.original_dst[0]
    if column == Column.UPSTREAM:
        if row.upstream:
            return row.upstream
        # No proxy because a rule (or the PAC script) said so: say which way it went.
        action = row.route_action
        return action if action in ("direct", "block") else "-"
    if column == Column.STATE:
        return row.state.value
    if column == Column.UP:
        return fmt_bytes(row.bytes_up)
    if column == Column.DOWN:
        return fmt_bytes(row.bytes_down)
    if column == Column.LATENCY:
        return fmt_latency(row.handshake_latency)
    if column == Column.DURATION:
        return fmt_duration(row.duration)
    if column == Column.OUTCOME:
        return "" if row.ended is None else outcome_text(row)
    if column == Column.ROUTE:
        return row.route or "-"
    return ""


def row_cells(row: ConnectionRow) -> tuple[str, ...]:
    """Every column's text for `row`, in column order."""
    return tuple(cell_text(row, c) for c in range(COLUMN_COUNT))


def sort_key(row: ConnectionRow, column: int) -> str | float | int:
    if column == Column.TIME:
        return row.started
    if column == Column.UP:
        return row.bytes_up
    if column == Column.DOWN:
        return row.bytes_down
    if column == Column.LATENCY:
        return -1.0 if row.handshake_latency is None else row.handshake_latency
    if column == Column.DURATION:
        return -1.0 if row.duration is None else row.duration
    return cell_text(row, column).lower()


def details_text(row: ConnectionRow) -> str:
    """The details pane's text: every field (ui/format.py's row_details) and the routing
    decision under the Proxy line, aligned with the others."""
    text = row_details(row)
    lines = text.split("\n")
    if any(line.startswith("Route:") for line in lines):
        return text  # row_details says it already
    at = next((i for i, line in enumerate(lines) if line.startswith("Proxy:")), len(lines) - 1)
    anchor = lines[at]
    value = anchor.partition(":")[2]
    width = len(anchor) - len(value.lstrip(" ")) - 1  # the names' column, as row_details pads
    lines.insert(at + 1, f"{'Route:':<{width}} {row.route or '-'}")
    return "\n".join(lines)


def row_text(row: ConnectionRow) -> str:
    """One line per row for "Copy": the cells, tab-separated."""
    return "\t".join(cell_text(row, c) for c in Column)
