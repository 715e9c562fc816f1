"""RoutingWatch on real loopback sockets: the health probe's CONNECT and what it reports, the
off-network probe sending every upstream down and back up."""

from __future__ import annotations

import asyncio
import socket

from tests.controller.fakes import run, until
from tray_proxy.controller.routing_watch import RoutingWatch, WatchSettings, proxy_answered
from tray_proxy.offnet import OffnetChange, OffnetPolicy, Reachability
from tray_proxy.relay.probe import ProbeOutcome, ProbeResult
from tray_proxy.relay.settings import UpstreamKind, UpstreamProxy

FAST = OffnetPolicy(interval=0.2, interval_direct=0.2, confirm=0.05, fast=(0.0, 0.05, 0.1))


class Sink:
    """Records report_probe calls as the relay would get them."""

    def __init__(self) -> None:
        self.reports: list[tuple[str, bool, float | None, str]] = []

    def report_probe(
        self, upstream: str, ok: bool, latency: float | None = None, words: str = ""
    ) -> None:
        self.reports.append((upstream, ok, latency, words))

    def of(self, name: str, ok: bool) -> list[tuple[str, bool, float | None, str]]:
        return [r for r in self.reports if r[0] == name and r[1] is ok]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def proxy_answering(answer: bytes) -> tuple[asyncio.Server, int, list[bytes]]:
    """A loopback 'proxy' that reads the CONNECT head and answers `answer` (then closes)."""
    heads: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            heads.append(await reader.readuntil(b"\r\n\r\n"))
            writer.write(answer)
            await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], heads


def settings(*upstreams: UpstreamProxy, interval: float = 0.05) -> WatchSettings:
    return WatchSettings(
        upstreams=upstreams,
        target=("origin.test", 443),
        timeout=1.0,
        interval=interval,
        offnet=FAST,
        source_ports=None,
    )


def upstream(name: str, port: int) -> UpstreamProxy:
    return UpstreamProxy(name, UpstreamKind.HTTP, "127.0.0.1", port)


def test_a_407_is_a_working_proxy_and_sends_no_login() -> None:
    async def main() -> None:
        server, port, heads = await proxy_answering(
            b'HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm="x"'
            b"\r\nContent-Length: 0\r\n\r\n"
        )
        sink = Sink()
        watch = RoutingWatch(sink, settings(upstream("corp", port)), lambda c: None)
        watch.start()
        try:
            await until(lambda: bool(sink.of("corp", True)), "a good report")
        finally:
            await watch.stop()
            server.close()
        name, ok, latency, words = sink.of("corp", True)[0]
        assert latency is not None and 0 <= latency < 1.0
        assert words == ""
        assert heads[0].startswith(b"CONNECT origin.test:443 HTTP/1.1\r\n")
        assert b"proxy-authorization" not in heads[0].lower()

    run(main())


def test_a_proxy_that_cannot_reach_the_target_is_down() -> None:
    async def main() -> None:
        server, port, _heads = await proxy_answering(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"
        )
        sink = Sink()
        watch = RoutingWatch(sink, settings(upstream("corp", port)), lambda c: None)
        watch.start()
        try:
            await until(lambda: len(sink.of("corp", False)) >= 2, "two bad reports")
        finally:
            await watch.stop()
            server.close()
        assert "503" in sink.of("corp", False)[0][3]
        assert not sink.of("corp", True)

    run(main())


def test_proxy_answered() -> None:
    for outcome, ok in [
        (ProbeOutcome.OK, True),
        (ProbeOutcome.AUTH_FAILED, True),
        (ProbeOutcome.FORBIDDEN, True),
        (ProbeOutcome.REFUSED, False),
        (ProbeOutcome.TIMEOUT, False),
        (ProbeOutcome.UNREACHABLE, False),
        (ProbeOutcome.PROTOCOL_ERROR, False),
    ]:
        assert proxy_answered(ProbeResult(outcome, None, None, "x")) is ok


def test_off_network_sends_every_upstream_down_then_back() -> None:
    """Nothing listens on the proxy's port: after two failed rounds the watch says direct
    and reports enough failures to open the breaker; once the proxy listens and the network
    changes, it is reported up and the watch says it is back."""

    async def main() -> None:
        port = free_port()
        sink = Sink()
        changes: list[OffnetChange] = []
        # No health probe here (interval 0): only the off-network probe reports.
        watch = RoutingWatch(
            sink,
            settings(upstream("corp", port), interval=0),
            changes.append,
            watch_network=False,
        )
        watch.start()
        server: asyncio.Server | None = None
        try:
            await until(lambda: watch.state is Reachability.DIRECT_UNREACHABLE, "direct")
            assert watch.words == "direct: proxy unreachable"
            assert len(sink.of("corp", False)) >= 9
            server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", port)
            watch.network_changed()
            await until(lambda: watch.state is Reachability.ON_PROXY, "back on the proxy")
            assert sink.reports[-1][:2] == ("corp", True)
            assert watch.words == ""
        finally:
            await watch.stop()
            if server is not None:
                server.close()
        assert [c.state for c in changes] == [
            Reachability.DIRECT_UNREACHABLE,
            Reachability.ON_PROXY,
        ]

    run(main())


def test_reload_probes_the_new_upstreams() -> None:
    async def main() -> None:
        server, port, heads = await proxy_answering(b"HTTP/1.1 200 Connection established\r\n\r\n")
        sink = Sink()
        dead = upstream("old", free_port())
        watch = RoutingWatch(sink, settings(dead, interval=0), lambda c: None, watch_network=False)
        watch.start()
        try:
            watch.reload(settings(upstream("new", port)))
            await until(lambda: bool(sink.of("new", True)), "the new upstream probed")
        finally:
            await watch.stop()
            server.close()
        assert heads

    run(main())
