"""What the controller tells its observers: the state machine's states, the `Status`
snapshot the user sees, and the events (StateChanged, StatusUpdated, Notice,
ConnectionsChanged).

Pure data: frozen dataclasses and enums. Observers (the UI bridge, the control socket,
`tray-proxy status`) only read these; they never compute state of their own.

Must not import PySide6, qasync, asyncio or the relay engine.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from tray_proxy.monitor.health import HealthSnapshot
from tray_proxy.monitor.rows import RowChanges
from tray_proxy.relay.records import Address

__all__ = [
    "ALLOWED",
    "ConnectionsChanged",
    "ControllerEvent",
    "ControllerObserver",
    "ErrorEntry",
    "Notice",
    "NoticeKind",
    "State",
    "StateChanged",
    "Status",
    "StatusUpdated",
    "UpstreamInfo",
]


class State(enum.Enum):
    OFF = "off"
    ENABLING = "enabling"
    ON = "on"
    DEGRADED = "degraded"
    ERROR = "error"
    DISABLING = "disabling"

    @property
    def label(self) -> str:
        return _LABELS[self]

    @property
    def redirecting(self) -> bool:
        """Is traffic being redirected to the relay in this state?"""
        return self in (State.ON, State.DEGRADED)


_LABELS = {
    State.OFF: "Off",
    State.ENABLING: "Switching on",
    State.ON: "On",
    State.DEGRADED: "Degraded",
    State.ERROR: "Error",
    State.DISABLING: "Switching off",
}

# Which transitions exist. Anything else is a bug in this module, not a user error.
ALLOWED: Mapping[State, frozenset[State]] = {
    State.OFF: frozenset({State.ENABLING}),
    State.ENABLING: frozenset({State.ON, State.ERROR, State.DISABLING}),
    State.ON: frozenset({State.DEGRADED, State.ERROR, State.DISABLING, State.ENABLING}),
    State.DEGRADED: frozenset({State.ON, State.ERROR, State.DISABLING, State.ENABLING}),
    State.ERROR: frozenset({State.ENABLING, State.DISABLING}),
    State.DISABLING: frozenset({State.OFF}),
}


class NoticeKind(enum.Enum):
    CREDENTIALS_REJECTED = "credentials-rejected"
    UPSTREAM_DOWN = "upstream-down"
    UPSTREAM_BACK = "upstream-back"
    HELPER_REFUSED = "helper-refused"
    HELPER_STOPPED = "helper-stopped"
    TEST_RESULT = "test-result"
    KEYRING_UNAVAILABLE = "keyring-unavailable"
    HISTORY_FAILED = "history-failed"
    SETTINGS_INVALID = "settings-invalid"
    # Left or rejoined the corporate network: new connections go direct / through the proxy.
    OFF_NETWORK = "off-network"
    ON_NETWORK = "on-network"
    SETTINGS_RELOADED = "settings-reloaded"
    # The PAC script could not be used (not fetched, broken, too slow): the rules decide.
    ROUTING_FAILED = "routing-failed"


@dataclass(frozen=True, slots=True)
class UpstreamInfo:
    name: str
    url: str
    active: bool
    latency: float | None  # latest handshake latency in seconds, from the engine
    failing: bool


@dataclass(frozen=True, slots=True)
class ErrorEntry:
    at: float  # time.time() of the latest occurrence
    text: str
    count: int = 1  # the same text in a row is one entry, so one flapping cause fills no list

    @property
    def display(self) -> str:
        return self.text if self.count == 1 else f"{self.text} ({self.count} times)"


@dataclass(frozen=True, slots=True)
class Status:
    """What the user sees, as one immutable snapshot."""

    state: State = State.OFF
    message: str = "The redirect is off."
    upstream: str | None = None
    upstreams: tuple[UpstreamInfo, ...] = ()
    active_connections: int = 0
    total_connections: int = 0
    last_errors: tuple[ErrorEntry, ...] = ()
    relay_addresses: tuple[Address, ...] = ()
    # Whose traffic the redirect captures, in the root helper's words ("uid 1000 (alice) and
    # system accounts (uid < 1000)"); None while the redirect is not on (issue 16 item 1).
    captured: str | None = None
    # "direct: proxy unreachable" while no upstream is reachable and new connections go
    # direct (issue 15 section 5); None while they go through the proxy.
    routing: str | None = None
    # Per-upstream latency and failures, traffic rates, failures of the last hour in words.
    health: HealthSnapshot = field(default_factory=HealthSnapshot)

    @property
    def last_error(self) -> str | None:
        return self.last_errors[-1].text if self.last_errors else None

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form (the control socket and `tray-proxy status --json`)."""
        return {
            "state": self.state.value,
            "message": self.message,
            "upstream": self.upstream,
            "upstreams": [
                {
                    "name": u.name,
                    "url": u.url,
                    "active": u.active,
                    "latency_ms": None if u.latency is None else round(u.latency * 1000, 1),
                    "failing": u.failing,
                }
                for u in self.upstreams
            ],
            "active_connections": self.active_connections,
            "total_connections": self.total_connections,
            "last_errors": [
                {"at": e.at, "text": e.text, "count": e.count} for e in self.last_errors
            ],
            "relay_addresses": [list(a) for a in self.relay_addresses],
            "captured": self.captured,
            "routing": self.routing,
        }


@dataclass(frozen=True, slots=True)
class StateChanged:
    old: State
    new: State
    message: str


@dataclass(frozen=True, slots=True)
class StatusUpdated:
    status: Status


@dataclass(frozen=True, slots=True)
class Notice:
    kind: NoticeKind
    title: str
    text: str


@dataclass(frozen=True, slots=True)
class ConnectionsChanged:
    """Connection rows that opened, changed or closed (the dashboard's live tables)."""

    changes: RowChanges


ControllerEvent = StateChanged | StatusUpdated | Notice | ConnectionsChanged
ControllerObserver = Callable[[ControllerEvent], None]
