"""Find the host name a redirected client asked for, from the first bytes it sends.

The relay only knows the destination IP (SO_ORIGINAL_DST). To route by name and to send the
proxy ``CONNECT name:port`` it reads, without answering, the TLS ClientHello's server_name
(RFC 6066 section 3) or the HTTP request's Host (RFC 9112 section 3.2). ``HostPeeker`` keeps
every byte it is fed so the engine can forward them unchanged, never raises on any input, and
gives up after ``max_bytes``: a client that sends something else, something malformed or too
much is tunnelled by its IP address instead.

Must not import asyncio, socket, selectors, ssl or PySide6.
"""

from __future__ import annotations

import re
from typing import Literal

from .errors import UsageError

__all__ = ["HostPeeker", "validate_hostname"]

_LABEL = re.compile(r"[a-z0-9_-]{1,63}")
# WHATWG URL "ends in a number": a last label like "1", "0x7f" or "2130706433" makes many
# resolvers (inet_aton) read the whole name as an IPv4 address, so "127.1" or "0x7f.1" would
# reach the proxy's loopback. IP literals are refused for the same reason, and because the
# caller already has the IP.
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")


def validate_hostname(name: str) -> str | None:
    """The lower-case ASCII form of a DNS host name, or None if it is not one.

    Non-ASCII names are converted to IDNA A-labels (``bücher.de`` -> ``xn--bcher-kva.de``).
    One trailing dot is dropped. Labels may hold letters, digits, ``-`` and ``_`` (real SNI
    values carry underscores). Returns None for IP literals (``10.0.0.1``, ``::1``, ``[::1]``),
    names whose last label is numeric, empty labels, labels over 63 or names over 253
    characters, and anything IDNA cannot encode: the caller then uses the original IP address.
    """
    if len(name) > 254:  # spares the IDNA codec huge inputs; 253 + one trailing dot
        return None
    if name.isascii():
        ascii_name = name
    else:
        try:
            ascii_name = name.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    ascii_name = ascii_name.lower()
    if ascii_name.endswith("."):
        ascii_name = ascii_name[:-1]
    if not ascii_name or len(ascii_name) > 253:
        return None
    labels = ascii_name.split(".")
    if not all(_LABEL.fullmatch(label) for label in labels):
        return None
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        return None
    return ascii_name


# Request methods that may open a redirected plain-HTTP connection (RFC 9110 section 9 and the
# WebDAV ones). Another first word means the bytes are not HTTP and are tunnelled by IP.
_METHODS = tuple(
    m.encode() + b" "
    for m in [
        "GET",
        "HEAD",
        "POST",
        "PUT",
        "DELETE",
        "CONNECT",
        "OPTIONS",
        "TRACE",
        "PATCH",
        "PROPFIND",
        "PROPPATCH",
        "MKCOL",
        "COPY",
        "MOVE",
        "LOCK",
        "UNLOCK",
        "SEARCH",
        "REPORT",
        "PURGE",
    ]
)
_LONGEST_METHOD = max(len(m) for m in _METHODS)
_METHOD_INITIALS = frozenset(m[0] for m in _METHODS)
_HTTP_VERSION = re.compile(rb"HTTP/1\.[0-9]")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_ABSOLUTE_FORM = re.compile(rb"[hH][tT][tT][pP][sS]?://([^/?#]*)")

_TLS_HANDSHAKE = 0x16
_TLS_MAX_RECORD = 16384  # RFC 8446 section 5.1: 2^14 bytes of plaintext
_CLIENT_HELLO = 0x01
_EXT_SERVER_NAME = 0x0000
_NAME_TYPE_HOST = 0x00


class _Truncated(Exception):
    """The bytes so far end inside the structure: more may come."""


class _Malformed(Exception):
    """The bytes contradict the structure's own lengths or rules."""


def _server_name(hello: bytes, found: list[bytes]) -> None:
    """Walk a ClientHello handshake message (header included) and collect its host_name.

    Appends to ``found`` as soon as the name is seen, so a hello cut short after its
    server_name extension still yields the name (the caller catches ``_Truncated``).

    Every structure lies within the one around it (RFC 8446 section 3.4 vectors): a length
    that reaches past its container is ``_Malformed``; one that reaches past the bytes
    received so far is ``_Truncated``. Plain index arithmetic, no object per field: this
    runs for every HTTPS connection, before its CONNECT can go out.
    """
    have = len(hello)

    def vector(pos: int, size: int, limit: int) -> int:
        """The end of the vector at `pos` with a `size`-byte length, inside `limit`."""
        start = pos + size
        if start > limit:
            raise _Malformed
        if start > have:
            raise _Truncated
        stop = start + (hello[pos] if size == 1 else hello[pos] << 8 | hello[pos + 1])
        if stop > limit:
            raise _Malformed
        return stop

    end = 4 + int.from_bytes(hello[1:4], "big")
    pos = 4 + 2 + 32  # legacy_version, random
    if pos > end:
        raise _Malformed
    if pos > have:
        raise _Truncated
    pos = vector(pos, 1, end)  # legacy_session_id
    pos = vector(pos, 2, end)  # cipher_suites
    pos = vector(pos, 1, end)  # legacy_compression_methods
    if pos >= end:
        return  # a hello without extensions (TLS 1.0 era) has no server_name
    extensions_end = vector(pos, 2, end)
    pos += 2
    while pos < extensions_end:
        if pos + 2 > extensions_end:
            raise _Malformed
        if pos + 2 > have:
            raise _Truncated
        ext_end = vector(pos + 2, 2, extensions_end)  # after the extension_type
        ext_start = pos + 4
        ext_type = hello[pos] << 8 | hello[pos + 1]
        pos = ext_end
        if ext_type != _EXT_SERVER_NAME:
            continue
        if found:  # RFC 8446 4.2: one extension of each type at most
            raise _Malformed
        names_end = vector(ext_start, 2, ext_end)
        if names_end != ext_end:  # the list must fill the extension exactly
            raise _Malformed
        host = None
        at = ext_start + 2
        while at < names_end:
            value_end = vector(at + 1, 2, names_end)  # after the name_type byte
            if value_end > have:
                raise _Truncated
            if hello[at] == _NAME_TYPE_HOST:
                if host is not None:  # RFC 6066 section 3: one name per type
                    raise _Malformed
                host = hello[at + 3 : value_end]
            at = value_end
        if host is None:
            raise _Malformed
        found.append(host)


def _decode_host(raw: bytes) -> str | None:
    try:
        return validate_hostname(raw.decode("ascii"))
    except UnicodeDecodeError:
        return None


def _host_from_authority(raw: bytes) -> str | None:
    """The host part of ``host[:port]``; None for IP literals (``[v6]:port`` too) and junk."""
    host, colon, port = raw.rpartition(b":")
    if not colon:
        host = raw
    elif port and not port.isdigit():
        return None
    return _decode_host(host)


class HostPeeker:
    """Reads the first bytes of a client connection until it knows the host name, or that
    it will not learn it.

    ``feed`` returns True once decided: ``kind`` then says what the bytes looked like and
    ``host`` holds the validated name (see ``validate_hostname``) or None. ``feed(b"")``
    means the client closed or the peek timed out, and forces the decision. ``buffered``
    holds every byte fed, for the engine to forward upstream.
    """

    # One per connection, made on the accept path before the CONNECT can leave: no attribute
    # dict per instance, like every other per-connection object of the relay (docs/relay.md).
    __slots__ = (
        "max_bytes",
        "host",
        "kind",
        "_buf",
        "_classified",
        "_decided",
        "_record_pos",
        "_handshake",
        "_line_pos",
        "_request_line_seen",
        "_hosts",
    )

    def __init__(self, max_bytes: int = 16384) -> None:
        if max_bytes < 1:
            raise UsageError("HostPeeker max_bytes must be at least 1")
        self.max_bytes = max_bytes
        self.host: str | None = None
        self.kind: Literal["tls", "http", "unknown"] = "unknown"
        self._buf = bytearray()
        self._classified = False
        self._decided = False
        # TLS: where the next record starts, and the handshake bytes gathered from records.
        self._record_pos = 0
        self._handshake = bytearray()
        # HTTP: where the next line starts, and the Host values seen so far.
        self._line_pos = 0
        self._request_line_seen = False
        self._hosts: list[bytes] = []

    def __repr__(self) -> str:
        state = "decided" if self._decided else "peeking"
        return f"<HostPeeker {self.kind} {state} host={self.host!r} {len(self._buf)} bytes>"

    @property
    def buffered(self) -> bytes:
        return bytes(self._buf)

    @property
    def decided(self) -> bool:
        return self._decided

    def feed(self, data: bytes) -> bool:
        """Add bytes from the client (``b""``: no more will come); True once decided."""
        if self._decided:
            raise UsageError("HostPeeker.feed() called after the decision")
        self._buf += data
        if not self._classified:
            self._classify()
        if self.kind == "tls":
            self._feed_tls()
        elif self.kind == "http":
            self._feed_http()
        if not self._decided and (not data or len(self._buf) >= self.max_bytes):
            # Out of time, data or room: keep whatever a partial ClientHello already told us.
            self._decide(self._partial_tls_host() if self.kind == "tls" else None)
        return self._decided

    def _decide(self, host: str | None) -> None:
        self.host = host
        self._decided = True

    def _classify(self) -> None:
        buf = self._buf
        if not buf:
            return
        if buf[0] == _TLS_HANDSHAKE:
            if len(buf) < 2:
                return
            if buf[1] == 0x03:  # record version 3.x: SSL 3.0 up to TLS 1.3
                self.kind, self._classified = "tls", True
            else:
                self._decide(None)
            return
        if buf[0] not in _METHOD_INITIALS:
            self._decide(None)  # no method starts so: the usual answer for non-HTTP bytes
            return
        head = bytes(buf[: _LONGEST_METHOD + 1])
        could_be_http = False
        for method in _METHODS:
            if head.startswith(method):
                self.kind, self._classified = "http", True
                return
            could_be_http = could_be_http or method.startswith(head)
        if not could_be_http:
            self._decide(None)

    # -- TLS -------------------------------------------------------------------------------

    def _feed_tls(self) -> None:
        buf = self._buf
        while len(buf) - self._record_pos >= 5:
            pos = self._record_pos
            length = int.from_bytes(buf[pos + 3 : pos + 5], "big")
            # The ClientHello may span several records, but only handshake records, and
            # RFC 8446 section 5.1 forbids empty ones.
            if buf[pos] != _TLS_HANDSHAKE or buf[pos + 1] != 0x03:
                self._decide(None)
                return
            if not 0 < length <= _TLS_MAX_RECORD:
                self._decide(None)
                return
            if len(buf) - pos - 5 < length:
                return
            self._handshake += buf[pos + 5 : pos + 5 + length]
            self._record_pos = pos + 5 + length
            hello = self._handshake
            if hello[0] != _CLIENT_HELLO:
                self._decide(None)
                return
            if len(hello) >= 4 and len(hello) >= 4 + int.from_bytes(hello[1:4], "big"):
                found: list[bytes] = []
                try:
                    # Every length is checked against the complete message, so a short
                    # structure is _Malformed here, never _Truncated.
                    _server_name(bytes(hello), found)
                except _Malformed:
                    self._decide(None)
                    return
                self._decide(_decode_host(found[0]) if found else None)
                return

    def _partial_tls_host(self) -> str | None:
        hello = bytes(self._handshake)
        # An unfinished record was vetted by _feed_tls when its header arrived; its payload
        # so far is part of the hello. This matters: a large hello in one 16 KiB record never
        # completes within the default max_bytes.
        hello += self._buf[self._record_pos + 5 :]
        found: list[bytes] = []
        if len(hello) >= 4:
            try:
                _server_name(hello, found)
            except _Malformed:
                return None
            except _Truncated:
                pass
        return _decode_host(found[0]) if found else None

    # -- HTTP ------------------------------------------------------------------------------

    def _feed_http(self) -> None:
        buf = self._buf
        while not self._decided:
            end = buf.find(b"\n", self._line_pos)
            if end < 0:
                return
            line = bytes(buf[self._line_pos : end])
            self._line_pos = end + 1
            # RFC 9112 section 2.2: a bare LF may end a line; the CR is optional.
            self._http_line(line[:-1] if line.endswith(b"\r") else line)

    def _http_line(self, line: bytes) -> None:
        if not self._request_line_seen:
            self._request_line_seen = True
            parts = line.split(b" ")
            if len(parts) != 3 or not parts[1] or not _HTTP_VERSION.fullmatch(parts[2]):
                self._decide(None)
                return
            absolute = _ABSOLUTE_FORM.match(parts[1])
            if absolute:
                # RFC 9112 section 3.2.2: the target's authority wins over any Host header.
                self._decide(_host_from_authority(absolute[1]))
            return
        if not line:
            # End of the head. Two Host headers are ambiguous (RFC 9112 section 3.2: a 400),
            # and the origin might honour the other one than we route by.
            self._decide(_host_from_authority(self._hosts[0]) if len(self._hosts) == 1 else None)
            return
        if line[0] in b" \t":
            # Obsolete line folding (RFC 9112 section 5.2) could hide or extend a Host value.
            self._decide(None)
            return
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            self._decide(None)
            return
        if name.lower() == b"host":
            self._hosts.append(value.strip(b" \t"))
