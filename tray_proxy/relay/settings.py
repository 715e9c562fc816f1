"""What the engine needs to know, as plain validated data (the TOML parsing lives in config.py).

Must not import PySide6.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

EarlyDataMode = Literal["auto", "on", "off"]


class UpstreamKind(enum.Enum):
    HTTP = "http"
    SOCKS5 = "socks5"


class AuthScheme(enum.Enum):
    """How the relay authenticates to an HTTP upstream.

    AUTO answers the strongest scheme the proxy offers (Negotiate > NTLM > Digest > Basic);
    the others pin one scheme.
    """

    AUTO = "auto"
    BASIC = "basic"
    DIGEST = "digest"
    NTLM = "ntlm"
    NEGOTIATE = "negotiate"


@dataclass(frozen=True, slots=True)
class UpstreamProxy:
    """One corporate proxy the relay can tunnel through."""

    name: str
    kind: UpstreamKind
    host: str
    port: int
    username: str | None = None
    auth: AuthScheme = AuthScheme.AUTO

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.kind.value}://{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.name} ({self.url})"


@dataclass(frozen=True, slots=True)
class RelaySettings:
    """Listener, timeouts and limits of the engine."""

    port: int = 12080
    listen: tuple[str, ...] = ("127.0.0.1", "::1")
    redirect_ports: tuple[int, ...] = (80, 443)
    upstream: str | None = None  # name of the upstream to use; None: the first one
    connect_timeout: float = 10.0
    handshake_timeout: float = 10.0
    idle_timeout: float = 600.0
    peek_timeout: float = 1.0
    peek_max_bytes: int = 16384
    # The relay's own outbound sockets bind to a source port in this range, so the
    # redirect can exclude them without any privilege in the relay (ARCHITECTURE.md,
    # "Loops and exposure"). It lies above the default ip_local_port_range.
    source_ports: tuple[int, int] | None = (61000, 64999)
    drain_timeout: float = 5.0
    # After the proxy rejected credentials, how long before one connection tries the same
    # ones again (issue 16 item 7): far below common lock-out policies' counting windows.
    reverify_after: float = 600.0
    # Connections to the proxy opened ahead of need (relay/spares.py): how many at most (a
    # burst of connections gets up to this many, one at a time 2), and for how long at most.
    # 0 opens none.
    spare_connections: int = 16
    spare_max_age: float = 10.0
    # The fast path writes the client's first bytes (the TLS ClientHello) right behind its
    # CONNECT, in one write, instead of after the proxy's 200: one round trip less per new
    # connection (docs/benchmarks.md, "Round trip to the proxy"). Only for credentials the
    # proxy took with Basic, or none; any answer but a 2xx redoes the opening without them.
    # A proxy that drops bytes sent before its answer (a naive one reads the CONNECT with
    # one recv and throws the rest away) would hang every HTTPS connection through it, so
    # "auto" sends only a TLS handshake, and holds each tunnel through a proxy until one
    # server's answer has proven that it keeps them (relay/opening.py, EarlyDataTrust;
    # docs/relay.md, "Early data"). "on": any first bytes, unchecked. "off": never.
    early_data: EarlyDataMode = "auto"
