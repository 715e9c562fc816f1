"""Every failure sentence from a real failure: the real RelayEngine (in-process, on its own
loop in a thread that joined the lab's client namespace), the lab's nft redirect, real
clients (curl, or a socket from the client namespace), real Squid with Basic auth, and small
misbehaving proxies on real sockets in the proxy namespace. The Monitor turns the engine's
events into rows; each test asserts the closed row's state, close reason and words.

The same sentences are unit-tested as transcripts in tests/monitor/test_words.py.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.integration.engine_in_lab import EngineInLab
from tests.integration.relay import allocate_port
from tests.lab.environment import Lab
from tests.lab.origins import HOSTNAME
from tests.relay.stubs import tls_client_hello
from tray_proxy.monitor.monitor import Monitor
from tray_proxy.monitor.rows import ConnectionRow, RowState
from tray_proxy.relay.engine import RelayEngine
from tray_proxy.relay.events import ConnectionClosed, Event, EventBus
from tray_proxy.relay.records import CloseReason
from tray_proxy.relay.secrets import Credentials, Secret, StaticCredentialSource
from tray_proxy.relay.settings import RelaySettings, UpstreamKind, UpstreamProxy

pytestmark = pytest.mark.lab

TIMEOUT = 2.0  # the relay's connect and handshake timeouts in these tests


class RecordingEngine(EngineInLab):
    """A RelayEngine listening in the client namespace (its loop thread joined it with
    setns, so its sockets live there), with the real SO_ORIGINAL_DST lookup."""

    def __init__(self, lab: Lab, upstream: UpstreamProxy, credentials: Credentials | None) -> None:
        super().__init__(lab.client.name)
        self.lab = lab
        self.upstream = upstream
        self.credentials = credentials
        self.port = allocate_port(lab)
        self.events: list[Event] = []
        self.lock = threading.Lock()

    async def _main(self) -> None:
        bus = EventBus()
        entries = {} if self.credentials is None else {self.upstream.name: self.credentials}
        settings = RelaySettings(
            port=self.port,
            listen=("127.0.0.1",),
            connect_timeout=TIMEOUT,
            handshake_timeout=TIMEOUT,
            spare_connections=0,
            drain_timeout=1.0,
        )
        engine = RelayEngine(settings, [self.upstream], StaticCredentialSource(entries), bus)

        def observe(event: Event) -> None:
            with self.lock:
                self.events.append(event)

        bus.subscribe(observe)
        await engine.start()
        try:
            await self.serve()
        finally:
            await engine.stop(drain_timeout=0.5)

    def closed_row(self, timeout: float = 20.0) -> ConnectionRow:
        """Wait (bounded) for the one connection to close; its row as the Monitor makes it."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                events = list(self.events)
            if any(isinstance(e, ConnectionClosed) for e in events):
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"no connection closed within {timeout:g} s: {events}")
            time.sleep(0.02)
        history = _History()
        monitor = Monitor(lambda: {self.upstream.name: self.upstream}, history, None)
        (row,) = monitor.feed(events).closed
        monitor.close()
        assert history.rows == [row]
        return row


class _History:
    def __init__(self) -> None:
        self.rows: list[ConnectionRow] = []

    def submit(self, rows: Any) -> None:
        self.rows.extend(rows)

    def close(self, timeout: float = 5.0) -> None:
        pass


@contextlib.contextmanager
def relay(
    lab: Lab,
    upstream: UpstreamProxy,
    credentials: Credentials | None,
    redirect_ports: tuple[int, ...] = (80, 443),
) -> Iterator[RecordingEngine]:
    with (
        RecordingEngine(lab, upstream, credentials) as engine,
        lab.redirect(engine.port, redirect_ports),
    ):
        yield engine


def http_upstream(host: str, port: int, username: str | None = None) -> UpstreamProxy:
    return UpstreamProxy("corp", UpstreamKind.HTTP, host, port, username=username)


def squid_upstream(lab: Lab) -> tuple[UpstreamProxy, Credentials]:
    """The lab's Squid as the upstream, and the login it accepts."""
    creds = lab.squid.credentials
    assert creds is not None and lab.proxy.v4 is not None
    upstream = http_upstream(lab.proxy.v4, lab.squid.port, creds.username)
    return upstream, Credentials(creds.username, Secret(creds.password))


def client_hello_through(lab: Lab, port: int = 443, timeout: float = 15.0) -> bytes:
    """From the client namespace to the origin (redirected): a TLS ClientHello naming the
    origin, then read until the relay closes. Returns what came back."""
    assert lab.origin.v4 is not None
    sock = lab.client.connect(lab.origin.v4, port)
    got = b""
    try:
        sock.settimeout(timeout)
        sock.sendall(tls_client_hello(HOSTNAME))
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                got += chunk
    finally:
        sock.close()
    return got


class MisbehavingProxy:
    """A TCP server in the proxy namespace that accepts and then does `behave(conn)`."""

    def __init__(self, lab: Lab, behave: Callable[[socket.socket], None]) -> None:
        assert lab.proxy.v4 is not None
        self.listener = lab.proxy.listen(lab.proxy.v4, 0)
        self.listener.settimeout(0.1)
        self.address: tuple[str, int] = self.listener.getsockname()[:2]
        self.behave = behave
        self.served = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="misbehaving-proxy")

    def _serve(self) -> None:
        deadline = time.monotonic() + 120  # bounded, whatever the test does
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                self.served += 1
                with contextlib.suppress(OSError):
                    self.behave(conn)

    def __enter__(self) -> MisbehavingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self.listener.close()


def _read_head(conn: socket.socket) -> bytes:
    head = b""
    while b"\r\n\r\n" not in head and len(head) < 65536:
        chunk = conn.recv(4096)
        if not chunk:
            break
        head += chunk
    return head


def _reset_after_the_request(conn: socket.socket) -> None:
    _read_head(conn)
    # SO_LINGER with a zero timeout: close() sends a RST instead of a FIN.
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


# -- the tests ---------------------------------------------------------------------------------


def test_407_wrong_password_at_real_squid(lab: Lab) -> None:
    squid = lab.squid
    creds = squid.credentials
    assert creds is not None and lab.proxy.v4 is not None
    upstream = http_upstream(lab.proxy.v4, squid.port, creds.username)
    wrong = creds.wrong()
    with relay(lab, upstream, Credentials(wrong.username, Secret(wrong.password))) as engine:
        url = lab.origins.url("https", "/")
        result = lab.curl(url, resolve=[f"{HOSTNAME}:443:{lab.origin.v4}"], max_time=15)
        assert result.returncode != 0, result
        row = engine.closed_row()
    assert row.state is RowState.FAILED
    assert row.close_reason is CloseReason.UPSTREAM_AUTH_FAILED
    assert row.host == HOSTNAME
    assert row.words == (
        f"{lab.proxy.v4}:{squid.port} refused the password for {creds.username} (407). "
        "The relay holds it back: it tries it once more every few minutes, and at once when "
        "you enter it again. Open Credentials to fix it."
    )
    for text in (row.words, row.detail):
        assert wrong.password not in text and creds.password not in text


def test_403_squid_denies_connect_to_a_port_that_is_not_ssl(lab: Lab) -> None:
    # Squid as Debian ships it: "http_access deny CONNECT !SSL_ports" (the lab's SSL_ports
    # are 443, 80 and 5001); 5002 is none of them. Nothing needs to listen there.
    with relay(lab, *squid_upstream(lab), (80, 443, 5002)) as engine:
        url = f"http://{HOSTNAME}:5002/"
        result = lab.curl(url, resolve=[f"{HOSTNAME}:5002:{lab.origin.v4}"], max_time=15)
        assert result.returncode != 0, result
        row = engine.closed_row()
    assert row.state is RowState.FAILED
    assert row.close_reason is CloseReason.UPSTREAM_REFUSED
    assert row.words == (
        f"{HOSTNAME}:5002: the proxy forbids this destination (403). "
        "Only the proxy's administrators can allow it."
    )


def test_timeout_a_proxy_that_accepts_and_never_answers(lab: Lab) -> None:
    assert lab.proxy.v4 is not None
    # Never accept(): the kernel completes the TCP handshake from the backlog, and the
    # CONNECT request then waits for an answer that never comes.
    silent = lab.proxy.listen(lab.proxy.v4, 0)
    try:
        port = silent.getsockname()[1]
        with relay(lab, http_upstream(lab.proxy.v4, port), None) as engine:
            started = time.monotonic()
            client_hello_through(lab)
            row = engine.closed_row()
            assert time.monotonic() - started >= TIMEOUT * 0.9
    finally:
        silent.close()
    assert row.state is RowState.FAILED
    assert row.close_reason is CloseReason.UPSTREAM_TIMEOUT
    assert row.words == (
        f"No answer from {lab.proxy.v4}:{port} within 2 s. Use Test connection to check the proxy."
    )


def test_reset_a_proxy_that_resets_the_connection(lab: Lab) -> None:
    with MisbehavingProxy(lab, _reset_after_the_request) as proxy:
        host, port = proxy.address
        with relay(lab, http_upstream(host, port), None) as engine:
            client_hello_through(lab)
            row = engine.closed_row()
        assert proxy.served == 1
    assert row.state is RowState.FAILED
    assert row.close_reason is CloseReason.UPSTREAM_RESET
    assert row.words == (
        f"{host}:{port} dropped the connection to {HOSTNAME}:443 before the tunnel opened "
        "(Connection reset by peer). If it keeps happening, use Test connection to check "
        "the proxy."
    )


def test_refused_nothing_listens_at_the_proxy_address(lab: Lab) -> None:
    assert lab.proxy.v4 is not None
    probe = lab.proxy.listen(lab.proxy.v4, 0)
    port = probe.getsockname()[1]
    probe.close()  # the port was free a moment ago and nobody listens on it now
    with relay(lab, http_upstream(lab.proxy.v4, port), None) as engine:
        client_hello_through(lab)
        row = engine.closed_row()
    assert row.state is RowState.FAILED
    assert row.close_reason is CloseReason.UPSTREAM_UNREACHABLE
    assert row.words == (
        f"{lab.proxy.v4}:{port} refused the connection: nothing listens there. "
        "Check the proxy's address and port in Credentials."
    )


def test_not_redirected_a_connection_to_the_relay_port_itself(lab: Lab) -> None:
    squid = lab.squid
    assert lab.proxy.v4 is not None
    with relay(lab, http_upstream(lab.proxy.v4, squid.port), None) as engine:
        sock = lab.client.connect("127.0.0.1", engine.port)
        try:
            sock.settimeout(10)
            sock.sendall(b"GET / HTTP/1.1\r\nHost: example.test\r\n\r\n")
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(1024) == b""
        finally:
            sock.close()
        row = engine.closed_row()
    assert row.state is RowState.FAILED
    # The redirect's nat table is loaded, so conntrack knows the connection: its original
    # destination is the relay's own address, which the engine tells apart.
    assert row.close_reason is CloseReason.NOT_REDIRECTED
    assert row.words == (
        "A program at 127.0.0.1 connected to the relay's port directly, not through the "
        "redirect, so the relay closed it. Programs need no proxy setting: remove one "
        "that points at the relay."
    )


def test_a_program_that_closes_before_sending_anything(lab: Lab) -> None:
    assert lab.origin.v4 is not None
    with relay(lab, *squid_upstream(lab)) as engine:
        sock = lab.client.connect(lab.origin.v4, 443)
        try:
            # The program holds the connection past the relay's 1 s wait for a ClientHello
            # (RelaySettings.peek_timeout), then gives up without a byte.
            time.sleep(1.3)
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(10)
            with contextlib.suppress(ConnectionResetError):
                while sock.recv(4096):
                    pass
        finally:
            sock.close()
        row = engine.closed_row()
    assert row.state is RowState.CLOSED and not row.failed
    assert row.close_reason is CloseReason.DONE
    assert row.bytes_up == 0 and row.bytes_down == 0
    assert row.words == (
        "The program closed the connection before sending anything (no TLS ClientHello within 1 s)."
    )


def test_407_no_credentials_set_up_at_real_squid(lab: Lab) -> None:
    squid = lab.squid
    assert lab.proxy.v4 is not None
    with relay(lab, http_upstream(lab.proxy.v4, squid.port), None) as engine:
        client_hello_through(lab)
        row = engine.closed_row()
    assert row.state is RowState.FAILED
    assert row.close_reason is CloseReason.UPSTREAM_AUTH_FAILED
    assert row.words == (
        f"{lab.proxy.v4}:{squid.port} asks for a user name and password (407), and none is "
        "set up. Open Credentials to enter them."
    )


def _reset_mid_tunnel(conn: socket.socket) -> None:
    _read_head(conn)
    conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
    conn.recv(65536)  # the client's first bytes came through the tunnel
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def test_reset_on_the_proxy_side_mid_tunnel(lab: Lab) -> None:
    with MisbehavingProxy(lab, _reset_mid_tunnel) as proxy:
        host, port = proxy.address
        with relay(lab, http_upstream(host, port), None) as engine:
            client_hello_through(lab)
            row = engine.closed_row()
    assert row.state is RowState.FAILED
    assert row.close_reason is CloseReason.UPSTREAM_RESET
    assert row.established is not None and row.bytes_up > 0
    assert row.words == (
        f"The connection to {HOSTNAME}:443 was cut on the proxy's side (Connection reset by "
        "peer). The program may retry; nothing to fix unless it keeps happening."
    )


def test_reset_by_the_program_mid_tunnel(lab: Lab) -> None:
    assert lab.origin.v4 is not None
    with relay(lab, *squid_upstream(lab)) as engine:
        sock = lab.client.connect(lab.origin.v4, 443)
        try:
            sock.settimeout(10)
            sock.sendall(tls_client_hello(HOSTNAME))
            assert sock.recv(5)  # the origin's ServerHello: the tunnel is open
        finally:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # a RST, as from a program killed mid-transfer
        row = engine.closed_row()
    assert row.state is RowState.FAILED
    assert row.close_reason is CloseReason.CLIENT_RESET
    assert row.words == (
        f"The program reset its connection to {HOSTNAME}:443 (Connection reset by peer). "
        "Usually it gave up or was stopped; nothing to fix here."
    )
