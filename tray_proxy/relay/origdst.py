"""Where a redirected connection was going: SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST.

Must not import PySide6. Linux only (conntrack keeps the pre-NAT destination).
"""

from __future__ import annotations

import socket

from tray_proxy.relay.records import Address

# linux/netfilter_ipv4.h and linux/netfilter_ipv6/ip6_tables.h: both are 80.
SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80
_SOCKADDR_IN_LEN = 16
_SOCKADDR_IN6_LEN = 28
# Raw sockaddr -> address, for destinations seen before: most connections go where others
# went (docs/relay.md, "Original destination from a bounded map").
_SEEN: dict[bytes, Address] = {}
_SEEN_KEPT = 4096


def parse_sockaddr(family: int, raw: bytes) -> Address:
    """Decode a struct sockaddr_in / sockaddr_in6 as returned by getsockopt."""
    port = int.from_bytes(raw[2:4], "big")
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
    return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port


def original_destination(sock: socket.socket, family: int | None = None) -> Address | None:
    """The destination the client dialed before nftables redirected it, or None.

    None means the kernel has no NAT record of this connection (nothing redirected it).
    The family of the accepted socket decides which option to ask; a caller that knows it
    (the listener's) passes it, sparing the enum conversion of `sock.family`.
    """
    if family is None:
        family = sock.family
    try:
        if family == socket.AF_INET:
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN_LEN)
        elif family == socket.AF_INET6:
            raw = sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6_LEN)
        else:
            return None
    except OSError:
        return None
    dst = _SEEN.get(raw)
    if dst is None:
        dst = parse_sockaddr(family, raw)
        if len(_SEEN) >= _SEEN_KEPT:
            _SEEN.clear()
        _SEEN[raw] = dst
    return dst
