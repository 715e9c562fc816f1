"""The HTTP CONNECT handshake with an upstream proxy (RFC 9110 section 9.3.6), sans-IO.

h11 writes the request and parses the answer: it caps the head it buffers, skips nothing it
should not, and hands back the bytes that arrived after a 2xx head (they belong to the tunnel).

Must not import asyncio, socket, selectors, ssl or PySide6.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence

import h11

from .errors import HandshakeRefused, ProtocolError, UsageError, peer_excerpt

__all__ = ["ConnectHandshake", "format_authority"]

# A real proxy answers a CONNECT with a handful of headers; thousands mean a broken or hostile
# peer, and each one costs memory in the HandshakeRefused we hand to the UI.
MAX_RESPONSE_HEADERS = 256

# RFC 9110 section 5.6.2: header names are tokens.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Printable ASCII, space and tab: what h11 sends without complaint (bytes >= 0x80 are obs-text).
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e]*")
# Characters that would make the proxy read the authority as something else (RFC 3986 3.2).
_URI_DELIMITERS = frozenset("/?#@[]\\")
# We write these ourselves, or h11 would read them as a request body it must send.
_RESERVED_HEADERS = frozenset({"host", "content-length", "transfer-encoding"})


def format_authority(host: str, port: int) -> str:
    """``host:port`` as the CONNECT request target, IPv6 literals in brackets (RFC 3986 3.2.2)."""
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def _check_host(host: str) -> None:
    if not host:
        raise UsageError("CONNECT host is empty")
    if not host.isascii() or any(ord(c) <= 0x20 or ord(c) == 0x7F for c in host):
        raise UsageError(
            f"CONNECT host {peer_excerpt(host)} must be printable ASCII (IDNA-encode names first)"
        )
    bracketed = host.startswith("[") and host.endswith("]")
    bare = host[1:-1] if bracketed else host
    if bracketed or ":" in bare:
        try:
            ipaddress.IPv6Address(bare)
        except ValueError:
            raise UsageError(f"CONNECT host {peer_excerpt(host)} is not an IPv6 address") from None
    elif any(c in _URI_DELIMITERS for c in bare):
        raise UsageError(f"CONNECT host {peer_excerpt(host)} is not a host name")


def _check_headers(headers: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    checked = []
    for name, value in headers:
        # Messages name the header, never its value: it may be Proxy-Authorization.
        if not _TOKEN.fullmatch(name):
            raise UsageError(f"invalid header name {peer_excerpt(name)}")
        if name.lower() in _RESERVED_HEADERS:
            raise UsageError(f"header {name} is written by the CONNECT handshake itself")
        if not _FIELD_VALUE.fullmatch(value):
            raise UsageError(f"the value of header {name} holds a control or non-ASCII character")
        checked.append((name, value.strip(" \t")))
    return checked


class ConnectHandshake:
    """Client side of ``CONNECT host:port``: any 2xx opens the tunnel, anything else refuses.

    The request is queued on construction. ``max_head`` caps the response head(s), 1xx
    interim responses included, so a proxy cannot make us buffer without end.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        headers: Sequence[tuple[str, str]] = (),
        max_head: int = 16384,
    ) -> None:
        _check_host(host)
        if not 1 <= port <= 65535:
            raise UsageError(f"CONNECT port {port} is outside 1-65535")
        extra = _check_headers(headers)
        self.authority = format_authority(host, port)
        self._max_head = max_head
        self._conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_head)
        request = h11.Request(
            method="CONNECT",
            target=self.authority,
            headers=[("Host", self.authority), *extra],
        )
        try:
            self._outgoing = self._conn.send(request) + self._conn.send(h11.EndOfMessage())
        except h11.LocalProtocolError:  # pragma: no cover - defence in depth, see below
            # Unreachable: _check_host and _check_headers are stricter than h11. If h11 ever
            # disagrees, its message quotes the offending value, which may be the proxy
            # password, so it must not escape.
            raise UsageError("h11 refused the CONNECT request") from None
        self._received = 0
        self._done = False
        self._failed = False
        self._trailing = b""

    def __repr__(self) -> str:
        state = "done" if self._done else "failed" if self._failed else "waiting"
        return f"<ConnectHandshake {self.authority} {state}>"

    @property
    def done(self) -> bool:
        return self._done

    @property
    def trailing(self) -> bytes:
        return self._trailing

    def data_to_send(self) -> bytes:
        out, self._outgoing = self._outgoing, b""
        return out

    def receive_data(self, data: bytes) -> None:
        if self._done or self._failed:
            raise UsageError("receive_data() called after the CONNECT handshake ended")
        if not data:
            self._failed = True
            if self._received:
                raise ProtocolError(
                    f"proxy closed the connection in the middle of its answer to CONNECT "
                    f"{self.authority} (after {self._received} bytes)"
                )
            raise ProtocolError(
                f"proxy closed the connection without answering CONNECT {self.authority}"
            )
        self._received += len(data)
        self._conn.receive_data(data)
        try:
            self._process_events()
        except (ProtocolError, HandshakeRefused):
            self._failed = True
            raise

    def _process_events(self) -> None:
        while True:
            try:
                event = self._conn.next_event()
            except h11.RemoteProtocolError as exc:
                if exc.error_status_hint == 431:
                    raise self._too_big() from None
                # h11 quotes the offending line; peer_excerpt keeps that quote short.
                raise ProtocolError(
                    f"proxy sent an invalid HTTP response to CONNECT {self.authority}: "
                    f"{peer_excerpt(str(exc), 120)}"
                ) from None
            if event is h11.NEED_DATA:
                return
            # Before the final response h11 yields only heads: 1xx interim ones, then the final
            # one. It gives no other event while its state is SEND_RESPONSE, and we return
            # after the final head.
            assert isinstance(event, (h11.InformationalResponse, h11.Response))
            head_bytes = self._received - len(self._conn.trailing_data[0])
            if head_bytes > self._max_head:
                raise self._too_big()
            if len(event.headers) > MAX_RESPONSE_HEADERS:
                raise ProtocolError(
                    f"proxy answered CONNECT {self.authority} with {len(event.headers)} "
                    f"headers (limit {MAX_RESPONSE_HEADERS})"
                )
            if isinstance(event, h11.InformationalResponse):
                # RFC 9110 section 15.2: interim answers precede the real one; skip them.
                continue
            if 200 <= event.status_code < 300:
                # h11 ignores Content-Length and Transfer-Encoding on a 2xx to CONNECT
                # (RFC 9110 section 9.3.6): every byte after the head is tunnel data.
                self._trailing = self._conn.trailing_data[0]
                self._done = True
                return
            raise HandshakeRefused(
                event.status_code,
                event.reason.decode("latin-1"),
                auth_failed=event.status_code == 407,
                headers=[(n.decode("latin-1"), v.decode("latin-1")) for n, v in event.headers],
            )

    def _too_big(self) -> ProtocolError:
        return ProtocolError(
            f"proxy's answer to CONNECT {self.authority} has a head larger than "
            f"{self._max_head} bytes"
        )
