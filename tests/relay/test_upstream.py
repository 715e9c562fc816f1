"""Dialer, SourcePorts, socks5_handshake and run_handshake on loopback sockets."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
import struct
import threading
import time

import pytest

from tests.relay.stubs import free_port_range, tcp_pair
from tray_proxy.relay.protocol.http_connect import ConnectHandshake
from tray_proxy.relay.records import CloseReason
from tray_proxy.relay.secrets import Credentials, Secret
from tray_proxy.relay.settings import UpstreamKind, UpstreamProxy
from tray_proxy.relay.upstream import (
    CredentialState,
    Dialer,
    SourcePorts,
    UpstreamAuth,
    UpstreamError,
    _Resolved,
    run_handshake,
    socks5_handshake,
)

HTTP = UpstreamProxy("corp", UpstreamKind.HTTP, "127.0.0.1", 3128, username="alice")
SOCKS = UpstreamProxy("socks", UpstreamKind.SOCKS5, "127.0.0.1", 1080, username="alice")


# -- SourcePorts -----------------------------------------------------------------------------


def _bound(ports: SourcePorts, count: int) -> list[int]:
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            socks.append(s)
            ports.bind(s, socket.AF_INET)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def test_source_ports_round_robin_and_wrap():
    first, last = free_port_range(3)
    assert _bound(SourcePorts(first, last), 7) == [first, first + 1, last] * 2 + [first]


def test_source_ports_skip_a_port_someone_listens_on():
    first, last = free_port_range(3)
    with socket.create_server(("0.0.0.0", first + 1)):
        assert _bound(SourcePorts(first, last), 4) == [first, last, first, last]


def test_source_ports_all_busy_says_which_range():
    first, last = free_port_range(2)
    with (
        socket.create_server(("0.0.0.0", first)),
        socket.create_server(("0.0.0.0", last)),
        pytest.raises(OSError) as info,
    ):
        _bound(SourcePorts(first, last), 1)
    assert info.value.errno == errno.EADDRINUSE
    assert f"{first}-{last}" in str(info.value)


def test_source_ports_ipv6():
    first, last = free_port_range(2)
    with socket.socket(socket.AF_INET6) as s:
        SourcePorts(first, last).bind(s, socket.AF_INET6)
        assert s.getsockname()[0] == "::" and first <= s.getsockname()[1] <= last


# -- Dialer ----------------------------------------------------------------------------------


def test_dialer_connects_from_the_source_range(run):
    first, last = free_port_range(4)

    async def main():
        with socket.create_server(("127.0.0.1", 0)) as server:
            server.setblocking(False)
            sock = await Dialer((first, last)).connect(*server.getsockname(), timeout=2)
            with sock:
                assert not sock.getblocking()
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                peer, _ = server.accept()
                with peer:
                    assert first <= peer.getpeername()[1] <= last
                    assert peer.getpeername() == sock.getsockname()

    run(main)


def test_dialer_refused_is_unreachable(run):
    async def main():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with pytest.raises(UpstreamError) as info:
            await Dialer(None).connect("127.0.0.1", port, timeout=2)
        assert info.value.reason is CloseReason.UPSTREAM_UNREACHABLE
        assert f"127.0.0.1:{port}" in info.value.detail
        assert "Connection refused" in info.value.detail

    run(main)


def test_dialer_timeout_when_the_proxy_does_not_answer_syn(run):
    async def main():
        # A listener whose accept queue is full drops further SYNs: connect hangs.
        with socket.socket() as server:
            server.bind(("127.0.0.1", 0))
            server.listen(0)
            fillers = []
            try:
                for _ in range(4):
                    f = socket.socket()
                    f.setblocking(False)
                    f.connect_ex(server.getsockname())
                    fillers.append(f)
                loop = asyncio.get_running_loop()
                started = loop.time()
                with pytest.raises(UpstreamError) as info:
                    await Dialer(None).connect(*server.getsockname(), timeout=0.3)
                assert loop.time() - started < 2
            finally:
                for f in fillers:
                    f.close()
        assert info.value.reason is CloseReason.UPSTREAM_TIMEOUT
        assert "0.3s" in info.value.detail

    run(main)


def test_dialer_resolves_names_once_and_ip_literals_never(run):
    async def main():
        dialer = Dialer(None)
        assert await dialer.resolve("::1", 80) == [(socket.AF_INET6, ("::1", 80))]
        assert await dialer.resolve("127.0.0.1", 80) == [(socket.AF_INET, ("127.0.0.1", 80))]
        assert dialer._cache == {}
        first = await dialer.resolve("localhost", 8080)  # /etc/hosts: no DNS traffic
        assert first and all(addr[0] in ("127.0.0.1", "::1") for _f, addr in first)
        assert await dialer.resolve("localhost", 8080) is first  # from the cache

    run(main)


LITERALS_AND_NAMES = [
    *("127.0.0.1", "::1", "[::1]", "fe80::1%eth0", "999.1.1.1", "1.2.3", "01.2.3.4", "1234"),
    *("", ".", " 10.0.0.1", "10.0.0.1 ", "proxy.corp", "10.0.0.1.nip.io", "\u0661.\u0662.\u0663"),
]


@pytest.mark.parametrize("host", LITERALS_AND_NAMES)
def test_dialer_takes_for_ip_literals_exactly_what_ipaddress_does(host):
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        expected = None
    else:
        family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
        expected = [(family, (str(ip), 443))]
    assert Dialer(None)._literal(host, 443) == expected


class _NoLookups(Dialer):
    async def resolve(self, host, port):
        raise AssertionError(f"looked up {host} again")


def test_dialer_dials_a_cached_name_without_looking_it_up(run):
    async def main():
        with socket.socket() as server:
            server.bind(("127.0.0.1", 0))
            server.listen()
            port = server.getsockname()[1]
            dialer = _NoLookups(None)
            dialer._cache[("proxy.corp.test", port)] = _Resolved(
                [(socket.AF_INET, ("127.0.0.1", port))], time.monotonic() + 60
            )
            sock = await dialer.connect("proxy.corp.test", port, timeout=2)
            sock.close()
            dialer._cache[("proxy.corp.test", port)].expires = 0.0
            with pytest.raises(AssertionError, match="looked up proxy.corp.test again"):
                await dialer.connect("proxy.corp.test", port, timeout=2)

    run(main)


class _BrokenResolver(Dialer):
    def __init__(self, error: BaseException | None) -> None:
        super().__init__(None)
        self.error = error

    async def resolve(self, host, port):
        if self.error is None:
            await asyncio.sleep(3600)
        raise self.error


def test_dialer_resolve_failures(run):
    async def main():
        with pytest.raises(UpstreamError) as info:
            await _BrokenResolver(socket.gaierror(-2, "Name or service not known")).connect(
                "proxy.corp.test", 3128, timeout=1
            )
        assert info.value.reason is CloseReason.UPSTREAM_UNREACHABLE
        assert "proxy.corp.test" in info.value.detail
        with pytest.raises(UpstreamError) as info:
            await _BrokenResolver(None).connect("proxy.corp.test", 3128, timeout=0.1)
        assert info.value.reason is CloseReason.UPSTREAM_TIMEOUT

    run(main)


# -- socks5_handshake ------------------------------------------------------------------------


def test_socks5_handshake_offers_user_pass_only_with_credentials():
    hs = socks5_handshake("www.example.test", 443, Credentials("alice", Secret("pw")))
    greeting = hs.data_to_send()
    assert greeting[0] == 5 and 2 in greeting[2:]
    plain = socks5_handshake("www.example.test", 443, None)
    assert plain.data_to_send() == b"\x05\x01\x00"


# -- run_handshake ---------------------------------------------------------------------------


ANSWERS = {
    "ok-glued": (b"HTTP/1.1 200 Connection established\r\n\r\ntunnel bytes", None),
    "407": (
        b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic\r\n\r\n",
        CloseReason.UPSTREAM_AUTH_FAILED,
    ),
    "502": (b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n", CloseReason.UPSTREAM_REFUSED),
    "eof": (b"", CloseReason.UPSTREAM_PROTOCOL_ERROR),
    "garbage": (b"\x00\x01\x02\r\n\r\n", CloseReason.UPSTREAM_PROTOCOL_ERROR),
    "silent": (None, CloseReason.UPSTREAM_TIMEOUT),
    "rst": ("rst", CloseReason.UPSTREAM_RESET),
}


@pytest.mark.parametrize("case", list(ANSWERS))
def test_run_handshake_outcomes(run, case):
    answer, reason = ANSWERS[case]

    async def main():
        loop = asyncio.get_running_loop()
        ours, proxy = tcp_pair()
        try:
            hs = ConnectHandshake("www.example.test", 443)

            async def play_proxy():
                request = await loop.sock_recv(proxy, 65536)
                assert request.startswith(b"CONNECT www.example.test:443 ")
                if answer == "rst":
                    proxy.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    proxy.close()
                elif answer == b"":
                    proxy.shutdown(socket.SHUT_WR)
                elif answer is not None:
                    await loop.sock_sendall(proxy, answer)

            player = asyncio.ensure_future(play_proxy())
            if reason is None:
                trailing = await run_handshake(loop, ours, hs, HTTP, timeout=2)
                assert trailing == b"tunnel bytes"
            else:
                with pytest.raises(UpstreamError) as info:
                    await run_handshake(loop, ours, hs, HTTP, timeout=0.3)
                assert info.value.reason is reason
                assert str(HTTP) in info.value.detail  # names the proxy for the user
            await player
        finally:
            ours.close()
            proxy.close()

    run(main)


# -- UpstreamAuth: credential versions and re-verification -------------------------------------


def _alice(password: str) -> Credentials:
    return Credentials("alice", Secret(password))


def test_upstream_auth_outcomes_count_only_for_their_version_and_are_announced_once(run):
    """A transcript of UpstreamAuth: what it lets through, and what it tells."""
    told: list[tuple[str, str]] = []

    async def main():
        auth = UpstreamAuth(
            lambda c: told.append(("rejected", c.password.reveal())),
            lambda c: told.append(("accepted", c.password.reveal())),
        )
        wrong = _alice("wrong")
        permit = await auth.permit(wrong, 1)
        assert permit.verifier and permit.version == 1
        assert auth.settle(permit, CredentialState.REJECTED)
        assert auth.state is CredentialState.REJECTED and auth.announce()
        assert not auth.announce()  # once per version
        with pytest.raises(UpstreamError, match="not tried again until they change"):
            await auth.permit(wrong, 1)
        # The backoff is over: one verifier, of the same version.
        assert auth.reverify() == 1 and auth.reverify() is None
        again = await auth.permit(wrong, 1)
        assert again.verifier and again.version == 1
        assert auth.settle(again, CredentialState.REJECTED)
        assert not auth.announce()  # the same version: not told again
        # No answer from a re-verification: rejected again until the next period.
        assert auth.reverify() == 1
        assert auth.back_off(1) and auth.state is CredentialState.REJECTED
        # The same password entered again: a new version; an outcome of the old is ignored.
        assert auth.reverify() == 1
        stale = await auth.permit(wrong, 1)
        auth.renew()
        assert auth.version == 2 and auth.state is CredentialState.UNVERIFIED
        assert not auth.back_off(1)
        assert not auth.settle(stale, CredentialState.REJECTED)
        assert auth.state is CredentialState.UNVERIFIED
        fresh = await auth.permit(wrong, 1)
        auth.settle(fresh, CredentialState.VERIFIED)
        assert told == [("rejected", "wrong"), ("rejected", "wrong"), ("accepted", "wrong")]
        # A changed password is a new version too; doubt() and reject() act on verified ones.
        right = _alice("right")
        assert not auth.rejected(right) and auth.version == 3
        auth.reject(right)  # not verified: nothing to take back
        assert auth.state is CredentialState.UNVERIFIED
        auth.settle(await auth.permit(right, 1), CredentialState.VERIFIED)
        assert auth.verified(right)
        auth.reject(right)
        assert auth.state is CredentialState.REJECTED and auth.announce()
        assert told[-1] == ("rejected", "right")
        assert auth.close() is None  # no auth thread was started

    run(main)


def test_upstream_auth_threads_start_on_use_and_end_with_close():
    before = set(threading.enumerate())
    auth = UpstreamAuth()
    threads = auth.threads()
    assert auth.threads() is threads
    assert threads.submit(threading.current_thread).result(5).name.startswith("proxy-auth")
    assert auth.close() is threads
    threads.shutdown(wait=True)
    assert set(threading.enumerate()) <= before
