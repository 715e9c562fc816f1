"""A proxy on this host (loopback): the relay's connections to it use Reno, not the system's
pacing congestion control (relay/sockets.py keep_on_host); a proxy elsewhere keeps the
system's choice.

The engine tests read the relay's sockets from outside, with `ss -ti` (iproute2), as an
administrator would: every socket whose destination is the proxy stub's port is the
relay's (the stub's own sockets have it as their source port).
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from tests.relay.stubs import (
    ConnectProxy,
    Origin,
    Socks5Proxy,
    echo,
    http_upstream,
    running_relay,
    socks_upstream,
    until,
)
from tray_proxy.relay.sockets import keep_on_host

_AVAILABLE = Path("/proc/sys/net/ipv4/tcp_available_congestion_control")


def _congestion(sock: socket.socket) -> str:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).rstrip(b"\0").decode()


@pytest.mark.parametrize(
    ("ip", "family", "local"),
    [
        ("127.0.0.1", socket.AF_INET, True),
        ("127.45.6.7", socket.AF_INET, True),
        ("::1", socket.AF_INET6, True),
        ("::ffff:127.0.0.1", socket.AF_INET6, True),
        ("10.1.2.3", socket.AF_INET, False),
        ("128.0.0.1", socket.AF_INET, False),
        ("::1a", socket.AF_INET6, False),
        ("fd00::1", socket.AF_INET6, False),
    ],
)
def test_only_a_loopback_proxy_gets_reno(ip, family, local):
    assert "cubic" in _AVAILABLE.read_text().split(), "the kernel offers no cubic"
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # Start from a congestion control that is not Reno, whatever the system's default.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, b"cubic")
        keep_on_host(sock, ip)
        assert _congestion(sock) == ("reno" if local else "cubic")


def _relay_congestion(proxy_port: int) -> list[str]:
    """The congestion control of each established socket to 127.0.0.1:`proxy_port`."""
    ss = shutil.which("ss")
    assert ss is not None, "ss (iproute2) is missing: the test command installs iproute2"
    names = set(_AVAILABLE.read_text().split())
    out = subprocess.run(
        [ss, "-tinH", "state", "established", "dst", f"127.0.0.1:{proxy_port}"],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout
    # Each socket: an address line, then an info line that names its congestion control.
    found = [word for word in out.split() if word in names]
    assert len(found) * 2 == len(out.splitlines()), out
    return found


async def _hold(address: tuple[str, int]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client connection with its tunnel open: one echo went through it."""
    reader, writer = await asyncio.open_connection(*address)
    writer.write(b"ping")
    await writer.drain()
    assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
    return reader, writer


def test_tunnels_and_spares_to_a_local_http_proxy_use_reno(run):
    async def main():
        async with (
            Origin(echo) as origin,
            ConnectProxy() as proxy,
            running_relay([http_upstream(proxy)], origin.address, spare_connections=2) as relay,
        ):
            port = proxy.address[1]
            _, writer = await _hold(relay.address)  # the fast path dialed for it
            assert _relay_congestion(port) == ["reno"]
            writer.close()
            # The tunnel ended: two spares are dialed for the next connections.
            await until(lambda: len(proxy.accepted) == 3, what="two spares accepted")
            await until(lambda: len(_relay_congestion(port)) == 2, what="only the spares left")
            assert _relay_congestion(port) == ["reno", "reno"]
            _, writer = await _hold(relay.address)  # rides a spare
            assert relay.engine.stats["spare_taken"] == 1
            assert _relay_congestion(port) == ["reno", "reno"]
            writer.close()

    run(main)


def test_a_tunnel_through_a_local_socks_proxy_uses_reno(run):
    """SOCKS5 opens on the coroutine path, through the Dialer."""

    async def main():
        async with (
            Origin(echo) as origin,
            Socks5Proxy() as proxy,
            running_relay([socks_upstream(proxy)], origin.address) as relay,
        ):
            _, writer = await _hold(relay.address)
            assert _relay_congestion(proxy.address[1]) == ["reno"]
            writer.close()

    run(main)
