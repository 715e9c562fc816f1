"""The monitor: the one place engine events become rows, health and history.

An impure shell around two pure reducers (RowTracker, HealthReducer): it asks the process
attributor about each new connection, puts a failure in words on each closed row
(monitor/words.py), and hands closed rows to the history once their process is known (or
ATTRIBUTION_WAIT seconds after the close, whichever comes first). A closed row is reported in
RowChanges.closed once, in its final form, at that same moment: the dashboard and the history
see the same row.

Called on one thread (the app's loop), in batches: at 1,000 connections a second it costs a
few dict operations per event. It reads the monotonic clock only to release rows whose
attribution never answered.

Must not import PySide6, asyncio or socket.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from tray_proxy.monitor.health import HealthReducer, HealthSnapshot, ProbeRecord
from tray_proxy.monitor.rows import ConnectionRow, ProcessInfo, RowChanges, RowTracker
from tray_proxy.monitor.words import failure_words
from tray_proxy.relay.events import ConnectionOpened, Event
from tray_proxy.relay.records import Address
from tray_proxy.relay.settings import UpstreamProxy

__all__ = [
    "ATTRIBUTION_WAIT",
    "AttributorLike",
    "HistorySink",
    "Monitor",
]

log = logging.getLogger(__name__)

ATTRIBUTION_WAIT = 2.0  # seconds a closed row waits for its process before it goes on without
MAX_HELD = 50_000  # closed rows waiting for attribution at most (then the oldest go on)


class HistorySink(Protocol):
    """Where closed rows are kept (monitor/history.py's HistoryWriter)."""

    def submit(self, rows: Sequence[ConnectionRow]) -> None: ...

    def close(self, timeout: float = 5.0) -> None: ...


class AttributorLike(Protocol):
    """Finds the process behind a connection (monitor/attribution.py's Attributor)."""

    def request(self, conn_id: int, client: Address, original_dst: Address | None) -> None: ...

    def close(self) -> None: ...


class Monitor:
    """Engine events in; row changes, health snapshots and history rows out.

    `upstreams` returns the configured proxies by name (read when a row needs words and for
    each health snapshot, so settings changes show up). `usernames`, when given, returns
    user names known beyond the settings (the keyring's), by upstream name. `clock` is the
    monotonic clock (tests pass their own).
    """

    def __init__(
        self,
        upstreams: Callable[[], Mapping[str, UpstreamProxy]],
        history: HistorySink | None,
        attributor: AttributorLike | None,
        *,
        usernames: Callable[[], Mapping[str, str]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        attribution_wait: float = ATTRIBUTION_WAIT,
    ) -> None:
        self._upstreams = upstreams
        self._usernames = usernames
        self._history = history
        self._attributor = attributor
        self._clock = clock
        self._wait = attribution_wait
        self._rows = RowTracker()
        self._health = HealthReducer()
        self._awaiting: set[int] = set()  # ids asked of the attributor, not answered yet
        # Closed rows waiting for their process: id -> (release time, row). Insertion order
        # is release order (one fixed wait), so the due ones are always at the front.
        self._held: OrderedDict[int, tuple[float, ConnectionRow]] = OrderedDict()
        self._closed = False

    # -- inputs -----------------------------------------------------------------------------

    def feed(self, events: Sequence[Event]) -> RowChanges:
        """A batch of engine events, in the order the engine published them."""
        attributor = self._attributor
        if attributor is not None:
            awaiting = self._awaiting
            try:
                for event in events:
                    if type(event) is ConnectionOpened:
                        attributor.request(event.conn_id, event.client, event.original_dst)
                        awaiting.add(event.conn_id)
            except Exception:
                # Rows matter more than the program's name: go on without attribution.
                log.exception("process attribution failed; connections show no program")
                self._attributor = None
                awaiting.clear()
        changes = self._rows.apply(events)
        self._health.apply(events)
        closed: list[ConnectionRow] = []
        if changes.closed:
            closed = self._worded(changes.closed)
            self._health.apply_rows(closed)
        return self._changes(changes, closed)

    def process_found(self, results: Sequence[tuple[int, ProcessInfo | None]]) -> RowChanges:
        """The attributor's answers: conn id -> the process (None: not found)."""
        rows = self._rows
        ready: list[ConnectionRow] = []
        for conn_id, process in results:
            self._awaiting.discard(conn_id)
            if rows.is_open(conn_id):
                if process is not None:
                    rows.set_process(conn_id, process)
                continue
            held = self._held.pop(conn_id, None)
            if held is not None:
                row = held[1]
                ready.append(row if process is None else _amended(row, row.words, process))
        return self._changes(rows.pending(), ready, released=True)

    def traffic(
        self, at: float, counters: Mapping[int, tuple[int, int]], total_up: int, total_down: int
    ) -> RowChanges:
        """The engine's byte counters (RelayEngine.traffic()), sampled at `at` (time.time())."""
        self._rows.set_traffic(counters)
        self._health.apply_traffic(at, total_up, total_down)
        return self._changes(self._rows.pending(), [], released=True)

    def probe(self, record: ProbeRecord) -> None:
        self._health.apply_probe(record)

    # -- outputs ----------------------------------------------------------------------------

    def health(self, now: float) -> HealthSnapshot:
        self._health.set_upstreams(self._upstreams())
        return self._health.snapshot(now)

    def open_rows(self) -> list[ConnectionRow]:
        return list(self._rows.open_rows.values())

    def close(self) -> None:
        """Hand every held row to the history, then close the attributor and the history."""
        if self._closed:
            return
        self._closed = True
        rest = [row for _, row in self._held.values()]
        self._held.clear()
        self._awaiting.clear()
        if self._history is not None and rest:
            self._history.submit(rest)
        if self._attributor is not None:
            self._attributor.close()
            self._attributor = None
        if self._history is not None:
            self._history.close()
            self._history = None

    # -- inside -----------------------------------------------------------------------------

    def _worded(self, rows: Sequence[ConnectionRow]) -> list[ConnectionRow]:
        upstreams: Mapping[str, UpstreamProxy] | None = None
        usernames: Mapping[str, str] | None = None
        out: list[ConnectionRow] = []
        for row in rows:
            if not row.failed and (row.bytes_up or row.bytes_down):
                out.append(row)  # a normal end with traffic: no words (the common case)
                continue
            if upstreams is None:  # once per batch, and only for a batch that needs it
                upstreams = self._upstreams()
                usernames = self._usernames() if self._usernames is not None else None
            words = failure_words(row, upstreams, usernames)
            out.append(_amended(row, words, row.process) if words else row)
        return out

    def _changes(
        self, changes: RowChanges, closed: list[ConnectionRow], *, released: bool = False
    ) -> RowChanges:
        """`changes` with `closed` rows that are final now, plus held rows now due; the rest
        of `closed` is held. `released`: `closed` is final already (answered or due)."""
        final: list[ConnectionRow] = []
        if released:
            final = closed
        else:
            deadline = self._clock() + self._wait
            held = self._held
            awaiting = self._awaiting
            for row in closed:
                if row.conn_id in awaiting:
                    # An id the engine used again (a new engine in the same run cannot, but
                    # the monitor does not rely on it): the earlier row goes out first.
                    earlier = held.pop(row.conn_id, None)
                    if earlier is not None:
                        final.append(earlier[1])
                    held[row.conn_id] = (deadline, row)
                else:
                    final.append(row)
        if self._held:
            final.extend(self._due())
        if final and self._history is not None:
            self._history.submit(final)
        if not final and not changes.closed:
            return changes
        # The tracker's closed rows are `closed` (worded), final now or held: never its own.
        return RowChanges(changes.opened, changes.updated, tuple(final))

    def _due(self) -> list[ConnectionRow]:
        held = self._held
        now = self._clock()
        due: list[ConnectionRow] = []
        while held:
            conn_id, (deadline, row) = next(iter(held.items()))
            if deadline > now and len(held) <= MAX_HELD:
                break
            del held[conn_id]
            self._awaiting.discard(conn_id)
            due.append(row)
        return due


def _amended(row: ConnectionRow, words: str, process: ProcessInfo | None) -> ConnectionRow:
    """`row` with other words and process: dataclasses.replace() costs four times as much,
    once per closed connection."""
    return ConnectionRow(
        row.conn_id,
        row.started,
        row.client,
        row.original_dst,
        row.host,
        row.upstream,
        row.state,
        row.established,
        row.handshake_latency,
        row.bytes_up,
        row.bytes_down,
        row.ended,
        row.close_reason,
        row.detail,
        words,
        process,
    )
