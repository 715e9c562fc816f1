"""Small in-memory fakes for the engine tests: origins, an HTTP CONNECT proxy, a SOCKS5 proxy.

They are asyncio servers on loopback only, run on the test's own loop, and record what they
saw so tests can assert on it. Real Squid and Dante are covered by tests/lab. The proxies
refuse any target that is not a loopback address (network hygiene): a host name is mapped to
`name_ip`, so a peeked SNI/Host name still reaches a local origin.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import enum
import hashlib
import ipaddress
import random
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tray_proxy.relay.engine import RelayEngine
from tray_proxy.relay.events import ConnectionClosed, ConnectionOpened, Event, EventBus
from tray_proxy.relay.records import ConnectionRecord
from tray_proxy.relay.secrets import CredentialSource
from tray_proxy.relay.settings import RelaySettings, UpstreamKind, UpstreamProxy
from tray_proxy.routing.router import Router

Address = tuple[str, int]
CHUNK = 65536
# Engine tests run on these loops; a subset also on qasync (see conftest.py).
LOOPS = ["asyncio", "uvloop"]
ALL_LOOPS = [*LOOPS, "qasync"]


def pattern(seed: int, size: int) -> bytes:
    """`size` deterministic pseudo-random bytes; different seeds give different bytes."""
    return random.Random(seed).randbytes(size)


def sha(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two connected non-blocking TCP sockets on loopback."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        a = socket.create_connection(server.getsockname())
        b, _ = server.accept()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


async def echo_once(address: Address, payload: bytes = b"ping") -> bytes:
    """Connect, send `payload`, read as many bytes back (5 s at most), close."""
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(payload)
        await writer.drain()
        return await asyncio.wait_for(reader.readexactly(len(payload)), 5)
    finally:
        writer.close()


async def until(condition: Callable[[], Any], timeout: float = 10.0, what: str = "") -> None:
    """Poll `condition` until it is true; fail after `timeout` seconds saying what we waited for."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what or condition}")
        await asyncio.sleep(0.005)


async def read_all(reader: asyncio.StreamReader, limit: int | None = None) -> bytes:
    """Everything until EOF (or until `limit` bytes)."""
    out = bytearray()
    while limit is None or len(out) < limit:
        chunk = await reader.read(CHUNK)
        if not chunk:
            break
        out += chunk
    return bytes(out)


async def read_until_error(reader: asyncio.StreamReader) -> tuple[bytes, BaseException | None]:
    """Everything until EOF or a connection error; returns the bytes and the error if any."""
    out = bytearray()
    try:
        while chunk := await reader.read(CHUNK):
            out += chunk
    except (ConnectionError, OSError) as exc:
        return bytes(out), exc
    return bytes(out), None


async def write_all(writer: asyncio.StreamWriter, data: bytes, eof: bool = True) -> None:
    view = memoryview(data)
    for i in range(0, len(view), CHUNK * 4):
        writer.write(view[i : i + CHUNK * 4])
        await writer.drain()
    if eof:
        writer.write_eof()


def abort_with_rst(writer: asyncio.StreamWriter) -> None:
    """Close so that the peer sees a reset (SO_LINGER 0), not a clean end."""
    sock = writer.get_extra_info("socket")
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


_ACCEPT_PASSES = 10


class _Server:
    """An asyncio server that tracks its connections so close() leaves nothing behind."""

    def __init__(self, host: str) -> None:
        self.host = host
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.address: Address = (host, 0)
        self._closing = False

    async def start(self) -> _Server:
        self._server = await asyncio.start_server(self._accepted, self.host, 0)
        sockname = self._server.sockets[0].getsockname()
        self.address = (self.host, int(sockname[1]))
        return self

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closing:  # accepted just before close(): no handler any more
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            await self.handle(reader, writer)
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.transport.abort()
            self._tasks.discard(task)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    @property
    def open_connections(self) -> int:
        """Connections accepted and not yet closed by either side."""
        return len(self._writers)

    async def close(self) -> None:
        self._closing = True
        # A connection accepted just before (the relay dials spares when a tunnel ends) gets
        # its transport and handler a few loop passes later (asyncio's selector loop accepts,
        # then makes the transport in a task, then starts the handler): give them those
        # passes, a bounded number, before the server closes (a transport made after that
        # fails and leaks its socket); each handler aborts itself, seeing _closing.
        for _ in range(_ACCEPT_PASSES):
            await asyncio.sleep(0)
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        # Aborted transports end the handlers; cancelling them instead would make asyncio
        # log "Exception in callback" for each (start_server asks the task for its result).
        if self._tasks:
            _done, stragglers = await asyncio.wait(list(self._tasks), timeout=5)
            for task in stragglers:
                task.cancel()
            if stragglers:
                await asyncio.gather(*stragglers, return_exceptions=True)
        # An aborted transport closes its socket one loop pass later (connection_lost).
        for _ in range(_ACCEPT_PASSES):
            await asyncio.sleep(0)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> Any:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def free_port_range(size: int) -> tuple[int, int]:
    """`size` consecutive ports above ip_local_port_range that nobody listens on right now."""
    rng = random.SystemRandom()
    for _ in range(50):
        first = rng.randrange(61000, 65000 - size)
        socks = []
        try:
            for port in range(first, first + size):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        return first, first + size - 1
    raise AssertionError("no free source-port range found")


# -- origins -------------------------------------------------------------------------------


@dataclass
class OriginConn:
    """What one origin connection saw."""

    peer: Address
    received: bytearray = field(default_factory=bytearray)
    got_eof: bool = False
    sent: int = 0
    error: BaseException | None = None
    done: bool = False


Behaviour = Callable[[asyncio.StreamReader, asyncio.StreamWriter, OriginConn], Awaitable[None]]


class Origin(_Server):
    """A TCP server playing the destination the client meant to reach."""

    def __init__(self, behaviour: Behaviour, host: str = "127.0.0.1") -> None:
        super().__init__(host)
        self.behaviour = behaviour
        self.conns: list[OriginConn] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        conn = OriginConn((str(peer[0]), int(peer[1])))
        self.conns.append(conn)
        try:
            await self.behaviour(reader, writer, conn)
            await writer.drain()
        except (ConnectionError, OSError) as exc:
            conn.error = exc
        finally:
            conn.done = True


async def _receive(reader: asyncio.StreamReader, conn: OriginConn) -> None:
    while chunk := await reader.read(CHUNK):
        conn.received += chunk
    conn.got_eof = True


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, c: OriginConn) -> None:
    """Send back everything; end our side when the client ends its side."""
    while chunk := await reader.read(CHUNK):
        c.received += chunk
        writer.write(chunk)
        c.sent += len(chunk)
        await writer.drain()
    c.got_eof = True
    writer.write_eof()


def exchange(down: bytes) -> Behaviour:
    """Receive everything while sending `down` (then EOF): both directions at once."""

    async def behaviour(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, c: OriginConn
    ) -> None:
        async def send() -> None:
            await write_all(writer, down)
            c.sent = len(down)

        await asyncio.gather(_receive(reader, c), send())

    return behaviour


def reply_after_eof(down: bytes) -> Behaviour:
    """Receive until the client's EOF, then send `down`: the client half-closed first."""

    async def behaviour(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, c: OriginConn
    ) -> None:
        await _receive(reader, c)
        await write_all(writer, down)
        c.sent = len(down)

    return behaviour


def send_then_receive(down: bytes) -> Behaviour:
    """Send `down` and EOF first, then keep receiving: the origin half-closed first."""

    async def behaviour(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, c: OriginConn
    ) -> None:
        await write_all(writer, down)
        c.sent = len(down)
        await _receive(reader, c)

    return behaviour


def sized_exchange() -> Behaviour:
    """The client's first 8 bytes say (seed, size): send pattern(seed, size) while receiving."""

    async def behaviour(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, c: OriginConn
    ) -> None:
        header = await reader.readexactly(8)
        seed, size = struct.unpack("!II", header)
        c.received += header
        down = pattern(seed, size)

        async def send() -> None:
            await write_all(writer, down)
            c.sent = size

        await asyncio.gather(_receive(reader, c), send())

    return behaviour


async def receive_only(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, c: OriginConn
) -> None:
    await _receive(reader, c)
    writer.write_eof()


# -- proxies ---------------------------------------------------------------------------------


class Mode(enum.Enum):
    """How the CONNECT proxy stub answers."""

    OK = "ok"
    HUGE_HEAD = "huge-head"  # a 1 MiB response head
    MANY_HEADERS = "many-headers"  # 10,000 header lines
    NUL = "nul"  # NUL bytes in the head
    BAD_STATUS = "bad-status"  # not an HTTP status line
    GLUED = "glued"  # 200 with tunnel bytes glued after the head
    AUTH_REQUIRED = "407"
    FORBIDDEN = "403"
    BAD_GATEWAY = "502"  # the proxy's own trouble (e.g. its parent is down): failover
    CLOSE_MID = "close-mid"  # FIN after `cut_after` bytes towards the client
    RST_MID = "rst-mid"  # RST after `cut_after` bytes towards the client
    SILENT = "silent"  # never answer
    HANG_UP = "hang-up"  # close without answering (as a proxy that timed out an idle one)


HUGE_HEAD_SIZE = 1 << 20
_407 = (
    b"HTTP/1.1 407 Proxy Authentication Required\r\n"
    b'Proxy-Authenticate: Basic realm="stub"\r\nContent-Length: 0\r\n\r\n'
)
# CONNECT requests one stub connection reads before it gives up on a client's authentication.
MAX_AUTH_ROUNDS = 8
GLUED_BYTES = b"GLUED-BEFORE-ANYTHING-ELSE\n"


@dataclass
class ProxyRequest:
    """One connection the proxy stub accepted (from the relay's upstream socket) that sent
    a request."""

    peer: Address
    target: Address | None = None
    headers: dict[str, str] = field(default_factory=dict)
    raw: bytes = b""
    # Every CONNECT head on this connection, in order (authentication takes several);
    # `raw`, `target` and `headers` describe the last one.
    rounds: list[dict[str, str]] = field(default_factory=list)
    huge_sent: int = 0  # HUGE_HEAD: bytes of the head sent before the relay hung up
    huge_finished: bool = False
    answered: bool = False
    cut: bool = False  # CLOSE_MID / RST_MID happened


def _loopback_target(host: str, port: int, name_ip: str) -> Address:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return name_ip, port
    if not ip.is_loopback:
        raise PermissionError(f"stub proxy refuses non-loopback target {host}")
    return str(ip), port


async def _pipe(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    cut_after: int | None = None,
    on_cut: Callable[[], None] | None = None,
) -> None:
    moved = 0
    try:
        while chunk := await reader.read(CHUNK):
            if cut_after is not None and moved + len(chunk) >= cut_after:
                writer.write(chunk[: cut_after - moved])
                await writer.drain()
                assert on_cut is not None
                on_cut()
                return
            moved += len(chunk)
            writer.write(chunk)
            await writer.drain()
        if writer.can_write_eof() and not writer.is_closing():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.transport.abort()


async def splice_streams(
    client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    target: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    cut_after: int | None = None,
    on_cut: Callable[[], None] | None = None,
) -> None:
    """Pipe both ways until both ends finished; `cut_after` bytes towards the client at most."""
    await asyncio.gather(
        _pipe(client[0], target[1]),
        _pipe(target[0], client[1], cut_after, on_cut),
    )


class ConnectProxy(_Server):
    """A minimal HTTP CONNECT proxy with Basic auth and configurable misbehaviour."""

    def __init__(
        self,
        mode: Mode = Mode.OK,
        *,
        credentials: tuple[str, str] | None = None,
        host: str = "127.0.0.1",
        name_ip: str = "127.0.0.1",
        cut_after: int = 256 * 1024,
    ) -> None:
        super().__init__(host)
        self.mode = mode
        self.credentials = credentials
        self.name_ip = name_ip
        self.cut_after = cut_after
        # Modes for the next connections, taken first to last; then `mode` for the rest.
        self.plan: list[Mode] = []
        # Connections that sent a request, in order; `accepted` counts every connection,
        # also the relay's spares that closed unused (relay/spares.py).
        self.requests: list[ProxyRequest] = []
        self.accepted: list[Address] = []
        self._idle: set[asyncio.StreamWriter] = set()  # no request yet

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        req = ProxyRequest((str(peer[0]), int(peer[1])))
        self.accepted.append(req.peer)
        self._idle.add(writer)
        for _ in range(MAX_AUTH_ROUNDS):
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            finally:
                self._idle.discard(writer)
            if not req.rounds:
                self.requests.append(req)
            self._parse(req, head)
            answer = self.authenticate(req)
            if answer is None:
                break
            await self._answer(req, writer, answer)
            if b"\r\nconnection: close\r\n" in answer.lower():
                await reader.read()  # until the relay hangs up: it must act on the answer
                return
        else:
            return
        await self.misbehave(req, reader, writer)

    async def close_idle(self) -> None:
        """Close (FIN) every connection that has sent no request, as a proxy's idle timeout
        would, and wait until their handlers are done."""
        idle = list(self._idle)
        for writer in idle:
            writer.close()
        await until(lambda: not any(w in self._writers for w in idle), 5, "idle ones closed")

    @staticmethod
    def _parse(req: ProxyRequest, head: bytes) -> None:
        req.raw = head
        lines = head.decode("latin-1").split("\r\n")
        method, authority, _version = lines[0].split(" ")
        assert method == "CONNECT", lines[0]
        host, _, port = authority.rpartition(":")
        req.target = (host.strip("[]"), int(port))
        req.headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                req.headers[name.strip().lower()] = value.strip()
        req.rounds.append(req.headers)

    def authenticate(self, req: ProxyRequest) -> bytes | None:
        """None lets the request through; bytes are the answer (a 407) to send instead.

        A 407 keeps the connection for the next request unless it says Connection: close.
        Subclasses implement other schemes.
        """
        if self.credentials is None:
            return None
        token = base64.b64encode(":".join(self.credentials).encode()).decode()
        if req.headers.get("proxy-authorization") != f"Basic {token}":
            return _407
        return None

    async def _answer(self, req: ProxyRequest, writer: asyncio.StreamWriter, data: bytes) -> None:
        req.answered = True
        writer.write(data)
        await writer.drain()

    async def misbehave(
        self, req: ProxyRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        mode = self.plan.pop(0) if self.plan else self.mode
        if mode is Mode.HANG_UP:
            return
        if mode is Mode.SILENT:
            await reader.read()  # until the relay gives up
            return
        if mode is Mode.AUTH_REQUIRED:
            await self._answer(req, writer, _407)
            await reader.read()
            return
        if mode is Mode.FORBIDDEN:
            await self._answer(req, writer, b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            await reader.read()
            return
        if mode is Mode.BAD_GATEWAY:
            await self._answer(
                req, writer, b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n"
            )
            await reader.read()
            return
        if mode is Mode.BAD_STATUS:
            await self._answer(req, writer, b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
            await reader.read()
            return
        if mode is Mode.NUL:
            await self._answer(req, writer, b"HTTP/1.1 200 OK\r\nX-Evil: a\x00b\r\n\r\n")
            await reader.read()
            return
        if mode is Mode.MANY_HEADERS:
            head = b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(10_000))
            await self._answer(req, writer, head + b"\r\n")
            await reader.read()
            return
        if mode is Mode.HUGE_HEAD:
            await self._huge_head(req, writer)
            return
        assert req.target is not None
        target = _loopback_target(*req.target, self.name_ip)
        up_reader, up_writer = await asyncio.open_connection(*target)
        try:
            answer = b"HTTP/1.1 200 Connection established\r\n\r\n"
            if mode is Mode.GLUED:
                answer += GLUED_BYTES
            req.answered = True
            writer.write(answer)
            await writer.drain()
            if mode in (Mode.CLOSE_MID, Mode.RST_MID):

                def cut() -> None:
                    req.cut = True
                    if mode is Mode.RST_MID:
                        abort_with_rst(writer)
                    else:
                        writer.close()
                    up_writer.transport.abort()

                await splice_streams((reader, writer), (up_reader, up_writer), self.cut_after, cut)
            else:
                await splice_streams((reader, writer), (up_reader, up_writer))
        finally:
            up_writer.transport.abort()

    async def _huge_head(self, req: ProxyRequest, writer: asyncio.StreamWriter) -> None:
        # A small send buffer, so "sent" means "the relay had room for it", not "queued here".
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        req.answered = True
        line = b"X-Pad: " + b"a" * 1000 + b"\r\n"
        data = b"HTTP/1.1 200 OK\r\n" + line * (HUGE_HEAD_SIZE // len(line) + 1) + b"\r\n"
        try:
            for i in range(0, len(data), 4096):
                writer.write(data[i : i + 4096])
                await writer.drain()
                req.huge_sent = i + 4096
        except (ConnectionError, OSError):
            return
        req.huge_finished = True


class Socks5Proxy(_Server):
    """A minimal SOCKS5 proxy (RFC 1928), CONNECT only, with optional RFC 1929 auth."""

    def __init__(
        self,
        *,
        credentials: tuple[str, str] | None = None,
        host: str = "127.0.0.1",
        name_ip: str = "127.0.0.1",
    ) -> None:
        super().__init__(host)
        self.credentials = credentials
        self.name_ip = name_ip
        self.requests: list[ProxyRequest] = []
        self.offered_methods: list[bytes] = []
        self.auth_seen: list[tuple[str, str]] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        req = ProxyRequest((str(peer[0]), int(peer[1])))
        self.requests.append(req)
        ver, nmethods = await reader.readexactly(2)
        assert ver == 5
        methods = await reader.readexactly(nmethods)
        self.offered_methods.append(methods)
        if self.credentials is None:
            if 0 not in methods:
                writer.write(b"\x05\xff")
                return
            writer.write(b"\x05\x00")
        else:
            if 2 not in methods:
                writer.write(b"\x05\xff")
                return
            writer.write(b"\x05\x02")
            aver, ulen = await reader.readexactly(2)
            assert aver == 1
            user = (await reader.readexactly(ulen)).decode()
            (plen,) = await reader.readexactly(1)
            password = (await reader.readexactly(plen)).decode()
            self.auth_seen.append((user, password))
            if (user, password) != self.credentials:
                writer.write(b"\x01\x01")
                await writer.drain()
                return
            writer.write(b"\x01\x00")
        ver, cmd, _rsv, atyp = await reader.readexactly(4)
        assert (ver, cmd) == (5, 1)
        if atyp == 1:
            host = socket.inet_ntop(socket.AF_INET, await reader.readexactly(4))
        elif atyp == 4:
            host = socket.inet_ntop(socket.AF_INET6, await reader.readexactly(16))
        else:
            assert atyp == 3
            (n,) = await reader.readexactly(1)
            host = (await reader.readexactly(n)).decode()
        (port,) = struct.unpack("!H", await reader.readexactly(2))
        req.target = (host, port)
        up_reader, up_writer = await asyncio.open_connection(
            *_loopback_target(host, port, self.name_ip)
        )
        try:
            req.answered = True
            writer.write(b"\x05\x00\x00\x01\x7f\x00\x00\x01" + struct.pack("!H", port))
            await writer.drain()
            await splice_streams((reader, writer), (up_reader, up_writer))
        finally:
            up_writer.transport.abort()


def tls_client_hello(server_hostname: str) -> bytes:
    """A real TLS ClientHello naming `server_hostname` (SNI), made by the ssl module."""
    import ssl

    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = outgoing.read()
    assert hello[:1] == b"\x16", "not a TLS handshake record"
    return hello


# -- the engine under test ---------------------------------------------------------------


def relay_settings(**overrides: Any) -> RelaySettings:
    """Settings for unit tests: an ephemeral loopback port, no source range, short timeouts."""
    values: dict[str, Any] = {
        "port": 0,
        "listen": ("127.0.0.1",),
        "source_ports": None,
        "connect_timeout": 2.0,
        "handshake_timeout": 2.0,
        "idle_timeout": 30.0,
        "peek_timeout": 0.0,
        "drain_timeout": 0.5,
    }
    values.update(overrides)
    return RelaySettings(**values)


def http_upstream(proxy: _Server, name: str = "corp", username: str | None = None) -> UpstreamProxy:
    host, port = proxy.address
    return UpstreamProxy(name, UpstreamKind.HTTP, host, port, username=username)


def socks_upstream(
    proxy: _Server, name: str = "socks", username: str | None = None
) -> UpstreamProxy:
    host, port = proxy.address
    return UpstreamProxy(name, UpstreamKind.SOCKS5, host, port, username=username)


class Relay:
    """A started RelayEngine plus everything it published, for assertions."""

    def __init__(self, engine: RelayEngine) -> None:
        self.engine = engine
        self.events: list[Event] = []
        # Every record, kept after the engine forgets it (the engine drops closed records).
        self.records: dict[int, ConnectionRecord] = {}
        engine.bus.subscribe(self._on_event)

    def _on_event(self, event: Event) -> None:
        self.events.append(event)
        if isinstance(event, ConnectionOpened):
            self.records[event.conn_id] = self.engine._records[event.conn_id]

    @property
    def address(self) -> Address:
        return self.engine.addresses[0]

    @property
    def closed(self) -> list[ConnectionClosed]:
        return [e for e in self.events if isinstance(e, ConnectionClosed)]

    def of(self, kind: type[Any]) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]

    async def wait_closed(self, count: int = 1, timeout: float = 10.0) -> list[ConnectionClosed]:
        await until(lambda: len(self.closed) >= count, timeout, f"{count} closed connection(s)")
        return self.closed

    def record(self, conn_id: int | None = None) -> ConnectionRecord:
        if conn_id is None:
            assert len(self.records) == 1, self.records
            return next(iter(self.records.values()))
        return self.records[conn_id]

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(*self.address)


@contextlib.asynccontextmanager
async def running_relay(
    upstreams: Sequence[UpstreamProxy],
    destination: Address | None | Callable[[socket.socket], Address | None],
    credentials: CredentialSource | None = None,
    *,
    router: Router | None = None,
    **settings: Any,
) -> AsyncIterator[Relay]:
    """A started engine whose `destination_of` returns `destination` (or calls it);
    `router`: its routing (None: the active upstream only)."""
    destination_of = destination if callable(destination) else (lambda _sock: destination)
    engine = RelayEngine(
        relay_settings(**settings),
        upstreams,
        credentials,
        EventBus(),
        destination_of=destination_of,
        router=router,
    )
    relay = Relay(engine)
    await engine.start()
    try:
        yield relay
    finally:
        await engine.stop(drain_timeout=0)
