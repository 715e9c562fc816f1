"""Dialing an upstream proxy and running its handshake (HTTP CONNECT or SOCKS5).

Must not import PySide6. The protocol logic lives in relay/protocol (sans-IO); this module
only does the I/O around it.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import itertools
import os
import socket
import time
from dataclasses import dataclass

from tray_proxy.relay.credentials import Credentials, CredentialSource
from tray_proxy.relay.protocol.auth import basic_proxy_authorization
from tray_proxy.relay.protocol.errors import HandshakeRefused, ProtocolError
from tray_proxy.relay.protocol.handshake import UpstreamHandshake
from tray_proxy.relay.protocol.http_connect import ConnectHandshake
from tray_proxy.relay.protocol.socks5 import Socks5Handshake
from tray_proxy.relay.records import Address, CloseReason
from tray_proxy.relay.settings import UpstreamKind, UpstreamProxy

_RECV = 65536
_RESOLVE_TTL = 60.0
_PORT_CLASH = frozenset({errno.EADDRNOTAVAIL, errno.EADDRINUSE})


class UpstreamError(Exception):
    """This upstream could not give us a tunnel. `reason` is what the connection record keeps."""

    def __init__(self, reason: CloseReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(slots=True)
class _Resolved:
    addresses: list[tuple[int, Address]]
    expires: float


class SourcePorts:
    """Hands out source ports from the relay's reserved range, round robin.

    Several sockets may share a source port (SO_REUSEADDR) as long as the 4-tuples differ;
    a collision shows up as EADDRINUSE/EADDRNOTAVAIL and we move on to the next port.
    """

    def __init__(self, first: int, last: int) -> None:
        self.first = first
        self.last = last
        self._cycle = itertools.cycle(range(first, last + 1))
        self.attempts = min(64, last - first + 1)  # ports tried before giving up

    def bind(self, sock: socket.socket, family: int) -> None:
        host = "0.0.0.0" if family == socket.AF_INET else "::"
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        for _ in range(self.attempts):
            port = next(self._cycle)
            try:
                sock.bind((host, port))
                return
            except OSError as exc:
                if exc.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
                    raise
        raise OSError(errno.EADDRINUSE, f"no free source port in {self.first}-{self.last}")


class Dialer:
    """Opens TCP connections to upstreams, from the reserved source-port range."""

    def __init__(self, source_ports: tuple[int, int] | None) -> None:
        self._ports = SourcePorts(*source_ports) if source_ports else None
        self._cache: dict[tuple[str, int], _Resolved] = {}
        self._known: set[Address] = set()  # every address an upstream resolved to

    def is_upstream_address(self, addr: Address) -> bool:
        """Did we dial an upstream at this address? (A redirect of it would be a loop.)"""
        return addr in self._known

    async def resolve(self, host: str, port: int) -> list[tuple[int, Address]]:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
            self._known.add((str(ip), port))
            return [(family, (str(ip), port))]
        key = (host, port)
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is not None and cached.expires > now:
            return cached.addresses
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses: list[tuple[int, Address]] = []
        for family, _type, _proto, _canon, sockaddr in infos:
            entry = (int(family), (str(sockaddr[0]), int(sockaddr[1])))
            if entry not in addresses:
                addresses.append(entry)
        self._cache[key] = _Resolved(addresses, now + _RESOLVE_TTL)
        self._known.update(addr for _family, addr in addresses)
        return addresses

    async def connect(
        self, host: str, port: int, timeout: float, *, reserved: bool = True
    ) -> socket.socket:
        """A connected non-blocking socket, or UpstreamError (unreachable / timeout).

        `reserved`: bind to the reserved source-port range. Needed only when the
        destination port is one the redirect catches (an upstream on 80/443, or a direct
        connection): anything else is never redirected. Every source port in the range
        to one proxy address spends 60 s in TIME_WAIT after the relay closes first, so
        binding all upstream connections there would cap the relay at about
        range/60 new connections per second.
        """
        ports = self._ports if reserved else None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            addresses = await asyncio.wait_for(self.resolve(host, port), timeout)
        except asyncio.TimeoutError:
            raise UpstreamError(
                CloseReason.UPSTREAM_TIMEOUT, f"resolving {host} took over {timeout:g}s"
            ) from None
        except OSError as exc:
            raise UpstreamError(
                CloseReason.UPSTREAM_UNREACHABLE, f"cannot resolve {host}: {exc.strerror or exc}"
            ) from None
        last = "no address"
        for family, addr in addresses:
            # With SO_REUSEADDR, bind() accepts a source port that already carries a
            # connection to this very address; the clash shows only at connect() as
            # EADDRNOTAVAIL. Then the next port of the range is tried.
            for _ in range(ports.attempts if ports is not None else 1):
                sock = socket.socket(family, socket.SOCK_STREAM)
                try:
                    sock.setblocking(False)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    if ports is not None:
                        ports.bind(sock, family)
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        raise asyncio.TimeoutError
                    await asyncio.wait_for(loop.sock_connect(sock, addr), remaining)
                    return sock
                except asyncio.TimeoutError:
                    sock.close()
                    raise UpstreamError(
                        CloseReason.UPSTREAM_TIMEOUT,
                        f"connecting to {_fmt(addr)} took over {timeout:g}s",
                    ) from None
                except OSError as exc:
                    sock.close()
                    # asyncio's strerror is "Connect call failed (addr)": say why instead.
                    why = os.strerror(exc.errno) if exc.errno else str(exc)
                    last = f"{_fmt(addr)}: {why}"
                    if exc.errno not in _PORT_CLASH or ports is None:
                        break
                except BaseException:
                    sock.close()
                    raise
        raise UpstreamError(CloseReason.UPSTREAM_UNREACHABLE, f"cannot connect to {last}")


def _fmt(addr: Address) -> str:
    ip, port = addr
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def make_handshake(
    upstream: UpstreamProxy, target_host: str, target_port: int, credentials: CredentialSource
) -> UpstreamHandshake:
    """The protocol object for one tunnel through `upstream` to target_host:target_port."""
    creds = credentials.get(upstream.name, upstream.username)
    return handshake_for(upstream, target_host, target_port, creds)


def handshake_for(
    upstream: UpstreamProxy, target_host: str, target_port: int, creds: Credentials | None
) -> UpstreamHandshake:
    """Like make_handshake, with the credentials already looked up."""
    if upstream.kind is UpstreamKind.SOCKS5:
        if creds is None:
            return Socks5Handshake(target_host, target_port)
        return Socks5Handshake(
            target_host,
            target_port,
            username=creds.username,
            password=creds.password.reveal(),
        )
    headers: list[tuple[str, str]] = []
    if creds is not None:
        headers.append(basic_proxy_authorization(creds.username, creds.password.reveal()))
    return ConnectHandshake(target_host, target_port, headers=headers)


async def run_handshake(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    handshake: UpstreamHandshake,
    upstream: UpstreamProxy,
    timeout: float,
) -> bytes:
    """Drive `handshake` over `sock`; returns the bytes that followed it (tunnel data)."""

    async def drive() -> bytes:
        out = handshake.data_to_send()
        if out:
            await loop.sock_sendall(sock, out)
        while not handshake.done:
            data = await loop.sock_recv(sock, _RECV)
            handshake.receive_data(data)
            out = handshake.data_to_send()
            if out:
                await loop.sock_sendall(sock, out)
        return handshake.trailing

    try:
        return await asyncio.wait_for(drive(), timeout)
    except asyncio.TimeoutError:
        raise UpstreamError(
            CloseReason.UPSTREAM_TIMEOUT,
            f"proxy {upstream} did not complete the handshake within {timeout:g}s",
        ) from None
    except HandshakeRefused as exc:
        if exc.auth_failed:
            raise UpstreamError(
                CloseReason.UPSTREAM_AUTH_FAILED,
                f"proxy {upstream} rejected the credentials ({exc})",
            ) from None
        raise UpstreamError(CloseReason.UPSTREAM_REFUSED, f"proxy {upstream}: {exc}") from None
    except ProtocolError as exc:
        raise UpstreamError(
            CloseReason.UPSTREAM_PROTOCOL_ERROR, f"proxy {upstream} sent a bad answer: {exc}"
        ) from None
    except OSError as exc:
        raise UpstreamError(
            CloseReason.UPSTREAM_RESET,
            f"proxy {upstream} dropped the connection: {exc.strerror or exc}",
        ) from None
