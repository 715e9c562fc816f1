"""Every outbound socket of the relay is made here: to an upstream proxy (dial, spare) and to
a destination (DIRECT), with the same options.

- non-blocking from the start (SOCK_NONBLOCK: no extra system call);
- TCP_NODELAY, unless the caller sets it after its first write (the fast path sends its
  CONNECT first: the option concerns the tunnel's small writes, not the request);
- Reno towards this host (`keep_on_host`);
- a source port from the relay's reserved range (`SourcePorts`) when the destination port is
  one the redirect catches, so the ruleset lets the socket through instead of sending it
  back to the relay (ARCHITECTURE.md, "Loops and exposure").

Must not import PySide6 or asyncio.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import socket
import time

__all__ = ["SourcePorts", "keep_on_host", "outbound_socket"]

# Flags combined once, as plain ints: `|` on the socket module's enum flags runs Python code
# (enum's __or__ and __call__, about 0.6 µs) on every call.
_STREAM_NONBLOCK = int(socket.SOCK_STREAM | socket.SOCK_NONBLOCK)


class SourcePorts:
    """Hands out source ports from the relay's reserved range, round robin, and remembers
    when each was last handed out (`bound_within`).

    Several sockets may share a source port (SO_REUSEADDR) as long as the 4-tuples differ;
    a collision shows up as EADDRINUSE/EADDRNOTAVAIL and we move on to the next port.
    """

    def __init__(self, first: int, last: int) -> None:
        self.first = first
        self.last = last
        self._cycle = itertools.cycle(range(first, last + 1))
        self.attempts = min(64, last - first + 1)  # ports tried before giving up
        self._bound: dict[int, float] = {}  # port -> monotonic time it was last bound

    def bound_within(self, port: int, seconds: float) -> bool:
        """Was `port` bound to one of our sockets in the last `seconds`?"""
        at = self._bound.get(port)
        return at is not None and time.monotonic() - at <= seconds

    def bind(self, sock: socket.socket, family: int) -> None:
        host = "0.0.0.0" if family == socket.AF_INET else "::"
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        for _ in range(self.attempts):
            port = next(self._cycle)
            try:
                sock.bind((host, port))
                self._bound[port] = time.monotonic()
                return
            except OSError as exc:
                if exc.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
                    raise
        raise OSError(errno.EADDRINUSE, f"no free source port in {self.first}-{self.last}")


def keep_on_host(sock: socket.socket, ip: str) -> None:
    """A connection to a proxy on this host (loopback: a local helper proxy such as cntlm or
    px) never crosses a network: like the client side (RelayEngine._bind_listener), it uses
    Reno, since a pacing congestion control (BBR as the system default) only costs it timer
    interrupts there (docs/relay.md, "Reno on sockets that never leave this host"). A proxy
    anywhere else keeps the system's choice: its path may need it."""
    if ip == "::1" or ip.startswith(("127.", "::ffff:127.")):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, b"reno")


def outbound_socket(
    family: int, ip: str, ports: SourcePorts | None = None, *, nodelay: bool = True
) -> socket.socket:
    """A new non-blocking TCP socket for a connection to `ip`, not yet connected; bound to a
    reserved source port when `ports` is given. Raises OSError (out of descriptors, no free
    source port)."""
    sock = socket.socket(family, _STREAM_NONBLOCK)
    try:
        keep_on_host(sock, ip)
        if nodelay:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if ports is not None:
            ports.bind(sock, family)
    except BaseException:
        sock.close()
        raise
    return sock
