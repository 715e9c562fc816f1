"""Routing inside the engine (issue 15 sections 2 and 3, relay side), on loopback sockets.

Real sockets, real CONNECT/SOCKS stubs (tests/relay/stubs.py), the real Router, Health and,
for PAC, the real PacScript (pypac in its child process) reading a file. `destination_of`
stands in for nftables; the lab tests (tests/integration/test_routing_lab.py) run the same
with the real redirect and Squid.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.relay.stubs import (
    ConnectProxy,
    Mode,
    Origin,
    echo,
    free_port_range,
    http_upstream,
    read_until_error,
    running_relay,
    tls_client_hello,
)
from tray_proxy.relay.events import (
    ConnectionRouted,
    RoutingError,
    TunnelEstablished,
    UpstreamFailed,
    UpstreamHealthChanged,
)
from tray_proxy.relay.records import CloseReason
from tray_proxy.relay.settings import UpstreamKind, UpstreamProxy
from tray_proxy.routing.health import Health
from tray_proxy.routing.pac_worker import PacScript
from tray_proxy.routing.router import Router, RoutingTable
from tray_proxy.routing.settings import parse_routing

PAYLOAD = b"ping through the relay"


def _router(
    upstreams: Sequence[UpstreamProxy],
    rules: Sequence[dict[str, object]] = (),
    pac: PacScript | None = None,
    **routing: object,
) -> Router:
    settings = parse_routing(
        dict(routing), list(rules), [{} for _ in upstreams], [u.name for u in upstreams]
    )
    return Router(RoutingTable(settings, upstreams), pac, Health())


def _dead_upstream(name: str = "a") -> UpstreamProxy:
    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return UpstreamProxy(name, UpstreamKind.HTTP, "127.0.0.1", port)


async def _echo_through(relay, first: bytes = b"") -> bytes:  # type: ignore[no-untyped-def]
    """Connect, send `first` (a ClientHello for the peek) and PAYLOAD, return what echoes."""
    reader, writer = await relay.connect()
    try:
        writer.write(first + PAYLOAD)
        await writer.drain()
        want = len(first) + len(PAYLOAD)
        got = b""
        while len(got) < want:
            chunk = await asyncio.wait_for(reader.read(65536), 10)
            if not chunk:
                break
            got += chunk
        return got
    finally:
        writer.close()


async def _refused(relay, first: bytes = b"") -> None:  # type: ignore[no-untyped-def]
    """Connect and send `first`: the relay ends the connection without a byte."""
    reader, writer = await relay.connect()
    writer.write(first)
    got, _ = await read_until_error(reader)
    writer.close()
    assert got == b""


# -- failover -------------------------------------------------------------------------------


@pytest.mark.parametrize("peek", [0.0, 1.0])
def test_an_unreachable_first_upstream_moves_the_connection_to_the_next(run, peek):
    """Invisible to the client: it gets its echo through b; the failure of a is an event."""

    async def main():
        dead = _dead_upstream("a")
        async with Origin(echo) as origin, ConnectProxy() as proxy:
            good = http_upstream(proxy, "b")
            router = _router([dead, good])
            async with running_relay(
                [dead, good], origin.address, router=router, peek_timeout=peek
            ) as relay:
                hello = tls_client_hello("site.example") if peek else b""
                assert await _echo_through(relay, hello) == hello + PAYLOAD
                record = relay.record()
                assert record.upstream == "b"
                assert record.route == "proxy a, b (default)"
                assert record.decided_by == "default"
                (failed,) = relay.of(UpstreamFailed)
                assert failed.upstream == "a" and failed.reason is CloseReason.UPSTREAM_UNREACHABLE
                (est,) = relay.of(TunnelEstablished)
                assert est.upstream == "b"
                assert len(proxy.requests) == 1
                (routed,) = relay.of(ConnectionRouted)  # one, whichever path took it on
                assert routed.route == "proxy a, b (default)"

    run(main)


@pytest.mark.parametrize("mode", [Mode.BAD_GATEWAY, Mode.HANG_UP, Mode.BAD_STATUS])
def test_a_proxy_in_trouble_on_the_connect_moves_on_to_the_next(run, mode):
    """502, a hang-up or a bad answer to the CONNECT: the next upstream serves the client."""

    async def main():
        async with (
            Origin(echo) as origin,
            ConnectProxy(mode) as sick,
            ConnectProxy() as proxy,
        ):
            a, b = http_upstream(sick, "a"), http_upstream(proxy, "b")
            async with running_relay([a, b], origin.address, router=_router([a, b])) as relay:
                assert await _echo_through(relay) == PAYLOAD
                assert relay.record().upstream == "b"
                assert [f.upstream for f in relay.of(UpstreamFailed)] == ["a"]
                assert len(relay.of(ConnectionRouted)) == 1
                assert len(sick.requests) == 1 and len(proxy.requests) == 1

    run(main)


def test_a_403_is_the_proxys_decision_and_no_other_upstream_is_asked(run):
    async def main():
        async with (
            Origin(echo) as origin,
            ConnectProxy(Mode.FORBIDDEN) as strict,
            ConnectProxy() as proxy,
        ):
            a, b = http_upstream(strict, "a"), http_upstream(proxy, "b")
            async with running_relay([a, b], origin.address, router=_router([a, b])) as relay:
                await _refused(relay, PAYLOAD)
                (closed,) = await relay.wait_closed()
                assert closed.reason is CloseReason.UPSTREAM_REFUSED
                assert proxy.requests == []
                assert relay.of(UpstreamHealthChanged) == []

    run(main)


def test_both_upstreams_failing_give_one_sentence_naming_both(run):
    async def main():
        a, b = _dead_upstream("a"), _dead_upstream("b")
        async with Origin(echo) as origin:
            router = _router([a, b], when_unreachable="fail")
            async with running_relay([a, b], origin.address, router=router) as relay:
                await _refused(relay)
                (closed,) = await relay.wait_closed()
                assert closed.reason is CloseReason.UPSTREAM_UNREACHABLE
                assert f":{b.port}" in closed.detail
                assert f"(tried first: cannot connect to 127.0.0.1:{a.port}" in closed.detail
                assert [f.upstream for f in relay.of(UpstreamFailed)] == ["a", "b"]

    run(main)


def test_health_takes_a_failing_upstream_out_and_says_so_once(run):
    """Three failures open a's breaker: an event, and later connections skip it at once."""

    async def main():
        dead = _dead_upstream("a")
        async with Origin(echo) as origin, ConnectProxy() as proxy:
            good = http_upstream(proxy, "b")
            router = _router([dead, good])
            async with running_relay([dead, good], origin.address, router=router) as relay:
                for _ in range(3):
                    assert await _echo_through(relay) == PAYLOAD
                (down,) = relay.of(UpstreamHealthChanged)
                assert down.upstream == "a" and not down.up
                assert "cannot connect" in down.reason
                assert await _echo_through(relay) == PAYLOAD
                last = max(relay.records.values(), key=lambda r: r.id)
                assert last.route == "proxy b (default)"
                assert len(relay.of(UpstreamFailed)) == 3  # the 4th never tried a
                # A probe that gets through brings it back (the controller's probe loop).
                relay.engine.report_probe("a", True, 0.01)
                up = relay.of(UpstreamHealthChanged)[-1]
                assert up.upstream == "a" and up.up

    run(main)


def test_probes_alone_take_an_upstream_down(run):
    async def main():
        async with Origin(echo) as origin, ConnectProxy() as proxy:
            a = http_upstream(proxy, "a")
            async with running_relay([a], origin.address, router=_router([a])) as relay:
                for _ in range(3):
                    relay.engine.report_probe("a", False, words="probe: no answer")
                (down,) = relay.of(UpstreamHealthChanged)
                assert (down.upstream, down.up, down.reason) == ("a", False, "probe: no answer")
                # Every upstream down, when_unreachable = "direct": straight to the origin.
                assert await _echo_through(relay) == PAYLOAD
                assert proxy.requests == []
                assert relay.record().route == "direct: proxy unreachable (default)"

    run(main)


# -- rules ----------------------------------------------------------------------------------


def test_block_rule_resets_the_client_at_once_and_names_the_rule(run):
    async def main():
        async with Origin(echo) as origin, ConnectProxy() as proxy:
            a = http_upstream(proxy, "a")
            router = _router([a], [{"match": ["ads.example"], "action": "block"}])
            async with running_relay([a], origin.address, router=router, peek_timeout=1.0) as relay:
                await _refused(relay, tls_client_hello("ads.example"))
                (closed,) = await relay.wait_closed()
                assert closed.reason is CloseReason.BLOCKED
                assert closed.detail == "blocked by rule[0] (ads.example -> block)"
                (routed,) = relay.of(ConnectionRouted)
                assert routed.route == "block (rule[0]: ads.example -> block)"
                assert routed.decided_by == "rule[0]" and routed.upstream is None
                assert proxy.requests == [] and origin.conns == []
                # Another name goes through the proxy as before.
                hello = tls_client_hello("ok.example")
                assert await _echo_through(relay, hello) == hello + PAYLOAD
                assert proxy.requests[0].target == ("ok.example", origin.address[1])

    run(main)


def test_direct_rule_dials_the_destination_from_the_reserved_source_ports(run):
    async def main():
        first, last = free_port_range(16)
        async with Origin(echo) as origin, ConnectProxy() as proxy:
            a = http_upstream(proxy, "a")
            router = _router([a], [{"match": [".intra.example"], "action": "direct"}])
            async with running_relay(
                [a],
                origin.address,
                router=router,
                peek_timeout=1.0,
                source_ports=(first, last),
            ) as relay:
                hello = tls_client_hello("wiki.intra.example")
                assert await _echo_through(relay, hello) == hello + PAYLOAD
                assert proxy.requests == []
                (conn,) = origin.conns
                assert first <= conn.peer[1] <= last
                record = relay.record()
                assert record.upstream is None
                assert record.route == "direct (rule[0]: .intra.example -> direct)"
                (est,) = relay.of(TunnelEstablished)
                assert est.upstream is None

    run(main)


def test_a_rule_naming_an_upstream_sends_the_name_there(run):
    async def main():
        async with Origin(echo) as origin, ConnectProxy() as pa, ConnectProxy() as pb:
            a, b = http_upstream(pa, "a"), http_upstream(pb, "b")
            router = _router([a, b], [{"match": ["*.b.example"], "action": "b"}])
            async with running_relay(
                [a, b], origin.address, router=router, peek_timeout=1.0
            ) as relay:
                for name, proxy in (("x.b.example", pb), ("x.a.example", pa)):
                    hello = tls_client_hello(name)
                    assert await _echo_through(relay, hello) == hello + PAYLOAD
                    assert proxy.requests[-1].target == (name, origin.address[1])
                assert len(pa.requests) == 1 and len(pb.requests) == 1

    run(main)


def test_reload_keeps_open_tunnels_and_new_connections_follow_the_new_rules(run):
    async def main():
        async with Origin(echo) as origin, ConnectProxy() as pa:
            a = http_upstream(pa, "a")
            router = _router([a])
            async with running_relay([a], origin.address, router=router, peek_timeout=1.0) as relay:
                reader, writer = await relay.connect()
                hello = tls_client_hello("keep.example")
                writer.write(hello)
                assert await reader.readexactly(len(hello)) == hello
                blocking = _router([a], [{"match": ["*"], "action": "block"}])
                relay.engine.set_routing([a], blocking)
                await _refused(relay, tls_client_hello("new.example"))
                # The open tunnel still carries bytes both ways.
                writer.write(PAYLOAD)
                assert await reader.readexactly(len(PAYLOAD)) == PAYLOAD
                writer.close()
                closed = await relay.wait_closed(2)
                assert sorted(c.reason.value for c in closed) == ["blocked", "done"]

    run(main)


# -- PAC ------------------------------------------------------------------------------------


def test_a_pac_script_picks_upstreams_and_direct_by_host(run, tmp_path: Path):
    """pypac evaluates it off the loop (its child process); the answers route the names."""

    async def main():
        async with Origin(echo) as origin, ConnectProxy() as pa, ConnectProxy() as pb:
            a, b = http_upstream(pa, "a"), http_upstream(pb, "b")
            script = tmp_path / "proxy.pac"
            script.write_text(
                "function FindProxyForURL(url, host) {\n"
                '  if (host == "direct.example") return "DIRECT";\n'
                f'  if (dnsDomainIs(host, ".b.example")) return "PROXY {b.host}:{b.port}";\n'
                f'  return "PROXY {a.host}:{a.port}; DIRECT";\n'
                "}\n"
            )
            pac = PacScript(str(script))
            try:
                assert pac.refresh(0.0, force=True).ok
                router = _router([a, b], pac=pac, default="pac", pac_url=str(script))
                async with running_relay(
                    [a, b], origin.address, router=router, peek_timeout=1.0
                ) as relay:
                    for name in ("x.b.example", "direct.example", "other.example"):
                        hello = tls_client_hello(name)
                        assert await _echo_through(relay, hello) == hello + PAYLOAD
                    assert [r.target[0] for r in pb.requests] == ["x.b.example"]
                    assert [r.target[0] for r in pa.requests] == ["other.example"]
                    assert len(origin.conns) == 3  # the DIRECT one came straight
                    routes = {r.host: r.route for r in relay.records.values()}
                    assert routes["direct.example"] == "direct (pac: DIRECT)"
                    assert routes["x.b.example"] == "proxy b (pac: PROXY b)"
                    assert routes["other.example"] == "proxy a, then direct (pac: PROXY a; DIRECT)"
            finally:
                pac.close()

    run(main)


def test_a_broken_pac_script_is_one_event_and_the_default_route_serves(run, tmp_path: Path):
    async def main():
        async with Origin(echo) as origin, ConnectProxy() as pa:
            a = http_upstream(pa, "a")
            script = tmp_path / "broken.pac"
            script.write_text("function FindProxyForURL(url, host) { throw 'no'; }\n")
            pac = PacScript(str(script))
            try:
                pac.refresh(0.0, force=True)
                router = _router([a], pac=pac, default="pac", pac_url=str(script))
                async with running_relay(
                    [a], origin.address, router=router, peek_timeout=1.0
                ) as relay:
                    for name in ("one.example", "two.example"):
                        hello = tls_client_hello(name)
                        assert await _echo_through(relay, hello) == hello + PAYLOAD
                    (error,) = relay.of(RoutingError)
                    assert "PAC script" in error.detail and "Malformed PAC" in error.detail
                    assert len(pa.requests) == 2
            finally:
                pac.close()

    run(main)


# -- loops ----------------------------------------------------------------------------------


def test_a_connection_from_the_relays_own_source_ports_is_refused_as_a_loop(run):
    """A redirect without the source-port exclusion would send the relay's DIRECT
    connections back to it, for ever: the relay refuses one that comes from a reserved port
    it has just dialed from."""

    async def main():
        first, last = free_port_range(4)
        async with Origin(echo) as origin, ConnectProxy() as proxy:
            a = http_upstream(proxy, "a")
            async with running_relay(
                [a], origin.address, router=_router([a]), source_ports=(first, last)
            ) as relay:
                # The relay's dialer takes a reserved port for one of its own connections...
                ports = relay.engine._dialer._ports
                assert ports is not None
                with socket.socket() as own:
                    ports.bind(own, socket.AF_INET)
                    port = own.getsockname()[1]
                # ... and that connection comes back through the redirect.
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
                    sock.setblocking(False)
                    loop = asyncio.get_running_loop()
                    got = b""
                    # The reset may come before connect() has seen its answer.
                    with contextlib.suppress(ConnectionError):
                        await loop.sock_connect(sock, relay.address)
                        while chunk := await loop.sock_recv(sock, 4096):
                            got += chunk
                assert got == b""
                (closed,) = await relay.wait_closed()
                assert closed.reason is CloseReason.LOOP
                assert f"source port {port}" in closed.detail
                assert proxy.requests == [] and origin.conns == []

    run(main)


def test_a_program_given_a_reserved_port_by_nat_is_served_not_taken_for_a_loop(run):
    """Every redirected connection lands on the relay's one port, so two of a program's
    connections to different destinations from the same source port would clash after the
    redirect; conntrack then gives the second another source port, anywhere in 1024-65535.
    One that falls in the relay's reserved range, which the relay has not dialed from, is a
    program's connection: served (at 1,000 connections a second, 2-3 % were reset)."""

    async def main():
        first, last = free_port_range(4)
        async with Origin(echo) as origin, ConnectProxy() as proxy:
            a = http_upstream(proxy, "a")
            async with running_relay(
                [a], origin.address, router=_router([a]), source_ports=(first, last)
            ) as relay:
                loop = asyncio.get_running_loop()
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", first + 1))
                    sock.setblocking(False)
                    await asyncio.wait_for(loop.sock_connect(sock, relay.address), 10)
                    hello = tls_client_hello("x.example")
                    await loop.sock_sendall(sock, hello)
                    got = b""
                    while len(got) < len(hello):
                        chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), 10)
                        assert chunk, f"closed after {got!r}"
                        got += chunk
                assert got == hello  # echoed by the origin, through the proxy
                (closed,) = await relay.wait_closed()
                assert closed.reason is not CloseReason.LOOP
                assert len(proxy.requests) == 1

    run(main)


# -- reload from the settings ----------------------------------------------------------------


def test_reload_routing_from_settings_keeps_health_and_follows_new_rules(run):
    """reload_routing (the controller's path for a changed settings file): the running
    router keeps its upstreams' health, new rules apply to the next connection."""
    from tray_proxy.relay.engine import make_router

    async def main():
        dead = _dead_upstream("a")
        async with Origin(echo) as origin, ConnectProxy() as proxy:
            good = http_upstream(proxy, "b")
            settings = parse_routing({}, [], [{}, {}], ["a", "b"])
            router = make_router(settings, [dead, good], "a")
            async with running_relay(
                [dead, good], origin.address, router=router, peek_timeout=1.0
            ) as relay:
                for _ in range(3):
                    hello = tls_client_hello("x.example")
                    assert await _echo_through(relay, hello) == hello + PAYLOAD
                assert [e.up for e in relay.of(UpstreamHealthChanged)] == [False]
                blocking = parse_routing(
                    {}, [{"match": ["*.blocked.example"], "action": "block"}], [{}, {}], ["a", "b"]
                )
                relay.engine.reload_routing(blocking, [dead, good], "a")
                assert relay.engine.router is router
                assert relay.engine.upstream_health()["a"][0] is False  # still down
                await _refused(relay, tls_client_hello("ads.blocked.example"))
                hello = tls_client_hello("y.example")
                assert await _echo_through(relay, hello) == hello + PAYLOAD
                last = max(relay.records.values(), key=lambda r: r.id)
                assert last.route == "proxy b (default)"  # a still skipped: health kept
                assert len(relay.of(UpstreamFailed)) == 3

    run(main)
