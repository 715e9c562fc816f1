"""Typed events the engine publishes, and the tiny observer that carries them.

Must not import PySide6. Observers are called synchronously on the engine's loop thread:
they must be quick and must not block. The app's observer (controller/inbox.py) only queues
them for the controller's loop, which turns them into rows, health and words (monitor/);
ui/bridge.py carries the controller's events, not these, to Qt.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from tray_proxy.relay.records import Address, CloseReason

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EngineStopped:
    pass


@dataclass(frozen=True, slots=True)
class ConnectionOpened:
    conn_id: int
    client: Address
    original_dst: Address | None
    at: float = 0.0  # time.time() of the accept (the record's opened_at)


@dataclass(frozen=True, slots=True)
class ConnectionRouted:
    """The peek is over and the way chosen. `upstream`: the first upstream to try (None:
    DIRECT or BLOCK). `route`: the routing decision in one line (`proxy corp, backup
    (rule[2]: *.corp -> corp)`, `direct (rule[0]: .corp.example -> direct)`, `block
    (...)`); `decided_by`: "rule[N]", "pac" or "default". Both empty when the engine runs
    without a router (one upstream)."""

    conn_id: int
    host: str | None
    upstream: str | None
    route: str = ""
    decided_by: str = ""


@dataclass(frozen=True, slots=True)
class TunnelEstablished:
    conn_id: int
    upstream: str | None
    handshake_latency: float
    at: float = 0.0  # time.time() the tunnel opened (the record's established_at)


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    conn_id: int
    reason: CloseReason
    detail: str
    bytes_up: int
    bytes_down: int
    duration: float
    at: float = 0.0  # time.time() of the close (the record's closed_at)


@dataclass(frozen=True, slots=True)
class UpstreamFailed:
    """An upstream could not be used for a connection (connect, handshake or auth)."""

    upstream: str
    reason: CloseReason
    detail: str
    at: float = 0.0  # time.time() of the failure
    conn_id: int | None = None  # the connection it failed, when there was one


@dataclass(frozen=True, slots=True)
class UpstreamHealthChanged:
    """An upstream went down (its circuit breaker opened after failures before the tunnel
    was up, from real connections or probes: new connections skip it) or came back up.
    `reason`: the last failure's words when it went down, "" when it came back."""

    upstream: str
    up: bool
    reason: str = ""
    at: float = 0.0  # time.time() of the change


@dataclass(frozen=True, slots=True)
class RoutingError:
    """Routing could not work as configured (the PAC script failed: not fetched, broken,
    too slow); connections follow the default route meanwhile. Published once per new
    failure."""

    detail: str
    at: float = 0.0


@dataclass(frozen=True, slots=True)
class CredentialsRejected:
    """The proxy refused this user's credentials; the relay sends them nowhere until they
    change, or until a re-check (one attempt every `reverify_after` seconds, or at once on
    `RelayEngine.retry_credentials()`) finds them accepted. The UI asks for a new password."""

    upstream: str
    username: str


@dataclass(frozen=True, slots=True)
class CredentialsAccepted:
    """The proxy accepted credentials it had rejected before (a re-verification after the
    backoff, or the password entered again): the upstream is usable again."""

    upstream: str
    username: str


@dataclass(frozen=True, slots=True)
class ListenerError:
    """accept() failed (e.g. EMFILE); the engine keeps serving existing tunnels."""

    detail: str


Event = (
    EngineStopped
    | ConnectionOpened
    | ConnectionRouted
    | TunnelEstablished
    | ConnectionClosed
    | UpstreamFailed
    | UpstreamHealthChanged
    | RoutingError
    | CredentialsRejected
    | CredentialsAccepted
    | ListenerError
)
Observer = Callable[[Event], None]


class EventBus:
    """Synchronous fan-out of events. A failing observer is logged and never breaks the engine."""

    def __init__(self) -> None:
        self._observers: list[Observer] = []
        # Anyone listening? The engine asks several times per connection and skips building
        # per-connection events when not; an attribute kept by (un)subscribe, not a call
        # (docs/relay.md).
        self.observed = False

    def subscribe(self, observer: Observer) -> Callable[[], None]:
        self._observers.append(observer)
        self.observed = True

        def unsubscribe() -> None:
            if observer in self._observers:
                self._observers.remove(observer)
                self.observed = bool(self._observers)

        return unsubscribe

    def publish(self, event: Event) -> None:
        for observer in tuple(self._observers):
            try:
                observer(event)
            except Exception:  # an observer bug must not kill a tunnel
                log.exception("event observer %r failed on %s", observer, type(event).__name__)
