"""The shape ConnectHandshake and Socks5Handshake share: bytes in, bytes out, done.

relay/upstream.py's `run_handshake` drives one without knowing its protocol (SOCKS5 tunnels
go through it; HTTP CONNECT goes through proxy_auth.ProxyAuth, which answers challenges)::

    send(hs.data_to_send())
    while not hs.done:
        hs.receive_data(await read())      # b"" on EOF; raises ProtocolError / HandshakeRefused
        send(hs.data_to_send())            # some protocols answer mid-handshake (SOCKS5 auth)
    forward_to_client(hs.trailing)         # tunnel bytes that arrived glued to the last reply

Must not import asyncio, socket, selectors, ssl or PySide6.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

__all__ = ["UpstreamHandshake"]


@runtime_checkable
class UpstreamHandshake(Protocol):
    """A sans-IO client handshake with an upstream proxy."""

    @property
    def done(self) -> bool:
        """True once the tunnel is open; bytes from then on belong to the tunnel."""

    @property
    def trailing(self) -> bytes:
        """Tunnel bytes that arrived after the proxy's final reply (empty until ``done``)."""

    def data_to_send(self) -> bytes:
        """Return the bytes to send to the proxy now, and forget them."""

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the proxy; ``b""`` means the proxy closed the connection.

        Raises ``ProtocolError`` for bytes we cannot accept, ``HandshakeRefused`` when the
        proxy said no, ``UsageError`` when called after the handshake finished or failed.
        """
