"""Notices network changes (links, addresses, routes) from the kernel, for issue 15 section 5.

A laptop that leaves the corporate network, a VPN that comes up, a Wi-Fi that changes: each
shows as rtnetlink messages. `NetworkWatcher` listens to them on an AF_NETLINK socket (stdlib
`socket`, no pyroute2), on an asyncio loop (`add_reader`: asyncio and uvloop alike), and calls
`on_change()` once per burst, so the caller re-probes the proxies right away instead of
waiting for the periodic probe. One `ip link set eth0 down` alone sends a link message, the
removal of its routes and addresses, for IPv4 and IPv6; those are one change.

The watcher never parses what changed beyond the message type: whatever changed, the answer
is the same (probe again), and the probe is cheap.

Must not import PySide6, qasync or the relay engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import struct
from collections.abc import Callable

__all__ = ["NetworkWatcher", "NetworkWatchError", "open_route_socket"]

_log = logging.getLogger(__name__)

# linux/rtnetlink.h: the legacy multicast group bits, accepted by bind(2) as nl_groups.
RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV6_IFADDR = 0x100
RTMGRP_IPV6_ROUTE = 0x400
GROUPS = (
    RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE
)
# RTM_NEWLINK .. RTM_DELROUTE: link, address and route messages (the groups above send only
# these, but a message type outside them is never counted as a change).
_CHANGE_TYPES = frozenset({16, 17, 20, 21, 24, 25})
_NLMSG_HDR = struct.Struct("=IHHII")  # nlmsg_len, nlmsg_type, nlmsg_flags, nlmsg_seq, nlmsg_pid
_RECV_SIZE = 65536
# Reads per readiness callback: a flood of messages cannot hold the loop; the rest are read
# on the next turn.
_MAX_READS = 64
_RCVBUF = 1 << 20


class NetworkWatchError(OSError):
    """The kernel's route messages cannot be watched here (no AF_NETLINK, e.g. in a sandbox).
    The caller falls back to its periodic probe."""


def open_route_socket() -> socket.socket:
    """A non-blocking NETLINK_ROUTE socket subscribed to link, address and route changes.

    It belongs to the network namespace of the thread that calls this (a test creates it
    inside the namespace it watches)."""
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    except (OSError, AttributeError) as exc:
        raise NetworkWatchError(
            getattr(exc, "errno", None) or errno.EAFNOSUPPORT,
            f"cannot open a netlink route socket: {exc}",
        ) from None
    try:
        sock.setblocking(False)
        # A burst (a VPN installing hundreds of routes) must not overrun the socket; if it
        # does anyway, ENOBUFS tells us and counts as a change.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)
        sock.bind((0, GROUPS))
    except OSError as exc:
        sock.close()
        raise NetworkWatchError(exc.errno, f"cannot subscribe to route changes: {exc}") from None
    return sock


def count_changes(data: bytes) -> int:
    """How many link/address/route messages a netlink datagram holds (malformed tail ignored)."""
    found = 0
    offset = 0
    # Each message is at least a header long, so the loop ends within len(data)/16 turns.
    while offset + _NLMSG_HDR.size <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSG_HDR.unpack_from(data, offset)
        if length < _NLMSG_HDR.size or offset + length > len(data):
            break
        if kind in _CHANGE_TYPES:
            found += 1
        offset += (length + 3) & ~3  # NLMSG_ALIGN
    return found


class NetworkWatcher:
    """Calls `on_change()` on the loop once per burst of network changes.

    A burst ends when no message came for `quiet` seconds; a burst that never goes quiet
    (a flapping link) still reports every `max_delay` seconds. Use from the loop's thread:

        watcher = NetworkWatcher(on_change)
        watcher.start(loop)          # raises NetworkWatchError when netlink is unavailable
        ...
        watcher.close()

    `sock`: an already opened route socket (`open_route_socket()`), e.g. one made in another
    network namespace; the watcher owns and closes it.
    """

    def __init__(
        self,
        on_change: Callable[[], None],
        *,
        quiet: float = 0.3,
        max_delay: float = 2.0,
        sock: socket.socket | None = None,
    ) -> None:
        self._on_change = on_change
        self._quiet = quiet
        self._max_delay = max(max_delay, quiet)
        self._sock = sock
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._burst_start: float | None = None
        self._last_message = 0.0
        self.messages = 0  # link/address/route messages seen (for tests and diagnostics)
        self.bursts = 0  # on_change calls
        self.overruns = 0  # ENOBUFS: the kernel dropped messages (treated as a change)

    @property
    def running(self) -> bool:
        return self._loop is not None

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Open the socket (unless given) and start watching, on `loop` (default: the
        running loop). Call on the loop's thread."""
        if self._loop is not None:
            return
        loop = loop or asyncio.get_running_loop()
        if self._sock is None:
            self._sock = open_route_socket()
        loop.add_reader(self._sock.fileno(), self._readable)
        self._loop = loop

    def close(self) -> None:
        """Stop watching and close the socket; no callback comes after this. Idempotent."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        # The loop may already be closed at shutdown: then there is no reader to remove.
        if self._loop is not None and self._sock is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._sock.fileno())
        self._loop = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _readable(self) -> None:
        assert self._sock is not None and self._loop is not None
        changed = 0
        for _ in range(_MAX_READS):
            try:
                data = self._sock.recv(_RECV_SIZE)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    # Messages were lost: we do not know what changed, so something did.
                    self.overruns += 1
                    changed += 1
                    continue
                _log.warning("network watch: reading route messages failed: %s", exc)
                break
            if not data:
                break
            changed += count_changes(data)
        if changed:
            self.messages += changed
            self._note(self._loop.time())

    def _note(self, now: float) -> None:
        assert self._loop is not None
        self._last_message = now
        if self._burst_start is None:
            self._burst_start = now
        due = min(now + self._quiet, self._burst_start + self._max_delay)
        if self._timer is not None:
            if self._timer.when() <= due:
                # The timer fires early and looks again (fewer timer objects in a flood).
                return
            self._timer.cancel()
        self._timer = self._loop.call_at(due, self._due)

    def _due(self) -> None:
        assert self._loop is not None and self._burst_start is not None
        self._timer = None
        now = self._loop.time()
        due = min(self._last_message + self._quiet, self._burst_start + self._max_delay)
        if now + 0.001 < due:
            self._timer = self._loop.call_at(due, self._due)
            return
        self._burst_start = None
        self.bursts += 1
        self._on_change()
