"""Plain HTTP as proxy requests, sans-IO: what the port-80 forwarder sends and when to use it.

Some proxies refuse ``CONNECT host:80`` (Debian's stock squid.conf: ``http_access deny CONNECT
!SSL_ports``), so a redirected plain-HTTP connection cannot be tunnelled. It can still be
forwarded the way a browser configured with that proxy would: each request in absolute form
(``GET http://host/path HTTP/1.1``, RFC 9112 section 3.2.2) with ``Proxy-Authorization``. This
module holds the pure parts: which CONNECT answers mean "forward instead", the request rewrite
(absolute target, ``Host``, hop-by-hop fields), the response's field filter, and the short
answers the relay itself gives a client. h11 parses and frames the messages; relay/forward.py
does the I/O.

Must not import asyncio, socket, selectors, ssl or PySide6. The ``Proxy-Authorization`` value
passes through here and must never reach an exception message, a repr or a log line.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import h11

from .peek import validate_hostname

__all__ = [
    "CONNECT_REFUSALS",
    "ForwardRefused",
    "ProxyRequest",
    "connect_refused",
    "error_response",
    "proxy_request",
    "request_host",
    "response_fields",
]

# Answers to CONNECT host:80 that mean "not by tunnel" rather than "not this host": 403 is
# Squid's `deny CONNECT !SSL_ports`; 405 and 501 come from proxies that do not tunnel at all.
CONNECT_REFUSALS = frozenset({403, 405, 501})

# Fields that describe one hop, not the message (RFC 9110 section 7.6.1), plus the proxy's
# own fields: a client that believed it talked to the origin has no business setting those,
# and the proxy's challenge is ours to answer, not the client's. Content-Length and
# Transfer-Encoding stay: h11 frames the forwarded body from them.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"proxy-authentication-info",
        b"te",
        b"upgrade",
    }
)
_FRAMING = frozenset({b"content-length", b"transfer-encoding"})


class ForwardRefused(Exception):
    """The relay answers this request itself with `status` (the words go to the log and the
    client); nothing goes to the proxy."""

    def __init__(self, status: int, words: str) -> None:
        super().__init__(status, words)
        self.status = status
        self.words = words

    def __str__(self) -> str:
        return f"{self.status}: {self.words}"


def connect_refused(status: int | None) -> bool:
    """Does this answer to ``CONNECT host:80`` mean the proxy forwards plain HTTP instead?"""
    return status in CONNECT_REFUSALS


def _without_hop_by_hop(fields: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """`fields` (raw name, value) minus hop-by-hop ones and those `Connection` names."""
    fields = list(fields)
    named: set[bytes] = set()
    for name, value in fields:
        if name.lower() == b"connection":
            named.update(t.strip().lower() for t in value.split(b","))
    # A Connection token cannot take the framing away: h11 validated the framing as sent.
    drop = _HOP_BY_HOP | (named - _FRAMING)
    return [(n, v) for n, v in fields if n.lower() not in drop]


def _authority(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return shown if port == 80 else f"{shown}:{port}"


def request_host(request: h11.Request, destination: tuple[str, int]) -> str:
    """The host this request is for: the validated name from an absolute target or ``Host``,
    else the destination IP (an IP literal in ``Host`` is not trusted over the real one).

    The port always comes from the destination: that is where the client really connected.
    Raises ``ForwardRefused`` (400) for a target this relay cannot forward.
    """
    target = request.target
    raw: bytes | None = None
    if target.startswith(b"/") or target == b"*":
        raw = next((v for n, v in request.headers if n == b"host"), None)
    elif target[:7].lower() == b"http://":
        raw = target[7:].split(b"/", 1)[0].split(b"?", 1)[0]
    else:
        raise ForwardRefused(400, "the request target is neither a path nor an http:// URL")
    if raw is not None:
        raw = raw.rsplit(b"@", 1)[-1]  # userinfo is not part of the host (RFC 9110 4.2.4)
        if not raw.startswith(b"["):
            raw = raw.split(b":", 1)[0]
        name = validate_hostname(raw.decode("ascii", "replace"))
        if name is not None:
            return name
    return destination[0]


class ProxyRequest:
    """The request to send to the proxy, and the host it is for."""

    __slots__ = ("host", "request")

    def __init__(self, host: str, request: h11.Request) -> None:
        self.host = host
        self.request = request

    def __repr__(self) -> str:  # never the fields: one is Proxy-Authorization
        return f"<ProxyRequest {self.request.method.decode('ascii', 'replace')} {self.host}>"


def proxy_request(
    request: h11.Request,
    destination: tuple[str, int],
    *,
    pinned: str | None,
    authorization: tuple[str, str] | None,
) -> ProxyRequest:
    """Rewrite a request the client sent to the origin into the one for the proxy.

    `pinned`: the host this connection was routed for. Every request on one client
    connection must be for it, or a keep-alive connection routed for one name could carry
    requests for another; such a request gets 421 (RFC 9110 section 15.5.20), which clients
    retry on a new connection. Raises ``ForwardRefused``.
    """
    if request.method == b"CONNECT":
        raise ForwardRefused(405, "a CONNECT request to an origin server cannot be forwarded")
    host = request_host(request, destination)
    if pinned is not None and host != pinned:
        raise ForwardRefused(421, f"this connection is for {pinned}, not for {host}")
    authority = _authority(host, destination[1]).encode("ascii")
    target = request.target
    if target == b"*":
        uri = b"http://" + authority  # RFC 9112 section 3.2.4: OPTIONS * through a proxy
    elif target.startswith(b"/"):
        uri = b"http://" + authority + target
    else:
        rest = target[7:]
        slash = rest.find(b"/")
        query = rest.find(b"?")
        cut = min(i for i in (slash, query, len(rest)) if i >= 0)
        path = rest[cut:]
        uri = b"http://" + authority + (path if path.startswith(b"/") else b"/" + path)
    fields = _without_hop_by_hop(request.headers.raw_items())
    if any(n.lower() == b"transfer-encoding" for n, _v in fields):
        # RFC 9112 section 6.3: Transfer-Encoding overrides Content-Length; send one framing.
        fields = [(n, v) for n, v in fields if n.lower() != b"content-length"]
    fields = [(n, v) for n, v in fields if n.lower() != b"host"]
    fields.insert(0, (b"Host", authority))
    if authorization is not None:
        fields.append((authorization[0].encode("ascii"), authorization[1].encode("latin-1")))
    rewritten = h11.Request(method=request.method, target=uri, headers=fields)
    return ProxyRequest(host, rewritten)


def response_fields(fields: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The proxy's response fields as the client gets them: without hop-by-hop ones."""
    return _without_hop_by_hop(fields)


_REASONS = {
    400: b"Bad Request",
    405: b"Method Not Allowed",
    421: b"Misdirected Request",
    431: b"Request Header Fields Too Large",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    504: b"Gateway Timeout",
}


def error_response(status: int, words: str) -> tuple[h11.Response, bytes]:
    """The relay's own short answer (status, plain-text words); the connection closes after."""
    body = f"tray-proxy: {words}\n".encode("utf-8", "replace")
    response = h11.Response(
        status_code=status,
        reason=_REASONS.get(status, b""),
        headers=[
            (b"Content-Type", b"text/plain; charset=utf-8"),
            (b"Content-Length", str(len(body)).encode("ascii")),
            (b"Connection", b"close"),
        ],
    )
    return response, body
