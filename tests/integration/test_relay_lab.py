"""The relay end to end with real components: `tray-proxy run` in the lab's client namespace,
the lab's nft redirect, real curl with no proxy settings, real Squid and Dante, real origins.

Each test proves the path from the far ends: the body's SHA-256 at the client, the proxy's own
log (what the CONNECT named, who authenticated), and the peer address the origin saw.

Must not import tray_proxy (the relay runs as a separate process) or PySide6.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import hashlib
import json
import os
import random
import re
import secrets
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integration.relay import RelayProcess, UpstreamSpec
from tests.lab.curl import CurlResult
from tests.lab.environment import Lab
from tests.lab.netns import NsProcess
from tests.lab.origins import HOSTNAME, pattern_chunks
from tests.lab.squid import AccessLogEntry, SquidProxy

pytestmark = pytest.mark.lab

HOSTILE_SCRIPT = Path(__file__).with_name("hostile_proxy.py")
TCP_PORTS = (80, 443, 5001)


def _seed() -> str:
    """Unique per request, so log lines of one test cannot be confused with another's."""
    return secrets.token_hex(6)


def _origin_ip(lab: Lab, family: int) -> str:
    return lab.origins.v4 if family == 4 else lab.origins.v6


def _authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _client_prefix(lab: Lab, family: int) -> str:
    """How the relay log writes the client address of a connection from the client ns."""
    return f"{lab.client.v4}:" if family == 4 else f"[{lab.client.v6}]:"


@dataclass(frozen=True)
class Request:
    """One GET of /bytes through the redirect, with what every log should then say."""

    scheme: str
    family: int
    by_name: bool
    size: int
    seed: str

    def url(self, lab: Lab) -> str:
        host = None if self.by_name else ("v4" if self.family == 4 else "v6")
        return lab.origins.url(self.scheme, lab.origins.bytes_path(self.size, self.seed), host)

    @property
    def port(self) -> int:
        return 443 if self.scheme == "https" else 80

    def resolve(self, lab: Lab) -> list[str]:
        if not self.by_name:
            return []
        return [f"{HOSTNAME}:{self.port}:{_origin_ip(lab, self.family)}"]

    def destination(self, lab: Lab) -> str:
        """The CONNECT authority: the host name when one was used, else the IP."""
        host = HOSTNAME if self.by_name else _origin_ip(lab, self.family)
        return _authority(host, self.port)

    def run(self, lab: Lab, max_time: float = 30.0, verbose: bool = False) -> CurlResult:
        # No `via`: curl has no proxy settings at all; only the redirect moves its traffic.
        # `verbose` lets a failure say why the system refused a connect (`connect_error`).
        return lab.curl(
            self.url(lab),
            resolve=self.resolve(lab),
            max_time=max_time,
            options=["verbose"] if verbose else [],
        )

    def check(self, lab: Lab, result: CurlResult) -> None:
        assert result.returncode == 0, (self, result)
        assert result.http_code == 200, (self, result)
        assert result.connect_code == 0, "curl itself must not have used a proxy"
        assert len(result.body) == self.size, (self, result)
        assert result.sha256 == lab.origins.expected_sha256(self.size, self.seed), self


MATRIX = [
    pytest.param(scheme, family, by_name, id=f"{scheme}-v{family}-{'name' if by_name else 'ip'}")
    for scheme in ("http", "https")
    for family in (4, 6)
    for by_name in (True, False)
]


# fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def squid_relay(lab: Lab) -> Iterator[RelayProcess]:
    """One relay through the lab's Squid for the module; tests apply the redirect themselves."""
    with RelayProcess(lab, UpstreamSpec.for_squid(lab.squid), redirect_ports=TCP_PORTS) as relay:
        yield relay


@pytest.fixture(scope="module")
def dante_relay(lab: Lab) -> Iterator[RelayProcess]:
    with RelayProcess(lab, UpstreamSpec.for_dante(lab.dante), redirect_ports=TCP_PORTS) as relay:
        yield relay


def _relay_line(relay: RelayProcess, since: int, dest: str, reason: str, upstream: str) -> str:
    """The relay's close line for a connection to `dest`, e.g. `-> origin.lab.test:443 via
    squid: done`. The relay logs a connection when it closes."""
    pattern = re.compile(rf"-> {re.escape(dest)} via {re.escape(upstream)}: {re.escape(reason)}\b")
    return relay.wait_for_line(pattern, since=since, timeout=10)


def _squid_entries_since(squid: SquidProxy, t0: float) -> list[AccessLogEntry]:
    # %ts is when Squid accepted the request (same clock as ours), logged in milliseconds.
    return [e for e in squid.entries() if e.method == "CONNECT" and e.time >= t0 - 0.002]


# through Squid -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("scheme", "family", "by_name"), MATRIX)
def test_through_squid(
    lab: Lab, squid_relay: RelayProcess, scheme: str, family: int, by_name: bool
) -> None:
    request = Request(scheme, family, by_name, 300_000 + random.randrange(1000), _seed())
    mark, t0 = squid_relay.mark(), time.time()
    with squid_relay.redirect():
        result = request.run(lab)
    request.check(lab, result)

    dest = request.destination(lab)
    line = _relay_line(squid_relay, mark, dest, "done", "squid")
    assert f" {_client_prefix(lab, family)}" in line, f"not the v{family} client: {line}"

    creds = lab.squid.credentials
    assert creds is not None
    # In auto mode the relay's first CONNECT to a proxy it has not met carries no
    # credentials (the proxy says which scheme it wants): a 407 for user "-" may come first.
    entry = lab.squid.wait_for_entry(
        lambda e: (
            e.method == "CONNECT" and e.uri == dest and e.time >= t0 - 0.002 and e.status != 407
        )
    )
    assert entry.status == 200, entry
    assert entry.user == creds.username, "the relay did not authenticate with the stored password"
    assert entry.client == lab.client.v4, "the relay dials the proxy from the client namespace"
    # The CONNECT named exactly what the client asked for: the host name, or the IP.
    assert {e.uri for e in _squid_entries_since(lab.squid, t0)} == {dest}

    event = lab.origins.wait_for_event(lambda e: request.seed in e.get("path", ""))
    assert event["peer"] in (lab.proxy.v4, lab.proxy.v6), "the origin must see the proxy"
    assert event["peer"] not in (lab.client.v4, lab.client.v6)
    assert event["status"] == 200 and event["sent"] == request.size


# through Dante ------------------------------------------------------------------------------------

_DANTE_CONNECT = re.compile(
    r"\((?P<t>\d+\.\d+)\).*pass\(\d+\): tcp/connect \[: username%(?P<user>\S+)@"
    r"(?P<src>\S+)\.(?P<sport>\d+) \S+ -> \S+ (?P<dst>\S+)\.(?P<dport>\d+)$"
)


@pytest.mark.parametrize(("scheme", "family", "by_name"), MATRIX)
def test_through_dante(
    lab: Lab, dante_relay: RelayProcess, scheme: str, family: int, by_name: bool
) -> None:
    request = Request(scheme, family, by_name, 200_000 + random.randrange(1000), _seed())
    mark, t0 = dante_relay.mark(), time.time()
    with dante_relay.redirect():
        result = request.run(lab)
    request.check(lab, result)

    dest = request.destination(lab)
    line = _relay_line(dante_relay, mark, dest, "done", "dante")
    assert f" {_client_prefix(lab, family)}" in line, f"not the v{family} client: {line}"

    # Dante logs the session with the user it authenticated and the address it dialled.
    user = lab.dante.credentials.username
    lab.dante.wait_for_log(f"username%{user}@{lab.client.v4}.")
    sessions = [
        m
        for m in map(_DANTE_CONNECT.search, lab.dante.log_text().splitlines())
        if m is not None and float(m["t"]) >= t0 - 0.002
    ]
    assert len(sessions) == 1, sessions
    session = sessions[0]
    assert session["user"] == user and session["src"] == lab.client.v4
    assert int(session["dport"]) == request.port
    if not by_name:
        assert session["dst"] == _origin_ip(lab, family)

    event = lab.origins.wait_for_event(lambda e: request.seed in e.get("path", ""))
    assert event["peer"] in (lab.proxy.v4, lab.proxy.v6)


# half-close (raw TCP to the origin's :5001, through Dante: Squid closes a tunnel on the first
# EOF, so it cannot carry a half-closed connection whatever the relay does) -----------------------


def _recv_all(sock: socket.socket, limit: int) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while total <= limit:
        data = sock.recv(1 << 16)
        if not data:
            break
        chunks.append(data)
        total += len(data)
    return b"".join(chunks)


@pytest.mark.parametrize("family", [4, 6])
def test_half_close_client_first(lab: Lab, dante_relay: RelayProcess, family: int) -> None:
    """The client sends everything and shuts down its write side; the echo still arrives whole."""
    payload = os.urandom(2_000_000)
    dest_ip = _origin_ip(lab, family)
    mark, t0 = dante_relay.mark(), time.time()
    with dante_relay.redirect(), lab.client.connect(dest_ip, 5001, timeout=20) as sock:
        errors: list[BaseException] = []

        def send() -> None:  # own thread: a 2 MB echo fills both directions' windows
            try:
                sock.sendall(b"ECHO\n" + payload)
                sock.shutdown(socket.SHUT_WR)
            except BaseException as exc:  # handed to the test thread
                errors.append(exc)

        writer = threading.Thread(target=send)
        writer.start()
        echoed = _recv_all(sock, len(payload))
        writer.join(timeout=20)
    assert not errors and not writer.is_alive()
    assert len(echoed) == len(payload)
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
    line = _relay_line(dante_relay, mark, _authority(dest_ip, 5001), "done", "dante")
    assert f"{len(payload) + 5} B up, {len(payload)} B down" in line
    event = lab.origins.wait_for_event(
        lambda e: e.get("mode") == "ECHO" and e.get("received") == len(payload)
        and e.get("t", 0) >= t0
    )  # fmt: skip
    assert event["peer"] in (lab.proxy.v4, lab.proxy.v6)
    assert "error" not in event


def test_half_close_server_first(lab: Lab, dante_relay: RelayProcess) -> None:
    """The server sends N bytes and shuts down its side; the client's side stays usable."""
    seed, size, tail = _seed(), 3_000_000, 4321
    mark = dante_relay.mark()
    with dante_relay.redirect(), lab.client.connect(lab.origins.v4, 5001, timeout=20) as sock:
        sock.sendall(f"SEND {size} {seed}\n".encode())
        received = _recv_all(sock, size)  # ends at the server's EOF
        sock.sendall(b"z" * tail)  # our direction is still open after it
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(1) == b""
    assert hashlib.sha256(received).hexdigest() == lab.origins.expected_sha256(size, seed)
    event = lab.origins.wait_for_event(
        lambda e: e.get("mode") == "SEND" and e.get("sent") == size and e.get("received") == tail
    )
    assert "error" not in event
    assert event["peer"] in (lab.proxy.v4, lab.proxy.v6)
    _relay_line(dante_relay, mark, _authority(lab.origins.v4, 5001), "done", "dante")


# the upstream dies mid-transfer ------------------------------------------------------------------


def _pattern_prefix_sha256(size: int, seed: str, length: int) -> str:
    digest, left = hashlib.sha256(), length
    for block in pattern_chunks(size, seed):
        if left <= 0:
            break
        digest.update(block[:left])
        left -= len(block)
    return digest.hexdigest()


def test_upstream_killed_mid_transfer(lab: Lab, squid_factory: Callable[..., SquidProxy]) -> None:
    doomed = squid_factory(port=3129)
    seed, size, kill_after = _seed(), 200 * 1024 * 1024, 8 * 1024 * 1024
    spec = UpstreamSpec.for_squid(doomed, name="doomed")
    with RelayProcess(lab, spec, redirect_ports=TCP_PORTS) as relay_a:
        mark = relay_a.mark()
        with relay_a.redirect(), lab.client.connect(lab.origins.v4, 5001, timeout=20) as sock:
            sock.sendall(f"SEND {size} {seed}\n".encode())
            got = bytearray()
            while len(got) < kill_after:
                data = sock.recv(1 << 16)
                assert data, f"tunnel ended after {len(got)} bytes, before the kill"
                got += data
            assert doomed.process is not None
            os.killpg(doomed.process.pid, signal.SIGKILL)  # Squid and its helpers, no goodbye
            error: OSError | None = None
            try:
                got += _recv_all(sock, size)
            except ConnectionError as exc:  # a reset is as good as an early EOF; a hang is not
                error = exc
        assert len(got) < size, "the whole body arrived although its proxy was killed"
        # What did arrive is the body's true beginning: no corruption, no foreign bytes.
        assert hashlib.sha256(got).hexdigest() == _pattern_prefix_sha256(size, seed, len(got))
        line = relay_a.wait_for_line(
            re.compile(r"-> 10\.200\.3\.2:5001 via doomed: (done|upstream-reset)"), since=mark
        )
        down = re.search(r"(\d+) B down", line)
        assert down is not None and int(down[1]) < size, (line, error)

        # With its proxy gone the relay fails new connections fast and clearly...
        mark = relay_a.mark()
        with relay_a.redirect():
            request = Request("https", 4, True, 1000, _seed())
            started = time.monotonic()
            result = request.run(lab, max_time=20)
            assert result.returncode != 0 and time.monotonic() - started < 10, result
        _relay_line(relay_a, mark, request.destination(lab), "upstream-unreachable", "doomed")
        assert relay_a.alive()

        # ...and a relay configured with the lab's main Squid carries the next one, while the
        # first relay is still alive and stops cleanly (exit 0) afterwards.
        with RelayProcess(lab, UpstreamSpec.for_squid(lab.squid)) as relay_b, relay_b.redirect():
            mark = relay_b.mark()
            request = Request("https", 4, True, 500_000, _seed())
            request.check(lab, request.run(lab))
            _relay_line(relay_b, mark, request.destination(lab), "done", "squid")
            assert relay_a.alive(), "the relay died with its upstream"


# a hostile upstream ------------------------------------------------------------------------------

HOSTILE_CASES = {
    "bighead": "upstream-protocol-error",
    "manyheaders": "upstream-protocol-error",
    "nul": "upstream-protocol-error",
    "badstatus": "upstream-protocol-error",
}
# A 407 makes the relay stop sending those credentials to that upstream at all (accounts
# lock after a few failures), so the auth case runs last, once: see test_hostile_upstream.
GLUED = b"GLUED-BYTES-BEFORE-THE-ORIGIN\n"  # what hostile_proxy.py's glued mode sends
HANDSHAKE_TIMEOUT = 2.0


class HostileProxy:
    """hostile_proxy.py in the proxy namespace; `events()` reads its connection log."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.port = random.randrange(8100, 8900)
        self.log_path = lab.tmp / f"hostile-{self.port}.jsonl"
        self.process: NsProcess | None = None

    def __enter__(self) -> HostileProxy:
        assert self.lab.proxy.v4 and self.lab.proxy.v6
        stderr_path = self.log_path.with_suffix(".stderr")
        with stderr_path.open("wb") as stderr:
            self.process = self.lab.proxy.popen(
                [
                    sys.executable, "-I", "-u", str(HOSTILE_SCRIPT),
                    "--listen", self.lab.proxy.v4, "--listen", self.lab.proxy.v6,
                    "--port", str(self.port), "--origin", self.lab.origins.v4,
                    "--log", str(self.log_path),
                ],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
            )  # fmt: skip
        try:
            self._wait_ready(stderr_path)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_ready(self, stderr_path: Path, timeout: float = 15.0) -> None:
        assert self.process is not None and self.process.stdout is not None
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self.process.stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if sel.select(timeout=max(0.0, deadline - time.monotonic())):
                    line = self.process.stdout.readline()
                    if line.strip() == b"READY":
                        return
                    if not line:
                        break
        raise AssertionError(
            f"hostile proxy did not start: {stderr_path.read_text(errors='replace')[-2000:]}"
        )

    def __exit__(self, *exc: object) -> None:
        proc, self.process = self.process, None
        if proc is None:
            return
        try:
            if proc.stdin is not None:
                proc.stdin.close()
            proc.stop(grace=3.0)
        finally:
            if proc.stdout is not None:
                proc.stdout.close()
            self.lab.proxy.forget(proc)

    def events(self) -> list[dict[str, Any]]:
        with contextlib.suppress(FileNotFoundError):
            lines = self.log_path.read_text().splitlines()
            return [json.loads(line) for line in lines if line.endswith("}")]
        return []


def _hostile_curl(lab: Lab, mode: str) -> tuple[CurlResult, float]:
    name = f"{mode}.hostile.lab.test"
    started = time.monotonic()
    result = lab.curl(f"http://{name}/health", resolve=[f"{name}:80:{lab.origins.v4}"], max_time=20)
    return result, time.monotonic() - started


def _glued_exchange(lab: Lab) -> bytes:
    """A raw HTTP request whose Host picks the glued mode; returns everything received."""
    request = b"GET /health HTTP/1.1\r\nHost: glued.hostile.lab.test\r\nConnection: close\r\n\r\n"
    with lab.client.connect(lab.origins.v4, 80, timeout=15) as sock:
        sock.sendall(request)
        return _recv_all(sock, 1 << 20)


def _hostile_round(lab: Lab, relay: RelayProcess, silent: int) -> None:
    """Every hostile mode once (and `silent` never-answering connections, concurrently)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, silent)) as pool:
        waiting = [pool.submit(_hostile_curl, lab, "silent") for _ in range(silent)]
        for mode, reason in HOSTILE_CASES.items():
            mark = relay.mark()
            result, took = _hostile_curl(lab, mode)
            assert result.returncode != 0 and result.body == b"", (mode, result)
            assert took < 10, f"{mode}: the client waited {took:.1f}s for the relay to give up"
            _relay_line(relay, mark, f"{mode}.hostile.lab.test:80", reason, "hostile")
        received = _glued_exchange(lab)
        assert received.startswith(GLUED + b"HTTP/1.1 200 "), received[:200]
        assert received.endswith(b"\r\n\r\nok\n"), received[-200:]
        for future in waiting:
            result, took = future.result(timeout=30)
            assert result.returncode != 0 and result.body == b"", result
            assert HANDSHAKE_TIMEOUT - 0.5 < took < HANDSHAKE_TIMEOUT + 8, took


class _NeverDirect(RelayProcess):
    """`[routing] when_unreachable = "fail"`: this relay never goes DIRECT. A proxy that
    answers garbage or nothing again and again is "down" to the relay's health (issue 15
    section 2), and with every upstream down the default goes DIRECT; the hostile test is
    about how each bad answer fails, so it keeps asking the proxy."""

    def _write_files(self) -> None:
        super()._write_files()
        with self.config_path.open("a", encoding="utf-8") as config:
            config.write('\n[routing]\nwhen_unreachable = "fail"\n')


def test_hostile_upstream(lab: Lab) -> None:
    with HostileProxy(lab) as stub:
        spec = UpstreamSpec("hostile", f"http://{lab.proxy.v4}:{stub.port}", "alice", "pw-x")
        settings = {"handshake_timeout": HANDSHAKE_TIMEOUT}
        with _NeverDirect(lab, spec, settings=settings) as relay, relay.redirect():
            good = Request("https", 4, True, 100_000, _seed())
            good.check(lab, good.run(lab))
            _hostile_round(lab, relay, silent=1)  # warm-up: every code path loaded once
            _relay_line(relay, 0, "silent.hostile.lab.test:80", "upstream-timeout", "hostile")
            before = relay.rss_kib()
            for _ in range(5):
                _hostile_round(lab, relay, silent=3)
            after = relay.rss_kib()
            assert after - before < 20 * 1024, f"RSS grew {before} -> {after} KiB"
            assert relay.alive()
            timeouts = relay.wait_for_count(
                "silent.hostile.lab.test:80 via hostile: upstream-timeout", 16
            )
            assert len(timeouts) == 16, timeouts
            # Still serving, through the same stub acting as a well-behaved proxy.
            for family in (4, 6):
                good = Request("https", family, True, 700_000, _seed())
                good.check(lab, good.run(lab))
            # 407: a clean failure, and afterwards the rejected credentials reach nobody.
            mark = relay.mark()
            result, took = _hostile_curl(lab, "auth")
            assert result.returncode != 0 and result.body == b"" and took < 10, result
            _relay_line(relay, mark, "auth.hostile.lab.test:80", "upstream-auth-failed", "hostile")
            seen_before = len(stub.events())
            mark = relay.mark()
            result, took = _hostile_curl(lab, "glued")
            assert result.returncode != 0 and took < 5, result
            line = _relay_line(
                relay, mark, "glued.hostile.lab.test:80", "upstream-auth-failed", "hostile"
            )
            assert "not tried again" in line
            assert len(stub.events()) == seen_before, "rejected credentials were sent again"
        seen = {e.get("mode") for e in stub.events()}
        assert set(HOSTILE_CASES) | {"auth", "glued", "silent", "origin"} <= seen, seen
        modes = [e for e in stub.events() if e.get("mode") in HOSTILE_CASES]
        assert all(e["target"].endswith(".hostile.lab.test:80") for e in modes)


# many transfers at once ---------------------------------------------------------------------------

TRANSFERS = 500
CONCURRENCY = 20
MAX_SIZE = 2 * 1024 * 1024


# spare connections --------------------------------------------------------------------------------


def _relay_sockets_to(lab: Lab, squid: SquidProxy, state: str) -> set[int]:
    """Local ports of the client namespace's TCP sockets to `squid` in `state` (ss's name)."""
    out = lab.client.run(
        ["ss", "-Htn", "state", state, "dst", f"{squid.host}:{squid.port}"]
    ).stdout.decode()
    return {int(line.split()[-2].rpartition(":")[2]) for line in out.splitlines() if line.strip()}


def _wait_sockets(lab: Lab, squid: SquidProxy, state: str, count: int) -> set[int]:
    deadline = time.monotonic() + 15
    while True:
        ports = _relay_sockets_to(lab, squid, state)
        if len(ports) == count:
            return ports
        assert time.monotonic() < deadline, f"{count} sockets {state} to Squid, saw {ports}"
        time.sleep(0.05)


def test_spares_carry_connections_and_survive_squid_timing_them_out(
    lab: Lab, squid_factory: Callable[..., SquidProxy]
) -> None:
    """The relay keeps two connections to real Squid open ahead of need; the next request's
    CONNECT goes out on one of them. When Squid drops idle ones (request_start_timeout),
    the next request notices, dials afresh and works."""
    squid = squid_factory(port=3131, extra_config="request_start_timeout 2 seconds")
    spec = UpstreamSpec.for_squid(squid, name="spares")
    settings = {"spare_connections": 2, "spare_max_age": 120.0}

    def get(relay: RelayProcess) -> AccessLogEntry:
        mark, t0 = relay.mark(), time.time()
        request = Request("https", 4, True, 100_000 + random.randrange(1000), _seed())
        request.check(lab, request.run(lab))
        _relay_line(relay, mark, request.destination(lab), "done", "spares")
        return squid.wait_for_entry(
            lambda e: e.method == "CONNECT" and e.time >= t0 - 0.002 and e.status == 200
        )

    with (
        RelayProcess(lab, spec, redirect_ports=TCP_PORTS, settings=settings) as relay,
        relay.redirect(),
    ):
        get(relay)  # verifies the credentials (Task path); the next ones take the fast path
        get(relay)  # two spares are dialed once it ends
        spares = _wait_sockets(lab, squid, "established", 2)
        third = get(relay)
        assert int(third.fields["port"]) in spares, (third, spares)

        # Squid closes the two spares left (one new) after 2 s without a request.
        stale = _wait_sockets(lab, squid, "close-wait", 2)
        fourth = get(relay)
        assert int(fourth.fields["port"]) not in stale | spares, (fourth, stale)
        assert relay.alive()


@pytest.mark.timeout(240)
def test_many_mixed_transfers(lab: Lab, squid_relay: RelayProcess) -> None:
    rng = random.Random(0x7E57)
    # Log-uniform sizes 1 B .. 2 MiB with both ends present: many small, some large.
    sizes = [1, MAX_SIZE] + [int(2 ** rng.uniform(0, 21)) for _ in range(TRANSFERS - 2)]
    requests = [
        Request(rng.choice(("http", "https")), rng.choice((4, 6)), rng.random() < 0.5, n, _seed())
        for n in sizes
    ]
    mark = squid_relay.mark()
    started = time.monotonic()
    with (
        squid_relay.redirect(),
        concurrent.futures.ThreadPoolExecutor(max_workers=CONCURRENCY) as pool,
    ):
        results = list(pool.map(lambda r: (r, r.run(lab, max_time=60, verbose=True)), requests))
    took = time.monotonic() - started
    failures = [(r, res) for r, res in results if res.returncode != 0 or res.http_code != 200]
    mismatches = [
        r for r, res in results if res.sha256 != lab.origins.expected_sha256(r.size, r.seed)
    ]
    # Seen once in CI: two plain-HTTP curls refused at once. Keep what the relay said then.
    assert not failures, (
        f"{len(failures)} failed, first: {failures[:3]}; relay log tail:\n"
        + "\n".join(squid_relay.lines[-30:])
    )
    assert not mismatches, f"{len(mismatches)} SHA-256 mismatches, first: {mismatches[:3]}"
    assert took < 150, f"{TRANSFERS} transfers took {took:.0f}s"
    done = squid_relay.wait_for_count(" via squid: done, ", TRANSFERS, since=mark, timeout=15)
    assert len(done) == TRANSFERS
    assert not squid_relay.find_lines(" WARNING ", since=mark)


# what the relay refuses ---------------------------------------------------------------------------


@pytest.mark.parametrize("redirect_active", [True, False], ids=["redirect-on", "redirect-off"])
@pytest.mark.parametrize("addr", ["127.0.0.1", "::1"])
def test_direct_connection_is_closed(
    lab: Lab, squid_relay: RelayProcess, addr: str, redirect_active: bool
) -> None:
    mark = squid_relay.mark()
    with contextlib.ExitStack() as stack:
        if redirect_active:
            stack.enter_context(squid_relay.redirect())
        sock = stack.enter_context(lab.client.connect(addr, squid_relay.port, timeout=5))
        # Nothing sent: bytes the relay never reads would turn its close into a reset.
        assert sock.recv(1024) == b"", "the relay answered a connection it must refuse"
        local_port = sock.getsockname()[1]
    who = _authority(addr, local_port)
    line = squid_relay.wait_for_line(f" {who} -> ", since=mark)
    assert "not redirected" in line, line
    # With the redirect loaded, conntrack knows the connection went to the relay's own
    # address; without it there is no NAT record at all. Both are refused.
    reasons = "not-redirected" if redirect_active else "not-redirected|no-original-destination"
    assert re.search(rf"via -: ({reasons}),", line), line


@pytest.mark.parametrize("kind", ["squid", "dante"])
def test_wrong_password_fails_fast_and_stays_secret(lab: Lab, kind: str) -> None:
    if kind == "squid":
        creds = lab.squid.credentials
        assert creds is not None
        wrong = creds.password + "-Wr0ng"
        spec = UpstreamSpec.for_squid(lab.squid, name="badpw", password=wrong)
    else:
        creds = lab.dante.credentials
        wrong = creds.password + "-Wr0ng"
        spec = UpstreamSpec.for_dante(lab.dante, name="badpw", password=wrong)
    timeout = 10.0
    with RelayProcess(lab, spec, settings={"handshake_timeout": timeout}) as relay:
        environ = Path(f"/proc/{relay.pid}/environ").read_bytes()
        cmdline = Path(f"/proc/{relay.pid}/cmdline").read_bytes()
        with relay.redirect():
            request = Request("https", 4, True, 1000, _seed())
            started = time.monotonic()
            result = request.run(lab, max_time=30)
            took = time.monotonic() - started
        assert result.returncode != 0 and result.body == b"", result
        assert took < timeout / 2, f"the client waited {took:.1f}s for a refused password"
        line = _relay_line(relay, 0, request.destination(lab), "upstream-auth-failed", "badpw")
        assert "rejected the credentials" in line
    log = "\n".join(relay.lines)
    for secret in (wrong, creds.password):
        for form in (secret, _b64(f"{creds.username}:{secret}")):
            assert form not in log, "a password reached the relay's log"
            assert form.encode() not in environ and form.encode() not in cmdline
    assert str(relay.credentials_dir).encode() in environ


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_rejected_password_is_not_tried_again(lab: Lab) -> None:
    creds = lab.squid.credentials
    assert creds is not None
    spec = UpstreamSpec.for_squid(lab.squid, name="lockout", password=creds.password + "-Wr0ng")
    t0 = time.time()
    with RelayProcess(lab, spec) as relay, relay.redirect():
        for _ in range(5):
            result = Request("https", 4, True, 1000, _seed()).run(lab, max_time=20)
            assert result.returncode != 0, result
        relay.wait_for_count("upstream-auth-failed", 5)
    # Squid logs every failed login with the user name it was given.
    failed_logins = [
        e
        for e in _squid_entries_since(lab.squid, t0)
        if e.status == 407 and e.user == creds.username
    ]
    assert len(failed_logins) == 1, f"{len(failed_logins)} failed logins for one wrong password"
