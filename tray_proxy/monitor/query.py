"""What a reader asks of the connection history: a filter, a page, a cursor.

Shared by the SQLite store (monitor/history.py), `tray-proxy log` and the dashboard's Log
tab. Pure data: no I/O. Must not import PySide6.
"""

from __future__ import annotations

from dataclasses import dataclass

from tray_proxy.monitor.rows import ConnectionRow


@dataclass(frozen=True, slots=True)
class HistoryFilter:
    """Every field narrows; None (or False) means "any"."""

    since: float | None = None  # time.time(): rows that started at or after it
    until: float | None = None  # rows that started before it
    text: str | None = None  # substring of host, destination, process, upstream or words
    host: str | None = None  # host name pattern: "example.com", "*.example.com", "%corp%"
    process: str | None = None  # process name, exact (case-insensitive)
    upstream: str | None = None  # upstream name, exact
    failed_only: bool = False  # only rows whose state is FAILED
    reason: str | None = None  # CloseReason.value, exact
    route: str | None = None  # substring of the routing decision ("block", "rule[2]")


@dataclass(frozen=True, slots=True)
class HistoryCursor:
    """Where the previous page ended (newest first): keyset paging, no OFFSET."""

    started: float
    rowid: int


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    rowid: int  # the row's id in the history (stable across restarts)
    row: ConnectionRow


@dataclass(frozen=True, slots=True)
class HistoryPage:
    entries: tuple[HistoryEntry, ...]
    next: HistoryCursor | None  # None: nothing older matches
