"""The HTTP CONNECT handshake with an upstream proxy (RFC 9110 section 9.3.6), sans-IO.

h11 parses the answer: it caps the head it buffers, skips nothing it should not, and hands back
the bytes that arrived after a 2xx head (they belong to the tunnel). The common answer, a plain
2xx head in one segment, is recognised without h11 (a per-connection cost on the relay's hot
path); anything else goes to h11 exactly as it arrived. The request bytes are written here: they
are the bytes h11 writes for the same request (tests compare the two).

Must not import asyncio, socket, selectors, ssl or PySide6.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence

import h11

from .errors import HandshakeRefused, ProtocolError, UsageError, peer_excerpt

__all__ = [
    "ConnectHandshake",
    "ProxyAuthRequired",
    "connect_request",
    "format_authority",
    "plain_2xx_end",
]

# A real proxy answers a CONNECT with a handful of headers; thousands mean a broken or hostile
# peer, and each one costs memory in the HandshakeRefused we hand to the UI.
MAX_RESPONSE_HEADERS = 256

# RFC 9110 section 5.6.2: header names are tokens.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Printable ASCII, space and tab: what h11 sends without complaint (bytes >= 0x80 are obs-text).
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e]*")
_CONTROL_OR_SPACE = re.compile(r"[\x00-\x20\x7f]")
# Characters that would make the proxy read the authority as something else (RFC 3986 3.2).
_URI_DELIMITERS = frozenset("/?#@[]\\")
# We write these ourselves, or h11 would read them as a request body it must send.
_RESERVED_HEADERS = frozenset({"host", "content-length", "transfer-encoding"})

# A 2xx head that h11 accepts as is, with nothing it would look at twice: HTTP/1.0 or 1.1,
# printable ASCII only (no obs-text), no folded lines, CRLF line ends. Whatever does not match
# (interim 1xx, refusals, odd bytes, a head split over segments) is h11's to judge.
_PLAIN_2XX_HEAD = re.compile(
    rb"HTTP/1\.[01] 2[0-9][0-9] [\t\x20-\x7e]*\r\n"
    rb"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t\x20-\x7e]*\r\n)*"
    rb"\r\n"
)
# h11 checks these even on a 2xx to CONNECT (and may refuse their values): leave them to it.
_FRAMING_HEADER = re.compile(rb"\r\n(?:content-length|transfer-encoding):", re.IGNORECASE)


class ProxyAuthRequired(HandshakeRefused):
    """A 407. ``reusable``: its body was read to the end and the proxy keeps the connection,
    so the next CONNECT (the next authentication leg) may go on the same socket."""

    def __init__(
        self, reason: str, *, headers: Sequence[tuple[str, str]], reusable: bool = False
    ) -> None:
        super().__init__(407, reason, auth_failed=True, headers=headers)
        self.reusable = reusable


def _keeps_connection(event: h11.Response) -> bool:
    """Can the 407's body be read to its end and the connection used again?

    Not for HTTP/1.0, ``Connection: close``, or a body that ends only when the connection
    does (no Content-Length and no chunked encoding, RFC 9112 section 6.3).
    """
    if event.http_version != b"1.1":
        return False
    framed = False
    for name, value in event.headers:
        if name == b"connection" and b"close" in [t.strip() for t in value.lower().split(b",")]:
            return False
        framed = framed or name in (b"content-length", b"transfer-encoding")
    return framed


def format_authority(host: str, port: int) -> str:
    """``host:port`` as the CONNECT request target, IPv6 literals in brackets (RFC 3986 3.2.2)."""
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def _check_host(host: str) -> None:
    if not host:
        raise UsageError("CONNECT host is empty")
    if not host.isascii() or _CONTROL_OR_SPACE.search(host):
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


def _request_bytes(authority: str, headers: Sequence[tuple[str, str]]) -> bytes:
    """What h11 writes for this CONNECT (Host first; names as given): checked values only."""
    lines = [f"CONNECT {authority} HTTP/1.1\r\n"]
    lines.extend(f"{name}: {value}\r\n" for name, value in headers)
    lines.append("\r\n")
    return "".join(lines).encode("ascii")


def _send_request(conn: h11.Connection, authority: str, headers: list[tuple[str, str]]) -> bytes:
    request = h11.Request(method="CONNECT", target=authority, headers=headers)
    try:
        return conn.send(request) + conn.send(h11.EndOfMessage())
    except h11.LocalProtocolError:  # pragma: no cover - defence in depth, see below
        # Unreachable: _check_host and _check_headers are stricter than h11. If h11 ever
        # disagrees, its message quotes the offending value, which may be the proxy
        # password, so it must not escape.
        raise UsageError("h11 refused the CONNECT request") from None


def connect_request(host: str, port: int, headers: Sequence[tuple[str, str]] = ()) -> bytes:
    """The bytes of ``CONNECT host:port`` with `headers` (after Host), checked as
    ``ConnectHandshake`` checks them; raises ``UsageError``. The same bytes it sends."""
    authority, request_headers = _checked_request(host, port, headers)
    return _request_bytes(authority, request_headers)


def _checked_request(
    host: str, port: int, headers: Sequence[tuple[str, str]]
) -> tuple[str, list[tuple[str, str]]]:
    """The authority and the request's headers (Host first), or UsageError."""
    _check_host(host)
    if not 1 <= port <= 65535:
        raise UsageError(f"CONNECT port {port} is outside 1-65535")
    authority = format_authority(host, port)
    return authority, [("Host", authority), *_check_headers(headers)]


# Answers seen whole (nothing after the head) and where they end: a proxy sends the same
# few bytes to every CONNECT, and a dict lookup is cheaper than the regexes on the path of
# every new connection.
_WHOLE_2XX: dict[bytes, int] = {}
_WHOLE_2XX_KEPT = 16


def plain_2xx_end(data: bytes, max_head: int = 16384) -> int | None:
    """Where a whole plain 2xx head that opens `data` ends, when h11 would take it as is;
    else None (h11's to judge: see ConnectHandshake). Bytes after it are tunnel data."""
    end = _WHOLE_2XX.get(data)
    if end is not None:
        return end if end <= max_head else None
    head = _PLAIN_2XX_HEAD.match(data)
    if head is None:
        return None
    end = head.end()
    # A head line ends with CRLF: the status line's and the blank line's are not headers.
    if end > max_head or head.group().count(b"\r\n") - 2 > MAX_RESPONSE_HEADERS:
        return None
    if _FRAMING_HEADER.search(data, 0, end):
        return None
    if end == len(data) and len(_WHOLE_2XX) < _WHOLE_2XX_KEPT:
        _WHOLE_2XX[data] = end
    return end


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
        max_refusal_body: int = 0,
    ) -> None:
        """`max_refusal_body` > 0: read the body of a 407 (up to that many bytes) before
        raising ``ProxyAuthRequired``, so the connection can carry the next leg; see
        ``next_request``. With 0 the 407 is raised as soon as its head is in."""
        self.authority, self._request_headers = _checked_request(host, port, headers)
        self._max_head = max_head
        # Created on the first answer that is not a plain 2xx head (see _plain_2xx).
        self._conn: h11.Connection | None = None
        self._outgoing = _request_bytes(self.authority, self._request_headers)
        self._received = 0
        self._done = False
        self._failed = False
        self._trailing = b""
        self._max_refusal_body = max_refusal_body
        self._refusal: ProxyAuthRequired | None = None  # a 407 whose body we are reading
        self._body = 0
        self._reusable = False

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

    def next_request(self, headers: Sequence[tuple[str, str]] = ()) -> None:
        """Queue another CONNECT on the same connection after a reusable 407."""
        if not self._reusable:
            raise UsageError("next_request() needs a 407 whose connection stays open")
        extra = _check_headers(headers)
        # Only h11 reads a 407, so the connection exists by now.
        assert self._conn is not None
        self._reusable = self._failed = False
        self._conn.start_next_cycle()
        self._outgoing = _send_request(
            self._conn, self.authority, [("Host", self.authority), *extra]
        )
        # Bytes the proxy sent after the 407 belong to the next answer: count them as such.
        self._received = len(self._conn.trailing_data[0])

    def receive_data(self, data: bytes) -> None:
        if self._done or self._failed:
            raise UsageError("receive_data() called after the CONNECT handshake ended")
        if self._refusal is not None:
            self._receive_refusal_body(data)
            return
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
        conn = self._conn
        if conn is None:
            if self._plain_2xx(data):
                return
            # The request already went out as our own bytes; h11 must still see it to know
            # what it reads the answer to. What it writes for it is the same, and dropped.
            conn = self._conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=self._max_head)
            _send_request(conn, self.authority, self._request_headers)
        conn.receive_data(data)
        try:
            self._process_events()
        except (ProtocolError, HandshakeRefused):
            self._failed = True
            raise

    def _plain_2xx(self, data: bytes) -> bool:
        """Is `data`, the first segment of the answer, a whole 2xx head h11 would take as is?

        Then the tunnel is open and the rest of `data` is tunnel data, as h11 would decide.
        """
        end = plain_2xx_end(data, self._max_head)
        if end is None:
            return False
        self._trailing = data[end:]
        self._done = True
        return True

    def _process_events(self) -> None:
        conn = self._conn
        assert conn is not None
        while True:
            try:
                event = conn.next_event()
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
            head_bytes = self._received - len(conn.trailing_data[0])
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
                self._trailing = conn.trailing_data[0]
                self._done = True
                return
            reason = event.reason.decode("latin-1")
            headers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in event.headers]
            if event.status_code != 407:
                raise HandshakeRefused(event.status_code, reason, headers=headers)
            refusal = ProxyAuthRequired(reason, headers=headers)
            if self._max_refusal_body <= 0 or not _keeps_connection(event):
                raise refusal
            self._refusal = refusal
            self._body = 0
            self._read_refusal_body()
            return

    def _receive_refusal_body(self, data: bytes) -> None:
        assert self._conn is not None
        self._conn.receive_data(data)
        try:
            self._read_refusal_body()
        except HandshakeRefused:
            self._failed = True
            raise

    def _read_refusal_body(self) -> None:
        refusal = self._refusal
        conn = self._conn
        assert refusal is not None and conn is not None
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                # Cut short or badly framed: the 407 itself stands, the connection does not.
                self._refusal = None
                raise refusal from None
            if event is h11.NEED_DATA:
                return
            if isinstance(event, h11.Data):
                self._body += len(event.data)
                if self._body > self._max_refusal_body:
                    self._refusal = None
                    raise refusal
                continue
            # The response ends with EndOfMessage; h11 yields nothing else in between.
            assert isinstance(event, h11.EndOfMessage)
            self._refusal = None
            reusable = conn.our_state is h11.DONE and conn.their_state is h11.DONE
            refusal.reusable = self._reusable = reusable
            raise refusal

    def _too_big(self) -> ProtocolError:
        return ProtocolError(
            f"proxy's answer to CONNECT {self.authority} has a head larger than "
            f"{self._max_head} bytes"
        )
