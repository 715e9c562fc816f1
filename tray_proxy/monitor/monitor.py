"""The monitor: the one place engine events become rows, health and history.

An impure shell around two pure reducers (RowTracker, HealthReducer): it asks the process
attributor about each new connection, puts a failure in words on each closed row
(monitor/words.py), and hands closed rows to the history once their process is known (or
ATTRIBUTION_WAIT seconds after the close, whichever comes first). A closed row is reported in
RowChanges.closed once, in its final form, at that same moment: the dashboard and the history
see the same row.

Called on one thread (the app's loop), in batches: at 1,000 connections a second it costs a
few dict operations per event. With `coalesce` (headless `tray-proxy run`, whose relay shares
this loop and whom nobody watches row by row), events and answers are only queued as they
come and reduced together at most `coalesce` seconds later: one reduce per tenth of a second
instead of four per connection, each on the relay's latency path (the relay's added latency
and conn/s with the history on must stay within 5 % of it off, issue 13). It reads the
monotonic clock to release rows whose attribution never answered, and to coalesce.

Must not import PySide6, asyncio or socket.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from tray_proxy.monitor.health import HealthReducer, HealthSnapshot, ProbeRecord
from tray_proxy.monitor.rows import ConnectionRow, ProcessInfo, RowChanges, RowTracker
from tray_proxy.monitor.words import failure_words
from tray_proxy.relay.events import ConnectionOpened, Event
from tray_proxy.relay.records import Address
from tray_proxy.relay.settings import UpstreamProxy

__all__ = [
    "ATTRIBUTION_WAIT",
    "AttributorLike",
    "HEADLESS_COALESCE",
    "HistorySink",
    "Monitor",
]

log = logging.getLogger(__name__)

ATTRIBUTION_WAIT = 2.0  # seconds a closed row waits for its process before it goes on without
MAX_HELD = 50_000  # closed rows waiting for attribution at most (then the oldest go on)
# `tray-proxy run`: events wait this long to be reduced together (the history's own batches
# are 0.5 s; the status and the health are read once a second).
HEADLESS_COALESCE = 0.1
MAX_DEFERRED = 20_000  # events and answers waiting to be reduced at most (then reduced)


class HistorySink(Protocol):
    """Where closed rows are kept (monitor/history.py's HistoryWriter)."""

    def submit(self, rows: Sequence[ConnectionRow]) -> None: ...

    def close(self, timeout: float = 5.0) -> None: ...


class AttributorLike(Protocol):
    """Finds the process behind a connection (monitor/attribution.py's Attributor)."""

    def request_all(self, requests: Sequence[tuple[int, Address, Address | None]]) -> None:
        """(conn id, client, original destination) of connections just opened, in one go."""

    def close(self) -> None: ...


class Monitor:
    """Engine events in; row changes, health snapshots and history rows out.

    `upstreams` returns the configured proxies by name (read when a row needs words and for
    each health snapshot, so settings changes show up). `usernames`, when given, returns
    user names known beyond the settings (the keyring's), by upstream name. `clock` is the
    monotonic clock (tests pass their own). `coalesce` > 0: events and attribution answers
    are reduced at most that many seconds after they came, together, when a later one
    comes or at the next `traffic()`; until then `feed` and `process_found` return no
    changes (0: each batch at once, as the dashboard wants).
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
        coalesce: float = 0.0,
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
        self._coalesce = coalesce
        # Waiting to be reduced, in arrival order: (answers?, events or answers), a run of
        # the same kind in one list; counted, and since when (monotonic).
        self._pending: list[tuple[bool, list[Any]]] = []
        self._pending_count = 0
        self._pending_since = 0.0

    # -- inputs -----------------------------------------------------------------------------

    def feed(self, events: Sequence[Event]) -> RowChanges:
        """A batch of engine events, in the order the engine published them."""
        attributor = self._attributor
        if attributor is not None:
            awaiting = self._awaiting
            try:
                # One call for the batch: the attributor then hands the child a batch of
                # connections opened together in one write (under load, one per batch
                # instead of one per connection).
                opened = [
                    (event.conn_id, event.client, event.original_dst)
                    for event in events
                    if type(event) is ConnectionOpened
                ]
                if opened:
                    attributor.request_all(opened)
                    awaiting.update(conn_id for conn_id, _, _ in opened)
            except Exception:
                # Rows matter more than the program's name: go on without attribution.
                log.exception("process attribution failed; connections show no program")
                self._attributor = None
                awaiting.clear()
        if self._coalesce > 0.0:
            return self._defer(events, answers=False)
        final: list[ConnectionRow] = []
        self._reduce(events, final)
        return self._result(final)

    def process_found(self, results: Sequence[tuple[int, ProcessInfo | None]]) -> RowChanges:
        """The attributor's answers: conn id -> the process (None: not found)."""
        if self._coalesce > 0.0:
            return self._defer(results, answers=True)
        final: list[ConnectionRow] = []
        self._found(results, final)
        return self._result(final)

    def traffic(
        self, at: float, counters: Mapping[int, tuple[int, int]], total_up: int, total_down: int
    ) -> RowChanges:
        """The engine's byte counters (RelayEngine.traffic()), sampled at `at` (time.time()).
        Events and answers still waiting to be reduced (`coalesce`) are reduced first."""
        final: list[ConnectionRow] = []
        if self._pending:
            self._reduce_pending(final)
        self._rows.set_traffic(counters)
        self._health.apply_traffic(at, total_up, total_down)
        return self._result(final)

    def probe(self, record: ProbeRecord) -> None:
        self._health.apply_probe(record)

    # -- outputs ----------------------------------------------------------------------------

    def health(self, now: float) -> HealthSnapshot:
        self._health.set_upstreams(self._upstreams())
        return self._health.snapshot(now)

    def open_rows(self) -> list[ConnectionRow]:
        return list(self._rows.open_rows.values())

    def close(self) -> None:
        """Hand every waiting and held row to the history, then close the attributor and the
        history."""
        if self._closed:
            return
        self._closed = True
        rest: list[ConnectionRow] = []
        if self._pending:
            self._reduce_pending(rest)
        rest.extend(row for _, row in self._held.values())
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

    def _defer(self, items: Sequence[Any], *, answers: bool) -> RowChanges:
        """Keep `items` (events, or attribution answers) to reduce later, in order, with
        the ones that follow: at most `coalesce` seconds after the first, or once
        MAX_DEFERRED have gathered (then the RowChanges of all of them)."""
        pending = self._pending
        now = self._clock()
        if not pending:
            self._pending_since = now
        if pending and pending[-1][0] is answers:
            pending[-1][1].extend(items)
        else:
            pending.append((answers, list(items)))
        self._pending_count += len(items)
        if now - self._pending_since < self._coalesce and self._pending_count < MAX_DEFERRED:
            return _NO_CHANGES
        final: list[ConnectionRow] = []
        self._reduce_pending(final)
        return self._result(final)

    def _reduce_pending(self, final: list[ConnectionRow]) -> None:
        pending, self._pending = self._pending, []
        self._pending_count = 0
        for answers, items in pending:
            if answers:
                self._found(items, final)
            else:
                self._reduce(items, final)

    def _reduce(self, events: Sequence[Event], final: list[ConnectionRow]) -> None:
        """Events into the rows and the health; closed rows final now go to `final`, the
        ones whose process is still being looked up are held."""
        closed = self._rows.advance(events)
        self._health.apply(events)
        if not closed:
            return
        worded = self._worded(closed)
        self._health.apply_rows(worded)
        deadline = self._clock() + self._wait
        held = self._held
        awaiting = self._awaiting
        for row in worded:
            if row.conn_id in awaiting:
                # An id the engine used again (a new engine in the same run cannot, but
                # the monitor does not rely on it): the earlier row goes out first.
                earlier = held.pop(row.conn_id, None)
                if earlier is not None:
                    final.append(earlier[1])
                held[row.conn_id] = (deadline, row)
            else:
                final.append(row)

    def _found(
        self, results: Sequence[tuple[int, ProcessInfo | None]], final: list[ConnectionRow]
    ) -> None:
        rows = self._rows
        awaiting = self._awaiting
        for conn_id, process in results:
            awaiting.discard(conn_id)
            if rows.is_open(conn_id):
                if process is not None:
                    rows.set_process(conn_id, process)
                continue
            held = self._held.pop(conn_id, None)
            if held is not None:
                row = held[1]
                final.append(row if process is None else _amended(row, row.words, process))

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

    def _result(self, final: list[ConnectionRow]) -> RowChanges:
        """The rows' changes since the last result, with `final` (closed rows final now)
        and the held rows now due as the closed ones; those go to the history too."""
        if self._held:
            final.extend(self._due())
        if final and self._history is not None:
            self._history.submit(final)
        changes = self._rows.pending()
        if not final:
            return changes
        # The tracker's closed rows are worded, final now or held: never its own.
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


_NO_CHANGES = RowChanges()


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
        row.route,
    )
