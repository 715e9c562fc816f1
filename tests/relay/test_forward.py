"""forward_http on real loopback sockets: a client, the forwarder, and a small proxy.

The proxy here is a test double on loopback (h11 server side): it records every request as
the forwarder sent it and answers as each test scripts. Real Squid is in
tests/integration/test_forward_lab.py. Every test runs on asyncio and uvloop.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
import struct
import tracemalloc
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import h11
import pytest

from tests.relay.conftest import Runner
from tests.relay.stubs import pattern, sha, tcp_pair
from tray_proxy.relay.forward import ForwardLimits, ForwardResult, Port80Memory, forward_http
from tray_proxy.relay.pipe import abort
from tray_proxy.relay.records import CloseReason
from tray_proxy.relay.secrets import Credentials, Secret
from tray_proxy.relay.settings import AuthScheme, UpstreamKind, UpstreamProxy
from tray_proxy.relay.upstream import CredentialState, UpstreamAuth, UpstreamError

UPSTREAM = UpstreamProxy("corp", UpstreamKind.HTTP, "127.0.0.1", 3128, username="alice")
CREDS = Credentials("alice", Secret("pa:ss wörd"))
BASIC = "Basic " + base64.b64encode("alice:pa:ss wörd".encode()).decode()
DST = ("203.0.113.7", 80)


@dataclass
class Seen:
    """One request as the proxy received it."""

    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    conn: int = 0

    def header(self, name: bytes) -> bytes | None:
        return next((v for n, v in self.headers if n == name), None)


Respond = Callable[["Seen", "ProxyConn"], Awaitable[None]]


@dataclass
class ProxyConn:
    """The proxy side of one connection: h11 and the stream writer, for scripted answers."""

    index: int
    http: h11.Connection
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def body(self) -> bytes:
        return await body(self.http, self.reader)

    async def send(self, *events: Any) -> None:
        for event in events:
            self.writer.write(self.http.send(event) or b"")
        await self.writer.drain()

    async def reply(
        self, status: int = 200, body: bytes = b"", headers: list[tuple[str, str]] | None = None
    ) -> None:
        fields = headers if headers is not None else [("Content-Length", str(len(body)))]
        await self.send(h11.Response(status_code=status, headers=fields, reason=b"Fine"))
        if body:
            await self.send(h11.Data(data=body))
        await self.send(h11.EndOfMessage())


async def ok(seen: Seen, conn: ProxyConn) -> None:
    await conn.reply(200, b"hello " + seen.target)


@dataclass
class FakeProxy:
    """An HTTP proxy on loopback that reads requests with h11 and calls `respond`.

    `read_body=False` hands the request to `respond` before its body (for 100-continue and
    early answers); `respond` then reads the body itself with `body()`.
    """

    respond: Respond = ok
    read_body: bool = True
    seen: list[Seen] = field(default_factory=list)
    connections: int = 0
    server: asyncio.Server | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    clients: list[asyncio.StreamWriter] = field(default_factory=list)

    async def start(self) -> FakeProxy:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def dial(self) -> socket.socket:
        sock = socket.socket()
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.port))
        return sock

    async def close(self) -> None:
        assert self.server is not None
        for client in self.clients:
            client.close()
        self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        self.connections += 1
        conn = ProxyConn(self.connections, h11.Connection(h11.SERVER), reader, writer)
        try:
            while True:
                event = await next_event(conn.http, reader)
                if not isinstance(event, h11.Request):
                    return
                seen = Seen(event.method, event.target, list(event.headers.raw_items()))
                seen.conn = conn.index
                self.seen.append(seen)
                if self.read_body:
                    seen.body = await body(conn.http, reader)
                await self.respond(seen, conn)
                if conn.http.our_state is not h11.DONE or conn.http.their_state is not h11.DONE:
                    return
                conn.http.start_next_cycle()
        except (h11.ProtocolError, ConnectionError):
            return
        finally:
            self.tasks.discard(task)
            writer.close()


async def next_event(conn: h11.Connection, reader: asyncio.StreamReader) -> object:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await reader.read(65536))


async def body(conn: h11.Connection, reader: asyncio.StreamReader) -> bytes:
    out = bytearray()
    while True:
        event = await next_event(conn, reader)
        if isinstance(event, h11.Data):
            out += event.data
        elif isinstance(event, h11.EndOfMessage):
            return bytes(out)
        else:
            raise AssertionError(f"unexpected {event!r}")


@dataclass
class Session:
    """The test's client end and the forwarder task serving the other end."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    task: asyncio.Task[ForwardResult]
    http: h11.Connection = field(default_factory=lambda: h11.Connection(h11.CLIENT))

    async def response(self) -> tuple[h11.Response, bytes]:
        """The next response and its body, parsed by h11 as a client (framing checked)."""
        head = await next_event(self.http, self.reader)
        while isinstance(head, h11.InformationalResponse):
            head = await next_event(self.http, self.reader)
        assert isinstance(head, h11.Response), head
        data = await body(self.http, self.reader)
        if self.http.our_state is h11.DONE and self.http.their_state is h11.DONE:
            self.http.start_next_cycle()
        elif self.http.their_state is h11.MUST_CLOSE:
            self.writer.close()  # as a client does after `Connection: close`
        return head, data

    async def get(self, target: str, host: str = "origin.example", **fields: str) -> None:
        headers = [("Host", host), *fields.items()]
        self.writer.write(self.http.send(h11.Request(method="GET", target=target, headers=headers)))
        self.writer.write(self.http.send(h11.EndOfMessage()))
        await self.writer.drain()

    async def result(self) -> ForwardResult:
        return await asyncio.wait_for(self.task, 10)


async def session(
    proxy: FakeProxy,
    *,
    credentials: Credentials | None = CREDS,
    auth: UpstreamAuth | None = None,
    upstream: UpstreamProxy = UPSTREAM,
    first: bytes = b"",
    host: str | None = None,
    limits: ForwardLimits | None = None,
    on_answer: Callable[[], None] | None = None,
) -> Session:
    ours, theirs = tcp_pair()
    if auth is None:
        auth = UpstreamAuth()
        auth.memo.scheme = "basic"
    reader, writer = await asyncio.open_connection(sock=ours)
    proxy.clients.append(writer)
    task = asyncio.get_running_loop().create_task(
        forward_http(
            theirs,
            first,
            DST,
            upstream,
            credentials,
            auth,
            proxy.dial,
            host=host,
            limits=limits,
            on_answer=on_answer,
        )
    )
    task.add_done_callback(lambda t: _close(theirs, t))
    return Session(reader, writer, task)


def _close(sock: socket.socket, task: asyncio.Task[ForwardResult]) -> None:
    """What the engine does with the client socket when forward_http returns."""
    if not task.cancelled() and task.exception() is None and task.result().reset:
        abort(sock)
    else:
        sock.close()


def on_proxy(
    test: Callable[[FakeProxy], Awaitable[None]], **kwargs: object
) -> Callable[[], Awaitable[None]]:
    async def body_() -> None:
        proxy = await FakeProxy(**kwargs).start()  # type: ignore[arg-type]
        try:
            await test(proxy)
        finally:
            await proxy.close()

    return body_


# -- requests as the proxy sees them ----------------------------------------------------------


def test_keep_alive_requests_go_in_absolute_form_with_basic_on_one_proxy_connection(
    run: Runner,
) -> None:
    async def test(proxy: FakeProxy) -> None:
        s = await session(proxy)
        for path in ("/a", "/b?x=1", "/c"):
            await s.get(path, **{"Connection": "keep-alive, X-Drop", "X-Drop": "1"})
            head, data = await s.response()
            assert (
                head.status_code == 200 and data == b"hello http://origin.example" + path.encode()
            )
        s.writer.close()
        result = await s.result()
        assert [x.target for x in proxy.seen] == [
            b"http://origin.example/a",
            b"http://origin.example/b?x=1",
            b"http://origin.example/c",
        ]
        assert {x.conn for x in proxy.seen} == {1}, "one proxy connection for all three"
        for x in proxy.seen:
            assert x.header(b"Proxy-Authorization") == BASIC.encode()
            assert x.header(b"Host") == b"origin.example"
            assert x.header(b"X-Drop") is None and x.header(b"Connection") is None
        assert result.reason is CloseReason.DONE and result.requests == 3
        assert result.failure is None and not result.reset
        assert result.bytes_down > 0 and result.bytes_up > 0

    run(on_proxy(test))


def test_pipelined_requests_are_answered_in_order(run: Runner) -> None:
    async def slow_first(seen: Seen, conn: ProxyConn) -> None:
        if seen.target.endswith(b"/1"):
            await asyncio.sleep(0.05)  # the later answers must still wait for this one
        await ok(seen, conn)

    async def test(proxy: FakeProxy) -> None:
        s = await session(proxy)
        raw = b"".join(
            f"GET /{i} HTTP/1.1\r\nHost: origin.example\r\n\r\n".encode() for i in range(1, 6)
        )
        s.writer.write(raw)  # all five before any answer
        await s.writer.drain()
        for i in range(1, 6):
            s.http.send(h11.Request(method="GET", target=f"/{i}", headers=[("Host", "x")]))
            s.http.send(h11.EndOfMessage())
            head, data = await s.response()
            assert data == f"hello http://origin.example/{i}".encode()
        s.writer.close()
        assert (await s.result()).requests == 5

    run(on_proxy(test, respond=slow_first))


def test_chunked_upload_with_100_continue_and_chunked_download(run: Runner) -> None:
    upload = pattern(1, 300_000)
    download = pattern(2, 500_000)

    async def test(proxy: FakeProxy) -> None:
        s = await session(proxy)
        s.writer.write(
            s.http.send(
                h11.Request(
                    method="POST",
                    target="/upload",
                    headers=[
                        ("Host", "origin.example"),
                        ("Transfer-Encoding", "chunked"),
                        ("Expect", "100-continue"),
                    ],
                )
            )
        )
        await s.writer.drain()
        # The client waits for 100 Continue before the body, as curl does.
        informational = await next_event(s.http, s.reader)
        assert isinstance(informational, h11.InformationalResponse)
        assert informational.status_code == 100
        for i in range(0, len(upload), 50_000):
            s.writer.write(s.http.send(h11.Data(data=upload[i : i + 50_000])))
        s.writer.write(s.http.send(h11.EndOfMessage()))
        await s.writer.drain()
        head, data = await s.response()
        assert head.status_code == 200
        assert sha(data) == sha(download)
        assert sha(proxy.seen[0].body) == sha(upload)
        assert proxy.seen[0].header(b"Transfer-Encoding") == b"chunked"
        s.writer.close()
        await s.result()

    run(on_proxy(test, respond=_continue_then_chunked(download), read_body=False))


def _continue_then_chunked(download: bytes) -> Respond:
    async def respond(seen: Seen, conn: ProxyConn) -> None:
        assert seen.header(b"Expect") == b"100-continue"
        await conn.send(h11.InformationalResponse(status_code=100, headers=[]))
        seen.body = await conn.body()
        await conn.send(h11.Response(status_code=200, headers=[("Transfer-Encoding", "chunked")]))
        for i in range(0, len(download), 70_000):
            await conn.send(h11.Data(data=download[i : i + 70_000]))
        await conn.send(h11.EndOfMessage())

    return respond


def test_head_and_304_have_no_body_and_the_connection_carries_on(run: Runner) -> None:
    async def respond(seen: Seen, conn: ProxyConn) -> None:
        if seen.method == b"HEAD":
            await conn.reply(200, headers=[("Content-Length", "12345")])
        elif seen.target.endswith(b"/cached"):
            await conn.reply(304, headers=[("ETag", '"v1"')])
        else:
            await ok(seen, conn)

    async def test(proxy: FakeProxy) -> None:
        s = await session(proxy)
        s.writer.write(
            s.http.send(h11.Request(method="HEAD", target="/big", headers=[("Host", "a.example")]))
        )
        s.writer.write(s.http.send(h11.EndOfMessage()))
        head, data = await s.response()
        assert head.status_code == 200 and data == b""
        assert dict(head.headers)[b"content-length"] == b"12345"
        await s.get("/cached", host="a.example", **{"If-None-Match": '"v1"'})
        head, data = await s.response()
        assert head.status_code == 304 and data == b""
        await s.get("/after", host="a.example")
        head, data = await s.response()
        assert data == b"hello http://a.example/after"
        s.writer.close()
        assert (await s.result()).requests == 3
        assert proxy.connections == 1

    run(on_proxy(test, respond=respond))


def _raw_then_close(head: bytes, data: bytes) -> Respond:
    async def respond(seen: Seen, conn: ProxyConn) -> None:
        conn.writer.write(head + data)
        await conn.writer.drain()
        conn.writer.close()

    return respond


def test_a_response_without_length_is_read_to_close_and_reframed_for_the_client(
    run: Runner,
) -> None:
    data = pattern(3, 200_000)

    async def test(proxy: FakeProxy) -> None:
        s = await session(proxy)
        await s.get("/stream", host="a.example")
        head, got = await s.response()
        assert sha(got) == sha(data)
        assert dict(head.headers).get(b"transfer-encoding") == b"chunked"
        # The client connection is still good: the next request gets a new proxy connection.
        await s.get("/again", host="a.example")
        head, got = await s.response()
        assert sha(got) == sha(data)
        s.writer.close()
        result = await s.result()
        assert result.requests == 2 and result.reason is CloseReason.DONE
        assert proxy.connections == 2

    run(on_proxy(test, respond=_raw_then_close(b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\n", data)))


def test_an_http10_client_gets_a_close_delimited_body(run: Runner) -> None:
    data = pattern(4, 100_000)

    async def test(proxy: FakeProxy) -> None:
        s = await session(proxy)
        s.writer.write(b"GET /old HTTP/1.0\r\n\r\n")  # no Host: the destination IP
        await s.writer.drain()
        raw = await asyncio.wait_for(s.reader.read(-1), 10)
        head, _, got = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert b"chunked" not in head.lower()
        assert sha(got) == sha(data)
        assert proxy.seen[0].target == b"http://203.0.113.7/old"
        assert proxy.seen[0].header(b"Host") == b"203.0.113.7"
        await s.result()

    run(on_proxy(test, respond=_raw_then_close(b"HTTP/1.1 200 OK\r\n\r\n", data)))


def test_a_stale_kept_alive_proxy_connection_is_redialled_for_a_request_without_body(
    run: Runner,
) -> None:
    async def answer_then_drop(seen: Seen, conn: ProxyConn) -> None:
        await ok(seen, conn)  # keep-alive as far as the headers go, then gone
        conn.writer.close()

    async def test(proxy: FakeProxy) -> None:
        s = await session(proxy)
        for path in ("/1", "/2", "/3"):
            await s.get(path)
            head, _ = await s.response()
            assert head.status_code == 200
            await asyncio.sleep(0.02)  # the proxy's close arrives before the next request
        s.writer.close()
        assert (await s.result()).requests == 3
        assert proxy.connections == 3

    run(on_proxy(test, respond=answer_then_drop))


# -- authentication ------------------------------------------------------------------------


def _407(schemes: str = 'Basic realm="corp"') -> Respond:
    async def respond(seen: Seen, conn: ProxyConn) -> None:
        if seen.header(b"Proxy-Authorization") == BASIC.encode():
            await ok(seen, conn)
            return
        body_ = b"auth needed"
        await conn.reply(
            407,
            body_,
            headers=[("Proxy-Authenticate", schemes), ("Content-Length", str(len(body_)))],
        )

    return respond


def test_rejected_basic_credentials_fail_like_the_connect_path_and_are_not_sent_again(
    run: Runner,
) -> None:
    rejected: list[Credentials] = []

    async def test(proxy: FakeProxy) -> None:
        auth = UpstreamAuth(on_rejected=rejected.append)
        auth.memo.scheme = "basic"
        wrong = Credentials("alice", Secret("wrong"))
        s = await session(proxy, credentials=wrong, auth=auth)
        await s.get("/x")
        head, text = await s.response()
        assert head.status_code == 502
        result = await s.result()
        assert result.reason is CloseReason.UPSTREAM_AUTH_FAILED
        assert result.failure is not None and result.failure.rejected
        assert result.failure.status == 407
        assert "rejected the credentials of alice (Basic)" in result.detail
        assert "wrong" not in result.detail and b"wrong" not in text
        assert auth.state is CredentialState.REJECTED and rejected == [wrong]
        # The next connection fails at once: the proxy sees no second password.
        s2 = await session(proxy, credentials=wrong, auth=auth)
        await s2.get("/y")
        head, _ = await s2.response()
        assert head.status_code == 502
        result2 = await s2.result()
        assert result2.reason is CloseReason.UPSTREAM_AUTH_FAILED
        assert "not tried again until they change" in result2.detail
        assert len(proxy.seen) == 1 and rejected == [wrong]

    run(on_proxy(test, respond=_407()))


def test_without_a_known_scheme_the_first_request_goes_bare_and_again_with_basic(
    run: Runner,
) -> None:
    async def test(proxy: FakeProxy) -> None:
        auth = UpstreamAuth()
        answers: list[int] = []
        s = await session(proxy, auth=auth, on_answer=lambda: answers.append(len(proxy.seen)))
        await s.get("/x")
        head, data = await s.response()
        assert head.status_code == 200 and data == b"hello http://origin.example/x"
        assert answers == [2], "once, at the answer after the 407, not at the 407"
        await s.get("/y")
        head, data = await s.response()
        s.writer.close()
        result = await s.result()
        assert [x.header(b"Proxy-Authorization") for x in proxy.seen] == [
            None,
            BASIC.encode(),
            BASIC.encode(),
        ]
        assert proxy.connections == 1, "the 407's connection carried the next request"
        assert auth.memo.scheme == "basic" and auth.state is CredentialState.VERIFIED
        assert result.requests == 2

    run(on_proxy(test, respond=_407()))


def test_a_proxy_that_wants_ntlm_for_plain_http_never_sees_the_password(run: Runner) -> None:
    async def test(proxy: FakeProxy) -> None:
        s = await session(proxy, auth=UpstreamAuth())
        await s.get("/x")
        head, text = await s.response()
        assert head.status_code == 502
        result = await s.result()
        assert result.reason is CloseReason.UPSTREAM_AUTH_FAILED
        assert "wants NTLM for plain HTTP" in result.detail and "Basic only" in result.detail
        assert result.failure is not None and not result.failure.rejected
        assert [x.header(b"Proxy-Authorization") for x in proxy.seen] == [None]

    run(on_proxy(test, respond=_407("NTLM")))


def test_a_407_without_credentials_says_no_password_is_set_up(run: Runner) -> None:
    async def test(proxy: FakeProxy) -> None:
        s = await session(proxy, credentials=None, auth=UpstreamAuth())
        await s.get("/x")
        head, _ = await s.response()
        assert head.status_code == 502
        result = await s.result()
        assert "no password is set up" in result.detail

    run(on_proxy(test, respond=_407()))


# -- broken connections and limits --------------------------------------------------------


def test_a_proxy_that_breaks_off_a_body_resets_the_client(run: Runner) -> None:
    async def test(proxy: FakeProxy) -> None:
        s = await session(proxy)
        await s.get("/x")
        raw = bytearray()
        with contextlib.suppress(ConnectionError):
            while chunk := await asyncio.wait_for(s.reader.read(65536), 10):
                raw += chunk
        head, _, got = bytes(raw).partition(b"\r\n\r\n")
        assert b"content-length: 1000" in head.lower() and len(got) == 500
        result = await s.result()
        assert result.reason is CloseReason.UPSTREAM_RESET and result.reset

    head = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
    run(on_proxy(test, respond=_raw_then_close(head, b"x" * 500)))


def test_a_client_that_goes_away_mid_upload_closes_the_proxy_side(run: Runner) -> None:
    async def hold(seen: Seen, conn: ProxyConn) -> None:
        with contextlib.suppress(h11.ProtocolError, ConnectionError):
            await conn.body()

    async def test(proxy: FakeProxy) -> None:
        s = await session(proxy)
        s.writer.write(b"PUT /f HTTP/1.1\r\nHost: a.example\r\nContent-Length: 1000000\r\n\r\n")
        s.writer.write(b"y" * 1000)
        await s.writer.drain()
        await _until(lambda: len(proxy.seen) == 1)
        s.writer.close()
        result = await s.result()
        assert result.reason is CloseReason.CLIENT_RESET and result.reset
        await _until(lambda: not proxy.tasks)

    run(on_proxy(test, respond=hold, read_body=False))


def test_a_request_head_over_the_limit_gets_431(run: Runner) -> None:
    async def test(proxy: FakeProxy) -> None:
        s = await session(proxy, limits=ForwardLimits(max_head=4096))
        await s.get("/x", **{"X-Big": "b" * 8000})
        head, _ = await s.response()
        assert head.status_code == 431
        result = await s.result()
        assert result.reason is CloseReason.DONE and "431" in result.detail
        assert proxy.seen == []

    run(on_proxy(test))


def test_a_second_host_on_one_connection_gets_421(run: Runner) -> None:
    async def test(proxy: FakeProxy) -> None:
        s = await session(proxy, host="a.example")
        await s.get("/1", host="a.example")
        head, _ = await s.response()
        assert head.status_code == 200
        await s.get("/2", host="b.example")
        head, text = await s.response()
        assert head.status_code == 421 and b"b.example" in text
        result = await s.result()
        assert [x.target for x in proxy.seen] == [b"http://a.example/1"]
        assert result.requests == 2

    run(on_proxy(test))


def test_a_client_that_sends_no_http_gets_400(run: Runner) -> None:
    async def test(proxy: FakeProxy) -> None:
        s = await session(proxy, first=b"\x16\x03\x01 not http\r\n\r\n")
        raw = await asyncio.wait_for(s.reader.read(-1), 10)
        assert raw.startswith(b"HTTP/1.1 400 ")
        assert proxy.seen == []
        await s.result()

    run(on_proxy(test))


def test_a_100_mb_download_streams_in_bounded_memory(run: Runner) -> None:
    total = 100 * 1024 * 1024
    block = pattern(5, 1024 * 1024)

    async def big(seen: Seen, conn: ProxyConn) -> None:
        await conn.send(h11.Response(status_code=200, headers=[("Content-Length", str(total))]))
        for _ in range(total // len(block)):
            await conn.send(h11.Data(data=block))
        await conn.send(h11.EndOfMessage())

    async def test(proxy: FakeProxy) -> None:
        s = await session(proxy)
        await s.get("/big")
        tracemalloc.start()
        try:
            received = 0
            while received < total + 40:  # head + body
                chunk = await asyncio.wait_for(s.reader.read(1 << 20), 10)
                assert chunk
                received += len(chunk)
                if received > total:
                    break
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        s.writer.close()
        result = await s.result()
        assert result.bytes_down > total
        # The proxy's 1 MiB block, the test's reads and a few receive buffers, not 100 MB.
        assert peak < 24 * 1024 * 1024, f"peak {peak / 1e6:.1f} MB"

    run(on_proxy(test, respond=big))


async def _until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# -- Port80Memory ----------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("status", [403, 405, 501])
def test_port80_memory_learns_a_refused_connect(status: int) -> None:
    memory = Port80Memory()
    assert not memory.forwards(UPSTREAM, 80)
    assert memory.learn(UPSTREAM, 80, status)
    assert memory.forwards(UPSTREAM, 80) and not memory.forwards(UPSTREAM, 8080)


@pytest.mark.parametrize("status", [None, 200, 407, 502, 503])
def test_port80_memory_ignores_other_answers(status: int | None) -> None:
    memory = Port80Memory()
    assert not memory.learn(UPSTREAM, 80, status)
    assert not memory.forwards(UPSTREAM, 80)


def test_port80_memory_never_forwards_for_socks5() -> None:
    socks = UpstreamProxy("s", UpstreamKind.SOCKS5, "127.0.0.1", 1080)
    memory = Port80Memory()
    assert not memory.learn(socks, 80, 403)
    assert not memory.forwards(socks, 80)


def test_port80_memory_forgets_after_its_ttl_and_on_request() -> None:
    clock = Clock()
    memory = Port80Memory(ttl=60, clock=clock)
    other = UpstreamProxy("other", UpstreamKind.HTTP, "127.0.0.2", 3128)
    memory.learn(UPSTREAM, 80, 403)
    memory.learn(other, 80, 403)
    clock.now += 59
    assert memory.forwards(UPSTREAM, 80)
    clock.now += 2
    assert not memory.forwards(UPSTREAM, 80)
    memory.learn(UPSTREAM, 80, 403)
    memory.learn(other, 80, 403)
    memory.forget("corp")
    assert not memory.forwards(UPSTREAM, 80) and memory.forwards(other, 80)
    memory.forget()
    assert not memory.forwards(other, 80)
    assert "Port80Memory" in repr(memory)


def test_port80_memory_is_bounded() -> None:
    memory = Port80Memory()
    for port in range(1, 600):
        memory.learn(UPSTREAM, port, 403)
    assert len(memory._until) <= 256


def test_an_upstream_error_from_the_dialer_is_the_failure(run: Runner) -> None:
    async def test(proxy: FakeProxy) -> None:
        ours, theirs = tcp_pair()

        async def refuse() -> socket.socket:
            raise UpstreamError(CloseReason.UPSTREAM_UNREACHABLE, "cannot connect to nowhere")

        reader, writer = await asyncio.open_connection(sock=ours)
        writer.write(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
        await writer.drain()
        result = await forward_http(theirs, b"", DST, UPSTREAM, None, UpstreamAuth(), refuse)
        theirs.close()
        raw = await asyncio.wait_for(reader.read(-1), 10)
        assert raw.startswith(b"HTTP/1.1 502 ")
        assert result.reason is CloseReason.UPSTREAM_UNREACHABLE
        assert result.failure is not None
        writer.close()

    run(on_proxy(test))


def test_pinned_basic_is_sent_from_the_first_request(run: Runner) -> None:
    pinned = UpstreamProxy(
        "corp", UpstreamKind.HTTP, "127.0.0.1", 3128, username="alice", auth=AuthScheme.BASIC
    )

    async def test(proxy: FakeProxy) -> None:
        s = await session(proxy, auth=UpstreamAuth(), upstream=pinned)
        await s.get("/x")
        await s.response()
        s.writer.close()
        await s.result()
        assert proxy.seen[0].header(b"Proxy-Authorization") == BASIC.encode()

    run(on_proxy(test))


def _407_then_echo(seen: Seen, conn: ProxyConn) -> Awaitable[None]:
    async def respond() -> None:
        if seen.header(b"Proxy-Authorization") != BASIC.encode():
            # Answer at once, without reading the body (Squid does the same).
            text = b"auth needed"
            await conn.reply(
                407,
                text,
                headers=[("Proxy-Authenticate", 'Basic realm="corp"'), ("Content-Length", "11")],
            )
            return
        if seen.header(b"Expect") == b"100-continue":
            await conn.send(h11.InformationalResponse(status_code=100, headers=[]))
        seen.body = await conn.body()
        await conn.reply(200, seen.body)

    return respond()


@pytest.mark.parametrize("client_expects", [False, True])
def test_an_upload_waits_for_the_proxy_s_first_word_when_a_407_may_come(
    run: Runner, client_expects: bool
) -> None:
    upload = pattern(6, 200_000)

    async def test(proxy: FakeProxy) -> None:
        auth = UpstreamAuth()  # no scheme known yet: the first request goes bare
        s = await session(proxy, auth=auth)
        fields = [("Host", "a.example"), ("Content-Length", str(len(upload)))]
        if client_expects:
            fields.append(("Expect", "100-continue"))
        s.writer.write(s.http.send(h11.Request(method="POST", target="/up", headers=fields)))
        await s.writer.drain()
        if client_expects:
            informational = await next_event(s.http, s.reader)
            assert isinstance(informational, h11.InformationalResponse)
        s.writer.write(s.http.send(h11.Data(data=upload)))
        s.writer.write(s.http.send(h11.EndOfMessage()))
        await s.writer.drain()
        head, data = await s.response()
        assert head.status_code == 200 and sha(data) == sha(upload)
        bare, authed = proxy.seen
        assert bare.header(b"Proxy-Authorization") is None
        assert bare.header(b"Expect") == b"100-continue"  # ours, when the client sent none
        assert authed.header(b"Proxy-Authorization") == BASIC.encode()
        assert sha(authed.body) == sha(upload)
        assert auth.memo.scheme == "basic"
        s.writer.close()
        assert (await s.result()).requests == 1

    run(on_proxy(test, respond=_407_then_echo, read_body=False))


# -- more edges --------------------------------------------------------------------------------


def _request(s: Session, method: str, target: str, fields: list[tuple[str, str]]) -> None:
    s.writer.write(s.http.send(h11.Request(method=method, target=target, headers=fields)))


def test_an_answer_before_the_upload_ends_is_relayed_and_ends_the_connection(
    run: Runner,
) -> None:
    async def too_large(seen: Seen, conn: ProxyConn) -> None:
        await conn.reply(413, b"too large")

    async def test(proxy: FakeProxy) -> None:
        s = await session(proxy)
        _request(s, "PUT", "/f", [("Host", "a.example"), ("Content-Length", "10000000")])
        s.writer.write(b"z" * 1000)
        await s.writer.drain()
        head, data = await s.response()
        assert head.status_code == 413 and data == b"too large"
        s.writer.close()
        result = await s.result()
        assert result.reason is CloseReason.DONE
        assert "answered before the request body ended" in result.detail

    run(on_proxy(test, respond=too_large, read_body=False))


def test_interim_answers_go_to_http11_clients_and_100_only_to_those_that_asked(
    run: Runner,
) -> None:
    async def hints(seen: Seen, conn: ProxyConn) -> None:
        await conn.send(
            h11.InformationalResponse(status_code=103, headers=[("Link", "</s.css>")]),
            h11.InformationalResponse(status_code=100, headers=[]),
        )
        await ok(seen, conn)

    async def test(proxy: FakeProxy) -> None:
        s = await session(proxy)
        await s.get("/x")
        first = await next_event(s.http, s.reader)
        assert isinstance(first, h11.InformationalResponse) and first.status_code == 103
        final = await next_event(s.http, s.reader)
        assert isinstance(final, h11.Response), "no 100 for a client that did not ask"
        await body(s.http, s.reader)
        s.writer.close()
        await s.result()
        old = await session(proxy)
        old.writer.write(b"GET /y HTTP/1.0\r\nHost: a.example\r\n\r\n")
        raw = await asyncio.wait_for(old.reader.read(-1), 10)
        assert raw.startswith(b"HTTP/1.1 200 "), "no 1xx at all for HTTP/1.0"
        await old.result()

    run(on_proxy(test, respond=hints))


@pytest.mark.parametrize(
    ("head", "words"),
    [
        (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n", "SWITCH_UPGRADE"),
        (b"HTTP/1.1 200 OK\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n", "head over 4096"),
        (b"HTTP/1.1 407 Auth\r\nProxy-Authenticate: ,,=\r\nContent-Length: 0\r\n\r\n", ""),
        (b"HTTP/9 what\r\n\r\n", ""),
    ],
)
def test_a_bad_answer_from_the_proxy_is_a_502(run: Runner, head: bytes, words: str) -> None:
    async def test(proxy: FakeProxy) -> None:
        s = await session(proxy, auth=UpstreamAuth(), limits=ForwardLimits(max_head=4096))
        await s.get("/x")
        response, text = await s.response()
        assert response.status_code == 502
        result = await s.result()
        assert result.reason is CloseReason.UPSTREAM_PROTOCOL_ERROR, result
        assert words in result.detail

    run(on_proxy(test, respond=_raw_then_close(head, b"")))


def test_a_user_name_basic_cannot_carry_is_a_configuration_error(run: Runner) -> None:
    async def test(proxy: FakeProxy) -> None:
        s = await session(proxy, credentials=Credentials("dom:alice", Secret("x")))
        await s.get("/x")
        head, _ = await s.response()
        assert head.status_code == 502
        result = await s.result()
        assert result.reason is CloseReason.CONFIG_ERROR and proxy.seen == []

    run(on_proxy(test))


def test_a_407_after_the_body_started_fails_and_the_next_request_sends_basic(
    run: Runner,
) -> None:
    async def slow_407(seen: Seen, conn: ProxyConn) -> None:
        await asyncio.sleep(1.3)  # past the forwarder's wait for a first word
        await conn.reply(
            407, b"", headers=[("Proxy-Authenticate", "Basic"), ("Content-Length", "0")]
        )

    async def test(proxy: FakeProxy) -> None:
        auth = UpstreamAuth()
        s = await session(proxy, auth=auth)
        big = 200_000  # more than the forwarder keeps to send again
        _request(s, "POST", "/f", [("Host", "a.example"), ("Content-Length", str(big))])
        s.writer.write(s.http.send(h11.Data(data=b"h" * big)))
        await s.writer.drain()
        head, _ = await s.response()
        assert head.status_code == 502
        result = await s.result()
        assert "after the request body had started" in result.detail
        assert auth.memo.scheme == "basic"

    run(on_proxy(test, respond=slow_407, read_body=False))


def test_a_407_whose_connection_breaks_asks_again_on_a_new_one(run: Runner) -> None:
    async def cut_407(seen: Seen, conn: ProxyConn) -> None:
        if seen.header(b"Proxy-Authorization") is None:
            head = b"HTTP/1.1 407 Auth\r\nProxy-Authenticate: Basic\r\nContent-Length: 99\r\n\r\n"
            conn.writer.write(head + b"cut")
            await conn.writer.drain()
            conn.writer.close()
            return
        await ok(seen, conn)

    async def test(proxy: FakeProxy) -> None:
        s = await session(proxy, auth=UpstreamAuth())
        await s.get("/x")
        head, _ = await s.response()
        assert head.status_code == 200
        s.writer.close()
        await s.result()
        assert proxy.connections == 2

    run(on_proxy(test, respond=cut_407))


def test_idle_clients_and_silent_proxies_time_out(run: Runner) -> None:
    async def silent(seen: Seen, conn: ProxyConn) -> None:
        await asyncio.sleep(30)

    async def test(proxy: FakeProxy) -> None:
        limits = ForwardLimits(idle_timeout=0.3)
        idle = await session(proxy, limits=limits)
        result = await idle.result()
        assert result.reason is CloseReason.IDLE_TIMEOUT and not result.reset
        half = await session(proxy, limits=limits)
        half.writer.write(b"GET /x HTTP/1.1\r\nHost: a")  # and nothing more
        result = await half.result()
        assert result.reason is CloseReason.IDLE_TIMEOUT and result.reset
        waiting = await session(proxy, limits=limits)
        await waiting.get("/slow")
        head, _ = await waiting.response()
        assert head.status_code == 504
        result = await waiting.result()
        assert result.reason is CloseReason.IDLE_TIMEOUT

    run(on_proxy(test, respond=silent))


def test_a_client_reset_while_the_answer_streams_is_a_client_reset(run: Runner) -> None:
    async def endless(seen: Seen, conn: ProxyConn) -> None:
        await conn.send(h11.Response(status_code=200, headers=[("Content-Length", str(1 << 34))]))
        with contextlib.suppress(ConnectionError):
            for _ in range(100_000):
                await conn.send(h11.Data(data=b"x" * 65536))

    async def test(proxy: FakeProxy) -> None:
        s = await session(proxy)
        await s.get("/x")
        await s.reader.readexactly(100_000)
        sock = s.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.writer.transport.abort()
        result = await s.result()
        assert result.reason is CloseReason.CLIENT_RESET and result.reset

    run(on_proxy(test, respond=endless))


def test_a_stale_kept_alive_connection_is_redialled_for_an_upload_too(run: Runner) -> None:
    async def answer_then_drop(seen: Seen, conn: ProxyConn) -> None:
        await conn.reply(200, seen.body)
        conn.writer.close()

    async def test(proxy: FakeProxy) -> None:
        s = await session(proxy)
        await s.get("/1")
        await s.response()
        await asyncio.sleep(0.05)
        _request(s, "POST", "/2", [("Host", "origin.example"), ("Content-Length", "3")])
        s.writer.write(s.http.send(h11.Data(data=b"abc")) + s.http.send(h11.EndOfMessage()))
        await s.writer.drain()
        head, data = await s.response()
        assert head.status_code == 200 and data == b"abc"
        s.writer.close()
        await s.result()

    run(on_proxy(test, respond=answer_then_drop))


def test_a_kept_alive_connection_the_proxy_reset_is_redialled(run: Runner) -> None:
    """The reset arrives before the next request: sending its head fails at once (the
    answer to the previous request must not count as one to this)."""

    async def answer_then_reset(seen: Seen, conn: ProxyConn) -> None:
        await ok(seen, conn)
        sock = conn.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.writer.transport.abort()

    async def test(proxy: FakeProxy) -> None:
        s = await session(proxy)
        for path in ("/1", "/2", "/3"):
            await s.get(path)
            head, _ = await s.response()
            assert head.status_code == 200
            await asyncio.sleep(0.05)
        s.writer.close()
        assert (await s.result()).requests == 3
        assert proxy.connections == 3

    run(on_proxy(test, respond=answer_then_reset))


def test_requests_trickled_one_byte_at_a_time(run: Runner) -> None:
    raw = (
        b"POST /up HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\n\r\n"
        b"GET /next HTTP/1.1\r\nHost: a.example\r\n\r\n"
    )

    async def echo(seen: Seen, conn: ProxyConn) -> None:
        await conn.reply(200, seen.body or seen.target)

    async def test(proxy: FakeProxy) -> None:
        s = await session(proxy)
        for i in range(len(raw)):
            s.writer.write(raw[i : i + 1])
            await s.writer.drain()
        for expected in (b"abcde", b"http://a.example/next"):
            s.http.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
            s.http.send(h11.EndOfMessage())
            _, data = await s.response()
            assert data == expected
        s.writer.close()
        assert (await s.result()).requests == 2

    run(on_proxy(test, respond=echo))


def test_a_smuggling_attempt_reaches_the_proxy_with_one_framing_and_no_second_host(
    run: Runner,
) -> None:
    """Content-Length and Transfer-Encoding together: h11 frames by Transfer-Encoding (RFC
    9112 section 6.3), the proxy gets only that, and the request hidden after the empty body
    is for another host: 421, never forwarded."""
    raw = (
        b"POST / HTTP/1.1\r\nHost: a.example\r\nContent-Length: 40\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        b"GET /smuggled HTTP/1.1\r\nHost: internal.example\r\n\r\n"
    )

    async def test(proxy: FakeProxy) -> None:
        s = await session(proxy)
        s.writer.write(raw)
        await s.writer.drain()
        s.http.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
        s.http.send(h11.EndOfMessage())
        head, _ = await s.response()
        assert head.status_code == 200
        s.http.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
        s.http.send(h11.EndOfMessage())
        head, _ = await s.response()
        assert head.status_code == 421
        await s.result()
        (only,) = proxy.seen
        assert only.header(b"Transfer-Encoding") == b"chunked"
        assert only.header(b"Content-Length") is None
        assert only.body == b""

    run(on_proxy(test))


def test_cancelling_mid_upload_leaves_no_task_and_closes_the_proxy_side(run: Runner) -> None:
    """The engine cancels a connection's task when it stops or the user closes it."""

    async def hold(seen: Seen, conn: ProxyConn) -> None:
        with contextlib.suppress(h11.ProtocolError, ConnectionError):
            await conn.body()

    async def test(proxy: FakeProxy) -> None:
        s = await session(proxy)
        s.writer.write(b"PUT /f HTTP/1.1\r\nHost: a.example\r\nContent-Length: 100000\r\n\r\n")
        s.writer.write(b"y" * 1000)
        await s.writer.drain()
        await _until(lambda: len(proxy.seen) == 1)
        before = asyncio.all_tasks()
        s.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await s.task
        assert not [t for t in before if "forward-" in t.get_name() and not t.done()]
        await _until(lambda: not proxy.tasks)  # the proxy saw its connection close

    run(on_proxy(test, respond=hold, read_body=False))
