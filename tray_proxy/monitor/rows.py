"""Connections as rows the user reads: one `ConnectionRow` per relayed connection, built from
the engine's events by `RowTracker`, a pure reducer (no I/O, no clock reads: time arrives
with the events).

The same rows feed the dashboard's live tables, the SQLite history and `tray-proxy log`.
A row holds no secret: no header, no password, no URL userinfo; only what the engine's
events carry (addresses, the host name from SNI/Host, the upstream's name, the routing
decision in one line, counters, the close reason and its words) and the process found for it.

Must not import PySide6, asyncio or socket.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from tray_proxy.relay.events import (
    ConnectionClosed,
    ConnectionOpened,
    ConnectionRouted,
    Event,
    TunnelEstablished,
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
        # Deliberate, but from the program's side its connection failed: the user looking for
        # why a tool cannot reach a host must find it among the failures, with the rule.
        CloseReason.BLOCKED,
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
    # The routing decision and what made it (`proxy corp, backup (rule[2]: *.corp -> corp)`,
    # `direct (default)`, `block (rule[0]: ...)`); "" without a router or before routing.
    # Last, so that positional construction (the Monitor's, the history's) stays valid.
    route: str = ""

    @property
    def route_action(self) -> str:
        """The decision's first word: "proxy", "direct", "block" (or "" without one).
        ("direct: proxy unreachable (default)" is "direct" too.)"""
        return self.route.split(" ", 1)[0].rstrip(":")

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


class _Draft:
    """An open connection's row while the tracker builds it: mutable, so an event costs an
    attribute write, not a copy of a frozen row (four events per connection at 1,000
    connections a second). `row()` makes the frozen ConnectionRow, once per change."""

    __slots__ = (
        "conn_id",
        "started",
        "client",
        "original_dst",
        "host",
        "upstream",
        "route",
        "state",
        "established",
        "handshake_latency",
        "bytes_up",
        "bytes_down",
        "process",
        "_row",
    )

    def __init__(self, event: ConnectionOpened, process: ProcessInfo | None) -> None:
        self.conn_id = event.conn_id
        self.started = event.at
        self.client = event.client
        self.original_dst = event.original_dst
        self.host: str | None = None
        self.upstream: str | None = None
        self.route = ""
        self.state = RowState.OPENING
        self.established: float | None = None
        self.handshake_latency: float | None = None
        self.bytes_up = 0
        self.bytes_down = 0
        self.process = process
        self._row: ConnectionRow | None = None  # the frozen form, until the next change

    def row(self) -> ConnectionRow:
        row = self._row
        if row is None:
            row = self._row = ConnectionRow(
                self.conn_id,
                self.started,
                self.client,
                self.original_dst,
                self.host,
                self.upstream,
                self.state,
                self.established,
                self.handshake_latency,
                self.bytes_up,
                self.bytes_down,
                process=self.process,
                route=self.route,
            )
        return row

    def closed(self, event: ConnectionClosed) -> ConnectionRow:
        failed = event.reason in FAILURE_REASONS
        return ConnectionRow(
            self.conn_id,
            self.started,
            self.client,
            self.original_dst,
            self.host,
            self.upstream,
            RowState.FAILED if failed else RowState.CLOSED,
            self.established,
            self.handshake_latency,
            event.bytes_up,
            event.bytes_down,
            event.at,
            event.reason,
            event.detail,
            "",
            self.process,
            self.route,
        )


class RowTracker:
    """Builds rows from engine events. Pure: feed it events, read what changed.

    `apply(events)` returns the RowChanges of that batch. `open_rows` are the connections
    open now. `set_process` and `set_traffic` merge what attribution and the engine's byte
    counters found; they show up in the next batch's changes.
    """

    def __init__(self) -> None:
        self._open: dict[int, _Draft] = {}
        self._dirty: dict[int, _Draft] = {}  # changed since the last batch (open rows)
        self._new: set[int] = set()  # opened since the last batch
        # Process info that arrived before the row (attribution can be quick) or after the
        # close: keyed by conn id, consumed once.
        self._early_process: dict[int, ProcessInfo] = {}

    @property
    def open_rows(self) -> Mapping[int, ConnectionRow]:
        """The open connections' rows now (a new mapping each time: for seeding a view)."""
        return {conn_id: draft.row() for conn_id, draft in self._open.items()}

    def is_open(self, conn_id: int) -> bool:
        return conn_id in self._open

    def apply(self, events: Iterable[Event]) -> RowChanges:
        return self._take(self.advance(events))

    def advance(self, events: Iterable[Event]) -> list[ConnectionRow]:
        """`apply` without taking the changes: the rows `events` closed; the opened and
        updated ones wait for the next `apply` or `pending` (the Monitor reduces several
        batches, and attribution answers between them, into one RowChanges)."""
        closed: list[ConnectionRow] = []
        opened_ = self._open
        dirty = self._dirty
        for event in events:
            if isinstance(event, ConnectionOpened):
                draft = _Draft(event, self._early_process.pop(event.conn_id, None))
                opened_[event.conn_id] = draft
                self._new.add(event.conn_id)
                dirty[event.conn_id] = draft
            elif isinstance(event, ConnectionRouted):
                draft_or_none = opened_.get(event.conn_id)
                if draft_or_none is not None:
                    draft_or_none.host = event.host
                    draft_or_none.upstream = event.upstream
                    draft_or_none.route = event.route
                    draft_or_none._row = None
                    dirty[event.conn_id] = draft_or_none
            elif isinstance(event, TunnelEstablished):
                draft_or_none = opened_.get(event.conn_id)
                if draft_or_none is not None:
                    draft_or_none.upstream = event.upstream
                    draft_or_none.state = RowState.OPEN
                    draft_or_none.established = event.at
                    draft_or_none.handshake_latency = event.handshake_latency
                    draft_or_none._row = None
                    dirty[event.conn_id] = draft_or_none
            elif isinstance(event, ConnectionClosed):
                gone = opened_.pop(event.conn_id, None)
                dirty.pop(event.conn_id, None)
                self._new.discard(event.conn_id)
                if gone is None:
                    continue  # opened before we listened (a restart of the observer)
                closed.append(gone.closed(event))
            # UpstreamFailed: the connection's own ConnectionClosed carries reason and detail.
        return closed

    def set_process(self, conn_id: int, process: ProcessInfo) -> None:
        """Attribution found `process` for `conn_id` (which may not be open yet)."""
        draft = self._open.get(conn_id)
        if draft is not None:
            draft.process = process
            draft._row = None
            self._dirty[conn_id] = draft
        else:
            self._early_process[conn_id] = process
            if len(self._early_process) > 10_000:  # ids that never opened: forget the oldest
                for key in list(self._early_process)[:5_000]:
                    del self._early_process[key]

    def set_traffic(self, counters: Mapping[int, tuple[int, int]]) -> None:
        """The engine's byte counters of open connections: conn id -> (up, down)."""
        for conn_id, (up, down) in counters.items():
            draft = self._open.get(conn_id)
            if draft is not None and (draft.bytes_up != up or draft.bytes_down != down):
                draft.bytes_up = up
                draft.bytes_down = down
                draft._row = None
                self._dirty[conn_id] = draft

    def pending(self) -> RowChanges:
        """Changes merged since the last batch (set_process / set_traffic), as a batch."""
        return self._take([])

    def _take(self, closed: list[ConnectionRow]) -> RowChanges:
        if not self._dirty:
            return RowChanges((), (), tuple(closed)) if closed else _NO_CHANGES
        new = self._new
        opened = tuple(d.row() for cid, d in self._dirty.items() if cid in new)
        updated = tuple(d.row() for cid, d in self._dirty.items() if cid not in new)
        self._dirty.clear()
        new.clear()
        return RowChanges(opened, updated, tuple(closed))


_NO_CHANGES = RowChanges()
