"""Spare connections to the proxy (relay/spares.py): the pool on its own against a loopback
listener, then the engine taking them, against the CONNECT proxy stub.

Real Squid closing idle spares is covered by tests/integration/test_relay_lab.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.relay.stubs import (
    ConnectProxy,
    Mode,
    Origin,
    Relay,
    echo,
    echo_once,
    http_upstream,
    running_relay,
    until,
)
from tray_proxy.relay.records import CloseReason
from tray_proxy.relay.spares import Spares


class _Listener:
    """A loopback listener that accepts in the background and keeps what it accepted."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.accepted: list[socket.socket] = []
        self.address = (socket.AF_INET, self.sock.getsockname()[:2])

    def accept_all(self) -> int:
        while True:
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return len(self.accepted)
            conn.setblocking(False)
            self.accepted.append(conn)

    def closed_by_peer(self) -> int:
        """How many accepted connections the other side has closed (EOF or reset)."""
        count = 0
        for conn in self.accepted:
            try:
                if conn.recv(1, socket.MSG_PEEK) == b"":
                    count += 1
            except BlockingIOError:
                pass
            except OSError:
                count += 1
        return count

    def close(self) -> None:
        for conn in self.accepted:
            conn.close()
        self.sock.close()


@contextlib.asynccontextmanager
async def _pool(keep: int = 2, max_age: float = 30.0) -> AsyncIterator[tuple[Spares, _Listener]]:
    listener = _Listener()
    spares = Spares(asyncio.get_running_loop(), keep, max_age)
    try:
        yield spares, listener
    finally:
        spares.close()
        listener.close()


def _connected(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


def test_refill_dials_up_to_keep_and_take_hands_them_out_oldest_first(run):
    async def main():
        async with _pool(keep=2) as (spares, listener):
            spares.refill(listener.address)
            assert len(spares) == 2
            await until(lambda: listener.accept_all() == 2, what="two spares accepted")
            spares.refill(listener.address)  # full: dials nothing more
            assert len(spares) == 2

            first = spares.take(listener.address)
            second = spares.take(listener.address)
            assert first is not None and second is not None
            assert spares.take(listener.address) is None
            # Oldest first: the first accepted is the first taken.
            assert first.getsockname() == listener.accepted[0].getpeername()
            assert second.getsockname() == listener.accepted[1].getpeername()
            # A taken spare carries bytes both ways, and TCP_NODELAY is set already.
            assert first.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            first.send(b"CONNECT")
            await until(lambda: _peek(listener.accepted[0]) == b"CONNECT", what="bytes")
            assert spares.stats["spare_taken"] == 2
            first.close()
            second.close()

            spares.refill(listener.address)
            await until(lambda: listener.accept_all() == 4, what="refilled spares")
            assert len(spares) == 2

    run(main)


def _peek(sock: socket.socket) -> bytes:
    try:
        return sock.recv(64, socket.MSG_PEEK)
    except BlockingIOError:
        return b""


@pytest.mark.parametrize("how", ["fin", "rst", "spoke"])
def test_a_spare_the_proxy_closed_reset_or_spoke_on_is_discarded(run, how):
    async def main():
        async with _pool(keep=2) as (spares, listener):
            spares.refill(listener.address)
            await until(lambda: listener.accept_all() == 2, what="two spares accepted")
            spoiled = listener.accepted[0]
            if how == "rst":
                spoiled.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            if how == "spoke":
                spoiled.send(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
            else:
                spoiled.close()
            good_peer = listener.accepted[1].getpeername()
            await until(lambda: _spoiled_visible(spares), what="the spoiled spare noticed")

            taken = spares.take(listener.address)
            assert taken is not None
            assert taken.getsockname() == good_peer
            assert spares.stats["spare_stale"] == 1
            taken.close()

    run(main)


def _spoiled_visible(spares: Spares) -> bool:
    """Whether the oldest spare has something to read (EOF, reset or bytes)."""
    sock = spares._kept[0][1]
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return False
    except OSError:
        return True
    return True


def test_spares_for_another_address_are_neither_taken_nor_kept(run):
    async def main():
        async with _pool(keep=1) as (spares, listener):
            other = _Listener()
            try:
                spares.refill(listener.address)
                await until(lambda: listener.accept_all() == 1, what="a spare")
                assert spares.take(other.address) is None
                assert len(spares) == 1
                # The route moved: the old address's spare closes, the new one's is dialed.
                spares.refill(other.address)
                await until(lambda: listener.closed_by_peer() == 1, what="old spare closed")
                await until(lambda: other.accept_all() == 1, what="a spare to the new address")
                assert spares.take(listener.address) is None
                taken = spares.take(other.address)
                assert taken is not None
                taken.close()
            finally:
                other.close()

    run(main)


def test_spares_expire_after_max_age_on_their_own(run):
    async def main():
        async with _pool(keep=2, max_age=0.2) as (spares, listener):
            spares.refill(listener.address)
            await until(lambda: listener.accept_all() == 2, what="two spares accepted")
            await until(lambda: listener.closed_by_peer() == 2, 5, "both spares closed by age")
            assert len(spares) == 0
            assert spares.stats["spare_expired"] == 2
            assert spares.take(listener.address) is None

    run(main)


def test_an_old_spare_is_not_taken_even_before_its_timer_runs(run, monkeypatch):
    async def main():
        async with _pool(keep=1, max_age=5.0) as (spares, listener):
            spares.refill(listener.address)
            await until(lambda: listener.accept_all() == 1, what="a spare")
            made, sock = spares._kept[0]
            spares._kept[0] = (made - 10.0, sock)  # as if the loop had been busy for 10 s
            assert spares.take(listener.address) is None
            assert spares.stats["spare_expired"] == 1
            await until(lambda: listener.closed_by_peer() == 1, what="the old spare closed")

    run(main)


def test_close_closes_every_spare_and_stops_refills(run):
    async def main():
        async with _pool(keep=3) as (spares, listener):
            spares.refill(listener.address)
            await until(lambda: listener.accept_all() == 3, what="three spares")
            spares.close()
            await until(lambda: listener.closed_by_peer() == 3, what="all spares closed")
            spares.refill(listener.address)
            assert len(spares) == 0

    run(main)


def test_keep_zero_dials_nothing_and_a_refused_dial_keeps_nothing(run):
    async def main():
        async with _pool(keep=0) as (spares, listener):
            spares.refill(listener.address)
            assert len(spares) == 0
        # A port nobody listens on: refused at once or just after; either way no spare is
        # handed out.
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            dead = (socket.AF_INET, probe.getsockname()[:2])
        spares = Spares(asyncio.get_running_loop(), 1, 30.0)
        try:
            spares.refill(dead)
            assert spares.take(dead) is None
        finally:
            spares.close()

    run(main)


# -- the engine -----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _relay_through_stub(**settings: Any) -> AsyncIterator[tuple[ConnectProxy, Relay]]:
    """An echo origin, the CONNECT proxy stub, and a relay through it with `settings`."""
    async with (
        Origin(echo) as origin,
        ConnectProxy() as proxy,
        running_relay([http_upstream(proxy)], origin.address, **settings) as relay,
    ):
        yield proxy, relay


def test_the_next_connection_rides_a_spare_dialed_before_it_came(run):
    async def main():
        async with (
            Origin(echo) as origin,
            ConnectProxy() as proxy,
            running_relay([http_upstream(proxy)], origin.address, spare_connections=2) as relay,
        ):
            assert await echo_once(relay.address) == b"ping"
            # The first connection dialed for itself; two spares once it ended.
            await until(lambda: len(proxy.accepted) == 3, what="two spares accepted")
            spare_peers = set(proxy.accepted[1:])

            assert await echo_once(relay.address, b"pong") == b"pong"
            await relay.wait_closed(2)
            assert [c.reason for c in relay.closed] == [CloseReason.DONE] * 2
            assert proxy.requests[1].peer in spare_peers
            assert relay.engine.stats["spare_taken"] == 1
            # And one more spare replaced it.
            await until(lambda: len(proxy.accepted) == 4, what="the spare replaced")
            assert proxy.open_connections == 2

        # Stopping closed the spares.
        assert proxy.open_connections == 0

    run(main)


def test_no_spares_when_turned_off(run):
    async def main():
        async with _relay_through_stub(spare_connections=0) as (proxy, relay):
            for payload in (b"one", b"two", b"three"):
                assert await echo_once(relay.address, payload) == payload
            await relay.wait_closed(3)
            assert len(proxy.accepted) == len(proxy.requests) == 3
            assert "spare_taken" not in relay.engine.stats

    run(main)


def test_no_spares_on_the_task_path(run):
    """A SOCKS5 or reserved-port upstream opens on the Task path, which dials for itself."""

    async def main():
        async with (
            Origin(echo) as origin,
            ConnectProxy() as proxy,
            running_relay(
                [http_upstream(proxy)],
                origin.address,
                redirect_ports=(proxy.address[1],),  # a dial the redirect would catch
            ) as relay,
        ):
            for payload in (b"one", b"two"):
                assert await echo_once(relay.address, payload) == payload
            await relay.wait_closed(2)
            assert len(proxy.accepted) == 2

    run(main)


def test_a_spare_the_proxy_drops_under_our_request_is_retried_on_a_fresh_dial(run):
    """The proxy timed the idle spare out just as the CONNECT went out: nothing of the
    client went upstream, so the Task path dials again and the client never notices."""

    async def main():
        async with _relay_through_stub(spare_connections=1) as (proxy, relay):
            assert await echo_once(relay.address) == b"ping"
            await until(lambda: len(proxy.accepted) == 2, what="a spare")
            spare_peer = proxy.accepted[1]
            proxy.plan = [Mode.HANG_UP]  # the next request: read it, close, no answer

            assert await echo_once(relay.address, b"still works") == b"still works"
            await relay.wait_closed(2)
            assert relay.closed[1].reason is CloseReason.DONE
            assert proxy.requests[1].peer == spare_peer
            assert not proxy.requests[1].answered
            assert proxy.requests[2].answered
            assert relay.engine.stats["spare_stale"] == 1

    run(main)


def test_a_spare_found_closed_is_skipped_for_a_fresh_dial(run):
    async def main():
        async with _relay_through_stub(spare_connections=1, spare_max_age=30.0) as (proxy, relay):
            assert await echo_once(relay.address) == b"ping"
            await until(lambda: len(proxy.accepted) == 2, what="a spare")
            await until(lambda: proxy.open_connections == 1, what="the spare, alone")
            await proxy.close_idle()
            spare = relay.engine._spares
            assert spare is not None
            await until(lambda: _spoiled_visible(spare), what="the relay's side sees the FIN")

            assert await echo_once(relay.address, b"again") == b"again"
            await relay.wait_closed(2)
            assert [c.reason for c in relay.closed] == [CloseReason.DONE] * 2
            assert relay.engine.stats["spare_stale"] == 1
            assert "spare_taken" not in relay.engine.stats

    run(main)


def test_a_burst_dials_spares_at_accept_as_many_as_openings_in_progress(run):
    """Connections that overlap (a burst, like npm install's) each find a spare: when a
    connection's CONNECT is out while another opening is in progress, replacements are
    dialed at once, as many as the openings in progress lately (up to spare_connections).
    With a real round trip to the proxy that is one round trip off each connection of the
    burst (docs/benchmarks.md, "Round trip to the proxy"). One at a time: none at accept."""

    async def main():
        async with _relay_through_stub(spare_connections=4, handshake_timeout=0.5) as (
            proxy,
            relay,
        ):
            proxy.plan = [Mode.SILENT]  # the first request stays unanswered: still opening
            _reader, first = await relay.connect()
            first.write(b"first")
            await until(lambda: len(proxy.requests) == 1, what="the first CONNECT")
            spares = relay.engine._spares
            assert spares is not None and len(spares) == 0  # alone: nothing at accept
            assert len(proxy.accepted) == 1

            assert await echo_once(relay.address, b"second") == b"second"
            # Two openings in progress at the second's accept: two spares for the burst.
            await until(lambda: len(proxy.accepted) == 4, what="two spares for the burst")
            assert len(spares) == 2

            # The next connection of the burst takes one, and its accept tops the pool up.
            assert await echo_once(relay.address, b"third") == b"third"
            assert relay.engine.stats["spare_taken"] == 1
            await relay.wait_closed(3)
            assert relay.closed[-1].reason is CloseReason.UPSTREAM_TIMEOUT  # the first
            first.close()

    run(main)


def test_a_tunnel_that_outlives_the_route_still_leaves_spares(run, monkeypatch):
    """The fast path reuses its route for a fraction of a second; most tunnels last longer.
    The refill works the route out again instead of giving up on an expired one."""
    import tray_proxy.relay.engine as engine_module

    monkeypatch.setattr(engine_module, "_ROUTE_TTL", 0.0)  # every route expired at once

    async def main():
        async with _relay_through_stub(spare_connections=2) as (proxy, relay):
            assert await echo_once(relay.address) == b"ping"
            await until(lambda: len(proxy.accepted) == 3, what="two spares")
            assert await echo_once(relay.address, b"pong") == b"pong"
            await relay.wait_closed(2)
            assert relay.engine.stats["spare_taken"] == 1

    run(main)
