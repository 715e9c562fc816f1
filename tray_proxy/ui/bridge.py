"""The one bridge from controller events to Qt signals, coalesced to at most ~10 updates/s.

`post()` may be called from any thread. Events are queued; a single-shot QTimer on the
bridge's thread drains the queue at most once per `interval_ms`, emitting every
`stateChanged` and `notice` in order but only the newest `statusChanged`, so 1,000 new
connections a second become a handful of repaints, not 1,000. `connectionsChanged` carries
every ConnectionsChanged of the window merged into one RowChanges (a row opened and closed
within the window arrives only as closed; a row changed twice arrives once, newest), so the
tables apply one batch per flush.

Must not import keyring, socket or subprocess.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable

from PySide6.QtCore import QObject, Qt, QTimer, Signal

from tray_proxy.controller import (
    ConnectionsChanged,
    ControllerEvent,
    Notice,
    ProxyController,
    StateChanged,
    Status,
    StatusUpdated,
)
from tray_proxy.monitor.rows import ConnectionRow, RowChanges

DEFAULT_INTERVAL_MS = 100


class UiBridge(QObject):
    statusChanged = Signal(object)  # Status
    stateChanged = Signal(object)  # StateChanged
    notice = Signal(object)  # Notice
    connectionsChanged = Signal(object)  # RowChanges, merged over one flush
    _wake = Signal()

    def __init__(self, interval_ms: int = DEFAULT_INTERVAL_MS, parent: QObject | None = None):
        super().__init__(parent)
        self._interval = interval_ms / 1000.0
        self._queue: collections.deque[ControllerEvent] = collections.deque()
        self._lock = threading.Lock()
        self._pending = False
        self._last_flush = float("-inf")
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.timeout.connect(self._flush)
        # Queued even from the bridge's own thread: post() must never run slots inline.
        self._wake.connect(self._on_wake, Qt.ConnectionType.QueuedConnection)
        self.latest: Status | None = None
        self.flushes = 0  # how many status updates were emitted (benchmarks and tests)

    def attach(self, controller: ProxyController) -> Callable[[], None]:
        """Follow `controller`; returns the function that stops following it."""
        self.post(StatusUpdated(controller.status()))
        return controller.subscribe(self.post)

    def post(self, event: ControllerEvent) -> None:
        """Queue one event (any thread)."""
        self._queue.append(event)
        with self._lock:
            if self._pending:
                return
            self._pending = True
        self._wake.emit()

    def _on_wake(self) -> None:
        if self._timer.isActive():
            return
        wait = max(0.0, self._interval - (time.monotonic() - self._last_flush))
        self._timer.start(int(wait * 1000))

    def _flush(self) -> None:
        with self._lock:
            self._pending = False
        self._last_flush = time.monotonic()
        status: Status | None = None
        rows = RowMerger()
        while self._queue:
            event = self._queue.popleft()
            if isinstance(event, StatusUpdated):
                status = event.status
            elif isinstance(event, ConnectionsChanged):
                rows.add(event.changes)
            elif isinstance(event, StateChanged):
                self.stateChanged.emit(event)
            elif isinstance(event, Notice):
                self.notice.emit(event)
        merged = rows.merged()
        if merged:
            self.connectionsChanged.emit(merged)
        if status is not None:
            self.latest = status
            self.flushes += 1
            self.statusChanged.emit(status)


class RowMerger:
    """Folds successive RowChanges into one, keeping RowChanges' rule: each row once, in
    its newest form, under closed > opened > updated."""

    def __init__(self) -> None:
        self._opened: dict[int, ConnectionRow] = {}
        self._updated: dict[int, ConnectionRow] = {}
        self._closed: dict[int, ConnectionRow] = {}

    def add(self, changes: RowChanges) -> None:
        for row in changes.opened:
            if row.conn_id not in self._closed:
                self._opened[row.conn_id] = row
        for row in changes.updated:
            if row.conn_id in self._closed:
                continue  # a late update must not bring a closed row back
            if row.conn_id in self._opened:
                self._opened[row.conn_id] = row
            else:
                self._updated[row.conn_id] = row
        for row in changes.closed:
            self._opened.pop(row.conn_id, None)
            self._updated.pop(row.conn_id, None)
            self._closed[row.conn_id] = row

    def __bool__(self) -> bool:
        return bool(self._opened or self._updated or self._closed)

    def keep_closed(self, limit: int) -> list[int]:
        """Forget all but the newest `limit` closed rows (a capped table would drop them);
        returns the ids forgotten."""
        excess = len(self._closed) - limit
        if excess <= 0:
            return []
        gone = list(self._closed)[:excess]
        for conn_id in gone:
            del self._closed[conn_id]
        return gone

    def merged(self) -> RowChanges:
        return RowChanges(
            tuple(self._opened.values()),
            tuple(self._updated.values()),
            tuple(self._closed.values()),
        )
