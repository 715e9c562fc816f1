"""Connections to the proxy opened ahead of need, for the fast path (relay/opening.py).

Must not import PySide6.

A new connection's CONNECT can only leave once the TCP connection to the proxy is up: one
round trip to the proxy per connection, and the proxy accepts the connection before it can
read the request. A spare, dialed when a previous tunnel ended (RelayEngine._refill_spares),
has done both already: the next connection takes it and writes its CONNECT at once, to a
proxy that only has to read it. On a proxy a few milliseconds away that is a few
milliseconds off every new connection; on the lab's near Squid it is the connect() call and
Squid's accept (docs/relay.md, "Spare connections to the proxy", has the figures).

Spares are kept only for the address the fast path dials, only while connections come, never
on a timer: two are dialed when a tunnel ends and no other connection is opening; during a
burst (several openings in progress) each accept dials replacements at once, as many as the
most openings in progress within the last second, up to `keep` (RelayEngine._top_up_spares):
with a real round trip to the proxy each connection of the burst then finds one
(docs/benchmarks.md, "Round trip to the proxy"). Each is kept at most `max_age` seconds: a
proxy drops connections that send no request for a while (Dante after 30 s by default). A
spare that the proxy closed, reset or spoke on is discarded when taken. The proxy sees each
spare that expires unused as a connection that ended before its request.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import socket
import time

from tray_proxy.relay.records import Address
from tray_proxy.relay.sockets import outbound_socket

_IN_PROGRESS = frozenset({errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK})
_PEEK_NOWAIT = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)  # an int: see sockets._STREAM_NONBLOCK


class Spares:
    """Up to `keep` connections to one proxy address, each at most `max_age` seconds old."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        keep: int,
        max_age: float,
        stats: collections.Counter[str] | None = None,
    ) -> None:
        """`stats` (the engine's) counts spares "spare_taken", "spare_stale" (found closed,
        reset or talking when taken, or closed by the proxy under our request) and
        "spare_expired"."""
        self._loop = loop
        self.keep = keep
        self.max_age = max_age
        # The address they lead to, and (made at, socket), oldest first.
        self._address: tuple[int, Address] | None = None
        self._kept: collections.deque[tuple[float, socket.socket]] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self.stats: collections.Counter[str] = collections.Counter() if stats is None else stats

    def __len__(self) -> int:
        return len(self._kept)

    def take(self, address: tuple[int, Address]) -> socket.socket | None:
        """A spare connected (or still connecting) to `address`, or None.

        The oldest first, so that none outlives the others by much. One recv(MSG_PEEK) per
        spare looked at: a proxy that closed it, reset it or spoke on it (it never should,
        before our request) has made it useless.
        """
        kept = self._kept
        if not kept or address != self._address:
            return None
        limit = time.monotonic() - self.max_age
        while kept:
            made, sock = kept.popleft()
            if made > limit:
                try:
                    sock.recv(1, _PEEK_NOWAIT)
                except (BlockingIOError, InterruptedError):
                    self.stats["spare_taken"] += 1
                    return sock
                except OSError:
                    pass
                self.stats["spare_stale"] += 1
            else:
                self.stats["spare_expired"] += 1
            sock.close()
        return None

    def refill(self, address: tuple[int, Address], want: int | None = None) -> None:
        """Dial spares to `address` until `want` (at most `keep`; None: `keep`) are kept.
        Spares to another address (the route changed) are closed first. A dial that fails at
        once ends the refill: the next connection's own dial reports the trouble."""
        target = self.keep if want is None else min(want, self.keep)
        if self._closed or target <= 0:
            return
        if address != self._address:
            self._close_all()
            self._address = address
        family, sockaddr = address
        kept = self._kept
        while len(kept) < target:
            try:
                sock = outbound_socket(family, sockaddr[0])
            except OSError:
                return
            try:
                code = sock.connect_ex(sockaddr)
            except OSError:
                code = -1
            if code != 0 and code not in _IN_PROGRESS:
                sock.close()
                return
            kept.append((time.monotonic(), sock))
        if self._timer is None:
            self._timer = self._loop.call_later(self._until_oldest_expires(), self._expire)

    def close(self) -> None:
        """Close every spare and make no more (the engine stops)."""
        self._closed = True
        self._close_all()

    def _until_oldest_expires(self) -> float:
        """Seconds until the oldest spare reaches max_age."""
        return max(0.0, self._kept[0][0] + self.max_age - time.monotonic())

    def _expire(self) -> None:
        self._timer = None
        limit = time.monotonic() - self.max_age
        kept = self._kept
        while kept and kept[0][0] <= limit:
            kept.popleft()[1].close()
            self.stats["spare_expired"] += 1
        if kept:
            self._timer = self._loop.call_later(self._until_oldest_expires(), self._expire)

    def _close_all(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._kept:
            with contextlib.suppress(OSError):
                self._kept.popleft()[1].close()
