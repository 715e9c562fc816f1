"""Notices network changes (links, addresses, routes) from the kernel, for issue 15 section 5.

A laptop that leaves the corporate network, a VPN that comes up, a Wi-Fi that changes: each
shows as rtnetlink messages. `NetworkWatcher` listens to them on an AF_NETLINK socket (stdlib
`socket`, no pyroute2), on an asyncio loop (`add_reader`: asyncio and uvloop alike), and calls
`on_change()` once per burst, so the caller re-probes the proxies right away instead of
waiting for the periodic probe. One `ip link set eth0 down` alone sends a link message, the
removal of its routes and addresses, for IPv4 and IPv6; those are one change.

The watcher keeps what it knows of links (up, running, carrier), addresses and routes, loaded
with one dump at start, and counts only messages that change it: a DHCP renewal or an IPv6
router advertisement re-announces an address with new lifetimes (every few minutes, on some
networks every few seconds), which changes nothing a probe could see. A message it cannot read
counts as a change: a needless probe is cheap, a missed network change is not.

Must not import PySide6, qasync or the relay engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import select
import socket
import struct
import time
from collections.abc import Callable

__all__ = [
    "Debounce",
    "NetworkState",
    "NetworkWatchError",
    "NetworkWatcher",
    "count_changes",
    "open_route_socket",
]

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


_NLM_F_REQUEST = 0x1
_NLM_F_MULTI = 0x2  # part of a dump answer: what already is, not a change
_NLM_F_DUMP = 0x300
_NLM_F_REPLACE = 0x100  # on RTM_NEWROUTE: it replaced an existing route
_RTM_NEWROUTE = 24
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_RTM_GETLINK, _RTM_GETADDR, _RTM_GETROUTE = 18, 22, 26
_DELETES = frozenset({17, 21, 25})  # RTM_DELLINK, RTM_DELADDR, RTM_DELROUTE
_RTA = struct.Struct("=HH")
_IFINFO = struct.Struct("=BxHiII")  # family, type, index, flags, change
_IFADDR = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_RTMSG = struct.Struct(
    "=BBBBBBBBI"
)  # family, dst_len, src_len, tos, table, proto, scope, type, flags
# Link flags that decide reachability: IFF_UP, IFF_RUNNING, IFF_LOWER_UP, IFF_DORMANT.
_LINK_FLAGS = 0x1 | 0x40 | 0x10000 | 0x20000
_IFLA_IFNAME, _IFLA_OPERSTATE = 3, 16
_IFA_ADDRESS, _IFA_LOCAL, _IFA_FLAGS = 1, 2, 8
# Address flags that decide whether it is usable: optimistic, DAD failed, deprecated,
# tentative. Others (permanent, nodad, noprefixroute...) are how it was configured.
_ADDR_FLAGS = 0x04 | 0x08 | 0x20 | 0x40
_RTA_DST, _RTA_SRC, _RTA_OIF, _RTA_GATEWAY, _RTA_PRIORITY = 1, 2, 4, 5, 6
_RTA_PREFSRC, _RTA_MULTIPATH, _RTA_TABLE, _RTA_VIA = 7, 9, 15, 18
_RTM_F_CLONED = 0x200  # an IPv6 route cache entry (path MTU), not the routing table
_MAX_KNOWN = 20_000  # items remembered; past that every message counts (a full BGP table)
_DUMP_TIMEOUT = 0.5


def _attributes(data: bytes, offset: int) -> dict[int, bytes]:
    """rtattr type -> value from `offset` to the end; a torn attribute ends the list."""
    found: dict[int, bytes] = {}
    while offset + _RTA.size <= len(data):
        length, kind = _RTA.unpack_from(data, offset)
        if length < _RTA.size or offset + length > len(data):
            break
        found[kind & 0x3FFF] = data[offset + _RTA.size : offset + length]
        offset += (length + 3) & ~3
    return found


_Key = tuple[object, ...]


def _link(body: bytes) -> tuple[_Key, _Key]:
    _family, _type, index, flags, _change = _IFINFO.unpack_from(body)
    attrs = _attributes(body, _IFINFO.size)
    return ("link", index), (
        flags & _LINK_FLAGS,
        attrs.get(_IFLA_OPERSTATE),
        attrs.get(_IFLA_IFNAME),
    )


def _address(body: bytes) -> tuple[_Key, _Key]:
    # Lifetimes (IFA_CACHEINFO) are left out on purpose: a renewal changes only them.
    family, prefixlen, flags, scope, index = _IFADDR.unpack_from(body)
    attrs = _attributes(body, _IFADDR.size)
    key = ("addr", family, index, prefixlen, attrs.get(_IFA_LOCAL), attrs.get(_IFA_ADDRESS))
    extended = attrs.get(_IFA_FLAGS)
    if extended is not None and len(extended) == 4:
        flags = int.from_bytes(extended, "little")
    return key, (flags & _ADDR_FLAGS, scope)


def _route(body: bytes) -> tuple[_Key, _Key] | None:
    family, dst_len, src_len, tos, table, proto, scope, kind, flags = _RTMSG.unpack_from(body)
    if flags & _RTM_F_CLONED:
        return None
    attrs = _attributes(body, _RTMSG.size)
    # The device is part of the key: IPv6 keeps one route per device for the same prefix
    # (ff00::/8 on every link). A replace that moves a route to another device is handled
    # in NetworkState._apply.
    key = (
        "route", family, attrs.get(_RTA_TABLE, table), attrs.get(_RTA_DST), dst_len,
        attrs.get(_RTA_SRC), src_len, tos, attrs.get(_RTA_PRIORITY), attrs.get(_RTA_OIF),
    )  # fmt: skip
    value = (
        kind, proto, scope, attrs.get(_RTA_GATEWAY), attrs.get(_RTA_VIA),
        attrs.get(_RTA_PREFSRC), attrs.get(_RTA_MULTIPATH),
    )  # fmt: skip
    return key, value


_PARSERS = {16: _link, 17: _link, 20: _address, 21: _address, 24: _route, 25: _route}


def _dump_done(data: bytes, seq: int) -> bool:
    """Does the datagram end dump `seq` (NLMSG_DONE)? An NLMSG_ERROR for it is a ValueError."""
    offset = 0
    while offset + _NLMSG_HDR.size <= len(data):
        length, kind, _flags, got, _pid = _NLMSG_HDR.unpack_from(data, offset)
        if length < _NLMSG_HDR.size:
            break
        if got == seq and kind == _NLMSG_DONE:
            return True
        if got == seq and kind == _NLMSG_ERROR:
            raise ValueError("the kernel refused the dump request")
        offset += (length + 3) & ~3
    return False


class NetworkState:
    """What the watcher knows of links, addresses and routes; `feed` says how many messages
    changed it. Without a dump first, everything it had not seen counts as a change."""

    def __init__(self, limit: int = _MAX_KNOWN) -> None:
        self._known: dict[_Key, _Key] = {}
        self._limit = limit
        self.overflowed = False  # too much to remember: every message counts

    def __len__(self) -> int:
        return len(self._known)

    def feed(self, data: bytes, *, learning: bool = False) -> int:
        """Apply a datagram; the number of messages that changed something. `learning`:
        a dump answer (also recognised by NLM_F_MULTI), which is never a change."""
        changed = 0
        offset = 0
        while offset + _NLMSG_HDR.size <= len(data):
            length, kind, flags, _seq, _pid = _NLMSG_HDR.unpack_from(data, offset)
            if length < _NLMSG_HDR.size or offset + length > len(data):
                break
            if kind in _CHANGE_TYPES:
                body = data[offset + _NLMSG_HDR.size : offset + length]
                dump = learning or bool(flags & _NLM_F_MULTI)
                if self._apply(kind, flags, body) and not dump:
                    changed += 1
            offset += (length + 3) & ~3
        return changed

    def _apply(self, kind: int, flags: int, body: bytes) -> bool:
        try:
            parsed = _PARSERS[kind](body)
        except struct.error:
            return True  # unreadable: assume it mattered
        if parsed is None:
            return False
        key, value = parsed
        if kind in _DELETES:
            self._known.pop(key, None)
            return True  # also what we never knew: we may have started mid-change
        if kind == _RTM_NEWROUTE and flags & _NLM_F_REPLACE:
            # It replaced a route we may know under another device: forget that one, or
            # its later return would look like nothing new.
            for old in [k for k in self._known if k[:-1] == key[:-1] and k != key]:
                del self._known[old]
        if self._known.get(key) == value:
            return False
        if len(self._known) >= self._limit and key not in self._known:
            self.overflowed = True
            return True
        self._known[key] = value
        return True


class Debounce:
    """Calls `fire()` on `loop` once per burst of `note()`s: `quiet` seconds after the last
    note, yet never later than `max_delay` after the burst's first, so a burst that never
    goes quiet (a flapping link, an editor saving in a loop) still fires every `max_delay`.
    The network watcher and the settings-file watch (config_watch.py) share it. Use from the
    loop's thread; `cancel()` drops a pending burst."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        fire: Callable[[], None],
        *,
        quiet: float,
        max_delay: float,
    ) -> None:
        self._loop = loop
        self._fire = fire
        self._quiet = quiet
        self._max_delay = max(max_delay, quiet)
        self._timer: asyncio.TimerHandle | None = None
        self._burst_start: float | None = None
        self._last_note = 0.0

    def note(self) -> None:
        now = self._loop.time()
        self._last_note = now
        if self._burst_start is None:
            self._burst_start = now
        due = min(now + self._quiet, self._burst_start + self._max_delay)
        if self._timer is not None:
            if self._timer.when() <= due:
                # The timer fires early and looks again (fewer timer objects in a flood).
                return
            self._timer.cancel()
        self._timer = self._loop.call_at(due, self._due)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._burst_start = None

    def _due(self) -> None:
        assert self._burst_start is not None
        self._timer = None
        due = min(self._last_note + self._quiet, self._burst_start + self._max_delay)
        if self._loop.time() + 0.001 < due:
            self._timer = self._loop.call_at(due, self._due)
            return
        self._burst_start = None
        self._fire()


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
        self._max_delay = max_delay
        self._sock = sock
        self._loop: asyncio.AbstractEventLoop | None = None
        self._burst: Debounce | None = None
        self.state = NetworkState()
        self.messages = 0  # link/address/route messages seen (for tests and diagnostics)
        self.changes = 0  # of those, the ones that changed something
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
        self._loop = loop
        self._burst = Debounce(loop, self._burst_over, quiet=self._quiet, max_delay=self._max_delay)
        changed = self._dump()
        loop.add_reader(self._sock.fileno(), self._readable)
        if changed:
            self._burst.note()

    def _dump(self) -> int:
        """Load what is there now (links, addresses, routes), so that re-announcements of
        it are not changes. Bounded by _DUMP_TIMEOUT; on any trouble the state starts empty
        (then the first word about each thing counts as a change: harmless). Returns the
        changes announced meanwhile."""
        assert self._sock is not None
        changed = 0
        deadline = time.monotonic() + _DUMP_TIMEOUT
        for seq, (request, header) in enumerate(
            ((_RTM_GETLINK, 16), (_RTM_GETADDR, 8), (_RTM_GETROUTE, 12)), start=1
        ):
            message = _NLMSG_HDR.pack(
                _NLMSG_HDR.size + header, request, _NLM_F_REQUEST | _NLM_F_DUMP, seq, 0
            ) + bytes(header)
            try:
                self._sock.sendto(message, (0, 0))
                done = False
                while not done:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or not select.select([self._sock], [], [], remaining)[0]:
                        raise TimeoutError("no complete dump answer")
                    try:
                        data = self._sock.recv(_RECV_SIZE)
                    except OSError as exc:
                        if exc.errno != errno.ENOBUFS:
                            raise
                        self.overruns += 1  # notifications lost before we started
                        changed += 1
                        continue
                    self.messages += count_changes(data)
                    changed += self.state.feed(data)
                    done = _dump_done(data, seq)
            except (OSError, ValueError) as exc:
                _log.info("network watch: no initial dump (%s); learning as it goes", exc)
                self.state = NetworkState()
                return changed + 1
        return changed

    def close(self) -> None:
        """Stop watching and close the socket; no callback comes after this. Idempotent."""
        if self._burst is not None:
            self._burst.cancel()
            self._burst = None
        # The loop may already be closed at shutdown: then there is no reader to remove.
        if self._loop is not None and self._sock is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._sock.fileno())
        self._loop = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _readable(self) -> None:
        assert self._sock is not None and self._burst is not None
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
                    # Messages were lost: we do not know what changed, so something did,
                    # and what we knew may be wrong now: forget it (no change goes unseen).
                    self.overruns += 1
                    self.state = NetworkState()
                    changed += 1
                    continue
                _log.warning("network watch: reading route messages failed: %s", exc)
                break
            if not data:
                break
            self.messages += count_changes(data)
            changed += self.state.feed(data)
        if changed:
            self.changes += changed
            self._burst.note()

    def _burst_over(self) -> None:
        self.bursts += 1
        self._on_change()
