"""Why an upstream could not give a tunnel: `UpstreamError`, and the sentences shared by every
path that opens one (the fast path in relay/opening.py, the coroutine path in
relay/upstream.py, forwarding in relay/forward.py), each written here once.

The words go to the connection's record and log line (monitor/words.py turns them into the
dashboard's sentences by their phrases, so change them together). They never carry a secret:
only the upstream's name and URL, addresses, times and the proxy's own short reason phrase.

Must not import PySide6, asyncio or socket.
"""

from __future__ import annotations

from tray_proxy.relay.protocol.errors import HandshakeRefused, ProtocolError, peer_excerpt
from tray_proxy.relay.protocol.http_connect import format_authority
from tray_proxy.relay.records import Address, CloseReason
from tray_proxy.relay.settings import UpstreamProxy

__all__ = [
    "UpstreamError",
    "bad_answer",
    "connect_timeout",
    "dropped",
    "first_bytes_lost",
    "handshake_timeout",
    "refusal_words",
    "refused",
]


class UpstreamError(Exception):
    """This upstream could not give us a tunnel. `reason` is what the connection record keeps.

    `status`: the proxy's HTTP status or SOCKS5 reply code when it refused; `errno`: the
    socket error when it could not be reached; `rejected`: the proxy refused our credentials.
    """

    def __init__(
        self,
        reason: CloseReason,
        detail: str,
        *,
        status: int | None = None,
        errno: int | None = None,
        refusal: str = "",
        rejected: bool = False,
    ) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.status = status
        self.errno = errno
        self.refusal = refusal  # the proxy's own words for a refusal (reason phrase)
        self.rejected = rejected


def refusal_words(exc: HandshakeRefused) -> str:
    """The proxy's reason phrase, plus Squid's error name when it sent one."""
    squid = next((v for n, v in exc.headers if n.lower() == "x-squid-error"), "")
    words = exc.reason
    if squid:
        words = f"{words}: {peer_excerpt(squid, 60).strip(chr(39))}" if words else squid
    return words


def connect_timeout(address: Address, timeout: float) -> UpstreamError:
    return UpstreamError(
        CloseReason.UPSTREAM_TIMEOUT,
        f"connecting to {format_authority(*address)} took over {timeout:g}s",
    )


def handshake_timeout(upstream: UpstreamProxy, timeout: float) -> UpstreamError:
    return UpstreamError(
        CloseReason.UPSTREAM_TIMEOUT,
        f"proxy {upstream} did not complete the handshake within {timeout:g}s",
    )


def refused(upstream: UpstreamProxy, exc: HandshakeRefused) -> UpstreamError:
    """The proxy said no to the CONNECT (403, 502, ...): its status and reason phrase."""
    return UpstreamError(
        CloseReason.UPSTREAM_REFUSED,
        f"proxy {upstream}: {exc}",
        status=exc.status,
        refusal=refusal_words(exc),
    )


def bad_answer(upstream: UpstreamProxy, exc: ProtocolError) -> UpstreamError:
    return UpstreamError(
        CloseReason.UPSTREAM_PROTOCOL_ERROR, f"proxy {upstream} sent a bad answer: {exc}"
    )


def dropped(upstream: UpstreamProxy, exc: OSError) -> UpstreamError:
    return UpstreamError(
        CloseReason.UPSTREAM_RESET,
        f"proxy {upstream} dropped the connection: {exc.strerror or exc}",
    )


def first_bytes_lost(exc: OSError) -> UpstreamError:
    """The tunnel opened, but the client's first bytes could not be written into it."""
    return UpstreamError(
        CloseReason.UPSTREAM_RESET,
        f"upstream side: {exc.strerror or exc} while forwarding the first bytes",
    )
