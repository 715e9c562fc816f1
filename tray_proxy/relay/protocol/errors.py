"""The three ways a protocol exchange can fail, kept apart so the engine can tell them apart.

- ``ProtocolError``: the peer sent bytes we cannot accept (close, log, no retry with the same peer).
- ``HandshakeRefused``: the proxy understood us and said no (status and words for the user).
- ``UsageError``: our own code called the API wrongly (a bug on our side, never the peer's).

Messages never carry secrets and quote at most ``PEER_EXCERPT_LIMIT`` bytes of what the peer
sent, so a hostile peer cannot flood the log through an exception.

Must not import asyncio, socket, selectors, ssl or PySide6.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "PEER_EXCERPT_LIMIT",
    "HandshakeRefused",
    "ProtocolError",
    "UsageError",
    "peer_excerpt",
]

PEER_EXCERPT_LIMIT = 80


def peer_excerpt(data: bytes | bytearray | str, limit: int = PEER_EXCERPT_LIMIT) -> str:
    """The repr of at most ``limit`` bytes (or characters) of peer data, marked when cut."""
    cut = len(data) > limit
    head = data[:limit]
    text = repr(bytes(head)) if isinstance(head, (bytes, bytearray)) else repr(head)
    return text + "..." if cut else text


class ProtocolError(Exception):
    """The peer sent bytes we cannot accept: the exchange is over."""


class UsageError(Exception):
    """We called the API wrongly (wrong order, invalid argument): a bug in our own code."""


class HandshakeRefused(Exception):
    """The proxy understood the request and refused it.

    ``status`` is the HTTP status code, the SOCKS5 reply code (RFC 1928 section 6), the RFC 1929
    status byte when the proxy rejected the username/password (non-zero, usually 1), or 255 when
    a SOCKS5 proxy accepted none of the offered authentication methods.
    ``auth_failed`` is True when the refusal is about credentials: HTTP 407, a rejected SOCKS5
    username/password, or "no acceptable methods" after we offered username/password. The engine
    uses it to stop retrying stored credentials (directory accounts lock after a few failures).
    ``headers`` are the HTTP response headers, names lower-cased, both decoded as latin-1; empty
    for SOCKS.
    """

    def __init__(
        self,
        status: int,
        reason: str,
        *,
        auth_failed: bool = False,
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        # The reason phrase comes from the peer: cap it like any other peer text.
        if len(reason) > PEER_EXCERPT_LIMIT:
            reason = reason[:PEER_EXCERPT_LIMIT] + "..."
        super().__init__(status, reason)
        self.status = status
        self.reason = reason
        self.auth_failed = auth_failed
        self.headers: tuple[tuple[str, str], ...] = tuple(headers)

    def __str__(self) -> str:
        return f"proxy answered {self.status} {self.reason}".rstrip()
