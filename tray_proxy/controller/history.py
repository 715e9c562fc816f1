"""The connection history as the app and `tray-proxy run` set it up from `[log]`: the writer
the controller feeds (monitor/history.py's HistoryWriter, its own thread) and a reader for
the dashboard's Log tab that opens the same file on first use.

Must not import PySide6 or qasync.
"""

from __future__ import annotations

import threading
from pathlib import Path

from tray_proxy.config import LogSettings
from tray_proxy.monitor.history import HistoryStore, HistoryWriter, default_history_path
from tray_proxy.monitor.query import HistoryCursor, HistoryFilter, HistoryPage

__all__ = ["HistoryFile", "history_path", "open_history_writer"]

MIB = 1024 * 1024


def history_path(settings: LogSettings) -> Path | None:
    """Where the history is kept; None when `[log] enabled = false`."""
    if not settings.enabled:
        return None
    return settings.path if settings.path is not None else default_history_path()


def open_history_writer(settings: LogSettings) -> HistoryWriter | None:
    """The writer thread for `settings`, or None when the history is off. A file that cannot
    be opened does not raise: the writer's `error` says so (the controller shows it)."""
    path = history_path(settings)
    if path is None:
        return None
    return HistoryWriter(
        path,
        max_age_days=settings.max_age_days,
        max_bytes=int(settings.max_size_mb * MIB),
    )


class HistoryFile:
    """The dashboard's HistoryReader (ui.services) on the history file: opened on first
    use, so a file the writer has not created yet, or one that cannot be read, is a
    HistoryError (written for the user) when the Log tab asks, not at start-up."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._store: HistoryStore | None = None

    def _open(self) -> HistoryStore:
        with self._lock:
            if self._store is None:
                self._store = HistoryStore(self.path)
            return self._store

    def page(
        self, filter: HistoryFilter, *, after: HistoryCursor | None = None, limit: int = 200
    ) -> HistoryPage:
        if self._store is None and not self.path.exists():
            # Nothing written yet. The writer thread creates the file; a reader creating it
            # at the same moment would race it.
            return HistoryPage((), None)
        return self._open().page(filter, after=after, limit=limit)

    def export(self, filter: HistoryFilter, path: Path, fmt: str) -> int:
        # HistoryStore.export reads through a connection of its own (a worker thread).
        return self._open().export(filter, path, fmt)

    def close(self) -> None:
        with self._lock:
            store, self._store = self._store, None
        if store is not None:
            store.close()
