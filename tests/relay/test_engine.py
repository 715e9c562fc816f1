"""RelayEngine on real loopback sockets, against the in-memory proxy and origin stubs.

`destination_of` stands in for nftables + SO_ORIGINAL_DST (covered by test_origdst.py and
the lab). Each test runs on asyncio and uvloop; a subset also on qasync.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import json
import logging
import os
import secrets
import signal
import socket
import struct
import sys
import textwrap
import time

import pytest

from tests.relay.stubs import (
    ALL_LOOPS,
    GLUED_BYTES,
    HUGE_HEAD_SIZE,
    ConnectProxy,
    Mode,
    Origin,
    Socks5Proxy,
    echo,
    echo_once,
    exchange,
    free_port_range,
    http_upstream,
    pattern,
    read_all,
    read_until_error,
    receive_only,
    relay_settings,
    reply_after_eof,
    running_relay,
    send_then_receive,
    sha,
    sized_exchange,
    socks_upstream,
    tls_client_hello,
    until,
    write_all,
)
from tray_proxy.relay.engine import RelayEngine, RelayStartError
from tray_proxy.relay.events import (
    ConnectionClosed,
    ConnectionOpened,
    ConnectionRouted,
    EngineStopped,
    ListenerError,
    TunnelEstablished,
    UpstreamFailed,
)
from tray_proxy.relay.records import CloseReason, ConnState
from tray_proxy.relay.secrets import Credentials, Secret, StaticCredentialSource
from tray_proxy.relay.settings import UpstreamKind, UpstreamProxy

MiB = 1 << 20


# -- bytes both ways ---------------------------------------------------------------------


@pytest.mark.parametrize("run", ALL_LOOPS, indirect=True)
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_bulk_both_ways_arrives_intact(run, host):
    up, down = pattern(1, 8 * MiB), pattern(2, 8 * MiB)

    async def main():
        async with (
            Origin(exchange(down), host) as origin,
            ConnectProxy(host=host, name_ip=host) as proxy,
            running_relay([http_upstream(proxy)], origin.address, listen=(host,)) as relay,
        ):
            assert relay.address[0] == host
            reader, writer = await relay.connect()

            async def send():
                # Odd chunk sizes: many chunks, none aligned with the relay's.
                view, i, step = memoryview(up), 0, 1
                while i < len(view):
                    size = (step * 7919) % 200_000 + 1
                    writer.write(view[i : i + size])
                    await writer.drain()
                    i, step = i + size, step + 1
                writer.write_eof()

            got, _ = await asyncio.gather(read_all(reader), send())
            writer.close()
            (closed,) = await relay.wait_closed()
            await until(lambda: origin.conns and origin.conns[0].done, what="origin done")

            assert sha(got) == sha(down)
            assert sha(origin.conns[0].received) == sha(up)
            assert closed.reason is CloseReason.DONE
            assert (closed.bytes_up, closed.bytes_down) == (len(up), len(down))
            record = relay.record()
            assert record.state is ConnState.CLOSED
            assert record.close_reason is CloseReason.DONE
            assert (record.bytes_up, record.bytes_down) == (len(up), len(down))
            assert record.original_dst == origin.address
            assert record.upstream == "corp"
            assert record.handshake_latency is not None and record.handshake_latency >= 0
            assert proxy.requests[0].target == origin.address
            kinds = [type(e) for e in relay.events]
            assert kinds == [
                ConnectionOpened,
                ConnectionRouted,
                TunnelEstablished,
                ConnectionClosed,
            ]
            assert relay.engine.traffic()[0] == {}  # no connection open

    run(main)


@pytest.mark.parametrize("run", ALL_LOOPS, indirect=True)
def test_client_half_close_still_receives_everything(run):
    up, down = pattern(3, 100_000), pattern(4, 2 * MiB)

    async def main():
        async with (
            Origin(reply_after_eof(down)) as origin,
            ConnectProxy() as proxy,
            running_relay([http_upstream(proxy)], origin.address) as relay,
        ):
            reader, writer = await relay.connect()
            await write_all(writer, up)  # ends with shutdown(SHUT_WR)
            got = await read_all(reader)
            writer.close()
            (closed,) = await relay.wait_closed()
            assert sha(got) == sha(down)
            assert origin.conns[0].received == up and origin.conns[0].got_eof
            assert closed.reason is CloseReason.DONE
            assert (closed.bytes_up, closed.bytes_down) == (len(up), len(down))

    run(main)


@pytest.mark.parametrize("run", ALL_LOOPS, indirect=True)
def test_origin_half_close_still_receives_everything(run):
    up, down = pattern(5, 2 * MiB), pattern(6, 100_000)

    async def main():
        async with (
            Origin(send_then_receive(down)) as origin,
            ConnectProxy() as proxy,
            running_relay([http_upstream(proxy)], origin.address) as relay,
        ):
            reader, writer = await relay.connect()
            got = await read_all(reader)  # EOF from the origin, our direction still open
            assert sha(got) == sha(down)
            await write_all(writer, up)
            (closed,) = await relay.wait_closed()
            writer.close()
            await until(lambda: origin.conns[0].done, what="origin done")
            assert sha(origin.conns[0].received) == sha(up)
            assert closed.reason is CloseReason.DONE
            assert (closed.bytes_up, closed.bytes_down) == (len(up), len(down))

    run(main)


# -- upstream failures ---------------------------------------------------------------------


@pytest.mark.parametrize("run", ALL_LOOPS, indirect=True)
def test_upstream_reset_mid_transfer_then_keeps_serving(run):
    down = pattern(7, 4 * MiB)

    async def main():
        async with (
            Origin(exchange(down)) as origin,
            ConnectProxy(Mode.RST_MID, cut_after=256 * 1024) as proxy,
            running_relay([http_upstream(proxy)], origin.address) as relay,
        ):
            reader, writer = await relay.connect()
            writer.write(b"request")
            await writer.drain()
            got, error = await read_until_error(reader)
            writer.close()
            assert error is not None or len(got) < len(down), "a reset looked like success"
            assert got == down[: len(got)]
            (closed,) = await relay.wait_closed()
            assert proxy.requests[0].cut
            assert closed.reason is CloseReason.UPSTREAM_RESET, closed
            assert closed.detail.startswith("upstream side:")
            assert relay.record().close_reason is CloseReason.UPSTREAM_RESET

            proxy.mode = Mode.OK
            origin.behaviour = echo
            assert await echo_once(relay.address) == b"ping"
            closed = await relay.wait_closed(2)
            assert closed[1].reason is CloseReason.DONE

    run(main)


def test_upstream_closes_mid_transfer_gives_short_read(run):
    down = pattern(8, 4 * MiB)

    async def main():
        async with (
            Origin(exchange(down)) as origin,
            ConnectProxy(Mode.CLOSE_MID, cut_after=300_000) as proxy,
            running_relay([http_upstream(proxy)], origin.address) as relay,
        ):
            reader, writer = await relay.connect()
            got = await read_all(reader)
            assert got == down[:300_000]
            writer.close()
            (closed,) = await relay.wait_closed()
            # A FIN is a clean end as far as TCP can tell: the client sees a short body.
            assert closed.reason is CloseReason.DONE
            assert closed.bytes_down == 300_000

    run(main)


HOSTILE = [
    (Mode.HUGE_HEAD, CloseReason.UPSTREAM_PROTOCOL_ERROR),
    (Mode.MANY_HEADERS, CloseReason.UPSTREAM_PROTOCOL_ERROR),
    (Mode.NUL, CloseReason.UPSTREAM_PROTOCOL_ERROR),
    (Mode.BAD_STATUS, CloseReason.UPSTREAM_PROTOCOL_ERROR),
    (Mode.AUTH_REQUIRED, CloseReason.UPSTREAM_AUTH_FAILED),
    (Mode.FORBIDDEN, CloseReason.UPSTREAM_REFUSED),
    (Mode.SILENT, CloseReason.UPSTREAM_TIMEOUT),
]


@pytest.mark.parametrize(("mode", "reason"), HOSTILE, ids=[m.value for m, _ in HOSTILE])
def test_hostile_proxy_closes_cleanly_with_reason(run, mode, reason):
    async def main():
        async with (
            Origin(echo) as origin,
            ConnectProxy(mode) as proxy,
            running_relay([http_upstream(proxy)], origin.address, handshake_timeout=0.3) as relay,
        ):
            reader, writer = await relay.connect()
            writer.write(b"hello")
            await writer.drain()
            got, _error = await read_until_error(reader)
            writer.close()
            assert got == b"", "the client must not see any of the proxy's answer"
            (closed,) = await relay.wait_closed()
            assert closed.reason is reason, closed
            assert closed.bytes_down == 0
            (failed,) = relay.of(UpstreamFailed)
            assert (failed.upstream, failed.reason) == ("corp", reason)
            assert failed.detail == closed.detail
            assert "corp" in closed.detail  # the user learns which proxy failed
            record = relay.record()
            assert record.state is ConnState.CLOSED and record.close_reason is reason
            assert record.upstream == "corp" and record.handshake_latency is None
            assert not relay.of(TunnelEstablished)
            assert origin.conns == []
            if mode is Mode.HUGE_HEAD:
                req = proxy.requests[0]
                # The relay stopped reading after its 16 KiB cap: the proxy could not finish.
                await until(lambda: req.huge_sent and not proxy._tasks, what="stub finished")
                assert not req.huge_finished
                assert req.huge_sent < HUGE_HEAD_SIZE // 2

    run(main)


@pytest.mark.parametrize("run", ALL_LOOPS, indirect=True)
def test_glued_bytes_after_2xx_reach_the_client_first(run):
    async def main():
        async with (
            Origin(echo) as origin,
            ConnectProxy(Mode.GLUED) as proxy,
            running_relay([http_upstream(proxy)], origin.address) as relay,
        ):
            reader, writer = await relay.connect()
            writer.write(b"ping")
            writer.write_eof()
            got = await read_all(reader)
            writer.close()
            assert got == GLUED_BYTES + b"ping"
            (closed,) = await relay.wait_closed()
            assert closed.reason is CloseReason.DONE
            assert closed.bytes_down == len(GLUED_BYTES) + 4

    run(main)


def test_unreachable_upstream(run):
    async def main():
        with socket.socket() as sock:  # a loopback port nobody listens on
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        dead = UpstreamProxy("dead", UpstreamKind.HTTP, "127.0.0.1", port)
        async with Origin(echo) as origin, running_relay([dead], origin.address) as relay:
            reader, writer = await relay.connect()
            got, _ = await read_until_error(reader)
            writer.close()
            assert got == b""
            (closed,) = await relay.wait_closed()
            assert closed.reason is CloseReason.UPSTREAM_UNREACHABLE
            assert f"127.0.0.1:{port}" in closed.detail
            (failed,) = relay.of(UpstreamFailed)
            assert failed.upstream == "dead"

    run(main)


def test_no_upstream_configured(run):
    async def main():
        async with Origin(echo) as origin, running_relay([], origin.address) as relay:
            reader, writer = await relay.connect()
            got, _ = await read_until_error(reader)
            writer.close()
            assert got == b""
            (closed,) = await relay.wait_closed()
            assert closed.reason is CloseReason.NO_UPSTREAM
            assert origin.conns == []

    run(main)


# -- redirect checks -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("destination", "reason"),
    [
        ("self", CloseReason.NOT_REDIRECTED),
        ("other-loopback", CloseReason.NOT_REDIRECTED),
        (None, CloseReason.NO_ORIGINAL_DST),
    ],
)
def test_connections_that_were_not_redirected_are_closed(run, destination, reason):
    def destination_of(sock):
        if destination is None:
            return None
        ip, port = sock.getsockname()[:2]
        return (ip, port) if destination == "self" else ("127.0.0.9", port)

    async def main():
        async with (
            ConnectProxy() as proxy,
            running_relay([http_upstream(proxy)], destination_of) as relay,
        ):
            reader, writer = await relay.connect()
            got, _ = await read_until_error(reader)
            writer.close()
            assert got == b""
            (closed,) = await relay.wait_closed()
            assert closed.reason is reason
            assert proxy.requests == [], "nothing may be dialed for such a connection"
            assert not relay.of(ConnectionRouted)
            (opened,) = relay.of(ConnectionOpened)
            assert opened.original_dst == relay.record().original_dst

    run(main)


# -- peeking -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first_bytes", "host"),
    [
        (tls_client_hello("www.example.test"), "www.example.test"),
        (b"GET /x HTTP/1.1\r\nHost: web.example.test\r\nAccept: */*\r\n\r\n", "web.example.test"),
        (b"GET /x HTTP/1.1\r\nHost: web.example.test:8080\r\n\r\n", "web.example.test"),
    ],
    ids=["tls-sni", "http-host", "http-host-port"],
)
def test_peeked_name_goes_into_connect_and_bytes_pass_intact(run, first_bytes, host):
    async def main():
        async with (
            Origin(receive_only) as origin,
            ConnectProxy() as proxy,
            running_relay([http_upstream(proxy)], origin.address, peek_timeout=5.0) as relay,
        ):
            started = time.monotonic()
            reader, writer = await relay.connect()
            writer.write(first_bytes)
            await writer.drain()
            await until(lambda: proxy.requests and proxy.requests[0].target, what="CONNECT")
            # Decided on the bytes, not on the timeout.
            assert time.monotonic() - started < 4.0
            assert proxy.requests[0].target == (host, origin.address[1])
            writer.write_eof()
            await read_all(reader)
            writer.close()
            (closed,) = await relay.wait_closed()
            await until(lambda: origin.conns[0].done, what="origin done")
            assert bytes(origin.conns[0].received) == first_bytes
            assert closed.reason is CloseReason.DONE
            assert relay.record().host == host
            (routed,) = relay.of(ConnectionRouted)
            assert routed.host == host
            assert relay.record().destination == f"{host}:{origin.address[1]}"

    run(main)


@pytest.mark.parametrize(
    "first_bytes",
    [b"", b"\x00\x01\x02 not a protocol we know", b"GET / HTTP/1.1\r\nAccept: */*\r\n"],
    ids=["silence", "garbage", "unfinished-http"],
)
def test_without_a_name_the_ip_is_used(run, first_bytes):
    peek_timeout = 0.3

    async def main():
        async with (
            Origin(echo) as origin,
            ConnectProxy() as proxy,
            running_relay(
                [http_upstream(proxy)], origin.address, peek_timeout=peek_timeout
            ) as relay,
        ):
            loop = asyncio.get_running_loop()
            started = loop.time()
            reader, writer = await relay.connect()
            if first_bytes:
                writer.write(first_bytes)
            await until(lambda: proxy.requests and proxy.requests[0].target, what="CONNECT")
            waited = loop.time() - started
            assert proxy.requests[0].target == origin.address
            if first_bytes != b"\x00\x01\x02 not a protocol we know":
                assert waited >= peek_timeout * 0.9, "the relay did not wait for a name"
            writer.write(b"|after")
            writer.write_eof()
            got = await read_all(reader)
            writer.close()
            assert got == first_bytes + b"|after"
            (closed,) = await relay.wait_closed()
            assert closed.reason is CloseReason.DONE
            assert relay.record().host is None

    run(main)


# -- credentials ---------------------------------------------------------------------------


def test_basic_auth_goes_only_to_its_own_upstream_and_never_into_text(run, caplog):
    password = "pw-" + secrets.token_hex(8)
    token = base64.b64encode(f"alice:{password}".encode()).decode()
    creds = StaticCredentialSource({"corp": Credentials("alice", Secret(password))})
    caplog.set_level(logging.DEBUG)

    async def main():
        async with (
            Origin(echo) as origin,
            ConnectProxy(credentials=("alice", password)) as corp,
            ConnectProxy(credentials=("alice", password + "-other")) as rejecting,
            ConnectProxy() as other,
        ):
            corp_up = http_upstream(corp, "corp", "alice")
            other_up = http_upstream(other, "other")
            async with running_relay([corp_up, other_up], origin.address, creds) as relay:
                assert await echo_once(relay.address) == b"ping"
                await relay.wait_closed()
                assert corp.requests[0].headers["proxy-authorization"] == f"Basic {token}"
                texts = [repr(relay.events), repr(list(relay.records.values()))]
            async with running_relay(
                [corp_up, other_up], origin.address, creds, upstream="other"
            ) as relay2:
                assert await echo_once(relay2.address) == b"ping"
                await relay2.wait_closed()
                assert "proxy-authorization" not in other.requests[0].headers
                texts += [repr(relay2.events), repr(list(relay2.records.values()))]
            wrong = http_upstream(rejecting, "corp", "alice")
            async with running_relay([wrong], origin.address, creds) as relay3:
                reader, writer = await relay3.connect()
                await read_until_error(reader)
                writer.close()
                (closed,) = await relay3.wait_closed()
                assert closed.reason is CloseReason.UPSTREAM_AUTH_FAILED
                texts += [repr(relay3.events), repr(list(relay3.records.values()))]
                texts += [closed.detail, relay3.record().close_detail]
            for conn in origin.conns:
                assert password.encode() not in conn.received
                assert token.encode() not in conn.received
        return texts

    texts = run(main)
    texts.append(caplog.text)
    texts += [str(r.args) for r in caplog.records]
    assert any("auth" in t for t in texts)  # the failure was logged and recorded ...
    for text in texts:  # ... but never the secret
        assert password not in text
        assert token not in text


def test_unusable_credentials_fail_without_leaking_the_password(run, caplog):
    """A ':' in a Basic user name is refused by the protocol code (RFC 7617)."""
    password = "pw-" + secrets.token_hex(8)
    creds = StaticCredentialSource({"corp": Credentials("ali:ce", Secret(password))})
    caplog.set_level(logging.DEBUG)

    async def main():
        async with (
            Origin(echo) as origin,
            ConnectProxy() as proxy,
            running_relay([http_upstream(proxy, "corp", "ali:ce")], origin.address, creds) as relay,
        ):
            reader, writer = await relay.connect()
            got, _ = await read_until_error(reader)
            writer.close()
            assert got == b""
            (closed,) = await relay.wait_closed()
            assert closed.reason is CloseReason.CONFIG_ERROR
            assert "cannot contain ':'" in closed.detail
            assert not proxy.requests, "nothing may be sent to the proxy"
            return [closed.detail, repr(relay.events), repr(relay.record())]

    texts = run(main)
    texts.append(caplog.text)
    assert all(password not in text for text in texts)


def test_start_errors_say_what_to_do(run):
    async def main():
        with socket.create_server(("127.0.0.1", 0)) as taken:
            port = taken.getsockname()[1]
            engine = RelayEngine(relay_settings(port=port), [])
            with pytest.raises(RelayStartError, match="in use by another program"):
                await engine.start()
        # 192.0.2.1 (TEST-NET-1) is no address of this machine: bind fails, nothing is sent.
        engine = RelayEngine(relay_settings(listen=("127.0.0.1", "192.0.2.1")), [])
        with pytest.raises(RelayStartError, match="no such address"):
            await engine.start()
        assert engine._listeners == []  # the first listener was closed again

    run(main)


@pytest.mark.parametrize("auth", [False, True], ids=["no-auth", "user-pass"])
def test_socks5_upstream(run, auth):
    password = "pw-" + secrets.token_hex(8)
    creds = StaticCredentialSource({"socks": Credentials("bob", Secret(password))})
    up = pattern(9, 300_000)

    async def main():
        async with (
            Origin(echo) as origin,
            Socks5Proxy(credentials=("bob", password) if auth else None) as proxy,
            running_relay(
                [socks_upstream(proxy, username="bob" if auth else None)],
                origin.address,
                creds if auth else None,
            ) as relay,
        ):
            reader, writer = await relay.connect()
            got, _ = await asyncio.gather(read_all(reader), write_all(writer, up))
            writer.close()
            assert sha(got) == sha(up)
            (closed,) = await relay.wait_closed()
            assert closed.reason is CloseReason.DONE
            assert proxy.requests[0].target == origin.address
            assert proxy.auth_seen == ([("bob", password)] if auth else [])
            assert password not in repr(relay.events)

    run(main)


def test_socks5_wrong_password_is_auth_failed(run):
    creds = StaticCredentialSource({"socks": Credentials("bob", Secret("wrong"))})

    async def main():
        async with (
            Origin(echo) as origin,
            Socks5Proxy(credentials=("bob", "right")) as proxy,
            running_relay([socks_upstream(proxy, username="bob")], origin.address, creds) as relay,
        ):
            reader, writer = await relay.connect()
            got, _ = await read_until_error(reader)
            writer.close()
            assert got == b""
            (closed,) = await relay.wait_closed()
            assert closed.reason is CloseReason.UPSTREAM_AUTH_FAILED
            assert "wrong" not in closed.detail

    run(main)


def test_rejected_credentials_are_not_sent_again_until_they_change(run):
    """After a 407 the stored password goes nowhere (accounts lock after a few failures)."""
    creds = StaticCredentialSource({"corp": Credentials("alice", Secret("wrong"))})

    async def main():
        async with (
            Origin(echo) as origin,
            ConnectProxy(credentials=("alice", "right")) as proxy,
            running_relay([http_upstream(proxy, "corp", "alice")], origin.address, creds) as relay,
        ):
            for i in range(3):
                reader, writer = await relay.connect()
                await read_until_error(reader)
                writer.close()
                await relay.wait_closed(i + 1)
            reasons = [e.reason for e in relay.closed]
            assert reasons == [CloseReason.UPSTREAM_AUTH_FAILED] * 3
            assert len(proxy.requests) == 1, "only the first connection may reach the proxy"
            assert "not tried again" in relay.closed[-1].detail
            # New credentials are tried (and work).
            creds.set("corp", Credentials("alice", Secret("right")))
            assert await echo_once(relay.address) == b"ping"
            await relay.wait_closed(4)
            assert relay.closed[-1].reason is CloseReason.DONE
            assert len(proxy.requests) == 2

    run(main)


# -- idle timeout and stop -----------------------------------------------------------------


@pytest.mark.parametrize("run", ALL_LOOPS, indirect=True)
def test_idle_timeout_closes_idle_tunnel_not_active_one(run):
    idle_timeout = 0.4

    async def main():
        async with (
            Origin(echo) as origin,
            ConnectProxy() as proxy,
            running_relay(
                [http_upstream(proxy)], origin.address, idle_timeout=idle_timeout
            ) as relay,
        ):
            idle_r, idle_w = await relay.connect()
            busy_r, busy_w = await relay.connect()
            idle_w.write(b"x")
            await idle_r.readexactly(1)
            opened = time.monotonic()
            pings = 0
            # The busy tunnel talks every 50 ms for 3 idle periods; the idle one says nothing.
            while time.monotonic() - opened < 3 * idle_timeout:
                busy_w.write(b"p")
                await asyncio.wait_for(busy_r.readexactly(1), 2)
                pings += 1
                await asyncio.sleep(0.05)
            (closed,) = await relay.wait_closed()
            assert closed.reason is CloseReason.IDLE_TIMEOUT
            assert closed.detail
            assert await read_all(idle_r) == b""  # the idle client sees a plain end
            idle_w.close()
            busy_w.write(b"still here")
            busy_w.write_eof()
            assert await read_all(busy_r) == b"still here"
            busy_w.close()
            closed = await relay.wait_closed(2)
            assert closed[1].reason is CloseReason.DONE
            assert pings >= 10

    run(main)


@pytest.mark.parametrize("run", ALL_LOOPS, indirect=True)
def test_stop_drains_then_closes_the_rest(run):
    drain = 1.0

    async def main():
        async with (
            Origin(echo) as origin,
            ConnectProxy() as proxy,
            running_relay([http_upstream(proxy)], origin.address, handshake_timeout=30) as relay,
        ):
            engine = relay.engine
            address = relay.address
            finishing = await relay.connect()
            lingering = await relay.connect()
            for _r, w in (finishing, lingering):
                w.write(b"x")
            for r, _w in (finishing, lingering):
                await r.readexactly(1)
            proxy.plan = [Mode.SILENT]  # a third connection stuck in its handshake
            stuck_r, stuck_w = await relay.connect()
            await until(lambda: len(proxy.requests) == 3, what="third CONNECT")

            loop = asyncio.get_running_loop()
            started = loop.time()
            stopping = asyncio.ensure_future(engine.stop(drain_timeout=drain))
            await until(lambda: not engine._listeners, what="listeners closed")
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection(*address)
            # During the drain an open tunnel still works and may finish normally.
            finishing[1].write(b"bye")
            finishing[1].write_eof()
            assert await read_all(finishing[0]) == b"bye"
            finishing[1].close()
            await stopping
            took = loop.time() - started
            assert drain * 0.9 <= took < drain + 2.0

            reasons = {e.conn_id: e.reason for e in relay.closed}
            assert sorted(r.value for r in reasons.values()) == ["done", "shutdown", "shutdown"]
            # Past the drain the client sees its connection end at once, with a reset: a
            # plain close left a slow reader hanging on the relay's send buffer (14 bug 2).
            got, error = await read_until_error(lingering[0])
            assert got == b""
            assert isinstance(error, ConnectionResetError), error
            got, _ = await read_until_error(stuck_r)
            assert got == b""
            for _r, w in (lingering, (stuck_r, stuck_w)):
                w.close()
            assert engine._tasks == set()
            assert engine._tunnels == {} and engine._records == {}
            assert [t for t in asyncio.all_tasks() if t.get_name().startswith("tray-proxy")] == []
            assert isinstance(relay.events[-1], EngineStopped)

    run(main)


def test_a_stop_cancelled_during_the_drain_still_resets_every_open_tunnel(run):
    """A caller that gives up waiting (EngineThread.call's timeout cancels the coroutine)
    must not leave the clients connected to a relay that is going away."""

    async def main():
        async with (
            Origin(echo) as origin,
            ConnectProxy() as proxy,
            running_relay([http_upstream(proxy)], origin.address) as relay,
        ):
            reader, writer = await relay.connect()
            writer.write(b"x")
            await reader.readexactly(1)
            stopping = asyncio.ensure_future(relay.engine.stop(drain_timeout=30))
            await until(lambda: not relay.engine._listeners, what="listeners closed")
            stopping.cancel()
            with pytest.raises(asyncio.CancelledError):
                await stopping
            got, error = await asyncio.wait_for(read_until_error(reader), 2)
            assert (got, type(error)) == (b"", ConnectionResetError)
            writer.close()
            assert [e.reason for e in relay.closed] == [CloseReason.SHUTDOWN]
            assert isinstance(relay.events[-1], EngineStopped)

    run(main)


def test_stop_returns_early_when_all_connections_finish(run):
    async def main():
        async with (
            Origin(echo) as origin,
            ConnectProxy() as proxy,
            running_relay([http_upstream(proxy)], origin.address) as relay,
        ):
            reader, writer = await relay.connect()
            writer.write(b"x")
            await reader.readexactly(1)
            loop = asyncio.get_running_loop()
            started = loop.time()
            stopping = asyncio.ensure_future(relay.engine.stop(drain_timeout=30))
            await until(lambda: not relay.engine._listeners, what="listeners closed")
            writer.write_eof()
            await read_all(reader)
            writer.close()
            await stopping
            assert loop.time() - started < 5
            assert [e.reason for e in relay.closed] == [CloseReason.DONE]

    run(main)


# -- many at once --------------------------------------------------------------------------


def test_500_mixed_concurrent_transfers(run):
    sizes = [0, 1, 1500, 16_384, 65_536, 200_000, 3]
    total, parallel = 500, 50

    async def main():
        async with (
            Origin(sized_exchange()) as origin,
            ConnectProxy() as proxy,
            running_relay([http_upstream(proxy)], origin.address) as relay,
        ):
            gate = asyncio.Semaphore(parallel)
            mismatches = []

            async def one(i):
                up_size, down_size = sizes[i % len(sizes)], sizes[(i * 3 + 1) % len(sizes)]
                up = pattern(100_000 + i, up_size)
                async with gate:
                    reader, writer = await relay.connect()
                    header = struct.pack("!II", i, down_size)
                    got, _ = await asyncio.gather(read_all(reader), write_all(writer, header + up))
                    writer.close()
                if sha(got) != sha(pattern(i, down_size)):
                    mismatches.append(("down", i))

            await asyncio.gather(*(one(i) for i in range(total)))
            closed = await relay.wait_closed(total, timeout=30)
            await until(lambda: all(c.done for c in origin.conns), what="origins done")
            for conn in origin.conns:
                seed, _ = struct.unpack("!II", conn.received[:8])
                up_size = sizes[seed % len(sizes)]
                if sha(conn.received[8:]) != sha(pattern(100_000 + seed, up_size)):
                    mismatches.append(("up", seed))
            assert mismatches == []
            assert len(origin.conns) == total
            assert [e.reason for e in closed].count(CloseReason.DONE) == total
            assert relay.engine.traffic()[0] == {}  # no connection open
            # Pipes are lent while bytes move, not one pair per tunnel.
            assert relay.engine._pool.created <= 2 * parallel + 8

    run(main)


# -- source ports --------------------------------------------------------------------------


def test_upstream_sockets_bind_in_source_range_wrap_and_skip_busy(run):
    first, last = free_port_range(4)
    busy = first + 1

    async def main():
        with socket.socket() as squatter:  # a listener: nobody else may bind this port
            squatter.bind(("0.0.0.0", busy))
            squatter.listen()
            async with (
                Origin(echo) as origin,
                ConnectProxy() as proxy,
                running_relay(
                    [http_upstream(proxy)],
                    origin.address,
                    source_ports=(first, last),
                    # The proxy listens on a port the redirect catches (like Squid on
                    # 443), so the relay must dial it from the reserved range.
                    redirect_ports=(proxy.address[1],),
                ) as relay,
            ):
                for i in range(7):
                    assert await echo_once(relay.address) == b"ping"
                    await relay.wait_closed(i + 1)
                ports = [r.peer[1] for r in proxy.requests]
        assert busy not in ports
        usable = [p for p in range(first, last + 1) if p != busy]
        assert ports == [usable[i % len(usable)] for i in range(7)]

    run(main)


def test_source_port_taken_by_same_destination_moves_on(run):
    """A port already connected to the same proxy cannot be reused (EADDRNOTAVAIL at
    connect, not at bind): the dialer must move on to the next port of the range."""
    first, last = free_port_range(2)

    async def main():
        async with (
            Origin(echo) as origin,
            ConnectProxy() as proxy,
            running_relay(
                [http_upstream(proxy)],
                origin.address,
                source_ports=(first, last),
                redirect_ports=(proxy.address[1],),
            ) as relay,
        ):
            # Occupy (first -> proxy) the way another tunnel of ours would.
            holder = socket.socket()
            try:
                holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                holder.bind(("0.0.0.0", first))
                holder.setblocking(False)
                await asyncio.get_running_loop().sock_connect(holder, proxy.address)
                await until(lambda: len(proxy.accepted) == 1, what="holder accepted")
                assert await echo_once(relay.address) == b"ping"
                (closed,) = await relay.wait_closed()
                assert closed.reason is CloseReason.DONE
                (request,) = proxy.requests  # the holder sent none
                assert request.peer[1] == last
            finally:
                holder.close()

    run(main)


def test_upstream_on_an_unredirected_port_uses_ephemeral_source_ports(run):
    """Only destinations the redirect catches need the reserved range; the rest keep the
    kernel's ephemeral ports (no TIME_WAIT squeeze on a 4,000-port range)."""
    first, last = free_port_range(4)

    async def main():
        async with (
            Origin(echo) as origin,
            ConnectProxy() as proxy,
            running_relay(
                [http_upstream(proxy)],
                origin.address,
                source_ports=(first, last),
                redirect_ports=(80, 443),
            ) as relay,
        ):
            assert await echo_once(relay.address) == b"ping"
            await relay.wait_closed(1)
            (request,) = proxy.requests
            assert not first <= request.peer[1] <= last

    run(main)


def test_a_redirected_connection_to_the_upstream_itself_is_refused(run):
    """If the redirect catches our own dial to the upstream, close it instead of looping."""

    async def main():
        async with Origin(echo) as origin, ConnectProxy() as proxy:
            async with running_relay([http_upstream(proxy)], origin.address) as relay:
                assert await echo_once(relay.address) == b"ping"  # the dialer learns the address
                await relay.wait_closed(1)
            async with running_relay([http_upstream(proxy)], lambda _sock: proxy.address) as looped:
                # A fresh engine has resolved nothing yet: prime its dialer the same way.
                await looped.engine._dialer.resolve(*proxy.address)
                reader, writer = await looped.connect()
                got, _ = await read_until_error(reader)
                writer.close()
                assert got == b""
                (closed,) = await looped.wait_closed()
                assert closed.reason is CloseReason.LOOP
                assert len(proxy.requests) == 1, "nothing more may reach the proxy"

    run(main)


# -- out of file descriptors ---------------------------------------------------------------

EMFILE_CHILD = textwrap.dedent(
    """
    import asyncio, dataclasses, json, os, resource, sys
    from tray_proxy.relay.engine import RelayEngine
    from tray_proxy.relay.events import EventBus
    from tray_proxy.relay.settings import RelaySettings, UpstreamKind, UpstreamProxy

    loop_kind, origin_port, proxy_port, limit = sys.argv[1], *map(int, sys.argv[2:5])

    def emit(event):
        fields = dataclasses.asdict(event) if dataclasses.is_dataclass(event) else {}
        text = json.dumps({"type": type(event).__name__, **fields}, default=lambda o: o.value)
        print(text, flush=True)

    async def main():
        bus = EventBus()
        bus.subscribe(emit)
        engine = RelayEngine(
            RelaySettings(port=0, listen=("127.0.0.1",), source_ports=None, peek_timeout=0,
                          connect_timeout=5, handshake_timeout=5),
            [UpstreamProxy("corp", UpstreamKind.HTTP, "127.0.0.1", proxy_port)],
            bus=bus,
            destination_of=lambda sock: ("127.0.0.1", origin_port),
        )
        # start() raises the soft limit to the hard one: lower both.
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
        await engine.start()
        print(json.dumps({"type": "listening", "addresses": engine.addresses}), flush=True)
        loop = asyncio.get_running_loop()
        eof = asyncio.Event()
        def on_stdin():
            if not os.read(0, 64):
                loop.remove_reader(0)
                eof.set()
        loop.add_reader(0, on_stdin)
        await eof.wait()
        await engine.stop(drain_timeout=0)

    if loop_kind == "uvloop":
        import uvloop
        uvloop.run(main())
    else:
        asyncio.run(main())
    """
)


def test_out_of_file_descriptors_keeps_tunnels_and_recovers(run, loop_kind):
    limit, tunnels, burst = 48, 8, 48

    async def main():
        async with Origin(echo) as origin, ConnectProxy() as proxy:
            child = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                EMFILE_CHILD,
                loop_kind,
                str(origin.address[1]),
                str(proxy.address[1]),
                str(limit),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
            )
            lines: list[dict] = []

            async def collect():
                assert child.stdout is not None
                while line := await child.stdout.readline():
                    lines.append(json.loads(line))

            collector = asyncio.ensure_future(collect())
            clients = []
            pending: list[socket.socket] = []
            try:
                await until(lambda: lines, 20, "the child engine to start")
                assert lines[0]["type"] == "listening", lines
                port = lines[0]["addresses"][0][1]
                address = ("127.0.0.1", port)

                for i in range(tunnels):
                    r, w = await asyncio.open_connection(*address)
                    w.write(b"%d" % i)
                    assert await asyncio.wait_for(r.readexactly(1), 5) == b"%d" % i
                    clients.append((r, w))

                # Queue a burst while the engine cannot run, so one wake-up meets more
                # pending connections than it has descriptors for.
                os.kill(child.pid, signal.SIGSTOP)
                try:
                    for _ in range(burst):
                        s = socket.socket()
                        s.setblocking(False)
                        pending.append(s)
                        err = s.connect_ex(address)
                        assert err in (0, errno.EINPROGRESS), os.strerror(err)
                finally:
                    os.kill(child.pid, signal.SIGCONT)

                # The shortage is reported: at accept() (ListenerError) when no descriptor is
                # left for the client, or as the connection's own end when one is left for the
                # client but none for its upstream. Which one a run meets depends on how many
                # descriptors the loop itself holds, so either counts; one of them must show.
                def shortage():
                    return [
                        x
                        for x in lines
                        if x["type"] in ("ListenerError", "ConnectionClosed")
                        and "Too many open files" in x.get("detail", "")
                    ]

                await until(shortage, 10, "a Too many open files report")

                async def check(i, r, w):
                    w.write(b"again%d" % i)
                    return await asyncio.wait_for(r.readexactly(len(b"again%d" % i)), 10)

                got = await asyncio.gather(*(check(i, r, w) for i, (r, w) in enumerate(clients)))
                assert got == [b"again%d" % i for i in range(tunnels)]

                for s in pending:
                    s.close()
                for r, w in clients[:3]:
                    w.write_eof()
                    await read_all(r)
                    w.close()
                del clients[:3]

                def closed(reason=None):
                    return [
                        x
                        for x in lines
                        if x["type"] == "ConnectionClosed" and reason in (None, x["reason"])
                    ]

                # Every burst connection is accepted at last (then fails or ends), and the
                # three tunnels end normally.
                await until(lambda: len(closed()) >= burst + 3, 30, "the burst to drain")
                assert len(closed("done")) >= 3
                # A connection accepted with the last descriptor has none for its upstream:
                # it ends as our own shortage. (The fast path dials right at accept, so the
                # shortage mostly shows at accept() itself, as the ListenerError above.)
                starved = [x for x in closed() if "Too many open files" in x["detail"]]
                assert {x["reason"] for x in starved} <= {"internal-error"}
                assert await echo_once(address, b"new connection") == b"new connection"
                got = await asyncio.gather(*(check(i, r, w) for i, (r, w) in enumerate(clients)))
                assert len(got) == tunnels - 3
            finally:
                for s in pending:
                    s.close()
                for _r, w in clients:
                    w.close()
                if child.returncode is None:
                    assert child.stdin is not None
                    child.stdin.close()
                    try:
                        await asyncio.wait_for(child.wait(), 10)
                    except asyncio.TimeoutError:
                        child.kill()
                        await child.wait()
                await collector
            assert child.stderr is not None
            stderr = (await child.stderr.read()).decode()
            assert child.returncode == 0, stderr
            assert "Traceback" not in stderr and "Exception in callback" not in stderr, stderr

    run(main)


# -- the dashboard's controls: close by id, traffic ------------------------------------------


async def _open_tunnels(relay, count):
    """`count` echo tunnels, each having moved one byte both ways, with their ids."""
    clients = []
    for i in range(count):
        reader, writer = await relay.connect()
        writer.write(b"%d" % i)
        assert await asyncio.wait_for(reader.readexactly(1), 5) == b"%d" % i
        clients.append((reader, writer))
    ids = [e.conn_id for e in relay.of(ConnectionOpened)]
    assert len(ids) == count and set(ids) == set(relay.engine._tunnels)
    return clients, ids


@pytest.mark.parametrize("run", ALL_LOOPS, indirect=True)
def test_close_connections_ends_the_chosen_tunnels_mid_transfer_and_no_others(run):
    async def main():
        async with (
            Origin(echo) as origin,
            ConnectProxy() as proxy,
            running_relay([http_upstream(proxy)], origin.address, spare_connections=0) as relay,
        ):
            engine = relay.engine
            clients, ids = await _open_tunnels(relay, 3)
            (busy_r, busy_w), (quiet_r, quiet_w), (kept_r, kept_w) = clients

            async def keep_sending():
                # Bounded: the tunnel is closed long before this many chunks.
                for _ in range(10_000):
                    busy_w.write(b"x" * 65536)
                    await busy_w.drain()

            async def keep_reading():
                return await read_until_error(busy_r)

            sending = asyncio.ensure_future(keep_sending())
            reading = asyncio.ensure_future(keep_reading())
            await until(lambda: engine._records[ids[0]].bytes_down > 1 << 20, what="1 MiB echoed")

            assert engine.close_connections([ids[0], ids[1], 10**12, ids[0]]) == 2
            # At once: the relay's side is gone before this returns.
            assert set(engine._tunnels) == {ids[2]}
            closed = relay.closed
            assert sorted(e.conn_id for e in closed) == ids[:2]
            for event in closed:
                assert event.reason is CloseReason.CLOSED_BY_USER
                assert event.detail == "closed from the dashboard"
                assert relay.record(event.conn_id).close_reason is CloseReason.CLOSED_BY_USER
            # The clients see a reset (a failed transfer, not a complete one), well before
            # any of the relay's own time limits.
            with pytest.raises((ConnectionError, OSError)):
                await asyncio.wait_for(sending, 5)
            got, error = await asyncio.wait_for(reading, 5)
            assert isinstance(error, ConnectionResetError), (len(got), error)
            _got, error = await asyncio.wait_for(read_until_error(quiet_r), 5)
            assert isinstance(error, ConnectionResetError), error
            # The upstream side ends too: the proxy's connections for both are gone.
            await until(lambda: proxy.open_connections == 1, 5, "the proxy's side closed")
            await until(lambda: sum(not c.done for c in origin.conns) == 1, 5, "origins done")
            # The third tunnel carries on, and closing it again or unknown ids is a no-op.
            assert engine.close_connections(ids[:2]) == 0
            kept_w.write(b"still here")
            kept_w.write_eof()
            assert await read_all(kept_r) == b"still here"
            for _r, w in clients:
                w.close()
            (*_, last) = await relay.wait_closed(3)
            assert last.conn_id == ids[2] and last.reason is CloseReason.DONE

    run(main)


@pytest.mark.parametrize("run", ALL_LOOPS, indirect=True)
def test_close_connections_while_the_proxy_has_not_answered(run):
    """Still opening, on the fast path (waiting in Deadlines) and on the Task path (a
    coroutine in its handshake): both end at once with CLOSED_BY_USER."""
    creds = StaticCredentialSource({"auth": Credentials("alice", Secret("pw"))})

    async def main():
        async with (
            Origin(echo) as origin,
            ConnectProxy(Mode.SILENT) as fast_proxy,
            ConnectProxy(Mode.SILENT, credentials=("alice", "pw")) as task_proxy,
        ):
            for proxy, upstream, path in (
                (fast_proxy, http_upstream(fast_proxy), "fast"),
                (task_proxy, http_upstream(task_proxy, "auth", "alice"), "task"),
            ):
                async with running_relay(
                    [upstream], origin.address, creds, handshake_timeout=30, spare_connections=0
                ) as relay:
                    engine = relay.engine
                    reader, writer = await relay.connect()
                    await until(lambda p=proxy: len(p.requests) == 1, what="the CONNECT")
                    (conn_id,) = engine._records
                    assert engine._deadlines is not None
                    if path == "fast":
                        assert conn_id in engine._deadlines.pending
                    else:
                        assert not engine._deadlines.pending and conn_id in engine._serving
                    assert engine.close_connections([conn_id]) == 1
                    assert engine.close_connections([conn_id]) == 0  # not twice
                    (closed,) = await relay.wait_closed(1, timeout=5)
                    assert closed.conn_id == conn_id, path
                    assert closed.reason is CloseReason.CLOSED_BY_USER, (path, closed)
                    assert closed.detail == "closed from the dashboard"
                    got, error = await asyncio.wait_for(read_until_error(reader), 5)
                    writer.close()
                    assert got == b"" and isinstance(error, ConnectionResetError), (path, error)
                    await until(lambda p=proxy: p.open_connections == 0, 5, "proxy side closed")
                    await until(lambda e=engine: not e._tasks and not e._serving, 5, "tasks")
                    assert engine._records == {} and not engine._deadlines.pending
                    assert not relay.of(UpstreamFailed)
            assert origin.conns == []

    run(main)


def test_close_connections_before_its_task_first_ran(run):
    """A Task-path connection closed between its task's creation and its first step: the
    coroutine never runs, and the connection still ends, once, with CLOSED_BY_USER."""
    creds = StaticCredentialSource({"auth": Credentials("alice", Secret("pw"))})
    answers: list[int] = []

    async def main():
        loop = asyncio.get_running_loop()
        async with (
            Origin(echo) as origin,
            ConnectProxy(credentials=("alice", "pw")) as proxy,
            running_relay(
                [http_upstream(proxy, "auth", "alice")], origin.address, creds, spare_connections=0
            ) as relay,
        ):
            engine = relay.engine

            def on_event(event):
                # Published in the accept callback just before the task is made: this
                # callback runs before the task's first step (both queued, in order).
                if isinstance(event, ConnectionOpened):
                    loop.call_soon(
                        lambda: answers.append(engine.close_connections([event.conn_id]))
                    )

            engine.bus.subscribe(on_event)
            reader, writer = await relay.connect()
            (closed,) = await relay.wait_closed(1, timeout=5)
            got, _error = await asyncio.wait_for(read_until_error(reader), 5)
            writer.close()
            assert answers == [1]
            assert closed.reason is CloseReason.CLOSED_BY_USER and got == b""
            # The coroutine never ran: it neither routed nor dialed.
            assert proxy.requests == [] and not relay.of(ConnectionRouted)
            await until(lambda: not engine._tasks and not engine._serving, 5, "tasks reaped")
            assert engine._records == {} and engine._closing_by_user == set()
            await asyncio.sleep(0)
            assert len(relay.closed) == 1

    run(main)


@pytest.mark.parametrize("run", ALL_LOOPS, indirect=True)
def test_traffic_counts_open_connections_and_totals_since_start(run):
    async def main():
        async with (
            Origin(echo) as origin,
            ConnectProxy() as proxy,
            running_relay([http_upstream(proxy)], origin.address, spare_connections=0) as relay,
        ):
            engine = relay.engine
            assert engine.traffic() == ({}, 0, 0)
            sizes = [100_000, 3 * MiB]
            clients = []
            for size in sizes:
                reader, writer = await relay.connect()
                writer.write(pattern(size, size))
                assert await reader.readexactly(size) == pattern(size, size)
                clients.append((reader, writer))
            ids = [e.conn_id for e in relay.of(ConnectionOpened)]
            counters, up, down = engine.traffic()
            assert counters == {i: (s, s) for i, s in zip(ids, sizes, strict=True)}
            assert up == down == sum(sizes)
            # The first one ends with a little more each way: it leaves the counters, its
            # bytes stay in the totals.
            reader, writer = clients[0]
            writer.write(b"bye")
            writer.write_eof()
            assert await read_all(reader) == b"bye"
            writer.close()
            (closed,) = await relay.wait_closed(1)
            assert (closed.bytes_up, closed.bytes_down) == (sizes[0] + 3, sizes[0] + 3)
            counters, up, down = engine.traffic()
            assert counters == {ids[1]: (sizes[1], sizes[1])}
            assert up == down == sum(sizes) + 3
            # A connection closed by the user counts the same way.
            assert engine.close_connections([ids[1]]) == 1
            clients[1][1].close()
            assert engine.traffic() == ({}, sum(sizes) + 3, sum(sizes) + 3)

    run(main)


# -- extra listeners (container bridges, issue 16 item 4) ------------------------------------


def test_extra_listeners_follow_the_addresses_given_and_a_bad_one_is_an_event(run):
    async def main():
        async with (
            Origin(echo) as origin,
            ConnectProxy() as proxy,
            running_relay([http_upstream(proxy)], origin.address) as relay,
        ):
            engine = relay.engine
            port = relay.address[1]
            assert engine.set_extra_listen(["127.0.0.2"]) == (("127.0.0.2", port),)
            assert ("127.0.0.2", port) in engine.addresses
            assert await echo_once(("127.0.0.2", port), b"via the bridge") == b"via the bridge"
            # An address this machine lacks, text that is no address: events, no exception;
            # the relay keeps listening where it can.
            got = engine.set_extra_listen(["127.0.0.2", "192.0.2.1", "not-an-address"])
            assert got == (("127.0.0.2", port),)
            errors = [e.detail for e in relay.of(ListenerError)]
            assert len(errors) == 2, errors
            assert any("192.0.2.1" in e and "Cannot assign" in e for e in errors), errors
            assert any("'not-an-address'" in e for e in errors), errors
            assert await echo_once(relay.address) == b"ping"
            assert await echo_once(("127.0.0.2", port)) == b"ping"
            # From another thread: handed to the loop.
            await asyncio.to_thread(engine.set_extra_listen, ["127.0.0.3"])
            await until(lambda: ("127.0.0.3", port) in engine.addresses, what="127.0.0.3")
            assert ("127.0.0.2", port) not in engine.addresses
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection("127.0.0.2", port)
            assert await echo_once(("127.0.0.3", port)) == b"ping"
            assert engine.set_extra_listen([]) == ()
            assert engine.addresses == (relay.address,)
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection("127.0.0.3", port)
            engine.set_extra_listen(["127.0.0.2"])
        # Stopped: every listener is closed, the extra ones too.
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.2", port)

    run(main)


def test_extra_listeners_given_before_start_listen_once_it_has_its_port(run):
    async def main():
        async with Origin(echo) as origin, ConnectProxy() as proxy:
            engine = RelayEngine(
                relay_settings(),
                [http_upstream(proxy)],
                destination_of=lambda _sock: origin.address,
            )
            assert engine.set_extra_listen(["127.0.0.2"]) == ()
            await engine.start()
            try:
                port = engine.addresses[0][1]
                assert engine.addresses == (("127.0.0.1", port), ("127.0.0.2", port))
                assert await echo_once(("127.0.0.2", port)) == b"ping"
            finally:
                await engine.stop(drain_timeout=0)

    run(main)
