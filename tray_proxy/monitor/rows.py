"""Connections as rows the user reads: one `ConnectionRow` per relayed connection, built from
the engine's events by `RowTracker`, a pure reducer (no I/O, no clock reads: time arrives
with the events).

The same rows feed the dashboard's live tables, the SQLite history and `tray-proxy log`.
A row holds no secret: no header, no password, no URL userinfo; only what the engine's
events carry (addresses, the host name from SNI/Host, the upstream's name, counters, the
close reason and its words) and the process found for it.

Must not import PySide6, asyncio or socket.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from tray_proxy.relay.events import (
    ConnectionClosed,
    ConnectionOpened,
    ConnectionRouted,
    Event,
    TunnelEstablished,
    UpstreamFailed,
)
from tray_proxy.relay.records import Address, CloseReason


class RowState(enum.Enum):
    """Where a connection is, in the user's words."""

    OPENING = "opening"  # accepted; routing, dialing or asking the proxy
    OPEN = "open"  # the tunnel carries data
    CLOSED = "closed"  # ended normally (or by the user, or the relay stopping)
    FAILED = "failed"  # ended by a failure (close reason in FAILURE_REASONS)


# Close reasons that are failures the user may need to act on; the others are normal ends.
FAILURE_REASONS = frozenset(
    {
        CloseReason.NOT_REDIRECTED,
        CloseReason.NO_ORIGINAL_DST,
        CloseReason.NO_UPSTREAM,
        CloseReason.LOOP,
        CloseReason.CONFIG_ERROR,
        CloseReason.UPSTREAM_UNREACHABLE,
        CloseReason.UPSTREAM_TIMEOUT,
        CloseReason.UPSTREAM_REFUSED,
        CloseReason.UPSTREAM_AUTH_FAILED,
        CloseReason.UPSTREAM_PROTOCOL_ERROR,
        CloseReason.UPSTREAM_RESET,
        CloseReason.CLIENT_RESET,
        CloseReason.INTERNAL_ERROR,
    }
)


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    """The program behind a connection, as found when it was attributed."""

    pid: int | None
    name: str  # e.g. "curl"; "?" when unknown
    exe: str | None = None
    user: str | None = None
    exited: bool = False  # the process had gone before it could be looked up in full
    container: str | None = None  # container traffic: the container's name, when known
    remote: bool = False  # the connection came from another address (a container bridge)

    @property
    def label(self) -> str:
        """One short text for a table cell."""
        if self.container is not None:
            return f"container {self.container}"
        if self.remote:
            return "(from another address)"
        if self.pid is None:
            return self.name
        text = f"{self.name} ({self.pid})"
        return f"{text}, exited" if self.exited else text


@dataclass(frozen=True, slots=True)
class ConnectionRow:
    """One connection as the dashboard, the history and `tray-proxy log` show it."""

    conn_id: int  # the engine's id (unique within one run of the app)
    started: float  # time.time() of the accept
    client: Address
    original_dst: Address | None
    host: str | None = None  # from SNI / Host:, when the client sent one
    upstream: str | None = None  # the proxy's name; None before routing (or DIRECT)
    state: RowState = RowState.OPENING
    established: float | None = None  # time.time() the tunnel opened
    handshake_latency: float | None = None  # seconds, dial to tunnel open
    bytes_up: int = 0
    bytes_down: int = 0
    ended: float | None = None  # time.time() of the close
    close_reason: CloseReason | None = None
    detail: str = ""  # the engine's technical detail
    words: str = ""  # a failure in words, with what to do (monitor/words.py); "" otherwise
    process: ProcessInfo | None = None

    @property
    def duration(self) -> float | None:
        return None if self.ended is None else max(0.0, self.ended - self.started)

    @property
    def failed(self) -> bool:
        return self.state is RowState.FAILED

    @property
    def destination(self) -> str:
        """host:port as the user thinks of it (the name when known, else the IP)."""
        if self.original_dst is None:
            return "?"
        ip, port = self.original_dst
        host = self.host or (f"[{ip}]" if ":" in ip else ip)
        return f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class RowChanges:
    """What one batch of events did to the rows: each row appears at most once, in the
    newest form, under the first heading that applies (closed > opened > updated)."""

    opened: tuple[ConnectionRow, ...] = ()  # new rows still open at the end of the batch
    updated: tuple[ConnectionRow, ...] = ()  # rows already shown, changed and still open
    closed: tuple[ConnectionRow, ...] = ()  # rows that ended (possibly opened in this batch)

    def __bool__(self) -> bool:
        return bool(self.opened or self.updated or self.closed)


class RowTracker:
    """Builds rows from engine events. Pure: feed it events, read what changed.

    `apply(events)` returns the RowChanges of that batch. `open_rows` are the connections
    open now. `set_process` and `set_traffic` merge what attribution and the engine's byte
    counters found; they show up in the next batch's changes.
    """

    def __init__(self) -> None:
        self._open: dict[int, ConnectionRow] = {}
        self._dirty: dict[int, ConnectionRow] = {}  # changed since the last batch (open rows)
        self._new: set[int] = set()  # opened since the last batch
        # Process info that arrived before the row (attribution can be quick) or after the
        # close: keyed by conn id, consumed once.
        self._early_process: dict[int, ProcessInfo] = {}

    @property
    def open_rows(self) -> Mapping[int, ConnectionRow]:
        return self._open

    def apply(self, events: Iterable[Event]) -> RowChanges:
        closed: list[ConnectionRow] = []
        for event in events:
            if isinstance(event, ConnectionOpened):
                row = ConnectionRow(
                    conn_id=event.conn_id,
                    started=event.at,
                    client=event.client,
                    original_dst=event.original_dst,
                    process=self._early_process.pop(event.conn_id, None),
                )
                self._open[event.conn_id] = row
                self._new.add(event.conn_id)
                self._dirty[event.conn_id] = row
            elif isinstance(event, ConnectionRouted):
                self._update(event.conn_id, host=event.host, upstream=event.upstream)
            elif isinstance(event, TunnelEstablished):
                self._update(
                    event.conn_id,
                    upstream=event.upstream,
                    state=RowState.OPEN,
                    established=event.at,
                    handshake_latency=event.handshake_latency,
                )
            elif isinstance(event, ConnectionClosed):
                gone = self._open.pop(event.conn_id, None)
                if event.conn_id in self._dirty:
                    del self._dirty[event.conn_id]
                self._new.discard(event.conn_id)
                if gone is None:
                    continue  # opened before we listened (a restart of the observer)
                failed = event.reason in FAILURE_REASONS
                closed.append(
                    replace(
                        gone,
                        state=RowState.FAILED if failed else RowState.CLOSED,
                        bytes_up=event.bytes_up,
                        bytes_down=event.bytes_down,
                        ended=event.at,
                        close_reason=event.reason,
                        detail=event.detail,
                    )
                )
            elif isinstance(event, UpstreamFailed):
                pass  # the connection's own ConnectionClosed carries the reason and words
        return self._take(closed)

    def set_process(self, conn_id: int, process: ProcessInfo) -> None:
        """Attribution found `process` for `conn_id` (which may not be open yet)."""
        if conn_id in self._open:
            self._update(conn_id, process=process)
        else:
            self._early_process[conn_id] = process
            if len(self._early_process) > 10_000:  # ids that never opened: forget the oldest
                for key in list(self._early_process)[:5_000]:
                    del self._early_process[key]

    def set_traffic(self, counters: Mapping[int, tuple[int, int]]) -> None:
        """The engine's byte counters of open connections: conn id -> (up, down)."""
        for conn_id, (up, down) in counters.items():
            row = self._open.get(conn_id)
            if row is not None and (row.bytes_up != up or row.bytes_down != down):
                self._update(conn_id, bytes_up=up, bytes_down=down)

    def pending(self) -> RowChanges:
        """Changes merged since the last batch (set_process / set_traffic), as a batch."""
        return self._take([])

    def _update(self, conn_id: int, **changes: object) -> None:
        row = self._open.get(conn_id)
        if row is None:
            return
        row = replace(row, **changes)  # type: ignore[arg-type]
        self._open[conn_id] = row
        self._dirty[conn_id] = row

    def _take(self, closed: list[ConnectionRow]) -> RowChanges:
        opened = tuple(row for cid, row in self._dirty.items() if cid in self._new)
        updated = tuple(row for cid, row in self._dirty.items() if cid not in self._new)
        self._dirty.clear()
        self._new.clear()
        if not (opened or updated or closed):
            return _NO_CHANGES
        return RowChanges(opened, updated, tuple(closed))


_NO_CHANGES = RowChanges()


def is_failure(reason: CloseReason | None) -> bool:
    return reason in FAILURE_REASONS
