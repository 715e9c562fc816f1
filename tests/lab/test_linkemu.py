"""The lab's link emulator (tests/lab/linkemu.py): the round trip it adds, loss, and that it
leaves nothing behind (devices, routes, process), also when it ends on its own.

Two bare namespaces joined only by the emulated link (addresses on `lo`, no veth), so every
packet between them provably went through the forwarder; and the real lab (client <-> proxy
with Squid) as bench/rtt.py uses it.

Must not import tray_proxy or PySide6.
"""

from __future__ import annotations

import contextlib
import socket
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab.curl import CurlResult, run_curl
from tests.lab.environment import Lab
from tests.lab.linkemu import DelayedLink
from tests.lab.netns import Namespace, run_tag

pytestmark = pytest.mark.lab

A_ADDR = "10.201.0.1"
B_ADDR = "10.201.0.2"
A6_ADDR = "fd00:201::1"
B6_ADDR = "fd00:201::2"


@pytest.fixture
def pair() -> Iterator[tuple[Namespace, Namespace]]:
    """Two namespaces with an address each on `lo` and no route between them."""
    tag = run_tag()
    with contextlib.ExitStack() as stack:
        made = []
        for role, v4, v6 in (("linka", A_ADDR, A6_ADDR), ("linkb", B_ADDR, B6_ADDR)):
            ns = Namespace(f"{tag}-{role}", role)
            stack.push(lambda *exc, ns=ns: ns.close())
            ns.create()
            ns.run(["ip", "addr", "add", f"{v4}/32", "dev", "lo"])
            ns.run(["ip", "addr", "add", f"{v6}/128", "dev", "lo", "nodad"])
            made.append(ns)
        yield made[0], made[1]


@contextlib.contextmanager
def echo_server(ns: Namespace, address: str) -> Iterator[int]:
    """A TCP echo server in `ns` on `address` (one thread per connection); yields its port."""
    listener = ns.listen(address, 0)
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    stop = threading.Event()

    def echo(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10.0)
            with contextlib.suppress(OSError):
                while data := conn.recv(65536):
                    conn.sendall(data)

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, name="echo-accept", daemon=True)
    thread.start()
    try:
        yield port
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


def connect_times(ns: Namespace, address: str, port: int, count: int) -> list[float]:
    """Seconds each of `count` sequential TCP connects from `ns` took (SYN to SYN-ACK)."""
    times = []
    for _ in range(count):
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = ns.socket(family)
        with sock:
            sock.settimeout(5.0)
            started = time.perf_counter()
            sock.connect((address, port))
            times.append(time.perf_counter() - started)
    return times


def device_exists(ns: Namespace, name: str) -> bool:
    return ns.run(["ip", "link", "show", "dev", name], check=False).returncode == 0


@pytest.mark.parametrize("delay_ms", [0.0, 10.0])
def test_tcp_connect_takes_two_delays(pair: tuple[Namespace, Namespace], delay_ms: float) -> None:
    a, b = pair
    with DelayedLink(a, b, delay_ms=delay_ms) as link, echo_server(b, B_ADDR) as port:
        link.carry(A_ADDR, B_ADDR)
        connect_times(a, B_ADDR, port, 2)  # warm: first packets, route cache
        times = connect_times(a, B_ADDR, port, 15)
        # Data crosses too, in packets of the link's MTU: 200 KB echoed intact.
        payload = bytes(range(256)) * 800
        with a.connect(B_ADDR, port, timeout=10.0) as sock:
            sock.sendall(payload)
            got = bytearray()
            while len(got) < len(payload):
                chunk = sock.recv(65536)
                assert chunk, "echo closed early"
                got += chunk
        assert bytes(got) == payload
    median = statistics.median(times) * 1000
    rtt = 2 * delay_ms
    # One round trip: never less (packets wait their full delay), and on a busy 2-CPU
    # machine a little more (epoll's ms rounding, waiting for a CPU).
    assert rtt - 0.5 <= median <= rtt + 8.0, (median, times)
    assert min(times) * 1000 >= rtt - 0.5
    assert link.stats is not None
    # Nothing went another way: both directions counted every packet, none lost.
    assert link.stats.forwarded_ab > 17 * 2 and link.stats.forwarded_ba > 17
    assert link.stats.lost_ab == link.stats.lost_ba == link.stats.overflow == 0


def test_ipv6_pair_is_carried_too(pair: tuple[Namespace, Namespace]) -> None:
    a, b = pair
    with DelayedLink(a, b, delay_ms=5.0) as link, echo_server(b, B6_ADDR) as port:
        link.carry(A6_ADDR, B6_ADDR)
        times = connect_times(a, B6_ADDR, port, 5)
    assert 9.5 <= statistics.median(times) * 1000 <= 18.0, times


def test_full_loss_drops_everything_and_is_counted(pair: tuple[Namespace, Namespace]) -> None:
    a, b = pair
    with DelayedLink(a, b, delay_ms=1.0, loss_percent=100.0) as link, echo_server(b, B_ADDR) as p:
        link.carry(A_ADDR, B_ADDR)
        with pytest.raises(TimeoutError):
            a.connect(B_ADDR, p, timeout=1.5).close()
    assert link.stats is not None
    assert link.stats.lost_ab >= 1  # the SYN and its retry
    assert link.stats.forwarded_ab == link.stats.forwarded_ba == 0


def test_stop_removes_devices_routes_and_process(pair: tuple[Namespace, Namespace]) -> None:
    a, b = pair
    link = DelayedLink(a, b, delay_ms=1.0, name="tplinkstop")
    with echo_server(b, B_ADDR) as port:
        with link:
            link.carry(A_ADDR, B_ADDR)
            proc = link.process
            assert proc is not None
            assert device_exists(a, "tplinkstop") and device_exists(b, "tplinkstop")
            connect_times(a, B_ADDR, port, 1)
        assert proc.returncode is not None
        assert not device_exists(a, "tplinkstop") and not device_exists(b, "tplinkstop")
        routes = a.run(["ip", "route", "show"]).stdout.decode()
        assert B_ADDR not in routes
        # Back to no path at all: the namespaces only ever met through the link.
        with pytest.raises(OSError):
            a.connect(B_ADDR, port, timeout=1.0).close()
    assert link.stats is not None and link.stats.forwarded_ab >= 1  # the SYN at least


def test_forwarder_ends_by_itself_at_its_lifetime(pair: tuple[Namespace, Namespace]) -> None:
    a, b = pair
    link = DelayedLink(a, b, delay_ms=1.0, lifetime=1.0, name="tplinklife")
    with link:
        proc = link.process
        assert proc is not None
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail("the forwarder outlived its --lifetime")
        deadline = time.monotonic() + 5
        while device_exists(a, "tplinklife") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not device_exists(a, "tplinklife") and not device_exists(b, "tplinklife")


def test_forwarder_ends_when_its_starter_goes(pair: tuple[Namespace, Namespace]) -> None:
    """EOF on stdin (the process that started it died and its pipe closed) stops it."""
    a, b = pair
    link = DelayedLink(a, b, delay_ms=1.0, name="tplinkeof")
    with link:
        proc = link.process
        assert proc is not None and proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pytest.fail("the forwarder kept running after its stdin closed")
        assert proc.returncode == 0


def test_lab_client_to_squid_pays_the_round_trip(lab: Lab, tmp_path: Path) -> None:
    """As bench/rtt.py uses it: the client's traffic to the proxy namespace, and only that,
    takes the link; Squid still sees the client's own address (its ACL allows the lab)."""
    assert lab.client.v4 and lab.proxy.v4
    url = lab.origins.url("https", "/health")

    def curl(via_squid: bool) -> CurlResult:
        return run_curl(
            lab.client,
            url,
            workdir=tmp_path,
            cacert=lab.ca_path,
            proxy=lab.squid.proxy_url() if via_squid else None,
            credentials=lab.squid.credentials if via_squid else None,
        )

    before = curl(True)
    assert before.http_code == 200, before
    with DelayedLink(lab.client, lab.proxy, delay_ms=10.0, name="tplinklab") as link:
        link.carry(lab.client.v4, lab.proxy.v4)
        through = [curl(True) for _ in range(3)]
        direct = curl(False)  # client -> origin: not over the link
    assert link.stats is not None and link.stats.forwarded_ab > 0
    assert all(r.http_code == 200 for r in through), through
    assert direct.http_code == 200, direct
    # TCP to the proxy is one round trip; CONNECT, TLS and the request three more.
    connect_ms = statistics.median(float(r.info["time_connect"]) for r in through) * 1000
    first_byte_ms = statistics.median(float(r.info["time_starttransfer"]) for r in through) * 1000
    assert 19.5 <= connect_ms <= 30.0, connect_ms
    assert first_byte_ms >= 4 * 19.5, first_byte_ms
    # Without the link, a connect is well under one emulated round trip.
    assert float(direct.info["time_connect"]) * 1000 < 15.0, direct.info["time_connect"]
    assert float(before.info["time_connect"]) * 1000 < 15.0, before.info["time_connect"]
