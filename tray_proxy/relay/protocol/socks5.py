"""The SOCKS5 CONNECT handshake with an upstream proxy (RFC 1928, RFC 1929), sans-IO.

socksio builds every request and decodes every reply; it wants whole messages, so this module
only frames the bytes it is fed (which may come one at a time) into messages. A message is at
most 262 bytes (a CONNECT reply with a 255-byte domain), so the buffer never holds more than
that while waiting; whatever follows the CONNECT reply is tunnel data and goes to ``trailing``.

Must not import asyncio, socket, selectors, ssl or PySide6.
"""

from __future__ import annotations

import enum
import ipaddress

import socksio
from socksio import socks5 as s5

from .errors import HandshakeRefused, ProtocolError, UsageError, peer_excerpt

__all__ = ["REPLY_TEXT", "Socks5Handshake"]

# RFC 1928 section 6, in the words a log line can use as is.
REPLY_TEXT = {
    0x00: "succeeded",
    0x01: "general SOCKS server failure",
    0x02: "connection not allowed by ruleset",
    0x03: "network unreachable",
    0x04: "host unreachable",
    0x05: "connection refused",
    0x06: "TTL expired",
    0x07: "command not supported",
    0x08: "address type not supported",
}

_SOCKS_VERSION = 0x05
_USERPASS_VERSION = 0x01  # RFC 1929 section 2
_NO_ACCEPTABLE_METHODS = 0xFF
_ATYP_IPV4, _ATYP_DOMAIN, _ATYP_IPV6 = 0x01, 0x03, 0x04
_REPLY_FIXED = 6  # VER REP RSV ATYP + 2 bytes of port


class _Stage(enum.Enum):
    METHOD = "waiting for the method selection"
    AUTH = "waiting for the username/password verdict"
    REPLY = "waiting for the CONNECT reply"
    DONE = "tunnel open"
    FAILED = "failed"


def _credential(value: str, what: str) -> bytes:
    encoded = _utf8(value)
    # Say which field and what is wrong, never the value.
    if encoded is None or not 1 <= len(encoded) <= 255:
        raise UsageError(f"SOCKS5 {what} must be 1 to 255 bytes of UTF-8 (RFC 1929)")
    return encoded


def _utf8(text: str) -> bytes | None:
    # The UnicodeEncodeError keeps the whole string in `.object`: it must not outlive this frame.
    try:
        return text.encode()
    except UnicodeEncodeError:
        return None


def _command_request(host: str, port: int) -> s5.SOCKS5CommandRequest:
    literal = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ip = ipaddress.ip_address(literal)
    except ValueError:
        pass
    else:
        atype = (
            s5.SOCKS5AType.IPV4_ADDRESS
            if isinstance(ip, ipaddress.IPv4Address)
            else s5.SOCKS5AType.IPV6_ADDRESS
        )
        return s5.SOCKS5CommandRequest(s5.SOCKS5Command.CONNECT, atype, ip.packed, port)
    if not host.isascii() or any(ord(c) <= 0x20 or ord(c) == 0x7F for c in host):
        raise UsageError(
            f"SOCKS5 host {peer_excerpt(host)} must be printable ASCII (IDNA-encode names first)"
        )
    name = host.encode("ascii")
    if len(name) > 255:
        raise UsageError("SOCKS5 host name is longer than 255 bytes (RFC 1928 section 5)")
    return s5.SOCKS5CommandRequest(s5.SOCKS5Command.CONNECT, s5.SOCKS5AType.DOMAIN_NAME, name, port)


class Socks5Handshake:
    """Client side of a SOCKS5 CONNECT: offers no-auth, plus username/password when given."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        if not host:
            raise UsageError("SOCKS5 host is empty")
        if not 1 <= port <= 65535:
            raise UsageError(f"SOCKS5 port {port} is outside 1-65535")
        if (username is None) != (password is None):
            raise UsageError("SOCKS5 username and password must be given together")
        self._credentials: tuple[bytes, bytes] | None = None
        if username is not None and password is not None:
            self._credentials = (
                _credential(username, "username"),
                _credential(password, "password"),
            )
        self._request = _command_request(host, port)
        self.target = f"[{host}]:{port}" if ":" in host and host[0] != "[" else f"{host}:{port}"
        self._offered = [s5.SOCKS5AuthMethod.NO_AUTH_REQUIRED]
        if self._credentials is not None:
            self._offered.append(s5.SOCKS5AuthMethod.USERNAME_PASSWORD)
        self._conn = s5.SOCKS5Connection()
        self._conn.send(s5.SOCKS5AuthMethodsRequest(self._offered))
        self._stage = _Stage.METHOD
        self._buffer = bytearray()
        self._trailing = b""

    def __repr__(self) -> str:
        return f"<Socks5Handshake {self.target} {self._stage.name.lower()}>"

    @property
    def done(self) -> bool:
        return self._stage is _Stage.DONE

    @property
    def trailing(self) -> bytes:
        return self._trailing

    def data_to_send(self) -> bytes:
        return self._conn.data_to_send()

    def receive_data(self, data: bytes) -> None:
        if self._stage in (_Stage.DONE, _Stage.FAILED):
            raise UsageError("receive_data() called after the SOCKS5 handshake ended")
        if not data:
            stage = self._stage
            self._stage = _Stage.FAILED
            raise ProtocolError(
                f"SOCKS5 proxy closed the connection {stage.value} for {self.target}"
            )
        self._buffer += data
        try:
            while self._step():
                pass
        except (ProtocolError, HandshakeRefused):
            self._stage = _Stage.FAILED
            raise

    def _take(self, size: int) -> bytes | None:
        if len(self._buffer) < size:
            return None
        message = bytes(self._buffer[:size])
        del self._buffer[:size]
        return message

    def _step(self) -> bool:
        """Handle one whole message if it is buffered; False when more bytes are needed."""
        if self._stage is _Stage.METHOD:
            return self._method_selection()
        if self._stage is _Stage.AUTH:
            return self._auth_verdict()
        return self._connect_reply()

    def _method_selection(self) -> bool:
        message = self._take(2)
        if message is None:
            return False
        if message[0] != _SOCKS_VERSION:
            # socksio does not check the version here, and a version mismatch usually means
            # the upstream is not a SOCKS5 proxy at all (an HTTP proxy answering, say).
            raise ProtocolError(
                f"upstream is not a SOCKS5 proxy: it answered {peer_excerpt(message)}"
            )
        if message[1] == _NO_ACCEPTABLE_METHODS:
            offered = "no-auth or username/password" if self._credentials else "no-auth"
            raise HandshakeRefused(
                _NO_ACCEPTABLE_METHODS,
                f"no acceptable authentication methods (offered {offered})",
                auth_failed=self._credentials is not None,
            )
        try:
            reply = self._conn.receive_data(message)
        except socksio.ProtocolError:
            raise ProtocolError(
                f"SOCKS5 proxy chose unknown authentication method {message[1]:#04x}"
            ) from None
        assert isinstance(reply, s5.SOCKS5AuthReply)  # socksio's reply type in this state
        if reply.method not in self._offered:
            raise ProtocolError(
                f"SOCKS5 proxy chose authentication method {message[1]:#04x}, "
                f"which we did not offer"
            )
        if reply.method is s5.SOCKS5AuthMethod.USERNAME_PASSWORD:
            assert self._credentials is not None  # only offered with credentials
            self._conn.send(s5.SOCKS5UsernamePasswordRequest(*self._credentials))
            self._stage = _Stage.AUTH
        else:
            self._send_connect()
        return True

    def _auth_verdict(self) -> bool:
        message = self._take(2)
        if message is None:
            return False
        reply = self._conn.receive_data(message)
        assert isinstance(reply, s5.SOCKS5UsernamePasswordReply)
        if reply.success:
            self._send_connect()
            return True
        if message[0] != _USERPASS_VERSION:
            raise ProtocolError(
                f"SOCKS5 proxy sent a malformed username/password reply {peer_excerpt(message)}"
            )
        raise HandshakeRefused(
            message[1], "username/password rejected (RFC 1929)", auth_failed=True
        )

    def _send_connect(self) -> None:
        self._conn.send(self._request)
        self._stage = _Stage.REPLY

    def _connect_reply(self) -> bool:
        if len(self._buffer) < 5:
            return False
        version, code, _reserved, atype, first = self._buffer[:5]
        if version != _SOCKS_VERSION:
            raise ProtocolError(
                f"SOCKS5 proxy sent a malformed CONNECT reply {peer_excerpt(self._buffer)}"
            )
        if atype == _ATYP_IPV4:
            size = _REPLY_FIXED + 4
        elif atype == _ATYP_IPV6:
            size = _REPLY_FIXED + 16
        elif atype == _ATYP_DOMAIN:
            size = _REPLY_FIXED + 1 + first
        elif code != 0:
            # The bound address is meaningless on a refusal; report the refusal itself.
            raise self._refused(code)
        else:
            raise ProtocolError(f"SOCKS5 proxy replied with unknown address type {atype:#04x}")
        message = self._take(size)
        if message is None:
            return False
        try:
            reply = self._conn.receive_data(message)
        except socksio.ProtocolError:
            # socksio rejects the reply codes RFC 1928 leaves unassigned, and bound domain
            # names that are not UTF-8 (it decodes the length byte with the name, so names of
            # 128 bytes or more always fail). The framing above is sound and we never use the
            # bound address, so the reply code alone decides.
            succeeded = code == 0
        else:
            assert isinstance(reply, s5.SOCKS5Reply)
            succeeded = reply.reply_code is s5.SOCKS5ReplyCode.SUCCEEDED
        if not succeeded:
            raise self._refused(code)
        self._trailing = bytes(self._buffer)
        self._buffer.clear()
        self._stage = _Stage.DONE
        return False

    def _refused(self, code: int) -> HandshakeRefused:
        return HandshakeRefused(code, REPLY_TEXT.get(code, f"unassigned reply code {code:#04x}"))
