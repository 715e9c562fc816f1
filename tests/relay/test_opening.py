"""The fast path (relay/opening.py): when it applies, its time limits, and its hand-overs to
the Task path, against the proxy stubs on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import pytest

from tests.relay.stubs import (
    ConnectProxy,
    Mode,
    Origin,
    Relay,
    echo,
    echo_once,
    http_upstream,
    read_until_error,
    running_relay,
    until,
)
from tray_proxy.relay import opening
from tray_proxy.relay.events import CredentialsRejected, UpstreamFailed
from tray_proxy.relay.records import CloseReason, ConnectionRecord
from tray_proxy.relay.secrets import Credentials, Secret, StaticCredentialSource


@pytest.fixture
def openings(monkeypatch: pytest.MonkeyPatch) -> list[opening.Opening]:
    """Every Opening the engine starts (the fast path was taken for these connections)."""
    started: list[opening.Opening] = []
    original = opening.Opening.start

    def start(self: opening.Opening, record: ConnectionRecord) -> None:
        started.append(self)
        original(self, record)

    monkeypatch.setattr(opening.Opening, "start", start)
    return started


def _assert_nothing_registered(relay) -> None:  # type: ignore[no-untyped-def]
    """No descriptor of a finished connection stays in the engine's epoll set."""
    poller = relay.engine._poller
    assert poller is not None and len(poller) == 0, poller._masks


def test_the_request_goes_out_without_waiting_for_writability(run, openings, monkeypatch):
    """A client that spoke before the accept and a proxy that answered the SYN within
    connect(): the CONNECT leaves in the accept callback itself, from Opening.begin, before
    the engine makes the connection's record, publishes its event or registers anything
    (that work would otherwise count in every connection's latency)."""
    waits: list[int] = []
    seen: list[tuple[bool, int, int]] = []
    original = opening.Opening._on_connected
    original_begin = opening.Opening.begin

    def on_connected(self: opening.Opening) -> None:
        waits.append(1)
        original(self)

    def begin(self: opening.Opening) -> None:
        original_begin(self)
        engine = self.hooks
        seen.append((self.asked, len(engine._records), len(engine._poller)))  # type: ignore[attr-defined]

    monkeypatch.setattr(opening.Opening, "_on_connected", on_connected)
    monkeypatch.setattr(opening.Opening, "begin", begin)

    async def main():
        async with (
            Origin(echo) as origin,
            ConnectProxy() as proxy,
            running_relay([http_upstream(proxy)], origin.address, peek_timeout=1.0) as relay,
        ):
            # Connect and send before the loop runs the relay's accept.
            client = socket.create_connection(relay.address)
            client.sendall(b"GET / HTTP/1.1\r\nHost: example.test\r\n\r\n")
            client.setblocking(False)
            loop = asyncio.get_running_loop()
            echoed = b""
            while len(echoed) < 38:
                echoed += await asyncio.wait_for(loop.sock_recv(client, 100), 5)
            client.close()
            assert echoed.startswith(b"GET / HTTP/1.1")
            assert proxy.requests[0].target == ("example.test", origin.address[1])
            await relay.wait_closed(1)
            assert len(openings) == 1 and waits == []
            assert seen == [(True, 0, 0)]  # asked; no record, no registration yet
            assert relay.record().host == "example.test"
            _assert_nothing_registered(relay)

    run(main)


def test_a_silent_client_gets_a_tunnel_to_the_ip_after_the_peek_time(run, openings):
    async def main():
        async with (
            Origin(echo) as origin,
            ConnectProxy() as proxy,
            running_relay([http_upstream(proxy)], origin.address, peek_timeout=0.2) as relay,
        ):
            reader, writer = await relay.connect()
            await until(lambda: proxy.requests and proxy.requests[0].target, 5, "the CONNECT")
            assert proxy.requests[0].target == origin.address  # no name: the IP
            writer.write(b"late")
            assert await asyncio.wait_for(reader.readexactly(4), 5) == b"late"
            writer.close()
            await relay.wait_closed(1)
            assert len(openings) == 1
            _assert_nothing_registered(relay)

    run(main)


def test_connect_timeout_on_the_fast_path(run, openings):
    """A proxy whose accept queue is full drops our SYN: the connect times out."""

    async def main():
        full = socket.socket()
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        queued = [socket.socket() for _ in range(4)]
        for s in queued:
            s.setblocking(False)
            s.connect_ex(full.getsockname())
        await asyncio.sleep(0.05)
        host, port = full.getsockname()
        upstream = opening_upstream(host, port)
        try:
            async with (
                Origin(echo) as origin,
                running_relay(
                    [upstream], origin.address, connect_timeout=0.3, peek_timeout=0.0
                ) as relay,
            ):
                reader, writer = await relay.connect()
                await read_until_error(reader)
                writer.close()
                (closed,) = await relay.wait_closed(1)
                assert closed.reason is CloseReason.UPSTREAM_TIMEOUT, closed
                assert "took over 0.3s" in closed.detail
                assert len(openings) == 1
                (failed,) = relay.of(UpstreamFailed)
                assert failed.reason is CloseReason.UPSTREAM_TIMEOUT
                _assert_nothing_registered(relay)
        finally:
            full.close()
            for s in queued:
                s.close()

    run(main)


def opening_upstream(host: str, port: int):  # type: ignore[no-untyped-def]
    from tray_proxy.relay.settings import UpstreamKind, UpstreamProxy

    return UpstreamProxy("corp", UpstreamKind.HTTP, host, port)


def test_handshake_timeout_on_the_fast_path(run, openings):
    async def main():
        async with (
            Origin(echo) as origin,
            ConnectProxy(Mode.SILENT) as proxy,
            running_relay([http_upstream(proxy)], origin.address, handshake_timeout=0.3) as relay,
        ):
            reader, writer = await relay.connect()
            await read_until_error(reader)
            writer.close()
            (closed,) = await relay.wait_closed(1)
            assert closed.reason is CloseReason.UPSTREAM_TIMEOUT
            assert "did not complete the handshake within 0.3s" in closed.detail
            assert len(proxy.requests) == 1  # the Task path did not try again
            _assert_nothing_registered(relay)

    run(main)


def test_verified_basic_credentials_take_the_fast_path_and_a_later_407_is_final(run, openings):
    """The first connection verifies the password on the Task path; later ones take the
    fast path with the same header. When the proxy stops taking it (a 407 offering Basic
    only), that one failed login is final: no re-check that would cost another (issue 16
    item 7), and the password goes nowhere after that until the re-verification."""
    creds = StaticCredentialSource({"corp": Credentials("alice", Secret("right"))})

    async def main():
        async with (
            Origin(echo) as origin,
            ConnectProxy(credentials=("alice", "right")) as proxy,
            running_relay([http_upstream(proxy, "corp", "alice")], origin.address, creds) as relay,
        ):
            assert await echo_once(relay.address) == b"ping"
            await relay.wait_closed(1)
            assert openings == []  # unverified: the Task path
            for i in range(3):
                assert await echo_once(relay.address) == b"ping"
                await relay.wait_closed(2 + i)
            assert len(openings) == 3
            auth_headers = {r.headers.get("proxy-authorization") for r in proxy.requests}
            assert len(auth_headers) == 1 and None not in auth_headers
            # The password changes on the directory side.
            proxy.credentials = ("alice", "changed")
            before = len(proxy.requests)
            reader, writer = await relay.connect()
            await read_until_error(reader)
            writer.close()
            (*_, closed) = await relay.wait_closed(5)
            assert closed.reason is CloseReason.UPSTREAM_AUTH_FAILED, closed
            # One request from the fast path: no re-check.
            assert len(proxy.requests) - before == 1
            assert "rejected the credentials of alice (Basic)" in closed.detail
            assert "tray-proxy credentials set corp" in closed.detail
            assert [e.username for e in relay.of(CredentialsRejected)] == ["alice"]
            # From now on the stored password is sent nowhere.
            reader, writer = await relay.connect()
            await read_until_error(reader)
            writer.close()
            await relay.wait_closed(6)
            assert len(proxy.requests) - before == 1
            _assert_nothing_registered(relay)

    run(main)


class _SchemeChangingProxy(ConnectProxy):
    """Basic; once `hiccups` is set, it refuses that many requests with a 407 that offers
    another scheme besides Basic (the proxy's offer changed), then takes Basic again."""

    hiccups = 0

    def authenticate(self, req):
        if self.hiccups:
            self.hiccups -= 1
            return (
                b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                b"Proxy-Authenticate: Bearer\r\n"
                b'Proxy-Authenticate: Basic realm="x"\r\nContent-Length: 0\r\n\r\n'
            )
        return super().authenticate(req)


def test_a_407_that_offers_another_scheme_is_rechecked_on_the_task_path(run, openings):
    creds = StaticCredentialSource({"corp": Credentials("alice", Secret("right"))})

    async def main():
        async with (
            Origin(echo) as origin,
            _SchemeChangingProxy(credentials=("alice", "right")) as proxy,
            running_relay([http_upstream(proxy, "corp", "alice")], origin.address, creds) as relay,
        ):
            for i in range(2):
                assert await echo_once(relay.address) == b"ping"
                await relay.wait_closed(1 + i)
            assert len(openings) == 1
            proxy.hiccups = 1
            before = len(proxy.requests)
            # The fast path's 407 offers Digest too: the Task path answers the offer.
            assert await echo_once(relay.address) == b"ping"
            assert len(proxy.requests) - before == 2
            assert relay.of(CredentialsRejected) == []

    run(main)


def test_a_proxy_that_hangs_up_before_the_request_hands_over_to_the_task_path(run, openings):
    """Connected, still peeking, and the proxy closes: the Task path dials again and
    reports what that proxy does."""

    async def main():
        accepted: list[int] = []

        async def hang_up(reader, writer):  # type: ignore[no-untyped-def]
            accepted.append(1)
            writer.close()

        server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
        host, port = server.sockets[0].getsockname()[:2]
        try:
            async with (
                Origin(echo) as origin,
                # No spares (tests/relay/test_spares.py): the dials are counted here.
                running_relay(
                    [opening_upstream(host, port)],
                    origin.address,
                    peek_timeout=2.0,
                    spare_connections=0,
                ) as relay,
            ):
                reader, writer = await relay.connect()
                await until(lambda: accepted, 5, "the first dial")
                await asyncio.sleep(0.1)  # the hang-up reaches the relay while it peeks
                writer.write(b"GET / HTTP/1.1\r\nHost: example.test\r\n\r\n")
                await read_until_error(reader)
                writer.close()
                (closed,) = await relay.wait_closed(1)
                # EOF or RST, as the second hang-up races our CONNECT.
                assert closed.reason in (
                    CloseReason.UPSTREAM_PROTOCOL_ERROR,
                    CloseReason.UPSTREAM_RESET,
                ), closed
                assert len(accepted) == 2  # the fast path's dial, then the Task path's
                _assert_nothing_registered(relay)
        finally:
            server.close()
            await server.wait_closed()

    run(main)


def test_stop_ends_openings_in_progress(run, openings):
    async def main():
        async with (
            Origin(echo) as origin,
            ConnectProxy() as proxy,
            running_relay([http_upstream(proxy)], origin.address, peek_timeout=5.0) as relay,
        ):
            reader, writer = await relay.connect()  # silent: the opening waits for bytes
            await until(lambda: openings, 5, "the opening")
            await relay.engine.stop(drain_timeout=0)
            got, _error = await read_until_error(reader)
            assert got == b""
            writer.close()
            (closed,) = relay.closed
            assert closed.reason is CloseReason.SHUTDOWN

    run(main)


def test_both_sides_of_a_tunnel_send_without_nagle_delay_and_the_local_side_with_reno(run):
    """The relay adds no Nagle wait of its own: each splice goes out at once on both sides
    (the sender's stack already coalesced what it wanted to). The client side uses Reno."""

    async def main():
        async with (
            Origin(echo) as origin,
            ConnectProxy() as proxy,
            running_relay([http_upstream(proxy)], origin.address) as relay,
        ):
            reader, writer = await relay.connect()
            writer.write(b"x")
            assert await asyncio.wait_for(reader.readexactly(1), 5) == b"x"
            (tunnel,) = relay.engine._tunnels.values()
            for sock in (tunnel.client, tunnel.upstream):
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0

            # The client side is local: Reno, whatever the system's default. So is this
            # upstream side, as the stub listens on loopback; a proxy elsewhere keeps the
            # system's choice (tests/relay/test_local_proxy.py).
            def congestion(sock: socket.socket) -> bytes:
                return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).rstrip(b"\0")

            assert congestion(tunnel.client) == b"reno"
            assert congestion(tunnel.upstream) == b"reno"
            writer.close()
            await relay.wait_closed(1)

    run(main)


class _Hooks:
    """What the engine would be told, as a list."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []

    def keeps(self, opening: object) -> bool:
        return True

    def routed(self, record: ConnectionRecord, decision: object) -> None:
        self.calls.append(("routed",))

    def opened(self, record, conn, upstream) -> None:  # type: ignore[no-untyped-def]
        self.calls.append(("opened",))

    def failed(self, record, conn, exc, peeked, decision) -> None:  # type: ignore[no-untyped-def]
        self.calls.append(("failed", exc.reason))

    def closed(self, record, conn, reason, detail, reset) -> None:  # type: ignore[no-untyped-def]
        self.calls.append(("closed", reason, detail, reset))

    def fall_back(self, record, conn, peeker, peeked, reauthenticate, decision, announced) -> None:  # type: ignore[no-untyped-def]
        self.calls.append(("fall_back", peeked))

    def finish_slowly(self, record, conn, upstream, to_upstream, to_client) -> None:  # type: ignore[no-untyped-def]
        self.calls.append(("finish_slowly",))


@pytest.mark.parametrize("setback", ["undialable", "no-descriptor", "client-reset", "bad-target"])
def test_what_stops_begin_is_reported_by_start(run, monkeypatch, setback):
    """begin() runs before the connection has a record, so it reports nothing itself: what
    stopped it reaches the engine through start(), in the words of the stepwise path, and
    the upstream socket, registrations and deadlines are all gone."""
    from tray_proxy.relay.poller import Poller
    from tray_proxy.relay.records import ConnState
    from tray_proxy.relay.settings import RelaySettings, UpstreamKind, UpstreamProxy

    async def main():
        loop = asyncio.get_running_loop()
        poller = Poller(loop)
        deadlines = opening.Deadlines(loop, 0.05)
        proxy = socket.socket()
        proxy.bind(("127.0.0.1", 0))
        proxy.listen(8)
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname())
        conn, _ = listener.accept()
        try:
            if setback != "client-reset":
                client.sendall(b"\x16\x03\x01")  # a TLS record header: the peek waits
            port = proxy.getsockname()[1]
            dst = ("10.9.9.9", 443)
            family = socket.AF_INET
            if setback == "undialable":
                family = socket.AF_INET6  # an IPv4 address on an IPv6 socket: connect fails
            elif setback == "client-reset":
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                client.close()
                await until(lambda: _reset(conn), 5, "the reset")
            elif setback == "bad-target":
                dst = ("10.9.9.9", 0)
                client.sendall(b"\0" * 64)  # not TLS after all: decided on the IP
            hooks = _Hooks()
            upstream = UpstreamProxy("corp", UpstreamKind.HTTP, "127.0.0.1", port)
            o = opening.Opening(
                poller,
                hooks,
                deadlines,
                RelaySettings(),
                dst,
                conn,
                upstream,
                (family, ("127.0.0.1", port)),
            )
            if setback == "no-descriptor":

                def no_descriptor(*args: object) -> socket.socket:
                    raise OSError(24, "Too many open files")

                with monkeypatch.context() as m:
                    m.setattr(opening.socket, "socket", no_descriptor)
                    o.begin()
            else:
                o.begin()
            assert hooks.calls == [], "begin() reports nothing"
            record = ConnectionRecord(id=1, client=("127.0.0.1", 1), original_dst=dst)
            o.start(record)
            expected: tuple[object, ...] = {
                "undialable": ("fall_back", b""),
                "bad-target": ("fall_back", b""),
                "client-reset": (
                    "closed",
                    CloseReason.CLIENT_RESET,
                    "client side: Connection reset by peer",
                    False,
                ),
                "no-descriptor": (
                    "closed",
                    CloseReason.INTERNAL_ERROR,
                    "the relay is out of resources: Too many open files",
                    True,
                ),
            }[setback]
            assert hooks.calls == [expected]
            assert o.sock is None and o.done and record.state is ConnState.PEEKING
            assert len(poller) == 0 and not deadlines.pending
        finally:
            for s in (proxy, listener, client, conn):
                s.close()
            poller.close()
            deadlines.close()

    run(main)


def _reset(conn: socket.socket) -> bool:
    """The peer's RST has arrived (seen by poll, which leaves the error to the next read)."""
    import select

    p = select.poll()
    p.register(conn, select.POLLIN)
    return any(events & select.POLLERR for _, events in p.poll(0))


class _FirstWrite:
    """A CONNECT proxy that records its first read of each connection, then answers `answer`
    and (for a 2xx) echoes whatever follows, early bytes included, as the tunnel would.

    `server_delay`: the echo of the early bytes (the "server's answer") comes that many
    seconds after the 2xx, in a segment of its own. `drops_early`: a fake of the naive proxy
    that reads the CONNECT with one recv and throws away whatever came behind it in that
    read (no such proxy can be run here: Squid keeps the bytes). `closes_on_early`: a fake
    of one that ends the tunnel in silence when bytes came behind the CONNECT."""

    def __init__(
        self,
        answers: list[bytes],
        server_delay: float = 0.0,
        drops_early: bool = False,
        closes_on_early: bool = False,
    ) -> None:
        self.answers = answers
        self.server_delay = server_delay
        self.drops_early = drops_early
        self.closes_on_early = closes_on_early
        self.first: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.address: tuple[str, int] = ("127.0.0.1", 0)

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.address = ("127.0.0.1", self.server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            data = await reader.read(65536)
            self.first.append(data)
            answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
            writer.write(answer)
            if not answer.startswith(b"HTTP/1.1 2"):
                await reader.read()
                return
            head, _, early = data.partition(b"\r\n\r\n")
            if self.closes_on_early and early:
                return
            if self.server_delay and early:
                await writer.drain()
                await asyncio.sleep(self.server_delay)
            if not self.drops_early:
                writer.write(early)
            while chunk := await reader.read(65536):
                writer.write(chunk)
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


_OK = b"HTTP/1.1 200 Connection established\r\n\r\n"


@contextlib.asynccontextmanager
async def _through(
    proxy: _FirstWrite, dst: tuple[str, int] = ("192.0.2.1", 443), **settings: object
) -> AsyncIterator[Relay]:
    """A relay whose one upstream, "corp", is `proxy` (started here, closed after)."""
    from tray_proxy.relay.settings import UpstreamKind, UpstreamProxy

    await proxy.start()
    try:
        up = UpstreamProxy("corp", UpstreamKind.HTTP, *proxy.address)
        async with running_relay([up], dst, peek_timeout=1.0, **settings) as relay:
            yield relay
    finally:
        await proxy.close()


async def _echoed(relay: Relay, data: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect through `relay`, send `data`, and see the fake proxy's tunnel echo it."""
    reader, writer = await relay.connect()
    writer.write(data)
    assert await asyncio.wait_for(reader.readexactly(len(data)), 5) == data
    return reader, writer


@pytest.mark.parametrize("early_data", ["on", "off", "auto"])
def test_the_first_bytes_ride_behind_the_connect_in_one_write(run, openings, early_data):
    """Early data (settings.early_data): the ClientHello goes in the CONNECT's own write, so
    the proxy has it one round trip sooner; off, it waits for the 200 as before."""
    from tests.relay.stubs import tls_client_hello

    async def main():
        proxy = _FirstWrite([_OK])
        async with _through(proxy, early_data=early_data) as relay:
            hello = tls_client_hello("early.example")
            reader, writer = await _echoed(relay, hello)
            writer.write(b"more")
            assert await reader.readexactly(4) == b"more"
            writer.close()
            (first,) = proxy.first
            assert first.startswith(b"CONNECT early.example:443 HTTP/1.1\r\n")
            assert first.endswith(hello) is (early_data != "off")
            assert len(openings) == 1
            await relay.wait_closed()
            assert relay.record().bytes_up == len(hello) + 4

    run(main)


@pytest.mark.parametrize("early_data", ["on", "auto"])
def test_early_bytes_refused_with_the_connect_go_again_on_the_next_way(run, openings, early_data):
    """A 502 to a CONNECT that carried the ClientHello: the opening is redone without early
    data on the next upstream, and the client's bytes arrive there whole."""
    from tests.relay.stubs import tls_client_hello
    from tray_proxy.relay.settings import UpstreamKind, UpstreamProxy
    from tray_proxy.routing.health import Health
    from tray_proxy.routing.router import Router, RoutingTable
    from tray_proxy.routing.settings import RoutingSettings

    async def main():
        bad = _FirstWrite([b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n"])
        good = _FirstWrite([_OK])
        await bad.start()
        await good.start()
        try:
            a = UpstreamProxy("a", UpstreamKind.HTTP, *bad.address)
            b = UpstreamProxy("b", UpstreamKind.HTTP, *good.address)
            router = Router(RoutingTable(RoutingSettings(), [a, b]), None, Health())
            async with running_relay(
                [a, b], ("192.0.2.1", 443), router=router, peek_timeout=1.0, early_data=early_data
            ) as relay:
                hello = tls_client_hello("again.example")
                reader, writer = await relay.connect()
                writer.write(hello)
                assert await reader.readexactly(len(hello)) == hello
                writer.close()
                assert bad.first[0].endswith(hello)  # it went early to a, and was refused
                assert hello in good.first[0] or good.first[0].endswith(b"\r\n\r\n")
                assert relay.record().upstream == "b"
        finally:
            await bad.close()
            await good.close()

    run(main)


def test_early_data_is_on_trial_until_a_server_answers_then_proven(run, openings, monkeypatch):
    """ "auto" and a proxy that keeps the bytes behind the CONNECT: the first tunnel is held
    after the 200 until the server's answer comes (here 0.2 s later, in a segment of its
    own), which proves the proxy; the next connection sends its hello early too and is not
    held."""
    from tests.relay.stubs import tls_client_hello

    held: list[bool] = []
    original = opening.Opening._await_server

    def await_server(self: opening.Opening) -> None:
        held.append(True)
        original(self)

    monkeypatch.setattr(opening.Opening, "_await_server", await_server)

    async def main():
        proxy = _FirstWrite([_OK], server_delay=0.2)
        async with _through(proxy, spare_connections=0) as relay:
            assert relay.engine.settings.early_data == "auto"  # the default
            for i in range(2):
                hello = tls_client_hello(f"proven{i}.example")
                reader, writer = await _echoed(relay, hello)
                writer.write(b"more")
                assert await asyncio.wait_for(reader.readexactly(4), 5) == b"more"
                writer.close()
                await relay.wait_closed(i + 1)
                assert proxy.first[i].endswith(hello)  # early, in the CONNECT's write
                assert max(relay.records.items())[1].bytes_up == len(hello) + 4
                assert held == [True], "only the first tunnel waits for the server"
            assert relay.engine.stats["early_proven"] == 1
            assert relay.engine.stats["early_fallback"] == 0
            assert len(proxy.first) == 2  # no tunnel was opened twice
            assert len(openings) == 2
            _assert_nothing_registered(relay)

    run(main)


def test_a_proxy_that_drops_early_bytes_costs_a_wait_and_then_gets_none(run, openings, caplog):
    """ "auto" and a proxy that drops what came behind the CONNECT: the server never
    answers the hello, so after the wait the tunnel is dropped and the opening redone on
    the coroutine path, which sends the hello after the 200; the client sees its bytes
    arrive, later. Two such waits and the proxy gets no early bytes any more, once logged."""
    import logging
    import time

    from tests.relay.stubs import tls_client_hello

    caplog.set_level(logging.WARNING, logger="tray_proxy.relay.opening")

    async def main():
        proxy = _FirstWrite([_OK], drops_early=True)
        async with _through(proxy, spare_connections=0) as relay:
            took = []
            for i in range(3):
                hello = tls_client_hello(f"dropped{i}.example")
                started = time.monotonic()
                reader, writer = await _echoed(relay, hello)
                took.append(time.monotonic() - started)
                writer.write(b"more")
                assert await asyncio.wait_for(reader.readexactly(4), 5) == b"more"
                writer.close()
                await relay.wait_closed(i + 1)
                assert max(relay.records.items())[1].bytes_up == len(hello) + 4
            firsts = proxy.first
            # Two tunnels each for the first two connections: early bytes, then none.
            assert len(firsts) == 5, firsts
            assert [f.endswith(b"\r\n\r\n") for f in firsts] == [
                False,
                True,
                False,
                True,
                True,  # the third: refused, no early bytes, no second tunnel
            ]
            assert took[0] >= 1.0 and took[1] >= 1.0  # the wait, at least 1 s
            assert took[2] < 1.0
            stats = relay.engine.stats
            assert stats["early_fallback"] == 2 and stats["early_refused"] == 1
            assert stats["early_proven"] == 0
            warnings = [r for r in caplog.records if "relay.early_data" in r.getMessage()]
            assert len(warnings) == 1
            assert "drops the bytes sent right behind a CONNECT" in warnings[0].getMessage()
            _assert_nothing_registered(relay)

    run(main)


def test_a_tunnel_that_ends_in_silence_after_early_bytes_is_a_strike(run, openings):
    """ "auto" and a proxy that ends the tunnel without a byte when a hello came behind the
    CONNECT: no wait (the end is seen at once), the opening is redone without early bytes,
    and two such ends make the proxy refused, as two waits that ran out do (a TLS server
    answers a hello, if only with an alert; silence is the proxy's doing)."""
    import time

    from tests.relay.stubs import tls_client_hello

    async def main():
        proxy = _FirstWrite([_OK], closes_on_early=True)
        async with _through(proxy, spare_connections=0) as relay:
            took = []
            for i in range(3):
                hello = tls_client_hello(f"silent{i}.example")
                started = time.monotonic()
                _, writer = await _echoed(relay, hello)
                took.append(time.monotonic() - started)
                writer.close()
                await relay.wait_closed(i + 1)
            assert [f.endswith(b"\r\n\r\n") for f in proxy.first] == [
                False,
                True,
                False,
                True,
                True,  # refused after two: no early bytes, no second tunnel
            ]
            assert max(took) < 1.0  # no wait: the end was seen at once
            stats = relay.engine.stats
            assert stats["early_fallback"] == 2 and stats["early_refused"] == 1
            _assert_nothing_registered(relay)

    run(main)


def test_only_a_tls_handshake_goes_early_on_auto(run, openings):
    """Plain HTTP (port 80) and a hello followed by anything but handshake records (0-RTT
    data) are not sent early on "auto": replaying a ClientHello is harmless, replaying a
    request is not. "on" sends them, as before."""
    from tests.relay.stubs import tls_client_hello

    request = b"GET / HTTP/1.1\r\nHost: plain.example\r\n\r\n"
    hello = tls_client_hello("zero-rtt.example")
    # change_cipher_spec, then an application data record: what 0-RTT sends behind a hello.
    zero_rtt = hello + b"\x14\x03\x03\x00\x01\x01" + b"\x17\x03\x03\x00\x04data"

    async def main():
        for mode, first_bytes, dst, early in [
            ("auto", request, ("192.0.2.1", 80), False),
            ("auto", zero_rtt, ("192.0.2.1", 443), False),
            ("on", request, ("192.0.2.1", 80), True),
        ]:
            proxy = _FirstWrite([_OK])
            async with _through(proxy, dst, spare_connections=0, early_data=mode) as relay:
                _, writer = await _echoed(relay, first_bytes)
                writer.close()
                await relay.wait_closed(1)
                (first,) = proxy.first
                assert first.endswith(first_bytes) is early, (mode, first)
                assert relay.engine.stats["early_proven"] == 0

    run(main)


def test_handshake_only():
    from tests.relay.stubs import tls_client_hello

    hello = tls_client_hello("a.example")
    one = b"\x16\x03\x01\x00\x02\x01\x00"
    assert opening._handshake_only(hello)
    assert opening._handshake_only(one + one)  # a hello split over two records
    assert not opening._handshake_only(b"")
    assert not opening._handshake_only(one[:-1])  # a record cut short
    assert not opening._handshake_only(one + b"\x16\x03")  # a header cut short
    assert not opening._handshake_only(one + b"\x17\x03\x03\x00\x01x")  # application data
    assert not opening._handshake_only(b"GET / HTTP/1.1\r\n\r\n")
