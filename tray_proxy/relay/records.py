"""Connections as data: one ConnectionRecord per accepted connection, and why it closed.

Must not import PySide6. The UI reads these; it never computes state of its own.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

Address = tuple[str, int]


class ConnState(enum.Enum):
    ACCEPTED = "accepted"
    PEEKING = "peeking"
    CONNECTING = "connecting"
    HANDSHAKING = "handshaking"
    OPEN = "open"
    CLOSED = "closed"


class CloseReason(enum.Enum):
    """Why a connection ended: exactly one per connection."""

    # Members are singletons compared by identity: hash them by identity too, in C, not
    # through Enum's Python __hash__ (docs/relay.md, "CloseReason hashed in C").
    __hash__ = object.__hash__

    DONE = "done"  # both sides finished normally
    NOT_REDIRECTED = "not-redirected"  # someone connected to the relay port directly
    NO_ORIGINAL_DST = "no-original-destination"
    NO_UPSTREAM = "no-upstream"
    LOOP = "loop"  # the redirect caught the relay's own connection to an upstream
    CONFIG_ERROR = (
        "config-error"  # the settings cannot be used (e.g. a username Basic cannot carry)
    )
    UPSTREAM_UNREACHABLE = "upstream-unreachable"  # TCP connect to the proxy failed
    UPSTREAM_TIMEOUT = "upstream-timeout"  # TCP connect or handshake took too long
    UPSTREAM_REFUSED = "upstream-refused"  # the proxy answered the CONNECT with an error
    UPSTREAM_AUTH_FAILED = "upstream-auth-failed"  # 407, or SOCKS5 auth rejected
    UPSTREAM_PROTOCOL_ERROR = "upstream-protocol-error"  # the proxy's answer made no sense
    UPSTREAM_RESET = "upstream-reset"  # the upstream side failed mid-tunnel
    CLIENT_RESET = "client-reset"  # the client side failed mid-tunnel
    IDLE_TIMEOUT = "idle-timeout"
    SHUTDOWN = "shutdown"  # the relay stopped
    CLOSED_BY_USER = "closed-by-user"  # the user closed it (dashboard, Close selected)
    BLOCKED = "blocked"  # a BLOCK rule (or the PAC script) matched: reset at once
    INTERNAL_ERROR = "internal-error"


_ids = iter(range(1, 1 << 62))
# The engine's accept path calls this without a Python frame around it.
next_connection_id = _ids.__next__


@dataclass(slots=True, eq=False)
class ConnectionRecord:
    """One relayed connection, from accept to close. Mutated only by the engine's loop."""

    id: int
    client: Address
    original_dst: Address | None = None
    host: str | None = None  # from SNI or Host:, validated
    upstream: str | None = None  # upstream name, or None before routing
    state: ConnState = ConnState.ACCEPTED
    opened_at: float = field(default_factory=time.time)
    established_at: float | None = None
    closed_at: float | None = None
    handshake_latency: float | None = None  # seconds from dialing the upstream to tunnel open
    bytes_up: int = 0  # client -> upstream
    bytes_down: int = 0  # upstream -> client
    close_reason: CloseReason | None = None
    close_detail: str = ""
    # The routing decision (routing.router.Decision.text, e.g. "proxy corp, backup
    # (rule[2]: *.corp -> corp)") and what made it ("rule[2]", "pac", "default"); empty
    # when the engine routes without a router (one upstream, no failover).
    route: str = ""
    decided_by: str = ""

    @property
    def destination(self) -> str:
        """host:port as the user thinks of it (the name when known, else the IP)."""
        if self.original_dst is None:
            return "?"
        ip, port = self.original_dst
        host = self.host or (f"[{ip}]" if ":" in ip else ip)
        return f"{host}:{port}"
