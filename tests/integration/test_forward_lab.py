"""Port 80 through a Squid that refuses CONNECT :80 (issue 15 section 4), with real components.

A Squid with Debian's stock squid.conf (tests/lab/squid_stock.py: `http_access deny CONNECT
!SSL_ports`) and Basic auth in the proxy namespace; the lab origins (and origin_forward.py for
chunked and read-to-close answers) in the origin namespace; real curl and raw HTTP clients in
the client namespace. `Forwarder` runs the relay's pieces on uvloop in a thread in the client
namespace, the way the opening path is to use them: peek the first bytes, try `CONNECT
host:80` (open_tunnel); when the proxy refuses it, remember that (Port80Memory) and serve the
connection with forward_http. A connection opened while the memory holds goes straight to
forwarding. Clients reach it on the namespace's loopback (curl `--connect-to`), standing in
for the nft redirect, and it forwards as if they had connected to the origin's address.

Must not import PySide6.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import os
import resource
import secrets
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import h11
import pytest

from tests.integration.engine_in_lab import EngineInLab
from tests.integration.relay import RelayProcess, UpstreamSpec
from tests.lab.creds import ProxyCredentials
from tests.lab.curl import CurlResult
from tests.lab.environment import Lab
from tests.lab.netns import NsProcess, join_namespace, lab_user_name
from tests.lab.origins import HOSTNAME, pattern_sha256
from tests.lab.squid import BasicAuth
from tests.lab.squid_stock import StockSquid
from tray_proxy.relay.aio import within
from tray_proxy.relay.forward import ForwardResult, Port80Memory, forward_http
from tray_proxy.relay.origdst import original_destination
from tray_proxy.relay.pipe import abort
from tray_proxy.relay.protocol.peek import HostPeeker
from tray_proxy.relay.records import Address, CloseReason
from tray_proxy.relay.secrets import Credentials, Secret
from tray_proxy.relay.settings import UpstreamKind, UpstreamProxy
from tray_proxy.relay.upstream import Dialer, UpstreamAuth, UpstreamError, open_tunnel

pytestmark = pytest.mark.lab

ORIGIN_SCRIPT = Path(__file__).parents[1] / "lab" / "origin_forward.py"
MB = 1024 * 1024


def _seed() -> str:
    return secrets.token_hex(6)


# -- the lab pieces ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stock(lab: Lab) -> Iterator[StockSquid]:
    """Debian's stock Squid with Basic auth, on a port of its own (other tests run alongside)."""
    port = 20000 + os.getpid() % 4000  # below the ephemeral range (32768+)
    user = lab_user_name(lab.tag)[:20] + "f"
    squid = StockSquid(
        lab.proxy,
        lab.tmp / f"stock-squid-{port}",
        port=port,
        auth=BasicAuth(ProxyCredentials.generate(user, lab.tmp)),
        hosts=lab.hosts_text(),
    )
    try:
        squid.start()
        yield squid
    finally:
        squid.stop()
        if not lab.keep_files:
            squid.remove_files()


@pytest.fixture(scope="module")
def streaming_origin(lab: Lab) -> Iterator[int]:
    """origin_forward.py in the origin namespace, serving the apt repository REPO_DIR of
    lab.tmp as /repo/; yields its port."""
    port = 24000 + os.getpid() % 2000  # below the ephemeral range
    log = lab.tmp / f"origin-forward-{port}.jsonl"
    repo = _build_repo(lab.tmp / f"repo-{port}")
    argv = [sys.executable, "-I", "-u", str(ORIGIN_SCRIPT), "--port", str(port)]
    proc: NsProcess = lab.origin.popen(
        [*argv, "--log", str(log), "--static", str(repo)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"READY", "origin_forward.py did not start"
        yield port
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.stop(grace=3.0)
        if proc.stdout is not None:
            proc.stdout.close()
        lab.origin.forget(proc)


DEMO_PACKAGE = "tpforward-demo"


def _build_repo(repo: Path) -> Path:
    """A flat apt repository with one package of 3 MiB (random, so nothing compresses it):
    Packages, Packages.gz and a Release with their SHA-256 sums, as a mirror has."""
    build = repo.parent / f"{repo.name}-build"
    (build / "DEBIAN").mkdir(parents=True)
    (build / "DEBIAN" / "control").write_text(
        f"Package: {DEMO_PACKAGE}\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: tray-proxy lab <lab@lab.test>\nDescription: forwarding test package\n"
    )
    payload = build / "usr" / "share" / DEMO_PACKAGE
    payload.mkdir(parents=True)
    (payload / "blob").write_bytes(os.urandom(3 * MB))
    repo.mkdir(parents=True)
    deb = repo / f"{DEMO_PACKAGE}_1.0_all.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(build), str(deb)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    # The index entry dpkg-scanpackages would write (dpkg-dev is not needed for one line).
    packages = (
        f"Package: {DEMO_PACKAGE}\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: tray-proxy lab <lab@lab.test>\n"
        f"Filename: ./{deb.name}\nSize: {deb.stat().st_size}\n"
        f"SHA256: {hashlib.sha256(deb.read_bytes()).hexdigest()}\n"
        "Description: forwarding test package\n\n"
    ).encode()
    (repo / "Packages").write_bytes(packages)
    (repo / "Packages.gz").write_bytes(gzip.compress(packages))
    sums = "".join(
        f" {hashlib.sha256((repo / n).read_bytes()).hexdigest()} {(repo / n).stat().st_size} {n}\n"
        for n in ("Packages", "Packages.gz")
    )
    date = time.strftime("%a, %d %b %Y %H:%M:%S UTC", time.gmtime())
    (repo / "Release").write_text(
        f"Origin: tplab\nLabel: tplab\nSuite: stable\nCodename: tplab\nDate: {date}\n"
        f"Architectures: all\nSHA256:\n{sums}"
    )
    return repo


def _upstream(squid: StockSquid) -> UpstreamProxy:
    assert squid.credentials is not None
    return UpstreamProxy(
        "stock", UpstreamKind.HTTP, squid.host, squid.port, username=squid.credentials.username
    )


def _credentials(squid: StockSquid, password: str | None = None) -> Credentials:
    assert squid.credentials is not None
    return Credentials(
        squid.credentials.username,
        Secret(password if password is not None else squid.credentials.password),
    )


class Forwarder(EngineInLab):
    """The relay's port-80 path on uvloop in the client namespace, on 127.0.0.1:`port`.

    Each accepted connection counts as one to `destination`, or with None, to where the lab's
    nft redirect says it was going (SO_ORIGINAL_DST). `results`: each forwarded
    connection's ForwardResult; `refusals`: the CONNECT failures that led to forwarding;
    `cpu`: seconds of this thread's CPU per connection.
    """

    def __init__(
        self,
        lab: Lab,
        squid: StockSquid,
        destination: Address | None,
        *,
        credentials: Credentials,
        memory: Port80Memory | None = None,
        auth: UpstreamAuth | None = None,
    ) -> None:
        super().__init__(lab.client.name)
        self.squid = squid
        self.upstream = _upstream(squid)
        self.destination = destination
        self.credentials = credentials
        self.memory = memory or Port80Memory()
        self.auth = auth or UpstreamAuth()
        self.results: list[ForwardResult] = []
        self.refusals: list[UpstreamError] = []
        self.cpu: list[float] = []
        self.port = 0

    def _run(self) -> None:
        import uvloop  # the engine's loop in the app

        try:
            join_namespace(self.ns_name)
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(self._on_loop())
        except BaseException as exc:
            self.error = exc
            self.ready.set()

    async def _main(self) -> None:
        loop = asyncio.get_running_loop()
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        listener.setblocking(False)
        self.port = listener.getsockname()[1]
        self.dialer = Dialer(None)
        tasks: set[asyncio.Task[None]] = set()

        async def accept() -> None:
            while True:
                conn, _ = await loop.sock_accept(listener)
                conn.setblocking(False)
                task = loop.create_task(self._serve_one(conn), name="forward-conn")
                tasks.add(task)
                task.add_done_callback(tasks.discard)

        acceptor = loop.create_task(accept(), name="forward-accept")
        try:
            await self.serve()
        finally:
            acceptor.cancel()
            for task in list(tasks):
                task.cancel()
            await asyncio.gather(acceptor, *tasks, return_exceptions=True)
            listener.close()
            self.auth.close()

    async def dial(self) -> socket.socket:
        return await self.dialer.connect(self.squid.host, self.squid.port, 5.0, reserved=False)

    async def _serve_one(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        started = time.thread_time()
        reset = False
        try:
            peeker = HostPeeker(16384)

            async def peek() -> None:
                while not peeker.decided and not peeker.feed(await loop.sock_recv(conn, 16384)):
                    pass

            with contextlib.suppress(asyncio.TimeoutError):
                await within(2.0, peek())
            if not peeker.decided:
                peeker.feed(b"")
            destination = self.destination or original_destination(conn, socket.AF_INET)
            if destination is None:
                return
            port = destination[1]
            if not self.memory.forwards(self.upstream, port):
                target = (peeker.host or destination[0], port)
                try:
                    sock, _ = await open_tunnel(
                        self.dialer,
                        self.upstream,
                        target,
                        self.credentials,
                        self.auth,
                        connect_timeout=5.0,
                        handshake_timeout=5.0,
                        reserved=False,
                    )
                except UpstreamError as exc:
                    if not self.memory.learn(self.upstream, port, exc.status):
                        self.refusals.append(exc)
                        return
                    self.refusals.append(exc)
                else:
                    sock.close()  # the stock Squid never gets here; the test says so
                    return
            result = await forward_http(
                conn,
                peeker.buffered,
                destination,
                self.upstream,
                self.credentials,
                self.auth,
                self.dial,
                host=peeker.host,
            )
            reset = result.reset
            self.results.append(result)
        finally:
            self.cpu.append(time.thread_time() - started)
            if reset:
                abort(conn)
            else:
                conn.close()


# -- clients ------------------------------------------------------------------------------------


def _curl(
    lab: Lab,
    forwarder: Forwarder,
    path: str,
    *,
    port: int = 80,
    data: bytes | None = None,
    max_time: float = 30.0,
    options: Sequence[str] = (),
) -> CurlResult:
    """curl http://origin.lab.test[:port]/path in the client namespace, connected to the
    forwarder instead of the origin (as the redirect would), with no proxy."""
    shown = "" if port == 80 else f":{port}"
    return lab.curl(
        f"http://{HOSTNAME}{shown}{path}",
        data=data,
        max_time=max_time,
        options=[f'connect-to = "{HOSTNAME}:{port}:127.0.0.1:{forwarder.port}"', *options],
    )


class RawClient:
    """A plain TCP client in the client namespace with h11 for the responses."""

    def __init__(self, lab: Lab, port: int) -> None:
        self.sock = lab.client.connect("127.0.0.1", port, timeout=20)
        self.http = h11.Connection(h11.CLIENT)

    def close(self) -> None:
        self.sock.close()

    def send(self, *events: h11.Request | h11.Data | h11.EndOfMessage) -> None:
        for event in events:
            self.sock.sendall(self.http.send(event) or b"")

    def event(self) -> object:
        while True:
            event = self.http.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.http.receive_data(self.sock.recv(1 << 20))

    def response(self) -> tuple[h11.Response, str, int]:
        """The next final response, its body's SHA-256 and length."""
        head = self.event()
        while isinstance(head, h11.InformationalResponse):
            head = self.event()
        assert isinstance(head, h11.Response), head
        digest = hashlib.sha256()
        size = 0
        while True:
            event = self.event()
            if isinstance(event, h11.Data):
                digest.update(event.data)
                size += len(event.data)
            elif isinstance(event, h11.EndOfMessage):
                break
        if self.http.our_state is h11.DONE and self.http.their_state is h11.DONE:
            self.http.start_next_cycle()
        return head, digest.hexdigest(), size


def _get(target: str) -> h11.Request:
    return h11.Request(method="GET", target=target, headers=[("Host", HOSTNAME)])


# -- tests ------------------------------------------------------------------------------------


def test_stock_squid_refuses_connect_80_so_plain_http_is_forwarded_instead(
    lab: Lab, stock: StockSquid
) -> None:
    seed = _seed()
    # The premise: curl itself tunnelling through the stock Squid gets 403 for port 80.
    tunnelled = lab.curl(
        lab.origins.url("http", f"/bytes/10?seed={seed}"), via=stock, options=["proxytunnel"]
    )
    assert tunnelled.connect_code == 403, tunnelled
    with Forwarder(lab, stock, (lab.origins.v4, 80), credentials=_credentials(stock)) as fwd:
        first = _curl(lab, fwd, f"/bytes/1000?seed={seed}")
        second = _curl(lab, fwd, f"/bytes/2000?seed={seed}")
    assert first.http_code == 200 and first.sha256 == pattern_sha256(1000, seed), first
    assert second.http_code == 200 and second.sha256 == pattern_sha256(2000, seed), second
    # The first connection's CONNECT was refused (403) and taught the memory; the second
    # went straight to forwarding.
    assert [e.status for e in fwd.refusals] == [403]
    assert len(fwd.results) == 2 and all(r.reason is CloseReason.DONE for r in fwd.results)
    entries = stock.entries()
    assert any(e.method == "CONNECT" and e.status == 403 for e in entries)
    forwarded = [e for e in entries if e.method == "GET" and seed in e.uri]
    # The scheme was not known yet (the refused CONNECT set no memo): the first request went
    # without credentials, got 407 offering Basic, and went again with them; later ones
    # carry Basic at once.
    assert [e.status for e in forwarded] == [407, 200, 200]
    forwarded = forwarded[1:]
    assert {e.uri for e in forwarded} == {
        f"http://{HOSTNAME}/bytes/1000?seed={seed}",
        f"http://{HOSTNAME}/bytes/2000?seed={seed}",
    }
    assert stock.credentials is not None
    assert all(e.user == stock.credentials.username and e.status == 200 for e in forwarded)
    # The origin was reached by the proxy, not by the client.
    event = lab.origins.wait_for_event(lambda e: e.get("path") == f"/bytes/2000?seed={seed}")
    assert event["peer"] in (stock.host, stock.host6)


def test_keep_alive_and_pipelined_requests_on_one_client_connection(
    lab: Lab, stock: StockSquid
) -> None:
    seed = _seed()
    memory = Port80Memory()
    memory.learn(_upstream(stock), 80, 403)
    with Forwarder(
        lab, stock, (lab.origins.v4, 80), credentials=_credentials(stock), memory=memory
    ) as fwd:
        client = RawClient(lab, fwd.port)
        try:
            for n in (1000, 70_000, 5):
                client.send(_get(f"/bytes/{n}?seed={seed}"), h11.EndOfMessage())
                head, digest, size = client.response()
                assert head.status_code == 200 and size == n
                assert digest == pattern_sha256(n, seed)
            # Pipelined: four requests in one write before any answer; answers in order.
            sizes = (300_000, 10, 123_456, 0)
            raw = b"".join(
                f"GET /bytes/{n}?seed={seed} HTTP/1.1\r\nHost: {HOSTNAME}\r\n\r\n".encode()
                for n in sizes
            )
            client.sock.sendall(raw)
            for n in sizes:
                client.http.send(_get(f"/bytes/{n}?seed={seed}"))
                client.http.send(h11.EndOfMessage())
                head, digest, size = client.response()
                assert head.status_code == 200 and size == n
                assert digest == pattern_sha256(n, seed)
        finally:
            client.close()
        deadline = time.monotonic() + 10
        while not fwd.results and time.monotonic() < deadline:
            time.sleep(0.02)
    assert len(fwd.results) == 1, "one client connection"
    assert fwd.results[0].requests == 7
    assert fwd.refusals == []


def test_chunked_upload_with_expect_100_continue(lab: Lab, stock: StockSquid) -> None:
    body = os.urandom(3 * MB + 17)
    memory = Port80Memory()
    memory.learn(_upstream(stock), 80, 403)
    with Forwarder(
        lab, stock, (lab.origins.v4, 80), credentials=_credentials(stock), memory=memory
    ) as fwd:
        client = RawClient(lab, fwd.port)
        try:
            client.send(
                h11.Request(
                    method="POST",
                    target="/echo",
                    headers=[
                        ("Host", HOSTNAME),
                        ("Transfer-Encoding", "chunked"),
                        ("Expect", "100-continue"),
                    ],
                )
            )
            # Like curl, wait for 100 Continue before sending the body (bounded).
            client.sock.settimeout(5)
            informational = client.event()
            assert isinstance(informational, h11.InformationalResponse), informational
            assert informational.status_code == 100
            client.sock.settimeout(20)
            for i in range(0, len(body), 256 * 1024):
                client.send(h11.Data(data=body[i : i + 256 * 1024]))
            client.send(h11.EndOfMessage())
            head, digest, size = client.response()
        finally:
            client.close()
        # And curl's own chunked upload (it sends Expect: 100-continue for large bodies).
        by_curl = _curl(
            lab,
            fwd,
            "/echo",
            data=body,
            options=['header = "Transfer-Encoding: chunked"', 'header = "Expect: 100-continue"'],
        )
    assert head.status_code == 200 and size == len(body)
    assert digest == hashlib.sha256(body).hexdigest()
    assert by_curl.http_code == 200 and by_curl.sha256 == hashlib.sha256(body).hexdigest()


def test_chunked_read_to_close_and_head_answers(
    lab: Lab, stock: StockSquid, streaming_origin: int
) -> None:
    seed = _seed()
    port = streaming_origin
    memory = Port80Memory()
    memory.learn(_upstream(stock), port, 403)
    with Forwarder(
        lab, stock, (lab.origins.v4, port), credentials=_credentials(stock), memory=memory
    ) as fwd:
        chunked = _curl(lab, fwd, f"/chunked/{3 * MB + 5}?seed={seed}", port=port)
        closing = _curl(lab, fwd, f"/close/{2 * MB + 3}?seed={seed}", port=port)
        head = _curl(lab, fwd, f"/chunked/100?seed={seed}", port=port, options=["head"])
        client = RawClient(lab, fwd.port)
        try:
            # One keep-alive connection across all kinds: the framing stays right.
            for method, target, n in (
                ("GET", f"/close/999?seed={seed}", 999),
                ("HEAD", f"/chunked/5000?seed={seed}", 0),
                ("GET", f"/chunked/5000?seed={seed}", 5000),
            ):
                client.send(
                    h11.Request(method=method, target=target, headers=[("Host", HOSTNAME)]),
                    h11.EndOfMessage(),
                )
                response, digest, size = client.response()
                assert response.status_code == 200
                assert size == n and digest == pattern_sha256(n, seed)
        finally:
            client.close()
    assert chunked.http_code == 200 and chunked.sha256 == pattern_sha256(3 * MB + 5, seed)
    assert closing.http_code == 200 and closing.sha256 == pattern_sha256(2 * MB + 3, seed)
    # curl -I writes the head as its output; it would fail on a body after a HEAD answer.
    assert head.returncode == 0 and head.http_code == 200, head
    assert head.body.startswith(b"HTTP/1.1 200 "), head


def test_wrong_password_fails_once_like_the_connect_path(lab: Lab, stock: StockSquid) -> None:
    seed = _seed()
    memory = Port80Memory()
    memory.learn(_upstream(stock), 80, 403)
    auth = UpstreamAuth()
    auth.memo.scheme = "basic"  # the proxy was known to take Basic
    wrong = _credentials(stock, password="not-" + secrets.token_hex(4))
    with Forwarder(
        lab, stock, (lab.origins.v4, 80), credentials=wrong, memory=memory, auth=auth
    ) as fwd:
        answers = [_curl(lab, fwd, f"/bytes/1?seed={seed}-{i}") for i in range(3)]
    assert [a.http_code for a in answers] == [502, 502, 502]
    failures = [r.failure for r in fwd.results]
    assert all(f is not None and f.reason is CloseReason.UPSTREAM_AUTH_FAILED for f in failures)
    assert failures[0] is not None and failures[0].rejected
    # Squid saw the wrong password once; the later connections never sent it.
    denied = [e for e in stock.entries() if seed in e.uri]
    assert [e.status for e in denied] == [407]


def test_a_20_mb_download_against_curl_x(lab: Lab, stock: StockSquid) -> None:
    """Five rounds, alternating: curl through the forwarder, and curl -x to the same Squid.
    Prints the medians (time, and CPU of the forwarder's thread and of curl)."""
    size = 20 * MB
    memory = Port80Memory()
    memory.learn(_upstream(stock), 80, 403)
    forwarded_s: list[float] = []
    direct_s: list[float] = []
    curl_cpu: dict[str, list[float]] = {"forwarded": [], "direct": []}

    def children_cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    with Forwarder(
        lab, stock, (lab.origins.v4, 80), credentials=_credentials(stock), memory=memory
    ) as fwd:
        for _ in range(5):
            seed = _seed()
            before = children_cpu()
            forwarded = _curl(lab, fwd, f"/bytes/{size}?seed={seed}-f", max_time=60)
            middle = children_cpu()
            direct = lab.curl(lab.origins.url("http", f"/bytes/{size}?seed={seed}-d"), via=stock)
            curl_cpu["forwarded"].append(middle - before)
            curl_cpu["direct"].append(children_cpu() - middle)
            assert forwarded.http_code == 200, forwarded
            assert forwarded.sha256 == pattern_sha256(size, f"{seed}-f")
            assert direct.http_code == 200 and direct.sha256 == pattern_sha256(size, f"{seed}-d")
            forwarded_s.append(float(forwarded.info["time_total"]))
            direct_s.append(float(direct.info["time_total"]))
    relay_cpu = statistics.median(fwd.cpu)
    print(
        f"\n20 MiB, median of 5: forwarded {statistics.median(forwarded_s):.3f}s "
        f"(forwarder thread CPU {relay_cpu:.3f}s, curl "
        f"{statistics.median(curl_cpu['forwarded']):.3f}s); curl -x "
        f"{statistics.median(direct_s):.3f}s (curl {statistics.median(curl_cpu['direct']):.3f}s)"
    )
    # Generous bound: streaming in large reads costs well under a second of CPU for 20 MiB.
    assert relay_cpu < 2.0


def test_through_the_redirect_curl_with_no_proxy_settings(lab: Lab, stock: StockSquid) -> None:
    """The lab's nft redirect sends the client's port-80 connections to the forwarder, which
    finds their destination with SO_ORIGINAL_DST, as the relay does."""
    seed = _seed()
    body = os.urandom(2 * MB)
    with (
        Forwarder(lab, stock, None, credentials=_credentials(stock)) as fwd,
        lab.redirect(fwd.port, redirect_ports=(80,)),
    ):
        by_name = lab.curl(lab.origins.url("http", f"/bytes/5000?seed={seed}"))
        by_ip = lab.curl(lab.origins.url("http", f"/bytes/6000?seed={seed}", host="v4"))
        upload = lab.curl(lab.origins.url("http", "/echo"), data=body)
    assert by_name.http_code == 200 and by_name.sha256 == pattern_sha256(5000, seed), by_name
    assert by_ip.http_code == 200 and by_ip.sha256 == pattern_sha256(6000, seed), by_ip
    assert upload.http_code == 200 and upload.sha256 == hashlib.sha256(body).hexdigest()
    assert [e.status for e in fwd.refusals] == [403]
    uris = {e.uri for e in stock.entries() if seed in e.uri and e.status == 200}
    # With no name in Host (an IP URL), the request names the original destination.
    assert uris == {
        f"http://{HOSTNAME}/bytes/5000?seed={seed}",
        f"http://{lab.origins.v4}/bytes/6000?seed={seed}",
    }


def _apt(lab: Lab, root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """apt-get in the client namespace with its own state under `root` and nothing of the
    host's apt configuration (no proxy settings anywhere: `env -i`)."""
    return subprocess.run(
        [
            *("ip", "netns", "exec", lab.client.name, "env", "-i"),
            f"APT_CONFIG={root / 'apt.conf'}",
            "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
            "apt-get",
            *args,
        ],
        cwd=root / "download",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_apt_update_and_download_through_a_stock_squid(
    lab: Lab, stock: StockSquid, streaming_origin: int
) -> None:
    """Real apt (it pipelines and keeps connections alive) against an http:// repository,
    with no proxy configured, through the redirect and a Squid that refuses CONNECT :80."""
    port = streaming_origin
    root = lab.tmp / f"apt-{_seed()}"
    for sub in ("download", "state/lists/partial", "cache/archives/partial", "parts", "src.d"):
        (root / sub).mkdir(parents=True)
    (root / "status").write_text("")
    (root / "sources.list").write_text(f"deb [trusted=yes] http://{HOSTNAME}:{port}/repo/ ./\n")
    (root / "apt.conf").write_text(
        "\n".join(
            [
                f'Dir::Etc::SourceList "{root / "sources.list"}";',
                f'Dir::Etc::SourceParts "{root / "src.d"}";',
                f'Dir::Etc::Parts "{root / "parts"}";',
                f'Dir::Etc::PreferencesParts "{root / "parts"}";',
                f'Dir::State "{root / "state"}";',
                f'Dir::State::status "{root / "status"}";',
                f'Dir::Cache "{root / "cache"}";',
                'Debug::NoLocking "true";',
                'APT::Sandbox::User "root";',
                'Acquire::Languages "none";',
                'Acquire::Retries "0";',
                'Acquire::http::Timeout "20";',
                "",
            ]
        )
    )
    with (
        Forwarder(lab, stock, None, credentials=_credentials(stock)) as fwd,
        lab.redirect(fwd.port, redirect_ports=(80, port)),
    ):
        update = _apt(lab, root, "update")
        download = _apt(lab, root, "download", DEMO_PACKAGE)
    assert update.returncode == 0 and "Err:" not in update.stdout, update.stdout + update.stderr
    assert download.returncode == 0, download.stdout + download.stderr
    (got,) = (root / "download").glob(f"{DEMO_PACKAGE}_*.deb")
    repo = lab.tmp / f"repo-{port}"
    expected = repo / got.name
    assert (
        hashlib.sha256(got.read_bytes()).digest() == hashlib.sha256(expected.read_bytes()).digest()
    )
    assert [e.status for e in fwd.refusals] == [403]
    assert fwd.results and all(r.failure is None for r in fwd.results)
    fetched = [e.uri for e in stock.entries() if f":{port}/repo/" in e.uri and e.status == 200]
    assert f"http://{HOSTNAME}:{port}/repo/./{got.name}" in fetched
    # apt kept its connection for several requests (InRelease, Release, Release.gpg, ...).
    assert max(r.requests for r in fwd.results) >= 3, fwd.results


def test_through_tray_proxy_run_plain_http_is_forwarded(lab: Lab, stock: StockSquid) -> None:
    """The whole relay (`tray-proxy run`, the engine's opening path) with the lab redirect:
    the first connection's CONNECT :80 gets 403, then all plain HTTP is forwarded."""
    seed = _seed()
    body = os.urandom(MB + 5)
    with (
        RelayProcess(lab, UpstreamSpec.for_squid(stock), redirect_ports=(80, 443)) as relay,
        relay.redirect(),
    ):
        first = lab.curl(lab.origins.url("http", f"/bytes/70000?seed={seed}"))
        second = lab.curl(lab.origins.url("http", f"/bytes/80000?seed={seed}"))
        upload = lab.curl(lab.origins.url("http", "/echo"), data=body)
        tls = lab.curl(lab.origins.url("https", f"/bytes/1000?seed={seed}"))
        log = "\n".join(relay.lines[-20:])
    assert first.http_code == 200 and first.sha256 == pattern_sha256(70000, seed), log
    assert second.http_code == 200 and second.sha256 == pattern_sha256(80000, seed), log
    assert upload.http_code == 200 and upload.sha256 == hashlib.sha256(body).hexdigest(), log
    assert tls.http_code == 200 and tls.sha256 == pattern_sha256(1000, seed), tls
    entries = stock.entries()
    assert any(e.method == "CONNECT" and e.uri.endswith(":80") and e.status == 403 for e in entries)
    forwarded = {e.uri for e in entries if e.method == "GET" and seed in e.uri and e.status == 200}
    assert forwarded == {
        f"http://{HOSTNAME}/bytes/70000?seed={seed}",
        f"http://{HOSTNAME}/bytes/80000?seed={seed}",
    }
